"""`trol-train merge`: fold a stage-2 LoRA adapter (plus its trained projector and gates) into a full-precision
release folder that loads with `trust_remote_code=True` like any other TroL model."""

from pathlib import Path

import torch

from ..modeling_trol import TrolForConditionalGeneration
from ..processing_trol import TrolProcessor
from .train import ARGS_FILE


def merge(adapter_dir: str, output_dir: str, base: str | None = None, dtype: str = "bfloat16") -> str:
    """adapter_dir: stage-2 output; base: the stage-1 folder it trained on (default: the adapter's recorded base);
    output_dir: must not exist or be empty (nothing of yours is overwritten)."""
    from peft import PeftConfig, PeftModel

    out = Path(output_dir)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} is not empty; merge writes a fresh release folder. Choose a new --output.")
    base = base or PeftConfig.from_pretrained(adapter_dir).base_model_name_or_path
    if not base:
        raise ValueError(f"{adapter_dir} does not record its base model; pass --base STAGE1_FOLDER.")
    model = TrolForConditionalGeneration.from_pretrained(base, dtype=getattr(torch, dtype))
    merged = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    merged.save_pretrained(out)
    processor_dir = adapter_dir if (Path(adapter_dir) / "processor_config.json").exists() else base
    TrolProcessor.from_pretrained(processor_dir, config=model.config).save_pretrained(out)  # no remote-code prompt
    if (Path(adapter_dir) / ARGS_FILE).exists():
        (out / ARGS_FILE).write_text((Path(adapter_dir) / ARGS_FILE).read_text())
    return str(out)


__all__ = ["merge"]
