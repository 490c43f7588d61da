"""`trol-train` (also `python -m trol.trainer`): the TroL recipe, one stage per run.

    # stage 1: projector + gates (vision tower and LLM frozen)
    trol-train --config trainer/recipes/stage1.yaml --vision_model openai/clip-vit-large-patch14-336 \
        --language_model Qwen/Qwen2.5-1.5B-Instruct --image_size 490 --data_config my_mix.yaml --output_dir out/stage1
    # stage 2: QLoRA on every LLM linear + projector + gates
    trol-train --config trainer/recipes/stage2.yaml --model_name_or_path out/stage1 --data_config my_mix.yaml \
        --output_dir out/stage2
    # release folder (full precision, LoRA folded in)
    trol-train merge out/stage2 --output out/release
    # LLaVolta's staged visual context compression (faster training): the *_4stage.yaml / *_heavy.yaml recipes, or
    trol-train --config trainer/recipes/stage1.yaml --compression_schedule 4stage ...
    # several GPUs: accelerate launch --config_file trainer/accelerate/ddp.yaml -m trol.trainer --config ...

Every SFTConfig field (learning_rate, per_device_train_batch_size, report_to, resume_from_checkpoint, ...) can be
given as a flag or in the YAML file; flags win over the file.
"""

import argparse
import sys


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "merge":
        return merge_main(argv[1:])
    if argv and argv[0] == "train":
        argv = argv[1:]
    from trl import SFTConfig, TrlParser

    from .arguments import TrolDataArguments, TrolModelArguments
    from .train import train

    parser = TrlParser((TrolModelArguments, TrolDataArguments, SFTConfig))
    model_args, data_args, sft_args = parser.parse_args_and_config(argv)
    train(model_args, data_args, sft_args)


def merge_main(argv: list[str]) -> None:
    from .merge import merge

    parser = argparse.ArgumentParser(prog="trol-train merge", description=merge.__doc__)
    parser.add_argument("adapter", help="stage-2 output folder (LoRA adapter + processor)")
    parser.add_argument("--output", required=True, help="new release folder")
    parser.add_argument("--base", default=None, help="stage-1 folder (default: recorded in the adapter)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    args = parser.parse_args(argv)
    print(merge(args.adapter, args.output, base=args.base, dtype=args.dtype))


if __name__ == "__main__":
    main()
