"""Stage 0: the tiny "pretrained" backbones of the demo model, trained from scratch on the generated data.

A real TroL model starts stage 1 from a pretrained vision encoder (CLIP, SigLIP) and a pretrained LLM. Nothing can be
downloaded here, so stage 0 makes both: a tiny CLIP vision encoder (48-px images, 16-px patches -> one image token
per grid cell) and a tiny Llama decoder with a word-level byte-BPE tokenizer, trained *jointly* as a plain LLaVA-style
model (traversal off, `use_traversal=False`) on the same generated question/answer data, with a plain PyTorch loop
(AdamW, warm-up + cosine, loss on the answers only), after a short "pretraining" of the encoder as a per-patch
object/position classifier; the encoder stays frozen from then on, as pretrained encoders do in LLaVA-style training.
It then saves, as if downloaded from the hub:

    OUT/vision   CLIPVisionModel + its image processor       (trol-train --vision_model OUT/vision)
    OUT/text     LlamaForCausalLM + tokenizer (with a chat    (trol-train --language_model OUT/text)
                 template carrying {% generation %} markers)

Its projector is thrown away: stage 1 starts, as for a real model, from a fresh projector and fresh gates.

Batches of 8 conversations, not 32: the relative-position questions ("Is the red circle left of the blue square?")
need two objects looked up and their places compared, and the decoder learned that only after ~2000 optimizer
steps, abruptly (measured with the build's data, 3000 images x 8 epochs, which holds the training-only `where`
questions: at chance up to step 1750, 83% at 2000, 97% at 2750); with batches of 32 the same epochs are 750 steps and
those questions stayed at chance, as they did without the `where` questions. Batches of 8 cost about as much CPU time
per epoch on this 1M-parameter model. The encoder's pretraining runs 600 steps (~10 s): after 150 the
patches' rows and columns were linearly decodable from its features for only 90-96% of the objects, after 600 for all.

    python -m trol.demo.stage0 --data data/train/data.json --out work/stage0 --epochs 8
"""

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from ..modeling_trol import TrolForConditionalGeneration
from ..processing_trol import TrolProcessor, load_rgb_image, trol_clip_image_processor
from ..trainer.data import llava
from . import generator

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<image>"]
IMAGE_TOKEN = "<image>"

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{- '<|assistant|>' -}}{%- generation -%}{{- message['content'] + '<|end|>' -}}{%- endgeneration -%}"
    "{%- else -%}{{- '<|' + message['role'] + '|>' + message['content'] -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>' -}}{%- endif -%}"
)
"""A compact chat format, `<|user|>{question}<|assistant|>{answer}<|end|>` (no system turn, one token per marker,
short sequences); the answer and its end marker sit in {% generation %} (TRL's assistant-only loss).
TrolProcessor's `generic_chat_template` reuses it, turning each image block into `<image>\\n`."""

VISION = {"hidden_size": 96, "intermediate_size": 192, "num_hidden_layers": 2, "num_attention_heads": 4,
          "image_size": generator.IMAGE_SIZE, "patch_size": 16}
TEXT = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4,
        "num_key_value_heads": 4, "max_position_embeddings": 256, "rope_theta": 10000.0, "tie_word_embeddings": False,
        "initializer_range": 0.08}
"""initializer_range 0.08 (Llama's default 0.02 is tuned for H = 4096): with H = 128, 0.02 leaves attention logits
near zero for hundreds of steps and runs stalled at the answer prior seed after seed; at 0.08 all 4 seeds tried
answered colour, shape, count and existence questions at 97-100% within 900 steps."""


def build_tokenizer() -> PreTrainedTokenizerFast:
    """GPT-2-style byte-level BPE whose vocabulary holds every word the generator writes as one token (readable
    traversal-map labels, short sequences); any other text falls back to single bytes (`ignore_merges`: a known
    word is looked up whole, unknown words have no merges). Deterministic: built from the generator's word list."""
    pre = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    words = set()
    for text in generator.corpus():
        for piece in (text, "\n" + text, " " + text):
            words.update(token for token, _ in pre.pre_tokenize_str(piece))
    vocab: dict[str, int] = {}
    for token in SPECIAL_TOKENS + sorted(pre_tokenizers.ByteLevel.alphabet()) + sorted(words):
        vocab.setdefault(token, len(vocab))
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], ignore_merges=True, unk_token="<unk>"))
    backend.pre_tokenizer = pre
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(SPECIAL_TOKENS)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="<|end|>",
                                        unk_token="<unk>", pad_token="<pad>", model_max_length=TEXT[
                                            "max_position_embeddings"])
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def backbone_configs(tokenizer: PreTrainedTokenizerFast, scale: float = 1.0) -> tuple[CLIPVisionConfig, LlamaConfig]:
    """The tiny CLIP vision encoder and Llama decoder (`scale` multiplies the widths; heads stay 4)."""
    def width(value):
        return round(value * scale / 4) * 4

    vision = CLIPVisionConfig(**{**VISION, **{k: width(VISION[k]) for k in ("hidden_size", "intermediate_size")}})
    text = LlamaConfig(**{**TEXT, **{k: width(TEXT[k]) for k in ("hidden_size", "intermediate_size")}},
                       vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    return vision, text


def build_processor(tokenizer: PreTrainedTokenizerFast) -> TrolProcessor:
    """What stage 1 will build from the saved parts (9 image tokens: CLIP's CLS is dropped)."""
    tokens = (generator.IMAGE_SIZE // VISION["patch_size"]) ** 2
    return TrolProcessor(trol_clip_image_processor(generator.IMAGE_SIZE), tokenizer, image_token=IMAGE_TOKEN,
                         num_image_tokens=tokens)


def encode(data_json: str | Path, processor: TrolProcessor) -> list[dict]:
    """Every record of the LLaVA json -> {input_ids, labels (answers only), pixel_values}, through the same
    `llava` adapter and processor chat template that TRL's collator uses in stages 1 and 2."""
    root = Path(data_json).parent
    samples = []
    for record in json.loads(Path(data_json).read_text()):
        row = llava(record)
        images = iter(load_rgb_image(root / ref) for ref in row["images"])
        messages = [{"role": m["role"], "content": [{**b, "image": next(images)} if b["type"] == "image" else b
                                                    for b in m["content"]]} for m in row["messages"]]
        out = processor.apply_chat_template(messages, tokenize=True, return_dict=True, return_tensors="pt",
                                            return_assistant_tokens_mask=True)
        ids = out["input_ids"][0]
        labels = ids.masked_fill(out["assistant_masks"][0] == 0, -100)
        samples.append({"input_ids": ids, "labels": labels, "pixel_values": out["pixel_values"]})
    return samples


def collate(samples: list[dict], pad_id: int) -> dict:
    width = max(len(s["input_ids"]) for s in samples)
    ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), width), -100, dtype=torch.long)
    mask = torch.zeros((len(samples), width), dtype=torch.long)
    for row, sample in enumerate(samples):
        n = len(sample["input_ids"])
        ids[row, :n], labels[row, :n], mask[row, :n] = sample["input_ids"], sample["labels"], 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask,
            "pixel_values": torch.cat([s["pixel_values"] for s in samples])}


def cell_labels(scenes_json: str | Path, processor: TrolProcessor) -> tuple[torch.Tensor, torch.Tensor]:
    """pixel_values (N, 3, S, S) and per-cell labels (N, cells): 0 = empty, 1 + 3 * colour + shape otherwise."""
    root, pixels, labels = Path(scenes_json).parent, [], []
    colors, shapes = list(generator.COLORS), list(generator.SHAPES)
    for scene in json.loads(Path(scenes_json).read_text()):
        pixels.append(processor.image_processor(load_rgb_image(root / scene["image"]), return_tensors="pt")[
            "pixel_values"])
        cells = torch.zeros(generator.GRID * generator.GRID, dtype=torch.long)
        for obj in scene["objects"]:
            cells[obj["row"] * generator.GRID + obj["col"]] = 1 + 3 * colors.index(obj["color"]) + shapes.index(
                obj["shape"])
        labels.append(cells)
    return torch.cat(pixels), torch.stack(labels)


def _schedule(total: int, warmup: int):
    def factor(step):  # linear warm-up, cosine down to 1% of the peak
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def pretrain_vision(scenes_json: str | Path, vision_config: CLIPVisionConfig, processor: TrolProcessor,
                    steps: int = 300, batch_size: int = 64, learning_rate: float = 2e-3, seed: int = 0,
                    log_every: int = 100, device: str = "cpu") -> CLIPVisionModel:
    """Stage 0a, the vision encoder's "pretraining": from each 16-px patch's last hidden state, linear heads (then
    dropped) classify what the patch holds (empty or one of the 12 colour x shape objects) and its row and column.
    Starting the joint training from an encoder that already sees the objects, and where they are, keeps the decoder
    from settling on the answer prior."""
    torch.manual_seed(seed)
    grid, n_objects = generator.GRID, 1 + len(generator.COLORS) * len(generator.SHAPES)
    encoder = CLIPVisionModel(vision_config).to(device)
    head = torch.nn.Linear(vision_config.hidden_size, n_objects + 2 * grid).to(device)
    pixels, labels = (t.to(device) for t in cell_labels(scenes_json, processor))
    rows = torch.arange(grid * grid, device=device) // grid
    cols = torch.arange(grid * grid, device=device) % grid
    parameters = [*encoder.parameters(), *head.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(steps, steps // 10))
    generator_ = torch.Generator().manual_seed(seed)
    encoder.train()
    start = time.perf_counter()
    for step in range(1, steps + 1):
        index = torch.randint(0, len(pixels), (batch_size,), generator=generator_).to(device)
        features = encoder(pixel_values=pixels[index], output_hidden_states=True).hidden_states[-1][:, 1:]
        logits, row_logits, col_logits = head(features).split([n_objects, grid, grid], dim=-1)
        cross_entropy = torch.nn.functional.cross_entropy
        loss = (cross_entropy(logits.flatten(0, 1), labels[index].flatten())
                + cross_entropy(row_logits.flatten(0, 1), rows.repeat(batch_size))
                + cross_entropy(col_logits.flatten(0, 1), cols.repeat(batch_size)))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if step % log_every == 0 or step == steps:
            hit = (logits.argmax(-1) == labels[index]).float().mean().item()
            print(f"stage 0a (vision): step {step}/{steps} loss {loss.item():.4f} patch accuracy {hit:.3f} "
                  f"({time.perf_counter() - start:.0f}s)", flush=True)
    return encoder.eval()


def length_grouped_batches(lengths: list[int], batch_size: int, rng: random.Random) -> list[list[int]]:
    """One epoch of batches in random order, each of samples of similar length (less padding): shuffle, sort windows
    of 16 batches by length, cut them into batches, shuffle the batches."""
    order = rng.sample(range(len(lengths)), len(lengths))
    window = 16 * batch_size
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start:start + window], key=lambda i: lengths[i])
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def train_backbones(data_json: str | Path, out_dir: str | Path, **kwargs) -> Path:
    """Stage 0 (`train_jointly`), then save OUT/vision and OUT/text."""
    model, processor = train_jointly(data_json, **kwargs)
    save_backbones(model, processor, Path(out_dir))
    return Path(out_dir)


def train_jointly(data_json: str | Path, epochs: float = 8, batch_size: int = 8, learning_rate: float = 1e-3,
                  warmup_steps: int = 200, vision_steps: int = 600, seed: int = 0, scale: float = 1.0,
                  freeze_vision: bool = True, log_every: int = 250, callback=None, device: str = "cpu"):
    """Stage 0: the vision encoder's patch classification (`pretrain_vision`, on `scenes.json` next to the data),
    then a plain (traversal off) LLaVA-style model trained on the questions, every parameter, loss on the answers.
    Returns (model, processor)."""
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    processor = build_processor(tokenizer)
    vision_config, text_config = backbone_configs(tokenizer, scale)
    model = TrolForConditionalGeneration.from_vision_and_text(
        vision_config, text_config, image_token_id=processor.image_token_id, use_traversal=False)
    start = time.perf_counter()
    if vision_steps:
        encoder = pretrain_vision(Path(data_json).parent / "scenes.json", vision_config, processor, vision_steps,
                                  seed=seed, device=device)
        model.model.vision_tower.load_state_dict(encoder.state_dict())
    model.to(device)
    if freeze_vision:
        model.model.vision_tower.requires_grad_(False)
    samples = encode(data_json, processor)
    print(f"stage 0: {len(samples)} conversations encoded ({time.perf_counter() - start:.1f}s); "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters", flush=True)
    steps_per_epoch = math.ceil(len(samples) / batch_size)
    total = max(1, int(epochs * steps_per_epoch))
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, betas=(0.9, 0.98), weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(total, warmup_steps))
    rng = random.Random(seed)
    model.train()
    batches, step, running = [], 0, 0.0
    while step < total:
        if not batches:
            batches = length_grouped_batches([len(s["input_ids"]) for s in samples], batch_size, rng)
        batch = collate([samples[i] for i in batches.pop()], tokenizer.pad_token_id)
        loss = model(**{k: v.to(device) for k, v in batch.items()}).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        running += loss.item()
        if step % log_every == 0 or step == total:
            n = log_every if step % log_every == 0 else step % log_every
            print(f"stage 0: step {step}/{total} loss {running / n:.4f} lr {scheduler.get_last_lr()[0]:.2e} "
                  f"({time.perf_counter() - start:.0f}s)", flush=True)
            running = 0.0
            if callback is not None:
                callback(step, model.eval(), processor)
                model.train()
    return model.cpu().eval(), processor


def save_backbones(model: TrolForConditionalGeneration, processor: TrolProcessor, out: Path) -> None:
    """OUT/vision (CLIPVisionModel + image processor) and OUT/text (LlamaForCausalLM + tokenizer)."""
    model.model.vision_tower.save_pretrained(out / "vision")
    processor.image_processor.save_pretrained(out / "vision")
    text_config = model.config.text_config
    language_model = LlamaForCausalLM(text_config)
    state = {f"model.{k}": v for k, v in model.model.language_model.state_dict().items()}
    state["lm_head.weight"] = model.lm_head.weight
    language_model.load_state_dict(state, strict=True)
    language_model.generation_config.eos_token_id = text_config.eos_token_id
    language_model.save_pretrained(out / "text")
    processor.tokenizer.save_pretrained(out / "text")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m trol.demo.stage0", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="LLaVA json of the generator (data.json)")
    parser.add_argument("--out", required=True, help="folder for vision/ and text/")
    parser.add_argument("--epochs", type=float, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale", type=float, default=1.0, help="width multiplier of both backbones")
    args = parser.parse_args(argv)
    train_backbones(args.data, args.out, epochs=args.epochs, batch_size=args.batch_size,
                    learning_rate=args.learning_rate, seed=args.seed, scale=args.scale)


__all__ = ["CHAT_TEMPLATE", "backbone_configs", "build_processor", "build_tokenizer", "encode", "save_backbones",
           "train_backbones"]

if __name__ == "__main__":
    main()
