"""Rebuild the embedded demo model `demo/model/` (and the bundled images `demo/images/`) with one command:

    python -m trol.demo.build                 # about 14 min on 2 idle CPU cores (a budget of 30)
    python -m trol.demo.build --work /tmp/trol-build --out /tmp/demo-model     # elsewhere, keeping the work folder

Steps, each printed with its command and time:
1. data: `generator.generate` (seeded): the training set, a held-out test set and the bundled demo images.
2. stage 0 (`stage0.py`): the tiny CLIP vision encoder and Llama decoder trained from scratch on the training set,
   saved as `vision/` and `text/` folders, as if downloaded (no pretrained backbone can be downloaded here).
3. stage 1: `trol-train --config trainer/recipes/stage1.yaml --vision_model vision/ --language_model text/ ...`:
   projector + gates, backbones frozen (the paper's recipe, with the overrides in `STAGE_OVERRIDES`).
4. stage 2: `trol-train --config trainer/recipes/stage2.yaml --model_name_or_path stage1/ ...`: QLoRA (4-bit NF4
   decoder, LoRA on every decoder linear; r 16 / alpha 16 here, see `STAGE_OVERRIDES`) + projector + gates.
5. merge: `trol-train merge stage2/ --output release/ --dtype float32`.
6. release: `hub_upload.assemble` + model card (`hub_upload.build_card` + how this model was made, with the held-out
   accuracy), validated by loading it in a clean process with `trust_remote_code=True`; then it replaces `--out`.

Everything is seeded; the figures of the last build are in the model card (`demo/model/README.md`) and
`demo/model/build_report.json`.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from importlib.resources import files
from pathlib import Path

import yaml

from . import IMAGES_DIR, MODEL_DIR, generator

TRAIN_SEED, TEST_SEED, DEMO_SEED = 1, 2, 3
BUDGET = {
    "train_images": 3000,         # x 6-8 questions (+ a caption in half of them): ~21k answers
    "questions_per_image": (6, 8),
    "describe_rate": 0.5,
    # the hardest kind twice as often in training, and the training-only `where` (test sets: the six kinds, uniform)
    "train_kind_weights": {"position": 2.0, "where": 1.0},
    "test_images": 600,           # one question each
    "demo_images": 12,            # three questions each, bundled in demo/images
    "stage0_epochs": 8,           # ~3000 steps of 8 conversations (stage0.py: why 8, not 32)
    "stage0_learning_rate": 1e-3,
    "stage1_learning_rate": 1e-3,
    "stage2_learning_rate": 1e-3,
}

STAGE_OVERRIDES = {
    # flag: (value, why it differs from trainer/recipes/stage{1,2}.yaml)
    "dtype": ("float32", "CPU: no bf16 speed-up on most CPUs, and a 1M-parameter model gains nothing from it"),
    "bf16": ("false", "as dtype"),
    "use_cpu": ("true", "2 CPU cores, no GPU"),
    "per_device_train_batch_size": ("8", ("one process; global batch 8 instead of 768 (16 x 8 GPUs x 6): the data is "
                                          "~3k conversations, not 2.27M, and a fresh projector needs ~375 steps, "
                                          "not 94, to bring back what stage 0 learned")),
    "gradient_accumulation_steps": ("1", "as the batch"),
    "learning_rate": ("{lr}", "a fresh projector on a tiny model in a few hundred steps: 1e-3 instead of 1e-4"),
    "lr_scheduler_kwargs": ('{{"min_lr": {min_lr}}}', "cosine down to 1% of the peak, as 1e-4 -> 1e-6"),
    "activation_checkpointing": ("false", "memory is no issue at this size; recomputation would cost time"),
    "report_to": ("none", "no tensorboard in a build"),
    "save_strategy": ("no", "no intermediate checkpoints in a 2-minute stage"),
    "logging_steps": ("10", "fewer steps than the recipes'"),
    "lora_r": ("16", ("stage 2: the paper's r 64 is 1/32 of its 2048-wide decoder, 64 would be half of this 128-wide "
                      "one; TRL keeps QLoRA adapters in bf16, slow on CPUs, and r 64 doubled the build's slowest step")),
    "lora_alpha": ("16", "stage 2: alpha / r = 1 as in the paper"),
    "dataloader_num_workers": ("0", "2 cores: workers would compete with training"),
}
"""trol-train flags that differ from the paper's recipes (unchanged: 1 epoch, AdamW, cosine_with_min_lr, no warm-up,
assistant-only loss, max_length, stage 2's 4-bit NF4 double-quant QLoRA on every decoder linear, LoRA dropout
0.05)."""


def _log(message: str) -> None:
    print(f"[build] {message}", flush=True)


def _run(argv: list[str], log_file: Path) -> None:
    """Run a command, its output teed into log_file; raise with the log's tail on failure.

    OpenMP threads wait passively: on a shared machine, torch's default spinning threads collapse when another
    process takes a core (a measured 5x slow-down of this build's matmuls with 2 threads on 2 busy cores)."""
    _log("$ " + " ".join(argv))
    env = {"OMP_WAIT_POLICY": "PASSIVE", **os.environ}
    with open(log_file, "w") as log:
        process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        for line in process.stdout:
            log.write(line)
            if any(key in line for key in ("'loss'", "train_runtime", "Skipped", "Error", "stage 0")):
                print("    " + line.rstrip()[:200], flush=True)
        if process.wait() != 0:
            raise RuntimeError(f"{argv[:4]} failed (exit {process.returncode}); log: {log_file}\n"
                               + log_file.read_text()[-3000:])


def trol_train(*args: str) -> list[str]:
    """The `trol-train` command line (through this interpreter: `python -m trol.trainer`)."""
    return [sys.executable, "-m", "trol.trainer", *args]


STAGE2_ONLY = ("lora_r", "lora_alpha")


def stage_flags(stage: int, learning_rate: float, seed: int) -> list[str]:
    flags = []
    for name, (value, _) in STAGE_OVERRIDES.items():
        if stage == 2 or name not in STAGE2_ONLY:
            flags += [f"--{name}", value.format(lr=learning_rate, min_lr=learning_rate / 100)]
    return flags + ["--seed", str(seed)]


def generate_data(work: Path, images_dir: Path | None, budget: dict) -> dict[str, Path]:
    """The training set, the held-out test set and the demo set (written to images_dir when given)."""
    paths = {
        "train": generator.generate(work / "data" / "train", budget["train_images"], TRAIN_SEED,
                                    tuple(budget["questions_per_image"]), budget["describe_rate"],
                                    budget["train_kind_weights"]),
        "test": generator.generate(work / "data" / "test", budget["test_images"], TEST_SEED, (1, 1)),
    }
    demo = work / "data" / "demo"
    paths["demo"] = generator.generate(demo, budget["demo_images"], DEMO_SEED, (3, 3))
    for name in ("data.json", "scenes.json"):  # the demo needs only the images and the flat questions
        (demo / name).unlink()
    if images_dir is not None:
        if images_dir.exists():
            shutil.rmtree(images_dir)
        shutil.copytree(demo / "images", images_dir)
        shutil.copyfile(demo / "questions.json", images_dir / "questions.json")
        # questions.json names images "images/000000.png" relative to its folder: make them relative to images_dir
        questions = json.loads((images_dir / "questions.json").read_text())
        for question in questions:
            question["image"] = Path(question["image"]).name
        (images_dir / "questions.json").write_text(json.dumps(questions, indent=1) + "\n")
    mix = {"sources": [{"name": "trol_demo_vqa", "format": "llava", "path": str(paths["train"]), "weight": 1.0}]}
    paths["mix"] = work / "data" / "mix.yaml"
    paths["mix"].write_text(yaml.safe_dump(mix))
    return paths


def run_stage0(data: Path, out: Path, seed: int, budget: dict, log_dir: Path) -> Path:
    """`python -m trol.demo.stage0` (a subprocess, like the trol-train stages)."""
    _run([sys.executable, "-m", "trol.demo.stage0", "--data", str(data), "--out", str(out), "--seed", str(seed),
          "--epochs", str(budget["stage0_epochs"]), "--learning-rate", str(budget["stage0_learning_rate"])],
         log_dir / "stage0.log")
    return out


def run_stages(work: Path, mix: Path, stage0_dir: Path, seed: int, budget: dict, log_dir: Path,
               extra_stage1: tuple[str, ...] = (), stage1_init: Path | None = None) -> Path:
    """trol-train stage 1 -> stage 2 -> merge; returns the merged release folder. `stage1_init`: start stage 1 from
    this TroL folder instead of the stage-0 parts (the ablation's traversal-off arm)."""
    recipes = files("trol.trainer") / "recipes"
    start_from = (["--model_name_or_path", str(stage1_init)] if stage1_init is not None else
                  ["--vision_model", str(stage0_dir / "vision"), "--language_model", str(stage0_dir / "text")])
    _run(trol_train("--config", str(recipes / "stage1.yaml"), *start_from, "--data_config", str(mix),
                    "--output_dir", str(work / "stage1"), *stage_flags(1, budget["stage1_learning_rate"], seed),
                    *extra_stage1), log_dir / "stage1.log")
    _run(trol_train("--config", str(recipes / "stage2.yaml"), "--model_name_or_path", str(work / "stage1"),
                    "--data_config", str(mix), "--output_dir", str(work / "stage2"),
                    *stage_flags(2, budget["stage2_learning_rate"], seed)), log_dir / "stage2.log")
    _run(trol_train("merge", str(work / "stage2"), "--output", str(work / "release"), "--dtype", "float32"),
         log_dir / "merge.log")
    return work / "release"


def model_card_extra(report: dict) -> str:
    """The demo-specific part of the card: what the model is for, how it was made, its held-out accuracy."""
    by_kind = report["test"]["by_kind"]
    rows = "\n".join(f"| {kind} | {value:.1%} |" for kind, value in by_kind.items())
    lr = report["budget"]["stage1_learning_rate"]
    overrides = "\n".join(f"| `--{name}` | `{value.format(lr=lr, min_lr=lr / 100)}` | {why} |"
                          for name, (value, why) in STAGE_OVERRIDES.items())
    timings = "\n".join(f"| {step} | {seconds:.0f} s |" for step, seconds in report["seconds"].items())
    return f"""
## What this model is

The embedded demo model of the TroL repository (`trol demo`): a {report["parameters"] / 1e6:.2f}M-parameter TroL model
that answers one-word questions about procedurally generated images (2-4 coloured circles, squares and triangles on a
3 x 3 grid, 48 x 48 px): colours, shapes, counts, existence, whether one object is left of / right of / above /
below another, and a caption ("Describe the image."). It is a toy that shows the machinery working
end to end offline; it knows nothing about real images.

## How it was made

`python -m trol.demo.build` (seeded; {report["seconds"]["total"] / 60:.1f} min on this build's machine,
{report["machine"]}):

1. data: `trol.demo.generator`, {report["budget"]["train_images"]} training images (seed {TRAIN_SEED}) with 6-8
   questions each (relative-position questions twice as often as the other kinds, plus training-only "Where is the
   red circle?" questions) and a caption in half of them, LLaVA-style json; held-out sets from other seeds, the six
   question kinds equally often.
2. **stage 0** (`trol.demo.stage0`): no pretrained backbone can be downloaded, so the tiny CLIP vision encoder
   (first as a per-patch object and position classifier, then frozen) and the tiny Llama decoder (with its own
   word-level byte-BPE tokenizer) are trained from scratch on the same data as a plain LLaVA-style model, traversal
   off, in batches of 8. Its projector is dropped.
3. stage 1 and stage 2 run exactly as for a real model, with `trol-train` and the recipes `trainer/recipes/stage1.yaml`
   (projector + gates; backbones frozen) and `stage2.yaml` (4-bit NF4 QLoRA + projector + gates), then
   `trol-train merge`. Flags that differ from the recipes, and why:

| flag | value | why |
|---|---|---|
{overrides}

Time per step of the build:

| step | time |
|---|---|
{timings}

## Held-out accuracy

{report["test"]["n"]} questions about {report["budget"]["test_images"]} unseen images (seed {TEST_SEED}), greedy decoding, exact
match of the answer word: **{report["test"]["accuracy"]:.1%}**; the bundled demo set (`demo/images`,
{report["demo"]["n"]} questions, seed {DEMO_SEED}): **{report["demo"]["accuracy"]:.1%}**.

| question kind | accuracy |
|---|---|
{rows}

The weakest kind, `{min(by_kind, key=by_kind.get)}` ({min(by_kind.values()):.1%}), is what a 1M-parameter model
trained for minutes learns least: a yes/no comparison of two objects' places needs both looked up and compared.
"""


def write_release(release: Path, out: Path, report: dict) -> None:
    """assemble + card + clean-process validation in a fresh folder next to `out`, then swap it in."""
    from ..hub_upload import assemble, build_card, validate_release

    staging = out.parent / (out.name + ".new")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    facts = assemble(release, staging)
    report["parameters"] = facts["parameters"]
    results = [{"task": "trol-demo-vqa (held-out)", "value": round(100 * report["test"]["accuracy"], 1),
                "metric": "accuracy"}]
    (staging / "results.json").write_text(json.dumps(results))
    from ..hub_upload import load_results

    card, _ = build_card(release, "demo/model", facts, license="apache-2.0", results=load_results(
        staging / "results.json"))
    (staging / "results.json").unlink()
    text = str(card)
    marker = "## Limitations"
    text = text.replace(marker, model_card_extra(report).lstrip() + "\n" + marker, 1)
    (staging / "README.md").write_text(text)
    (staging / "build_report.json").write_text(json.dumps(report, indent=1) + "\n")
    validate_release(staging)
    if out.exists():
        if not (out / "config.json").exists() and any(out.iterdir()):
            raise ValueError(f"{out} exists and is not a model folder; refusing to replace it. Choose another --out.")
        shutil.rmtree(out)
    staging.rename(out)


def _machine() -> str:
    import platform

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"{os.cpu_count()} CPU cores, {platform.machine()}, load average {load:.1f} at the end"


def build(work: Path, out: Path, images_dir: Path | None, seed: int = 0, budget: dict | None = None) -> dict:
    from .evaluate import evaluate_folder

    budget = {**BUDGET, **(budget or {})}
    work, out = Path(work).resolve(), Path(out).resolve()  # trol-train reads data paths relative to mix.yaml
    start, seconds = time.perf_counter(), {}
    if work.exists():
        shutil.rmtree(work)
    (work / "logs").mkdir(parents=True)

    def lap(name: str, since: float) -> float:
        seconds[name] = time.perf_counter() - since
        _log(f"{name}: {seconds[name]:.0f} s")
        return time.perf_counter()

    t = time.perf_counter()
    _log(f"1. data -> {work / 'data'}")
    paths = generate_data(work, images_dir, budget)
    t = lap("data", t)
    _log(f"2. stage 0 -> {work / 'stage0'}")
    run_stage0(paths["train"], work / "stage0", seed, budget, work / "logs")
    t = lap("stage 0", t)
    _log("3-5. stage 1, stage 2, merge")
    release = run_stages(work, paths["mix"], work / "stage0", seed, budget, work / "logs")
    t = lap("stages 1 + 2 + merge", t)
    report = {"seconds": seconds, "budget": budget, "seed": seed,
              "test": evaluate_folder(release, work / "data" / "test" / "questions.json"),
              "demo": evaluate_folder(release, work / "data" / "demo" / "questions.json")}
    for name in ("stage1", "stage2"):
        log = (work / "logs" / f"{name}.log").read_text()
        runtime = [line for line in log.splitlines() if "train_runtime" in line]
        report[f"{name}_summary"] = runtime[-1].strip()[:300] if runtime else ""
    t = lap("evaluation", t)
    seconds["total"] = time.perf_counter() - start
    report["machine"] = _machine()
    _log(f"held-out accuracy {report['test']['accuracy']:.1%} ({report['test']['n']} questions), demo set "
         f"{report['demo']['accuracy']:.1%}; by kind {json.dumps(report['test']['by_kind'])}")
    write_release(release, out, report)
    lap("release", t)
    _log(f"wrote {out} in {(time.perf_counter() - start) / 60:.1f} min")
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m trol.demo.build", description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default="build/demo", help="work folder (data, stage outputs, logs); replaced")
    parser.add_argument("--out", default=str(MODEL_DIR), help="the model folder to write (default: demo/model)")
    parser.add_argument("--images", default=str(IMAGES_DIR),
                        help="where the bundled demo images go (default: demo/images); 'none' to skip")
    parser.add_argument("--seed", type=int, default=0, help="training seed (data seeds are fixed)")
    args = parser.parse_args(argv)
    build(Path(args.work), Path(args.out), None if args.images == "none" else Path(args.images), seed=args.seed)


if __name__ == "__main__":
    main()
