"""Traversal on vs off, in the spirit of the paper's Table 4(b): the same data, budget and seeds, held-out accuracy.

    python -m trol.demo.ablation --seeds 0 1 2            # runs both arms for each seed, then prints the table
    python -m trol.demo.ablation --seeds 0 --results R    # one seed at a time (results accumulate in R/)
    python -m trol.demo.ablation --report --results R     # only print the table of what R/ holds

For each seed: stage 0 once (the shared "pretrained" backbones, as a paper ablation keeps its backbone), then for
each arm the build's stage 1 -> stage 2 -> merge with `trol-train` on the same data, flags, steps and seed; only the
TroL config differs:
- `traversal`: `use_traversal=True`, `training_traversal="all"` (the paper);
- `no traversal`: `use_traversal=False` (the plain backbone; its gates exist but are never called).
Both arms start stage 1 from a TroL folder built from the stage-0 parts with `from_vision_and_text` (fresh projector
and gates from the same seed), since `trol-train` has no flag for `use_traversal`. Held-out accuracy: the build's
test set (seed 2), greedy decoding, exact match.
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from .build import BUDGET, TRAIN_SEED, generate_data, run_stage0, run_stages

ARMS = {"traversal": {"use_traversal": True, "training_traversal": "all"},
        "no traversal": {"use_traversal": False}}


def stage1_init(stage0_dir: Path, out: Path, seed: int, **config) -> Path:
    """A fresh TroL folder from the stage-0 parts (what `trol-train` stage 1 builds), with `config` set."""
    from transformers import AutoImageProcessor, AutoTokenizer

    from ..modeling_trol import TrolForConditionalGeneration
    from ..processing_trol import TrolProcessor

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(stage0_dir / "text")
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    model = TrolForConditionalGeneration.from_vision_and_text(
        str(stage0_dir / "vision"), str(stage0_dir / "text"), image_token_id=image_token_id, dtype=torch.float32,
        **config)
    processor = TrolProcessor(AutoImageProcessor.from_pretrained(stage0_dir / "vision"), tokenizer,
                              num_image_tokens=model.config.image_seq_length)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def run_seed(seed: int, results: Path, budget: dict) -> list[dict]:
    from .evaluate import evaluate_folder

    work = (results / f"seed{seed}").resolve()
    (work / "logs").mkdir(parents=True, exist_ok=True)
    paths = generate_data(work, None, budget)
    start = time.perf_counter()
    run_stage0(paths["train"], work / "stage0", seed, budget, work / "logs")
    stage0_seconds = time.perf_counter() - start
    rows = []
    for arm, config in ARMS.items():
        arm_dir = work / arm.replace(" ", "_")
        (arm_dir / "logs").mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        init = stage1_init(work / "stage0", arm_dir / "init", seed, **config)
        release = run_stages(arm_dir, paths["mix"], work / "stage0", seed, budget, arm_dir / "logs",
                             stage1_init=init)
        seconds = time.perf_counter() - start
        test = evaluate_folder(release, work / "data" / "test" / "questions.json")
        row = {"seed": seed, "arm": arm, "accuracy": test["accuracy"], "by_kind": test["by_kind"], "n": test["n"],
               "stages_1_2_seconds": seconds, "stage0_seconds": stage0_seconds, "config": config}
        rows.append(row)
        print(f"[ablation] seed {seed} {arm}: {test['accuracy']:.1%} ({seconds:.0f} s)", flush=True)
    (results / f"seed{seed}.json").write_text(json.dumps(rows, indent=1))
    return rows


def table(rows: list[dict]) -> str:
    """Markdown: accuracy per seed and arm, mean +- std, and the mean per question kind."""
    seeds = sorted({r["seed"] for r in rows})
    by = {(r["seed"], r["arm"]): r for r in rows}
    arms = [arm for arm in ARMS if any(r["arm"] == arm for r in rows)]
    lines = ["| arm | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± std | s / run (stages 1+2) |",
             "|---|" + "---|" * (len(seeds) + 2)]
    for arm in arms:
        values = [by[(s, arm)]["accuracy"] for s in seeds if (s, arm) in by]
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        seconds = statistics.mean(by[(s, arm)]["stages_1_2_seconds"] for s in seeds if (s, arm) in by)
        cells = [f"{by[(s, arm)]['accuracy']:.1%}" if (s, arm) in by else "-" for s in seeds]
        lines.append(f"| {arm} | " + " | ".join(cells) + f" | {statistics.mean(values):.1%} ± {std:.1%} | "
                     f"{seconds:.0f} |")
    kinds = sorted({k for r in rows for k in r["by_kind"]})
    lines += ["", "| arm | " + " | ".join(kinds) + " |", "|---|" + "---|" * len(kinds)]
    for arm in arms:
        arm_rows = [r for r in rows if r["arm"] == arm]
        lines.append(f"| {arm} | " + " | ".join(
            f"{statistics.mean(r['by_kind'][k] for r in arm_rows):.1%}" for k in kinds) + " |")
    n = rows[0]["n"] if rows else 0
    lines.append(f"\n{n} held-out questions per run; seeds {seeds}; training data seed {TRAIN_SEED}.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m trol.demo.ablation", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--results", default="build/ablation", help="folder for work files and seed<N>.json")
    parser.add_argument("--report", action="store_true", help="only print the table of the stored results")
    args = parser.parse_args(argv)
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    if not args.report:
        for seed in args.seeds:
            run_seed(seed, results, dict(BUDGET))
    rows = [row for path in sorted(results.glob("seed*.json")) for row in json.loads(path.read_text())]
    print(table(rows))


if __name__ == "__main__":
    main()
