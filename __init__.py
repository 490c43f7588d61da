"""TroL (Traversal of Layers) for Hugging Face Transformers. The model files at the repository root are the remote
code a hub model repo carries; this package re-exports them as `trol`."""

__version__ = "0.1.0"

if __package__:  # False only when a tool (pytest) imports this file as a loose module from a checkout folder
    from .configuration_trol import TrolConfig
    from .modeling_trol import TrolForConditionalGeneration, TrolModel, TrolPreTrainedModel
    from .processing_trol import (
        TROL_INTERNLM2_TEMPLATE,
        TROL_PHI3_TEMPLATE,
        TROL_SYSTEM_PROMPT,
        TrolClipImageProcessor,
        TrolInternVLImageProcessor,
        TrolProcessor,
        generic_chat_template,
        load_rgb_image,
        trol_clip_image_processor,
        trol_internvl_image_processor,
    )

__all__ = [
    "TROL_INTERNLM2_TEMPLATE",
    "TROL_PHI3_TEMPLATE",
    "TROL_SYSTEM_PROMPT",
    "TrolClipImageProcessor",
    "TrolConfig",
    "TrolForConditionalGeneration",
    "TrolInternVLImageProcessor",
    "TrolModel",
    "TrolPreTrainedModel",
    "TrolProcessor",
    "__version__",
    "generic_chat_template",
    "load_rgb_image",
    "trol_clip_image_processor",
    "trol_internvl_image_processor",
]
