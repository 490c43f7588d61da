"""The two TroL training stages on TRL's SFTTrainer (paper section 3; launch commands in trainer/cli.py).

Stage 1: projector + every gate train; vision tower and LLM are frozen (checked, not assumed).
Stage 2: projector + gates + LoRA (rank 64, alpha 64) on every linear layer of the LLM, which is loaded 4-bit NF4
with double quantization (default), 8-bit, or unquantized; the vision tower stays frozen.
Either stage can train with staged visual context compression (LLaVolta, `--compression_schedule`, trainer/compression.py).
"""

import functools
import json
import re
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer, BitsAndBytesConfig

from ..modeling_trol import TrolForConditionalGeneration
from ..processing_trol import TrolProcessor
from .arguments import TrolDataArguments, TrolModelArguments

ARGS_FILE = "trol_training_args.json"
"""Written next to each stage's output: what hub_upload.py reads to describe the training in the model card."""


def build_model_and_processor(args: TrolModelArguments) -> tuple[TrolForConditionalGeneration, TrolProcessor]:
    """Stage 1 from a vision encoder + LLM, or any stage from an existing TroL folder (quantized in stage 2)."""
    dtype = getattr(torch, args.dtype)
    load_kwargs = {"dtype": dtype}
    if args.attn_implementation:
        load_kwargs["attn_implementation"] = args.attn_implementation
    if args.model_name_or_path is not None:
        if args.stage == 2 and args.quantization != "none":
            load_kwargs["quantization_config"] = quantization_config(args.quantization, dtype)
        model = TrolForConditionalGeneration.from_pretrained(args.model_name_or_path, **load_kwargs)
        processor = TrolProcessor.from_pretrained(args.model_name_or_path, config=model.config)
    else:
        model, processor = _from_parts(args, dtype)
    if processor.image_token_id != model.config.image_token_id:
        raise ValueError(
            f"The processor's image token id {processor.image_token_id} differs from the model's "
            f"config.image_token_id={model.config.image_token_id}; they must agree (re-save the processor)."
        )
    if args.attn_implementation and args.model_name_or_path is None:
        model.set_attn_implementation(args.attn_implementation)
    return model, processor


def _from_parts(args: TrolModelArguments, dtype: torch.dtype):
    tokenizer = AutoTokenizer.from_pretrained(args.language_model)
    if args.image_token not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [args.image_token]})
    token_id = tokenizer.convert_tokens_to_ids(args.image_token)
    vocab_size = AutoConfig.from_pretrained(args.language_model).get_text_config(decoder=True).vocab_size
    # A tokenizer shorter than its model's embedding matrix (Qwen2.5) reuses a spare row; otherwise append one.
    model = TrolForConditionalGeneration.from_vision_and_text(
        args.vision_model, args.language_model, image_token_id=token_id if token_id < vocab_size else None,
        image_size=args.image_size, dtype=dtype, share_gates=args.share_gates,
        gate_init_mixing_ratio=args.gate_init_mixing_ratio,
    )
    if model.config.image_token_id != token_id:
        raise ValueError(
            f"The tokenizer gives {args.image_token!r} id {token_id} but the model appended id "
            f"{model.config.image_token_id}: the tokenizer ({len(tokenizer)} tokens) and the model's vocabulary "
            f"({vocab_size}) disagree. Add {args.image_token!r} to the tokenizer so that it lands at {vocab_size}."
        )
    image_processor = AutoImageProcessor.from_pretrained(args.vision_model)
    if args.image_size is not None:  # exact square resize at the new resolution, no crop
        image_processor.size = {"height": args.image_size, "width": args.image_size}
        image_processor.do_center_crop = False
    processor = TrolProcessor(image_processor, tokenizer, image_token=args.image_token,
                              num_image_tokens=model.config.image_seq_length)
    return model, processor


def quantization_config(kind: str, compute_dtype: torch.dtype) -> BitsAndBytesConfig:
    """4bit: NF4 with double quantization (paper: 1.8B/7B); 8bit: LLM.int8 (paper: 3.8B). TroL's default skips keep
    vision tower, projector, gates and lm_head in float (TrolPreTrainedModel.from_pretrained)."""
    if kind == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute_dtype)
    return BitsAndBytesConfig(load_in_8bit=True)


def trol_module_names(model: TrolForConditionalGeneration) -> list[str]:
    """The TroL-specific modules that train in both stages: the projector and each gate (PEFT needs each gate by
    name: a ModuleList cannot be a modules_to_save entry)."""
    return ["multi_modal_projector"] + [f"trol_gates.{i}" for i in range(len(model.model.trol_gates))]


def lora_target_regex(model: TrolForConditionalGeneration) -> str:
    """A PEFT target regex for every linear layer of the LLM (quantized ones included), nothing else."""
    leaves = {name.rsplit(".", 1)[-1] for name, module in model.model.language_model.named_modules()
              if isinstance(module, nn.Linear)}  # bitsandbytes' Linear4bit / Linear8bitLt subclass nn.Linear
    if not leaves:
        raise ValueError("The language model has no linear layers for LoRA to target.")
    return rf"^model\.language_model\..*\.({'|'.join(sorted(map(re.escape, leaves)))})$"


def prepare_stage(model: TrolForConditionalGeneration, args: TrolModelArguments):
    """Freeze what the stage keeps fixed, add LoRA in stage 2, and check the trainable set. Returns the model to
    train (a PeftModel in stage 2)."""
    model.requires_grad_(False)
    if args.stage == 1:
        model.model.multi_modal_projector.requires_grad_(True)
        model.model.trol_gates.requires_grad_(True)
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        expected = {n for n, _ in model.named_parameters()
                    if n.startswith(("model.multi_modal_projector.", "model.trol_gates."))}
        if trainable != expected:  # pragma: no cover - guards against a future change of the layout
            raise RuntimeError(f"Stage 1 must train exactly the projector and gates; trainable: {sorted(trainable)}")
        return model
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                      target_modules=lora_target_regex(model), modules_to_save=trol_module_names(model),
                      task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, lora)
    bad = [n for n, p in peft_model.named_parameters()
           if p.requires_grad and "lora_" not in n and ".modules_to_save." not in n]
    if bad or any("vision_tower" in n for n, p in peft_model.named_parameters() if p.requires_grad):
        raise RuntimeError(f"Stage 2 must train only LoRA, projector and gates; also trainable: {bad}")
    return peft_model


def keep_trol_modules_in_fp32(model) -> None:
    """Projector and gates train in fp32 whatever the LLM's dtype: in bf16 an AdamW step of ~1e-4 on a gate bias of
    ~-1.1 (bf16 spacing 0.0078 there) rounds to nothing, and TRL casts QLoRA's trainable parameters to bf16. The
    modules cast their inputs to their own dtype (TrolGate, get_image_features), so mixing dtypes is safe."""
    for name, parameter in model.named_parameters():
        if parameter.requires_grad and ("trol_gates" in name or "multi_modal_projector" in name):
            parameter.data = parameter.data.float()


def save_arguments(output_dir: str, model_args, data_args, sft_args) -> None:
    record = {"model": asdict(model_args), "data": asdict(data_args), "sft": sft_args.to_dict()}
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    (Path(output_dir) / ARGS_FILE).write_text(json.dumps(record, indent=2, default=str))


def train(model_args: TrolModelArguments, data_args: TrolDataArguments, sft_args, callbacks=()):
    """Run one stage and save it to `sft_args.output_dir` (stage 1: a full TroL folder; stage 2: the LoRA adapter,
    with the trained projector and gates, + processor). Returns the SFTTrainer."""
    from trl import SFTTrainer

    from .compression import CompressionScheduleCallback
    from .data import SkippedSamplesCallback, load_mixture

    model, processor = build_model_and_processor(model_args)
    model = prepare_stage(model, model_args)
    skip_log = Path(sft_args.output_dir) / "skipped_samples.jsonl"
    mixture = load_mixture(data_args.data_config, seed=sft_args.seed, processor=processor,
                           max_length=sft_args.max_length, skip_log=skip_log)
    callbacks = [SkippedSamplesCallback(skip_log), *callbacks]
    if model_args.compression_schedule is not None:  # staged visual context compression (trainer/compression.py)
        callbacks.append(CompressionScheduleCallback(model_args.compression_schedule,
                                                     model_args.compression_at_inference))
    trainer = SFTTrainer(model=model, args=sft_args, train_dataset=mixture.as_hf_dataset(), processing_class=processor,
                         callbacks=callbacks)
    keep_trol_modules_in_fp32(trainer.model)  # after SFTTrainer (which casts), before train() builds the optimizer
    if model_args.stage == 2 and model_args.quantization != "none":
        # TRL casts QLoRA's trainable parameters to bf16; Trainer's resume (PeftModel.load_adapter) would upcast LoRA
        # back to fp32 and a resumed run would drift from an uninterrupted one.
        trainer.model.load_adapter = functools.partial(trainer.model.load_adapter, autocast_adapter_dtype=False)
    trainer.train(resume_from_checkpoint=sft_args.resume_from_checkpoint)
    trainer.save_model(sft_args.output_dir)
    if trainer.is_world_process_zero():
        processor.save_pretrained(sft_args.output_dir)
        save_arguments(sft_args.output_dir, model_args, data_args, sft_args)
    return trainer


__all__ = ["build_model_and_processor", "keep_trol_modules_in_fp32", "lora_target_regex", "prepare_stage", "quantization_config", "train",
           "trol_module_names"]
