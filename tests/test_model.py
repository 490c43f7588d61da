"""TrolForConditionalGeneration as a transformers model: layout, images, loss, training, serialisation, errors."""

import copy
import math
import pickle

import pytest
import torch
import torch.nn.functional as F
from tiny import DECODERS, IMAGE_TOKEN, TOKENS_PER_IMAGE, VISION, prompt_batch, tiny_config, tiny_model
from transformers import AutoModel, AutoModelForCausalLM, LlamaConfig

from trol import TrolConfig, TrolForConditionalGeneration


def test_layout_follows_llava_and_backbone_keys_are_untouched():
    model = tiny_model("llama")
    keys = set(model.state_dict())
    assert {"model.trol_gates.0.weight", "model.trol_gates.0.bias", "model.trol_gates.1.weight"} <= keys
    assert model.model.trol_gates[0].weight.shape == (1, 32) and model.model.trol_gates[0].bias.shape == (1,)
    assert {"model.multi_modal_projector.linear_1.weight", "model.multi_modal_projector.linear_2.weight",
            "lm_head.weight"} <= keys
    backbone = AutoModel.from_config(model.config.text_config)
    lm_keys = {k.removeprefix("model.language_model.") for k in keys if k.startswith("model.language_model.")}
    assert lm_keys == set(backbone.state_dict())


def test_shared_gate_is_one_module():
    model = tiny_model("llama", share_gates=True)
    assert len(model.model.trol_gates) == 1
    assert not any(k.startswith("model.trol_gates.1") for k in model.state_dict())


def test_fresh_gate_starts_at_the_configured_mixing_ratio():
    torch.manual_seed(0)
    model = TrolForConditionalGeneration(tiny_config("llama", gate_init_mixing_ratio=0.05)).eval()
    hidden = torch.randn(2, 5, 32)
    for gate in model.model.trol_gates:
        torch.testing.assert_close(gate(hidden), torch.full((2, 5, 1), 0.05))


@pytest.mark.parametrize("vision", list(VISION))
def test_image_features_come_from_the_selected_vision_layer_through_the_projector(vision):
    model = tiny_model("llama", vision)
    ids, mask, pixels = prompt_batch((9, 6))
    hidden = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states[-1]
    if vision == "clip":
        hidden = hidden[:, 1:]  # the CLS token is dropped
    projector = model.model.multi_modal_projector
    expected = projector.linear_2(F.gelu(projector.linear_1(hidden)))
    out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels)
    assert out.image_hidden_states.shape == (2, TOKENS_PER_IMAGE, 32)
    torch.testing.assert_close(out.image_hidden_states, expected)
    # and they are what the decoder sees at the image-token positions
    embeds = model.get_input_embeddings()(ids)
    embeds[ids == IMAGE_TOKEN] = expected.reshape(-1, 32)
    by_embeds = model(inputs_embeds=embeds, attention_mask=mask).logits
    torch.testing.assert_close(out.logits, by_embeds, rtol=1e-5, atol=1e-5)


def test_several_images_per_prompt_and_text_only_inputs():
    model = tiny_model("llama")
    ids, mask, pixels = prompt_batch((12, 10), images_per_prompt=2)
    assert pixels.shape[0] == 4
    assert model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits.shape == (2, 12, 128)
    ids, mask, _ = prompt_batch((7, 5), images_per_prompt=0)
    assert model(input_ids=ids, attention_mask=mask).logits.shape == (2, 7, 128)


def test_loss_ignores_minus_100_and_matches_shifted_cross_entropy():
    model = tiny_model("llama")
    ids, mask, pixels = prompt_batch((9, 9))
    labels = ids.clone()
    labels[:, :6] = -100
    out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, labels=labels)
    expected = F.cross_entropy(out.logits[:, :-1].reshape(-1, 128), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)


def test_logits_to_keep_returns_the_last_positions():
    model = tiny_model("llama")
    ids, mask, pixels = prompt_batch((9, 6))
    full = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
    last = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, logits_to_keep=1).logits
    torch.testing.assert_close(last, full[:, -1:])


def test_sdpa_and_eager_attention_agree():
    model = tiny_model("llama")
    ids, mask, pixels = prompt_batch((9, 6))
    model.set_attn_implementation("sdpa")
    sdpa = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
    model.set_attn_implementation("eager")
    eager = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
    real = mask.bool()
    torch.testing.assert_close(sdpa[real], eager[real], rtol=1e-5, atol=1e-5)


def test_hidden_state_and_attention_counts_match_the_backbone():
    model = tiny_model("llama")
    model.set_attn_implementation("eager")
    ids, mask, pixels = prompt_batch((9, 6))
    out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, output_hidden_states=True,
                output_attentions=True)
    assert len(out.hidden_states) == model.config.text_config.num_hidden_layers + 1
    assert len(out.attentions) == model.config.text_config.num_hidden_layers
    torch.testing.assert_close(out.hidden_states[-1], model.model(input_ids=ids, attention_mask=mask,
                                                                   pixel_values=pixels).last_hidden_state)


def gradients(model, batch, checkpointing: bool):
    model = copy.deepcopy(model).train()
    if checkpointing:
        model.activation_checkpointing_enable()
    model.zero_grad()
    model(**batch).loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("decoder", ["llama", "gemma2"])
def test_gradient_checkpointing_gives_the_same_gradients_and_every_gate_learns(decoder):
    model = tiny_model(decoder)
    ids, mask, pixels = prompt_batch((9, 9))
    batch = dict(input_ids=ids, attention_mask=mask, pixel_values=pixels, labels=ids)
    plain = gradients(model, batch, checkpointing=False)
    checkpointed = gradients(model, batch, checkpointing=True)
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-6, msg=name)
    for i in range(model.config.text_config.num_hidden_layers):
        assert plain[f"model.trol_gates.{i}.weight"].abs().sum() > 0
        assert plain[f"model.trol_gates.{i}.bias"].abs().sum() > 0


def test_save_and_load_round_trip_is_bit_exact_and_safetensors_only(tmp_path):
    model = tiny_model("gemma2", share_gates=True)
    model.save_pretrained(tmp_path)
    assert any(p.suffix == ".safetensors" for p in tmp_path.iterdir())
    assert not any(p.suffix in {".bin", ".pt", ".pth"} for p in tmp_path.iterdir())
    loaded = TrolForConditionalGeneration.from_pretrained(tmp_path).eval()
    loaded.set_attn_implementation("eager")
    assert loaded.config.share_gates and loaded.config.text_config.model_type == "gemma2"
    original, restored = model.state_dict(), loaded.state_dict()
    assert original.keys() == restored.keys()
    for key in original:
        assert torch.equal(original[key], restored[key]), key
    ids, mask, pixels = prompt_batch((9, 6))
    torch.testing.assert_close(loaded(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits,
                               model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits, rtol=0, atol=1e-6)


def test_deepcopy_and_pickle_keep_the_traversal():
    model = tiny_model("llama")
    pickled = pickle.loads(pickle.dumps(model))  # before any output-recording hooks exist
    copied = copy.deepcopy(model)
    ids, mask, pixels = prompt_batch((9, 6))
    expected = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
    for other in (pickled, copied):
        layers = other.model.language_model.layers
        assert all(layer.forward.layer is layer for layer in layers)  # points at its own layer, not the original
        torch.testing.assert_close(other(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits, expected,
                                   rtol=0, atol=0)


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # peft's call
def test_peft_lora_targets_backbone_names_and_traversal_still_runs():
    peft = pytest.importorskip("peft")
    model = tiny_model("llama")
    ids, mask, pixels = prompt_batch((9, 6))
    config = peft.LoraConfig(r=4, lora_alpha=4, target_modules=r".*language_model.*\.(q_proj|v_proj|down_proj)",
                             modules_to_save=[f"trol_gates.{i}" for i in range(2)], init_lora_weights=False)
    wrapped = peft.get_peft_model(model, config)
    names = [n for n, _ in wrapped.named_modules() if n.endswith("q_proj.lora_A.default")]
    assert len(names) == 2
    on = wrapped(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
    wrapped.base_model.model.config.use_traversal = False
    off = wrapped(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
    assert (on - off).abs().max() > 1e-3
    trainable = {n for n, p in wrapped.named_parameters() if p.requires_grad}
    assert any("trol_gates.0.modules_to_save" in n for n in trainable)


@pytest.mark.parametrize("vision", list(VISION))
def test_from_vision_and_text_loads_pretrained_parts_and_adds_an_image_token(tmp_path, vision):
    vision_config = VISION[vision]()
    text_config = DECODERS["llama"]()
    torch.manual_seed(1)
    AutoModel.from_config(vision_config).save_pretrained(tmp_path / "vision")
    language = AutoModelForCausalLM.from_config(text_config)
    language.save_pretrained(tmp_path / "text")
    model = TrolForConditionalGeneration.from_vision_and_text(str(tmp_path / "vision"), str(tmp_path / "text"),
                                                              share_gates=True)
    assert model.config.image_token_id == text_config.vocab_size
    assert model.config.vision_feature_select_strategy == ("full" if vision == "siglip" else "default")
    embeddings = model.get_input_embeddings().weight
    assert embeddings.shape[0] == text_config.vocab_size + 1
    torch.testing.assert_close(embeddings[:-1], language.get_input_embeddings().weight)
    torch.testing.assert_close(embeddings[-1], language.get_input_embeddings().weight.mean(0), rtol=1e-4,
                               atol=1e-4)
    torch.testing.assert_close(model.lm_head.weight[:-1], language.lm_head.weight)
    source = language.model.layers[1].mlp.down_proj.weight
    torch.testing.assert_close(model.model.language_model.layers[1].mlp.down_proj.weight, source)
    assert len(model.model.trol_gates) == 1
    torch.testing.assert_close(model.model.trol_gates[0].bias, torch.tensor([math.atanh(2 * 0.1 - 1)]))


def test_from_vision_and_text_leaves_the_callers_configs_untouched():
    vision, text = VISION["clip"](), DECODERS["qwen2"]()
    model = TrolForConditionalGeneration.from_vision_and_text(vision, text)  # appends an image token row
    assert model.config.text_config.vocab_size == 129 and text.vocab_size == 128


def test_from_vision_and_text_with_configs_and_an_existing_image_token():
    model = TrolForConditionalGeneration.from_vision_and_text(VISION["clip"](), DECODERS["qwen2"](),
                                                              image_token_id=IMAGE_TOKEN)
    assert model.config.text_config.vocab_size == 128 and model.config.image_token_id == IMAGE_TOKEN
    with pytest.raises(ValueError, match="outside the decoder's vocabulary"):
        TrolForConditionalGeneration.from_vision_and_text(VISION["clip"](), DECODERS["qwen2"](), image_token_id=500)


# --- bad input: each error names the numbers ----------------------------------------------------------------------
def test_image_token_count_mismatch_names_the_counts():
    model = tiny_model("llama")
    ids, mask, pixels = prompt_batch((9, 6))
    with pytest.raises(ValueError, match=r"8 image tokens .* 1 image\(s\) give 1 x 4 = 4 features"):
        model(input_ids=ids, attention_mask=mask, pixel_values=pixels[:1])
    with pytest.raises(ValueError, match="8 image tokens .* no pixel_values"):
        model(input_ids=ids, attention_mask=mask)


def test_wrong_pixel_values_shape_names_the_shapes():
    model = tiny_model("llama")
    ids, mask, _ = prompt_batch((9, 6))
    with pytest.raises(ValueError, match=r"shape \(2, 3, 32, 32\), expected \(n_images, 3, 28, 28\)"):
        model(input_ids=ids, attention_mask=mask, pixel_values=torch.randn(2, 3, 32, 32))
    with pytest.raises(ValueError, match=r"shape \(3, 28, 28\)"):
        model(input_ids=ids, attention_mask=mask, pixel_values=torch.randn(3, 28, 28))


def test_input_ids_and_inputs_embeds_both_or_neither():
    model = tiny_model("llama")
    ids, _, _ = prompt_batch((5,), images_per_prompt=0)
    with pytest.raises(ValueError, match=r"exactly one of input_ids or inputs_embeds \(both"):
        model(input_ids=ids, inputs_embeds=model.get_input_embeddings()(ids))
    with pytest.raises(ValueError, match=r"exactly one of input_ids or inputs_embeds \(neither"):
        model()


def test_traversal_mask_of_the_wrong_shape_names_the_shapes():
    model = tiny_model("llama")
    ids, mask, _ = prompt_batch((7, 5), images_per_prompt=0)
    with pytest.raises(ValueError, match=r"traversal_mask has shape \(2, 6\) but the inputs are \(batch=2, length=7\)"):
        model(input_ids=ids, attention_mask=mask, traversal_mask=torch.ones(2, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"traversal_mask has shape \(1, 7\) but the prompt is \(2, 7\)"):
        model.generate(input_ids=ids, attention_mask=mask, traversal_mask=torch.ones(1, 7, dtype=torch.bool),
                       max_new_tokens=2)


@pytest.mark.parametrize("field,value", [("inference_traversal", "answer"), ("training_traversal", "question"),
                                         ("gate_init_mixing_ratio", 1.0), ("vision_feature_select_strategy", "cls")])
def test_config_rejects_unknown_knob_values(field, value):
    with pytest.raises(Exception, match=field):
        TrolConfig(text_config=LlamaConfig(**{"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4}),
                   **{field: value})


def test_a_sequence_longer_than_the_decoder_context_is_refused():
    model = tiny_model("llama")  # max_position_embeddings=1024
    with pytest.raises(ValueError, match=r"1025 tokens \(0 cached \+ 1025 new\), more than .*embeddings=1024"):
        model(input_ids=torch.randint(3, 100, (1, 1025)))
    with pytest.raises(ValueError, match=r"1025 tokens \(1024 cached \+ 1 new\)"):
        model.generate(input_ids=torch.randint(3, 100, (1, 1020)), max_new_tokens=10, min_new_tokens=10)


def test_text_only_training_batch_still_runs_the_vision_path_when_distributed(tmp_path):
    """ZeRO-3/FSDP gather parameters collectively: a rank whose micro-batch has no image must still use them."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        model = tiny_model("llama").train()
        ids, mask, _ = prompt_batch((7, 5), images_per_prompt=0)
        out = model(input_ids=ids, attention_mask=mask, labels=ids)
        out.loss.backward()
        grad = model.model.multi_modal_projector.linear_1.weight.grad
        assert grad is not None and torch.count_nonzero(grad) == 0  # used, with a zero contribution
        model.eval()
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, out.logits)
    finally:
        dist.destroy_process_group()
