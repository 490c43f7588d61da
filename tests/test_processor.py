"""TrolProcessor: image-token expansion, batching, input checks, image loading, chat templates, assistant masks,
preprocessing numerics of the released checkpoints, tiling grid, save/load. Tiny tokenizers and images built in code."""

import itertools
import json
import re

import numpy as np
import PIL.Image
import pytest
import torch
from tiny import CONTEXT, DECODERS, IMAGE_TOKEN, char_tokenizer, tiny_model
from transformers import (
    CLIPVisionConfig,
    InternVLVisionConfig,
    LlamaConfig,
    SiglipImageProcessorPil,
    pipeline,
)

from trol import TrolConfig, TrolForConditionalGeneration
from trol.processing_trol import (
    TROL_INTERNLM2_TEMPLATE,
    TROL_PHI3_TEMPLATE,
    TROL_SYSTEM_PROMPT,
    TrolProcessor,
    generic_chat_template,
    load_rgb_image,
    trol_clip_image_processor,
    trol_internvl_image_processor,
)

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)  # TROL.md section 4
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def clip_processor(template=TROL_INTERNLM2_TEMPLATE, size: int = 28, num_image_tokens: int = 4, **kwargs):
    return TrolProcessor(trol_clip_image_processor(size), char_tokenizer(**kwargs), chat_template=template,
                         num_image_tokens=num_image_tokens)


def tiling_processor(num_image_tokens: int = 2, tile_size: int = 28):
    return TrolProcessor(trol_internvl_image_processor(tile_size, max_tiles=6), char_tokenizer(),
                         chat_template=TROL_PHI3_TEMPLATE, num_image_tokens=num_image_tokens,
                         image_context_token="<IMG_CONTEXT>", image_start_token="<img>", image_end_token="</img>")


def solid(color=(10, 200, 30), size=(40, 30), mode="RGB") -> PIL.Image.Image:
    return PIL.Image.new(mode, size, color)


def noise_image(width: int, height: int, seed: int = 0) -> PIL.Image.Image:
    return PIL.Image.fromarray(np.random.RandomState(seed).randint(0, 256, (height, width, 3), dtype=np.uint8))


def chat(image=None, question="What is it?", answers=("A cat.", "Done.")):
    first = [{"type": "image", "image": image} if image is not None else {"type": "image"},
             {"type": "text", "text": question}]
    return [{"role": "user", "content": first},
            {"role": "assistant", "content": [{"type": "text", "text": answers[0]}]},
            {"role": "user", "content": [{"type": "text", "text": "And?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": answers[1]}]}]


def runs(row: list[int], token: int) -> list[int]:
    """Lengths of the consecutive runs of `token` in row."""
    return [len(list(group)) for value, group in itertools.groupby(row) if value == token]


# ----------------------------------------------------------------------------------------------------------------
# Image-token expansion
# ----------------------------------------------------------------------------------------------------------------
def test_490_px_clip_config_expands_each_image_to_1225_tokens():
    text = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                       vocab_size=128)
    config = TrolConfig(vision_config=CLIPVisionConfig(image_size=490, patch_size=14), text_config=text)
    assert config.image_seq_length == 35 * 35 == 1225  # CLS dropped
    config_336 = TrolConfig(vision_config=CLIPVisionConfig(image_size=336, patch_size=14), text_config=text)
    assert config_336.image_seq_length == 576
    processor = clip_processor(size=490, num_image_tokens=config.image_seq_length)
    out = processor(images=noise_image(64, 48), text="<image>\nDescribe.", return_tensors="pt")
    assert out["input_ids"][0].tolist().count(IMAGE_TOKEN) == 1225
    assert out["pixel_values"].shape == (1, 3, 490, 490)


@pytest.mark.parametrize("vision,strategy", [("clip", "default"), ("clip", "full"), ("siglip", "full")])
def test_config_image_seq_length_is_the_number_of_features_per_image(vision, strategy):
    model = tiny_model(vision=vision, vision_feature_select_strategy=strategy)
    features = model.get_image_features(torch.randn(2, 3, 28, 28))
    assert features.shape[1] == model.config.image_seq_length  # what num_image_tokens= must be


@pytest.mark.parametrize("vision", ["clip", "siglip"])
def test_processed_chat_batch_runs_through_a_tiny_model(vision):
    image_processor = trol_clip_image_processor(28) if vision == "clip" else \
        SiglipImageProcessorPil(size={"height": 28, "width": 28})
    processor = TrolProcessor(image_processor, char_tokenizer(), chat_template=TROL_INTERNLM2_TEMPLATE,
                              num_image_tokens=4)
    model = tiny_model(vision=vision)
    two_images = [{"role": "user", "content": [{"type": "image", "image": solid()}, {"type": "text", "text": "vs"},
                                               {"type": "image", "image": solid((0, 0, 255))}]}]
    one_image = [{"role": "user", "content": [{"type": "image", "image": solid()}, {"type": "text", "text": "Hi"}]}]
    inputs = processor.apply_chat_template([two_images, one_image], add_generation_prompt=True, tokenize=True,
                                           return_dict=True, return_tensors="pt", processor_kwargs={"padding": True})
    assert inputs["pixel_values"].shape == (3, 3, 28, 28)
    assert (inputs["input_ids"] == IMAGE_TOKEN).sum(-1).tolist() == [8, 4]
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape == (2, inputs["input_ids"].shape[1] + 3)


def test_tiled_chat_batch_runs_through_a_tiny_internvit_model():
    vision = InternVLVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                                  image_size=[56, 56], patch_size=[7, 7])  # 8x8 patches -> 4x4 after pixel shuffle
    config = TrolConfig(vision_config=vision, text_config=DECODERS["phi3"](), image_token_id=CONTEXT,
                        downsample_ratio=0.5, projector_layernorm=True, share_gates=True)
    torch.manual_seed(0)
    model = TrolForConditionalGeneration(config).eval()
    processor = tiling_processor(num_image_tokens=config.image_seq_length, tile_size=56)
    content = [[{"type": "image", "image": solid(size=size)}, {"type": "text", "text": "?"}]
               for size in [(112, 56), (56, 56)]]  # wide: 2x1 tiles + thumbnail; square: 1 tile
    chats = [[{"role": "user", "content": blocks}] for blocks in content]
    inputs = processor.apply_chat_template(chats, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt", processor_kwargs={"padding": True})
    assert inputs["pixel_values"].shape == (4, 3, 56, 56)  # 2x1 tiles + thumbnail, then 1 tile
    assert (inputs["input_ids"] == CONTEXT).sum(-1).tolist() == [3 * 16, 16]
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape == (2, inputs["input_ids"].shape[1] + 3)


def test_several_images_expand_in_order_and_pixel_values_follow_the_prompts():
    processor = clip_processor()
    red, green, blue = solid((255, 0, 0)), solid((0, 255, 0)), solid((0, 0, 255))
    out = processor(images=[[red, green], [blue]], text=["<image>a<image>", "b<image>"], padding=True,
                    return_tensors="pt")
    assert [runs(row, IMAGE_TOKEN) for row in out["input_ids"].tolist()] == [[4, 4], [4]]
    dominant = out["pixel_values"].mean(dim=(2, 3)).argmax(-1).tolist()
    assert dominant == [0, 1, 2]  # red, green, blue: sample 0's images in order, then sample 1's


def test_text_only_prompts_give_no_pixel_values():
    out = clip_processor()(text=["Hello there", "Hi"], padding=True, return_tensors="pt")
    assert "pixel_values" not in out and (out["input_ids"] == IMAGE_TOKEN).sum() == 0


def test_batches_are_left_padded_by_default_and_right_padded_on_request():
    processor = clip_processor()
    left = processor(text=["Hello there", "Hi"], padding=True, return_tensors="pt")
    assert left["attention_mask"].tolist()[1] == [0] * 9 + [1, 1] and left["input_ids"][1, 0] == 0
    right = processor(text=["Hello there", "Hi"], padding=True, padding_side="right", return_tensors="pt")
    assert right["attention_mask"].tolist()[1] == [1, 1] + [0] * 9


def test_tiling_processor_wraps_each_image_and_gives_tokens_per_tile():
    processor = tiling_processor(num_image_tokens=2)
    wide, square = solid(size=(56, 28)), solid(size=(28, 28))  # 2x1 tiles + thumbnail = 3 tiles; 1 tile
    out = processor(images=[wide, square], text="<image>\nA<image>\nB", return_tensors="pt")
    ids = out["input_ids"][0].tolist()
    assert processor.decode(ids) == ("<img>" + "<IMG_CONTEXT>" * 6 + "</img>\nA<img>" + "<IMG_CONTEXT>" * 2
                                     + "</img>\nB")
    assert processor.image_token_id == CONTEXT and runs(ids, CONTEXT) == [6, 2]
    assert out["pixel_values"].shape == (4, 3, 28, 28) and "num_patches" not in out
    assert processor.replace_image_token({"num_patches": [1, 3]}, 1) == "<img>" + "<IMG_CONTEXT>" * 6 + "</img>"


@pytest.mark.parametrize("width,height,tiles", [
    (448, 448, 1),      # 1x1, no thumbnail
    (896, 448, 3),      # 2x1 + thumbnail
    (1344, 448, 4),     # 3x1 + thumbnail
    (448, 1344, 4),     # tall: 1x3 + thumbnail
    (2688, 448, 7),     # 6x1 + thumbnail: the 6-tile maximum
    (5000, 448, 7),     # wider than any grid: still at most 6 tiles
    (896, 896, 5),      # 1x1 and 2x2 tie; the image is large enough, so the larger grid wins
    (500, 500, 1),      # same tie, small image: 1x1
    (1000, 700, 7),     # aspect 1.43 -> 3x2 + thumbnail
])
def test_tile_grid_follows_the_internvl_rule(width, height, tiles):
    out = trol_internvl_image_processor()(solid(size=(width, height)))
    assert out["num_patches"] == [tiles]


def _internvl_grid(width: int, height: int, max_num: int, image_size: int = 448) -> tuple[int, int]:
    """The original InternVL `find_closest_aspect_ratio` rule (its candidate set and order), written out."""
    targets = sorted({(i, j) for n in range(1, max_num + 1) for i in range(1, n + 1) for j in range(1, n + 1)
                      if 1 <= i * j <= max_num}, key=lambda r: r[0] * r[1])
    best_diff, best = float("inf"), (1, 1)
    for ratio in targets:
        diff = abs(width / height - ratio[0] / ratio[1])
        if diff < best_diff:
            best_diff, best = diff, ratio
        elif diff == best_diff and width * height > 0.5 * image_size * image_size * ratio[0] * ratio[1]:
            best = ratio
    return best


def test_transformers_tile_grid_equals_the_original_internvl_rule_over_a_sweep():
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas

    sizes = [(w, h) for w in range(64, 3000, 97) for h in range(64, 3000, 89)] + [(560, 448), (896, 896), (448, 896)]
    for max_num in (1, 6, 12):
        for width, height in sizes:
            assert get_optimal_tiled_canvas((height, width), (448, 448), 1, max_num) == \
                _internvl_grid(width, height, max_num), (width, height, max_num)


# ----------------------------------------------------------------------------------------------------------------
# Bad inputs
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text,images,message", [
    ("<image><image> two", [solid()], r"holds 2 image placeholder\(s\) '<image>' but 1 image"),
    ("<image> one", [solid(), solid()], r"holds 1 image placeholder\(s\) '<image>' but 2 image"),
    ("<image> one", None, r"holds 1 image placeholder\(s\) '<image>' but 0 image"),
    ("no placeholder", [solid()], r"holds 0 image placeholder\(s\) '<image>' but 1 image"),
    (["<image>a", "<image>b"], [[solid(), solid()], []], r"Prompt 0 holds 1 image placeholder\(s\) but 2 image"),
])
def test_placeholder_and_image_counts_must_match(text, images, message):
    with pytest.raises(ValueError, match=message) as error:
        clip_processor()(images=images, text=text)
    assert "one '<image>' in the text" in str(error.value)  # says how to fix it


@pytest.mark.parametrize("text", ["", "   \n", ["fine", ""], []])
def test_empty_prompts_are_refused(text):
    with pytest.raises(ValueError, match="empty|non-empty"):
        clip_processor()(text=text)


def test_prompt_longer_than_max_length_raises_instead_of_truncating():
    processor = clip_processor(model_max_length=16)
    too_long = r"Prompt 0 is 10 tokens long \(4 of them image tokens\), more than max_length=8"
    with pytest.raises(ValueError, match=too_long):
        processor(images=solid(), text="<image>hello!", max_length=8, truncation=True)
    with pytest.raises(ValueError, match=r"is 20 tokens long.*model_max_length.*=16"):
        processor(text="x" * 20, truncation=True)
    with pytest.raises(ValueError, match="max_length=8"):
        processor(text="x" * 9, text_kwargs={"max_length": 8})
    fits = processor(images=solid(), text="<image>hello", truncation=True, max_length=9)
    assert fits["input_ids"][0] == processor(images=solid(), text="<image>hello")["input_ids"][0]
    assert len(processor(text="x" * 20)["input_ids"][0]) == 20  # no truncation asked: no limit
    padded = processor(text="xy", padding="max_length", max_length=6)
    assert padded["input_ids"][0] == [0] * 4 + [processor.tokenizer.convert_tokens_to_ids("x")] * 1 + [
        processor.tokenizer.convert_tokens_to_ids("y")]


def test_a_missing_image_or_context_token_is_refused_at_construction():
    with pytest.raises(ValueError, match=r"image_context_token='<IMAGE_PATCH>' is not a single token.*add_special_"):
        TrolProcessor(trol_clip_image_processor(28), char_tokenizer(), chat_template=TROL_PHI3_TEMPLATE,
                      image_context_token="<IMAGE_PATCH>")


# ----------------------------------------------------------------------------------------------------------------
# Images: input types, files, modes
# ----------------------------------------------------------------------------------------------------------------
def test_pil_numpy_tensor_and_path_inputs_give_the_same_pixels(tmp_path):
    image = noise_image(40, 30)
    path = tmp_path / "image.png"
    image.save(path)
    array = np.array(image)
    inputs = [image, array, torch.from_numpy(array).permute(2, 0, 1), torch.from_numpy(array).permute(2, 0, 1) / 255.0,
              str(path), path, array.astype(np.float32) / 255.0]
    processor = clip_processor()
    reference = processor(images=image, text="<image>", return_tensors="pt")["pixel_values"]
    for item in inputs:
        pixels = processor(images=item, text="<image>", return_tensors="pt")["pixel_values"]
        torch.testing.assert_close(pixels, reference, atol=0, rtol=0, msg=lambda m: f"{type(item)}: {m}")
    batch = processor(images=np.stack([array, array]), text="<image><image>", return_tensors="pt")
    assert batch["pixel_values"].shape == (2, 3, 28, 28)  # a 4-D array is a batch of images


def test_files_are_read_upright_from_their_exif_orientation(tmp_path):
    path = tmp_path / "photo.jpg"
    exif = PIL.Image.Exif()
    exif[0x0112] = 6  # stored sideways: rotate 90 degrees to display
    solid(size=(40, 30)).save(path, exif=exif)
    assert load_rgb_image(path).size == (30, 40)


def test_images_without_text_give_pixel_values_only():
    out = clip_processor()(images=[solid(), solid()], return_tensors="pt")
    assert list(out.keys()) == ["pixel_values"] and out["pixel_values"].shape == (2, 3, 28, 28)


def test_unreadable_truncated_or_missing_files_raise_naming_the_file(tmp_path):
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("hello")
    truncated = tmp_path / "cut.png"
    noise_image(64, 64).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:300])
    for path in (not_an_image, truncated):
        with pytest.raises(ValueError, match=re.escape(repr(str(path))) + ".*not a readable image"):
            clip_processor()(images=str(path), text="<image>")
    with pytest.raises(ValueError, match="missing.jpg.*does not exist"):
        clip_processor()(images=str(tmp_path / "missing.jpg"), text="<image>")


def _palette(transparent: bool) -> PIL.Image.Image:
    image = PIL.Image.new("P", (4, 4), 1)
    image.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    if transparent:
        image.info["transparency"] = 1
    return image


@pytest.mark.parametrize("image,rgb", [
    (solid(128, mode="L"), (128, 128, 128)),
    (solid((128, 0), mode="LA"), (255, 255, 255)),             # fully transparent -> white
    (solid((10, 20, 30, 255), mode="RGBA"), (10, 20, 30)),
    (solid((10, 20, 30, 0), mode="RGBA"), (255, 255, 255)),
    (_palette(transparent=False), (200, 100, 50)),
    (_palette(transparent=True), (255, 255, 255)),
    (solid(1, mode="1"), (255, 255, 255)),
    (solid(257 * 100, mode="I;16"), (100, 100, 100)),           # 16-bit scaled to 8 bits, not clipped
    (solid(65535, mode="I"), (255, 255, 255)),
    (solid(0.5, mode="F"), (128, 128, 128)),
    (solid((0, 0, 0, 0), mode="CMYK"), (255, 255, 255)),
], ids=["L", "LA", "RGBA", "RGBA-transparent", "P", "P-transparent", "1", "I;16", "I", "F", "CMYK"])
def test_every_image_mode_becomes_rgb(image, rgb):
    converted = load_rgb_image(image)
    assert converted.mode == "RGB" and converted.getpixel((0, 0)) == rgb
    out = clip_processor()(images=image, text="<image>", return_tensors="pt")
    assert out["pixel_values"].shape == (1, 3, 28, 28) and torch.isfinite(out["pixel_values"]).all()


def test_16_bit_png_file_is_scaled_not_clipped(tmp_path):
    path = tmp_path / "depth.png"
    PIL.Image.fromarray(np.full((8, 8), 257 * 40, dtype=np.uint16)).save(path)
    assert load_rgb_image(path).getpixel((0, 0)) == (40, 40, 40)


@pytest.mark.parametrize("array,rgb", [
    (np.full((5, 6), 7, dtype=np.uint8), (7, 7, 7)),                       # (H, W) grayscale
    (np.full((5, 6, 1), 7, dtype=np.int64), (7, 7, 7)),                    # (H, W, 1) integer 0..255
    (np.full((5, 6, 3), 257 * 9, dtype=np.uint16), (9, 9, 9)),             # 16-bit
    (np.ones((5, 6), dtype=bool), (255, 255, 255)),
    (np.full((5, 6, 3), 200.0), (200, 200, 200)),                          # 0..255 floats
    (torch.full((3, 5, 6), 0.2, dtype=torch.bfloat16), (51, 51, 51)),     # (C, H, W) 0..1 floats (bf16 0.2 ~ 0.2002)
])
def test_array_and_tensor_layouts_and_dtypes_are_understood(array, rgb):
    converted = load_rgb_image(array)
    assert converted.size == (6, 5) and converted.getpixel((0, 0)) == rgb


@pytest.mark.parametrize("bad,error,message", [
    (np.full((4, 4, 3), -0.5), ValueError, "normalised already"),
    (np.full((4, 4, 3), 300, dtype=np.int32), ValueError, "0..255"),
    (np.zeros((5, 5, 5)), ValueError, "expected \\(H, W\\)"),
    (np.zeros((2, 2, 2, 2, 2)), ValueError, "expected \\(H, W\\)"),
    (12345, TypeError, "type int"),
])
def test_bad_arrays_and_types_are_refused(bad, error, message):
    with pytest.raises(error, match=message):
        load_rgb_image(bad)


# ----------------------------------------------------------------------------------------------------------------
# Preprocessing numerics (independent computations with PIL / numpy; the original code's: test_image_parity.py)
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("width,height", [(640, 480), (300, 500), (490, 490)])
def test_pil_resize_option_matches_pil_bicubic_resize_then_255_scale_normalisation(width, height):
    image = noise_image(width, height, seed=width)  # the default resize (the released checkpoints'): test_image_parity
    pixels = trol_clip_image_processor(490, resize_method="pil")(image, return_tensors="np")["pixel_values"][0]
    resized = np.asarray(image.resize((490, 490), PIL.Image.BICUBIC)).astype(np.float64)  # uint8 -> uint8, HWC
    expected = (resized - 255 * np.array(CLIP_MEAN)) / (255 * np.array(CLIP_STD))
    np.testing.assert_allclose(pixels.transpose(1, 2, 0), expected, atol=1e-5, rtol=0)


def test_trol_internvl_tiles_match_resize_crop_and_thumbnail():
    image = noise_image(100, 60)  # aspect 1.67 -> 3x2 grid of 28-px tiles + thumbnail
    pixels = trol_internvl_image_processor(28, 6)(image, return_tensors="np")["pixel_values"]
    resized = image.resize((84, 56), PIL.Image.BICUBIC)
    tiles = [resized.crop((c * 28, r * 28, c * 28 + 28, r * 28 + 28)) for r in range(2) for c in range(3)]
    tiles.append(image.resize((28, 28), PIL.Image.BICUBIC))
    expected = [(np.asarray(t) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD for t in tiles]
    np.testing.assert_allclose(pixels.transpose(0, 2, 3, 1), np.stack(expected), atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------------------------------
# Chat templates and the assistant mask
# ----------------------------------------------------------------------------------------------------------------
INTERNLM2_CHAT = (
    f"<s>[UNUSED_TOKEN_146]system\n{TROL_SYSTEM_PROMPT}[UNUSED_TOKEN_145]\n"
    "[UNUSED_TOKEN_146]user\n<image>\nWhat is it?[UNUSED_TOKEN_145]\n"
    "[UNUSED_TOKEN_146]assistant\nA cat.[UNUSED_TOKEN_145]\n"
    "[UNUSED_TOKEN_146]user\nAnd?[UNUSED_TOKEN_145]\n[UNUSED_TOKEN_146]assistant\nDone.[UNUSED_TOKEN_145]\n"
)
PHI3_CHAT = (
    f"<s><|system|>\n{TROL_SYSTEM_PROMPT}<|end|>\n<|user|>\n<image>\nWhat is it?<|end|>\n<|assistant|>\nA cat.<|end|>\n"
    "<|user|>\nAnd?<|end|>\n<|assistant|>\nDone.<|end|>\n"
)
CHATML_CHAT = (
    "<s><|im_start|>user\n<image>\nWhat is it?<|im_end|>\n<|im_start|>assistant\nA cat.<|im_end|>\n"
    "<|im_start|>user\nAnd?<|im_end|>\n<|im_start|>assistant\nDone.<|im_end|>\n"
)
MARKED_TEMPLATE = (  # a tokenizer's own template that already has generation markers
    "{% for m in messages %}{% if m['role'] == 'assistant' %}A: {% generation %}{{ m['content'] }}</s>"
    "{% endgeneration %}{{ '\\n' }}{% else %}U: {{ m['content'] }}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}A: {% endif %}"
)


def test_released_system_prompt_has_no_final_period():
    assert TROL_SYSTEM_PROMPT.startswith("You are AI model created by Byung-Kwan Lee") and \
        TROL_SYSTEM_PROMPT.endswith("answers to the user's questions")


@pytest.mark.parametrize("template,expected,generation_prompt", [
    (TROL_INTERNLM2_TEMPLATE, INTERNLM2_CHAT, "[UNUSED_TOKEN_146]assistant\n"),
    (TROL_PHI3_TEMPLATE, PHI3_CHAT, "<|assistant|>\n"),
], ids=["internlm2", "phi3"])
def test_released_templates_render_the_exact_prompt_format(template, expected, generation_prompt):
    processor = clip_processor(template)
    assert processor.apply_chat_template(chat()) == expected
    question_only = processor.apply_chat_template(chat()[:1], add_generation_prompt=True)
    assert question_only == expected[:expected.index("A cat.")] and question_only.endswith(generation_prompt)
    plain = [{"role": "user", "content": "<image>\nWhat is it?"}, {"role": "assistant", "content": "A cat."},
             {"role": "user", "content": "And?"}, {"role": "assistant", "content": "Done."}]
    assert processor.apply_chat_template(plain) == expected  # plain string content
    with_system = [{"role": "system", "content": "Be brief."}] + chat()
    assert processor.apply_chat_template(with_system) == expected.replace(TROL_SYSTEM_PROMPT, "Be brief.")


def test_released_templates_refuse_unknown_roles():
    with pytest.raises(Exception, match="roles system"):
        clip_processor().apply_chat_template([{"role": "tool", "content": "x"}])


def test_generic_template_falls_back_to_chatml_with_a_warning():
    tokenizer = char_tokenizer()
    with pytest.warns(UserWarning, match="has no chat template.*ChatML"):
        template = generic_chat_template(tokenizer)
    processor = TrolProcessor(trol_clip_image_processor(28), tokenizer, chat_template=template, num_image_tokens=4)
    assert processor.apply_chat_template(chat()) == CHATML_CHAT
    assert processor.apply_chat_template(chat()[:1], add_generation_prompt=True) == \
        CHATML_CHAT[:CHATML_CHAT.index("A cat.")]
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.warns(UserWarning, match=r"without \{% generation %\} markers"):
        generic_chat_template(tokenizer)


def test_generic_template_reuses_a_tokenizer_template_that_has_generation_markers():
    tokenizer = char_tokenizer()
    tokenizer.chat_template = MARKED_TEMPLATE
    processor = TrolProcessor(trol_clip_image_processor(28), tokenizer, num_image_tokens=4)  # default: generic
    assert processor.apply_chat_template(chat()) == "U: <image>\nWhat is it?\nA: A cat.</s>\nU: And?\nA: Done.</s>\n"


@pytest.mark.parametrize("template,end", [
    (TROL_INTERNLM2_TEMPLATE, "[UNUSED_TOKEN_145]"), (TROL_PHI3_TEMPLATE, "<|end|>"), ("chatml", "<|im_end|>"),
    ("reused", "</s>"),
])
def test_assistant_mask_covers_exactly_the_answers_and_their_end_markers(template, end):
    if template == "chatml":
        with pytest.warns(UserWarning):
            template = generic_chat_template(char_tokenizer())
    elif template == "reused":
        tokenizer = char_tokenizer()
        tokenizer.chat_template = MARKED_TEMPLATE
        template = generic_chat_template(tokenizer)
    processor = clip_processor(template)
    conversations = [chat(solid()), chat(solid(), question="Q", answers=("Yes, it is.", "No"))]
    out = processor.apply_chat_template(conversations, tokenize=True, return_dict=True, return_tensors="pt",
                                        return_assistant_tokens_mask=True, processor_kwargs={"padding": True})
    for row, mask, answers in zip(out["input_ids"], out["assistant_masks"].bool(), [("A cat.", "Done."),
                                                                                  ("Yes, it is.", "No")]):
        assert processor.decode(row[mask]) == f"{answers[0]}{end}{answers[1]}{end}"
        assert runs(mask.long().tolist(), 1) == [len(answers[0]) + 1, len(answers[1]) + 1]  # chars + end marker
        assert not (row[mask] == IMAGE_TOKEN).any()


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")  # torch, via trl
def test_trl_collator_trains_on_assistant_answers_only():
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

    collator = DataCollatorForVisionLanguageModeling(clip_processor(), max_length=1024, assistant_only_loss=True)
    examples = [{"images": [solid()], "messages": [{"role": "user", "content": "What is it?"},
                                                   {"role": "assistant", "content": "A cat."}]},
                {"images": [], "messages": [{"role": "user", "content": "Hi"},
                                            {"role": "assistant", "content": "Hello there"}]}]
    batch = collator(examples)
    assert batch["pixel_values"].shape == (1, 3, 28, 28) and (batch["input_ids"][0] == IMAGE_TOKEN).sum() == 4
    answers = [clip_processor().decode(ids[labels != -100]) for ids, labels in zip(batch["input_ids"], batch["labels"])]
    assert answers == ["A cat.[UNUSED_TOKEN_145]", "Hello there[UNUSED_TOKEN_145]"]


# ----------------------------------------------------------------------------------------------------------------
# Decoding, pipeline, saving
# ----------------------------------------------------------------------------------------------------------------
def test_batch_decode_and_post_process_drop_special_tokens():
    processor = clip_processor()
    ids = processor(images=solid(), text=["<s><image>\nhi", "<s>yo"], padding=True, return_tensors="pt")["input_ids"]
    assert processor.batch_decode(ids, skip_special_tokens=True) == ["\nhi", "yo"]
    assert processor.post_process_image_text_to_text(ids) == ["\nhi", "yo"]
    assert processor.decode(ids[1], skip_special_tokens=False).endswith("<s>yo")


def test_image_text_to_text_pipeline_runs_on_chats_and_plain_prompts():
    pipe = pipeline("image-text-to-text", model=tiny_model(), processor=clip_processor())
    reply = pipe(text=chat(solid())[:1], max_new_tokens=3)[0]["generated_text"]
    assert reply[-1]["role"] == "assistant" and isinstance(reply[-1]["content"], str)
    plain = pipe(images=solid(), text="<image>\nhello", max_new_tokens=3)[0]["generated_text"]
    assert plain.startswith("<image>\nhello")


@pytest.mark.parametrize("make", [clip_processor, tiling_processor], ids=["clip", "tiling"])
def test_save_and_load_round_trip_keeps_template_tokens_and_counts(make, tmp_path):
    processor = make()
    processor.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "processor_config.json").read_text())
    assert config["auto_map"] == {"AutoProcessor": "processing_trol.TrolProcessor"}
    assert (tmp_path / "processing_trol.py").is_file() and (tmp_path / "chat_template.jinja").is_file()
    loaded = TrolProcessor.from_pretrained(tmp_path)
    for name in ("chat_template", "image_token", "image_token_id", "image_token_ids", "num_image_tokens",
                 "image_context_token", "image_start_token", "image_end_token", "padding_side"):
        assert getattr(loaded, name) == getattr(processor, name), name
    conversations = [chat(noise_image(60, 30)), chat(noise_image(30, 30))]
    kwargs = dict(tokenize=True, return_dict=True, return_tensors="pt", processor_kwargs={"padding": True})
    before, after = processor.apply_chat_template(conversations, **kwargs), loaded.apply_chat_template(conversations,
                                                                                                       **kwargs)
    assert before.keys() == after.keys()
    for key in before:
        torch.testing.assert_close(after[key], before[key], atol=0, rtol=0)
