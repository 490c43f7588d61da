"""Arguments of `trol-train`, parsed by TRL's TrlParser next to TRL's own `SFTConfig` (so every SFTConfig field can be
set on the command line or in the `--config FILE.yaml` recipe)."""

from dataclasses import dataclass, field

STAGES = (1, 2)
QUANTIZATIONS = ("4bit", "8bit", "none")


@dataclass
class TrolModelArguments:
    """Which model to train and how (the TroL parts of a recipe)."""

    stage: int = field(default=1, metadata={
        "help": "1: train the projector and all gates, vision tower and LLM frozen. 2: projector + gates + LoRA on "
                "every linear layer of the (quantized) LLM, vision tower frozen."})
    model_name_or_path: str | None = field(default=None, metadata={
        "help": "An existing TroL folder or hub id (stage 2: the stage-1 output). Leave empty in stage 1 to start "
                "from --vision_model and --language_model."})
    vision_model: str | None = field(default=None, metadata={
        "help": "Stage 1 from scratch: vision encoder id/folder (CLIP, SigLIP, ...)."})
    language_model: str | None = field(default=None, metadata={
        "help": "Stage 1 from scratch: decoder-only LLM id/folder (any transformers causal LM)."})
    image_size: int | None = field(default=None, metadata={
        "help": "Run the vision encoder at this resolution (position embeddings interpolated once), e.g. 490."})
    image_token: str = field(default="<image>", metadata={
        "help": "Image placeholder token, added to the tokenizer if missing."})
    share_gates: bool = field(default=False, metadata={"help": "One gate for all layers instead of one per layer."})
    gate_init_mixing_ratio: float = field(default=0.1, metadata={"help": "Mixing ratio w of a fresh gate."})
    quantization: str = field(default="4bit", metadata={
        "help": "Stage 2: how the LLM is loaded under LoRA: 4bit (NF4 + double quant, the paper's 1.8B/7B), 8bit "
                "(the paper's 3.8B) or none."})
    lora_r: int = field(default=64, metadata={"help": "LoRA rank (paper: 64)."})
    lora_alpha: int = field(default=64, metadata={"help": "LoRA alpha (paper: 64)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    dtype: str = field(default="bfloat16", metadata={
        "help": "Weights dtype for the unquantized parts: bfloat16, float16 or float32 (CPU tests)."})
    attn_implementation: str | None = field(default=None, metadata={
        "help": "eager, sdpa or flash_attention_2 (default: transformers' choice)."})
    compression_schedule: str | None = field(default=None, metadata={
        "help": "Visual context compression (LLaVolta) while training: 4stage (layer 2/stride 8, layer 2/stride 2, "
                "layer 16/stride 2, none; quarters of the run), heavy (layer 2/stride 8 throughout), light (layer "
                "16/stride 8 throughout), none, or stages 'start:layer:stride,...' with start a fraction of the run "
                "(e.g. '0:2:8,0.5:none'); in YAML also a list of [start, layer, stride]. Default: the model's own "
                "compression_layer/compression_stride, unchanged."})
    compression_at_inference: bool | None = field(default=None, metadata={
        "help": "Whether the trained model also compresses at inference (default: when the schedule's last stage "
                "compresses, as heavy/light; 4stage ends uncompressed)."})

    def __post_init__(self):
        if self.stage not in STAGES:
            raise ValueError(f"--stage {self.stage} is not a TroL stage; use 1 or 2.")
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"--quantization {self.quantization!r} is not supported; use one of {list(QUANTIZATIONS)}.")
        if self.dtype not in ("bfloat16", "float16", "float32"):
            raise ValueError(f"--dtype {self.dtype!r} is not supported; use bfloat16, float16 or float32.")
        from_parts = self.vision_model is not None or self.language_model is not None
        if self.model_name_or_path is None and not (self.vision_model and self.language_model):
            raise ValueError(
                "Say what to train: --model_name_or_path TROL_FOLDER (stage 2: the stage-1 output), or, in stage 1, "
                "both --vision_model and --language_model."
            )
        if self.model_name_or_path is not None and from_parts:
            raise ValueError("Give either --model_name_or_path or --vision_model/--language_model, not both.")
        if self.stage == 2 and self.model_name_or_path is None:
            raise ValueError("Stage 2 starts from the stage-1 output: pass --model_name_or_path STAGE1_FOLDER.")
        if self.compression_schedule is not None:
            from .compression import parse_schedule

            parse_schedule(self.compression_schedule)  # fail at parse time, not after the model loaded
        elif self.compression_at_inference is not None:
            raise ValueError("--compression_at_inference applies to a --compression_schedule; give one (or set the "
                             "model config's compression_at_inference).")


@dataclass
class TrolDataArguments:
    """Where the training data comes from."""

    data_config: str | None = field(default=None, metadata={
        "help": "YAML file listing the data sources (format, path, image_root, weight); see "
                "trainer/recipes/data_mix.yaml."})

    def __post_init__(self):
        if self.data_config is None:
            raise ValueError("Pass --data_config MIX.yaml (see trainer/recipes/data_mix.yaml for the format).")


__all__ = ["TrolDataArguments", "TrolModelArguments"]
