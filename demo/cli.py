"""`trol`: talk to a TroL model, run the embedded demo model, draw where a model traverses.

    trol demo                                   # the embedded model answers held-out questions about bundled images
    trol chat --image demo/images/000000.png "How many circles are there?"     # streams the answer
    trol chat --model your-name/TroL-model --image cat.png "What is it?" --dtype bfloat16 --device cuda --num-beams 5
    trol traversal-map --image demo/images/000000.png "Is there a red square?" --out map.png   # + map.csv, map.json

`--model` takes a folder or a hub id (default: the embedded demo model, `trol.demo.MODEL_DIR`). Models load with
this package's TroL classes; `--remote-code` loads them through the Auto classes with `trust_remote_code=True`
instead, i.e. with the modeling files that travel with the folder.
"""

import argparse
import os
import sys
import threading
import time
from pathlib import Path

from . import MODEL_DIR, QUESTIONS_FILE, generator

DTYPES = ("auto", "float32", "bfloat16", "float16")
ATTENTION = ("eager", "sdpa", "flash_attention_2")


def _model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=str(MODEL_DIR),
                        help="TroL folder or hub id (default: the embedded demo model)")
    parser.add_argument("--dtype", default="auto", choices=DTYPES,
                        help="weights dtype (auto: as saved in the folder)")
    parser.add_argument("--device", default=None,
                        help="cpu, cuda, cuda:1, mps, or auto (a device map over every GPU); default: cuda if "
                             "available, else cpu")
    quantize = parser.add_mutually_exclusive_group()
    quantize.add_argument("--load-in-4bit", action="store_true",
                          help="bitsandbytes 4-bit NF4 + double quantization of the decoder (the paper's 1.8B/7B)")
    quantize.add_argument("--load-in-8bit", action="store_true",
                          help="bitsandbytes 8-bit decoder (the paper's 3.8B)")
    parser.add_argument("--attn-implementation", default=None, choices=ATTENTION,
                        help="attention kernel (default: transformers' choice)")
    parser.add_argument("--remote-code", action="store_true",
                        help="load through AutoModelForImageTextToText/AutoProcessor with trust_remote_code=True")


def load(args: argparse.Namespace):
    """(model in eval mode, processor) from the command-line options."""
    import torch

    kwargs = {"dtype": "auto" if args.dtype == "auto" else getattr(torch, args.dtype)}
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "auto" or args.load_in_4bit or args.load_in_8bit:
        kwargs["device_map"] = "auto" if device == "auto" else device
    if args.load_in_4bit or args.load_in_8bit:
        from transformers import BitsAndBytesConfig

        default = torch.bfloat16 if device.startswith("cuda") or device == "auto" else torch.float32
        compute = kwargs["dtype"] if isinstance(kwargs["dtype"], torch.dtype) else default
        kwargs["quantization_config"] = (
            BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=compute)
            if args.load_in_4bit else BitsAndBytesConfig(load_in_8bit=True))
    if args.attn_implementation:
        kwargs["attn_implementation"] = args.attn_implementation
    if args.remote_code:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        model = AutoModelForImageTextToText.from_pretrained(args.model, trust_remote_code=True, **kwargs)
        processor = AutoProcessor.from_pretrained(args.model, trust_remote_code=True)
    else:
        from ..modeling_trol import TrolForConditionalGeneration
        from ..processing_trol import TrolProcessor

        model = TrolForConditionalGeneration.from_pretrained(args.model, **kwargs)
        processor = TrolProcessor.from_pretrained(args.model, config=model.config)
    if "device_map" not in kwargs:
        model.to(device)
    return model.eval(), processor


def _inputs(model, processor, images: list[str], question: str):
    from .evaluate import chat

    inputs = processor.apply_chat_template(chat(images, question), add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt").to(model.device)
    if "pixel_values" in inputs and inputs["pixel_values"].is_floating_point():
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    return inputs


def chat_main(args: argparse.Namespace) -> str:
    """Stream the answer to stdout (greedy search streams token by token; beam search prints the final beam)."""
    import torch
    from transformers import TextIteratorStreamer

    model, processor = load(args)
    inputs = _inputs(model, processor, args.image, args.question)
    generation = dict(**inputs, max_new_tokens=args.max_new_tokens, num_beams=args.num_beams, do_sample=False)
    prompt_length = inputs["input_ids"].shape[1]
    if args.num_beams > 1:  # transformers' streamers do not support beam search
        with torch.inference_mode():
            output = model.generate(**generation)
        text = processor.decode(output[0, prompt_length:], skip_special_tokens=True)
        print(text, flush=True)
        return text
    streamer = TextIteratorStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=600)
    failure: list[BaseException] = []

    def run():
        try:
            with torch.inference_mode():
                model.generate(**generation, streamer=streamer)
        except BaseException as error:  # noqa: BLE001 - re-raised in the main thread; end the stream so the loop stops
            failure.append(error)
            streamer.end()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    pieces = []
    for piece in streamer:
        pieces.append(piece)
        print(piece, end="", flush=True)
    thread.join()
    print(flush=True)
    if failure:
        raise failure[0]
    return "".join(pieces)


def _short(path: str) -> str:
    """The path relative to the working directory when it lies below it."""
    relative = os.path.relpath(path)
    return path if relative.startswith("..") else relative


def demo_main(args: argparse.Namespace) -> float:
    """Answer the bundled held-out questions with the embedded model; print each and the accuracy."""
    start = time.perf_counter()
    import torch

    from ..modeling_trol import TrolForConditionalGeneration
    from ..processing_trol import TrolProcessor
    from .evaluate import accuracy, evaluate, load_questions

    model_dir = Path(args.model)
    model = TrolForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    processor = TrolProcessor.from_pretrained(model_dir, config=model.config)
    questions = load_questions(args.questions, args.limit)
    loaded = time.perf_counter()
    predictions = evaluate(model, processor, questions)
    print(f"{'image':<12} {'question':<52} {'answer':<9} {'expected':<9}")
    for p in predictions:
        mark = "ok" if p.correct else "WRONG"
        print(f"{Path(p.image).name:<12} {p.question:<52} {p.answer:<9} {p.expected:<9} {mark}")
    score = accuracy(predictions)
    n_correct = sum(p.correct for p in predictions)
    print(f"\naccuracy {n_correct}/{len(predictions)} = {score:.1%} on held-out questions about images the model never "
          f"saw in training ({model.num_parameters() / 1e6:.2f}M-parameter TroL model with {len(model.model.trol_gates)} "
          f"gates; loaded in {loaded - start:.1f}s, answered in {time.perf_counter() - loaded:.1f}s)")
    kinds = sorted({p.kind for p in predictions})
    print("by kind: " + ", ".join(
        f"{kind} {sum(p.correct for p in predictions if p.kind == kind)}/{sum(p.kind == kind for p in predictions)}"
        for kind in kinds))
    example = predictions[0]
    image = _short(example.image)
    print(f'try:  trol chat --image {image} "{generator.DESCRIBE}"\n'
          f'      trol traversal-map --image {image} "{example.question}" --out map.png')
    return score


def traversal_map_main(args: argparse.Namespace) -> Path:
    """Write the PNG, CSV and JSON of the mixing ratios for one prompt."""
    import torch

    from .traversal_map import build_map, plot, write_csv, write_json

    model, processor = load(args)
    answer = ""
    if args.max_new_tokens > 0:
        inputs = _inputs(model, processor, args.image, args.question)
        with torch.inference_mode():
            output = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
        answer = processor.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    tmap = build_map(model, processor, args.image, args.question, answer, image_tokens=args.image_tokens,
                     model_name=args.model)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    csv_path = Path(args.csv) if args.csv else out.with_suffix(".csv")
    json_path = Path(args.json) if args.json else out.with_suffix(".json")
    plot(tmap, out, image=args.image[0] if len(args.image) == 1 else None)
    write_csv(tmap, csv_path)
    write_json(tmap, json_path)
    layers, tokens = tmap.w.shape
    print(f"answer: {answer!r}\nlayer means (raw w): " + " ".join(f"{v:.3f}" for v in tmap.layer_mean.tolist()))
    print(f"wrote {out} ({layers} layers x {tokens} tokens), {csv_path}, {json_path}")
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trol", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    commands = parser.add_subparsers(dest="command", required=True)

    chat = commands.add_parser("chat", help="answer a question about images, streaming")
    _model_options(chat)
    chat.add_argument("--image", action="append", default=[], help="image file or URL (repeat for several)")
    chat.add_argument("--num-beams", type=int, default=1, help="beam search width (the paper: 5); 1 streams")
    chat.add_argument("--max-new-tokens", type=int, default=64)
    chat.add_argument("question")

    demo = commands.add_parser("demo", help="the embedded model on held-out questions about bundled images")
    demo.add_argument("--model", default=str(MODEL_DIR), help=argparse.SUPPRESS)
    demo.add_argument("--questions", default=str(QUESTIONS_FILE), help="questions json (default: the bundled set)")
    demo.add_argument("--limit", type=int, default=None, help="answer only the first N questions")

    tmap = commands.add_parser("traversal-map", help="mixing ratio w per layer x prompt token (paper Figure 6)")
    _model_options(tmap)
    tmap.add_argument("--image", action="append", default=[], help="image file or URL (repeat for several)")
    tmap.add_argument("--out", default="traversal_map.png", help="PNG to write (CSV/JSON next to it by default)")
    tmap.add_argument("--csv", default=None, help="CSV path (default: OUT with .csv)")
    tmap.add_argument("--json", default=None, help="JSON path (default: OUT with .json)")
    tmap.add_argument("--image-tokens", default="auto", choices=("auto", "all", "mean"),
                      help="one column per image token, or per image (their mean); auto: all up to 64")
    tmap.add_argument("--max-new-tokens", type=int, default=8, help="also generate the answer for the title (0: no)")
    tmap.add_argument("question")
    return parser


def run(argv: list[str] | None = None):
    """Run a `trol` command; returns its result (demo: the accuracy; chat: the answer; traversal-map: the PNG path)."""
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.command == "demo":
        return demo_main(args)
    if args.command == "chat":
        return chat_main(args)
    return traversal_map_main(args)


def main(argv: list[str] | None = None) -> None:
    """The console script (its return value would become the exit status)."""
    run(argv)


__all__ = ["build_parser", "chat_main", "demo_main", "load", "main", "run", "traversal_map_main"]

if __name__ == "__main__":
    main()
