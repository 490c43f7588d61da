"""Staged visual context compression (LLaVolta) for `trol-train`: declarative schedules and the TrainerCallback that
applies them.

A schedule is a list of stages `(start, layer, stride)`: from `start` (the fraction of the run's optimizer steps
done) on, the model compresses at decoder layer `layer` with stride `stride` (`layer` None: no compression). The
callback writes the current stage into the model's config (`compression_layer`, `compression_stride`), which the model
reads at every forward; nothing else changes.

Resume and ranks: the stage is a pure function of `state.global_step` and the stage boundaries in steps, which are
fixed once at the start of the run and saved in every checkpoint (`trainer_state.json`, `stateful_callbacks`), so a
resumed run continues in the stage where it stopped (even with a different `max_steps`), and every rank, reading the
same step, is in the same stage. At the end of training the model keeps the schedule's last stage, and
`compression_at_inference` says whether it also compresses in eval mode (default: when the last stage compresses).
"""

import itertools
import logging
import math
from dataclasses import dataclass

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CompressionStage:
    start: float
    layer: int | None
    stride: int = 1

    def describe(self) -> str:
        return "no compression" if self.layer is None else f"layer {self.layer} / stride {self.stride}"


SCHEDULES: dict[str, tuple[CompressionStage, ...]] = {
    # LLaVolta's staged scheme, quarters of the run (the paper: steps 0-1300-2600-3900 of ~5200); inference without
    "4stage": (CompressionStage(0.0, 2, 8), CompressionStage(0.25, 2, 2), CompressionStage(0.5, 16, 2),
               CompressionStage(0.75, None)),
    "heavy": (CompressionStage(0.0, 2, 8),),  # throughout, and at inference
    "light": (CompressionStage(0.0, 16, 8),),  # throughout, and at inference
    "none": (CompressionStage(0.0, None),),
}
"""Named schedules. Layers are absolute decoder layer indices, as in LLaVolta's 32-layer LLM; a layer at or beyond
the model's depth compresses nothing."""


def parse_schedule(spec) -> tuple[CompressionStage, ...]:
    """A schedule from a name (`4stage`, `heavy`, `light`, `none`), a string `start:layer:stride,...` (layer `none`
    for no compression, stride optional then), or a list of `[start, layer, stride]` / `{start, layer, stride}`
    items (YAML). Stages start at 0, in increasing order, each in [0, 1)."""
    if isinstance(spec, str):
        if spec in SCHEDULES:
            return SCHEDULES[spec]
        if ":" not in spec:
            raise ValueError(
                f"Unknown compression schedule {spec!r}: use one of {sorted(SCHEDULES)} or stages "
                "'start:layer:stride,...' such as '0:2:8,0.5:none'."
            )
        spec = [item.split(":") for item in spec.split(",") if item.strip()]
    if not isinstance(spec, (list, tuple)) or not spec:
        raise ValueError(f"A compression schedule is a name or a non-empty list of stages, got {spec!r}.")
    stages = [_stage(item) for item in spec]
    starts = [stage.start for stage in stages]
    if starts[0] != 0 or any(b <= a for a, b in itertools.pairwise(starts)) or starts[-1] >= 1:
        raise ValueError(
            f"Compression stages must start at 0 and at increasing fractions of the run below 1; got starts {starts}."
        )
    return tuple(stages)


def _stage(item) -> CompressionStage:
    if isinstance(item, dict):
        item = [item.get("start"), item.get("layer"), item.get("stride", 1)]
    item = list(item)
    if len(item) == 2:
        item.append(1)
    if len(item) != 3:
        raise ValueError(f"A compression stage is [start, layer, stride]; got {item!r}.")
    start, layer, stride = item
    try:
        start = float(start)
        layer = None if layer is None or str(layer).strip().lower() in ("none", "null", "off", "") else int(layer)
        stride = int(stride)
    except (TypeError, ValueError):
        raise ValueError(f"A compression stage is [start (float), layer (int or none), stride (int)]; got {item!r}.") \
            from None
    if (layer is not None and layer < -1) or stride < 1:
        raise ValueError(f"Compression stage {item!r}: layer must be >= -1 (or none) and stride >= 1.")
    return CompressionStage(start, layer, stride)


def trol_configs(model) -> list:
    """Every TroL config object inside `model` (PEFT/DDP wrappers included), each once."""
    configs = {}
    for module in model.modules():
        config = getattr(module, "config", None)
        if getattr(config, "model_type", None) == "trol":
            configs[id(config)] = config
    if not configs:
        raise ValueError(f"No TroL model found in {type(model).__name__}: the compression schedule has nothing to drive.")
    return list(configs.values())


class CompressionScheduleCallback(TrainerCallback, ExportableState):
    """Sets the model's compression stage from the fraction of optimizer steps done (see the module docstring).

    schedule: anything `parse_schedule` takes; compression_at_inference: whether the trained model compresses in
    eval mode (None: when the schedule's last stage compresses)."""

    def __init__(self, schedule, compression_at_inference: bool | None = None):
        self.stages = parse_schedule(schedule)
        self.schedule = [[s.start, s.layer, s.stride] for s in self.stages]  # JSON-able, for the checkpoint
        self.compression_at_inference = compression_at_inference
        self.boundaries: list[int] | None = None  # first optimizer step (0-based) of each stage
        self.stage: int | None = None
        self._configs = None

    def state(self) -> dict:
        return {"args": {"schedule": self.schedule, "compression_at_inference": self.compression_at_inference},
                "attributes": {"boundaries": self.boundaries, "stage": self.stage}}

    def stage_at(self, step: int) -> int:
        """Index of the stage that optimizer step `step` (0-based: the number of steps already done) runs in."""
        return max(i for i, first in enumerate(self.boundaries) if step >= first)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        saved = (state.stateful_callbacks or {}).get(type(self).__name__)
        saved = saved[0] if isinstance(saved, list) else saved
        saved_boundaries = (saved or {}).get("attributes", {}).get("boundaries")
        if saved_boundaries is not None:  # resuming: keep the run's own stage boundaries
            if saved["args"]["schedule"] != self.schedule:
                raise ValueError(
                    f"The checkpoint was trained with the compression schedule {saved['args']['schedule']}, this run "
                    f"asks for {self.schedule}; resume with the same --compression_schedule."
                )
            self.boundaries = list(saved_boundaries)
        else:
            self.boundaries = [math.ceil(stage.start * state.max_steps - 1e-9) for stage in self.stages]
        self._configs = trol_configs(model)
        at_inference = self.compression_at_inference
        if at_inference is None:
            at_inference = self.stages[-1].layer is not None
        for config in self._configs:
            config.compression_at_inference = at_inference
        self._apply(state.global_step)

    def on_step_begin(self, args, state, control, **kwargs):
        self._apply(state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        self._apply(self.boundaries[-1])  # the trained model keeps the last stage

    def _apply(self, step: int) -> None:
        index = self.stage_at(step)
        stage = self.stages[index]
        if index != self.stage:
            logger.info("Visual context compression from step %d: stage %d, %s", step + 1, index, stage.describe())
        self.stage = index
        for config in self._configs:
            config.compression_layer = stage.layer
            config.compression_stride = stage.stride


__all__ = ["SCHEDULES", "CompressionScheduleCallback", "CompressionStage", "parse_schedule"]
