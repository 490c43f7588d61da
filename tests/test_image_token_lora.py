"""The image-token LoRA ("partial LoRA" of TroL-1.8B/7B): a config option that adds scale * B(A(x)) to the decoder's
projections at image-token positions only, in both propagations."""

import copy
import pickle

import pytest
import torch
from tiny import (
    IMAGE_TOKEN,
    TOKENS_PER_IMAGE,
    position_ids_from,
    prompt_batch,
    tiny_model,
)
from transformers import BitsAndBytesConfig
from trol import TrolConfig, TrolForConditionalGeneration
from trol.traversal_trol import decoder_layers

RANK = 4


def randomize_lora(model, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.model.image_token_lora.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return model


def lora_model(**kwargs):
    return randomize_lora(tiny_model("llama", image_token_lora_rank=RANK, image_token_lora_alpha=2.0 * RANK, **kwargs))


def test_zero_b_leaves_the_model_exactly_as_without_lora():
    plain = tiny_model("llama")
    with_lora = tiny_model("llama", image_token_lora_rank=RANK)  # fresh: B = 0
    missing = with_lora.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert missing and all("image_token_lora" in k for k in missing)
    ids, mask, pixels = prompt_batch()
    assert torch.equal(with_lora(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits,
                       plain(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits)


def test_config_validates_and_round_trips():
    config = TrolConfig(image_token_lora_rank=8, image_token_lora_alpha=4.0)
    assert config.image_token_lora_scale == 0.5 and "q_proj" in config.image_token_lora_targets
    assert TrolConfig(image_token_lora_rank=8).image_token_lora_scale == 1.0
    with pytest.raises(ValueError, match="image_token_lora_rank"):
        TrolConfig(image_token_lora_rank=-1)
    with pytest.raises(ValueError, match="matches 0 modules"):
        tiny_model("llama", image_token_lora_rank=2, image_token_lora_targets=["wqkv"])


def merged_copy(model):
    """The same TroL model without image-token LoRA, with every LoRA delta merged into its projection."""
    config = copy.deepcopy(model.config)
    config.image_token_lora_rank = 0
    merged = TrolForConditionalGeneration(config).eval()
    merged.load_state_dict({k: v for k, v in model.state_dict().items() if "image_token_lora" not in k})
    with torch.no_grad():
        for layer, loras in zip(decoder_layers(merged.model.language_model), model.model.image_token_lora):
            modules = {name.rsplit(".", 1)[-1]: m for name, m in layer.named_modules()}
            for target, lora in loras.items():
                modules[target].weight += lora.scale * lora.lora_B @ lora.lora_A
    return merged


def test_a_prompt_of_image_tokens_only_equals_the_merged_weights_in_both_passes():
    # Every token is an image token, so the LoRA applies everywhere: the model must equal one whose projections
    # hold W + scale * B @ A, with traversal on (both propagations see the delta).
    model = lora_model()
    ids = torch.full((2, TOKENS_PER_IMAGE), IMAGE_TOKEN)
    pixels = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(3))
    got = model(input_ids=ids, pixel_values=pixels).logits
    want = merged_copy(model)(input_ids=ids, pixel_values=pixels).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    unmerged = copy.deepcopy(merged_copy(model))
    unmerged.load_state_dict({k: v for k, v in model.state_dict().items() if "image_token_lora" not in k})
    assert (unmerged(input_ids=ids, pixel_values=pixels).logits - got).abs().max() > 1e-2  # the delta matters


def test_text_tokens_before_the_image_are_untouched_and_later_ones_change():
    model = lora_model()
    plain = copy.deepcopy(model)
    with torch.no_grad():
        for p in plain.model.image_token_lora.parameters():
            p.zero_()
    ids, mask, pixels = prompt_batch()
    got = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
    base = plain(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
    for row in range(ids.shape[0]):
        first = int((ids[row] == IMAGE_TOKEN).float().argmax())
        assert torch.equal(got[row, :first], base[row, :first])  # causal: nothing before the image sees the delta
        assert (got[row, first:] - base[row, first:]).abs().max() > 1e-3


@pytest.mark.parametrize("cache_implementation", ["dynamic", "static"])
def test_cached_generation_equals_one_no_cache_forward(cache_implementation):
    model = lora_model()
    ids, mask, pixels = prompt_batch()
    out = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=4, min_new_tokens=4,
                         do_sample=False, return_dict_in_generate=True, output_logits=True,
                         cache_implementation=cache_implementation)
    n_new = out.sequences.shape[1] - ids.shape[1]
    attention = torch.cat([mask, torch.ones(2, n_new, dtype=mask.dtype)], 1)
    traversal = torch.cat([mask.bool(), torch.zeros(2, n_new, dtype=torch.bool)], 1)
    reference = model(input_ids=out.sequences, attention_mask=attention, position_ids=position_ids_from(attention),
                      pixel_values=pixels, traversal_mask=traversal).logits[:, ids.shape[1] - 1:-1]
    torch.testing.assert_close(torch.stack(out.logits, 1), reference, atol=1e-5, rtol=1e-5)


def test_active_without_traversal_too():
    model = lora_model(use_traversal=False)
    merged = merged_copy(model)
    ids = torch.full((1, TOKENS_PER_IMAGE), IMAGE_TOKEN)
    pixels = torch.randn(1, 3, 28, 28)
    torch.testing.assert_close(model(input_ids=ids, pixel_values=pixels).logits,
                               merged(input_ids=ids, pixel_values=pixels).logits, atol=1e-5, rtol=1e-5)


def test_checkpointing_gives_the_same_lora_gradients():
    model = lora_model().train()
    ids, mask, pixels = prompt_batch()

    def grads(checkpointing):
        model.zero_grad()
        (model.activation_checkpointing_enable if checkpointing else model.activation_checkpointing_disable)()
        model(input_ids=ids, attention_mask=mask, pixel_values=pixels, use_cache=False).logits.pow(2).mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if "image_token_lora" in n}

    plain, checkpointed = grads(False), grads(True)
    assert len(plain) == 2 * 7 * 2 and all(g.abs().sum() > 0 for g in plain.values())
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5)


def test_survives_deepcopy_pickle_save_and_quantized_load(tmp_path):
    model = lora_model()
    ids, mask, pixels = prompt_batch()
    expected = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
    for other in (copy.deepcopy(model), pickle.loads(pickle.dumps(lora_model()))):
        assert torch.equal(other(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits, expected)
    model.save_pretrained(tmp_path)
    loaded = TrolForConditionalGeneration.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(loaded(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits, expected,
                               atol=1e-6, rtol=1e-6)
    quantized = TrolForConditionalGeneration.from_pretrained(
        tmp_path, quantization_config=BitsAndBytesConfig(load_in_8bit=True)).eval()
    q_proj = decoder_layers(quantized.model.language_model)[0].self_attn.q_proj
    assert type(q_proj).__name__ == "Linear8bitLt" and len(q_proj._forward_hooks) >= 1
    got = quantized(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
    unhooked = copy.deepcopy(quantized)
    with torch.no_grad():
        for p in unhooked.model.image_token_lora.parameters():
            p.zero_()
    gap = (unhooked(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits - expected).abs().max()
    assert (got - expected).abs().max() < 0.1 * gap  # 8-bit error is small next to the LoRA's effect


def test_peft_lora_on_top_keeps_one_image_token_delta():
    peft = pytest.importorskip("peft")
    model = lora_model()
    ids, mask, pixels = prompt_batch()
    expected = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
    wrapped = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(
        r=2, target_modules=r".*language_model.*\.(q_proj|v_proj)", init_lora_weights=True))
    torch.testing.assert_close(wrapped(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits, expected,
                               atol=1e-6, rtol=1e-6)
    from trol.traversal_trol import install_image_token_lora

    install_image_token_lora(wrapped.base_model.model)  # idempotent: must not hook the PEFT wrapper a second time
    torch.testing.assert_close(wrapped(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits, expected,
                               atol=1e-6, rtol=1e-6)
