"""Resuming an interrupted stage-1/stage-2 run from a checkpoint, and 2-process data-parallel training (CPU, gloo).

Resume semantics (transformers 5.23 Trainer, used unchanged by TRL 1.16's SFTTrainer): a checkpoint holds the model
(stage 1: full TroL safetensors; stage 2: the LoRA adapter + projector/gate `modules_to_save`), optimizer.pt,
scheduler.pt, rng_state.pth and trainer_state.json. On resume the Trainer restores all of them and, unless
`ignore_data_skip=True`, fast-forwards the dataloader with accelerate's `skip_first_batches` past the batches of the
current epoch already trained. The batch order itself is reproducible because accelerate swaps the RandomSampler for a
`SeedableRandomSampler` (`use_seedable_sampler=True`, the default) that reseeds with `initial_seed + epoch` at every
epoch (`initial_seed` = `data_seed` or torch's initial seed, which `Trainer.__init__` sets to `args.seed`). So a resumed
run that crosses an epoch boundary draws the same reshuffle as the uninterrupted one.
"""

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import PIL.Image
import pytest
import torch
import yaml
from tiny import save_pretrained_parts
from transformers import TrainerCallback

pytest.importorskip("trl")
pytest.importorskip("peft")

from test_train import Snapshot, sft_config  # noqa: E402  (the CPU SFTConfig and the parameter snapshot)

from trol.trainer import TrolDataArguments, TrolModelArguments  # noqa: E402
from trol.trainer.train import train  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
COLORS = {"red": (220, 20, 20), "blue": (20, 20, 220), "green": (20, 200, 20), "yellow": (230, 220, 30),
          "black": (5, 5, 5), "white": (250, 250, 250)}
TEXT_ONLY = [("Say hello.", "hello there, friend"), ("Count to three.", "one two three"),
             ("Name a fruit.", "a ripe banana"), ("What is 2+2?", "it is four")]
N_SAMPLES = len(COLORS) + len(TEXT_ONLY)  # 10 samples, batch 2: 5 steps per epoch, so 6 steps cross an epoch


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Pretrained-looking tiny vision/text folders and a 10-sample LLaVA-format mix (6 image samples of different
    colours and sizes, 4 text-only), every sample with a different answer, so that the batch order shows in the
    trained weights."""
    root = tmp_path_factory.mktemp("resume")
    save_pretrained_parts(root)
    images = root / "images"
    images.mkdir()
    samples = []
    for i, (name, color) in enumerate(COLORS.items()):
        PIL.Image.new("RGB", (30 + 7 * i, 40 - 3 * i), color).save(images / f"{name}.png")
        samples.append({"id": str(i), "image": f"{name}.png",
                        "conversations": [{"from": "human", "value": "<image>\nWhich colour is it?"},
                                          {"from": "gpt", "value": f"the colour is {name}"}]})
    for question, answer in TEXT_ONLY:
        samples.append({"id": str(len(samples)), "conversations": [{"from": "human", "value": question},
                                                                    {"from": "gpt", "value": answer}]})
    assert len(samples) == N_SAMPLES
    (root / "data.json").write_text(json.dumps(samples))
    mix = {"sources": [{"name": "toy", "format": "llava", "path": str(root / "data.json"),
                        "image_root": str(images), "weight": 1.0}]}
    (root / "mix.yaml").write_text(yaml.safe_dump(mix))
    # a text-heavy mix for DDP: 2 of the image samples + each text-only sample twice, so that some step gives one
    # rank a text-only batch while the other rank's batch has images (the projector is then used on one rank only,
    # unless the model runs its vision path on a dummy image, which TrolModel.forward does under torch.distributed)
    (root / "images.json").write_text(json.dumps(samples[:len(COLORS)]))
    (root / "texts.json").write_text(json.dumps(samples[len(COLORS):]))
    mix = {"sources": [{"name": "img", "format": "llava", "path": str(root / "images.json"),
                        "image_root": str(images), "weight": 2 / len(COLORS)},
                       {"name": "txt", "format": "llava", "path": str(root / "texts.json"), "weight": 2.0}]}
    (root / "mix_ddp.yaml").write_text(yaml.safe_dump(mix))
    return root


class Killed(RuntimeError):
    """Stands in for the process being killed mid-run."""


class KillAt(TrainerCallback):
    """Raises after optimizer step `step` (on_step_end runs before that step's checkpoint would be saved, so the step's
    update is lost, as with a real kill)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise Killed(f"killed after step {state.global_step}")


def stage1_args(workspace):
    model_args = TrolModelArguments(stage=1, vision_model=str(workspace / "vision"),
                                    language_model=str(workspace / "text"), dtype="float32")
    return model_args, TrolDataArguments(data_config=str(workspace / "mix.yaml"))


def resume_config(output_dir, **overrides):
    """6 steps of batch 2 over 10 samples, a cosine schedule without warmup (the LR differs at every step), a
    checkpoint every 2 steps."""
    settings = dict(max_steps=6, save_strategy="steps", save_steps=2, lr_scheduler_type="cosine", warmup_steps=0,
                    learning_rate=5e-3)
    settings.update(overrides)
    return sft_config(output_dir, **settings)


def trained(snapshot: Snapshot) -> dict[str, torch.Tensor]:
    return {n: p for n, p in snapshot.after.items() if "multi_modal_projector" in n or "trol_gates" in n}


def step_logs(trainer) -> dict[int, dict]:
    """Per-step training logs (loss, learning rate, grad norm) by global step."""
    return {row["step"]: row for row in trainer.state.log_history if "loss" in row}


def checkpoints(output_dir: Path) -> list[str]:
    return sorted(p.name for p in output_dir.glob("checkpoint-*"))


def assert_params_close(actual: dict, expected: dict, rtol=1e-5, atol=1e-6):
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


def test_stage1_resume_equals_uninterrupted_run(workspace):
    model_args, data_args = stage1_args(workspace)
    # ---- reference: 6 uninterrupted steps
    torch.manual_seed(0)  # the fresh projector/gates are drawn before the Trainer seeds anything
    full = Snapshot()
    trainer = train(model_args, data_args, resume_config(workspace / "full"), callbacks=[full])
    assert trainer.state.global_step == 6
    reference, reference_logs = trained(full), step_logs(trainer)
    assert set(reference_logs) == set(range(1, 7))
    lrs = [reference_logs[s]["learning_rate"] for s in range(1, 7)]
    assert len(set(lrs)) == 6, lrs  # non-constant schedule: a scheduler restored at the wrong step would show

    # ---- the same run, killed after step 3: only checkpoint-2 exists, step 3's update is lost
    torch.manual_seed(0)
    killed_begin = Snapshot()
    with pytest.raises(Killed):
        train(model_args, data_args, resume_config(workspace / "run"), callbacks=[killed_begin, KillAt(3)])
    assert checkpoints(workspace / "run") == ["checkpoint-2"]
    ckpt = workspace / "run" / "checkpoint-2"
    for name in ("model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"):
        assert (ckpt / name).is_file(), name
    assert all(torch.equal(killed_begin.before[n], full.before[n]) for n in full.before)  # same starting point

    # ---- resumed from checkpoint-2 up to step 6 (skips 2 batches of epoch 0, then crosses into epoch 1)
    resumed = Snapshot()
    trainer = train(model_args, data_args, resume_config(workspace / "run", resume_from_checkpoint=str(ckpt)),
                    callbacks=[resumed])
    assert trainer.state.global_step == 6
    assert checkpoints(workspace / "run") == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    # what the resumed run started from is checkpoint-2's weights, not a fresh init
    assert not torch.equal(resumed.before["model.multi_modal_projector.linear_1.weight"],
                           full.before["model.multi_modal_projector.linear_1.weight"])
    # same loss, LR and grad norm at every resumed step: same batches, same schedule position, same Adam moments
    # (steps 1-2 come from checkpoint-2's trainer_state.json, steps 3-6 were trained by the resumed run)
    logs = step_logs(trainer)
    assert set(logs) == set(range(1, 7))
    for step in range(1, 7):
        for key in ("loss", "learning_rate", "grad_norm"):
            assert logs[step][key] == pytest.approx(reference_logs[step][key], rel=1e-5, abs=1e-7), (step, key)
    assert_params_close(trained(resumed), reference)
    frozen = [n for n in full.after if n not in reference]
    assert frozen and all(torch.equal(resumed.after[n], full.after[n]) for n in frozen)

    # ---- negative control: resuming WITHOUT the data skip replays epoch 0's first batches, and it shows
    skipped = Snapshot()
    train(model_args, data_args, resume_config(workspace / "run_noskip", resume_from_checkpoint=str(ckpt),
                                               ignore_data_skip=True), callbacks=[skipped])
    drift = max((trained(skipped)[n] - reference[n]).abs().max().item() for n in reference)
    assert drift > 1e-4, "the data order does not influence the weights: the equality above would prove nothing"


def test_stage2_qlora_resume(workspace):
    pytest.importorskip("bitsandbytes")
    model_args, data_args = stage1_args(workspace)
    torch.manual_seed(0)
    train(model_args, data_args, sft_config(workspace / "stage1_for_qlora", max_steps=2))
    stage2 = TrolModelArguments(stage=2, model_name_or_path=str(workspace / "stage1_for_qlora"), quantization="4bit",
                                lora_r=4, lora_alpha=4, dtype="float32")
    config = dict(max_steps=4, save_strategy="steps", save_steps=2, lr_scheduler_type="cosine", warmup_steps=0)

    full = Snapshot()
    torch.manual_seed(0)  # LoRA A matrices are drawn when the adapter is added
    trainer = train(stage2, data_args, sft_config(workspace / "qlora_full", **config), callbacks=[full])
    assert trainer.state.global_step == 4

    torch.manual_seed(0)
    with pytest.raises(Killed):
        train(stage2, data_args, sft_config(workspace / "qlora", **config), callbacks=[KillAt(3)])
    assert checkpoints(workspace / "qlora") == ["checkpoint-2"]
    ckpt = workspace / "qlora" / "checkpoint-2"
    assert (ckpt / "adapter_model.safetensors").is_file() and (ckpt / "optimizer.pt").is_file()

    resumed = Snapshot()
    trainer = train(stage2, data_args, sft_config(workspace / "qlora", resume_from_checkpoint=str(ckpt), **config),
                    callbacks=[resumed])
    assert trainer.state.global_step == 4
    assert sorted(step_logs(trainer)) == [1, 2, 3, 4]
    assert any(type(m).__name__ == "Linear4bit" for m in trainer.model.modules())
    trainable = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert any("lora_" in n for n in trainable) and any("modules_to_save" in n for n in trainable)
    assert (workspace / "qlora" / "adapter_model.safetensors").is_file()
    # TRL casts QLoRA's trainable parameters to bf16; the resume must not upcast LoRA back (trainer/train.py)
    lora_dtypes = {p.dtype for n, p in trainer.model.named_parameters() if "lora_" in n}
    assert lora_dtypes == {full.after[n].dtype for n in trainable if "lora_" in n}
    # the 4-bit CPU kernels are deterministic, so with matching dtypes the resumed adapter equals the uninterrupted one
    assert_params_close({n: resumed.after[n] for n in trainable}, {n: full.after[n] for n in trainable})


# ----------------------------------------------------------------------------------------------------------------
# Data parallel: 2 CPU processes (gloo) through `accelerate launch`
# ----------------------------------------------------------------------------------------------------------------
DRIVER = '''
import json, os, sys
import torch
from transformers import TrainerCallback
from trl import SFTConfig
from trol.trainer import TrolDataArguments, TrolModelArguments
from trol.trainer.train import train

workspace, out, mix = sys.argv[1], sys.argv[2], sys.argv[3]


class Dump(TrainerCallback):
    """Trainable parameters at the start and the end, and the steps at which this rank's batch had images (a
    text-only batch leaves the projector without gradient on this rank)."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        self.step, self.image_steps = 0, set()
        model.model.register_forward_pre_hook(self.seen, with_kwargs=True)  # TRL's loss calls TrolModel directly

    def seen(self, module, args, kwargs):
        if kwargs.get("pixel_values") is not None:
            self.image_steps.add(self.step)

    def on_step_begin(self, args, state, control, **kwargs):
        self.step = state.global_step + 1

    def on_train_end(self, args, state, control, model=None, **kwargs):
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else int(os.environ.get("RANK", 0))
        after = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        torch.save({"before": self.before, "after": after, "global_step": state.global_step, "world_size": world,
                    "rank_env": os.environ.get("RANK"), "parallel_mode": str(args.parallel_mode),
                    "image_steps": sorted(self.image_steps)},
                   os.path.join(out, f"rank{rank}.pt"))


torch.manual_seed(0)  # fresh projector/gates: identical on both ranks (DDP also broadcasts rank 0's at wrap time)
model_args = TrolModelArguments(stage=1, vision_model=os.path.join(workspace, "vision"),
                                language_model=os.path.join(workspace, "text"), dtype="float32")
data_args = TrolDataArguments(data_config=os.path.join(workspace, mix))
sft = SFTConfig(output_dir=os.path.join(out, "run"), max_steps=3, per_device_train_batch_size=2,
                gradient_accumulation_steps=1, learning_rate=1e-2, lr_scheduler_type="constant", bf16=False,
                use_cpu=True, activation_checkpointing=True, max_length=None, assistant_only_loss=True,
                report_to="none", save_strategy="no", logging_steps=1, seed=0, dataloader_num_workers=0)
trainer = train(model_args, data_args, sft, callbacks=[Dump()])
done = {"global_step": trainer.state.global_step, "world_size": trainer.args.world_size,
        "distributed_type": trainer.accelerator.distributed_type.value, "wrapper": type(trainer.model_wrapped).__name__}
with open(os.path.join(out, f"done{trainer.args.process_index}.json"), "w") as f:
    json.dump(done, f)
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CPU_DDP_YAML = REPO / "trainer" / "accelerate" / "cpu_ddp.yaml"


def launch(config_file, script, *args, timeout=240) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_file),
           "--main_process_port", str(free_port()), str(script), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=timeout)


PROBE = """
import os, sys
from accelerate import PartialState
state = PartialState(cpu=True)  # what Trainer builds with use_cpu=True
with open(os.path.join(sys.argv[1], f"probe{state.process_index}.txt"), "w") as f:  # not stdout: ranks interleave
    f.write(f"{state.distributed_type} {state.num_processes} {state.backend}")
"""


def test_cpu_ddp_yaml_starts_two_gloo_processes(tmp_path):
    (tmp_path / "probe.py").write_text(PROBE)
    result = launch(CPU_DDP_YAML, tmp_path / "probe.py", tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    probes = sorted(p.read_text() for p in tmp_path.glob("probe*.txt"))
    assert probes == ["DistributedType.MULTI_CPU 2 gloo"] * 2, result.stdout


def test_ddp_two_cpu_processes(workspace, tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(textwrap.dedent(DRIVER))
    out = tmp_path / "out"
    out.mkdir()
    result = launch(CPU_DDP_YAML, driver, workspace, out, "mix_ddp.yaml")
    logs = result.stdout + result.stderr
    assert result.returncode == 0, logs[-6000:]
    assert "Traceback" not in logs, logs[-6000:]
    # both ranks: 3 steps, world size 2, gloo data parallel, the model wrapped in DistributedDataParallel
    for r in (0, 1):
        assert json.loads((out / f"done{r}.json").read_text()) == {
            "global_step": 3, "world_size": 2, "distributed_type": "MULTI_CPU", "wrapper": "DistributedDataParallel"}

    ranks = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for r, dump in enumerate(ranks):
        assert dump["global_step"] == 3 and dump["world_size"] == 2 and dump["rank_env"] == str(r)
        assert dump["parallel_mode"] == "ParallelMode.DISTRIBUTED"
    # the hard case happened: at some step one rank's batch had images and the other's was text-only
    image_steps = [set(d["image_steps"]) for d in ranks]
    assert image_steps[0] ^ image_steps[1], image_steps
    names = set(ranks[0]["after"])
    assert names and names == set(ranks[1]["after"])
    assert all(n.startswith(("model.multi_modal_projector.", "model.trol_gates.")) for n in names)
    assert len([n for n in names if n.startswith("model.trol_gates.")]) == 2 * 2  # weight + bias of 2 layers' gates
    for n in names:
        assert torch.equal(ranks[0]["after"][n], ranks[1]["after"][n]), f"ranks disagree on {n}"
        assert torch.equal(ranks[0]["before"][n], ranks[1]["before"][n]), f"ranks started apart on {n}"
    changed = {n for n in names if not torch.equal(ranks[0]["before"][n], ranks[0]["after"][n])}
    assert changed == names  # every projector and gate tensor trained
