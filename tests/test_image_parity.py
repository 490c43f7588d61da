"""Pixel parity of the released checkpoints' preprocessing with the authors' code (github ByungKwanLee/TroL), on images
made in the test (noise, smooth gradients, odd sizes, non-RGB modes), and the clean-process remote-code reload.

The references are written from the original code, not from this repository's:
- TroL-1.8B/7B (demo.py, test.py, trol/arch_internlm2/modeling_trol.py `image_processor`):
  `F.interpolate(pil_to_tensor(Image.open(p).convert("RGB")).unsqueeze(0), size=(490, 490), mode="bicubic")` on the
  uint8 tensor, then `(x - 255 * mean) / (255 * std)` in float32 with the CLIP mean/std. torch's uint8 bicubic kernel
  is also written out in numpy below, so that a change of that kernel in a future torch fails here.
- TroL-3.8B (utils/utils.py `dynamic_preprocess` + `build_transform(448)`, called from trol/arch_phi3/modeling_trol.py
  `eval_process` on `to_pil_image(pil_to_tensor(...))`): tiles on the closest aspect-ratio grid (1..6 tiles) cut
  row-major from one PIL `resize` (default filter: bicubic) of the whole image, a PIL thumbnail of the whole image
  when there is more than one tile, `T.Resize((448, 448), BICUBIC)` (a no-op on 448-px tiles), `ToTensor` (x / 255 in
  float32), `Normalize` with the ImageNet mean/std.
"""

import json
import math

import numpy as np
import PIL.Image
import pytest
import torch
from test_loading import run_clean_process
from test_processor import _internvl_grid as original_grid  # utils.py find_closest_aspect_ratio
from tiny import char_tokenizer
from transformers import AutoImageProcessor, CLIPImageProcessorPil
from transformers.image_utils import PILImageResampling
from trol.processing_trol import (
    TROL_INTERNLM2_TEMPLATE,
    TROL_PHI3_TEMPLATE,
    TrolClipImageProcessor,
    TrolInternVLImageProcessor,
    TrolProcessor,
    trol_clip_image_processor,
    trol_internvl_image_processor,
)

CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def noise(width: int, height: int, seed: int = 0) -> PIL.Image.Image:
    return PIL.Image.fromarray(np.random.RandomState(seed).randint(0, 256, (height, width, 3), dtype=np.uint8))


def gradient(width: int, height: int, seed: int = 0) -> PIL.Image.Image:
    """Smooth ramps plus a gentle wave: what photos mostly are."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    channels = [255 * x / max(width - 1, 1), 255 * y / max(height - 1, 1),
                127.5 + 127.5 * np.sin(x / (7.0 + seed) + y / 11.0)]
    return PIL.Image.fromarray(np.round(np.stack(channels, -1)).astype(np.uint8))


MAKERS = {"noise": noise, "gradient": gradient}


def clip_processor(**kwargs) -> TrolProcessor:
    return TrolProcessor(trol_clip_image_processor(490, **kwargs), char_tokenizer(),
                         chat_template=TROL_INTERNLM2_TEMPLATE, num_image_tokens=4)


def tiling_processor() -> TrolProcessor:
    return TrolProcessor(trol_internvl_image_processor(448, 6), char_tokenizer(), chat_template=TROL_PHI3_TEMPLATE,
                         num_image_tokens=2, image_context_token="<IMG_CONTEXT>", image_start_token="<img>",
                         image_end_token="</img>")


def pixels_of(processor: TrolProcessor, image) -> torch.Tensor:
    return processor(images=image, text="<image>", return_tensors="pt")["pixel_values"]


# ----------------------------------------------------------------------------------------------------------------
# The original code, as the authors ran it (torchvision's pil_to_tensor is a permuted view of the HWC array)
# ----------------------------------------------------------------------------------------------------------------
def pil_to_tensor(image: PIL.Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image, copy=True)).permute(2, 0, 1)


def original_clip_pixels(image: PIL.Image.Image, size: int = 490) -> torch.Tensor:
    """demo.py + TroLForCausalLM.image_processor (TroL-1.8B/7B). (1, 3, size, size) float32."""
    tensor = pil_to_tensor(image.convert("RGB"))
    tensor = torch.nn.functional.interpolate(tensor.unsqueeze(0), size=(size, size), mode="bicubic").squeeze(0)
    mean = torch.tensor(CLIP_MEAN).view(1, -1, 1, 1) * 255
    std = torch.tensor(CLIP_STD).view(1, -1, 1, 1) * 255
    return (torch.stack([tensor]) - mean) / std


def original_internvl_pixels(image: PIL.Image.Image, image_size: int = 448, max_num: int = 6) -> torch.Tensor:
    """utils.py dynamic_preprocess + build_transform (TroL-3.8B). (tiles, 3, image_size, image_size) float32."""
    image = image.convert("RGB")
    columns, rows = original_grid(*image.size, max_num, image_size)
    resized = image.resize((image_size * columns, image_size * rows))  # PIL's default filter for RGB: bicubic
    tiles = [resized.crop(((i % columns) * image_size, (i // columns) * image_size,
                           (i % columns + 1) * image_size, (i // columns + 1) * image_size))
             for i in range(columns * rows)]
    if len(tiles) != 1:
        tiles.append(image.resize((image_size, image_size)))
    mean, std = torch.tensor(IMAGENET_MEAN).view(-1, 1, 1), torch.tensor(IMAGENET_STD).view(-1, 1, 1)
    return torch.stack([(pil_to_tensor(tile).float().div(255) - mean) / std for tile in tiles])  # ToTensor, Normalize


# ----------------------------------------------------------------------------------------------------------------
# torch's CPU uint8 bicubic kernel written out (aten/src/ATen/native/cpu/UpSampleKernel.cpp:
# HelperInterpBase::_compute_indices_min_size_weights, _compute_index_ranges_int16_weights, upsample_separable_Nd)
# ----------------------------------------------------------------------------------------------------------------
def _keys_cubic(x: float, a: float = -0.75) -> float:
    x = abs(x)
    if x < 1.0:
        return ((a + 2) * x - (a + 3)) * x * x + 1
    if x < 2.0:
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return 0.0


def _int16_weights(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Per output index: the 4 input indices, their int16 weights (0 past the border) and the fixed-point shift."""
    scale = n_in / n_out
    starts, weights, w_max = [], [], 0.0
    for i in range(n_out):
        source = scale * (i + 0.5) - 0.5  # half-pixel centres (align_corners=False)
        index = min(math.floor(np.float32(source)), n_in - 1)  # torch floors in float32
        lam = min(max(source - index, 0.0), 1.0)
        start = max(index - 1, 0)
        size = min(min(index + 3, n_in) - start, 4)
        row, k = [0.0] * 4, 0
        for j in range(4):  # taps index-1 .. index+2; the ones outside the image fold onto the edge pixel
            if index - 1 + j <= 0:
                k = 0
            elif index - 1 + j >= n_in - 1:
                k = size - 1
            row[k] += _keys_cubic(j - 1 - lam)
            w_max = max(w_max, row[k])
            k += 1
        starts.append(start)
        weights.append(row[:size] + [0.0] * (4 - size))
    precision = 0
    while precision < 22 and int(0.5 + w_max * (1 << (precision + 1))) < (1 << 15):
        precision += 1
    scaled = np.array(weights) * (1 << precision)
    int_weights = np.where(scaled < 0, np.trunc(scaled - 0.5), np.trunc(scaled + 0.5)).astype(np.int64)
    indices = np.minimum(np.array(starts)[:, None] + np.arange(4), n_in - 1)
    return indices, int_weights, precision


def _resample_last_axis(x: np.ndarray, n_out: int) -> np.ndarray:
    if x.shape[-1] == n_out:
        return x
    indices, weights, precision = _int16_weights(x.shape[-1], n_out)
    total = (x[..., indices] * weights).sum(-1) + (1 << (precision - 1))
    return np.clip(total >> precision, 0, 255)  # rounded and clamped to uint8 after each axis


def numpy_bicubic_uint8(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """(C, H, W) uint8 -> (C, height, width) uint8: width first, then height."""
    wide = _resample_last_axis(image.astype(np.int64), width)
    return _resample_last_axis(wide.swapaxes(-1, -2), height).swapaxes(-1, -2).astype(np.uint8)


SIZES = [(640, 480), (300, 500), (97, 61), (1500, 40), (491, 489), (490, 490), (1, 1), (3, 2)]


@pytest.mark.parametrize("height,width", [(480, 640), (37, 61), (1200, 17), (2, 3), (1, 1), (491, 489)])
def test_torch_uint8_bicubic_is_the_written_out_kernel(height, width):
    image = np.random.RandomState(height).randint(0, 256, (3, height, width), dtype=np.uint8)
    for out in [(490, 490), (448, 448), (23, 17)]:
        resized = torch.nn.functional.interpolate(torch.from_numpy(image)[None], size=out, mode="bicubic")[0]
        np.testing.assert_array_equal(resized.numpy(), numpy_bicubic_uint8(image, *out), err_msg=str(out))


# ----------------------------------------------------------------------------------------------------------------
# TroL-1.8B / 7B
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", MAKERS)
@pytest.mark.parametrize("width,height", SIZES)
def test_clip_processor_gives_the_original_pixels_exactly(kind, width, height):
    image = MAKERS[kind](width, height, seed=width)
    pixels = pixels_of(clip_processor(), image)
    torch.testing.assert_close(pixels, original_clip_pixels(image), rtol=0, atol=0)  # bit for bit
    resized = numpy_bicubic_uint8(np.asarray(image).transpose(2, 0, 1), 490, 490).astype(np.float64)
    expected = (resized - 255 * np.array(CLIP_MEAN)[:, None, None]) / (255 * np.array(CLIP_STD)[:, None, None])
    np.testing.assert_allclose(pixels[0].numpy(), expected, rtol=0, atol=1e-5)


def test_pil_resize_option_is_the_plain_transformers_clip_pipeline():
    image = noise(640, 480)
    ours = trol_clip_image_processor(490, resize_method="pil")(image, return_tensors="pt")["pixel_values"]
    plain = CLIPImageProcessorPil(size={"height": 490, "width": 490}, do_center_crop=False,
                                  resample=PILImageResampling.BICUBIC)(image, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(ours, plain, rtol=0, atol=0)
    assert (ours - original_clip_pixels(image)).abs().max() > 0.1  # PIL's antialiased bicubic is not the original's


def test_processor_class_defaults_are_the_released_preprocessing():
    image = gradient(300, 200)
    for default, factory in [(TrolClipImageProcessor(), trol_clip_image_processor()),
                             (TrolInternVLImageProcessor(), trol_internvl_image_processor())]:
        expected = factory(image, return_tensors="pt")["pixel_values"]
        torch.testing.assert_close(default(image, return_tensors="pt")["pixel_values"], expected, rtol=0, atol=0)


def test_unknown_resize_method_and_non_8_bit_pixels_are_refused():
    with pytest.raises(ValueError, match=r"resize_method='bilinear' is not one of .*'torch_bicubic_uint8'"):
        trol_clip_image_processor(490, resize_method="bilinear")
    with pytest.raises(ValueError, match=r"resize_method='nearest' is not one of"):
        trol_clip_image_processor(490)(noise(8, 8), resize_method="nearest")
    with pytest.raises(ValueError, match=r"resizes 8-bit images.*float32 pixels.*TrolProcessor"):
        trol_clip_image_processor(490)(np.random.rand(8, 8, 3).astype(np.float32), do_rescale=False)


# ----------------------------------------------------------------------------------------------------------------
# TroL-3.8B
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,width,height", [
    ("noise", 448, 448),      # 1x1, no thumbnail
    ("gradient", 640, 480),   # 3x2 + thumbnail
    ("gradient", 300, 1200),  # tall: 1x4 + thumbnail
    ("noise", 2688, 448),     # 6x1 + thumbnail, no resize of the tiles
    ("gradient", 97, 61),     # upscaled 3x2 + thumbnail
    ("noise", 896, 896),      # 1x1 / 2x2 tie: the larger grid
    ("gradient", 5000, 40),   # wider than any grid: 6x1
])
def test_tiling_processor_gives_the_original_tiles_and_pixels(kind, width, height):
    image = MAKERS[kind](width, height, seed=height)
    out = tiling_processor()(images=image, text="<image>", return_tensors="pt")
    expected = original_internvl_pixels(image)
    columns, rows = original_grid(width, height, 6)
    assert expected.shape[0] == columns * rows + (columns * rows > 1)
    assert out["input_ids"][0].tolist().count(tiling_processor().image_token_id) == 2 * expected.shape[0]
    torch.testing.assert_close(out["pixel_values"], expected, rtol=0, atol=1e-5)


def test_every_8_bit_level_normalises_to_the_original_float32_value():
    """With equal resizes, equal floats: both normalisations are bit-exact maps of the 256 levels."""
    image = PIL.Image.fromarray(np.tile(np.arange(256, dtype=np.uint8)[None, :, None], (1, 1, 3)))  # 1 x 256 px
    levels = pil_to_tensor(image)
    tiles = TrolInternVLImageProcessor(crop_to_patches=False, do_resize=False)(image, return_tensors="pt")
    mean, std = torch.tensor(IMAGENET_MEAN).view(-1, 1, 1), torch.tensor(IMAGENET_STD).view(-1, 1, 1)
    assert torch.equal(tiles["pixel_values"][0], (levels.float().div(255) - mean) / std)  # ToTensor + Normalize
    clip = TrolClipImageProcessor(do_resize=False)(image, return_tensors="pt")["pixel_values"]
    mean, std = torch.tensor(CLIP_MEAN).view(1, -1, 1, 1) * 255, torch.tensor(CLIP_STD).view(1, -1, 1, 1) * 255
    assert torch.equal(clip, (levels[None] - mean) / std)  # TroLForCausalLM.image_processor


# ----------------------------------------------------------------------------------------------------------------
# Image modes: every mode whose RGB conversion is PIL's own (the original called `.convert("RGB")`). Transparent
# pixels (composited onto white here) and 16-bit images (scaled here, clipped there) differ by design.
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["L", "P", "1", "CMYK", "YCbCr", "RGBA", "LA"])
def test_non_rgb_modes_give_the_original_pixels(mode):
    image = gradient(61, 59).convert(mode)  # one tile; opaque: RGBA / LA carry alpha 255 everywhere
    torch.testing.assert_close(pixels_of(clip_processor(), image), original_clip_pixels(image), rtol=0, atol=0)
    torch.testing.assert_close(pixels_of(tiling_processor(), image), original_internvl_pixels(image), rtol=0,
                               atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# Saving and loading: the same class, whichever backend is asked for, in this process and in a clean one
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make,name", [(clip_processor, "TrolClipImageProcessor"),
                                       (tiling_processor, "TrolInternVLImageProcessor")])
def test_saved_processor_reloads_as_the_same_image_processor_class_on_any_backend(make, name, tmp_path):
    processor = make()
    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "processor_config.json").read_text())["image_processor"]
    assert saved["image_processor_type"] == name
    assert saved["auto_map"]["AutoImageProcessor"] == f"processing_trol.{name}"
    image = gradient(700, 500)
    expected = pixels_of(processor, image)
    loaded = TrolProcessor.from_pretrained(tmp_path)  # no trust_remote_code needed where trol is imported
    assert type(loaded.image_processor).__name__ == name
    torch.testing.assert_close(pixels_of(loaded, image), expected, rtol=0, atol=0)
    for backend in ("pil", "torchvision"):  # the torchvision backend of a plain CLIP/GotOcr2 processor differs
        image_processor = AutoImageProcessor.from_pretrained(tmp_path, backend=backend)
        assert type(image_processor).__name__ == name
        torch.testing.assert_close(image_processor(image, return_tensors="pt")["pixel_values"], expected, rtol=0,
                                   atol=0)
    trol_clip_image_processor(490).save_pretrained(tmp_path / "alone")  # an image processor saved on its own
    assert json.loads((tmp_path / "alone" / "preprocessor_config.json").read_text())["auto_map"] == {
        "AutoImageProcessor": "processing_trol.TrolClipImageProcessor"}
    assert type(AutoImageProcessor.from_pretrained(tmp_path / "alone")).__name__ == "TrolClipImageProcessor"


CLEAN_PROCESS_IMAGES = """
import sys
sys.modules["trol"] = None  # this process must not be able to import the repository's package
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoProcessor
root = sys.argv[1]  # holds noise.png, gradient.png and one saved processor folder per name
images = [Image.open(f"{root}/{stem}.png") for stem in ("noise", "gradient")]
results = {}
for name in sys.argv[2:]:
    folder = f"{root}/{name}"
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    image_processor = AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)
    for loaded in (processor.image_processor, image_processor):
        assert type(loaded).__module__.startswith("transformers_modules"), type(loaded).__module__
    results[name] = {"class": type(processor.image_processor).__name__,
                     "processor": dict(processor(images=images, text="<image><image>", return_tensors="pt")),
                     "image_processor": image_processor(images, return_tensors="pt")["pixel_values"]}
assert not any(n == "trol" or n.startswith("trol.") for n in sys.modules if sys.modules[n] is not None)
torch.save(results, f"{root}/out.pt")
"""


def test_clean_process_reloads_both_image_processors_through_remote_code(tmp_path):
    processors = {"clip": clip_processor(), "tiles": tiling_processor()}
    for name, processor in processors.items():
        processor.save_pretrained(tmp_path / name)
    images = [noise(97, 61, seed=1), gradient(1000, 700)]
    for image, stem in zip(images, ("noise", "gradient")):
        image.save(tmp_path / f"{stem}.png")
    run_clean_process(CLEAN_PROCESS_IMAGES, tmp_path, *processors, tmp_path=tmp_path)
    results = torch.load(tmp_path / "out.pt")
    classes = {"clip": "TrolClipImageProcessor", "tiles": "TrolInternVLImageProcessor"}
    for name, processor in processors.items():
        assert results[name]["class"] == classes[name]
        expected = processor(images=images, text="<image><image>", return_tensors="pt")
        for key in expected:
            torch.testing.assert_close(results[name]["processor"][key], expected[key], rtol=0, atol=0)
        torch.testing.assert_close(results[name]["image_processor"], expected["pixel_values"], rtol=0, atol=0)
    torch.testing.assert_close(results["clip"]["processor"]["pixel_values"][:1], original_clip_pixels(images[0]),
                               rtol=0, atol=0)
