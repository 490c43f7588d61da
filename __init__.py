"""TroL (Traversal of Layers) for Hugging Face Transformers. The model files at the repository root are the remote
code a hub model repo carries; this package re-exports them as `trol`."""

from .configuration_trol import TrolConfig
from .modeling_trol import TrolForConditionalGeneration, TrolModel, TrolPreTrainedModel

__version__ = "0.1.0"

__all__ = ["TrolConfig", "TrolForConditionalGeneration", "TrolModel", "TrolPreTrainedModel", "__version__"]
