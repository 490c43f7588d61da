"""Held-out accuracy of a TroL model on generated questions: greedy generation, exact match of the answer word.

Used by `trol demo`, the build (model card figures) and the ablation, so that all three count the same way.
"""

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..processing_trol import load_rgb_image


@dataclass
class Prediction:
    image: str
    question: str
    expected: str
    answer: str
    kind: str = ""

    @property
    def correct(self) -> bool:
        return normalize(self.answer) == normalize(self.expected)


def normalize(text: str) -> str:
    """Answers are single words: compare lowercased, without surrounding spaces and a final period."""
    return text.strip().rstrip(".").strip().lower()


def load_questions(path: str | Path, limit: int | None = None) -> list[dict]:
    """`questions.json` of the generator: [{"image" (relative to the file's folder), "question", "answer", "kind"}]."""
    path = Path(path)
    questions = json.loads(path.read_text())[:limit]
    return [{**q, "image": str(path.parent / q["image"])} for q in questions]


def chat(images, question: str) -> list[dict]:
    """A one-turn chat: the image(s) (None, one, or a list; anything `load_rgb_image` reads), then the question (as
    the training data puts it)."""
    images = [] if images is None else images if isinstance(images, (list, tuple)) else [images]
    content = [{"type": "image", "image": load_rgb_image(image)} for image in images]
    return [{"role": "user", "content": [*content, {"type": "text", "text": question}]}]


@torch.inference_mode()
def answer(model, processor, images: Sequence, questions: Sequence[str], max_new_tokens: int = 4,
           num_beams: int = 1) -> list[str]:
    """Greedy (or beam) answers to a batch of (image, question) pairs; images are anything `load_rgb_image` reads."""
    chats = [chat(image, question) for image, question in zip(images, questions)]
    inputs = processor.apply_chat_template(chats, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt", processor_kwargs={"padding": True}).to(model.device)
    inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=num_beams)
    return processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def evaluate(model, processor, questions: Sequence[dict], batch_size: int = 64) -> list[Prediction]:
    """Answer every question ({"image", "question", "answer", "kind"?}); returns the predictions in order."""
    predictions = []
    for start in range(0, len(questions), batch_size):
        batch = questions[start:start + batch_size]
        answers = answer(model, processor, [q["image"] for q in batch], [q["question"] for q in batch])
        predictions += [Prediction(q["image"], q["question"], q["answer"], a, q.get("kind", ""))
                        for q, a in zip(batch, answers)]
    return predictions


def accuracy(predictions: Sequence[Prediction]) -> float:
    return sum(p.correct for p in predictions) / max(len(predictions), 1)


def accuracy_by_kind(predictions: Sequence[Prediction]) -> dict[str, float]:
    kinds = sorted({p.kind for p in predictions})
    return {kind: accuracy([p for p in predictions if p.kind == kind]) for kind in kinds}


def evaluate_folder(model_dir: str | Path, questions_file: str | Path, limit: int | None = None,
                    batch_size: int = 64) -> dict:
    """Load a TroL folder with this package's classes, answer the questions, return a summary dict."""
    from ..modeling_trol import TrolForConditionalGeneration
    from ..processing_trol import TrolProcessor

    model = TrolForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    processor = TrolProcessor.from_pretrained(model_dir, config=model.config)
    start = time.perf_counter()
    predictions = evaluate(model, processor, load_questions(questions_file, limit), batch_size)
    return {"accuracy": accuracy(predictions), "by_kind": accuracy_by_kind(predictions), "n": len(predictions),
            "seconds": time.perf_counter() - start}


__all__ = ["Prediction", "accuracy", "accuracy_by_kind", "answer", "chat", "evaluate", "evaluate_folder",
           "load_questions", "normalize"]
