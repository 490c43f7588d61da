"""The TroL training mix (TROL.md section 3) as TRL "conversational vision" rows, images loaded lazily.

Row format (what TRL's `DataCollatorForVisionLanguageModeling` takes): `{"messages": [...], "images": [PIL RGB]}`;
user (and system) content `[{"type": "image"}, ..., {"type": "text", "text": ...}]`, one image block per image, in
order, where the source's placeholder stood (the placeholder and an adjacent newline on each side are removed; a text
without placeholder gets its images at the start of the first user turn, as LLaVA does); assistant content
`[{"type": "text", "text": ...}]`; text-only samples have `images: []`.

Sources (file names of the TroL repository's data layout; `format:` picks the adapter in `ADAPTERS`):
- sharegpt4v / llava: sharegpt4v_instruct_gpt4-vision_cap100k.json (caption), sharegpt4v_mix665k_cap23k_coco-ap9k_
  lcs3k_sam9k_div2k.json (instruction); a json list of {"id", "image": "coco/train2017/x.jpg" (optional; or a list),
  "conversations": [{"from": "human"|"gpt"|"system", "value": "<image>\\n..."}]}; images under coco/, sam/, gqa/,
  llava/llava_pretrain/images/, ocr_vqa/, textvqa/, vg/, share_textvqa/, web-celebrity/, web-landmark/, wikiart/.
- allava_text: Evol-Instruct-GPT4-Turbo-143K.json (ALLaVA-4V text), the LLaVA layout without "image".
- minigemini: minigemini_instruction.json, the LLaVA layout, some entries without "image"; images under docvqa/,
  chartqa/, dvqa/, ai2d/ (`include_image_prefixes` selects that subset from the full MiniGemini json).
- docowl: train.jsonl (DocDownstream-1.0), detailed_explanation.jsonl (DocReason25K); json lines {"image":
  ["./imgs/DUE_Benchmark/DocVQA/pngs/x.png"], "messages": [{"role": "user"|"assistant", "content": "<|image|>..."}]}.
- geo170k: gllava_align / gllava_qa, .json or .parquet, the LLaVA layout ("image", "conversations"); images under
  geo3k/, geoqa_plus/.
- mathvision: mathvision.parquet (or .json): "question" (may hold "<image1>"), "options" (list, may be empty),
  "answer", "solution" (optional), "decoded_image" (bytes) or "image" (path under images/). The user turn is the
  question + "Choices:\\n(A) ...", the answer `solution + "\\nAnswer: X"` (just X without a solution).
- mathinstruct: MathInstruct.json, {"instruction", "output", "source"}, text only.
- mathplus: mathplus.parquet, text only: "instruction"/"output" (the public TIGER-Lab/MATH-plus columns), else
  "query"/"response".
Any field can be renamed per source (`fields: {question: problem}`; defaults in `ADAPTER_FIELDS`). A parquet image
cell may be a path, a `datasets` Image struct {"bytes", "path"} or a list of them; bytes stay in the file and are read
by row index when the sample is loaded (one row group of one column cached per process; `datasets` writes 100-row
groups for image data). Relative image paths are joined to the source's `image_root` (default: the data file's
folder).

Mix (`load_mixture`, a YAML file or dict; see trainer/recipes/data_mix.yaml): a source of n samples with `weight` w
gives round(w * n) samples: each sample floor(w) times plus a seeded random subset for the fraction (0.5 = a random
half, 2.0 = all twice, 0 = off). The whole mix is then shuffled with the seed: the order depends only on
(config, files, seed).

Memory: each data file is parsed once when the mix is built (a .json list whole: a peak of a few times its size);
then a sample is one compact JSON record in a single numpy byte buffer with int64 offsets: no Python object per
sample and no decoded image, so a 2.3M-sample mix costs about its text size, and forked DataLoader workers share those
pages (a list of dicts would be copied into every worker by reference counting).

Skip policy (never a crash, never silent): a sample whose image is missing or unreadable or, when the dataset has a
`processor` and `max_length`, whose exact processed length (chat template + processor with its images: image tokens
and tiles included, as the collator builds it) exceeds max_length, is skipped: counted in `skipped`, written as one
json line {"source", "index", "path", "reason"} to `skip_log` (opened, appended, closed per event: safe from
DataLoader workers and several ranks), and replaced by the next valid sample (i+1, i+2, ... wrapping). The length
filter exists because TRL's collator passes `truncation=True, max_length=...` to the processor and TrolProcessor
raises rather than cut through image tokens or answers: one long sample would stop the run. It costs one more image
preprocessing per sample, in the DataLoader workers. Records whose content cannot make a sample (image count !=
placeholders, no answer, unknown role, missing field) are skipped and logged the same way when the mix is loaded; if a
source has no usable record at all, its `format` or `fields` are wrong and a ValueError says so. `skip_summary` counts
the log (a sample logged by several workers, ranks or epochs counts once); `SkippedSamplesCallback` reports it.

TRL 1.16's SFTTrainer accepts only a `datasets.Dataset`/`IterableDataset`: pass `mix.as_hf_dataset()`.
"""

import bisect
import collections
import io
import json
import logging
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields as dataclass_fields
from typing import Any, NamedTuple

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch
from transformers import ProcessorMixin, TrainerCallback

from trol.processing_trol import load_rgb_image

logger = logging.getLogger(__name__)


class ParquetImage(NamedTuple):
    """Image bytes held in a parquet cell, read when the sample is loaded (`item` indexes a list cell)."""

    path: str
    row: int
    column: str
    item: int | None = None


class MalformedSample(ValueError):
    """A record that cannot make a training sample: skipped and logged, not fatal."""


# ----------------------------------------------------------------------------------------------------------------
# Source adapters: one raw record -> {"messages": [...], "images": [relative path | ParquetImage, ...]}
# ----------------------------------------------------------------------------------------------------------------
_LLAVA = {"image": ("image",), "conversations": ("conversations",)}
ADAPTER_FIELDS: dict[str, dict[str, tuple[str, ...]]] = {
    "llava": _LLAVA, "sharegpt4v": _LLAVA, "allava_text": _LLAVA, "minigemini": _LLAVA, "geo170k": _LLAVA,
    "docowl": {"image": ("image",), "messages": ("messages",)},
    "mathvision": {"question": ("question",), "options": ("options",), "answer": ("answer",),
                   "solution": ("solution",), "image": ("decoded_image", "image")},
    "mathinstruct": {"question": ("instruction",), "answer": ("output",)},
    "mathplus": {"question": ("instruction", "query"), "answer": ("output", "response")},
}
"""Source field names per format and key, tried in order; a source's `fields: {key: name or [names]}` replaces them."""

_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
_LLAVA_PLACEHOLDER = re.compile(r"\n?<image>\n?")
_DOCOWL_PLACEHOLDER = re.compile(r"\n?<\|image\|>\n?")
_MATHVISION_PLACEHOLDER = re.compile(r"\n?<image\d*>\n?")
_NO_PLACEHOLDER = re.compile(r"(?!)")


def _fields(source_format: str, overrides: Mapping | None) -> dict[str, tuple[str, ...]]:
    defaults = ADAPTER_FIELDS[source_format]
    if set(overrides or {}) - set(defaults):
        raise ValueError(f"Unknown `fields` keys {sorted(set(overrides) - set(defaults))} for format "
                         f"{source_format!r}; valid keys: {sorted(defaults)}.")
    return {**defaults,
            **{key: (name,) if isinstance(name, str) else tuple(name) for key, name in (overrides or {}).items()}}


def _get(record: Mapping, key: str, fields: Mapping[str, Sequence[str]], required: bool = True) -> Any:
    for name in fields[key]:
        if record.get(name) is not None:
            return record[name]
    if required:
        raise MalformedSample(f"no field {' or '.join(map(repr, fields[key]))} (have {sorted(record)}); if it is "
                              f"named otherwise, set `fields: {{{key}: NAME}}` in the source")
    return None


def _as_list(value: Any) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) and not isinstance(value, ParquetImage) else [value]


def _image_refs(value: Any) -> list:
    refs = [item.get("path") if isinstance(item, Mapping) else item for item in _as_list(value)]
    for ref in refs:  # a `datasets` Image struct in json can only be used through its path
        if not ref or not isinstance(ref, (str, ParquetImage)):
            raise MalformedSample(f"image entry {value!r:.80} is neither a path nor parquet image bytes")
    return refs


def _conversation(turns: Sequence[tuple[Any, Any]], images: list, placeholder: re.Pattern) -> dict:
    """(role, text) turns -> TRL row; each placeholder in a user/system text becomes an image block."""
    messages, n_placeholders = [], 0
    for role, text in turns:
        if role not in _ROLES or not isinstance(text, str):
            raise MalformedSample(f"turn ({role!r}, {type(text).__name__}): roles are {sorted(_ROLES)}, text a string")
        role, pieces = _ROLES[role], placeholder.split(text)
        if len(pieces) > 1 and role == "assistant":
            raise MalformedSample("an image placeholder in an assistant turn")
        if any("<image>" in piece for piece in pieces):  # the processor would count it as an image placeholder
            raise MalformedSample(f"a literal '<image>' in a {role} turn that is not this source's placeholder")
        n_placeholders += len(pieces) - 1
        content = []
        for index, piece in enumerate(pieces):
            content += ([{"type": "image"}] if index else []) + ([{"type": "text", "text": piece}] if piece else [])
        messages.append({"role": role, "content": content})
    if n_placeholders == 0 and images:  # LLaVA's convention: the image(s) open the first user turn
        first_user = next((m for m in messages if m["role"] == "user"), None)
        if first_user is None:
            raise MalformedSample("images but no user turn")
        first_user["content"][:0] = [{"type": "image"} for _ in images]
    elif n_placeholders != len(images):
        raise MalformedSample(f"{n_placeholders} image placeholder(s) but {len(images)} image(s)")
    if not any(m["role"] == "assistant" and m["content"] for m in messages):
        raise MalformedSample("no assistant answer to train on")
    return {"messages": messages, "images": images}


def _turns(record: Mapping, fields: Mapping, key: str, role_keys: tuple[str, str], text_keys: tuple[str, str]):
    turns = _get(record, key, fields)
    if not isinstance(turns, (list, tuple)) or not all(isinstance(turn, Mapping) for turn in turns):
        raise MalformedSample(f"`{fields[key][0]}` is not a list of turns")
    return [(turn.get(role_keys[0], turn.get(role_keys[1])), turn.get(text_keys[0], turn.get(text_keys[1])))
            for turn in turns]


def llava(record: Mapping, fields: Mapping | None = None) -> dict:
    """LLaVA / ShareGPT4V / ALLaVA-Text / MiniGemini / Geo170K: {"image"?, "conversations": [{"from", "value"}]}."""
    fields = _fields("llava", fields)
    turns = _turns(record, fields, "conversations", ("from", "role"), ("value", "content"))
    return _conversation(turns, _image_refs(_get(record, "image", fields, False)), _LLAVA_PLACEHOLDER)


def docowl(record: Mapping, fields: Mapping | None = None) -> dict:
    """mPLUG-DocOwl 1.5 jsonl (DocDownstream-1.0, DocReason25K): {"image": [paths], "messages": [{"role", "content"}]}
    with `<|image|>` placeholders."""
    fields = _fields("docowl", fields)
    turns = _turns(record, fields, "messages", ("role", "from"), ("content", "value"))
    return _conversation(turns, _image_refs(_get(record, "image", fields, False)), _DOCOWL_PLACEHOLDER)


def mathvision(record: Mapping, fields: Mapping | None = None) -> dict:
    """MathVision: the question (+ "Choices:" (A) ... when there are options); answer = solution + "Answer: X"."""
    fields = _fields("mathvision", fields)
    question, answer = str(_get(record, "question", fields)), str(_get(record, "answer", fields))
    options = [str(option) for option in _as_list(_get(record, "options", fields, False))]
    if options:
        question += "\nChoices:\n" + "\n".join(f"({chr(65 + i)}) {option}" for i, option in enumerate(options))
    solution = str(_get(record, "solution", fields, False) or "").strip()
    reply = f"{solution}\nAnswer: {answer}" if solution else answer
    images = _image_refs(_get(record, "image", fields, False))[:1]
    return _conversation([("user", question), ("assistant", reply)], images, _MATHVISION_PLACEHOLDER)


def _question_answer(source_format: str, record: Mapping, fields: Mapping | None) -> dict:
    fields = _fields(source_format, fields)
    turns = [("user", _get(record, "question", fields)), ("assistant", _get(record, "answer", fields))]
    return _conversation(turns, [], _NO_PLACEHOLDER)


def mathinstruct(record: Mapping, fields: Mapping | None = None) -> dict:
    """MathInstruct (text only): {"instruction", "output", "source"}."""
    return _question_answer("mathinstruct", record, fields)


def mathplus(record: Mapping, fields: Mapping | None = None) -> dict:
    """MATH-plus (text only): "instruction"/"output", else "query"/"response"."""
    return _question_answer("mathplus", record, fields)


ADAPTERS = {"llava": llava, "sharegpt4v": llava, "allava_text": llava, "minigemini": llava, "docowl": docowl,
            "geo170k": llava, "mathvision": mathvision, "mathinstruct": mathinstruct, "mathplus": mathplus}


def get_adapter(source_format: str) -> Callable[[Mapping, Mapping | None], dict]:
    """The adapter of a `format:` name; a ValueError lists the valid names."""
    if source_format not in ADAPTERS:
        raise ValueError(f"Unknown source format {source_format!r}; valid formats: {', '.join(sorted(ADAPTERS))}.")
    return ADAPTERS[source_format]


# ----------------------------------------------------------------------------------------------------------------
# Reading source files
# ----------------------------------------------------------------------------------------------------------------
def _parquet_refs(value: Any, path: str, row: int, column: str, item: int | None = None) -> Any:
    """An Image struct with bytes -> ParquetImage (the bytes stay in the file); one with a path only -> the path."""
    if isinstance(value, list):
        return [_parquet_refs(v, path, row, column, i) for i, v in enumerate(value)]
    if isinstance(value, dict):
        return ParquetImage(path, row, column, item) if value.get("bytes") else value.get("path")
    return value


def _read_records(path: str) -> Iterator[Any]:
    if path.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        parquet, row = pq.ParquetFile(path), 0
        image_columns = []
        for column in parquet.schema_arrow:
            listed = pa.types.is_list(column.type) or pa.types.is_large_list(column.type)
            kind = column.type.value_type if listed else column.type
            if pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0:
                image_columns.append(column.name)
        for batch in parquet.iter_batches(batch_size=256):
            for record in batch.to_pylist():
                for column in image_columns:
                    record[column] = _parquet_refs(record[column], path, row, column)
                yield record
                row += 1
    elif path.endswith(".jsonl"):
        with open(path, encoding="utf-8") as file:
            for number, line in enumerate(file, 1):
                try:
                    record = json.loads(line) if line.strip() else None
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}, line {number} is not valid JSON ({error}).") from error
                if record is not None:
                    yield record
    elif path.endswith(".json"):
        with open(path, encoding="utf-8") as file:
            records = json.load(file)
        if not isinstance(records, list):
            raise ValueError(f"{path} holds a JSON {type(records).__name__}; a .json source must be a list of "
                             "records (use .jsonl for one record per line).")
        yield from records
    else:
        raise ValueError(f"Data file {path!r}: give a .json (list of records), .jsonl or .parquet file.")


# ----------------------------------------------------------------------------------------------------------------
# The mixture
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class SourceSpec:
    """One source of the mix (one YAML entry; see the module docstring)."""

    name: str
    format: str
    path: str | list[str]
    image_root: str | None = None
    weight: float = 1.0
    fields: dict[str, str | list[str]] = field(default_factory=dict)
    include_image_prefixes: list[str] | None = None
    exclude_image_prefixes: list[str] | None = None

    def __post_init__(self):
        get_adapter(self.format)
        self.path = [os.fspath(p) for p in _as_list(self.path)]
        self.fields = dict(self.fields or {})
        try:
            _fields(self.format, self.fields)
            self.weight = float(self.weight)
        except (ValueError, TypeError) as error:
            raise ValueError(f"Source {self.name!r}: {error}") from error
        if not self.path or not self.weight >= 0:
            raise ValueError(f"Source {self.name!r}: needs a `path` and a `weight` >= 0 (got {self.weight}; 1.0 = "
                             "every sample once, 0 = off).")

    def selects(self, images: list) -> bool:
        """The prefix filters, on the first image's relative path ("./" ignored; "" without image path)."""
        first = next((ref for ref in images if isinstance(ref, str)), "")
        first = first[2:] if first.startswith("./") else first
        if self.include_image_prefixes is not None and not first.startswith(tuple(self.include_image_prefixes)):
            return False
        return not first.startswith(tuple(self.exclude_image_prefixes or ()))


def _encode(row: dict) -> bytes:
    """Compact record: [[[role initial, [text or 0 (= image block), ...]], ...], [image refs]]."""
    turns = [[m["role"][0], [b["text"] if b["type"] == "text" else 0 for b in m["content"]]] for m in row["messages"]]
    images = [list(ref) if isinstance(ref, ParquetImage) else ref for ref in row["images"]]
    return json.dumps([turns, images], ensure_ascii=False, separators=(",", ":")).encode()


_ROLE_NAMES = {"s": "system", "u": "user", "a": "assistant"}


def _decode(data: bytes) -> dict:
    turns, images = json.loads(data)
    messages = [{"role": _ROLE_NAMES[role], "content": [{"type": "text", "text": b} if isinstance(b, str) else
                                                        {"type": "image"} for b in blocks]} for role, blocks in turns]
    return {"messages": messages, "images": [ParquetImage(*ref) if isinstance(ref, list) else ref for ref in images]}


class _Skip(Exception):
    def __init__(self, path: str | None, reason: str):
        super().__init__(reason)
        self.path, self.reason = path, reason


class TrolMixtureDataset(torch.utils.data.Dataset):
    """The mix as a map-style dataset of TRL rows, images loaded in `__getitem__` (see the module docstring).

    Args:
        sources: `SourceSpec`s or dicts of their fields (paths absolute or relative to the working directory).
        seed: seeds the weight subsets and the order of the mix.
        skip_log: json-lines file receiving one line per skipped sample (e.g. `<output_dir>/skipped_samples.jsonl`);
            None logs each skip as a warning instead.
        processor / max_length: with both, samples whose processed length exceeds max_length are skipped.
        shuffle: shuffle the whole mix (else sources follow each other in order).
    """

    def __init__(self, sources: Sequence[SourceSpec | Mapping], seed: int = 0,
                 skip_log: str | os.PathLike | None = None, processor: ProcessorMixin | None = None,
                 max_length: int | None = None, shuffle: bool = True):
        self.sources = [s if isinstance(s, SourceSpec) else SourceSpec(**s) for s in sources]
        if len({s.name for s in self.sources}) != len(self.sources):
            raise ValueError(f"Source names must be unique; got {[s.name for s in self.sources]}.")
        self.skip_log = os.fspath(skip_log) if skip_log is not None else None
        if self.skip_log and os.path.dirname(self.skip_log):
            os.makedirs(os.path.dirname(self.skip_log), exist_ok=True)
        self.processor, self.max_length = processor, max_length
        self.skipped: collections.Counter = collections.Counter()  # (source, reason kind) -> n, in this process
        self._bad: set[int] = set()
        self._parquet_files: dict[str, tuple[Any, list[int]]] = {}  # path -> (ParquetFile, row group starts)
        self._parquet_group: tuple[tuple | None, Any] = (None, None)  # (path, group, column) -> its decoded cells
        rng = np.random.default_rng(seed)
        chunks, source_of, index_of, order = [], [], [], []
        for source_id, spec in enumerate(self.sources):
            first = len(chunks)
            n = self._read_source(spec, source_id, chunks, source_of, index_of) if spec.weight > 0 else 0
            count = int(round(spec.weight * n))
            extra = np.sort(rng.choice(n, count % n, replace=False)) if n else np.empty(0, np.int64)
            order.append(first + np.concatenate([np.tile(np.arange(n), count // n if n else 0), extra]))
        self._data = np.frombuffer(b"".join(chunks), dtype=np.uint8)
        self._offsets = np.cumsum([0] + [len(chunk) for chunk in chunks], dtype=np.int64)
        self._source_of = np.asarray(source_of, dtype=np.int16)
        self._index_of = np.asarray(index_of, dtype=np.int64)
        self._order = np.concatenate(order).astype(np.int64) if order else np.empty(0, np.int64)
        if shuffle:
            rng.shuffle(self._order)

    def _read_source(self, spec: SourceSpec, source_id: int, chunks: list, source_of: list, index_of: list) -> int:
        adapter, root = get_adapter(spec.format), spec.image_root or os.path.dirname(spec.path[0])
        loaded, index, malformed = 0, -1, []
        for path in spec.path:
            if not os.path.isfile(path):
                raise ValueError(f"Source {spec.name!r}: data file {path!r} does not exist; download it or fix `path`.")
            for record in _read_records(path):
                index += 1
                try:
                    if not isinstance(record, Mapping):
                        raise MalformedSample(f"the record is a {type(record).__name__}, not an object")
                    row = adapter(record, spec.fields)
                except MalformedSample as error:
                    malformed.append(f"{path}, record {index}: {error}")
                    self._log_skip(spec.name, index, path, f"malformed: {error}")
                    continue
                if spec.selects(row["images"]):
                    row["images"] = [os.path.normpath(os.path.join(root, ref)) if isinstance(ref, str) else ref
                                     for ref in row["images"]]
                    chunks.append(_encode(row))
                    source_of.append(source_id)
                    index_of.append(index)
                    loaded += 1
        if malformed and not loaded:
            raise ValueError(f"Source {spec.name!r} (format {spec.format!r}): no usable record; first problem: "
                             f"{malformed[0]}. Check `format` (one of {sorted(ADAPTERS)}) or map the field names "
                             "with `fields:`.")
        if malformed:
            logger.warning("Source %r: %d malformed records skipped (first: %s)", spec.name, len(malformed),
                           malformed[0])
        return loaded

    def __len__(self) -> int:
        return len(self._order)

    @property
    def num_samples_per_source(self) -> dict[str, int]:
        counts = np.bincount(self._source_of[self._order], minlength=len(self.sources))
        return {spec.name: int(count) for spec, count in zip(self.sources, counts)}

    def origin(self, i: int) -> tuple[str, int]:
        """(source name, record index in the source's file(s)) of mix position i."""
        record = self._order[i]
        return self.sources[self._source_of[record]].name, int(self._index_of[record])

    def row(self, i: int) -> dict:
        """The row at mix position i with image references (paths, ParquetImage): nothing loaded."""
        record = self._order[i]
        return _decode(self._data[self._offsets[record]:self._offsets[record + 1]].tobytes())

    def __getitem__(self, i: int) -> dict:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"Index {i} is out of range for a mix of {n} samples.")
        for step in range(n):
            position = (i + step) % n
            record = int(self._order[position])
            if record in self._bad:
                continue
            try:
                return self._load(self.row(position))
            except _Skip as skip:
                self._bad.add(record)
                self._log_skip(*self.origin(position), skip.path, skip.reason)
        raise RuntimeError(f"None of the {n} samples of the mix could be loaded (see {self.skip_log or 'the log'}): "
                           "check the image roots and files.")

    def _load(self, row: dict) -> dict:
        images = [self._load_image(ref) for ref in row["images"]]
        if self.processor is not None and self.max_length is not None:
            try:
                length = self.processed_length(row["messages"], images)
            except ValueError as error:  # e.g. a text holding the processor's image tokens
                raise _Skip(None, f"unprocessable: {error}") from error
            if length > self.max_length:
                first = next((ref for ref in row["images"] if isinstance(ref, str)), None)
                raise _Skip(first, f"too_long: {length} tokens > max_length {self.max_length}")
        return {"messages": row["messages"], "images": images}

    def processed_length(self, messages: list[dict], images: list[PIL.Image.Image]) -> int:
        """Exact token count of the sample as TRL's collator builds it: the processor's own chat template (the one
        SFTTrainer uses when it holds {% generation %} markers, as TrolProcessor's do), image tokens, tiles."""
        images, filled = iter(images), []
        for message in messages:
            content = [dict(b, image=next(images)) if b["type"] == "image" else b for b in message["content"]]
            filled.append({**message, "content": content})
        out = self.processor.apply_chat_template([filled], tokenize=True, return_dict=True,
                                                 processor_kwargs={"add_special_tokens": False})
        return len(out["input_ids"][0])

    def _load_image(self, ref: str | ParquetImage) -> PIL.Image.Image:
        path = ref if isinstance(ref, str) else f"{ref.path}#row={ref.row}/{ref.column}"
        try:
            if isinstance(ref, str):
                if not os.path.isfile(ref):
                    raise _Skip(path, "missing_image")
                return load_rgb_image(ref)
            cell = self._parquet_cell(ref)
            if not isinstance(cell, dict) or not cell.get("bytes"):
                raise _Skip(path, "missing_image")
            with PIL.Image.open(io.BytesIO(cell["bytes"])) as opened:
                opened.load()
                return load_rgb_image(PIL.ImageOps.exif_transpose(opened))
        except (ValueError, TypeError, OSError, SyntaxError, EOFError, PIL.Image.DecompressionBombError) as error:
            cause = error.__cause__ or error  # load_rgb_image's ValueError wraps PIL's error
            raise _Skip(path, f"unreadable_image: {type(cause).__name__}: {cause}") from error

    def _parquet_cell(self, ref: ParquetImage) -> Any:
        import pyarrow.parquet as pq

        if ref.path not in self._parquet_files:
            parquet = pq.ParquetFile(ref.path)
            sizes = [parquet.metadata.row_group(g).num_rows for g in range(parquet.num_row_groups)]
            self._parquet_files[ref.path] = parquet, np.cumsum([0] + sizes).tolist()
        parquet, starts = self._parquet_files[ref.path]
        group = bisect.bisect_right(starts, ref.row) - 1
        if self._parquet_group[0] != (ref.path, group, ref.column):  # one row group of one column per process
            cells = parquet.read_row_group(group, columns=[ref.column]).column(0)
            self._parquet_group = (ref.path, group, ref.column), cells
        cell = self._parquet_group[1][ref.row - starts[group]].as_py()
        return cell[ref.item] if ref.item is not None else cell

    def _log_skip(self, source: str, index: int, path: str | None, reason: str) -> None:
        self.skipped[(source, reason.split(":")[0])] += 1
        event = {"source": source, "index": index, "path": path, "reason": reason}
        if self.skip_log is None:
            logger.warning("Skipped sample %s", json.dumps(event))
        else:
            with open(self.skip_log, "a", encoding="utf-8") as log:  # one small write per event: atomic append
                log.write(json.dumps(event, ensure_ascii=False) + "\n")

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_parquet_files": {}, "_parquet_group": (None, None)}  # they stay in their process

    def as_hf_dataset(self) -> "datasets.Dataset":  # noqa: F821 (imported on use)
        """This mix as the `datasets.Dataset` that TRL's SFTTrainer requires (it refuses a torch Dataset).

        Its Arrow table holds only the mix positions (8 bytes a sample) in a column named "messages", so that
        Trainer's `remove_unused_columns` (on by default) keeps it; a `set_transform` turns each position into
        `self[position]` on access, skip policy included."""
        import datasets

        view = datasets.Dataset.from_dict({"messages": np.arange(len(self), dtype=np.int64)})
        view.set_transform(_PositionsToRows(self))
        return view


class _PositionsToRows:
    """`datasets` transform: a batch of mix positions -> the batch of loaded rows."""

    def __init__(self, mix: TrolMixtureDataset):
        self.mix = mix

    def __call__(self, batch: dict) -> dict:
        rows = [self.mix[int(position)] for position in batch["messages"]]
        return {"messages": [row["messages"] for row in rows], "images": [row["images"] for row in rows]}

    def __deepcopy__(self, memo) -> "_PositionsToRows":
        return self  # datasets deep-copies in remove_columns: share the read-only mix rather than copy it


def load_mixture(config: str | os.PathLike | Mapping, seed: int = 0, *, skip_log: str | os.PathLike | None = None,
                 processor: ProcessorMixin | None = None, max_length: int | None = None,
                 shuffle: bool = True) -> TrolMixtureDataset:
    """The mix of a YAML file (its relative paths are relative to the file) or of a dict with the same schema:
    `{"sources": [{name, format, path, image_root?, weight?, fields?, include_/exclude_image_prefixes?}, ...]}`."""
    import yaml

    where, base = "The mix config", os.getcwd()
    if not isinstance(config, Mapping):
        where, base = os.fspath(config), os.path.dirname(os.path.abspath(config))
        with open(config, encoding="utf-8") as file:
            config = yaml.safe_load(file)
    if not isinstance(config, Mapping) or not isinstance(config.get("sources"), list) or not config["sources"]:
        raise ValueError(f"{where} must hold `sources:`, a non-empty list (see trainer/recipes/data_mix.yaml).")
    if set(config) != {"sources"}:
        raise ValueError(f"{where}: unknown top-level keys {sorted(set(config) - {'sources'})}; only `sources`.")
    valid, specs = {f.name for f in dataclass_fields(SourceSpec)}, []
    for number, entry in enumerate(config["sources"]):
        if not isinstance(entry, Mapping):
            raise ValueError(f"{where}: source {number} is {entry!r:.100}, not a mapping with `name`, `format`, "
                             "`path`...")
        missing, unknown = {"name", "format", "path"} - set(entry), set(entry) - valid
        if missing or unknown:
            raise ValueError(f"{where}: source {number} ({entry.get('name')!r}) lacks keys {sorted(missing)} / has "
                             f"unknown keys {sorted(unknown)}; valid keys: {sorted(valid)}.")
        entry = dict(entry, path=[os.path.join(base, p) for p in _as_list(entry["path"])])
        if entry.get("image_root") is not None:
            entry["image_root"] = os.path.join(base, entry["image_root"])
        specs.append(SourceSpec(**entry))
    return TrolMixtureDataset(specs, seed=seed, skip_log=skip_log, processor=processor, max_length=max_length,
                              shuffle=shuffle)


# ----------------------------------------------------------------------------------------------------------------
# Reporting skips
# ----------------------------------------------------------------------------------------------------------------
def skip_summary(log_path: str | os.PathLike) -> dict:
    """{"total": n, "by_source": {source: {reason kind: n}}, "by_reason": {kind: n}} over the unique skipped samples
    of the log (one logged by several workers, ranks or epochs counts once); no log file means no skips."""
    seen = set()
    if os.path.isfile(log_path):
        with open(log_path, encoding="utf-8") as log:
            for line in log:
                try:
                    event = json.loads(line)
                    seen.add((event["source"], event["index"], str(event["reason"]).split(":")[0]))
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue  # a line cut short by a killed process
    by_source = collections.defaultdict(collections.Counter)
    for source, _, kind in seen:
        by_source[source][kind] += 1
    return {"total": len(seen), "by_source": {source: dict(kinds) for source, kinds in sorted(by_source.items())},
            "by_reason": dict(collections.Counter(kind for _, _, kind in seen))}


def format_skip_summary(summary: dict) -> str:
    parts = [f"{source} ({', '.join(f'{kind} {n}' for kind, n in sorted(kinds.items()))})"
             for source, kinds in summary["by_source"].items()]
    return f"Skipped {summary['total']} samples" + (": " + "; ".join(parts) if parts else "")


class SkippedSamplesCallback(TrainerCallback):
    """On the main process: a warning at each log when new samples were skipped, the summary at the end of training.
    (The whole log is re-read each time: it holds only skips.)"""

    def __init__(self, log_path: str | os.PathLike):
        self.log_path = os.fspath(log_path)
        self._reported = 0

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero:
            summary = skip_summary(self.log_path)
            if summary["total"] > self._reported:
                logger.warning("%d new skipped samples. %s; see %s", summary["total"] - self._reported,
                               format_skip_summary(summary), self.log_path)
                self._reported = summary["total"]

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            message = f"{format_skip_summary(skip_summary(self.log_path))} (log: {self.log_path})"
            print(message)
            logger.info(message)


__all__ = ["ADAPTERS", "ADAPTER_FIELDS", "MalformedSample", "ParquetImage", "SkippedSamplesCallback", "SourceSpec",
           "TrolMixtureDataset", "docowl", "format_skip_summary", "get_adapter", "llava", "load_mixture",
           "mathinstruct", "mathplus", "mathvision", "skip_summary"]
