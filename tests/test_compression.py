"""Visual context compression (LLaVolta) inside TroL: an independent hand-written reference, identity cases, pooling
arithmetic, cached generation, batching (left/right padding, different image counts, text-only rows), attention
implementations, gradients."""

import pytest
import torch
import torch.nn.functional as F
from tiny import DECODERS, IMAGE_SIZE, IMAGE_TOKEN, PAD, TOKENS_PER_IMAGE, position_ids_from, tiny_model
from transformers import DynamicCache
from trol.compression_trol import CACHE_RECORD, compression_groups, plan_compression


def compressed(model, layer=1, stride=3, at_inference=True):
    model.config.compression_layer = layer
    model.config.compression_stride = stride
    model.config.compression_at_inference = at_inference
    return model


def mixed_batch(rows=((1, 2, 3), (2, 1, 2), (0, 3, 4)), padding="left", seed=0):
    """One row per (n_images, text before, text after); adjacent images (no text between them, like tiles).

    Returns input_ids (B, P), attention_mask (B, P), pixel_values (n_images, 3, S, S) or None."""
    gen = torch.Generator().manual_seed(seed)
    sequences = []
    for n_images, before, after in rows:
        text = torch.randint(3, IMAGE_TOKEN - 1, (before + after,), generator=gen)
        image = torch.full((n_images * TOKENS_PER_IMAGE,), IMAGE_TOKEN)
        sequences.append(torch.cat([text[:before], image, text[before:]]))
    width = max(len(s) for s in sequences)
    ids = torch.full((len(rows), width), PAD, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        span = slice(width - len(seq), width) if padding == "left" else slice(0, len(seq))
        ids[row, span], mask[row, span] = seq, 1
    n_images = sum(r[0] for r in rows)
    pixels = torch.randn((n_images, 3, IMAGE_SIZE, IMAGE_SIZE), generator=gen) if n_images else None
    return ids, mask, pixels


def images_of(rows, row):
    start = sum(r[0] for r in rows[:row])
    return slice(start, start + rows[row][0])


def reference_logits(model, ids, pixels, layer, stride):
    """Hand-written TroL + LLaVolta forward of ONE unpadded sequence (Llama-style decoder, eager math, no cache):
    python-built groups, the mean of each, integer-mean positions, an explicit causal mask over the short sequence,
    two passes + gate in every layer, then each position takes its group's output."""
    lm = model.model.language_model
    ids = ids.tolist()
    hidden = lm.embed_tokens(torch.tensor(ids))
    if pixels is not None:
        image_positions = [i for i, t in enumerate(ids) if t == IMAGE_TOKEN]
        hidden[image_positions] = model.get_image_features(pixels).reshape(-1, hidden.shape[-1])
    groups, i = [], 0
    while i < len(ids):
        if ids[i] == IMAGE_TOKEN:  # one image = TOKENS_PER_IMAGE tokens; the next image starts a new group
            groups += [list(range(i + g, min(i + g + stride, i + TOKENS_PER_IMAGE)))
                       for g in range(0, TOKENS_PER_IMAGE, stride)]
            i += TOKENS_PER_IMAGE
        else:
            groups.append([i])
            i += 1
    hidden, positions = hidden[None], torch.arange(len(ids))
    for index, layer_module in enumerate(lm.layers):
        if index == max(layer, 0):
            hidden = torch.stack([hidden[0, g].mean(0) for g in groups])[None]
            positions = torch.tensor([sum(g) // len(g) for g in groups])
        n = hidden.shape[1]
        additive = torch.zeros(1, 1, n, n).masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), -1e30)
        rope = lm.rotary_emb(hidden, positions[None])
        forward = type(layer_module).forward
        out1 = forward(layer_module, hidden, attention_mask=additive, position_ids=positions[None],
                       position_embeddings=rope)
        out2 = forward(layer_module, out1, attention_mask=additive, position_ids=positions[None],
                       position_embeddings=rope)
        gate = model.model.trol_gates[index]
        w = 0.5 * torch.tanh(F.linear(out1, gate.weight, gate.bias)) + 0.5
        hidden = (1 - w) * out1 + w * out2
    final = lm.norm(hidden)[0]
    if hidden.shape[1] != len(ids):  # expand: every position takes its group's output
        final = torch.stack([final[next(k for k, g in enumerate(groups) if i in g)] for i in range(len(ids))])
    return model.lm_head(final)


@pytest.mark.parametrize("layer", [0, 1])
@pytest.mark.parametrize("padding", ["left", "right"])
def test_compressed_batch_equals_hand_written_reference_for_each_row(layer, padding):
    """Rows with 1, 2 adjacent and 0 images, stride 3 over 4-token images (a ragged group of 1 per image)."""
    rows = ((1, 2, 3), (2, 1, 2), (0, 3, 4))
    model = compressed(tiny_model("llama"), layer=layer, stride=3)
    model.set_attn_implementation("eager")
    ids, mask, pixels = mixed_batch(rows, padding=padding)
    logits = model(input_ids=ids, attention_mask=mask, pixel_values=pixels,
                   position_ids=position_ids_from(mask)).logits
    assert logits.shape[:2] == ids.shape  # the caller's length
    for row in range(len(rows)):
        real = mask[row].bool()
        row_pixels = pixels[images_of(rows, row)] if rows[row][0] else None
        expected = reference_logits(model, ids[row, real], row_pixels, layer, 3)
        torch.testing.assert_close(logits[row, real], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("decoder, setting", [(d, "stride_1") for d in DECODERS] + [("llama", "layer_beyond")])
def test_stride_one_or_layer_beyond_the_decoder_equals_no_compression_exactly(decoder, setting):
    """Stride 1 runs the whole machinery (padding dropped, masks and positions rebuilt, output expanded): the real
    tokens' logits are bit-identical; padding positions' outputs are zero instead of the backbone's don't-care."""
    model = tiny_model(decoder)
    ids, mask, pixels = mixed_batch()
    inputs = {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}
    reference = model(**inputs).logits
    layer, stride = (1, 1) if setting == "stride_1" else (model.config.text_config.num_hidden_layers, 8)
    logits = compressed(model, layer, stride)(**inputs).logits
    real = mask.bool()
    torch.testing.assert_close(logits[real], reference[real], rtol=0, atol=0)


def test_image_token_lora_and_compression_with_stride_one_equal_no_compression_exactly():
    model = tiny_model("llama", image_token_lora_rank=4)
    with torch.no_grad():
        for loras in model.model.image_token_lora:
            for lora in loras.values():
                lora.lora_B.normal_()
    ids, mask, pixels = mixed_batch()
    inputs = {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}
    reference, real = model(**inputs).logits, mask.bool()
    torch.testing.assert_close(compressed(model, 0, 1)(**inputs).logits[real], reference[real], rtol=0, atol=0)
    assert (compressed(model, 0, 2)(**inputs).logits[real] - reference[real]).abs().max() > 1e-4


def test_1225_image_tokens_with_stride_8_pool_to_154_groups_with_a_ragged_tail():
    model = tiny_model("llama")
    n_image, hidden_size = 1225, model.config.text_config.hidden_size
    image_mask = torch.tensor([False] * 3 + [True] * n_image + [False] * 2)[None]
    hidden = torch.randn(1, image_mask.shape[1], hidden_size, dtype=torch.float64).float()
    positions = torch.arange(image_mask.shape[1])[None]
    plan = plan_compression(model.model.language_model, layer=1, stride=8, tokens_per_image=n_image, pool=True,
                            image_mask=image_mask, inputs_embeds=hidden, attention_mask=None, position_ids=positions,
                            past_key_values=None)
    assert n_image == 153 * 8 + 1 and plan.length == 3 + 154 + 2
    pooled = plan.pool(hidden)[0]
    torch.testing.assert_close(pooled[:3], hidden[0, :3], rtol=0, atol=0)  # text untouched
    torch.testing.assert_close(pooled[-2:], hidden[0, -2:], rtol=0, atol=0)
    images = hidden[0, 3:3 + n_image]
    torch.testing.assert_close(pooled[3:3 + 153], images[:1224].reshape(153, 8, -1).mean(1), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(pooled[3 + 153], images[1224], rtol=0, atol=0)  # the ragged group of one token
    expected_positions = [0, 1, 2] + [(3 + 8 * g + 3 + 8 * g + 7) // 2 for g in range(153)] + [1227, 1228, 1229]
    assert plan.position_ids[0].tolist() == expected_positions  # integer means: 3+8g+3.5 -> 3+8g+3
    assert plan.position_ids.dtype == torch.long
    expanded = plan.expand(pooled[None])[0]
    assert expanded.shape == hidden.shape[1:] and torch.equal(expanded[3 + 8], pooled[4])


def test_groups_never_span_two_images_and_reject_a_cut_image():
    # two adjacent 5-token images (tiles), stride 2: groups 2+2+1 per image, never 1 token of each
    image_mask = torch.tensor([[False] + [True] * 10 + [False]])
    starts = compression_groups(image_mask, tokens_per_image=5, stride=2)
    assert starts[0].tolist() == [True, True, False, True, False, True, True, False, True, False, True, True]
    with pytest.raises(ValueError, match="whole images"):
        compression_groups(torch.tensor([[False] + [True] * 7]), tokens_per_image=5, stride=2)


def no_cache_logits(model, sequences, prompt_mask, **model_inputs):
    """One forward over prompt + generated tokens, traversal on the prompt's tokens only."""
    n_new = sequences.shape[1] - prompt_mask.shape[1]
    attention = torch.cat([prompt_mask, torch.ones(prompt_mask.shape[0], n_new, dtype=prompt_mask.dtype)], 1)
    traversal = torch.cat([prompt_mask.bool(), torch.zeros(prompt_mask.shape[0], n_new, dtype=torch.bool)], 1)
    return model(input_ids=sequences, attention_mask=attention, position_ids=position_ids_from(attention),
                 traversal_mask=traversal, use_cache=False, **model_inputs).logits


@pytest.mark.parametrize("decoder, cache_implementation, layer", [
    ("llama", "dynamic", 0), ("llama", "static", 1), ("gemma2", "dynamic", 1), ("gemma2", "static", 0),
    ("phi3", "dynamic", 1)])
def test_compressed_prefill_and_cached_decoding_equal_one_no_cache_forward(decoder, cache_implementation, layer):
    model = compressed(tiny_model(decoder), layer=layer, stride=3)
    ids, mask, pixels = mixed_batch()
    n_new = 5
    out = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=n_new,
                         min_new_tokens=n_new, do_sample=False, cache_implementation=cache_implementation,
                         return_dict_in_generate=True, output_logits=True)
    reference = no_cache_logits(model, out.sequences, mask, pixel_values=pixels)[:, ids.shape[1] - 1:-1]
    torch.testing.assert_close(torch.stack(out.logits, dim=1), reference, rtol=1e-4, atol=1e-4)
    # layers >= K hold the compressed prompt. Rows (text + image tokens, padding dropped): 5+4 -> 5+2, 3+8 -> 3+4,
    # 7 -> 7; the batch is as wide as its widest compressed row: 11 columns -> 7, 4 removed
    cache, full = out.past_key_values, out.sequences.shape[1] - 1
    record = getattr(cache, CACHE_RECORD)
    assert record.layer == layer and record.removed == 4 and record.mask.shape == (3, 7 + n_new - 1)
    assert record.mask[:, :7].sum(1).tolist() == [7, 7, 7]
    if cache_implementation == "dynamic" and decoder != "gemma2":  # (gemma2's sliding layers keep a window only)
        lengths = [lay.keys.shape[-2] for lay in cache.layers]
        assert lengths == [full] * layer + [full - 4] * (len(lengths) - layer)


def test_left_padded_batch_with_different_image_counts_equals_each_prompt_alone():
    rows = ((1, 2, 3), (2, 1, 2), (0, 3, 4))
    model = compressed(tiny_model("llama"), layer=1, stride=3)
    ids, mask, pixels = mixed_batch(rows)
    kwargs = {"max_new_tokens": 5, "do_sample": False, "return_dict_in_generate": True, "output_logits": True}
    batched = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, **kwargs)
    for row in range(len(rows)):
        real = mask[row].bool()
        row_pixels = pixels[images_of(rows, row)] if rows[row][0] else None
        alone = model.generate(input_ids=ids[row:row + 1, real], pixel_values=row_pixels, **kwargs)
        assert torch.equal(batched.sequences[row, ids.shape[1]:], alone.sequences[0, int(real.sum()):])
        torch.testing.assert_close(torch.stack(batched.logits, 1)[row], torch.stack(alone.logits, 1)[0], rtol=1e-4,
                                   atol=1e-4)


@pytest.mark.parametrize("decoder", ["llama", "qwen2"])
def test_beam_search_with_compression_means_the_same_with_and_without_cache(decoder):
    model = compressed(tiny_model(decoder), layer=1, stride=2)
    ids, mask, pixels = mixed_batch(((1, 2, 3), (1, 1, 2)))
    kwargs = {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels, "max_new_tokens": 6, "do_sample": False,
                  "num_beams": 3}
    assert torch.equal(model.generate(**kwargs), model.generate(use_cache=False, **kwargs))


def test_beam_search_gives_every_copy_of_a_sample_its_own_images():
    """generate() copies each sample for its beams; pixel_values hold 1 and 2 images for the two samples here, and
    each copy must get its own sample's images in order (checked against generation from hand-merged embeddings,
    which involves no pixel_values)."""
    rows = ((1, 2, 3), (2, 1, 2))
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.multi_modal_projector.linear_2.weight.mul_(100)  # make the images matter to the scores
    ids, mask, pixels = mixed_batch(rows)
    _, expanded = model._expand_inputs_for_generation(expand_size=3, input_ids=ids, pixel_values=pixels)
    assert torch.equal(expanded["pixel_values"], pixels[[0, 0, 0, 1, 2, 1, 2, 1, 2]])
    kwargs = {"attention_mask": mask, "max_new_tokens": 4, "do_sample": False, "num_beams": 3,
              "return_dict_in_generate": True, "output_scores": True}
    from_pixels = model.generate(input_ids=ids, pixel_values=pixels, **kwargs)
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids)
        embeds[ids == IMAGE_TOKEN] = model.get_image_features(pixels).reshape(-1, embeds.shape[-1])
        from_embeds = model.generate(inputs_embeds=embeds, **kwargs)
    assert torch.equal(from_pixels.sequences[:, ids.shape[1]:], from_embeds.sequences)
    torch.testing.assert_close(from_pixels.sequences_scores, from_embeds.sequences_scores, rtol=1e-5, atol=1e-5)


def test_compressed_beam_search_over_samples_with_different_image_counts_equals_each_sample_alone():
    rows = ((1, 2, 3), (2, 1, 2))
    model = compressed(tiny_model("llama"), layer=1, stride=3)
    ids, mask, pixels = mixed_batch(rows)
    kwargs = {"max_new_tokens": 5, "do_sample": False, "num_beams": 3, "num_return_sequences": 2,
              "return_dict_in_generate": True, "output_scores": True}
    batched = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, **kwargs)
    for row in range(len(rows)):
        real = mask[row].bool()
        alone = model.generate(input_ids=ids[row:row + 1, real], pixel_values=pixels[images_of(rows, row)], **kwargs)
        ours = slice(2 * row, 2 * row + 2)
        assert torch.equal(batched.sequences[ours, ids.shape[1]:], alone.sequences[:, int(real.sum()):])
        torch.testing.assert_close(batched.sequences_scores[ours], alone.sequences_scores, rtol=1e-4, atol=1e-4)


def test_hand_driven_decoding_loop_on_a_compressed_cache_needs_nothing_extra():
    """The cache carries the compressed padding mask: a plain loop of forward calls decodes as generate() does."""
    model = compressed(tiny_model("llama"), layer=0, stride=3)
    ids, mask, pixels = mixed_batch()
    out = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=4,
                         min_new_tokens=4, do_sample=False, return_dict_in_generate=True, output_logits=True)
    cache = DynamicCache(config=model.config.text_config)
    attention = mask
    step = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, past_key_values=cache,
                 position_ids=position_ids_from(mask), use_cache=True).logits[:, -1]
    logits = []
    for token in out.sequences[:, ids.shape[1]:].T:
        logits.append(step)
        attention = torch.cat([attention, torch.ones(len(ids), 1, dtype=mask.dtype)], 1)
        step = model(input_ids=token[:, None], attention_mask=attention, past_key_values=cache,
                     position_ids=position_ids_from(attention)[:, -1:], use_cache=True).logits[:, -1]
    torch.testing.assert_close(torch.stack(logits, 1), torch.stack(out.logits, 1), rtol=1e-5, atol=1e-5)
    cache.reset()  # an emptied cache starts afresh, whatever its record said
    again = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, past_key_values=cache,
                  position_ids=position_ids_from(mask), use_cache=True).logits[:, -1]
    torch.testing.assert_close(again, logits[0], rtol=1e-5, atol=1e-5)
    assert getattr(cache, CACHE_RECORD).removed == 4


@pytest.mark.parametrize("padding", ["left", "right"])
def test_eager_and_sdpa_agree_with_compression(padding):
    model = compressed(tiny_model("llama"), layer=1, stride=3)
    ids, mask, pixels = mixed_batch(padding=padding)
    inputs = {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}
    outputs = {}
    for implementation in ("eager", "sdpa"):
        model.set_attn_implementation(implementation)
        outputs[implementation] = model(**inputs).logits
    real = mask.bool()
    torch.testing.assert_close(outputs["eager"][real], outputs["sdpa"][real], rtol=1e-5, atol=1e-5)
    assert torch.isfinite(outputs["sdpa"][real]).all()


def test_compression_is_off_in_eval_mode_unless_asked_for_inference():
    model = tiny_model("llama")
    ids, mask, pixels = mixed_batch()
    inputs = {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}
    plain = model(**inputs).logits
    compressed(model, layer=1, stride=3, at_inference=False)
    torch.testing.assert_close(model(**inputs).logits, plain, rtol=0, atol=0)
    model.train()  # training mode compresses (no dropout in the tiny model: a deterministic forward)
    assert (model(**inputs).logits - plain).abs().max() > 1e-4


def test_hidden_states_keep_the_input_length_and_text_only_calls_are_untouched():
    model = compressed(tiny_model("llama"), layer=1, stride=3)
    ids, mask, pixels = mixed_batch()
    out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, output_hidden_states=True)
    assert [h.shape[1] for h in out.hidden_states] == [ids.shape[1]] * 3
    text_ids, text_mask, _ = mixed_batch(((0, 4, 3), (0, 2, 2)))
    with_compression = model(input_ids=text_ids, attention_mask=text_mask).logits
    model.config.compression_layer = None
    torch.testing.assert_close(with_compression, model(input_ids=text_ids, attention_mask=text_mask).logits,
                               rtol=0, atol=0)


def test_gradient_checkpointing_gives_the_same_gradients_with_compression():
    model = compressed(tiny_model("llama"), layer=1, stride=3).train()
    ids, mask, pixels = mixed_batch(padding="right")

    def grads():
        model.zero_grad()
        logits = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
        F.cross_entropy(logits[mask.bool()][:-1], ids[mask.bool()][1:]).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = grads()
    model.activation_checkpointing_enable()
    checkpointed = grads()
    assert plain.keys() == checkpointed.keys() and "model.multi_modal_projector.linear_1.weight" in plain
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("field, value", [("compression_layer", -2), ("compression_layer", 1.5),
                                          ("compression_stride", 0), ("compression_stride", 2.0)])
def test_config_rejects_invalid_compression_settings(field, value):
    from tiny import tiny_config

    with pytest.raises(ValueError, match=field):
        tiny_config("llama", **{field: value})


def test_saved_folder_carries_the_compression_file(tmp_path):
    compressed(tiny_model("llama"), layer=2, stride=8).save_pretrained(tmp_path)
    assert (tmp_path / "compression_trol.py").is_file()
