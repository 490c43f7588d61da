"""trol-convert's tokenizers against independent references written on `sentencepiece.SentencePieceProcessor`.

Tiny sentencepiece BPE models are trained here (byte fallback, `[UNUSED_TOKEN_141..146]` as user-defined symbols,
"\\n" pieces added to the vocabulary as InternLM2 has them) in three normalizer settings: InternLM2's (identity, dummy
prefix, no whitespace removal), the dummy prefix off, and NFKC with whitespace removal. The reference
`SlowInternLM2` re-implements what `tokenization_internlm2.InternLM2Tokenizer` does on transformers 4: cut the
added/special tokens out of the raw text, `sp.encode` every segment in between, `<s>` in front when asked.
`FastLlama` re-implements transformers 4's `LlamaTokenizerFast` conversion (TroL-3.8B's loader).
"""

import io
import json
import re

import pytest
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as model_pb2
from tokenizers import Tokenizer, normalizers
from transformers import AutoTokenizer
from trol.converter.common import ConversionError
from trol.converter.tokenizer import convert_internlm2_tokenizer, load_source_tokenizer

MARKERS = [f"[UNUSED_TOKEN_{i}]" for i in range(141, 147)]
SYSTEM = ("You are AI model created by Byung-Kwan Lee, Ph.D. candidate, KAIST EE, of which AI model name is TroL "
          "(Traversal of Layers). You must give helpful, detailed, and polite answers to the user's questions")
CORPUS = [
    SYSTEM,
    "The quick brown fox jumps over the lazy dog while the cat sleeps.",
    "What is in the image? Describe it in detail, please. Answer with the option's letter.",
    "Numbers such as 1234567890, 3.14159 and 2024-06-01 appear in charts and tables.",
    "我们今天去公园散步。你好世界！图片里有什么？",
    "def traverse(layer, x):\treturn layer(layer(x))",
    "Traversal of Layers lets a small model reuse its layers to answer questions about images.",
    "Hello world! A tiny corpus for testing tokenizers with   extra   spaces.",
]
NORMALIZERS = {
    "internlm2": {"normalization_rule_name": "identity", "add_dummy_prefix": True, "remove_extra_whitespaces": False},
    "no_dummy_prefix": {"normalization_rule_name": "identity", "add_dummy_prefix": False,
                        "remove_extra_whitespaces": False},
    "nfkc_collapse": {"normalization_rule_name": "nmt_nfkc", "add_dummy_prefix": True,
                      "remove_extra_whitespaces": True},
}
TEXTS = [
    "Hello world", " Hello", "Hello ", "  two  spaces  inside  ", "   ", " ", "", "line\nbreak", "\n", "\n\nlead",
    "trail\n\n", "a\n \nb", "tab\tseparated\t", "\ttab first", "digits 0123456789 and 3.14159", "x=42;y=-7",
    "我们今天去公园散步。", "mixed 中文 and English", "emoji 😀 and 🦙 and ✨!", "😀", "Ünïcödé façade",
    "ｆｕｌｌｗｉｄｔｈ ＡＢＣ", "▁already▁escaped", "<s>", "</s>", "x<s>y", "<s> spaced </s>", "<unk>",
    "[UNUSED_TOKEN_146]system\nHi", "text[UNUSED_TOKEN_145]", "[UNUSED_TOKEN_145]\n", " [UNUSED_TOKEN_146] user ",
    "[UNUSED_TOKEN_146][UNUSED_TOKEN_145]", "a[UNUSED_TOKEN_144]b[UNUSED_TOKEN_143]\nc", "[UNUSED_TOKEN_14]",
    "<image>", "<image>\nWhat is this?", "look: <image> here", "<image><image><image>\n", "<imag>", "<image",
    "[UNUSED_TOKEN_146]user\n<image>\nDescribe the image.[UNUSED_TOKEN_145]\n[UNUSED_TOKEN_146]assistant\n",
]


def trol_prompt(question: str, answer: str | None = None, image_tokens: int = 0) -> str:
    """TROL.md §4: the released TroL-1.8B / 7B prompt, `<image>` expanded to `image_tokens` copies."""
    if image_tokens:
        question = "<image>" * image_tokens + "\n" + question
    prompt = (f"<s>[UNUSED_TOKEN_146]system\n{SYSTEM}[UNUSED_TOKEN_145]\n[UNUSED_TOKEN_146]user\n{question}"
              "[UNUSED_TOKEN_145]\n[UNUSED_TOKEN_146]assistant\n")
    return prompt if answer is None else prompt + answer + "[UNUSED_TOKEN_145]"


PROMPTS = [trol_prompt("What is in the image?", image_tokens=5),
           trol_prompt("我们 today？ 😀", answer=" It is a cat.\n\nSecond line."), trol_prompt(" leading  spaces ")]


def train(normalizer: dict, user_symbols=MARKERS, newline_pieces: bool = True) -> bytes:
    """A tiny sentencepiece BPE model; InternLM2-like "\\n" / "\\n\\n" / "▁▁" pieces are appended to its vocabulary."""
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 4), model_writer=out, model_type="bpe", vocab_size=420, byte_fallback=True,
        user_defined_symbols=list(user_symbols), character_coverage=1.0, minloglevel=2, **normalizer,
    )
    proto = model_pb2.ModelProto()
    proto.ParseFromString(out.getvalue())
    if newline_pieces:
        for piece in ("\n", "\n\n", "▁▁"):  # "\n" merges into "\n\n" (a real merge, lowest priority)
            proto.pieces.add(piece=piece, score=-float(len(proto.pieces)), type=model_pb2.ModelProto.SentencePiece.NORMAL)
    return proto.SerializeToString()


def with_normalizer(model: bytes, **changes) -> bytes:
    proto = model_pb2.ModelProto()
    proto.ParseFromString(model)
    for key, value in changes.items():
        setattr(proto.normalizer_spec, key, value)
    return proto.SerializeToString()


def split_on(tokens: dict[str, int], text: str):
    """(is_added_token, piece) in order: the added tokens cut out of the raw text, leftmost-longest (the slow trie)."""
    if not tokens:
        yield False, text
        return
    pattern = re.compile("|".join(re.escape(t) for t in sorted(tokens, key=len, reverse=True)))
    position = 0
    for match in pattern.finditer(text):
        yield False, text[position:match.start()]
        yield True, match.group()
        position = match.end()
    yield False, text[position:]


class SlowInternLM2:
    """transformers 4's `InternLM2Tokenizer` (a PreTrainedTokenizer over `sp_model`), rewritten from its behaviour:
    `tokenize` cuts every added token (the special tokens, `added_tokens_decoder`, added_tokens.json) out of the raw
    text, `_tokenize` is `sp_model.encode(segment, out_type=str)`, pieces become ids through `piece_to_id`, and
    `build_inputs_with_special_tokens` puts `<s>` in front (add_bos_token=True, add_eos_token=False)."""

    def __init__(self, model: bytes, added: dict[str, int]):
        self.sp = spm.SentencePieceProcessor(model_proto=model)
        self.added = {"<unk>": self.sp.unk_id(), "<s>": self.sp.bos_id(), "</s>": self.sp.eos_id(), **added}

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids = [self.sp.bos_id()] if add_special_tokens else []
        for is_token, piece in split_on(self.added, text):
            if is_token:
                ids.append(self.added[piece])
            elif piece:
                ids += [self.sp.piece_to_id(p) for p in self.sp.encode(piece, out_type=str)]
        return ids

    def decode_text(self, ids: list[int]) -> str:
        """`sp_model.decode` of the ids that are not added tokens (what `decode(skip_special_tokens=True)` shows)."""
        return self.sp.decode([i for i in ids if i not in set(self.added.values())])


class FastLlama:
    """transformers 4's `LlamaTokenizerFast` built from a Llama `tokenizer.model` (TroL-3.8B's loader): added tokens
    cut from the raw text; `legacy=True` encodes each segment as sentencepiece does; `legacy=False` writes spaces as
    "▁" and puts one "▁" only in front of a segment that starts the text and does not start with "▁"."""

    def __init__(self, model: bytes, added: dict[str, int], legacy: bool):
        self.legacy, self.added = legacy, {"<unk>": 0, "<s>": 1, "</s>": 2, **added}
        self.sp = spm.SentencePieceProcessor(model_proto=model)
        self.bare = spm.SentencePieceProcessor(model_proto=with_normalizer(model, add_dummy_prefix=False))

    def encode(self, text: str) -> list[int]:
        ids, offset = [], 0
        for is_token, piece in split_on(self.added, text):
            if is_token:
                ids.append(self.added[piece])
            elif piece and self.legacy:
                ids += self.sp.encode(piece)
            elif piece:
                escaped = piece.replace(" ", "▁")
                if offset == 0 and not escaped.startswith("▁"):
                    escaped = "▁" + escaped
                ids += self.bare.encode(escaped)
            offset += len(piece)
        return ids


def write_folder(folder, model: bytes, layout: str, image_id: int) -> dict[str, int]:
    """A TroL-1.8B-like source folder; returns the HF-level added tokens the slow tokenizer splits on (besides
    <s> </s> <unk>)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.model").write_bytes(model)
    added = {}
    if layout in ("hub_files", "markers_added"):
        (folder / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "InternLM2Tokenizer", "auto_map": {"AutoTokenizer": ["tokenization_internlm2.Tok", None]},
            "bos_token": "<s>", "eos_token": "</s>", "pad_token": "</s>", "unk_token": "<unk>",
            "add_bos_token": True, "add_eos_token": False, "clean_up_tokenization_spaces": False,
        }))
        (folder / "special_tokens_map.json").write_text(json.dumps(
            {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "</s>"}))
        (folder / "added_tokens.json").write_text(json.dumps({"<image>": image_id}))
        added["<image>"] = image_id
    if layout == "markers_added":  # the chat markers declared as HF added tokens: cut from the raw text instead
        sp = spm.SentencePieceProcessor(model_proto=model)
        config = json.loads((folder / "tokenizer_config.json").read_text())
        config["added_tokens_decoder"] = {
            str(sp.piece_to_id(m)): {"content": m, "lstrip": False, "rstrip": False, "normalized": False,
                                     "single_word": False, "special": True} for m in MARKERS[-2:]}
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
        added.update({m: sp.piece_to_id(m) for m in MARKERS[-2:]})
    return added


@pytest.fixture(scope="module")
def models():
    return {name: train(normalizer) for name, normalizer in NORMALIZERS.items()}


def lone_marker(reference: SlowInternLM2, text: str) -> bool:
    """A text segment that sentencepiece encodes as ["▁", marker]: the one documented departure (test below)."""
    return any(not is_token and reference.sp.encode(piece, out_type=str) in (["▁", m] for m in MARKERS)
               for is_token, piece in split_on(reference.added, text))


@pytest.mark.parametrize("layout", ["model_only", "hub_files", "markers_added"])
@pytest.mark.parametrize("normalizer", list(NORMALIZERS))
def test_ids_match_the_slow_internlm2_tokenizer(models, tmp_path, normalizer, layout):
    model = models[normalizer]
    image_id = spm.SentencePieceProcessor(model_proto=model).get_piece_size()
    added = write_folder(tmp_path, model, layout, image_id)
    reference = SlowInternLM2(model, {**added, "<image>": image_id})
    tokenizer = convert_internlm2_tokenizer(tmp_path, image_token_id=image_id)
    checked = 0
    for text in TEXTS + PROMPTS:
        if lone_marker(reference, text):
            continue
        expected = reference.encode(text)
        assert tokenizer.encode(text, add_special_tokens=False) == expected, (text, tokenizer.tokenize(text))
        assert tokenizer(text).input_ids == reference.encode(text, add_special_tokens=True), text
        checked += 1
    assert checked >= len(TEXTS + PROMPTS) - 3
    batch = tokenizer(TEXTS, add_special_tokens=False).input_ids
    assert batch == [tokenizer.encode(t, add_special_tokens=False) for t in TEXTS]


@pytest.mark.parametrize("normalizer", list(NORMALIZERS))
def test_decode_matches_sentencepiece(models, tmp_path, normalizer):
    model = models[normalizer]
    image_id = spm.SentencePieceProcessor(model_proto=model).get_piece_size()
    reference = SlowInternLM2(model, {"<image>": image_id})
    write_folder(tmp_path, model, "model_only", image_id)
    tokenizer = convert_internlm2_tokenizer(tmp_path, image_token_id=image_id)
    for text in TEXTS + PROMPTS:
        ids = reference.encode(text, add_special_tokens=True)
        assert tokenizer.decode(ids, skip_special_tokens=True) == reference.decode_text(ids), text
        if normalizer == "internlm2" and "▁" not in text and not set(ids[1:]) & set(reference.added.values()):
            assert tokenizer.decode(ids, skip_special_tokens=True) == text  # lossless round trip
    answer = tokenizer.encode(" It is a cat.\n\n我们 😀[UNUSED_TOKEN_145]", add_special_tokens=False)
    assert tokenizer.decode(answer).endswith("[UNUSED_TOKEN_145]")  # the markers are text, kept by decode


def test_trol_prompt_batch(models, tmp_path):
    """TROL.md §4's prompt, `<s>` written in the text and tokenized without added special tokens; left padding."""
    model = models["internlm2"]
    image_id = spm.SentencePieceProcessor(model_proto=model).get_piece_size()
    reference = SlowInternLM2(model, {"<image>": image_id})
    write_folder(tmp_path, model, "hub_files", image_id)
    tokenizer = convert_internlm2_tokenizer(tmp_path, image_token_id=image_id, model_max_length=4096)
    prompts = [trol_prompt("Describe the image in detail.", image_tokens=7), trol_prompt("Hi")]
    batch = tokenizer(prompts, padding="longest", add_special_tokens=False, return_tensors="pt")
    short = reference.encode(prompts[1])
    pad = batch.input_ids.shape[1] - len(short)
    assert batch.input_ids[0].tolist() == reference.encode(prompts[0])
    assert batch.input_ids[1].tolist() == [tokenizer.eos_token_id] * pad + short
    assert batch.attention_mask[1].tolist() == [0] * pad + [1] * len(short)
    assert short[0] == 1 and short[1:3] == [reference.sp.piece_to_id("▁"), reference.sp.piece_to_id(MARKERS[-1])]
    assert (batch.input_ids[0] == image_id).sum() == 7
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id) == (
        1, 2, 2, 0)
    assert (tokenizer.padding_side, tokenizer.model_max_length) == ("left", 4096)
    assert (tokenizer.image_token, tokenizer.image_token_id, len(tokenizer)) == ("<image>", image_id, image_id + 1)
    assert tokenizer.convert_tokens_to_ids(MARKERS[-2]) == reference.sp.piece_to_id(MARKERS[-2])


def test_lone_marker_segment_is_one_token(models, tmp_path):
    """The one departure: a text segment that is exactly one marker (the whole text, or between two added tokens)
    is the marker's id alone; sentencepiece puts the dummy-prefix "▁" in front. Markers inside text match exactly."""
    model = models["internlm2"]
    image_id = spm.SentencePieceProcessor(model_proto=model).get_piece_size()
    reference = SlowInternLM2(model, {"<image>": image_id})
    write_folder(tmp_path, model, "model_only", image_id)
    tokenizer = convert_internlm2_tokenizer(tmp_path, image_token_id=image_id)
    marker = reference.sp.piece_to_id("[UNUSED_TOKEN_145]")
    assert reference.encode("[UNUSED_TOKEN_145]") == [reference.sp.piece_to_id("▁"), marker]
    assert tokenizer.encode("[UNUSED_TOKEN_145]", add_special_tokens=False) == [marker]
    assert tokenizer.encode("<image>[UNUSED_TOKEN_145]", add_special_tokens=False) == [image_id, marker]


def test_reference_catches_wrong_conversions(models, tmp_path):
    """The comparison is sharp: plausible wrong pipelines each fail on some text of the set."""
    texts = TEXTS + PROMPTS

    def mismatches(tokenizer_json: str, normalizer: str) -> int:
        model = models[normalizer]
        image_id = spm.SentencePieceProcessor(model_proto=model).get_piece_size()
        reference = SlowInternLM2(model, {"<image>": image_id})
        backend = Tokenizer.from_str(tokenizer_json)
        return sum(backend.encode(t, add_special_tokens=False).ids != reference.encode(t) for t in texts)

    def converted(normalizer: str) -> dict:
        model = models[normalizer]
        image_id = spm.SentencePieceProcessor(model_proto=model).get_piece_size()
        folder = tmp_path / normalizer
        write_folder(folder, model, "model_only", image_id)
        return json.loads(convert_internlm2_tokenizer(folder, image_token_id=image_id).backend_tokenizer.to_str())

    for normalizer in NORMALIZERS:
        assert mismatches(json.dumps(converted(normalizer)), normalizer) <= 3  # lone-marker texts only
    # 1. markers cut from the raw text (transformers' generic SpmConverter): "▁" lands after the marker
    wrong = converted("internlm2")
    for token in wrong["added_tokens"]:
        token["normalized"] = False
    assert mismatches(json.dumps(wrong), "internlm2") > 5
    # 2. no dummy prefix / a dummy prefix that sentencepiece does not add
    for normalizer, steps in (("internlm2", [normalizers.Replace(" ", "▁")]),
                              ("no_dummy_prefix", [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])):
        wrong = converted(normalizer)
        wrong["normalizer"] = json.loads(normalizers.Sequence(steps).__getstate__())
        assert mismatches(json.dumps(wrong), normalizer) > 5
    # 3. NFKC and whitespace collapsing ignored
    wrong = converted("nfkc_collapse")
    wrong["normalizer"]["normalizers"] = wrong["normalizer"]["normalizers"][1:]  # charsmap dropped
    assert mismatches(json.dumps(wrong), "nfkc_collapse") > 0
    wrong = converted("nfkc_collapse")
    wrong["normalizer"]["normalizers"] = [n for n in wrong["normalizer"]["normalizers"] if n["type"] != "Replace"
                                          or "Regex" not in n["pattern"]]  # no whitespace removal
    assert mismatches(json.dumps(wrong), "nfkc_collapse") > 0


def test_saved_tokenizer_reloads_with_auto_tokenizer(models, tmp_path):
    model = models["internlm2"]
    image_id = spm.SentencePieceProcessor(model_proto=model).get_piece_size()
    write_folder(tmp_path / "src", model, "hub_files", image_id)
    tokenizer = convert_internlm2_tokenizer(tmp_path / "src", image_token_id=image_id)
    tokenizer.save_pretrained(tmp_path / "out")
    loaded = AutoTokenizer.from_pretrained(tmp_path / "out")
    for text in TEXTS + PROMPTS:
        ids = tokenizer.encode(text)
        assert loaded.encode(text) == ids and loaded.decode(ids) == tokenizer.decode(ids), text
    assert (loaded.padding_side, loaded.pad_token, loaded.image_token_id) == ("left", "</s>", image_id)
    assert load_source_tokenizer(tmp_path / "out", image_token="<image>").encode(PROMPTS[0]) == tokenizer.encode(
        PROMPTS[0])


def test_load_source_tokenizer_picks_the_converter(models, tmp_path):
    model = models["internlm2"]
    image_id = spm.SentencePieceProcessor(model_proto=model).get_piece_size()
    write_folder(tmp_path, model, "model_only", image_id)  # no config: recognised by its [UNUSED_TOKEN_146] piece
    tokenizer = load_source_tokenizer(tmp_path, image_token_id=image_id)
    assert tokenizer.encode(PROMPTS[0], add_special_tokens=False) == SlowInternLM2(model, {"<image>": image_id}).encode(
        PROMPTS[0])


@pytest.mark.parametrize("legacy", [None, True, False])
def test_llama_style_tokenizer_model_matches_llama_tokenizer_fast(tmp_path, legacy):
    """TroL-3.8B's repo may ship only a Llama/Phi-3 `tokenizer.model` plus InternVL's added tokens."""
    model = train(NORMALIZERS["internlm2"], user_symbols=(), newline_pieces=False)
    size = spm.SentencePieceProcessor(model_proto=model).get_piece_size()
    names = ["<|system|>", "<|end|>", "<|user|>", "<|assistant|>", "<img>", "</img>", "<IMG_CONTEXT>"]
    added = {name: size + i for i, name in enumerate(names)}
    (tmp_path / "tokenizer.model").write_bytes(model)
    (tmp_path / "added_tokens.json").write_text(json.dumps(added))
    config = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    if legacy is not None:
        config["legacy"] = legacy
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = load_source_tokenizer(tmp_path, image_token="<IMG_CONTEXT>", image_token_id=added["<IMG_CONTEXT>"])
    reference = FastLlama(model, added, legacy=legacy is not False)
    phi3 = (f"<s><|system|>\n{SYSTEM}<|end|>\n<|user|>\n<img>{'<IMG_CONTEXT>' * 4}</img>\nWhat is this?<|end|>\n"
            "<|assistant|>\n")
    for text in [*TEXTS, phi3, " <|user|> x", "<|end|> y"]:
        assert tokenizer.encode(text, add_special_tokens=False) == reference.encode(text), (text, tokenizer.tokenize(text))
    assert tokenizer("Hi").input_ids[0] == 1 and tokenizer.pad_token == "</s>" and tokenizer.padding_side == "left"


def test_missing_or_mismatched_tokenizer_files_raise(models, tmp_path):
    with pytest.raises(ValueError, match=r"neither tokenizer.json nor tokenizer.model"):
        load_source_tokenizer(tmp_path)
    with pytest.raises(ValueError, match=r"no tokenizer.model"):
        convert_internlm2_tokenizer(tmp_path)
    (tmp_path / "tokenizer.model").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 1\n")
    with pytest.raises(ConversionError, match="sentencepiece"):
        convert_internlm2_tokenizer(tmp_path)
    model = models["internlm2"]
    size = spm.SentencePieceProcessor(model_proto=model).get_piece_size()
    (tmp_path / "tokenizer.model").write_bytes(model)
    with pytest.raises(ValueError, match=rf"image_token_id={size}"):
        convert_internlm2_tokenizer(tmp_path)  # the released id 92544 does not fit a 423-piece test vocabulary
    (tmp_path / "added_tokens.json").write_text(json.dumps({"<image>": size + 1}))
    with pytest.raises(ValueError, match=rf"give '<image>' id {size + 1}, but id {size} was asked for"):
        convert_internlm2_tokenizer(tmp_path, image_token_id=size)
    (tmp_path / "added_tokens.json").write_text(json.dumps({"<image>": size, "<video>": size + 2}))
    with pytest.raises(ValueError, match="without gaps"):
        convert_internlm2_tokenizer(tmp_path, image_token_id=size)
