"""`trol-convert`: the authors' released checkpoints (BK-Lee/TroL-1.8B, -3.8B, -7B) as TroL folders that load with
`trust_remote_code=True` in current transformers. See README "Converting the released models"."""

from .common import ConversionError, load_shared_gate
from .convert import ARCHES, convert, detect

__all__ = ["ARCHES", "ConversionError", "convert", "detect", "load_shared_gate"]
