"""The conversion driver: detect the source architecture, let its module plan the conversion, write the output.

An architecture module (`internlm2.py`, `phi3.py`) exposes `NAME`, `matches(source, src_config) -> bool` and
`plan(src, source, src_config, **options) -> Plan`; the driver does the rest the same way for every model."""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import torch
from transformers import GenerationConfig

from .common import (
    CheckpointSource,
    ConversionError,
    Plan,
    check_all_used,
    copy_remote_code,
    expected_state,
    prepare_output,
    read_json,
    write_conversion_marker,
    write_weights,
)

ARCHES = {"internlm2": "TroL-1.8B / TroL-7B", "phi3": "TroL-3.8B"}


def arch_module(name: str):
    """The module that converts architecture `name` (imported on first use)."""
    if name not in ARCHES:
        raise ConversionError(f"Unknown --arch {name!r}; choose one of {sorted(ARCHES)}.")
    return importlib.import_module(f"{__package__}.{name}")


def detect(source: CheckpointSource, src_config: dict) -> str:
    found = [name for name in ARCHES if arch_module(name).matches(source, src_config)]
    if len(found) != 1:
        raise ConversionError(
            f"Cannot tell which TroL architecture {source.src} holds (matches: {found or 'none'}); pass "
            f"--arch {{{','.join(ARCHES)}}}. internlm2 = TroL-1.8B/7B (model.tok_embeddings.*, vit.*), phi3 = "
            "TroL-3.8B (language_model.*, vision_model.*)."
        )
    return found[0]


def convert(src: str | os.PathLike, out: str | os.PathLike, *, arch: str | None = None,
            dtype: torch.dtype | str | None = None, max_shard_size: int | str = "5GB", source_repo: str | None = None,
            source_revision: str | None = None, license: str | None = None, overwrite: bool = False,
            **options) -> Path:
    """Convert a local copy of a released TroL repo (SRC) into a TroL folder (OUT) that loads with
    `trust_remote_code=True`. Returns OUT. `dtype` None keeps the source dtype; options go to the arch module."""
    src = Path(src)
    source = CheckpointSource(src)
    src_config = read_json(src / "config.json") if (src / "config.json").exists() else {}
    name = arch or detect(source, src_config)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    plan = arch_module(name).plan(src, source, src_config, **options)
    out = prepare_output(out, overwrite)
    files = write_weights(out, plan.tensors, expected_state(plan.config), dtype, max_shard_size)
    check_all_used(source)
    source.close()
    config = plan.config
    if dtype is None:
        first = files[0]
        from safetensors import safe_open

        with safe_open(out / first, "pt") as handle:
            dtypes = {handle.get_slice(k).get_dtype() for k in handle.keys()}  # noqa: SIM118 (not iterable)
        dtype = torch.bfloat16 if "BF16" in dtypes else torch.float16 if "F16" in dtypes else torch.float32
    config.dtype = dtype
    from ..modeling_trol import AUTO_MAP

    config.auto_map = {**(getattr(config, "auto_map", None) or {}), **AUTO_MAP}
    config.save_pretrained(out)
    text = config.text_config
    generation = GenerationConfig(
        bos_token_id=text.bos_token_id, eos_token_id=plan.eos_token_ids, pad_token_id=text.pad_token_id,
        suppress_tokens=[config.image_token_id],
    )
    generation.save_pretrained(out)
    plan.processor.save_pretrained(out)
    copy_remote_code(out)
    for filename, content in plan.extra_files.items():
        (out / filename).write_text(content)
    write_conversion_marker(out, source_repo or plan.source_repo, source_revision, license, plan.notes)
    return out


__all__ = ["ARCHES", "Plan", "convert", "detect"]
