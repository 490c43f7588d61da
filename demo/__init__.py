"""`trol.demo`: a working TroL model out of the box (the `trol` command), and how it was made.

- `generator.py`: seeded procedural visual question answering (shapes, colours, counts, relative positions).
- `stage0.py`: "stage 0", the tiny vision encoder and language model trained from scratch on that data (no
  pretrained backbone can be downloaded here).
- `build.py`: the one command that rebuilds the embedded model `model/`: data -> stage 0 -> `trol-train` stage 1 ->
  stage 2 (QLoRA) -> merge -> model card.
- `ablation.py`: the same data, budget and seeds with and without traversal.
- `cli.py`: `trol chat`, `trol demo`, `trol traversal-map`; `traversal_map.py` draws the map, `evaluate.py` scores.
- `model/`: the embedded model (safetensors, tokenizer, processor, remote code, model card); `images/`: bundled
  held-out images and their questions (`questions.json`).
"""

from pathlib import Path

DEMO_DIR = Path(__file__).resolve().parent
MODEL_DIR = DEMO_DIR / "model"
IMAGES_DIR = DEMO_DIR / "images"
QUESTIONS_FILE = IMAGES_DIR / "questions.json"

__all__ = ["DEMO_DIR", "IMAGES_DIR", "MODEL_DIR", "QUESTIONS_FILE"]
