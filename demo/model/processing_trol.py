"""TroL processor: image processor + tokenizer + chat template, as `pipeline("image-text-to-text")` and TRL expect.

One call (`TrolProcessor.__call__`, also reached through `apply_chat_template(..., tokenize=True)`):
1. Every image (PIL image, numpy array, torch tensor, file path or URL) becomes an 8-bit RGB PIL image
   (`load_rgb_image`), as the original code fed every image (it used PIL's `convert("RGB")`). Unlike that call,
   16-bit and float images are scaled to 0-255 rather than clipped, and transparent pixels become white rather than
   whatever colour they hide; files are turned upright from their EXIF orientation, as transformers' `load_image`.
2. The image processor makes `pixel_values` (n_images or n_tiles_total, 3, S, S), in prompt order.
3. Each placeholder `image_token` ("<image>") of the text becomes
   `image_start_token + image_context_token * (num_image_tokens * tiles) + image_end_token`, tiles = 1 for
   CLIP/SigLIP-style processors and `num_patches[i]` for tiling ones. `TrolModel._merge_image_features` scatters the
   image features, in order, into the positions of `image_token_id` (the id of `image_context_token`).
4. The text is tokenized; batches are LEFT-padded by default (generation).
   Length policy: a prompt longer than `max_length` (or than the tokenizer's `model_max_length` when truncation is
   requested) raises a ValueError instead of being truncated: a cut could split an image's tokens (the model then
   fails) or silently drop the answer being trained on.

The released checkpoints (see TROL.md section 4):
- TroL-1.8B / 7B: `TrolProcessor(trol_clip_image_processor(490), tokenizer, chat_template=TROL_INTERNLM2_TEMPLATE,
  num_image_tokens=1225)` (a 490-px CLIP ViT-L/14 without its CLS token: 35 x 35 tokens per image).
- TroL-3.8B: `TrolProcessor(trol_internvl_image_processor(), tokenizer, chat_template=TROL_PHI3_TEMPLATE,
  num_image_tokens=256, image_context_token="<IMG_CONTEXT>", image_start_token="<img>", image_end_token="</img>")`.
Their image processors (`TrolClipImageProcessor`, `TrolInternVLImageProcessor`) give the authors' pixel values bit
for bit from the same 8-bit RGB image (tests/test_image_parity.py): the uint8 torch bicubic resize of TroL-1.8B/7B,
the PIL tiling of TroL-3.8B. They save with an `AutoImageProcessor` auto_map entry and reload as themselves whether
or not torchvision is installed.
Both prompt formats put `<image>\n` where a `{"type": "image"}` block stands (at the start of the question for the
released checkpoints). `generic_chat_template(tokenizer)` gives a template for other backbones.

This file is remote code: it imports only numpy, PIL, torch and transformers.
"""

import json
import os
import re
import warnings
from typing import Any, ClassVar

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch
from transformers import IMAGE_PROCESSOR_MAPPING, AutoImageProcessor, CLIPImageProcessorPil, GotOcr2ImageProcessorPil
from transformers.image_processing_utils import BatchFeature
from transformers.image_utils import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    PILImageResampling,
    SizeDict,
    load_image,
)
from transformers.processing_utils import ImagesKwargs, ProcessorMixin, Unpack
from transformers.tokenization_utils_base import VERY_LARGE_INTEGER

TROL_SYSTEM_PROMPT = (
    "You are AI model created by Byung-Kwan Lee, Ph.D. candidate, KAIST EE, of which AI model name is TroL "
    "(Traversal of Layers). You must give helpful, detailed, and polite answers to the user's questions"
)
"""The released checkpoints' system prompt, without a final period, as they were trained."""


# ----------------------------------------------------------------------------------------------------------------
# Chat templates. Each assistant answer + its end marker sits inside {% generation %} (TRL's assistant-only loss).
# ----------------------------------------------------------------------------------------------------------------
_RENDER_CONTENT = r"""
{#- render_content(content): a string as is; content blocks in order: an image as image_text, a text as its text -#}
{%- macro render_content(content) -%}
    {%- if content is string -%}
        {{- content -}}
    {%- else -%}
        {%- for block in content -%}
            {%- if block['type'] == 'image' -%}{{- image_text -}}
            {%- elif block['type'] == 'text' -%}{{- block['text'] -}}
            {%- endif -%}
        {%- endfor -%}
    {%- endif -%}
{%- endmacro -%}"""

_RELEASED_FORMAT = _RENDER_CONTENT + r"""
{%- if messages and messages[0]['role'] == 'system' -%}
    {%- set system = render_content(messages[0]['content']) -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set system = default_system -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{{- system_start + system + turn_end + '\n' -}}
{%- for message in loop_messages -%}
    {%- if message['role'] == 'user' -%}
        {{- user_start + render_content(message['content']) + turn_end + '\n' -}}
    {%- elif message['role'] == 'assistant' -%}
        {{- assistant_start -}}
        {%- generation -%}{{- render_content(message['content']) + turn_end -}}{%- endgeneration -%}
        {{- '\n' -}}
    {%- else -%}
        {{- raise_exception('TroL templates know the roles system (first message only), user and assistant, not '
                            + message['role']) -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- assistant_start -}}{%- endif -%}
"""

_CHATML_FORMAT = _RENDER_CONTENT + r"""
{%- if bos_token is defined and bos_token -%}{{- bos_token -}}{%- endif -%}
{%- for message in messages -%}
    {%- if message['role'] == 'assistant' -%}
        {{- '<|im_start|>assistant\n' -}}
        {%- generation -%}{{- render_content(message['content']) + '<|im_end|>' -}}{%- endgeneration -%}
        {{- '\n' -}}
    {%- else -%}
        {{- '<|im_start|>' + message['role'] + '\n' + render_content(message['content']) + '<|im_end|>\n' -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}
"""

_TO_TEXT_PREAMBLE = _RENDER_CONTENT + r"""
{#- turn every message's content blocks into one string, then the tokenizer's own template follows -#}
{%- set trol_ns = namespace(messages=[]) -%}
{%- for message in messages -%}
    {%- if message['content'] is string or message['content'] is none -%}
        {%- set trol_ns.messages = trol_ns.messages + [message] -%}
    {%- else -%}
        {%- set text = render_content(message['content']) -%}
        {%- set trol_ns.messages = trol_ns.messages + [dict(message, content=text)] -%}
    {%- endif -%}
{%- endfor -%}
{%- set messages = trol_ns.messages -%}
"""


def _with_values(template: str, **values: str) -> str:
    """Prepend `{%- set name = "value" -%}` lines (JSON string literals are valid Jinja string literals)."""
    return "".join(f"{{%- set {name} = {json.dumps(value)} -%}}\n" for name, value in values.items()) + template


TROL_INTERNLM2_TEMPLATE = _with_values(
    _RELEASED_FORMAT, image_text="<image>\n", default_system=TROL_SYSTEM_PROMPT,
    system_start="<s>[UNUSED_TOKEN_146]system\n", user_start="[UNUSED_TOKEN_146]user\n",
    assistant_start="[UNUSED_TOKEN_146]assistant\n", turn_end="[UNUSED_TOKEN_145]",
)
"""TroL-1.8B / 7B: `<s>[UNUSED_TOKEN_146]system\\n{SYSTEM}[UNUSED_TOKEN_145]\\n[UNUSED_TOKEN_146]user\\n<image>\\n
{QUESTION}[UNUSED_TOKEN_145]\\n[UNUSED_TOKEN_146]assistant\\n{ANSWER}[UNUSED_TOKEN_145]\\n`."""

TROL_PHI3_TEMPLATE = _with_values(
    _RELEASED_FORMAT, image_text="<image>\n", default_system=TROL_SYSTEM_PROMPT, system_start="<s><|system|>\n",
    user_start="<|user|>\n", assistant_start="<|assistant|>\n", turn_end="<|end|>",
)
"""TroL-3.8B: `<s><|system|>\\n{SYSTEM}<|end|>\\n<|user|>\\n<image>\\n{QUESTION}<|end|>\\n<|assistant|>\\n
{ANSWER}<|end|>\\n`."""

_GENERATION_TAG = re.compile(r"{%-?\s*generation\s*-?%}")


def generic_chat_template(tokenizer, image_token: str = "<image>") -> str:
    """A chat template for a new backbone, rendering each `{"type": "image"}` block as `image_token + "\\n"`.

    If the tokenizer's own template already holds `{% generation %}` markers it is reused: a preamble first turns
    every message's content blocks into one string. Otherwise (no template, or one without markers; inserting
    markers into an arbitrary template is not reliable) a ChatML template is returned and a warning says so:
    `[bos]<|im_start|>{role}\\n{content}<|im_end|>\\n` per message, assistant content + `<|im_end|>` inside
    `{% generation %}`. `<|im_start|>`/`<|im_end|>` must then be single tokens of the tokenizer (add them as special
    tokens and resize the embeddings if they are not), or pass your own `chat_template=`.
    """
    own = getattr(tokenizer, "chat_template", None)
    own = own.get("default") if isinstance(own, dict) else own
    if own and _GENERATION_TAG.search(own):
        return _with_values(_TO_TEXT_PREAMBLE, image_text=image_token + "\n") + own
    reason = "has no chat template" if not own else "has a chat template without {% generation %} markers"
    missing = [t for t in ("<|im_start|>", "<|im_end|>") if _single_token_id(tokenizer, t) is None]
    advice = (
        f" {missing} are not single tokens of this tokenizer: add them with tokenizer.add_special_tokens("
        f"{{'additional_special_tokens': {missing}}}) and resize the model's embeddings, or pass chat_template=."
        if missing else ""
    )
    warnings.warn(
        f"The tokenizer {reason} (TRL's assistant-only loss needs the markers); using a ChatML template with "
        f"generation markers instead.{advice}",
        UserWarning,
        stacklevel=2,
    )
    return _with_values(_CHATML_FORMAT, image_text=image_token + "\n")


# ----------------------------------------------------------------------------------------------------------------
# Image processors of the released checkpoints, and image loading.
# ----------------------------------------------------------------------------------------------------------------
TORCH_BICUBIC_UINT8 = "torch_bicubic_uint8"
PIL_RESIZE = "pil"
RESIZE_METHODS = (TORCH_BICUBIC_UINT8, PIL_RESIZE)


def torch_bicubic_uint8_resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """(C, H, W) uint8 -> (C, height, width) uint8 with `F.interpolate(uint8, mode="bicubic")` on the CPU.

    This is the original TroL-1.8B/7B resize (demo.py and test.py call it on `pil_to_tensor(image)`), which has its
    own uint8 kernel: Keys cubic a=-0.75, half-pixel centres, border taps folded onto the edge pixels, int16
    fixed-point weights and a rounded, clamped uint8 result after each axis (width first). Neither PIL's bicubic
    (a=-0.5, antialiased) nor a float interpolate + round reproduce it: on noise they differ by tens of grey levels.
    """
    tensor = torch.from_numpy(np.ascontiguousarray(image)).unsqueeze(0)
    resized = torch.nn.functional.interpolate(tensor, size=(height, width), mode="bicubic", align_corners=False,
                                              antialias=False)
    return resized[0].numpy()


class TrolClipImageProcessorKwargs(ImagesKwargs, total=False):
    r"""
    resize_method (`str`, *optional*, defaults to `"torch_bicubic_uint8"`):
        `"torch_bicubic_uint8"`: the original TroL-1.8B/7B preprocessing, bit for bit: `F.interpolate` of the uint8
        image (bicubic, align_corners=False, no antialiasing; `resample` is ignored), then (x - mean / rescale_factor)
        / (std / rescale_factor) in float32, i.e. (x - 255 * mean) / (255 * std). `"pil"`: the transformers
        `CLIPImageProcessorPil` pipeline, PIL resize with `resample` (use it for models trained with it).
    """

    resize_method: str


class TrolClipImageProcessor(CLIPImageProcessorPil):
    r"""TroL-1.8B/7B image processor: every image resized to exactly `size` (no crop), CLIP mean/std.

    A CLIP image processor (PIL backend) whose resize is chosen by `resize_method` (see
    `TrolClipImageProcessorKwargs`); the default reproduces the released checkpoints' preprocessing exactly. Saved
    with an `AutoImageProcessor` auto_map entry, it reloads as this class whether or not torchvision is installed
    (a plain CLIP processor would reload with the torchvision backend when it is, and other numerics).
    Gives `pixel_values` (n_images, 3, H, W) float32.
    """

    valid_kwargs = TrolClipImageProcessorKwargs
    resize_method = TORCH_BICUBIC_UINT8
    size: ClassVar[dict[str, int]] = {"height": 490, "width": 490}
    do_center_crop = False
    crop_size = None

    def __init__(self, **kwargs: Unpack[TrolClipImageProcessorKwargs]):
        super().__init__(**kwargs)
        _check_resize_method(self.resize_method)

    def _preprocess(self, images: list[np.ndarray], resize_method: str | None = None, **kwargs) -> BatchFeature:
        resize_method = resize_method or self.resize_method
        _check_resize_method(resize_method)
        if resize_method == PIL_RESIZE:
            return super()._preprocess(images, **kwargs)
        return self._preprocess_like_the_original(images, **kwargs)

    def _preprocess_like_the_original(
        self, images: list[np.ndarray], do_resize: bool, size: SizeDict, do_center_crop: bool, crop_size: SizeDict,
        do_rescale: bool, rescale_factor: float, do_normalize: bool, image_mean, image_std, do_pad: bool | None,
        pad_size: SizeDict | None, return_tensors, **kwargs,
    ) -> BatchFeature:
        processed = []
        for image in images:  # (C, H, W) numpy arrays
            if image.dtype != np.uint8:
                raise ValueError(
                    f"resize_method={TORCH_BICUBIC_UINT8!r} resizes 8-bit images, as the original code did, but got "
                    f"{image.dtype} pixels. Pass PIL images or uint8 arrays (TrolProcessor turns any image into 8-bit "
                    f"RGB), or use resize_method={PIL_RESIZE!r}."
                )
            if do_resize:
                image = torch_bicubic_uint8_resize(image, size.height, size.width)
            if do_center_crop:
                image = self.center_crop(image, crop_size)
            pixels = torch.from_numpy(np.ascontiguousarray(image)).float()
            scale = 1.0 / rescale_factor if do_rescale else 1.0
            if do_normalize:  # the original: (x - mean * 255) / (std * 255), float32 throughout
                mean = torch.tensor(image_mean, dtype=torch.float32).view(-1, 1, 1) * scale
                std = torch.tensor(image_std, dtype=torch.float32).view(-1, 1, 1) * scale
                pixels = (pixels - mean) / std
            elif do_rescale:
                pixels = pixels * rescale_factor
            processed.append(pixels.numpy())
        if do_pad:
            processed = self.pad(processed, pad_size=pad_size)
        return BatchFeature(data={"pixel_values": processed}, tensor_type=return_tensors)


def _check_resize_method(resize_method: str) -> None:
    if resize_method not in RESIZE_METHODS:
        raise ValueError(f"resize_method={resize_method!r} is not one of {RESIZE_METHODS}: {TORCH_BICUBIC_UINT8!r} "
                         f"reproduces the released TroL-1.8B/7B preprocessing, {PIL_RESIZE!r} resizes with PIL.")


class TrolInternVLImageProcessor(GotOcr2ImageProcessorPil):
    r"""TroL-3.8B image processor (InternVL-1.5 dynamic tiling, PIL backend), the original `dynamic_preprocess` +
    `build_transform(448)` of the authors' utils/utils.py, bit for bit: 1..max_patches tiles of `size` on the grid
    closest to the image's aspect ratio (ties go to the larger grid while the image covers more than half of it),
    cut row-major from one PIL bicubic resize of the whole image, plus a PIL bicubic thumbnail of the whole image when
    there is more than one tile; x / 255, ImageNet mean/std. Gives `pixel_values` (n_tiles_total, 3, H, W) and
    `num_patches` (tiles per image).

    The numerics are transformers' `GotOcr2ImageProcessorPil`; this class pins them: saved with an
    `AutoImageProcessor` auto_map entry, it reloads as itself whether or not torchvision is installed (a plain
    GotOcr2 processor reloads with the torchvision backend when it is, whose antialiased tensor resize differs from
    PIL's by up to 2 grey levels).
    """

    size: ClassVar[dict[str, int]] = {"height": 448, "width": 448}
    crop_to_patches = True
    min_patches = 1
    max_patches = 6
    image_mean = IMAGENET_DEFAULT_MEAN
    image_std = IMAGENET_DEFAULT_STD


for _image_processor_class in (TrolClipImageProcessor, TrolInternVLImageProcessor):
    _image_processor_class.register_for_auto_class("AutoImageProcessor")  # save_pretrained writes the auto_map
    # Registered by name (the key maps no config), so that AutoImageProcessor / TrolProcessor.from_pretrained find
    # the saved `image_processor_type` wherever this module is imported, without trust_remote_code. Both backends
    # name the same class: its numerics must not depend on whether torchvision is installed. The first import wins:
    # a copy of this file loaded later (a hub folder's, with trust_remote_code) does not replace the local class.
    _key = f"trol:{_image_processor_class.__name__}"
    if _key not in IMAGE_PROCESSOR_MAPPING:
        AutoImageProcessor.register(
            _key, image_processor_classes={"pil": _image_processor_class, "torchvision": _image_processor_class},
        )


def trol_clip_image_processor(size: int = 490, resize_method: str = TORCH_BICUBIC_UINT8) -> TrolClipImageProcessor:
    """TroL-1.8B/7B preprocessing: resize of the 8-bit image to exactly size x size (no crop), then
    (x - 255 * mean) / (255 * std) with the CLIP mean/std.

    `resize_method="torch_bicubic_uint8"` (default) is the released checkpoints' preprocessing, bit for bit (their
    demo.py / test.py resize `pil_to_tensor(image)` with `F.interpolate(mode="bicubic")` and normalise in float32).
    `resize_method="pil"` resizes with PIL's bicubic instead (antialiased, a=-0.5), the transformers CLIP pipeline:
    keep it for models trained with it; on downscaled photos it differs from the original by a few grey levels
    (tens on noise)."""
    _check_resize_method(resize_method)
    return TrolClipImageProcessor(
        do_resize=True, size={"height": size, "width": size}, resample=PILImageResampling.BICUBIC,
        do_center_crop=False, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
        image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD, do_convert_rgb=True, resize_method=resize_method,
    )


def trol_internvl_image_processor(tile_size: int = 448, max_tiles: int = 6) -> TrolInternVLImageProcessor:
    """TroL-3.8B preprocessing (InternVL-1.5 dynamic tiling, see `TrolInternVLImageProcessor`): 1..max_tiles tiles
    of tile_size px plus a thumbnail when there is more than one tile; bicubic (PIL), ImageNet mean/std. Gives
    `num_patches` (tiles per image)."""
    return TrolInternVLImageProcessor(
        size={"height": tile_size, "width": tile_size}, crop_to_patches=True, min_patches=1, max_patches=max_tiles,
        resample=PILImageResampling.BICUBIC, image_mean=IMAGENET_DEFAULT_MEAN, image_std=IMAGENET_DEFAULT_STD,
    )


def _to_uint8(array: np.ndarray, what: str) -> np.ndarray:
    """uint8 as is; bool -> 0/255; uint16 (16-bit) scaled by 255/65535; other integers must lie in 0..255;
    floats are 0..1 if their max is <= 1, else 0..255. Negative floats look normalised already and are refused."""
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if array.dtype == np.uint16:
        return np.round(array / 257.0).astype(np.uint8)
    low, high = (array.min(), array.max()) if array.size else (0, 0)
    if np.issubdtype(array.dtype, np.integer):
        if low < 0 or high > 255:
            raise ValueError(f"{what} has {array.dtype} values in [{low}, {high}]; integer images must lie in 0..255 "
                             "(or be uint16 for 16-bit images).")
        return array.astype(np.uint8)
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"{what} has dtype {array.dtype}; give uint8, uint16, integer, bool or float pixels.")
    if low < 0:
        raise ValueError(f"{what} has negative values (min {low:.3f}): it looks normalised already. Pass the raw "
                         "image (0..1 floats, 0..255 values or uint8); the processor normalises it.")
    scale = 255.0 if high <= 1.0 else 1.0
    return np.round(np.clip(array.astype(np.float64) * scale, 0, 255)).astype(np.uint8)


def _array_to_pil(array: np.ndarray, channels_first: bool, what: str) -> PIL.Image.Image:
    """(H, W), (H, W, C) or (C, H, W) with C in 1, 3, 4; `channels_first` settles shapes that read both ways."""
    first, last = array.ndim == 3 and array.shape[0] in (1, 3, 4), array.ndim == 3 and array.shape[-1] in (1, 3, 4)
    if array.ndim not in (2, 3) or (array.ndim == 3 and not (first or last)):
        raise ValueError(f"{what} has shape {tuple(array.shape)}: expected (H, W), (H, W, C) or (C, H, W) with "
                         "C in 1, 3, 4.")
    if first and (channels_first or not last):
        array = array.transpose(1, 2, 0)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    return PIL.Image.fromarray(np.ascontiguousarray(_to_uint8(array, what)))


def _pil_to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I") or mode == "F":  # 16/32-bit integer or float grayscale: scale to 8 bits first
        array = np.asarray(image)
        array = np.clip(array, 0, 65535).astype(np.uint16) if mode.startswith("I") else array
        return _pil_to_rgb(_array_to_pil(array, channels_first=False, what=f"The {mode} image"))
    if "A" in mode or "a" in mode or "transparency" in image.info:  # composite transparent pixels onto white
        rgba = image.convert("RGBA")
        return PIL.Image.alpha_composite(PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")  # L, 1, P, CMYK, YCbCr, HSV


def load_rgb_image(image: Any) -> PIL.Image.Image:
    """PIL image, numpy array ((H, W), (H, W, C) or (C, H, W)), torch tensor ((C, H, W) or (H, W, C)), file path or
    URL -> 8-bit RGB PIL image. Unreadable files raise a ValueError that names the file."""
    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        if path.startswith(("http://", "https://", "data:image/")):
            try:
                return _pil_to_rgb(load_image(path))
            except (OSError, ValueError) as error:
                raise ValueError(f"Could not load the image at {path!r}: {error}") from error
        if not os.path.isfile(path):
            raise ValueError(f"Image file {path!r} does not exist (resolved to {os.path.abspath(path)!r}).")
        try:
            with PIL.Image.open(path) as opened:
                opened.load()  # decode now: truncated or corrupt files fail here, not deep inside preprocessing
                return _pil_to_rgb(PIL.ImageOps.exif_transpose(opened))  # upright, as transformers' load_image
        except (OSError, SyntaxError, ValueError, EOFError, PIL.Image.DecompressionBombError) as error:
            raise ValueError(f"Image file {path!r} is not a readable image ({type(error).__name__}: {error}). It may "
                             "be truncated or corrupt: re-download or re-encode it, or drop this sample.") from error
    if isinstance(image, PIL.Image.Image):
        return _pil_to_rgb(image)
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu()
        array = (image.float() if image.is_floating_point() else image).numpy()
        return _pil_to_rgb(_array_to_pil(array, channels_first=True, what="The image tensor"))
    if isinstance(image, np.ndarray):
        return _pil_to_rgb(_array_to_pil(image, channels_first=False, what="The image array"))
    raise TypeError(f"Cannot use an object of type {type(image).__name__} as an image; give a PIL image, numpy "
                    "array, torch tensor, file path or URL.")


def _load_nested(images: Any) -> Any:
    """`load_rgb_image` through (nested) lists; a 4-D array/tensor is a batch of images."""
    if isinstance(images, (list, tuple)):
        return [_load_nested(item) for item in images]
    if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:
        return [load_rgb_image(item) for item in images]
    return load_rgb_image(images)


def _count_images(images: Any) -> int:
    return sum(_count_images(item) for item in images) if isinstance(images, list) else 1


def _single_token_id(tokenizer, token: str) -> int | None:
    ids = tokenizer.encode(token, add_special_tokens=False)
    return ids[0] if len(ids) == 1 and ids[0] != tokenizer.unk_token_id else None


def _rows(values) -> list[list[int]]:
    return values.tolist() if hasattr(values, "tolist") else [list(row) for row in values]


# ----------------------------------------------------------------------------------------------------------------
# The processor.
# ----------------------------------------------------------------------------------------------------------------
class TrolProcessor(ProcessorMixin):
    r"""Image processor + tokenizer + chat template of a TroL model.

    Args:
        image_processor: a transformers image processor. Fixed-size ones (CLIP, SigLIP: `trol_clip_image_processor`)
            give one `pixel_values` entry per image; tiling ones (`trol_internvl_image_processor`) give
            `num_patches[i]` tiles for image i.
        tokenizer: the decoder's tokenizer; `image_context_token` (and the start/end tokens) must be single tokens.
        chat_template: Jinja template; default `generic_chat_template(tokenizer, image_token)`.
        image_token: placeholder string that marks an image in the text (what the chat template writes).
        num_image_tokens: image tokens per image (fixed-size processors) or per tile (tiling processors); must equal
            the number of features `TrolModel.get_image_features` gives per `pixel_values` entry
            (`TrolConfig.image_seq_length`; 1225 for TroL-1.8B/7B, 256 for TroL-3.8B).
        image_context_token: token repeated in place of each image; default `image_token` itself. Its id is
            `image_token_id`, which must equal the model's `config.image_token_id`.
        image_start_token / image_end_token: strings written around each image's tokens (TroL-3.8B: `<img>`,
            `</img>`), None for none.
        padding_side: padding side used unless a call gives `padding_side=` ("left": generation-ready batches).

    A call never truncates: a prompt longer than `max_length` (or than `tokenizer.model_max_length` when truncation
    is asked) raises a ValueError naming the lengths (see the module docstring).
    """

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        chat_template: str | None = None,
        image_token: str = "<image>",
        num_image_tokens: int = 576,
        image_context_token: str | None = None,
        image_start_token: str | None = None,
        image_end_token: str | None = None,
        padding_side: str = "left",
        **kwargs,
    ):
        if image_processor is None or tokenizer is None:
            raise ValueError("TrolProcessor needs both an image_processor and a tokenizer.")
        if int(num_image_tokens) < 1:
            raise ValueError(f"num_image_tokens={num_image_tokens} must be >= 1 (image tokens per image or tile).")
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side={padding_side!r} must be 'left' or 'right'.")
        if chat_template is None:
            chat_template = generic_chat_template(tokenizer, image_token)
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)
        self.image_token = image_token
        self.num_image_tokens = int(num_image_tokens)
        self.image_context_token = image_context_token
        self.image_start_token = image_start_token
        self.image_end_token = image_end_token
        self.padding_side = padding_side
        # Pipelines pad batches of separately processed prompts with the tokenizer's own side: make it agree.
        self.tokenizer.padding_side = padding_side
        context_name = "image_context_token" if image_context_token else "image_token"
        self.image_token_id = self._token_id(self.context_token, context_name)
        extra = [(image_start_token, "image_start_token"), (image_end_token, "image_end_token")]
        self.image_token_ids = [self.image_token_id] + [self._token_id(t, n) for t, n in extra if t is not None]

    @property
    def context_token(self) -> str:
        """The token written num_image_tokens x tiles times per image."""
        return self.image_context_token or self.image_token

    def _token_id(self, token: str, name: str) -> int:
        token_id = _single_token_id(self.tokenizer, token)
        if token_id is None:
            raise ValueError(
                f"{name}={token!r} is not a single token of the tokenizer (it encodes to "
                f"{self.tokenizer.encode(token, add_special_tokens=False)}). Add it with "
                f"tokenizer.add_special_tokens({{'additional_special_tokens': [{token!r}]}}) and resize the model's "
                "embeddings (TrolForConditionalGeneration.from_vision_and_text does this for '<image>')."
            )
        return token_id

    @property
    def unused_input_names(self) -> list[str]:
        return ["num_patches"]  # consumed here to count tiles; the model does not take it

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        """Text that replaces the `image_idx`-th placeholder (over the whole batch)."""
        tiles = int(image_inputs["num_patches"][image_idx]) if "num_patches" in image_inputs else 1
        body = self.context_token * (self.num_image_tokens * tiles)
        return f"{self.image_start_token or ''}{body}{self.image_end_token or ''}"

    def prepare_inputs_layout(self, images=None, text=None, videos=None, audio=None, **kwargs):
        if images is not None:
            images = _load_nested(images)
        return super().prepare_inputs_layout(images=images, text=text, videos=videos, audio=audio, **kwargs)

    def validate_inputs(self, images=None, text=None, videos=None, audio=None, **kwargs):
        if videos is not None or audio is not None:
            raise ValueError("TrolProcessor handles images and text only; got videos or audio.")
        if text is None:
            if images is None:
                raise ValueError("Give text (a prompt or a list of prompts), and images for its placeholders.")
            return
        text = [text] if isinstance(text, str) else text
        if not isinstance(text, list) or not text or not all(isinstance(sample, str) for sample in text):
            raise ValueError(f"text must be a non-empty string or list of strings, got {type(text).__name__} "
                             f"{text!r:.80}.")
        for index, sample in enumerate(text):
            if not sample.strip():
                raise ValueError(f"Prompt {index} of the batch is empty; every prompt needs some text.")
        counts = [sample.count(self.image_token) for sample in text]
        how = (
            f"Each image needs exactly one {self.image_token!r} in the text, where the image goes (the chat template "
            "writes one per {'type': 'image'} block): add or remove placeholders, or pass one image per placeholder."
        )
        if isinstance(images, list) and len(images) == len(text) and all(isinstance(i, list) for i in images):
            for index, (count, given) in enumerate(zip(counts, images)):
                if count != len(given):
                    raise ValueError(f"Prompt {index} holds {count} image placeholder(s) but {len(given)} image(s) "
                                     f"were given for it. {how}")
        n_images = 0 if images is None else _count_images(images)
        if sum(counts) != n_images:
            raise ValueError(f"The text holds {sum(counts)} image placeholder(s) {self.image_token!r} but "
                             f"{n_images} image(s) were given. {how}")

    def __call__(self, images=None, text=None, videos=None, audio=None, **kwargs):
        """Returns a BatchFeature with input_ids, attention_mask (B, T) and, with images, pixel_values
        (n_images or n_tiles_total, 3, S, S). Keyword arguments go to the tokenizer / image processor."""
        text_kwargs = dict(kwargs.pop("text_kwargs", None) or {})
        target = text_kwargs if "truncation" in text_kwargs else kwargs
        truncation = target.get("truncation")
        target["truncation"] = False  # never truncate (see the module docstring); the length is checked below
        max_length = text_kwargs.get("max_length", kwargs.get("max_length"))
        if text_kwargs.get("padding", kwargs.get("padding")) != "max_length":  # max_length then only bounds the length
            text_kwargs.pop("max_length", None)
            kwargs.pop("max_length", None)
        if "padding_side" not in kwargs and "padding_side" not in text_kwargs:
            kwargs["padding_side"] = self.padding_side
        bos = self.tokenizer.bos_token
        samples = [text] if isinstance(text, str) else text
        if bos and samples and "add_special_tokens" not in kwargs and "add_special_tokens" not in text_kwargs \
                and all(isinstance(s, str) and s.startswith(bos) for s in samples):
            kwargs["add_special_tokens"] = False  # a rendered chat template already starts with BOS
        if text_kwargs:
            kwargs["text_kwargs"] = text_kwargs
        outputs = super().__call__(images=images, text=text, videos=videos, audio=audio, **kwargs)
        if text is not None:
            self._check_length(outputs, truncation, max_length)
        return outputs

    def _check_length(self, outputs, truncation, max_length: int | None) -> None:
        if max_length is not None:
            limit, source = max_length, "max_length"
        elif truncation not in (None, False, "do_not_truncate") and \
                self.tokenizer.model_max_length < VERY_LARGE_INTEGER:
            limit, source = self.tokenizer.model_max_length, "the tokenizer's model_max_length (truncation was asked)"
        else:
            return
        ids = _rows(outputs["input_ids"])
        masks = _rows(outputs["attention_mask"]) if "attention_mask" in outputs else [[1] * len(row) for row in ids]
        for index, (row, mask) in enumerate(zip(ids, masks)):
            length = sum(mask)
            if length > limit:
                n_image = sum(1 for token, keep in zip(row, mask) if keep and token in self.image_token_ids)
                raise ValueError(
                    f"Prompt {index} is {length} tokens long ({n_image} of them image tokens), more than "
                    f"{source}={limit}. TrolProcessor does not truncate: a cut could split an image's tokens or drop "
                    "the answer. Shorten the text, use fewer or smaller images (fewer tiles), or raise max_length."
                )

    def _check_special_mm_tokens(self, text: list[str], text_inputs, modalities: list[str]) -> None:
        expected = [sample.count(self.context_token) for sample in text]
        found = [row.count(self.image_token_id) for row in _rows(text_inputs["input_ids"])]
        if expected != found:
            raise ValueError(
                f"The tokenized prompts hold {found} image tokens (id {self.image_token_id}) where the expanded text "
                f"holds {expected} {self.context_token!r}: the tokenizer splits or merges the image token."
            )


TrolProcessor.register_for_auto_class("AutoProcessor")

__all__ = [
    "TROL_INTERNLM2_TEMPLATE",
    "TROL_PHI3_TEMPLATE",
    "TROL_SYSTEM_PROMPT",
    "TrolClipImageProcessor",
    "TrolInternVLImageProcessor",
    "TrolProcessor",
    "generic_chat_template",
    "load_rgb_image",
    "torch_bicubic_uint8_resize",
    "trol_clip_image_processor",
    "trol_internvl_image_processor",
]
