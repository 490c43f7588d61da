"""The traversal engine against the contract (TROL.md section 2): backbone parity, an independent two-pass reference,
cached generation == uncached forward, first-pass-only KV cache, question-only traversal."""

import pytest
import torch
import torch.nn.functional as F
from tiny import DECODERS, IMAGE_TOKEN, position_ids_from, prompt_batch, tiny_model
from transformers import AutoModelForCausalLM, DynamicCache

DECODER_NAMES = list(DECODERS)


def backbone_of(model):
    """The plain decoder + head of a TroL model, as transformers' own *ForCausalLM with the same weights."""
    backbone = AutoModelForCausalLM.from_config(model.config.text_config).eval()
    backbone.model.load_state_dict(model.model.language_model.state_dict())
    backbone.lm_head.load_state_dict(model.lm_head.state_dict())
    backbone.set_attn_implementation(model.config.text_config._attn_implementation)
    return backbone


def close_gates(model):
    """w = 0.5*tanh(-inf)+0.5 = 0 exactly for every token."""
    with torch.no_grad():
        for gate in model.model.trol_gates:
            gate.weight.zero_()
            gate.bias.fill_(float("-inf"))


def text_prompt(lengths=(9, 6)):
    return prompt_batch(lengths, images_per_prompt=0)[:2]


@pytest.mark.parametrize("decoder", DECODER_NAMES)
def test_traversal_off_equals_backbone_exactly(decoder):
    model = tiny_model(decoder)
    ids, mask = text_prompt()
    model.config.use_traversal = False
    ours = model(input_ids=ids, attention_mask=mask).logits
    reference = backbone_of(model)(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(ours, reference, rtol=0, atol=0)


@pytest.mark.parametrize("decoder", DECODER_NAMES)
def test_closed_gates_equal_backbone_exactly_in_forward_and_cached_generation(decoder):
    model = tiny_model(decoder)
    ids, mask = text_prompt()
    plain = tiny_model(decoder, use_traversal=False)
    plain.load_state_dict(model.state_dict())
    close_gates(model)
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits,
                               plain(input_ids=ids, attention_mask=mask).logits, rtol=0, atol=0)
    # the second pass runs (w=0 only silences its mixing): a cache it polluted would change these tokens
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert torch.equal(model.generate(**kwargs), plain.generate(**kwargs))


@pytest.mark.parametrize("decoder", DECODER_NAMES)
def test_traversal_changes_logits_when_gates_open(decoder):
    model = tiny_model(decoder)
    ids, mask = text_prompt()
    ours = model(input_ids=ids, attention_mask=mask).logits
    model.config.use_traversal = False
    plain = model(input_ids=ids, attention_mask=mask).logits
    assert (ours - plain).abs().max() > 1e-3


def reference_two_pass_logits(model, input_ids, attention_mask, traversal_mask):
    """Hand-written TroL forward (no cache, eager attention, explicit additive mask) for Llama-style decoders."""
    lm, config = model.model.language_model, model.config.text_config
    hidden = lm.embed_tokens(input_ids)
    batch, length = input_ids.shape
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    allowed = causal[None] & attention_mask.bool()[:, None, :]
    additive = torch.zeros(batch, 1, length, length).masked_fill(~allowed[:, None], torch.finfo(hidden.dtype).min)
    positions = position_ids_from(attention_mask)
    position_embeddings = lm.rotary_emb(hidden, positions)
    for i, layer in enumerate(lm.layers):
        forward = type(layer).forward
        out1 = forward(layer, hidden, attention_mask=additive, position_ids=positions,
                       position_embeddings=position_embeddings)
        out2 = forward(layer, out1, attention_mask=additive, position_ids=positions,
                       position_embeddings=position_embeddings)
        gate = model.model.trol_gates[i if len(model.model.trol_gates) > 1 else 0]
        w = 0.5 * torch.tanh(F.linear(out1, gate.weight, gate.bias)) + 0.5
        mixed = (1 - w) * out1 + w * out2
        hidden = torch.where(traversal_mask[..., None], mixed, out1)
    assert config.num_hidden_layers == len(lm.layers)
    return model.lm_head(lm.norm(hidden))


@pytest.mark.parametrize("decoder", ["llama", "qwen2", "qwen3", "mistral", "phi3"])
@pytest.mark.parametrize("share_gates", [False, True])
def test_traversal_equals_hand_written_two_pass_reference(decoder, share_gates):
    model = tiny_model(decoder, share_gates=share_gates)
    model.set_attn_implementation("eager")
    ids, mask = text_prompt()
    traversal = mask.bool().clone()
    traversal[0, -2:] = False  # a partial mask: these tokens take the plain first pass
    ours = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from(mask),
                 traversal_mask=traversal).logits
    reference = reference_two_pass_logits(model, ids, mask, traversal)
    real = mask.bool()
    torch.testing.assert_close(ours[real], reference[real], rtol=1e-5, atol=1e-5)


def test_gradients_flow_through_both_propagations_as_in_the_reference():
    model = tiny_model("llama").train()
    model.set_attn_implementation("eager")
    ids, mask = text_prompt()
    traversal = mask.bool()

    def grads(logits):
        model.zero_grad()
        F.cross_entropy(logits[mask.bool()][:-1], ids[mask.bool()][1:]).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    ours = grads(model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from(mask)).logits)
    reference = grads(reference_two_pass_logits(model, ids, mask, traversal))
    assert ours.keys() == reference.keys() and "model.trol_gates.1.bias" in ours
    for name in ours:
        torch.testing.assert_close(ours[name], reference[name], rtol=1e-4, atol=1e-6, msg=name)


def no_cache_logits(model, sequences, prompt_mask, traversal_prompt, **model_inputs):
    """One forward over prompt+generated, traversal on the prompt's tokens only."""
    n_new = sequences.shape[1] - prompt_mask.shape[1]
    attention = torch.cat([prompt_mask, torch.ones(prompt_mask.shape[0], n_new, dtype=prompt_mask.dtype)], 1)
    traversal = torch.cat([traversal_prompt, torch.zeros(prompt_mask.shape[0], n_new, dtype=torch.bool)], 1)
    return model(input_ids=sequences, attention_mask=attention, position_ids=position_ids_from(attention),
                 traversal_mask=traversal, use_cache=False, **model_inputs).logits


@pytest.mark.parametrize("decoder", DECODER_NAMES)
@pytest.mark.parametrize("cache_implementation", ["dynamic", "static"])
def test_cached_generation_equals_one_no_cache_forward_with_prompt_mask(decoder, cache_implementation):
    model = tiny_model(decoder)
    ids, mask, pixels = prompt_batch((9, 6))
    n_new = 5
    out = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=n_new,
                         min_new_tokens=n_new, do_sample=False, cache_implementation=cache_implementation,
                         return_dict_in_generate=True, output_logits=True)
    generated_logits = torch.stack(out.logits, dim=1)  # (B, n_new, V) raw logits of each step
    reference = no_cache_logits(model, out.sequences, mask, mask.bool(), pixel_values=pixels)
    reference = reference[:, ids.shape[1] - 1:-1]
    torch.testing.assert_close(generated_logits, reference, rtol=1e-4, atol=1e-4)
    # the cache holds the first propagation's K/V of prompt + generated tokens (the last token is never fed)
    assert int(out.past_key_values.get_seq_length()) == out.sequences.shape[1] - 1
    if cache_implementation == "dynamic":
        for layer in out.past_key_values.layers:
            expected = out.sequences.shape[1] - 1
            if layer.is_sliding:
                expected = min(expected, model.config.text_config.sliding_window - 1)
            assert layer.keys.shape[-2] == expected


@pytest.mark.parametrize("decoder", ["llama", "gemma2"])
def test_question_answer_mode_traverses_each_decoded_token_against_the_cache(decoder):
    """In `question_answer` mode a decoded token traverses too; its second pass sees the cached first-pass K/V of
    earlier tokens plus its own (contract 2.2), which a hand-driven prefill + step loop reproduces."""
    model = tiny_model(decoder, inference_traversal="question_answer")
    ids, mask, pixels = prompt_batch((9, 6))
    out = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=4,
                         min_new_tokens=4, do_sample=False, return_dict_in_generate=True, output_logits=True)
    cache = DynamicCache(config=model.config.text_config)
    attention, logits = mask, []
    step = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from(mask), pixel_values=pixels,
                 past_key_values=cache, use_cache=True).logits[:, -1]
    for token in out.sequences[:, ids.shape[1]:].T:
        logits.append(step)
        attention = torch.cat([attention, torch.ones(2, 1, dtype=mask.dtype)], 1)
        step = model(input_ids=token[:, None], attention_mask=attention,
                     position_ids=position_ids_from(attention)[:, -1:], past_key_values=cache, use_cache=True,
                     traversal_mask=torch.ones(2, 1, dtype=torch.bool)).logits[:, -1]
    torch.testing.assert_close(torch.stack(out.logits, 1), torch.stack(logits, 1), rtol=1e-4, atol=1e-4)
    question_only = no_cache_logits(model, out.sequences, mask, mask.bool(), pixel_values=pixels)
    assert (question_only[:, -2] - logits[-1]).abs().max() > 1e-4  # decoded tokens really traversed


@pytest.mark.parametrize("decoder", DECODER_NAMES)
@pytest.mark.parametrize("num_beams", [1, 5])
def test_generation_means_the_same_with_and_without_cache(decoder, num_beams):
    model = tiny_model(decoder)
    ids, mask, pixels = prompt_batch((9, 6))
    kwargs = dict(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=6, do_sample=False,
                  num_beams=num_beams)
    cached = model.generate(**kwargs)
    uncached = model.generate(use_cache=False, **kwargs)
    assert torch.equal(cached, uncached)
    assert not (cached[:, ids.shape[1]:] == IMAGE_TOKEN).any()  # the image token is never generated


def test_sampling_generation_runs_and_is_seeded():
    model = tiny_model("llama")
    ids, mask, pixels = prompt_batch((9, 6))
    kwargs = dict(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=5, do_sample=True,
                  top_k=20, temperature=1.0)
    torch.manual_seed(3)
    first = model.generate(**kwargs)
    torch.manual_seed(3)
    assert torch.equal(first, model.generate(**kwargs))


@pytest.mark.parametrize("decoder", ["llama", "gemma2"])
def test_left_padded_batch_equals_each_prompt_alone(decoder):
    model = tiny_model(decoder)
    ids, mask, pixels = prompt_batch((9, 6))
    batched = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=5,
                             do_sample=False)
    for row in range(2):
        real = mask[row].bool()
        alone = model.generate(input_ids=ids[row:row + 1, real], pixel_values=pixels[row:row + 1],
                               max_new_tokens=5, do_sample=False)
        assert torch.equal(batched[row, ids.shape[1]:], alone[0, real.sum():])


def test_default_rule_traverses_on_empty_cache_only():
    model = tiny_model("llama")
    ids, mask = text_prompt((8, 8))
    cache = DynamicCache(config=model.config.text_config)
    prefill = model(input_ids=ids[:, :6], past_key_values=cache, use_cache=True).logits
    step = model(input_ids=ids[:, 6:], past_key_values=cache, use_cache=True).logits
    explicit = torch.tensor([[True] * 6 + [False] * 2] * 2)
    full = model(input_ids=ids, traversal_mask=explicit, use_cache=False).logits
    torch.testing.assert_close(torch.cat([prefill, step], 1), full, rtol=1e-5, atol=1e-5)
    everywhere = model(input_ids=ids, use_cache=False).logits  # empty cache: every token traverses
    assert (everywhere[:, 6:] - full[:, 6:]).abs().max() > 1e-4


def test_inference_traversal_none_is_the_backbone_and_explicit_mask_overrides_it():
    model = tiny_model("llama", inference_traversal="none")
    ids, mask = text_prompt()
    off = model(input_ids=ids, attention_mask=mask).logits
    model.config.use_traversal = False
    torch.testing.assert_close(off, model(input_ids=ids, attention_mask=mask).logits, rtol=0, atol=0)
    model.config.use_traversal = True
    forced = model(input_ids=ids, attention_mask=mask, traversal_mask=mask.bool()).logits
    assert (forced - off).abs().max() > 1e-3


def test_padding_tokens_never_traverse_and_do_not_affect_real_tokens():
    model = tiny_model("llama")
    ids, mask = text_prompt((9, 6))
    default = model(input_ids=ids, attention_mask=mask).logits
    everything = model(input_ids=ids, attention_mask=mask, traversal_mask=torch.ones_like(mask, dtype=torch.bool))
    real = mask.bool()
    torch.testing.assert_close(default[real], everything.logits[real], rtol=0, atol=0)


def test_generate_from_inputs_embeds_equals_generate_from_ids_and_pixels():
    model = tiny_model("llama")
    ids, mask, pixels = prompt_batch((9, 6))
    embeds = model.get_input_embeddings()(ids)
    embeds[ids == IMAGE_TOKEN] = model.get_image_features(pixels).reshape(-1, 32)
    from_embeds = model.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=5, do_sample=False)
    from_ids = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=5,
                              do_sample=False)
    assert torch.equal(from_embeds, from_ids[:, ids.shape[1]:])


@pytest.mark.parametrize("draft", ["trol", "plain_llm"])
def test_assisted_generation_with_a_draft_model_equals_greedy(draft):
    """The traversal mask is not handed to the draft model (a plain LLM would refuse it, a TroL one mis-size it)."""
    model = tiny_model("llama")
    ids, mask = text_prompt((9,))
    assistant = tiny_model("llama", seed=1) if draft == "trol" else \
        AutoModelForCausalLM.from_config(model.config.text_config).eval()
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert torch.equal(model.generate(assistant_model=assistant, **kwargs), model.generate(**kwargs))
