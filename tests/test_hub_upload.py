"""hub_upload.py: check SRC, assemble the release, model card, clean-process validation, upload through a recording fake
of HfApi (never the real hub), token hygiene. One real release (and one real validation) is shared by the module."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import yaml
from huggingface_hub import ModelCard
from tiny import char_tokenizer, tiny_model

from trol import TROL_INTERNLM2_TEMPLATE, TrolProcessor, hub_upload, trol_clip_image_processor
from trol.modeling_trol import AUTO_MAP
from trol.trainer import TrolDataArguments, TrolModelArguments
from trol.trainer.train import ARGS_FILE

REPO = Path(hub_upload.__file__).resolve().parent
TOKEN = "hf_secretTOKENabcdefghijklmnopqrstuvwxyz012"
RESULTS = {"MMBench": 71.5, "MathVista": {"value": 51.8, "metric": "accuracy", "dataset": "AI4Math/MathVista"}}


class RecordingApi:
    """Stands in for huggingface_hub.HfApi: records every call; `fail` raises from upload_folder."""

    def __init__(self, fail: Exception | None = None):
        self.calls, self.fail = [], fail

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))

    def create_branch(self, repo_id, **kwargs):
        self.calls.append(("create_branch", repo_id, kwargs))

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", sorted(os.listdir(kwargs["folder_path"])), kwargs))
        if self.fail:
            raise self.fail


def save_source(folder: Path, **save_kwargs) -> Path:
    tiny_model("llama").save_pretrained(folder, **save_kwargs)
    TrolProcessor(trol_clip_image_processor(28), char_tokenizer(), num_image_tokens=4,
                  chat_template=TROL_INTERNLM2_TEMPLATE).save_pretrained(folder)
    return folder


def write_training_args(root: Path, src: Path) -> None:
    """A stage-1 folder and a stage-2 output as trol-train records them (model/data parts from the real dataclasses)."""
    mix = root / "mix.yaml"
    mix.write_text(yaml.safe_dump({"sources": [
        {"name": "sharegpt4v_caption", "format": "sharegpt4v", "path": "a.json", "weight": 1.0},
        {"name": "mathvision", "format": "mathvision", "path": "b.parquet"},
        {"name": "switched_off", "format": "llava", "path": "c.json", "weight": 0}]}))
    stage1 = root / "stage1"
    stage1.mkdir()
    sft = {"learning_rate": 1e-4, "lr_scheduler_type": "cosine_with_min_lr", "num_train_epochs": 1.0,
           "per_device_train_batch_size": 16, "gradient_accumulation_steps": 6, "max_length": 4096,
           "hub_token": "<HUB_TOKEN>"}
    data = asdict(TrolDataArguments(data_config=str(mix)))
    first = TrolModelArguments(stage=1, vision_model="openai/clip-vit-large-patch14-336",
                               language_model="Qwen/Qwen2.5-1.5B-Instruct", image_size=490)
    second = TrolModelArguments(stage=2, model_name_or_path=str(stage1), quantization="4bit", lora_r=64, lora_alpha=32)
    for folder, model in ((stage1, first), (src, second)):
        (folder / ARGS_FILE).write_text(json.dumps({"model": asdict(model), "data": data, "sft": sft}))


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """A dry run with everything: training args, --results, --license, a stale modeling_trol.py in SRC."""
    root = tmp_path_factory.mktemp("hub")
    src = save_source(root / "src")
    stale = src / "modeling_trol.py"
    stale.write_text("# stale copy from an old checkout\n" + stale.read_text())
    write_training_args(root, src)
    (root / "results.json").write_text(json.dumps(RESULTS))
    api = RecordingApi()
    out = hub_upload.publish(src, "someone/TroL-tiny", license="apache-2.0", results=root / "results.json",
                             dry_run=True, output=root / "release", api=api)
    assert api.calls == []  # a dry run uploads nothing
    return out


@pytest.fixture
def no_validation(monkeypatch):
    """Skip the ~5 s clean-process load in tests about other steps (the module's release runs the real one)."""
    runs = []
    monkeypatch.setattr(hub_upload, "validate_release", lambda folder: runs.append(folder) or {
        "model_class": "TrolForConditionalGeneration", "new_tokens": [5]})
    return runs


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_dry_run_release_loads_offline_with_remote_code_in_a_clean_process(release):
    report = release.validation  # the child: empty cwd, HF_HUB_OFFLINE=1, `trol` not importable
    assert report["model_class"] == "TrolForConditionalGeneration" and report["processor_class"] == "TrolProcessor"
    assert report["model_module"].startswith("transformers_modules")
    assert len(report["new_tokens"]) == 4 and report["image_tokens"] == 4
    assert {"README.md", "config.json", "generation_config.json", "model.safetensors", "processor_config.json",
            "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"} <= set(release.files)
    assert ARGS_FILE not in release.files  # local paths stay local; the card summarises the training
    config = json.loads((release.folder / "config.json").read_text())
    assert config["auto_map"].items() >= AUTO_MAP.items()
    assert json.loads((release.folder / "processor_config.json").read_text())["auto_map"] == {
        "AutoProcessor": "processing_trol.TrolProcessor"}


def test_remote_code_files_are_this_repositorys_even_when_src_holds_stale_copies(release):
    for name in hub_upload.REMOTE_CODE:
        assert sha(release.folder / name) == sha(REPO / name), name
    stale = release.folder.parent / "src" / "modeling_trol.py"
    assert stale.read_text().startswith("# stale copy") and sha(stale) != sha(REPO / "modeling_trol.py")


def test_card_metadata_parses_and_has_the_release_fields(release):
    text = (release.folder / "README.md").read_text()
    metadata = yaml.safe_load(text.split("---")[1])
    data = ModelCard.load(release.folder / "README.md").data
    assert metadata["license"] == data.license == "apache-2.0"
    assert data.library_name == "transformers" and data.pipeline_tag == "image-text-to-text"
    assert {"trol", "custom_code", "vision-language", "image-text-to-text"} <= set(data.tags)
    # base models from the stage-1 arguments that the stage-2 record points to; sources with weight 0 left out
    assert data.base_model == ["openai/clip-vit-large-patch14-336", "Qwen/Qwen2.5-1.5B-Instruct"]
    assert data.datasets == ["sharegpt4v_caption", "mathvision"]
    scores = {(r.dataset_name, r.metric_type): r.metric_value for r in data.eval_results}
    assert scores == {("MMBench", "score"): 71.5, ("MathVista", "accuracy"): 51.8}
    assert metadata["model-index"][0]["name"] == "TroL-tiny"


def test_card_body_describes_model_usage_settings_training_results_and_citation(release):
    body = release.card.text
    assert "`llama` decoder (2 layers, hidden size 32)" in body and "2 x (H+1) = 2 x 33 = 66 gate parameters" in body
    assert 'AutoModelForImageTextToText.from_pretrained("someone/TroL-tiny", trust_remote_code=True' in body
    assert 'pipeline("image-text-to-text", model="someone/TroL-tiny", trust_remote_code=True)' in body
    for row in ["| `inference_traversal` | `question` |", "| `share_gates` | `False` |",
                "| `use_traversal` | `True` |"]:
        assert row in body
    assert "Stage 1 (projector + gates)" in body and "Stage 2 (projector + gates + LoRA on the LLM)" in body
    assert "| LoRA r / alpha | 64 / 32 |" in body and "| quantization | 4bit |" in body
    assert "| learning rate | 0.0001 |" in body and "| gradient accumulation | 6 |" in body
    assert "| MMBench | score | 71.5 |" in body and "| MathVista | accuracy | 51.8 |" in body
    assert "## Limitations" in body and "@inproceedings{lee2024trol," in body
    assert "License unknown" not in body and "Converted checkpoint" not in body


def test_unknown_license_is_flagged_in_output_and_card_not_invented(tmp_path, capsys, no_validation):
    src = save_source(tmp_path / "src")
    assert hub_upload.main([str(src), "--repo-id", "someone/x", "--dry-run", "--output", str(tmp_path / "r")]) == 0
    captured = capsys.readouterr()
    assert "WARNING: no license known" in captured.err
    card = ModelCard.load(tmp_path / "r" / "README.md")
    assert card.data.license == "other" and "License unknown" in card.text
    assert "----- README.md -----" in captured.out and "model.safetensors" in captured.out  # file list + card


def test_license_is_taken_from_the_existing_card_of_src(tmp_path, no_validation):
    src = save_source(tmp_path / "src")
    (src / "README.md").write_text("---\nlicense: mit\n---\n# old card\n")
    release = hub_upload.publish(src, "someone/x", dry_run=True, output=tmp_path / "r", api=RecordingApi())
    assert release.card.data.license == "mit" and not release.warnings


def test_converted_checkpoint_says_so_and_links_its_source(tmp_path, no_validation):
    src = save_source(tmp_path / "src")
    marker = {"source_repo": "BK-Lee/TroL-7B", "source_revision": "abc123"}
    (src / hub_upload.CONVERSION_FILE).write_text(json.dumps(marker))
    release = hub_upload.publish(src, "someone/TroL-7B-hf", license="apache-2.0", dry_run=True, output=tmp_path / "r",
                                 api=RecordingApi())
    assert "Converted checkpoint" in release.card.text
    assert "[BK-Lee/TroL-7B](https://huggingface.co/BK-Lee/TroL-7B) (revision `abc123`)" in release.card.text
    assert "BK-Lee/TroL-7B" in release.card.data.base_model and hub_upload.CONVERSION_FILE in release.files


@pytest.mark.parametrize("revision, private", [(None, False), ("v1", True)])
def test_upload_calls_the_hub_api_with_repo_folder_message_revision_and_privacy(tmp_path, no_validation, revision,
                                                                                private):
    src = save_source(tmp_path / "src")
    api = RecordingApi()
    release = hub_upload.publish(src, "someone/TroL-tiny", license="apache-2.0", revision=revision, private=private,
                                 commit_message="First release", api=api)
    expected = [("create_repo", "someone/TroL-tiny", {"private": True if private else None, "exist_ok": True,
                                                      "repo_type": "model"})]
    if revision:
        expected.append(("create_branch", "someone/TroL-tiny",
                         {"branch": "v1", "exist_ok": True, "repo_type": "model"}))
    assert api.calls[:-1] == expected
    name, files, kwargs = api.calls[-1]
    assert name == "upload_folder" and files == sorted(release.files)
    assert kwargs == {"repo_id": "someone/TroL-tiny", "folder_path": str(release.folder),
                      "commit_message": "First release", "revision": revision, "repo_type": "model"}
    assert release.uploaded and not release.folder.exists()  # the temporary release folder is cleaned up
    assert no_validation == [release.folder]  # validated before the upload


def test_large_models_are_sharded_and_a_sharded_src_is_accepted(tmp_path, no_validation):
    src = save_source(tmp_path / "src", max_shard_size="100KB")
    release = hub_upload.publish(src, "someone/x", license="mit", dry_run=True, max_shard_size="100KB",
                                 output=tmp_path / "r", api=RecordingApi())
    shards = set(json.loads((release.folder / "model.safetensors.index.json").read_text())["weight_map"].values())
    assert len(shards) > 1 and shards <= set(release.files) and "model.safetensors" not in release.files


def broken(kind: str, src: Path) -> None:
    if kind == "missing weights":
        (src / "model.safetensors").unlink()
    elif kind == "bin weights only":
        (src / "model.safetensors").rename(src / "pytorch_model.bin")
    elif kind == "incomplete shard set":
        for shard in src.glob("model.safetensors"):
            shard.unlink()
        tiny_model("llama").save_pretrained(src, max_shard_size="100KB")
        sorted(src.glob("model-*.safetensors"))[-1].unlink()
    elif kind == "missing processor":
        for name in ("processor_config.json", "tokenizer.json", "tokenizer_config.json"):
            (src / name).unlink()
    elif kind == "missing chat template":
        (src / "chat_template.jinja").unlink()
    elif kind == "adapter folder":
        (src / "adapter_config.json").write_text("{}")
    elif kind == "not a trol config":
        config = json.loads((src / "config.json").read_text())
        (src / "config.json").write_text(json.dumps({**config, "model_type": "llava"}))


@pytest.mark.parametrize("kind, message", [
    ("missing weights", r"no weights \(model.safetensors .*save_pretrained"),
    ("bin weights only", r"only PyTorch .bin weights: re-save with safetensors"),
    ("incomplete shard set", r"incomplete shard set: .*missing \['model-0000\d-of-0000\d.safetensors'\]"),
    ("missing processor", r"processor_config.json .* is missing: .*processor.save_pretrained\(SRC\)"),
    ("missing chat template", r"no chat template \(chat_template.jinja\)"),
    ("adapter folder", r"LoRA adapter .*trol-train merge"),
    ("not a trol config", r"model_type='llava', not 'trol'"),
])
def test_incomplete_src_fails_with_a_clear_error_and_uploads_nothing(tmp_path, no_validation, kind, message):
    src = save_source(tmp_path / "src")
    broken(kind, src)
    api = RecordingApi()
    with pytest.raises(ValueError, match=message):
        hub_upload.publish(src, "someone/x", license="mit", api=api)
    assert api.calls == [] and no_validation == []


def test_a_release_that_fails_in_the_clean_process_aborts_with_its_stderr(release, tmp_path):
    folder = tmp_path / "bad"
    shutil.copytree(release.folder, folder)
    (folder / "modeling_trol.py").write_text("raise ImportError('broken remote code')\n")
    with pytest.raises(RuntimeError, match=r"(?s)failed to load .*nothing was uploaded.*broken remote code"):
        hub_upload.validate_release(folder)


def test_failed_validation_uploads_nothing_and_removes_the_temporary_folder(tmp_path, monkeypatch):
    def fail(folder):
        fail.folder = folder
        raise RuntimeError("clean process failed")
    monkeypatch.setattr(hub_upload, "validate_release", fail)
    api = RecordingApi()
    with pytest.raises(RuntimeError, match="clean process failed"):
        hub_upload.publish(save_source(tmp_path / "src"), "someone/x", license="mit", api=api)
    assert api.calls == [] and not fail.folder.exists()


def test_arguments_are_checked_before_any_work(tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    with pytest.raises(ValueError, match="must be OWNER/NAME"):
        hub_upload.publish(tmp_path, "no-owner", api=RecordingApi())
    with pytest.raises(ValueError, match="exists and is not an empty folder"):
        hub_upload.publish(tmp_path, "a/b", output=tmp_path / "taken", api=RecordingApi())
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"expected a JSON object"):
        hub_upload.publish(tmp_path, "a/b", results=tmp_path / "bad.json", api=RecordingApi())


def test_results_file_formats(tmp_path):
    path = tmp_path / "results.json"
    path.write_text(json.dumps([{"task": "MME", "metric": "score", "value": 1980.5}, {"task": "SEED", "value": 70}]))
    assert hub_upload.load_results(path) == [
        {"benchmark": "MME", "metric": "score", "value": 1980.5, "dataset": "MME"},
        {"benchmark": "SEED", "metric": "score", "value": 70, "dataset": "SEED"}]
    path.write_text(json.dumps({"MME": "high"}))
    with pytest.raises(ValueError, match="the score of 'MME' must be a number"):
        hub_upload.load_results(path)


def test_token_never_appears_in_output_of_main(tmp_path, capsys, monkeypatch, no_validation):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    api = RecordingApi(fail=RuntimeError(f"401 Unauthorized for token {TOKEN}"))
    monkeypatch.setattr(hub_upload, "HfApi", lambda: api)
    src = save_source(tmp_path / "src")
    assert hub_upload.main([str(src), "--repo-id", "someone/x"]) == 1  # no license: a warning is printed too
    captured = capsys.readouterr()
    assert api.calls and "401 Unauthorized for token hf_***" in captured.err
    assert TOKEN not in captured.out + captured.err


def test_token_never_appears_in_output_of_the_cli(tmp_path):
    """The real command and the real HfApi, offline and pointed at a dead endpoint: the upload fails, nothing leaks."""
    src = save_source(tmp_path / "src")
    env = {**os.environ, "HF_TOKEN": TOKEN, "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9",
           "HF_HOME": str(tmp_path / "hf_home")}
    result = subprocess.run([sys.executable, str(REPO / "hub_upload.py"), str(src), "--repo-id", "someone/x"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "validation passed" in result.stdout and "OfflineModeIsEnabled" in result.stderr
    assert TOKEN not in result.stdout + result.stderr
