"""Staged visual context compression in `trol-train`: schedules, the TrainerCallback (stages at the right steps,
resume in the right stage), TRL's fused loss with compression against a hand-computed loss, shipped recipes."""

import json
from pathlib import Path

import PIL.Image
import pytest
import torch
import torch.nn.functional as F
import yaml
from tiny import save_pretrained_parts
from transformers import TrainerCallback

pytest.importorskip("trl")

from test_train import sft_config
from test_train_resume_ddp import KillAt, Killed, checkpoints
from trol.trainer import TrolDataArguments, TrolModelArguments
from trol.trainer.compression import SCHEDULES, CompressionScheduleCallback, CompressionStage, parse_schedule
from trol.trainer.train import train

RECIPES = Path(__file__).resolve().parents[1] / "trainer" / "recipes"
# the tiny decoder has 2 layers and 4 image tokens per image: a 4-stage schedule that really compresses there
SCHEDULE = "0:1:2,0.25:1:4,0.5:0:2,0.75:none"
EXPECTED = {1: (1, 2), 2: (1, 4), 3: (0, 2), 4: (None, 1)}  # optimizer step -> (layer, stride) with max_steps=4


def test_named_and_written_schedules_parse():
    assert parse_schedule("4stage") == SCHEDULES["4stage"] == (
        CompressionStage(0.0, 2, 8), CompressionStage(0.25, 2, 2), CompressionStage(0.5, 16, 2),
        CompressionStage(0.75, None, 1))
    assert parse_schedule("heavy") == (CompressionStage(0.0, 2, 8),)
    assert parse_schedule("light") == (CompressionStage(0.0, 16, 8),)
    written = (CompressionStage(0.0, 2, 8), CompressionStage(0.5, None, 1))
    assert parse_schedule("0:2:8,0.5:none") == written
    assert parse_schedule([[0, 2, 8], [0.5, None, 1]]) == written  # YAML list
    assert parse_schedule([{"start": 0, "layer": 2, "stride": 8}, {"start": 0.5, "layer": None}]) == written
    for bad in ("5stage", "0.1:2:8", "0:2:8,0.5:2:0", "0:2:8,0:none", [[0, -3, 2]], []):
        with pytest.raises(ValueError):
            parse_schedule(bad)


def test_callback_stages_follow_the_fraction_of_steps_done():
    callback = CompressionScheduleCallback("4stage")
    callback.boundaries = [0, 250, 500, 750]  # what on_train_begin computes for max_steps=1000
    assert [callback.stage_at(s) for s in (0, 249, 250, 499, 500, 749, 750, 999)] == [0, 0, 1, 1, 2, 2, 3, 3]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Tiny pretrained-looking parts and 8 samples (6 with an image, 2 text-only), batch 2: 4 steps per epoch."""
    root = tmp_path_factory.mktemp("compression")
    save_pretrained_parts(root)
    images = root / "images"
    images.mkdir()
    samples = []
    for i, color in enumerate([(220, 20, 20), (20, 20, 220), (20, 200, 20), (230, 220, 30), (5, 5, 5), (90, 9, 99)]):
        PIL.Image.new("RGB", (30 + 5 * i, 40 - 2 * i), color).save(images / f"{i}.png")
        samples.append({"id": str(i), "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhich colour?"}, {"from": "gpt", "value": f"colour number {i}"}]})
    for i, answer in enumerate(["hello there", "one two three"]):
        samples.append({"id": f"t{i}", "conversations": [{"from": "human", "value": "Say something."},
                                                        {"from": "gpt", "value": answer}]})
    (root / "data.json").write_text(json.dumps(samples))
    mix = {"sources": [{"name": "toy", "format": "llava", "path": str(root / "data.json"),
                        "image_root": str(images), "weight": 1.0}]}
    (root / "mix.yaml").write_text(yaml.safe_dump(mix))
    return root


class Seen(TrainerCallback):
    """Per optimizer step: the compression setting the model's forward saw, and the input / compressed lengths."""

    def __init__(self):
        self.steps = {}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.base = model.model
        self.base.register_forward_pre_hook(self.before, with_kwargs=True)
        self.base.language_model.norm.register_forward_pre_hook(self.after)

    def on_step_begin(self, args, state, control, **kwargs):
        self.step = state.global_step + 1

    def before(self, module, args, kwargs):
        config, ids = module.config, kwargs["input_ids"]
        self.steps[self.step] = {"setting": (config.compression_layer, config.compression_stride),
                                 "length": ids.shape[1], "images": kwargs.get("pixel_values") is not None}

    def after(self, module, args):
        self.steps[self.step]["compressed"] = args[0].shape[1]


def stage1(workspace, schedule=SCHEDULE):
    return (TrolModelArguments(stage=1, vision_model=str(workspace / "vision"), language_model=str(workspace / "text"),
                               dtype="float32", compression_schedule=schedule),
            TrolDataArguments(data_config=str(workspace / "mix.yaml")))


def test_schedule_switches_stages_at_the_right_steps_and_resumes_in_the_right_stage(workspace):
    model_args, data_args = stage1(workspace)
    config = {"max_steps": 4, "save_strategy": "steps", "save_steps": 2}
    seen = Seen()
    torch.manual_seed(0)
    with pytest.raises(Killed):
        train(model_args, data_args, sft_config(workspace / "run", **config), callbacks=[seen, KillAt(3)])
    assert {step: row["setting"] for step, row in seen.steps.items()} == {s: EXPECTED[s] for s in range(1, 4)}
    shrunk = [row["compressed"] < row["length"] for row in seen.steps.values() if row["images"]]
    assert shrunk and all(shrunk)  # stages 0-2 really shorten every batch that holds an image
    # the checkpoint records the schedule and its step boundaries
    assert checkpoints(workspace / "run") == ["checkpoint-2"]
    checkpoint = workspace / "run" / "checkpoint-2"
    record = json.loads((checkpoint / "trainer_state.json").read_text())["stateful_callbacks"]
    assert record["CompressionScheduleCallback"]["attributes"] == {"boundaries": [0, 1, 2, 3], "stage": 1}

    # resumed after step 2: steps 3-4 run in stages 2 and 3; the trained model keeps the last stage (no compression)
    resumed = Seen()
    trainer = train(model_args, data_args, sft_config(workspace / "run", resume_from_checkpoint=str(checkpoint),
                                                      **config), callbacks=[resumed])
    assert {step: row["setting"] for step, row in resumed.steps.items()} == {s: EXPECTED[s] for s in range(3, 5)}
    saved_config = json.loads((workspace / "run" / "config.json").read_text())
    assert saved_config["compression_layer"] is None and saved_config["compression_at_inference"] is False
    assert trainer.state.global_step == 4

    # a resume with another schedule is refused rather than silently changing stages
    other, _ = stage1(workspace, schedule="heavy")
    with pytest.raises(ValueError, match="compression schedule"):
        train(other, data_args, sft_config(workspace / "other", resume_from_checkpoint=str(checkpoint), **config))


def test_trl_fused_loss_with_compression_equals_a_loss_from_full_length_labels(workspace):
    model_args, data_args = stage1(workspace, schedule="0:1:4")  # stays compressed, also at inference
    trainer = train(model_args, data_args, sft_config(workspace / "loss", max_steps=1))
    model = trainer.model.train()
    assert model.config.compression_layer == 1 and model.config.compression_at_inference is True
    lengths = []
    model.model.language_model.norm.register_forward_pre_hook(lambda module, args: lengths.append(args[0].shape[1]))
    for batch in trainer.get_train_dataloader():
        if "pixel_values" in batch:
            break
    with torch.no_grad():
        fused = trainer.compute_loss(model, dict(batch))  # TRL's fused LM head over TrolModel's output
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        logits = model(**inputs).logits
    labels = batch["labels"]
    assert lengths[0] < labels.shape[1] and logits.shape[1] == labels.shape[1]  # compressed inside, full outside
    by_hand = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                              ignore_index=-100)
    torch.testing.assert_close(fused, by_hand, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("recipe, schedule, at_inference", [("stage1_4stage.yaml", "4stage", None),
                                                            ("stage2_4stage.yaml", "4stage", None),
                                                            ("stage2_heavy.yaml", "heavy", True)])
def test_shipped_recipe_variants_parse_and_flags_override_them(recipe, schedule, at_inference, tmp_path):
    from trl import SFTConfig, TrlParser

    parser = TrlParser((TrolModelArguments, TrolDataArguments, SFTConfig))
    required = ["--data_config", "mix.yaml", "--output_dir", str(tmp_path), "--report_to", "none", "--bf16", "false"]
    required += ["--vision_model", "v", "--language_model", "t"] if recipe.startswith("stage1") else \
        ["--model_name_or_path", "stage1"]
    model_args, _, _ = parser.parse_args_and_config(["--config", str(RECIPES / recipe), *required])
    assert model_args.compression_schedule == schedule and model_args.compression_at_inference == at_inference
    model_args, _, _ = parser.parse_args_and_config(["--config", str(RECIPES / recipe), *required,
                                                     "--compression_schedule", "0:2:8,0.5:none"])
    assert parse_schedule(model_args.compression_schedule)[1] == CompressionStage(0.5, None, 1)
