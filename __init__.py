"""TroL (Traversal of Layers) for Hugging Face Transformers. The model files at the repository root are the remote
code a hub model repo carries; this package re-exports them as `trol`."""

__version__ = "0.1.0"

if __package__:  # False only when a tool (pytest) imports this file as a loose module from a checkout folder
    from .configuration_trol import TrolConfig
    from .modeling_trol import TrolForConditionalGeneration, TrolModel, TrolPreTrainedModel

__all__ = ["TrolConfig", "TrolForConditionalGeneration", "TrolModel", "TrolPreTrainedModel", "__version__"]
