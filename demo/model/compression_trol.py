"""Visual context compression (LLaVolta: Chen et al., "Efficient Large Multi-modal Models via Visual Context
Compression", NeurIPS 2024) inside TroL's own layer loop.

At the input of decoder layer K (`config.compression_layer`; 0 or -1: before the first layer) the image tokens of each
image (or tile) are average-pooled in groups of S (`config.compression_stride`); text tokens are untouched. Layers
K..N-1 (both TroL propagations of each) then run on the shorter sequence. Everything the decoder loop hands those
layers is substituted once per call: the attention masks (rebuilt with transformers' own `create_causal_mask` /
`create_sliding_window_causal_mask` from a 2-D padding mask of the compressed sequence, so eager, sdpa and
flash-attention all work) and `position_embeddings` (recomputed by the decoder's rotary embedding from the pooled
positions; `position_ids` becomes None, see `CompressionPlan.enter`). After the last layer `TrolModel.forward` expands the output back to the caller's length.

Semantics (where this departs from the LLaVolta code, and why):
- A group never spans two images or two tiles: images are cut at multiples of `config.image_seq_length` image tokens
  (adjacent tiles form one run of image tokens). The ragged last group of an image is averaged over its real size
  (1225 tokens with S=8: 153 groups of 8 and one of 1). Pooling sums in fp32 (bf16-safe).
- A pooled token's position is the integer mean of its group's positions (floor of the integer sum divided by the
  integer count, never fp16 math); text tokens keep their positions, so positions have gaps (RoPE sees real ones).
- Batches: rows compress to different lengths (different image counts, text-only rows). Padding tokens (attention
  mask 0) are dropped, and each row's compressed tokens end at the last column (the free slots are padding at the
  LEFT of the row: masked out, hidden state zero, position 0), so left padding, right padding and mixed batches all
  work, and padding never widens the compressed batch. The original supported batch size 1 and right padding only.
- Expansion: each input position gets the final hidden state of the compressed token it was pooled into: a text
  position its own, every image position its group's; padding positions get zeros. The last image token's output is
  thus the last group's, which predicts the next text token exactly as in LLaVolta's compressed sequence; image and
  padding positions carry no label, so losses computed outside the model (TRL's fused LM head) stay aligned with
  full-length labels.
- Per-token masks are pooled with "any": a group traverses (TroL mask) / is an image token (image-token LoRA) when
  one of its tokens does. Output hidden states of layers >= K are expanded like the last one; attention maps of those
  layers are returned over the compressed sequence.
- Sliding-window layers count their window in compressed tokens (the cache holds compressed entries).
- Cache: layers >= K hold the compressed sequence. A `CompressedCache` record on the cache object (attribute
  `trol_compression`) keeps the 2-D padding mask of what those layers hold and how many tokens pooling removed, so
  every later call (generate's decoding steps, a hand-written loop, beam search) rebuilds their masks and knows the
  real token count. Rows differ only between batch items, never between the beams of one item, so beam reordering
  needs no change to the record; cropping (assisted decoding) only removes decoded tokens, which are never pooled.

This file is remote code: it imports torch and transformers only.
"""

import inspect
from dataclasses import dataclass, replace

import torch
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

CACHE_RECORD = "trol_compression"
"""Attribute of a transformers `Cache` holding the `CompressedCache` record of a compressed generation."""

_MASK_FUNCTIONS = {"full_attention": create_causal_mask, "sliding_attention": create_sliding_window_causal_mask}


def first_compressed_layer(layer: int | None, num_layers: int) -> int | None:
    """The index of the first decoder layer that sees the compressed sequence, or None when nothing is compressed
    (compression off, or K >= number of layers). K = -1 and K = 0 both mean "before the first layer"."""
    if layer is None or layer >= num_layers:
        return None
    return max(layer, 0)


def compression_groups(image_mask: torch.Tensor, tokens_per_image: int, stride: int) -> torch.Tensor:
    """(B, q) bool: True where a compressed token starts. Every text token starts one; image tokens start one at
    every S-th token of their image. Images are consecutive runs of `tokens_per_image` image tokens (adjacent images
    or tiles form one longer run), so the token's index inside its image is its image-token count modulo that size.

    Raises ValueError when a row's image tokens are not whole images (a prompt chunk that cuts an image)."""
    image_mask = image_mask.bool()
    count = image_mask.long().cumsum(1)  # 1-based rank of each image token in its row
    offset = (count - 1) % tokens_per_image  # index inside its own image (meaningful at image tokens)
    previous = torch.nn.functional.pad(image_mask, (1, 0))[:, :-1]
    cut = image_mask & ~previous & (offset != 0)  # a run of image tokens must start a new image
    if bool((count[:, -1] % tokens_per_image != 0).any() | cut.any()):
        raise ValueError(
            f"Visual context compression pools whole images of {tokens_per_image} image tokens, but this chunk holds "
            f"image tokens per row {count[:, -1].tolist()} (runs must be whole images). Give each image's tokens in "
            "one call (no chunked prefill through an image)."
        )
    return ~image_mask | (offset % stride == 0)


def layer_type(text_config, layer_idx: int) -> str:
    """The attention type of a decoder layer as its model builds the mask for it."""
    types = getattr(text_config, "layer_types", None)
    if types:
        return types[layer_idx]
    return "sliding_attention" if getattr(text_config, "sliding_window", None) is not None else "full_attention"


@dataclass
class CompressedCache:
    """Kept on a `Cache` (attribute `trol_compression`) whose layers >= `layer` hold a compressed sequence.

    mask: (B, n) bool, the padding mask of every entry fed to the compressed layers so far (only the first
    `cache.get_seq_length(layer)` columns count: a cropped cache is read correctly); removed: tokens removed by
    pooling so far, so that real length = compressed length + removed."""

    layer: int
    mask: torch.Tensor
    removed: int = 0


def cache_record(cache) -> CompressedCache | None:
    """The cache's compression record; None when there is none or the cache was emptied since (`cache.reset()`)."""
    record = getattr(cache, CACHE_RECORD, None) if cache is not None else None
    if record is not None and int(cache.get_seq_length(record.layer)) == 0:
        return None
    return record


def seen_tokens(cache) -> int:
    """Tokens fed to the model so far at full length (what an uncompressed cache would hold)."""
    if cache is None:
        return 0
    record = cache_record(cache)
    if record is None:
        return int(cache.get_seq_length())
    return int(cache.get_seq_length(record.layer)) + record.removed


@dataclass
class CompressionPlan:
    """How one forward call runs layers >= `layer`, computed once per call before the decoder runs.

    index: (B*q,) long, the flat (row * length + column) compressed slot of every input position, B*length for padding
        positions (a dropped slot); None when this call pools nothing (decoding steps on a compressed cache: only the
        masks of layers >= K differ).
    counts: (B*length,) fp32 group sizes (0 at the free padding slots); length: compressed chunk length.
    position_ids: (B, length) long; kv_mask: (B, past + length) bool padding mask of the compressed layers' K/V.
    masks: attention mask per layer type; position_embeddings: per layer type (None when positions are unchanged).
    state: the traversal state the compressed layers use (per-token masks pooled); set by `compress_state`."""

    layer: int
    batch: int
    input_length: int
    length: int
    index: torch.Tensor | None
    counts: torch.Tensor | None
    position_ids: torch.Tensor
    kv_mask: torch.Tensor
    past_length: int
    layer_types: dict[int, str]
    masks: dict[str, object]
    position_embeddings: dict[str, object] | None
    state: object = None

    @property
    def pools(self) -> bool:
        return self.index is not None

    # -- per-token data ----------------------------------------------------------------------------------------------
    def pool(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """(B, q, H) -> (B, length, H): the mean of each group (text tokens unchanged), summed in fp32."""
        batch, _, hidden = hidden_states.shape
        index = self.index.to(hidden_states.device)
        summed = hidden_states.new_zeros((batch * self.length + 1, hidden), dtype=torch.float32)  # + dropped slot
        summed = summed.index_add(0, index, hidden_states.reshape(-1, hidden).float())[:-1]
        counts = self.counts.to(hidden_states.device).clamp(min=1)[:, None]
        return (summed / counts).to(hidden_states.dtype).view(batch, self.length, hidden)

    def pool_any(self, mask: torch.Tensor | None) -> torch.Tensor | None:
        """(B, q) bool -> (B, length) bool: True where one of the group's tokens is True (False at extra slots)."""
        if mask is None or not self.pools:
            return mask
        flat = mask.new_zeros(self.batch * self.length + 1, dtype=torch.long)
        flat = flat.index_add(0, self.index.to(mask.device), mask.reshape(-1).long())[:-1]
        return flat.view(self.batch, self.length) > 0

    def expand(self, hidden_states: torch.Tensor | None) -> torch.Tensor | None:
        """(B, length, H) -> (B, q, H): every input position gets its compressed token's state, padding zeros."""
        if hidden_states is None or not self.pools:
            return hidden_states
        batch, _, hidden = hidden_states.shape
        flat = torch.cat([hidden_states.reshape(-1, hidden), hidden_states.new_zeros((1, hidden))])
        flat = flat.index_select(0, self.index.to(hidden_states.device))
        return flat.view(batch, self.input_length, hidden)

    def expand_hidden_states(self, hidden_states: tuple | None) -> tuple | None:
        """The decoder's `hidden_states` tuple (input of layer 0, outputs of layers 0..N-1): entries >= K+1 are
        compressed outputs and are expanded like the last one."""
        if hidden_states is None or not self.pools:
            return hidden_states
        return tuple(h if i <= self.layer else self.expand(h) for i, h in enumerate(hidden_states))

    def compress_state(self, state) -> None:
        """Store the traversal state of the compressed layers: `state` with its per-token masks pooled."""
        self.state = replace(state, mask=self.pool_any(state.mask), image_mask=self.pool_any(state.image_mask),
                             compression=None)

    # -- what a compressed layer receives ----------------------------------------------------------------------------
    def enter(self, layer_idx: int, hidden_states: torch.Tensor, kwargs: dict):
        """Called by layer `layer_idx` >= K: pool its input if it is layer K; return (hidden_states, kwargs with the
        compressed sequence's mask/positions, traversal state of the compressed layers)."""
        if layer_idx == self.layer and self.pools:
            hidden_states = self.pool(hidden_states)
        kwargs = dict(kwargs)
        kind = self.layer_types[layer_idx]
        if "attention_mask" in kwargs:
            kwargs["attention_mask"] = self.masks[kind]
        if self.position_embeddings is not None:
            if "position_ids" in kwargs:
                # Layers read positions from `position_embeddings`; `position_ids` only reaches the attention function,
                # where flash-attention would take the gaps of pooled positions for packed sequences.
                kwargs["position_ids"] = None
            if "position_embeddings" in kwargs:
                kwargs["position_embeddings"] = self.position_embeddings[kind]
        return hidden_states, kwargs, self.state

    def record(self, cache) -> None:
        """After the call: note in the cache what its compressed layers now hold (if the call wrote to it)."""
        if cache is None or not hasattr(cache, "layers") or self.layer >= len(cache.layers):
            return
        if int(cache.get_seq_length(self.layer)) != self.past_length + self.length:
            return  # the call did not update the cache (training with gradient checkpointing drops it)
        previous = cache_record(cache) if self.past_length else None  # a record older than an emptied cache is stale
        removed = (previous.removed if previous is not None else 0) + self.input_length - self.length
        setattr(cache, CACHE_RECORD, CompressedCache(self.layer, self.kv_mask, removed))


def plan_compression(language_model, *, layer: int, stride: int, tokens_per_image: int, pool: bool,
                     image_mask: torch.Tensor | None, inputs_embeds: torch.Tensor,
                     attention_mask: torch.Tensor | None, position_ids: torch.Tensor, past_key_values) -> CompressionPlan:
    """Everything layers >= `layer` need for this call.

    pool: whether this call's image tokens are pooled (False: only the masks of a compressed cache are rebuilt).
    image_mask (B, q) bool; inputs_embeds (B, q, H) (batch, length, dtype, device); attention_mask: 2-D (B, past + q)
    padding mask or None; position_ids (B, q) real positions of the call's tokens; past_key_values: the cache."""
    text_config = language_model.config
    batch, length = inputs_embeds.shape[:2]
    device = inputs_embeds.device
    if attention_mask is not None and attention_mask.ndim != 2:
        raise ValueError(
            f"Visual context compression rebuilds the attention masks of the compressed layers from a 2-D padding "
            f"mask; got a {attention_mask.ndim}-D attention_mask. Pass the (batch, length) padding mask instead."
        )
    if position_ids.ndim != 2:
        raise ValueError(f"Visual context compression needs (batch, length) position_ids, got {position_ids.ndim}-D.")
    position_ids = position_ids.to(device).expand(batch, length)
    real = attention_mask[:, -length:].to(device, torch.bool) if attention_mask is not None else \
        torch.ones((batch, length), dtype=torch.bool, device=device)

    # the padding mask of what the compressed layers already hold
    record = cache_record(past_key_values)
    past = int(past_key_values.get_seq_length(layer)) if past_key_values is not None else 0
    if record is not None:
        if record.mask.shape[0] != batch or record.mask.shape[1] < past:
            raise ValueError(
                f"The cache's compression record holds a {tuple(record.mask.shape)} padding mask but the call has "
                f"batch {batch} and the compressed layers hold {past} entries: the cache was reshaped in a way "
                "compression does not follow (only greedy/sampling/beam search keep rows aligned)."
            )
        past_mask = record.mask[:, :past].to(device)
    elif past and attention_mask is not None:
        past_mask = attention_mask[:, :past].to(device, torch.bool)
    else:
        past_mask = torch.ones((batch, past), dtype=torch.bool, device=device)

    index = counts = None
    new_length, new_positions, chunk_mask = length, position_ids, real
    if pool:
        starts = compression_groups(image_mask.to(device), tokens_per_image, stride) & real  # padding is dropped
        n_per_row = starts.sum(1)
        new_length = max(int(n_per_row.max()), 1)
        slot = starts.long().cumsum(1) - 1 + (new_length - n_per_row)[:, None]  # rows end at the last column
        index = slot + torch.arange(batch, device=device)[:, None] * new_length
        index = index.masked_fill(~real, batch * new_length).reshape(-1)  # padding -> the dropped slot
        size = batch * new_length + 1
        group_size = torch.zeros(size, dtype=torch.long, device=device).index_add(0, index, torch.ones_like(index))
        position_sum = torch.zeros_like(group_size).index_add(0, index, position_ids.reshape(-1).long())
        group_size, position_sum = group_size[:-1], position_sum[:-1]
        new_positions = (position_sum // group_size.clamp(min=1)).view(batch, new_length)  # integer mean
        chunk_mask = (group_size > 0).view(batch, new_length)
        counts = group_size.float()
    kv_mask = torch.cat([past_mask, chunk_mask], dim=1)

    n_layers = text_config.num_hidden_layers
    types = {i: layer_type(text_config, i) for i in range(layer, n_layers)}
    unsupported = sorted(set(types.values()) - set(_MASK_FUNCTIONS))
    if unsupported:
        raise ValueError(
            f"Visual context compression supports full and sliding-window attention layers; layers >= {layer} of "
            f"this {text_config.model_type} decoder include {unsupported}. Compress at a later layer or turn it off."
        )
    shape = inputs_embeds.new_empty((batch, new_length, 0))  # mask creation reads batch, length, dtype, device
    masks = {}
    for kind in dict.fromkeys(types.values()):
        first = min(i for i, t in types.items() if t == kind)  # every layer of a kind holds the same entries
        masks[kind] = _MASK_FUNCTIONS[kind](config=text_config, inputs_embeds=shape, attention_mask=kv_mask,
                                            past_key_values=past_key_values, position_ids=new_positions,
                                            layer_idx=first)
    position_embeddings = None
    if pool:
        position_embeddings = _rotary_embeddings(language_model, inputs_embeds, new_positions, set(types.values()))
    return CompressionPlan(layer=layer, batch=batch, input_length=length, length=new_length, index=index,
                           counts=counts, position_ids=new_positions, kv_mask=kv_mask, past_length=past,
                           layer_types=types, masks=masks, position_embeddings=position_embeddings)


def _rotary_embeddings(language_model, like: torch.Tensor, position_ids: torch.Tensor, kinds: set[str]) -> dict:
    """The decoder's own rotary embedding at the pooled positions, per layer type (Gemma3-style rotaries take one)."""
    rotary = getattr(language_model, "rotary_emb", None)
    if rotary is None:
        raise ValueError(
            f"Visual context compression recomputes rotary position embeddings for the pooled positions, but "
            f"{type(language_model).__name__} has no `rotary_emb`; it supports decoders with rotary positions."
        )
    if "layer_type" in inspect.signature(rotary.forward).parameters:
        return {kind: rotary(like, position_ids, kind) for kind in kinds}
    shared = rotary(like, position_ids)
    return dict.fromkeys(kinds, shared)


__all__ = [
    "CACHE_RECORD",
    "CompressedCache",
    "CompressionPlan",
    "cache_record",
    "compression_groups",
    "first_compressed_layer",
    "layer_type",
    "plan_compression",
    "seen_tokens",
]
