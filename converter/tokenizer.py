"""The released checkpoints' tokenizers as transformers 5 fast (`tokenizers`-backed) tokenizers.

TroL-1.8B / 7B ship only InternLM2's sentencepiece `tokenizer.model` and load it with InternLM2's remote slow class
(`tokenization_internlm2.py`), which transformers 5 can no longer run. `convert_internlm2_tokenizer` rebuilds it as
a `tokenizers` pipeline that gives the same ids. What the slow tokenizer does, and how each step is mirrored here:

1. Added tokens first (the slow base class's trie): every token named in `tokenizer_config.json`
   (`added_tokens_decoder`, bos/eos/unk/pad, `additional_special_tokens`), `special_tokens_map.json` or
   `added_tokens.json` is cut out of the RAW text (its lstrip/rstrip/single_word flags honoured), and each text
   segment in between is encoded separately -> non-normalized added tokens, so every segment is normalized on its
   own (each gets its own dummy prefix, exactly as `sp.encode(segment)` does).
2. Each segment is `sp_model.encode(segment)`:
   - normalizer from the proto's `normalizer_spec`: the precompiled charsmap (empty for "identity"), then
     `remove_extra_whitespaces` (strip leading/trailing, collapse runs of U+0020 only: tabs and newlines are kept),
     `add_dummy_prefix` (one "▁" in front of a non-empty segment), `escape_whitespaces` (" " -> "▁");
   - sentencepiece `user_defined` pieces (InternLM2's `[UNUSED_TOKEN_141..146]`, ids 92538..92543) are matched
     atomically INSIDE the normalized segment: they become normalized added tokens, so "<s>[UNUSED_TOKEN_146]user"
     gives `<s>`, "▁", `[UNUSED_TOKEN_146]`, "user" (dummy prefix before the marker, none after it), as spm does;
   - BPE: sentencepiece merges the adjacent pair whose merged piece has the highest score; here the merges are
     ranked by that score. No pre-tokenizer (sentencepiece does not split on whitespace when encoding);
   - byte fallback: a character outside the vocabulary becomes its UTF-8 bytes `<0xNN>` (emoji, rare CJK).
3. `add_bos_token=True`, `add_eos_token=False` (the slow class's defaults; a config may override them): `<s>` in
   front when `add_special_tokens=True`. TroL itself writes `<s>` into the prompt and tokenizes with
   `add_special_tokens=False`: the literal `<s>` is an added token and becomes id 1 either way.
4. Decoding: "▁" -> " ", bytes fused back to UTF-8, and (as `sp.decode`) one leading space dropped with the dummy
   prefix (all leading spaces with `remove_extra_whitespaces`).

Departures from the slow class. Ids: a text segment that is nothing but one marker (the whole text
"[UNUSED_TOKEN_145]", or a marker alone between two added tokens, e.g. "<image>[UNUSED_TOKEN_145]") is the marker's
id alone, where sentencepiece writes its dummy prefix "▁" in front (see `_normalizer`); markers anywhere else, and
TroL's prompts, match. Decoding: the image token is a special token (dropped by `decode(skip_special_tokens=True)`);
`skip_special_tokens=False` writes special tokens verbatim without the slow class's stray spaces around them.
pad = eos (`</s>`), left padding, as the original code loads it.

TroL-3.8B (Phi-3 / InternVL-1.5 style) is loaded by `load_source_tokenizer`: its `tokenizer.json` as it is, or, when
the repo has only a Llama-style `tokenizer.model`, the same construction with the fast Llama conversion's
`legacy` semantics that the original code got from `LlamaTokenizerFast`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE
from transformers import PreTrainedTokenizerFast

from .common import ConversionError, read_json

logger = logging.getLogger(__name__)

INTERNLM2_IMAGE_TOKEN_ID = 92544
"""`<image>` of TroL-1.8B / 7B: the embedding row right after InternLM2's 92544-piece sentencepiece vocabulary."""
INTERNLM2_MAX_LENGTH = 32768
"""InternLM2's `max_position_embeddings` (plain RoPE up to here), the default `model_max_length`."""

SPIECE_UNDERLINE = "▁"
# sentencepiece_model.proto enums
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6
_SPM_BPE = 2
_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def read_sentencepiece_model(path: str | Path):
    """The `ModelProto` of a sentencepiece `.model` file (needs `protobuf`)."""
    try:
        from google.protobuf.message import DecodeError
        from transformers.convert_slow_tokenizer import import_protobuf

        model_pb2 = import_protobuf()
    except ImportError as err:
        raise ImportError(f"Reading {path} needs protobuf: pip install 'trol[convert]' ({err}).") from err
    proto = model_pb2.ModelProto()
    hint = "Is it a Git LFS pointer instead of the file? Download it again (`git lfs pull` / huggingface-cli)."
    try:
        proto.ParseFromString(Path(path).read_bytes())
    except DecodeError as err:
        raise ConversionError(f"{path} is not a sentencepiece model ({err}). {hint}") from err
    if len(proto.pieces) == 0:
        raise ConversionError(f"{path} holds no sentencepiece pieces. {hint}")
    return proto


def _token_spec(value) -> AddedToken | None:
    """A token as written in tokenizer_config.json / special_tokens_map.json: a string or an AddedToken dict."""
    if value is None:
        return None
    if isinstance(value, str):
        return AddedToken(value, normalized=False, special=True)
    if isinstance(value, Mapping) and "content" in value:
        return AddedToken(
            value["content"], single_word=bool(value.get("single_word", False)), lstrip=bool(value.get("lstrip", False)),
            rstrip=bool(value.get("rstrip", False)), normalized=False, special=bool(value.get("special", True)),
        )
    raise ConversionError(f"Cannot read the token {value!r}: expected a string or a dict with a 'content' key.")


def _with_special(token: AddedToken, special: bool) -> AddedToken:
    return AddedToken(token.content, single_word=token.single_word, lstrip=token.lstrip, rstrip=token.rstrip,
                      normalized=False, special=special)


def read_hf_token_settings(src: str | Path) -> dict:
    """What the hub folder's tokenizer files say, as the slow tokenizer's `from_pretrained` reads them.

    Returns `config` (tokenizer_config.json merged with special_tokens_map.json, which wins), `special` (named
    special tokens as AddedTokens), `extra_special` (additional special tokens) and `added` ({id: AddedToken} from
    `added_tokens_decoder` and `added_tokens.json`). Missing files count as empty."""
    src = Path(src)
    config = read_json(src / "tokenizer_config.json") if (src / "tokenizer_config.json").is_file() else {}
    special_map = read_json(src / "special_tokens_map.json") if (src / "special_tokens_map.json").is_file() else {}
    added_json = read_json(src / "added_tokens.json") if (src / "added_tokens.json").is_file() else {}
    merged = {**config, **{k: v for k, v in special_map.items() if v is not None}}

    special = {key: _token_spec(merged[key]) for key in _SPECIAL_KEYS if merged.get(key) is not None}
    extra = merged.get("additional_special_tokens") or merged.get("extra_special_tokens") or []
    if isinstance(extra, Mapping):
        extra = list(extra.values())
    extra_special = [_token_spec(token) for token in extra]
    special_contents = {t.content for t in [*special.values(), *extra_special]}

    added: dict[int, AddedToken] = {}
    for index, value in (config.get("added_tokens_decoder") or {}).items():
        added[int(index)] = _token_spec(value)
    for content, index in added_json.items():
        added.setdefault(int(index), AddedToken(content, normalized=False, special=content in special_contents))
    return {"config": merged, "special": special, "extra_special": extra_special, "added": added}


def _normalizer(spec, prepend_scheme: str, user_symbols: list[str]) -> normalizers.Normalizer | None:
    """sentencepiece's normalizer (normalizer.cc) for one segment. `prepend_scheme` "spm": exactly sentencepiece;
    "first"/"never": the fast Llama conversion's non-legacy mode, where a Metaspace pre-tokenizer does the escaping.

    `user_symbols` (matched afterwards as normalized added tokens) must normalize to themselves: `tokenizers` runs
    the normalizer over an added token's content too, and the dummy prefix would make it "▁[UNUSED_TOKEN_146]". So
    the prefix is taken back from a string that normalizes to exactly one user symbol. Only cost: a text segment that
    is one marker ("[UNUSED_TOKEN_145]" alone, or between two added tokens) gives [marker] where sentencepiece gives
    ["▁", marker]."""
    steps = []
    if spec.precompiled_charsmap:
        steps.append(normalizers.Precompiled(spec.precompiled_charsmap))
    if prepend_scheme != "spm":
        return normalizers.Sequence(steps) if steps else None
    if spec.remove_extra_whitespaces:
        # sentencepiece's "whitespace" is U+0020 only (after the charsmap): \t and \n survive. Regex, not Strip:
        # tokenizers' Strip would remove every Unicode whitespace.
        steps += [
            normalizers.Replace(Regex(r"\A +"), ""),
            normalizers.Replace(Regex(r" +\z"), ""),
            normalizers.Replace(Regex(" {2,}"), " "),
        ]
    if spec.add_dummy_prefix:
        steps.append(normalizers.Prepend(SPIECE_UNDERLINE))  # Prepend leaves an empty segment empty, as spm does
        if user_symbols:
            alternatives = "|".join(re.escape(symbol) for symbol in sorted(user_symbols, key=len, reverse=True))
            steps.append(normalizers.Replace(Regex(rf"\A{SPIECE_UNDERLINE}(?=(?:{alternatives})\z)"), ""))
    if spec.escape_whitespaces:
        steps.append(normalizers.Replace(" ", SPIECE_UNDERLINE))
    return normalizers.Sequence(steps) if steps else None


def _decoder(byte_fallback: bool, strip_leading: int) -> decoders.Decoder:
    steps = [decoders.Replace(SPIECE_UNDERLINE, " ")]
    if byte_fallback:
        steps.append(decoders.ByteFallback())
    steps.append(decoders.Fuse())
    if strip_leading:
        steps.append(decoders.Strip(content=" ", left=strip_leading, right=0))
    return decoders.Sequence(steps)


def _bpe_merges(proto, mergeable: set[int]) -> list[tuple[str, str]]:
    """Merges ranked as sentencepiece's BPE applies them: the pair whose merged piece scores highest first.

    A pair (left, right) is a merge when left + right is a mergeable piece and both halves are in the vocabulary;
    all splits of one piece share its rank (only one of them can ever be adjacent in a segment)."""
    pieces = {p.piece: i for i, p in enumerate(proto.pieces)}
    ranked = []
    for index in mergeable:
        piece = proto.pieces[index].piece
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in pieces and right in pieces:
                ranked.append((-proto.pieces[index].score, index, cut, left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def build_sentencepiece_tokenizer(
    proto,
    settings: dict,
    *,
    prepend_scheme: str = "spm",
    extra_tokens: Mapping[int, AddedToken] | None = None,
    source: str = "tokenizer.model",
    **init_kwargs,
) -> PreTrainedTokenizerFast:
    """A fast tokenizer equal to "the slow HF tokenizer's added-token split + `sp_model.encode` of each segment".

    Args:
        proto: the sentencepiece `ModelProto` (a BPE model).
        settings: `read_hf_token_settings(...)` of the source folder.
        prepend_scheme: "spm" (sentencepiece's own normalizer, as InternLM2's slow class and Llama's `legacy=True`
            fast conversion use it), "first" (Llama `legacy=False`: "▁" only in front of the text's first segment,
            via a Metaspace pre-tokenizer) or "never".
        extra_tokens: {id: AddedToken} added on top (the image token); ids must continue the vocabulary.
        source: file name for error messages.
        init_kwargs: passed to `PreTrainedTokenizerFast` (padding_side, model_max_length, image_token, ...).
    """
    if proto.trainer_spec.model_type != _SPM_BPE:
        raise ConversionError(
            f"{source} is a sentencepiece model of type {proto.trainer_spec.model_type}, not BPE (2): InternLM2 and "
            "Llama/Phi-3 tokenizers are BPE. Is this the right tokenizer.model?"
        )
    spec = proto.normalizer_spec
    if proto.trainer_spec.treat_whitespace_as_suffix:
        raise ConversionError(f"{source} uses treat_whitespace_as_suffix, which this converter does not support.")
    if prepend_scheme not in ("spm", "first", "never"):
        raise ValueError(f"prepend_scheme={prepend_scheme!r} must be 'spm', 'first' or 'never'.")

    n_pieces = len(proto.pieces)
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    names = [p.piece for p in proto.pieces]

    # Tokens of the HF layer, by id. Special tokens without an id take the id of their sentencepiece piece, or the
    # next free id (the slow class's `_add_tokens` order: named special tokens, then the additional ones).
    hf_added: dict[int, AddedToken] = dict(settings["added"])
    declared = {token.content: index for index, token in hf_added.items()}
    for index, token in (extra_tokens or {}).items():
        if declared.get(token.content, index) != index:
            raise ConversionError(
                f"{source}: the tokenizer files give {token.content!r} id {declared[token.content]}, but id {index} "
                f"was asked for. The id must be the checkpoint's embedding row of {token.content!r}; if the files "
                f"are right, pass image_token_id={declared[token.content]}."
            )
        if index in hf_added and hf_added[index].content != token.content:
            raise ConversionError(
                f"{source}: id {index} is already the added token {hf_added[index].content!r}; cannot make it "
                f"{token.content!r}. Pass the id the checkpoint's embedding row for {token.content!r} has."
            )
        hf_added[index] = token
    by_content = {token.content: index for index, token in hf_added.items()}
    for token in [*settings["special"].values(), *settings["extra_special"]]:
        if token.content in by_content:
            index = by_content[token.content]
            hf_added[index] = _with_special(hf_added[index], True)
        else:
            index = vocab.get(token.content, max([n_pieces - 1, *hf_added]) + 1)
            hf_added[index] = _with_special(token, True)
            by_content[token.content] = index

    renamed: set[int] = set()
    for index, token in sorted(hf_added.items()):
        if index < n_pieces:
            if token.content != names[index]:
                # internlm2-chat style: the HF config renames a piece (e.g. [UNUSED_TOKEN_146] -> <|im_start|>)
                if token.content in vocab:
                    raise ConversionError(
                        f"{source}: added token {token.content!r} has id {index} but is also the sentencepiece "
                        f"piece {vocab[token.content]}; fix added_tokens_decoder / added_tokens.json."
                    )
                logger.warning("%s: piece %d %r is renamed %r by the tokenizer config.", source, index,
                               names[index], token.content)
                del vocab[names[index]]
                vocab[token.content] = index
                names[index] = token.content
                renamed.add(index)
        elif token.content in vocab:
            raise ConversionError(
                f"{source}: added token {token.content!r} has id {index} but is already id {vocab[token.content]}."
            )
        else:
            vocab[token.content] = index
            names.append(token.content)
    expected = list(range(n_pieces, n_pieces + sum(1 for i in hf_added if i >= n_pieces)))
    got = sorted(i for i in hf_added if i >= n_pieces)
    if got != expected:
        raise ConversionError(
            f"{source}: added token ids {got} must continue the {n_pieces}-piece vocabulary without gaps "
            f"({expected}). For InternLM2 the image token is id {n_pieces} (here: image_token_id={n_pieces})."
        )

    types = [p.type for p in proto.pieces]
    unused = [i for i, t in enumerate(types) if t == _UNUSED]
    if unused:
        # sentencepiece re-splits a merge that yields an UNUSED piece; here such pieces are simply never produced
        logger.warning("%s has %d UNUSED pieces; they are left out of the merges.", source, len(unused))
    mergeable = {i for i, t in enumerate(types) if t == _NORMAL and i not in renamed}
    unk_piece = proto.trainer_spec.unk_piece or "<unk>"
    backend = Tokenizer(
        BPE(vocab=vocab, merges=_bpe_merges(proto, mergeable), unk_token=unk_piece if unk_piece in vocab else None,
            fuse_unk=True, byte_fallback=proto.trainer_spec.byte_fallback, dropout=None)
    )
    hf_ids = set(hf_added)
    user_symbols = [names[i] for i, t in enumerate(types) if t == _USER_DEFINED and i not in hf_ids]
    backend.normalizer = _normalizer(spec, prepend_scheme, user_symbols if prepend_scheme == "spm" else [])
    if prepend_scheme != "spm":
        backend.pre_tokenizer = pre_tokenizers.Metaspace(
            replacement=SPIECE_UNDERLINE, prepend_scheme=prepend_scheme, split=False
        )
    if prepend_scheme == "spm":
        strip = (1 << 20) if spec.remove_extra_whitespaces else int(spec.add_dummy_prefix)  # as sp.decode
    else:
        strip = int(prepend_scheme == "first")
    backend.decoder = _decoder(proto.trainer_spec.byte_fallback, strip)

    # sentencepiece's user-defined pieces: matched inside the normalized segment, like spm's prefix matcher (in
    # Llama's non-legacy mode the fast conversion cut them from the raw text instead).
    backend.add_tokens([AddedToken(symbol, normalized=prepend_scheme == "spm", special=False) for symbol in user_symbols])
    for index, token in sorted(hf_added.items()):
        (backend.add_special_tokens if token.special else backend.add_tokens)([token])
    for index, token in hf_added.items():
        if backend.token_to_id(token.content) != index:
            raise ConversionError(f"{source}: {token.content!r} got id {backend.token_to_id(token.content)}, "
                                  f"expected {index}.")

    config, special = settings["config"], settings["special"]

    def content(key: str, default: str | None) -> str | None:
        return special[key].content if key in special else default

    eos = content("eos_token", proto.trainer_spec.eos_piece or "</s>")
    kwargs = {
        "bos_token": content("bos_token", proto.trainer_spec.bos_piece or "<s>"),
        "eos_token": eos,
        "unk_token": content("unk_token", unk_piece),
        "pad_token": content("pad_token", eos),
        "add_bos_token": bool(config.get("add_bos_token", True)),
        "add_eos_token": bool(config.get("add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
        "padding_side": "left",
    }
    extra_special = [t.content for t in settings["extra_special"]]
    extra_special += [t.content for i, t in sorted((extra_tokens or {}).items()) if t.special]
    if extra_special:
        kwargs["extra_special_tokens"] = list(dict.fromkeys(extra_special))
    kwargs.update(init_kwargs)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **kwargs)
    tokenizer.update_post_processor()
    return tokenizer


def convert_internlm2_tokenizer(
    src: str | Path,
    image_token: str = "<image>",
    image_token_id: int = INTERNLM2_IMAGE_TOKEN_ID,
    model_max_length: int = INTERNLM2_MAX_LENGTH,
) -> PreTrainedTokenizerFast:
    """TroL-1.8B / 7B's InternLM2 tokenizer (sentencepiece `tokenizer.model` + `tokenization_internlm2.py`) as a fast
    tokenizer with the same ids; see the module docstring for what is mirrored.

    Args:
        src: folder with `tokenizer.model` and, when the repo has them, tokenizer_config.json /
            special_tokens_map.json / added_tokens.json.
        image_token: the image placeholder; a special token with id `image_token_id`.
        image_token_id: 92544 for the released models (= the sentencepiece vocabulary size; the embedding matrix has
            one more row). Must be the next free id after the vocabulary and the config's added tokens.
        model_max_length: the longest input the model takes (InternLM2: 32768).

    Returns:
        a `PreTrainedTokenizerFast`: bos `<s>`, eos = pad `</s>`, unk `<unk>`, left padding, `add_bos_token=True`,
        `tokenizer.image_token` / `image_token_id` set.
    """
    src = Path(src)
    model_file = src / "tokenizer.model"
    if not model_file.is_file():
        raise ConversionError(
            f"{src} has no tokenizer.model (InternLM2's sentencepiece model). Download it with the checkpoint, "
            "e.g. `huggingface-cli download BK-Lee/TroL-7B tokenizer.model tokenizer_config.json`."
        )
    proto = read_sentencepiece_model(model_file)
    settings = read_hf_token_settings(src)
    image = AddedToken(image_token, normalized=False, special=True)
    return build_sentencepiece_tokenizer(
        proto, settings, prepend_scheme="spm", extra_tokens={image_token_id: image}, source=str(model_file),
        model_max_length=model_max_length, image_token=image_token,
    )


def _is_internlm2(src: Path, settings: dict, proto) -> bool:
    tokenizer_class = str(settings["config"].get("tokenizer_class") or "")
    if "internlm" in tokenizer_class.lower():
        return True
    if "llama" in tokenizer_class.lower():
        return False
    return any(p.piece == "[UNUSED_TOKEN_146]" for p in proto.pieces)


def load_source_tokenizer(
    src: str | Path,
    image_token: str | None = None,
    image_token_id: int | None = None,
    model_max_length: int | None = None,
) -> PreTrainedTokenizerFast:
    """The tokenizer of a released checkpoint folder, as a transformers 5 fast tokenizer with left padding and
    pad = eos (unless the folder names a pad token).

    - `tokenizer.json` present: loaded as it is (TroL-3.8B / Phi-3 repos may ship one); bos/eos post-processing
      follows `add_bos_token` / `add_eos_token` of the config (defaults True / False, as LlamaTokenizerFast).
    - only an InternLM2 `tokenizer.model` (TroL-1.8B / 7B): `convert_internlm2_tokenizer` (image token defaults
      to `<image>` = 92544).
    - only a Llama-style `tokenizer.model` (+ added_tokens.json with `<img>`, `</img>`, `<IMG_CONTEXT>`): the fast
      Llama conversion the original code got from `LlamaTokenizerFast`, honouring the config's `legacy`.

    `image_token` (with `image_token_id` when given) must end up a single token, else a ValueError says so.
    """
    src = Path(src)
    if not src.is_dir():
        raise ConversionError(f"{src} is not a folder; pass the downloaded checkpoint folder.")
    has_json, has_model = (src / "tokenizer.json").is_file(), (src / "tokenizer.model").is_file()
    if not (has_json or has_model):
        raise ConversionError(
            f"{src} has neither tokenizer.json nor tokenizer.model, so there is no tokenizer to convert. Download "
            "the tokenizer files with the checkpoint (e.g. `huggingface-cli download BK-Lee/TroL-3.8B --include "
            "'tokenizer*' '*.json'`)."
        )
    settings = read_hf_token_settings(src)
    config = settings["config"]
    length = {"model_max_length": model_max_length} if model_max_length is not None else {}
    if has_json:
        tokenizer = PreTrainedTokenizerFast.from_pretrained(src, padding_side="left", **length)
        tokenizer.add_bos_token = bool(config.get("add_bos_token", True))
        tokenizer.add_eos_token = bool(config.get("add_eos_token", False))
        tokenizer.update_post_processor()
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    else:
        proto = read_sentencepiece_model(src / "tokenizer.model")
        if _is_internlm2(src, settings, proto):
            return convert_internlm2_tokenizer(
                src, image_token or "<image>",
                INTERNLM2_IMAGE_TOKEN_ID if image_token_id is None else image_token_id,
                model_max_length if model_max_length is not None else INTERNLM2_MAX_LENGTH,
            )
        # transformers 4's LlamaTokenizerFast conversion: legacy (the default) = sentencepiece per segment;
        # legacy=False = a "▁" only in front of the first segment (Metaspace, prepend_scheme "first").
        if config.get("add_prefix_space") is False:
            scheme = "never"
        else:
            scheme = "spm" if config.get("legacy", True) is not False else "first"
        tokenizer = build_sentencepiece_tokenizer(
            proto, settings, prepend_scheme=scheme, source=str(src / "tokenizer.model"), **length
        )
    if image_token is not None:
        ids = tokenizer.encode(image_token, add_special_tokens=False)
        if len(ids) != 1 or (image_token_id is not None and ids[0] != image_token_id):
            raise ConversionError(
                f"{src}: the image token {image_token!r} encodes to {ids}, expected one id"
                f"{'' if image_token_id is None else f' = {image_token_id}'}. Check added_tokens.json / "
                "tokenizer_config.json of the checkpoint."
            )
    return tokenizer


__all__ = [
    "INTERNLM2_IMAGE_TOKEN_ID",
    "INTERNLM2_MAX_LENGTH",
    "build_sentencepiece_tokenizer",
    "convert_internlm2_tokenizer",
    "load_source_tokenizer",
    "read_hf_token_settings",
    "read_sentencepiece_model",
]
