"""Seeded procedural visual question answering: shapes, colours, counts and relative positions.

    python -m trol.demo.generator --out data/train --images 4000 --seed 1    # PNGs + LLaVA-style data.json

A scene is 2-4 objects on a 3 x 3 grid of 16-px cells (48 x 48 px, white background), each a distinct
(colour, shape) pair from {red, green, blue, yellow} x {circle, square, triangle}, with a random size and offset
inside its cell. Questions (one answer word each, so exact match is the metric):

| kind        | question                                           | answer                      |
|-------------|----------------------------------------------------|-----------------------------|
| color       | What color is the circle?  (the shape occurs once)  | red, green, blue, yellow    |
| shape       | What shape is the blue object?  (colour once)       | circle, square, triangle    |
| count_shape | How many squares are there?                         | 0 ... 4                     |
| count_color | How many green objects are there?                   | 0 ... 4                     |
| exists      | Is there a yellow triangle?                         | yes, no (balanced)          |
| position    | Is the red circle left of the blue square?          | yes, no (left/right/above/below; asked only about objects in different columns, resp. rows) |
| describe    | Describe the image.                                 | red circle top left, blue square center (reading order) |
| where       | Where is the red circle?                            | top left, ..., center, ..., bottom right |

`describe` is a caption (several words) and a training signal only, as captions are in the paper's data: it teaches
the decoder where each object's words come from. `where` (`AUX_KINDS`) is a training signal too, drawn only when the
kind weights name it: it makes the decoder locate one object, the first half of a `position` question (without it,
in stage 0 the `position` questions stayed at chance; with it they reached 97%). Evaluation sets (`generate(...,
describe=0)`, no weights) hold only the six one-word kinds.

Everything is drawn from `random.Random(seed)`: the same seed gives the same images and questions on every platform
(the PNG pixels and the json text; PNG bytes could differ with another zlib). Images are drawn at 4x and reduced
with a box filter (smooth edges, still deterministic).

The json (`data.json`) is what `trol-train`'s `llava` adapter reads: a list of
`{"id", "image": "images/000123.png", "conversations": [{"from": "human", "value": "<image>\\nQ1"},
{"from": "gpt", "value": "A1"}, {"from": "human", "value": "Q2"}, ...]}` (several questions about one image are
one multi-turn conversation; the image opens the first turn). `questions.json` lists the same questions flat,
`{"image", "question", "answer", "kind"}`, for evaluation.
"""

import argparse
import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import PIL.Image
import PIL.ImageDraw

COLORS = {"red": (214, 39, 40), "green": (44, 160, 44), "blue": (31, 119, 220), "yellow": (235, 190, 20)}
SHAPES = ("circle", "square", "triangle")
GRID = 3
CELL = 16
IMAGE_SIZE = GRID * CELL  # 48 px: 9 patches of 16 px, one per cell
SUPERSAMPLE = 4
MIN_OBJECTS, MAX_OBJECTS = 2, 4
KINDS = ("color", "shape", "count_shape", "count_color", "exists", "position")
AUX_KINDS = ("where",)  # training-only, like captions: drawn only when `weights` gives them a weight
RELATIONS = ("left of", "right of", "above", "below")
ROW_NAMES = ("top", "middle", "bottom")
COL_NAMES = ("left", "center", "right")
DESCRIBE = "Describe the image."
ANSWERS = sorted({*COLORS, *SHAPES, *(str(n) for n in range(MAX_OBJECTS + 1)), "yes", "no"})


@dataclass(frozen=True)
class Obj:
    """One object: its shape, colour, grid cell and size/offset (px) inside the cell."""

    shape: str
    color: str
    row: int
    col: int
    size: int
    dx: int
    dy: int

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"


def random_scene(rng: random.Random) -> list[Obj]:
    """2-4 objects with distinct (colour, shape) pairs in distinct cells."""
    n = rng.randint(MIN_OBJECTS, MAX_OBJECTS)
    pairs = rng.sample([(c, s) for c in COLORS for s in SHAPES], n)
    cells = rng.sample(range(GRID * GRID), n)
    scene = []
    for (color, shape), cell in zip(pairs, cells):
        size = rng.randint(11, 14)
        slack = CELL - size
        scene.append(Obj(shape, color, cell // GRID, cell % GRID, size, rng.randint(0, slack), rng.randint(0, slack)))
    return scene


def render(scene: list[Obj]) -> PIL.Image.Image:
    """The scene as a 48 x 48 RGB image."""
    s = SUPERSAMPLE
    image = PIL.Image.new("RGB", (IMAGE_SIZE * s, IMAGE_SIZE * s), (255, 255, 255))
    draw = PIL.ImageDraw.Draw(image)
    for obj in scene:
        x0, y0 = (obj.col * CELL + obj.dx) * s, (obj.row * CELL + obj.dy) * s
        x1, y1 = x0 + obj.size * s - 1, y0 + obj.size * s - 1
        fill = COLORS[obj.color]
        if obj.shape == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif obj.shape == "square":
            draw.rectangle((x0 + s, y0 + s, x1 - s, y1 - s), fill=fill)
        else:
            draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    return image.resize((IMAGE_SIZE, IMAGE_SIZE), PIL.Image.Resampling.BOX)


def _plural(shape: str) -> str:
    return shape + "s"


def place(obj: Obj) -> str:
    """The cell's name: "top left", ..., "center" (the middle cell), ..., "bottom right"."""
    if (obj.row, obj.col) == (1, 1):
        return "center"
    return f"{ROW_NAMES[obj.row]} {COL_NAMES[obj.col]}"


def describe(scene: list[Obj]) -> dict:
    """The caption: every object and its place, in reading order."""
    objects = sorted(scene, key=lambda o: (o.row, o.col))
    return {"question": DESCRIBE, "answer": ", ".join(f"{o.name} {place(o)}" for o in objects), "kind": "describe"}


def ask(scene: list[Obj], rng: random.Random, kind: str | None = None, weights: dict | None = None) -> dict | None:
    """One question about the scene: {"question", "answer", "kind"}; None when `kind` cannot be asked about it.
    Without `kind`, one is drawn with `weights` (default: uniform over KINDS; AUX_KINDS only when weighted)."""
    kinds = KINDS + AUX_KINDS
    kind = kind or rng.choices(kinds, [(weights or {}).get(k, 0.0 if k in AUX_KINDS else 1.0) for k in kinds])[0]
    if kind in ("color", "shape"):  # ask one attribute of an object named by the other, unique in the scene
        named_by = "shape" if kind == "color" else "color"
        unique = [o for o in scene if sum(getattr(p, named_by) == getattr(o, named_by) for p in scene) == 1]
        if not unique:
            return None
        obj = rng.choice(unique)
        name = obj.shape if kind == "color" else f"{obj.color} object"
        return {"question": f"What {kind} is the {name}?", "answer": getattr(obj, kind), "kind": kind}
    if kind == "count_shape":
        shape = rng.choice(SHAPES)
        return {"question": f"How many {_plural(shape)} are there?",
                "answer": str(sum(o.shape == shape for o in scene)), "kind": kind}
    if kind == "count_color":
        color = rng.choice(list(COLORS))
        return {"question": f"How many {color} objects are there?",
                "answer": str(sum(o.color == color for o in scene)), "kind": kind}
    if kind == "exists":
        present = {o.name for o in scene}
        if rng.random() < 0.5:
            name, answer = rng.choice(sorted(present)), "yes"
        else:
            name, answer = rng.choice(sorted(f"{c} {s}" for c in COLORS for s in SHAPES if f"{c} {s}" not in present)), "no"
        return {"question": f"Is there a {name}?", "answer": answer, "kind": kind}
    if kind == "where":
        obj = rng.choice(scene)
        return {"question": f"Where is the {obj.name}?", "answer": place(obj), "kind": kind}
    if kind == "position":
        relation = rng.choice(RELATIONS)
        horizontal = relation in ("left of", "right of")
        pairs = [(a, b) for a in scene for b in scene
                 if a is not b and ((a.col != b.col) if horizontal else (a.row != b.row))]
        if not pairs:
            return None
        a, b = rng.choice(pairs)
        holds = {"left of": a.col < b.col, "right of": a.col > b.col, "above": a.row < b.row,
                 "below": a.row > b.row}[relation]
        return {"question": f"Is the {a.name} {relation} the {b.name}?", "answer": "yes" if holds else "no",
                "kind": kind}
    raise ValueError(f"Unknown question kind {kind!r}; use one of {KINDS}.")


def sample_questions(scene: list[Obj], rng: random.Random, n: int, weights: dict | None = None) -> list[dict]:
    """n distinct questions about the scene, kinds drawn with `weights` (default uniform; a kind that does not apply
    is redrawn)."""
    questions, seen = [], set()
    for _ in range(50 * n):
        if len(questions) == n:
            break
        question = ask(scene, rng, weights=weights)
        if question is not None and question["question"] not in seen:
            seen.add(question["question"])
            questions.append(question)
    return questions


def generate(out_dir: str | Path, n_images: int, seed: int, questions_per_image: tuple[int, int] = (1, 4),
             describe_rate: float = 0.0, kind_weights: dict | None = None) -> Path:
    """Write `n_images` scenes under out_dir/images/ with `data.json` (LLaVA layout, one multi-turn conversation per
    image with 1-4 questions by default; with probability `describe_rate` the caption is one of the turns), `questions.json`
    (flat) and `scenes.json` (the objects); `kind_weights` weighs the question kinds (default: uniform). Returns
    out_dir/data.json. Deterministic for a seed."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    records, flat, scenes = [], [], []
    for index in range(n_images):
        scene = random_scene(rng)
        questions = sample_questions(scene, rng, rng.randint(*questions_per_image), kind_weights)
        if describe_rate and rng.random() < describe_rate:
            questions.insert(rng.randint(0, len(questions)), describe(scene))
        name = f"images/{index:06d}.png"
        render(scene).save(out / name, optimize=False)
        turns = []
        for turn, q in enumerate(questions):
            turns.append({"from": "human", "value": ("<image>\n" if turn == 0 else "") + q["question"]})
            turns.append({"from": "gpt", "value": q["answer"]})
        records.append({"id": f"{seed}-{index}", "image": name, "conversations": turns})
        flat += [{"image": name, **q} for q in questions]
        scenes.append({"image": name, "objects": [asdict(o) for o in scene]})
    (out / "data.json").write_text(json.dumps(records, indent=0))
    (out / "questions.json").write_text(json.dumps(flat, indent=1))
    (out / "scenes.json").write_text(json.dumps(scenes))
    return out / "data.json"


def corpus(seed: int = 0, n_scenes: int = 2000) -> list[str]:
    """Every question and answer form the generator writes (for building a vocabulary)."""
    rng, texts = random.Random(seed), []
    for _ in range(n_scenes):
        scene = random_scene(rng)
        for kind in KINDS:
            question = ask(scene, rng, kind)
            if question is not None:
                texts += [question["question"], question["answer"]]
        texts += list(describe(scene).values())[:2]
    return texts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m trol.demo.generator", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output folder (images/, data.json, questions.json)")
    parser.add_argument("--images", type=int, default=1000, help="number of images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--questions-per-image", type=int, nargs=2, default=(1, 4), metavar=("MIN", "MAX"))
    parser.add_argument("--describe-rate", type=float, default=0.0, help="share of conversations opened by the caption")
    args = parser.parse_args(argv)
    print(generate(args.out, args.images, args.seed, tuple(args.questions_per_image), args.describe_rate))


if __name__ == "__main__":
    main()

__all__ = ["ANSWERS", "AUX_KINDS", "COLORS", "IMAGE_SIZE", "KINDS", "SHAPES", "Obj", "ask", "corpus", "describe", "generate", "random_scene",
           "render", "sample_questions"]
