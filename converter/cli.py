"""`trol-convert SRC OUT`: a released TroL repo (local copy) -> a TroL folder for `trust_remote_code=True`.

    huggingface-cli download BK-Lee/TroL-7B --local-dir TroL-7B-original
    trol-convert TroL-7B-original TroL-7B --dtype bfloat16
    trol-upload TroL-7B --repo-id YOU/TroL-7B          # optional: publish with a model card
"""

from __future__ import annotations

import argparse
import logging
import sys

from .common import ConversionError
from .convert import ARCHES, convert


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="trol-convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="local copy of BK-Lee/TroL-1.8B, -3.8B or -7B (config.json, safetensors, "
                                    "tokenizer files, trol_gating.pt)")
    parser.add_argument("out", help="output folder (new or empty)")
    parser.add_argument("--arch", choices=sorted(ARCHES), help="override the detected architecture: internlm2 "
                                                               "(TroL-1.8B/7B) or phi3 (TroL-3.8B)")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"],
                        help="dtype of the written weights (default: the source's)")
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    parser.add_argument("--source-repo", help="hub id of the source, recorded in trol_conversion.json")
    parser.add_argument("--revision", help="hub revision (commit) of the source, recorded likewise")
    parser.add_argument("--license", help="license of the source weights, recorded for the model card")
    parser.add_argument("--overwrite", action="store_true", help="allow a non-empty OUT (files we write are replaced)")
    parser.add_argument("--num-attention-heads", type=int, help="decoder heads, if config.json does not say")
    parser.add_argument("--num-key-value-heads", type=int, help="decoder KV heads, if config.json does not say")
    parser.add_argument("--vision-num-attention-heads", type=int, help="vision-tower heads, for non-standard sizes")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    options = {name: getattr(args, name) for name in ("num_attention_heads", "num_key_value_heads",
                                                      "vision_num_attention_heads") if getattr(args, name)}
    try:
        out = convert(args.src, args.out, arch=args.arch, dtype=args.dtype, max_shard_size=args.max_shard_size,
                      source_repo=args.source_repo, source_revision=args.revision, license=args.license,
                      overwrite=args.overwrite, **options)
    except ConversionError as err:
        print(f"trol-convert: {err}", file=sys.stderr)
        return 2
    print(f"Converted {args.src} -> {out}. Load it with "
          f"AutoModelForImageTextToText.from_pretrained({str(out)!r}, trust_remote_code=True).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
