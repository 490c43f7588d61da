"""Where a TroL model traverses: the mixing ratio w of every layer x prompt token (paper Figure 6).

w = 0.5 * tanh(g_i(out1)) + 0.5 is what gate i outputs for each token in the prefill of the prompt; it is captured
with forward hooks on the gate modules (`model.model.trol_gates`), without touching the model's code paths. In a
prefill every (non-padding) token traverses and every decoder layer calls its gate exactly once, in layer order, so
the k-th gate call of one forward belongs to layer k; this holds for per-layer gates and for one gate shared by all
layers (the released checkpoints), where a single module serves every layer.

Outputs: a PNG (the prompt's image, a heatmap of w min-max normalised per layer as in the paper's Figure 6, and the
per-layer mean of the raw w), a CSV (one row per layer, one column per token, raw w) and a JSON file with the raw
and normalised numbers, the tokens and their ids.
"""

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..processing_trol import load_rgb_image
from .evaluate import chat

MAX_IMAGE_COLUMNS = 64
"""Above this many image tokens in a prompt, `image_tokens="auto"` shows each image as one column (their mean)."""


@dataclass
class TraversalMap:
    """w (layers, tokens) raw, the token labels and ids, and what was asked and answered."""

    w: torch.Tensor
    tokens: list[str]
    token_ids: list[int]
    question: str
    answer: str = ""
    model: str = ""
    columns: list[list[int]] = field(default_factory=list)  # prompt positions averaged into each column

    @property
    def normalized(self) -> torch.Tensor:
        """Per layer (row) min-max normalised to [0, 1] (a constant row becomes 0)."""
        low = self.w.min(dim=1, keepdim=True).values
        span = self.w.max(dim=1, keepdim=True).values - low
        return (self.w - low) / torch.where(span > 0, span, torch.ones_like(span))

    @property
    def layer_mean(self) -> torch.Tensor:
        return self.w.mean(dim=1)

    def to_json(self) -> dict:
        return {"model": self.model, "question": self.question, "answer": self.answer,
                "layers": int(self.w.shape[0]), "tokens": self.tokens, "token_ids": self.token_ids,
                "columns": self.columns, "w": self.w.tolist(), "w_normalized_per_layer": self.normalized.tolist(),
                "layer_mean": self.layer_mean.tolist()}


def token_label(tokenizer, token_id: int) -> str:
    """A readable label: the decoded text of the token, stripped; a whitespace token shows as `\\n` / `␣`."""
    text = tokenizer.decode([token_id])
    if not text.strip():
        return text.replace("\n", "\\n").replace(" ", "\u2423") or f"#{token_id}"
    return text.strip().replace("\n", "\\n")


@torch.inference_mode()
def capture_mixing_ratios(model, inputs: dict) -> torch.Tensor:
    """One prefill forward over a single prompt; returns w of shape (layers, prompt tokens), float32 on the CPU.

    Raises a ValueError when the model did not traverse (use_traversal=False or inference_traversal="none")."""
    if inputs["input_ids"].shape[0] != 1:
        raise ValueError(f"A traversal map is for one prompt; got a batch of {inputs['input_ids'].shape[0]}.")
    base = model.model
    n_layers = model.config.text_config.num_hidden_layers
    gates = {id(gate): gate for gate in base.trol_gates}.values()  # one module may serve several layers
    calls: list[torch.Tensor] = []
    handles = [gate.register_forward_hook(lambda module, args, output: calls.append(output.detach()))
               for gate in gates]
    try:
        model(**inputs, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    if not calls:
        raise ValueError(
            "The model's gates were never called, so it does not traverse (config.use_traversal="
            f"{model.config.use_traversal}, inference_traversal={model.config.inference_traversal!r}); a traversal "
            "map needs a TroL model that traverses its prompt."
        )
    if len(calls) != n_layers:
        raise ValueError(f"Expected one gate call per decoder layer ({n_layers}) in one forward, got {len(calls)}.")
    return torch.stack([w[0, :, 0].float().cpu() for w in calls])


def build_map(model, processor, image, question: str, answer: str = "", image_tokens: str = "auto",
              model_name: str = "") -> TraversalMap:
    """Run the prompt (chat template, generation prompt included) and collect w for every layer x token.

    image_tokens: "all" (one column per image token), "mean" (one column per image: the mean of its tokens) or "auto"
    ("all" up to MAX_IMAGE_COLUMNS image tokens)."""
    if image_tokens not in ("auto", "all", "mean"):
        raise ValueError(f"image_tokens={image_tokens!r}: use 'auto', 'all' or 'mean'.")
    images = [] if image is None else image if isinstance(image, (list, tuple)) else [image]
    inputs = processor.apply_chat_template(chat(images, question), add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt").to(model.device)
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    w = capture_mixing_ratios(model, dict(inputs))
    ids = inputs["input_ids"][0].tolist()
    image_id = model.config.image_token_id
    n_image = sum(token == image_id for token in ids)
    collapse = image_tokens == "mean" or (image_tokens == "auto" and n_image > MAX_IMAGE_COLUMNS)
    per_image = max(n_image // max(len(images), 1), 1)
    columns, labels, column_ids, seen = [], [], [], 0
    for position, token in enumerate(ids):
        if token == image_id:
            index, seen = seen, seen + 1
            if collapse:
                if index % per_image == 0:
                    columns.append([])
                    labels.append(f"<image {index // per_image + 1}: mean of {per_image}>")
                    column_ids.append(token)
                columns[-1].append(position)
                continue
            labels.append(f"<img {index + 1}>")
        else:
            labels.append(token_label(processor.tokenizer, token))
        columns.append([position])
        column_ids.append(token)
    w = torch.stack([w[:, cols].mean(dim=1) for cols in columns], dim=1)
    return TraversalMap(w, labels, column_ids, question, answer, model_name, columns)


def write_csv(tmap: TraversalMap, path: str | Path) -> None:
    """Rows: layer 1..L; columns: `position:token` labels; cells: raw w."""
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["layer", *(f"{i}:{label}" for i, label in enumerate(tmap.tokens))])
        for layer, row in enumerate(tmap.w.tolist(), start=1):
            writer.writerow([layer, *(f"{value:.6f}" for value in row)])


def write_json(tmap: TraversalMap, path: str | Path) -> None:
    Path(path).write_text(json.dumps(tmap.to_json(), indent=1))


def plot(tmap: TraversalMap, path: str | Path, image=None) -> None:
    """The figure: [image] | heatmap of per-layer min-max normalised w (layers x tokens) | per-layer mean of raw w.
    The PNG carries `trol:layers` and `trol:tokens` text chunks (the heatmap's shape)."""
    try:
        import matplotlib
    except ImportError as error:  # pragma: no cover - the `demo` extra installs it
        raise ImportError("`trol traversal-map` draws with matplotlib: pip install 'trol[demo]' "
                          "(or pip install matplotlib).") from error
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers, n_tokens = tmap.w.shape
    width = min(4 + 0.22 * n_tokens + (2.2 if image is not None else 0), 60)
    height = 2.6 + 0.28 * layers
    ratios = ([1.6] if image is not None else []) + [max(0.22 * n_tokens, 3), 1.4]
    fig, axes = plt.subplots(1, len(ratios), figsize=(width, height), gridspec_kw={"width_ratios": ratios},
                             constrained_layout=True)
    if image is not None:
        axes[0].imshow(load_rgb_image(image), interpolation="nearest")
        axes[0].set_xticks([])
        axes[0].set_yticks([])
        for spine in axes[0].spines.values():
            spine.set_color("0.7")
        axes[0].set_title("image", fontsize=9)
    heat, curve = axes[-2], axes[-1]
    shown = heat.imshow(tmap.normalized.numpy(), aspect="auto", origin="lower", cmap="magma", vmin=0, vmax=1,
                        interpolation="nearest")
    heat.set_xticks(range(n_tokens), tmap.tokens, rotation=90, fontsize=7, fontfamily="monospace")
    heat.set_yticks(range(layers), [str(i) for i in range(1, layers + 1)], fontsize=8)
    heat.set_ylabel("decoder layer")
    heat.set_xlabel("prompt token")
    title = f"Q: {tmap.question}" + (f"   A: {tmap.answer}" if tmap.answer else "")
    heat.set_title(f"mixing ratio w, min-max normalised per layer\n{title}", fontsize=9)
    fig.colorbar(shown, ax=heat, location="top", shrink=0.4, aspect=30, pad=0.01).ax.tick_params(labelsize=7)
    mean = tmap.layer_mean.numpy()
    low, high = tmap.w.min(dim=1).values.numpy(), tmap.w.max(dim=1).values.numpy()
    ys = range(layers)
    curve.fill_betweenx(ys, low, high, color="tab:orange", alpha=0.2, label="min-max")
    curve.plot(mean, ys, marker="o", color="tab:orange", label="mean")
    curve.set_ylim(-0.5, layers - 0.5)
    curve.set_yticks(range(layers), [str(i) for i in range(1, layers + 1)], fontsize=8)
    curve.set_xlabel("raw w per layer", fontsize=8)
    curve.tick_params(labelsize=7)
    curve.legend(fontsize=7, loc="best")
    curve.grid(alpha=0.3)
    fig.savefig(path, dpi=110, metadata={"trol:layers": str(layers), "trol:tokens": str(n_tokens)})
    plt.close(fig)


__all__ = ["MAX_IMAGE_COLUMNS", "TraversalMap", "build_map", "capture_mixing_ratios", "plot", "token_label",
           "write_csv", "write_json"]
