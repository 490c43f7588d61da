"""What every TroL converter shares: reading the source checkpoint tensor by tensor, the shared gate file, writing
the converted weights shard by shard, and finishing the output folder (config with auto_map, remote code,
generation config, processor, conversion marker).

Memory: a source tensor is read from its safetensors file only when asked for (memory-mapped) and written to the
current output shard at once; a shard is flushed when it reaches `max_shard_bytes`. Peak RAM is about one output
shard plus one tensor, never two copies of the model.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..hub_upload import REMOTE_CODE  # one list of the remote-code files a TroL folder carries

logger = logging.getLogger(__name__)

REPO_DIR = Path(__file__).resolve().parents[1]
CONVERSION_FILE = "trol_conversion.json"  # the contract with hub_upload.py (source_repo, source_revision, license)
GATING_FILE = "trol_gating.pt"


@dataclass
class Plan:
    """What an architecture module hands the driver. `tensors` is lazy: it reads source tensors as it yields."""

    config: object  # TrolConfig
    tensors: Iterable[tuple[str, torch.Tensor]]
    processor: object  # TrolProcessor
    eos_token_ids: list[int]
    notes: str
    source_repo: str = ""
    extra_files: dict[str, str] = field(default_factory=dict)


class ConversionError(ValueError):
    """The source folder is not what the converter expects; the message names the problem and the fix."""


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise ConversionError(f"{path} is not valid JSON ({err}).") from err


class CheckpointSource:
    """The source model's tensors by name, read lazily from `model.safetensors` or its shards.

    Every tensor the converter takes is recorded; `unused()` lists the ones nobody took, so nothing in the source is
    dropped silently."""

    def __init__(self, src: str | os.PathLike):
        self.src = Path(src)
        if not self.src.is_dir():
            raise ConversionError(f"{self.src} is not a folder. Give a local copy of the released hub repo "
                                  "(e.g. `huggingface-cli download BK-Lee/TroL-7B --local-dir SRC`).")
        index = self.src / "model.safetensors.index.json"
        if index.exists():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ConversionError(f"{index} has no weight_map.")
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not (self.src / f).exists()]
            if missing:
                raise ConversionError(f"{self.src} lacks the shards {missing} listed in {index.name}: the download "
                                      "is incomplete; download the repo again.")
            self.files = {name: self.src / f for name, f in weight_map.items()}
        elif (self.src / "model.safetensors").exists():
            path = self.src / "model.safetensors"
            with safe_open(path, "pt") as handle:
                self.files = {name: path for name in handle.keys()}  # noqa: SIM118 (not iterable)
        else:
            pickles = sorted(p.name for p in self.src.glob("*.bin"))
            hint = (f" It holds pickled weights ({', '.join(pickles)}); convert them to safetensors first "
                    "(pickles can run code when loaded)." if pickles else "")
            raise ConversionError(f"No model.safetensors or model.safetensors.index.json in {self.src}.{hint}")
        self.taken: set[str] = set()
        self._handles: dict[Path, object] = {}
        self._left: dict[Path, set[str]] = {}  # per file, the names not yet taken: a finished file is unmapped
        for name, path in self.files.items():
            self._left.setdefault(path, set()).add(name)

    def keys(self) -> list[str]:
        return list(self.files)

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def _handle(self, path: Path):
        if path not in self._handles:
            self._handles[path] = safe_open(path, "pt")
        return self._handles[path]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(self.files[self._known(name)]).get_slice(name).get_shape())

    def take(self, name: str) -> torch.Tensor:
        tensor = self._handle(self.files[self._known(name)]).get_tensor(name)
        self._mark(name)
        return tensor

    def skip(self, name: str) -> None:
        """Mark a tensor as deliberately not converted (e.g. a buffer the target recomputes)."""
        self._mark(self._known(name))

    def _mark(self, name: str) -> None:
        self.taken.add(name)
        left = self._left[self.files[name]]
        left.discard(name)
        if not left:  # release the memory map, so the file's pages stop counting against this process
            self._handles.pop(self.files[name], None)

    def _known(self, name: str) -> str:
        if name not in self.files:
            raise ConversionError(f"The source checkpoint has no tensor {name!r}: {self.src} is not the expected "
                                  "architecture (pass --arch to choose another) or the download is incomplete.")
        return name

    def unused(self) -> list[str]:
        return sorted(set(self.files) - self.taken)

    def close(self) -> None:
        self._handles.clear()


def load_shared_gate(path: str | os.PathLike, num_layers: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Read `trol_gating.pt` (the released checkpoints' gates) -> (weight (1, H), bias (1,)) of the one shared gate.

    The file must be a plain state dict of tensors with keys `{i}.weight`/`{i}.bias` for i in 0..num_layers-1; it is
    read with `torch.load(weights_only=True)`, which refuses pickled code. The original code builds
    `ModuleList([Linear(H, 1)] * L)`, so all L copies are one gate: they are checked to be identical, and if they
    are not, a warning names the differing layers and layer 0 is used."""
    path = Path(path)
    if not path.exists():
        raise ConversionError(f"{path} is missing: the released TroL repos ship their gates in {GATING_FILE}; "
                              "download it with the rest of the repo.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises UnpicklingError or RuntimeError depending on the content
        raise ConversionError(f"{path} is not a plain state dict of tensors (torch.load(weights_only=True) refused "
                              f"it: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). Only "
                              "tensors are read from gate files; get the original file from the hub.") from err
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise ConversionError(f"{path} holds a {type(state).__name__}, not a state dict of tensors "
                              "({'0.weight': Tensor, '0.bias': Tensor, ...}).")
    expected = {f"{i}.{part}" for i in range(num_layers) for part in ("weight", "bias")}
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise ConversionError(f"{path} does not hold one gate per layer for {num_layers} layers "
                              f"(missing {missing[:6]}, unexpected {extra[:6]}).")
    weight, bias = state["0.weight"], state["0.bias"]
    if tuple(weight.shape[:1]) != (1,) or weight.ndim != 2 or tuple(bias.shape) != (1,):
        raise ConversionError(f"{path}: gate 0 has weight {tuple(weight.shape)} and bias {tuple(bias.shape)}, "
                              "expected (1, hidden_size) and (1,).")
    differing = [i for i in range(1, num_layers)
                 if not (torch.equal(state[f"{i}.weight"], weight) and torch.equal(state[f"{i}.bias"], bias))]
    if differing:
        logger.warning("%s: the gates of layers %s differ from layer 0's; the released models share one gate, so "
                       "layer 0's gate is used for every layer.", path, differing)
    return weight, bias


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    text = size.strip().upper()
    for unit, factor in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


class ShardedWriter:
    """Writes (name, tensor) pairs into `model-XXXXX-of-YYYYY.safetensors` shards of at most `max_shard_size`, plus
    the index (or a single `model.safetensors` when everything fits in one shard)."""

    def __init__(self, out: Path, max_shard_size: int | str = "5GB"):
        self.out, self.limit = Path(out), _parse_size(max_shard_size)
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[list[str]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self.pending or any(name in shard for shard in self.shards):
            raise RuntimeError(f"{name} was written twice.")
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.limit:
            self._flush()
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        index = len(self.shards)
        save_file(self.pending, self.out / f"shard-{index:05d}.tmp", metadata={"format": "pt"})
        self.shards.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> list[str]:
        if self.pending or not self.shards:
            self._flush()
        count = len(self.shards)
        if count == 1:
            (self.out / "shard-00000.tmp").rename(self.out / "model.safetensors")
            return ["model.safetensors"]
        weight_map, names = {}, []
        for i, shard in enumerate(self.shards):
            name = f"model-{i + 1:05d}-of-{count:05d}.safetensors"
            (self.out / f"shard-{i:05d}.tmp").rename(self.out / name)
            weight_map.update(dict.fromkeys(shard, name))
            names.append(name)
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return names


def expected_state(config) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """name -> (shape, dtype) of every tensor a TrolForConditionalGeneration with `config` saves, from a skeleton
    on the meta device (no memory)."""
    from ..modeling_trol import TrolForConditionalGeneration

    with torch.device("meta"):
        skeleton = TrolForConditionalGeneration(config)
    state = skeleton.state_dict()
    tied = set(getattr(skeleton, "_tied_weights_keys", None) or {})
    return {name: (tuple(t.shape), t.dtype) for name, t in state.items() if name not in tied}


def write_weights(out: Path, tensors: Iterable[tuple[str, torch.Tensor]], expected: dict, dtype: torch.dtype | None,
                  max_shard_size: int | str) -> list[str]:
    """Check every converted tensor against the target skeleton (name and shape), cast floating tensors to `dtype`
    (None keeps the source dtype), and write them shard by shard. Every expected tensor must be produced."""
    writer, seen = ShardedWriter(out, max_shard_size), set()
    for name, tensor in tensors:
        if name not in expected:
            raise RuntimeError(f"The converter produced {name}, which the TroL model does not have.")
        shape = expected[name][0]
        if tuple(tensor.shape) != shape:
            raise ConversionError(f"{name}: the source gives shape {tuple(tensor.shape)}, the TroL config expects "
                                  f"{shape}. The source config.json does not match its weights.")
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        writer.add(name, tensor)
        seen.add(name)
    missing = sorted(set(expected) - seen)
    if missing:
        raise RuntimeError(f"The conversion produced no value for {len(missing)} tensors, e.g. {missing[:5]}.")
    return writer.finish()


def check_all_used(source: CheckpointSource) -> None:
    unused = source.unused()
    if unused:
        raise ConversionError(f"{len(unused)} source tensors have no place in the converted model, e.g. "
                              f"{unused[:8]}: the checkpoint is not the architecture the converter assumed "
                              "(pass --arch), or it holds extra weights; nothing is dropped silently.")


def copy_remote_code(out: Path) -> None:
    for name in REMOTE_CODE:
        shutil.copyfile(REPO_DIR / name, out / name)


def write_conversion_marker(out: Path, source_repo: str, source_revision: str | None, license: str | None,
                            notes: str) -> None:
    marker = {"source_repo": source_repo, "source_revision": source_revision, "license": license, "notes": notes}
    (out / CONVERSION_FILE).write_text(json.dumps(marker, indent=2) + "\n")


def prepare_output(out: str | os.PathLike, overwrite: bool) -> Path:
    """OUT must be new or empty: converting into a folder the user owns must never delete their files."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ConversionError(f"{out} is not empty. Choose a new folder, or pass --overwrite to replace the "
                                  "files this converter writes (other files are left alone).")
        for stale in list(out.glob("model*.safetensors")) + list(out.glob("model.safetensors.index.json")):
            stale.unlink()
    out.mkdir(parents=True, exist_ok=True)
    return out


def iter_layers(source: CheckpointSource, pattern: str) -> Iterator[int]:
    """Layer indices i for which `pattern.format(i=i)` is a source tensor, in order."""
    i = 0
    while pattern.format(i=i) in source:
        yield i
        i += 1


__all__ = [
    "CONVERSION_FILE",
    "GATING_FILE",
    "CheckpointSource",
    "ConversionError",
    "Plan",
    "ShardedWriter",
    "check_all_used",
    "copy_remote_code",
    "expected_state",
    "iter_layers",
    "load_shared_gate",
    "prepare_output",
    "read_json",
    "write_conversion_marker",
    "write_weights",
]
