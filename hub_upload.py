r"""Publish a TroL model on the Hugging Face hub: check, assemble a release folder, write the model card, validate it in
a clean process, upload.

    python hub_upload.py SRC --repo-id OWNER/NAME [--private] [--revision BRANCH] [--license apache-2.0] \
        [--results results.json] [--max-shard-size 5GB] [--output DIR] [--dry-run]
    trol-upload ...                       # the same, as a console command

SRC is any TroL folder: a merged training output (`trol-train merge`), a converted checkpoint, or a fresh model saved
with `model.save_pretrained(SRC)` + `processor.save_pretrained(SRC)`. Steps:
1. check SRC (TroL config, complete safetensors weights, processor, chat template; a LoRA adapter is refused);
2. assemble the release (a fresh temporary folder, or `--output DIR`, new or empty): the model loaded once and saved
   once as safetensors (sharded above `--max-shard-size`), `config.json` with the full `auto_map`, the
   remote-code files of THIS repository (never SRC's copies; checked by hash), processor, tokenizer, chat template,
   generation config;
3. write README.md (huggingface_hub ModelCard): metadata, usage, traversal settings, training details read from
   `trol_training_args.json` (written by trol-train), an evaluation table from `--results`, limitations, citation;
4. load the release in a separate clean Python process (empty cwd, offline, no `trol` importable) through the Auto
   classes with trust_remote_code=True and generate a few tokens from an image prompt; a failure aborts;
5. upload: `create_repo(exist_ok=True)`, `create_branch` (with --revision), `upload_folder`. The token is resolved by
   huggingface_hub (HF_TOKEN or the cached `hf auth login`) and masked in everything this script prints.
   `--dry-run` stops before the upload and prints the file list and the card.

`--results` format: a JSON object {benchmark: score} where a score is a number or
{"value": number, "metric": "accuracy", "dataset": "hub/dataset-id"} (metric and dataset optional); a list of
{"task": benchmark, "metric": ..., "value": ...} is accepted too. Results also go into the card's model-index.

Converted checkpoints (contract for converters): a converter writes `trol_conversion.json` into SRC,
{"source_repo": "BK-Lee/TroL-7B", "source_revision": "<commit>", "license": "<id>", "notes": "<text>"} (only
source_repo required); the card then says the weights are converted from source_repo, links it and lists it as a
base model, and the file travels with the release. License: --license, else SRC's README.md metadata, else the marker's;
when none is known the card says `license: other` with a visible note and a WARNING is printed (never invented).
"""

import argparse
import gc
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

if not __package__:  # `python hub_upload.py` from a checkout: import this checkout as the package `trol`
    import importlib.util

    _spec = importlib.util.spec_from_file_location("trol", Path(__file__).with_name("__init__.py"),
                                                   submodule_search_locations=[str(Path(__file__).parent)])
    sys.modules["trol"] = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(sys.modules["trol"])

import yaml
from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData, get_token
from safetensors import safe_open

from trol import modeling_trol
from trol.configuration_trol import TrolConfig
from trol.modeling_trol import AUTO_MAP, TrolForConditionalGeneration
from trol.processing_trol import TrolProcessor
from trol.trainer.train import ARGS_FILE

REMOTE_CODE = (
    "configuration_trol.py", "modeling_trol.py", "traversal_trol.py", "compression_trol.py", "processing_trol.py"
)
REPO_DIR = Path(modeling_trol.__file__).resolve().parent  # the code that loads the weights is the code that ships
CONVERSION_FILE = "trol_conversion.json"
TAGS = ["trol", "custom_code", "vision-language", "image-text-to-text"]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")
CITATION = """@inproceedings{lee2024trol,
  title     = {TroL: Traversal of Layers for Large Language and Vision Models},
  author    = {Lee, Byung-Kwan and Chung, Sangyun and Kim, Chae Won and Park, Beomchan and Ro, Yong Man},
  booktitle = {Proceedings of the 2024 Conference on Empirical Methods in Natural Language Processing},
  year      = {2024}
}"""
_TOKEN_PATTERN = re.compile(r"hf_[A-Za-z0-9]{20,}")


def _scrub(text: str) -> str:
    """Mask the hub token (as huggingface_hub resolves it, and anything shaped like one) in text to be printed."""
    token = get_token()
    if token:
        text = text.replace(token, "hf_***")
    return _TOKEN_PATTERN.sub("hf_***", text)


def _say(message: str, err: bool = False) -> None:
    print(_scrub(str(message)), file=sys.stderr if err else sys.stdout, flush=True)


@dataclass
class Release:
    """What `publish` built: the release folder, its files, the card, the clean-process report."""

    folder: Path
    files: dict[str, int]  # relative path -> bytes
    card: ModelCard
    validation: dict
    warnings: list[str] = field(default_factory=list)
    uploaded: bool = False


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not readable JSON ({error}).") from error


def check_source(src: str | os.PathLike) -> list[str]:
    """Check that SRC is a complete TroL folder. Returns its weight files; raises ValueError listing every problem."""
    src = Path(src)
    if not src.is_dir():
        raise ValueError(f"{src} is not a folder; pass a saved TroL model folder.")
    if (src / "adapter_config.json").exists():
        raise ValueError(f"{src} is a LoRA adapter (adapter_config.json), not a full model: merge it first with "
                         f"`trol-train merge {src} --output RELEASE_DIR`, then publish RELEASE_DIR.")
    problems = []
    if not (src / "config.json").exists():
        problems.append("config.json is missing: save the model with `model.save_pretrained(SRC)`.")
    elif (model_type := _read_json(src / "config.json").get("model_type")) != "trol":
        problems.append(f"config.json has model_type={model_type!r}, not 'trol': this is not a TroL model (build one "
                        "with TrolForConditionalGeneration.from_vision_and_text, or convert the authors' weights).")
    weights = _check_weights(src, problems)
    fix = "save the processor into SRC: `processor.save_pretrained(SRC)` (a trol-train output carries it)"
    has_tokenizer = (src / "tokenizer_config.json").exists() and any((src / f).exists() for f in TOKENIZER_FILES)
    if not ((src / "processor_config.json").exists() or (src / "preprocessor_config.json").exists()):
        problems.append(f"processor_config.json (or preprocessor_config.json + tokenizer files) is missing: {fix}.")
    elif not has_tokenizer:
        problems.append(f"the tokenizer (tokenizer_config.json + tokenizer.json/.model) is missing: {fix}.")
    configs = [src / n for n in ("processor_config.json", "tokenizer_config.json") if (src / n).exists()]
    if not ((src / "chat_template.jinja").exists() or (src / "chat_template.json").exists()
            or any(_read_json(path).get("chat_template") for path in configs)):
        problems.append("no chat template (chat_template.jinja): set `processor.chat_template = "
                        "TROL_INTERNLM2_TEMPLATE` (or `generic_chat_template(tokenizer)`) and run "
                        "`processor.save_pretrained(SRC)`.")
    if problems:
        raise ValueError(f"{src} cannot be published:\n- " + "\n- ".join(problems))
    return weights


def _check_weights(src: Path, problems: list[str]) -> list[str]:
    how = "re-save with `model.save_pretrained(SRC)` (or `trol-train merge ...` for a stage-2 output)"
    if (src / "model.safetensors.index.json").exists():
        weight_map = _read_json(src / "model.safetensors.index.json").get("weight_map", {})
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (src / s).exists()]
        if not shards or missing:
            problems.append(f"incomplete shard set: model.safetensors.index.json names {len(shards)} shards, missing "
                            f"{missing or 'all'}; copy the missing shards or {how}.")
            return []
    elif (src / "model.safetensors").exists():
        shards = ["model.safetensors"]
    elif any(src.glob("*.bin")):
        problems.append("only PyTorch .bin weights: re-save with safetensors (`model.save_pretrained(SRC)` writes "
                        "model.safetensors); the hub release ships safetensors only.")
        return []
    else:
        problems.append(f"no weights (model.safetensors or model.safetensors.index.json + shards): {how}.")
        return []
    for shard in shards:  # header only: catches a truncated or corrupt file
        try:
            with safe_open(str(src / shard), "pt") as file:
                file.keys()
        except Exception as error:  # safetensors raises its own error types for corrupt headers
            problems.append(f"{shard} is not a readable safetensors file ({error}); {how}.")
    return shards


def _file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assemble(src: str | os.PathLike, out: str | os.PathLike, max_shard_size: str = "5GB") -> dict:
    """Write the release folder `out` (must exist and be empty). Returns facts for the card (config, parameters)."""
    src, out = Path(src), Path(out)
    config = TrolConfig.from_pretrained(src)
    processor = TrolProcessor.from_pretrained(src, config=config)  # config given: no remote-code prompt
    expected = {"image_token_id": config.image_token_id, "num_image_tokens": config.image_seq_length}
    for name, value in expected.items():
        if getattr(processor, name) != value:
            raise ValueError(f"The processor's {name}={getattr(processor, name)} differs from the model's {value}: "
                             f"re-save a matching processor into {src}.")
    model = TrolForConditionalGeneration.from_pretrained(src, dtype="auto")  # loaded once, saved once
    facts = {"parameters": model.num_parameters(), "dtype": str(model.dtype).removeprefix("torch.")}
    model.save_pretrained(out, max_shard_size=max_shard_size)
    del model
    gc.collect()
    processor.save_pretrained(out)
    for name in REMOTE_CODE:  # this repository's files, whatever save_pretrained or SRC provided
        shutil.copyfile(REPO_DIR / name, out / name)
        if _file_hash(out / name) != _file_hash(REPO_DIR / name):
            raise RuntimeError(f"{out / name} does not match {REPO_DIR / name} after copying.")
    if (src / CONVERSION_FILE).exists():
        shutil.copyfile(src / CONVERSION_FILE, out / CONVERSION_FILE)
    check_source(out)
    auto_map = _read_json(out / "config.json").get("auto_map", {})
    if not (auto_map.items() >= AUTO_MAP.items() and (out / "generation_config.json").exists()):
        raise RuntimeError(f"The release lacks the full auto_map or generation_config.json: {auto_map}.")
    return {"config": TrolConfig.from_pretrained(out), **facts}


def load_results(path: str | os.PathLike) -> list[dict]:
    """Rows {benchmark, metric, value, dataset} from a --results file (format: module docstring)."""
    data = _read_json(Path(path))
    if isinstance(data, list) and all(isinstance(row, dict) and {"task", "value"} <= row.keys() for row in data):
        data = {row["task"]: {"value": row["value"], "metric": row.get("metric")} for row in data}
    if not isinstance(data, dict) or not data:
        raise ValueError(f"{path}: expected a JSON object {{\"benchmark\": score, ...}} (score a number or "
                         "{\"value\": number, \"metric\": ..., \"dataset\": ...}) or a list of {\"task\", \"metric\", "
                         "\"value\"} objects.")
    rows = []
    for name, score in data.items():
        score = score if isinstance(score, dict) else {"value": score}
        if not isinstance(score.get("value"), (int, float)) or isinstance(score.get("value"), bool):
            raise ValueError(f"{path}: the score of {name!r} must be a number; got {score.get('value')!r}.")
        rows.append({"benchmark": name, "metric": score.get("metric") or "score", "value": score["value"],
                     "dataset": score.get("dataset") or name})
    return rows


def _training_args(src: Path) -> list[dict]:
    """The trainer's saved arguments for SRC, and for the stage-1 folder it started from when that is readable."""
    records, folder = [], src
    while (folder / ARGS_FILE).exists() and len(records) < 3:
        record = _read_json(folder / ARGS_FILE)
        records.insert(0, record)
        parent = record.get("model", {}).get("model_name_or_path")
        if not parent or not Path(parent).is_dir() or Path(parent).resolve() == folder.resolve():
            break
        folder = Path(parent)
    return records


def _hub_id(value) -> str | None:
    """A hub repo id, not a local path."""
    ok = isinstance(value, str) and re.fullmatch(r"[\w.-]+/[\w.-]+", value) and not Path(value).exists()
    return value if ok and not value.startswith((".", "/", "~")) else None


def _dataset_names(records: list[dict], src: Path) -> list[str]:
    names = []
    for record in records:
        path = record.get("data", {}).get("data_config")
        for candidate in (Path(path), src / path) if path else ():
            try:
                sources = yaml.safe_load(candidate.read_text())["sources"]
            except (OSError, yaml.YAMLError, KeyError, TypeError):
                continue
            names += [s["name"] for s in sources if isinstance(s, dict) and s.get("name") and s.get("weight", 1)]
            break
    return list(dict.fromkeys(names))


def _table(rows: list[tuple]) -> str:
    rows = [[str(cell) for cell in row] for row in rows]
    return "\n".join(["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
                     + ["| " + " | ".join(row) + " |" for row in rows[1:]])


USAGE = """```python
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor, pipeline

model = AutoModelForImageTextToText.from_pretrained("{repo_id}", trust_remote_code=True, dtype="auto")
processor = AutoProcessor.from_pretrained("{repo_id}", trust_remote_code=True)
chat = [{{"role": "user", "content": [{{"type": "image", "image": Image.open("photo.jpg")}},
                                     {{"type": "text", "text": "Describe the image."}}]}}]
inputs = processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=True,
                                       return_tensors="pt").to(model.device)
output = model.generate(**inputs, max_new_tokens=128)
print(processor.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))

# or as a pipeline
pipe = pipeline("image-text-to-text", model="{repo_id}", trust_remote_code=True)
print(pipe(text=chat, max_new_tokens=128, return_full_text=False)[0]["generated_text"])
```"""
SETTINGS = ("use_traversal", "share_gates", "inference_traversal", "training_traversal", "image_token_id",
            "vision_feature_layer", "vision_feature_select_strategy", "downsample_ratio", "projector_layernorm")


def _training_lines(records: list[dict], datasets: list[str]) -> list[str]:
    lines = ["## Training\n"]
    for record in records:
        m, s = record.get("model", {}), record.get("sft", {})
        items = [("learning rate", s.get("learning_rate")), ("schedule", s.get("lr_scheduler_type")),
                 ("epochs", s.get("num_train_epochs")), ("batch per device", s.get("per_device_train_batch_size")),
                 ("gradient accumulation", s.get("gradient_accumulation_steps")), ("max length", s.get("max_length")),
                 ("dtype", m.get("dtype"))]
        if m.get("stage") == 2:
            items += [("LoRA r / alpha", f"{m.get('lora_r')} / {m.get('lora_alpha')}"),
                      ("quantization", m.get("quantization"))]
        trained = "projector + gates" + (" + LoRA on the LLM" if m.get("stage") == 2 else "")
        lines += [f"Stage {m.get('stage', '?')} ({trained}), with `trol-train`:\n",
                  _table([("setting", "value")] + [item for item in items if item[1] is not None]) + "\n"]
    return lines + ([f"Data sources: {', '.join(f'`{d}`' for d in datasets)}.\n"] if datasets else [])


def build_card(src: str | os.PathLike, repo_id: str, facts: dict, license: str | None = None,
               results: list[dict] | None = None) -> tuple[ModelCard, list[str]]:
    """The model card (metadata + body) and the warnings it raised (unknown license). facts: from `assemble`."""
    src, config, warnings = Path(src), facts["config"], []
    conversion = _read_json(src / CONVERSION_FILE) if (src / CONVERSION_FILE).exists() else None
    if conversion is not None and not _hub_id(conversion.get("source_repo")):
        raise ValueError(f"{src / CONVERSION_FILE} must name the authors' repo as \"source_repo\": \"OWNER/NAME\".")
    old_license = ModelCard.load(src / "README.md").data.license if (src / "README.md").exists() else None
    license = license or old_license or (conversion or {}).get("license")
    if not license:
        warnings.append("WARNING: no license known (pass --license, or give SRC a README.md with license metadata); "
                        "the card says `license: other` and flags it. Choose the license before sharing the model.")
    records = _training_args(src)
    base = [r.get("model", {}).get(k) for r in records for k in ("vision_model", "language_model")]
    base += [getattr(config.vision_config, "_name_or_path", None), getattr(config.text_config, "_name_or_path", None)]
    base = list(dict.fromkeys(b for b in base + [(conversion or {}).get("source_repo")] if _hub_id(b)))
    datasets, name = _dataset_names(records, src), repo_id.split("/")[-1]
    text, vision, layers = config.text_config, config.vision_config, config.num_gates
    evals = [EvalResult(task_type="image-text-to-text", dataset_type=r["dataset"], dataset_name=r["benchmark"],
                        metric_type=r["metric"], metric_value=r["value"]) for r in results or []]
    data = ModelCardData(license=license or "other", license_name=None if license else "unknown",
                         library_name="transformers", pipeline_tag="image-text-to-text", base_model=base or None,
                         datasets=datasets or None, tags=TAGS + [text.model_type, vision.model_type],
                         model_name=name, eval_results=evals or None)
    body = [f"# {name}\n"]
    if conversion:
        source, revision = conversion["source_repo"], conversion.get("source_revision")
        note = (f"> **Converted checkpoint.** These are the authors' weights from [{source}](https://huggingface.co/"
                f"{source}){f' (revision `{revision}`)' if revision else ''}, converted to the transformers "
                f"remote-code layout of TroL; no further training. {conversion.get('notes', '')}")
        body.append(note.rstrip() + "\n")
    if not license:
        body.append("> **License unknown.** The publisher did not state a license (metadata says `other`); ask them "
                    "before using this model beyond personal evaluation.\n")
    body += [
        "A TroL (*Traversal of Layers*, Lee et al., EMNLP 2024, [arXiv 2406.12246](https://arxiv.org/abs/2406.12246))"
        f" vision-language model: a `{vision.model_type}` vision encoder, a projector, and a `{text.model_type}` "
        f"decoder ({text.num_hidden_layers} layers, hidden size {text.hidden_size}) whose layers each run twice on the "
        "prompt, a learned gate mixing the two outputs token by token. "
        f"{'One gate is shared by all layers' if config.share_gates else 'Each layer has its own gate'}: {layers} x "
        f"(H+1) = {layers} x {text.hidden_size + 1} = {layers * (text.hidden_size + 1):,} gate parameters, of "
        f"{facts['parameters']:,} in total ({facts['dtype']} weights). Each image becomes {config.image_seq_length} "
        "tokens.\n",
        "## How to use\n", "`trust_remote_code=True` runs the TroL code files of this repository "
        "(`configuration_trol.py`, `modeling_trol.py`, `processing_trol.py`); read them first.\n",
        USAGE.format(repo_id=repo_id) + "\n", "## Traversal settings (config.json)\n",
        _table([("field", "value")] + [(f"`{s}`", f"`{getattr(config, s)}`") for s in SETTINGS]) + "\n"]
    body += _training_lines(records, datasets) if records else []
    if results:
        body += ["## Evaluation\n", "Reported by the publisher (`--results`):\n",
                 _table([("benchmark", "metric", "score")] + [(r["benchmark"], r["metric"], r["value"])
                                                              for r in results]) + "\n"]
    body += ["## Limitations\n",
             "- Like its backbones, the model can hallucinate, misread text in images and reflect biases of its "
             "training data; do not rely on it for decisions about people, health, law or safety.\n"
             "- Traversal runs every prompt layer twice: prefill costs about twice the backbone's compute (decoding "
             "does not, with `inference_traversal=\"question\"`).\n"
             + ("- Only the evaluations listed above were run for this checkpoint.\n" if results
                else "- No evaluation results are reported for this checkpoint.\n"),
             "## Citation\n", f"```bibtex\n{CITATION}\n```\n"]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body)), warnings


VALIDATE_SCRIPT = """
import json, sys
sys.modules["trol"] = None  # the release must run on its own remote code, not on an installed `trol`
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor
folder = sys.argv[1]
model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
chat = [{"role": "user", "content": [{"type": "image", "image": Image.new("RGB", (64, 48), (200, 30, 30))},
                                     {"type": "text", "text": "What is in the image?"}]}]
inputs = processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=True,
                                       return_tensors="pt")
new = model.generate(**inputs, max_new_tokens=4, do_sample=False)[0, inputs["input_ids"].shape[1]:]
print("TROL_VALIDATION", json.dumps({"model_class": type(model).__name__, "model_module": type(model).__module__,
                  "processor_class": type(processor).__name__, "new_tokens": new.tolist(),
                  "image_tokens": int((inputs["input_ids"] == model.config.image_token_id).sum()),
                  "text": processor.decode(new, skip_special_tokens=True)}))
"""


def validate_release(folder: str | os.PathLike, timeout: float = 3600) -> dict:
    """Load `folder` in a clean interpreter (empty cwd, offline, no token, own modules cache, `trol` not importable)
    through AutoModelForImageTextToText + AutoProcessor with trust_remote_code=True and generate 4 tokens from an
    image prompt. Returns the child's report; raises RuntimeError with its stderr tail on failure."""
    with tempfile.TemporaryDirectory(prefix="trol-validate-") as scratch:
        env = {k: v for k, v in os.environ.items()
               if k not in {"PYTHONPATH", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"}}
        env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HOME=os.path.join(scratch, "hf_home"),
                   HF_MODULES_CACHE=os.path.join(scratch, "modules"))
        try:
            child = subprocess.run([sys.executable, "-I", "-c", VALIDATE_SCRIPT, str(Path(folder).resolve())],
                                   cwd=scratch, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as error:
            raise RuntimeError(f"Loading {folder} in a clean process took over {timeout} s; nothing was uploaded.") \
                from error
    lines = [line for line in child.stdout.splitlines() if line.startswith("TROL_VALIDATION ")]
    report = json.loads(lines[-1].split(" ", 1)[1]) if child.returncode == 0 and lines else {}
    if (not report or not report["model_module"].startswith("transformers_modules")
            or report["model_class"] != "TrolForConditionalGeneration" or not report["new_tokens"]
            or not report["image_tokens"]):
        raise RuntimeError(f"The release folder {folder} failed to load and generate in a clean process (exit "
                           f"{child.returncode}); nothing was uploaded. Its report: {report}. Its stderr ends:\n"
                           + child.stderr[-3000:])
    return report


def publish(src: str | os.PathLike, repo_id: str, *, private: bool = False, revision: str | None = None,
            license: str | None = None, results: str | os.PathLike | None = None, dry_run: bool = False,
            output: str | os.PathLike | None = None, max_shard_size: str = "5GB", commit_message: str | None = None,
            api: HfApi | None = None) -> Release:
    """Steps 1-5 of the module docstring. `api`: an HfApi (default: a new one; tests pass a recording fake)."""
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo_id or ""):
        raise ValueError(f"--repo-id {repo_id!r} must be OWNER/NAME (e.g. your-name/TroL-1.8B).")
    rows = load_results(results) if results else None
    if output is not None and Path(output).exists() and (not Path(output).is_dir() or any(Path(output).iterdir())):
        raise ValueError(f"--output {output} exists and is not an empty folder; choose a new one.")
    src = Path(src)
    _say(f"checking {src}")
    check_source(src)
    folder = Path(output) if output is not None else Path(tempfile.mkdtemp(prefix="trol-release-"))
    folder.mkdir(parents=True, exist_ok=True)
    keep = output is not None or dry_run  # our temporary folder goes away after an upload or a failure
    try:
        _say(f"assembling the release in {folder}")
        facts = assemble(src, folder, max_shard_size=max_shard_size)
        card, warnings = build_card(src, repo_id, facts, license=license, results=rows)
        card.save(folder / "README.md")
        for warning in warnings:
            _say(warning, err=True)
        _say("validating: loading the release in a clean Python process (trust_remote_code, offline)")
        report = validate_release(folder)
        _say(f"validation passed: {report['model_class']} generated {len(report['new_tokens'])} tokens")
        files = {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}
        release = Release(folder, files, card, report, warnings)
        if dry_run:
            _say("\n".join([f"dry run: nothing uploaded. Release folder {folder}:"]
                           + [f"  {size:>14,}  {name}" for name, size in files.items()]))
            _say(f"\n----- README.md -----\n{card.content}")
            return release
        api = api or HfApi()  # the token: HF_TOKEN or the cached login, resolved by huggingface_hub
        message = commit_message or f"Upload TroL model ({facts['parameters']:,} parameters) with trol hub_upload"
        _say(f"uploading {len(files)} files to {repo_id}" + (f" (branch {revision})" if revision else ""))
        api.create_repo(repo_id, private=True if private else None, exist_ok=True, repo_type="model")
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=message, revision=revision,
                          repo_type="model")
        release.uploaded = True
        _say(f"uploaded: https://huggingface.co/{repo_id}" + (f"/tree/{revision}" if revision else ""))
        return release
    finally:
        if not keep:
            shutil.rmtree(folder, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="trol-upload", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="TroL model folder (merged training output, converted checkpoint, saved model)")
    parser.add_argument("--repo-id", required=True, help="OWNER/NAME on the hub")
    parser.add_argument("--private", action="store_true", help="create the repo private")
    parser.add_argument("--revision", default=None, help="branch to upload to (created if missing)")
    parser.add_argument("--license", default=None, help="license id for the card, e.g. apache-2.0")
    parser.add_argument("--results", default=None, help="JSON {benchmark: score} for the evaluation table")
    parser.add_argument("--dry-run", action="store_true", help="everything except the upload")
    parser.add_argument("--output", default=None, help="release folder to write (new or empty; default: temporary)")
    parser.add_argument("--max-shard-size", default="5GB", help="safetensors shard size (default 5GB)")
    parser.add_argument("--commit-message", default=None)
    args = parser.parse_args(argv)
    try:
        publish(args.src, args.repo_id, private=args.private, revision=args.revision, license=args.license,
                results=args.results, dry_run=args.dry_run, output=args.output, max_shard_size=args.max_shard_size,
                commit_message=args.commit_message)
    except Exception as error:  # printed scrubbed: an exception message may carry the token
        _say(f"error: {type(error).__name__}: {error}", err=True)
        return 1
    return 0


__all__ = ["Release", "assemble", "build_card", "check_source", "load_results", "main", "publish", "validate_release"]

if __name__ == "__main__":
    sys.exit(main())
