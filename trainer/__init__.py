"""`trol-train`: the TroL two-stage recipe (paper section 3) on TRL's SFTTrainer.

Stage 1 trains the projector and every gate (vision tower and LLM frozen); stage 2 adds LoRA on every linear layer of
a 4-bit/8-bit quantized LLM (QLoRA); `trol-train merge` folds the LoRA weights into a full-precision release folder.
"""

from .arguments import TrolDataArguments, TrolModelArguments

__all__ = ["TrolDataArguments", "TrolModelArguments"]
