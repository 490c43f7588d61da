"""Vision variants, configured not hard-coded: CLIP at a non-native resolution, SigLIP, InternViT + pixel shuffle +
LayerNorm-MLP projector."""

import pytest
import torch
import torch.nn.functional as F
from tiny import DECODERS, IMAGE_TOKEN, VISION
from transformers import AutoModel, CLIPVisionConfig, InternVLVisionConfig

from trol import TrolConfig, TrolForConditionalGeneration
from trol.modeling_trol import interpolate_position_embeddings, pixel_shuffle


def test_clip_at_490_px_gives_1225_image_tokens_with_interpolated_positions(tmp_path):
    clip = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                            image_size=336, patch_size=14)
    torch.manual_seed(0)
    tower = AutoModel.from_config(clip)
    tower.save_pretrained(tmp_path / "clip")
    model = TrolForConditionalGeneration.from_vision_and_text(str(tmp_path / "clip"), DECODERS["llama"](),
                                                              image_size=490).eval()
    assert model.config.vision_config.image_size == 490
    assert model.config.image_seq_length == 1225
    positions = model.model.vision_tower.embeddings.position_embedding.weight
    assert positions.shape == (1226, 32)  # 35 x 35 + CLS
    source = tower.embeddings.position_embedding.weight
    torch.testing.assert_close(positions[0], source[0])  # CLS row kept
    grid = source[1:].reshape(1, 24, 24, 32).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(35, 35), mode="bicubic", align_corners=False)
    torch.testing.assert_close(positions[1:], expected.permute(0, 2, 3, 1).reshape(1225, 32))
    torch.testing.assert_close(tower.embeddings.patch_embedding.weight, model.model.vision_tower.embeddings.patch_embedding.weight)
    features = model.get_image_features(torch.randn(1, 3, 490, 490))
    assert features.shape == (1, 1225, 32)
    # interpolated once, then saved: the folder reloads at 490 px without the source encoder
    model.save_pretrained(tmp_path / "trol")
    reloaded = TrolForConditionalGeneration.from_pretrained(tmp_path / "trol")
    torch.testing.assert_close(reloaded.model.vision_tower.embeddings.position_embedding.weight, positions)


def test_position_interpolation_keeps_a_constant_field_constant():
    weight = torch.cat([torch.randn(1, 8), torch.ones(16, 8) * 3.0])  # CLS + 4x4 grid
    resized = interpolate_position_embeddings(weight, 7)
    assert resized.shape == (50, 8)
    torch.testing.assert_close(resized[0], weight[0])
    torch.testing.assert_close(resized[1:], torch.full((49, 8), 3.0))
    with pytest.raises(ValueError, match="not a square grid"):
        interpolate_position_embeddings(torch.randn(7, 8), 3)


def test_siglip_keeps_every_token():
    config = TrolConfig(vision_config=VISION["siglip"](), text_config=DECODERS["llama"](), image_token_id=IMAGE_TOKEN,
                        vision_feature_select_strategy="full")
    assert config.image_seq_length == 4
    model = TrolForConditionalGeneration(config).eval()
    assert model.get_image_features(torch.randn(3, 3, 28, 28)).shape == (3, 4, 32)


def reference_pixel_shuffle(x: torch.Tensor, scale: float) -> torch.Tensor:
    """InternVL's original pixel_shuffle on (n, w, h, c), ps_version v2 (final transpose)."""
    n, w, h, c = x.size()
    x = x.view(n, w, int(h * scale), int(c / scale))
    x = x.permute(0, 2, 1, 3).contiguous()
    x = x.view(n, int(h * scale), int(w * scale), int(c / (scale * scale)))
    return x.permute(0, 2, 1, 3).contiguous()


def test_pixel_shuffle_matches_internvl():
    features = torch.randn(3, 64, 12)  # 8 x 8 grid
    ours = pixel_shuffle(features, 0.5)
    expected = reference_pixel_shuffle(features.reshape(3, 8, 8, 12), 0.5).reshape(3, -1, 48)
    assert torch.equal(ours, expected)
    with pytest.raises(ValueError, match="square grid"):
        pixel_shuffle(torch.randn(1, 12, 4), 0.5)


def internvit_config(**kwargs) -> TrolConfig:
    vision = InternVLVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  image_size=[56, 56], patch_size=[7, 7])  # 8 x 8 patches per tile
    return TrolConfig(vision_config=vision, text_config=DECODERS["phi3"](), image_token_id=IMAGE_TOKEN,
                      downsample_ratio=0.5, projector_layernorm=True, share_gates=True, **kwargs)


def test_internvit_tiles_are_pixel_shuffled_and_projected_with_layernorm():
    config = internvit_config()
    assert config.image_seq_length == 16  # 8x8 patches, CLS dropped, shuffled by 0.5 -> 4x4
    torch.manual_seed(0)
    model = TrolForConditionalGeneration(config).eval()
    projector = model.model.multi_modal_projector
    assert projector.layer_norm.normalized_shape == (128,) and projector.linear_1.in_features == 128
    tiles = torch.randn(3, 3, 56, 56)
    hidden = model.model.vision_tower(tiles, output_hidden_states=True).hidden_states[-1][:, 1:]
    shuffled = reference_pixel_shuffle(hidden.reshape(3, 8, 8, 32), 0.5).reshape(3, 16, 128)
    expected = projector.linear_2(F.gelu(projector.linear_1(F.layer_norm(shuffled, (128,), projector.layer_norm.weight,
                                                                         projector.layer_norm.bias))))
    torch.testing.assert_close(model.get_image_features(tiles), expected)
    # an image cut into 3 tiles fills 3 x 16 image tokens of one prompt
    ids = torch.tensor([[1, 5] + [IMAGE_TOKEN] * 48 + [6, 7]])
    assert model(input_ids=ids, pixel_values=tiles).logits.shape == (1, 52, 128)
    with pytest.raises(ValueError, match="48 image tokens .* 2 image\\(s\\) give 2 x 16 = 32"):
        model(input_ids=ids, pixel_values=tiles[:2])


def test_downsample_ratio_must_be_one_over_an_integer():
    with pytest.raises(ValueError, match="downsample_ratio=0.3"):
        internvit_config().__class__(downsample_ratio=0.3)


def test_siglip_with_the_cls_dropping_strategy_is_refused():
    with pytest.raises(ValueError, match="has none .* use 'full'"):
        TrolConfig(vision_config=VISION["siglip"](), text_config=DECODERS["llama"](), image_token_id=IMAGE_TOKEN,
                   vision_feature_select_strategy="default")
