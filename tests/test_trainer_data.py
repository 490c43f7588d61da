"""trainer/data.py: source adapters, the YAML mix (weights, seeded order), lazy image loading, the skip policy and
its report, the exact length filter, and TRL's vision collator on mixed text-only / image batches. Every fixture is
written to tmp_path (tiny PNGs made with PIL, json/jsonl/parquet in the public layouts of the TroL sources)."""

import copy
import io
import json
import logging
import pickle
from pathlib import Path

import numpy as np
import PIL.Image
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from tiny import IMAGE_TOKEN, char_tokenizer, tiny_model
from transformers import TrainerControl, TrainerState, TrainingArguments
from trl import SFTConfig, SFTTrainer
from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

from trol.processing_trol import (
    TROL_INTERNLM2_TEMPLATE,
    TROL_PHI3_TEMPLATE,
    TrolProcessor,
    trol_clip_image_processor,
    trol_internvl_image_processor,
)
from trol.trainer.data import (
    ADAPTERS,
    ParquetImage,
    SkippedSamplesCallback,
    get_adapter,
    load_mixture,
    skip_summary,
)

ANSWER_END = "[UNUSED_TOKEN_145]"


def png(path, size=(30, 20), color=(200, 30, 10)):
    path.parent.mkdir(parents=True, exist_ok=True)
    PIL.Image.new("RGB", size, color).save(path)
    return path


def png_bytes(size=(30, 20), color=(10, 30, 200)) -> bytes:
    buffer = io.BytesIO()
    PIL.Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def write_json(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def write_parquet(path, rows, row_group_size=None):
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=row_group_size)
    return path


def processor(template=TROL_INTERNLM2_TEMPLATE):
    return TrolProcessor(trol_clip_image_processor(28), char_tokenizer(), chat_template=template, num_image_tokens=4)


def llava_record(i, image="coco/train2017/%06d.jpg", question="<image>\nWhat is in the image?"):
    record = {"id": f"{i:06d}", "conversations": [{"from": "human", "value": question},
                                                   {"from": "gpt", "value": f"Answer {i}."}]}
    if image:
        record["image"] = image % i if "%" in image else image
    return record


def llava_source(tmp_path, n=4, name="llava", missing=()):
    """n LLaVA records with images under tmp_path/images; indices in `missing` have no file on disk."""
    for i in range(n):
        if i not in missing:
            png(tmp_path / "images" / "coco" / "train2017" / f"{i:06d}.jpg", color=(i * 40, 0, 0))
    path = write_json(tmp_path / f"{name}.json", [llava_record(i) for i in range(n)])
    return {"name": name, "format": "llava", "path": str(path), "image_root": str(tmp_path / "images")}


def text_source(tmp_path, n=3, name="mathinstruct"):
    path = write_json(tmp_path / f"{name}.json", [{"instruction": f"What is {i}+{i}?", "output": f"It is {2 * i}.",
                                                    "source": "data/CoT/gsm_rft.json"} for i in range(n)])
    return {"name": name, "format": "mathinstruct", "path": str(path)}


def no_pil(value) -> bool:
    if isinstance(value, PIL.Image.Image):
        return False
    if isinstance(value, dict):
        return all(no_pil(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return all(no_pil(v) for v in value)
    return True


# ----------------------------------------------------------------------------------------------------------------
# Adapters
# ----------------------------------------------------------------------------------------------------------------
def test_llava_places_each_image_block_where_its_placeholder_stood():
    question = "Left:\n<image>\nRight:\n<image>\nSame?"
    row = ADAPTERS["llava"](llava_record(0, image=["a.jpg", "b.jpg"], question=question))
    assert row["images"] == ["a.jpg", "b.jpg"]
    assert row["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "Left:"}, {"type": "image"},
                                     {"type": "text", "text": "Right:"}, {"type": "image"},
                                     {"type": "text", "text": "Same?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Answer 0."}]},
    ]
    trailing = ADAPTERS["llava"](llava_record(0, image="a.jpg", question="Describe it.\n<image>"))
    assert trailing["messages"][0]["content"] == [{"type": "text", "text": "Describe it."}, {"type": "image"}]


def test_sharegpt4v_caption_record_puts_the_image_first_and_keeps_system_turns():
    record = {"id": "sa_1", "image": "sam/images/sa_1.jpg", "conversations": [
        {"from": "system", "value": "Be brief."},
        {"from": "human", "value": "What do you see happening in this image?\n<image>"},
        {"from": "gpt", "value": "A dog on a beach."},
        {"from": "human", "value": "Colour?"}, {"from": "gpt", "value": "Brown."}]}
    row = ADAPTERS["sharegpt4v"](record)
    assert [m["role"] for m in row["messages"]] == ["system", "user", "assistant", "user", "assistant"]
    assert row["messages"][1]["content"][-1] == {"type": "image"}
    assert row["messages"][3]["content"] == [{"type": "text", "text": "Colour?"}]


def test_a_source_text_without_placeholder_gets_its_image_at_the_start_of_the_first_user_turn():
    row = ADAPTERS["minigemini"](llava_record(0, image="docvqa/images/x.png", question="What is the date?"))
    assert row["messages"][0]["content"] == [{"type": "image"}, {"type": "text", "text": "What is the date?"}]


def test_allava_text_and_minigemini_text_entries_are_text_only_rows():
    for name in ("allava_text", "minigemini"):
        row = ADAPTERS[name]({"id": "allava_text_1", "conversations": [
            {"from": "human", "value": "Write a haiku."}, {"from": "gpt", "value": "Old pond..."}]})
        assert row["images"] == []
        assert row["messages"][0]["content"] == [{"type": "text", "text": "Write a haiku."}]


def test_docowl_uses_the_image_list_and_its_own_placeholder():
    record = {"image": ["./imgs/DUE_Benchmark/DocVQA/pngs/rnbx0223_193.png"], "task_name": "qa_sft",
              "dataset_name": "DocVQA", "messages": [{"role": "user", "content": "<|image|>What is the title?"},
                                                     {"role": "assistant", "content": "Annual report"}]}
    row = ADAPTERS["docowl"](record)
    assert row["images"] == ["./imgs/DUE_Benchmark/DocVQA/pngs/rnbx0223_193.png"]
    assert row["messages"][0]["content"] == [{"type": "image"}, {"type": "text", "text": "What is the title?"}]


def test_mathvision_builds_choices_and_an_answer_with_the_solution():
    record = {"id": "7", "question": "Which shape comes next?\n<image1>", "options": ["A", "B", "C"],
              "image": "images/7.jpg", "decoded_image": None, "answer": "B", "solution": "It alternates.",
              "level": 2, "subject": "logic"}
    row = ADAPTERS["mathvision"](record)
    assert row["images"] == ["images/7.jpg"]  # decoded_image is empty: the path is used
    user, assistant = row["messages"]
    assert user["content"] == [{"type": "text", "text": "Which shape comes next?"}, {"type": "image"},
                               {"type": "text", "text": "Choices:\n(A) A\n(B) B\n(C) C"}]
    assert assistant["content"] == [{"type": "text", "text": "It alternates.\nAnswer: B"}]
    free = ADAPTERS["mathvision"](dict(record, options=[], solution=None, answer="12"))
    assert free["messages"][1]["content"][0]["text"] == "12"


def test_text_only_math_adapters_and_a_field_override():
    instruct = ADAPTERS["mathinstruct"]({"instruction": "2+2?", "output": "4", "source": "data/CoT/gsm_rft.json"})
    assert instruct == {"messages": [{"role": "user", "content": [{"type": "text", "text": "2+2?"}]},
                                     {"role": "assistant", "content": [{"type": "text", "text": "4"}]}], "images": []}
    assert ADAPTERS["mathplus"]({"query": "1+1?", "response": "2"})["messages"][1]["content"][0]["text"] == "2"
    renamed = ADAPTERS["mathplus"]({"problem": "3+3?", "solution": "6"}, {"question": ("problem",),
                                                                           "answer": ("solution",)})
    assert renamed["messages"][0]["content"][0]["text"] == "3+3?"


def test_unknown_format_error_lists_the_valid_names():
    with pytest.raises(ValueError, match="valid formats: allava_text, docowl, geo170k, llava"):
        get_adapter("sharegpt")


# ----------------------------------------------------------------------------------------------------------------
# Files: json, jsonl, parquet (paths and lazily read bytes)
# ----------------------------------------------------------------------------------------------------------------
def test_every_file_format_loads_and_joins_the_image_root(tmp_path):
    png(tmp_path / "imgs" / "DocVQA" / "a.png")
    png(tmp_path / "geo3k" / "train" / "0" / "img_diagram.png")
    docowl = write_jsonl(tmp_path / "train.jsonl", [{"image": ["./imgs/DocVQA/a.png"], "messages": [
        {"role": "user", "content": "<|image|>Title?"}, {"role": "assistant", "content": "Report"}]}])
    geo = write_parquet(tmp_path / "gllava_qa.parquet", [
        {"image": {"bytes": None, "path": "geo3k/train/0/img_diagram.png"}, "conversations": [
            {"from": "human", "value": "<image>\nFind x."}, {"from": "gpt", "value": "x = 3"}]},
        {"image": {"bytes": png_bytes(), "path": None}, "conversations": [
            {"from": "human", "value": "<image>\nFind y."}, {"from": "gpt", "value": "y = 4"}]}])
    plus = write_parquet(tmp_path / "mathplus.parquet", [{"instruction": "5*5?", "output": "25"}])
    dataset = load_mixture({"sources": [{"name": "docreason", "format": "docowl", "path": str(docowl)},
                                        {"name": "gllava_qa", "format": "geo170k", "path": str(geo)},
                                        {"name": "mathplus", "format": "mathplus", "path": str(plus)}]},
                           shuffle=False)
    assert [dataset.origin(i) for i in range(4)] == [("docreason", 0), ("gllava_qa", 0), ("gllava_qa", 1),
                                                     ("mathplus", 0)]
    assert dataset.row(0)["images"] == [str(tmp_path / "imgs" / "DocVQA" / "a.png")]
    assert dataset.row(1)["images"] == [str(tmp_path / "geo3k" / "train" / "0" / "img_diagram.png")]
    assert dataset.row(2)["images"] == [ParquetImage(str(geo), 1, "image", None)]  # bytes stay in the file
    sample = dataset[2]
    assert sample["images"][0].mode == "RGB" and sample["images"][0].getpixel((0, 0)) == (10, 30, 200)
    assert dataset[3]["images"] == []


def test_mathvision_parquet_reads_decoded_image_bytes_from_small_row_groups(tmp_path):
    rows = [{"id": str(i), "question": f"<image1>\nHow many sides? ({i})", "options": ["3", "4"],
             "image": f"images/{i}.jpg", "decoded_image": {"bytes": png_bytes(color=(i, i, i)), "path": f"{i}.jpg"},
             "answer": "B", "solution": "", "level": 1, "subject": "metric geometry - counting"} for i in range(5)]
    path = write_parquet(tmp_path / "mathvision.parquet", rows, row_group_size=2)
    dataset = load_mixture({"sources": [{"name": "mathvision", "format": "mathvision", "path": str(path)}]},
                           shuffle=False)
    for i in (4, 0, 3):  # crosses row groups in both directions
        assert dataset[i]["images"][0].getpixel((1, 1)) == (i, i, i)
    assert dataset[0]["messages"][1]["content"][0]["text"] == "B"


# ----------------------------------------------------------------------------------------------------------------
# The YAML mix
# ----------------------------------------------------------------------------------------------------------------
def test_yaml_weights_set_the_samples_per_source(tmp_path):
    a = llava_source(tmp_path, n=4, name="a")
    config = {"sources": [
        dict(a, path="a.json", image_root="images", weight=2.0),
        dict(text_source(tmp_path, n=6, name="half"), path="half.json", weight=0.5),
        dict(text_source(tmp_path, n=3, name="once"), path="once.json"),
        dict(text_source(tmp_path, n=3, name="off"), path="off.json", weight=0)]}
    (tmp_path / "mix.yaml").write_text(yaml.safe_dump(config))  # paths relative to the YAML file
    dataset = load_mixture(tmp_path / "mix.yaml", seed=3)
    assert dataset.num_samples_per_source == {"a": 8, "half": 3, "once": 3, "off": 0}
    origins = [dataset.origin(i) for i in range(len(dataset))]
    assert sorted(i for s, i in origins if s == "a") == [0, 0, 1, 1, 2, 2, 3, 3]
    assert len({i for s, i in origins if s == "half"}) == 3  # a subset without repeats


def test_the_order_is_a_function_of_the_seed(tmp_path):
    config = {"sources": [llava_source(tmp_path, n=6), dict(text_source(tmp_path, n=6), weight=0.5)]}
    orders = [[load_mixture(config, seed=s).origin(i) for i in range(9)] for s in (0, 0, 1)]
    assert orders[0] == orders[1] != orders[2]
    assert [load_mixture(config, seed=0)[i] == load_mixture(config, seed=0)[i] for i in range(2)] == [True, True]


@pytest.mark.parametrize("mutate,message", [
    (lambda c: c["sources"][0].update(wieght=1), "has unknown keys \\['wieght'\\]"),
    (lambda c: c["sources"][0].update(format="sharegpt"), "valid formats"),
    (lambda c: c["sources"].append(dict(c["sources"][0])), "names must be unique"),
    (lambda c: c["sources"][0].update(path="nowhere.json"), "does not exist; download it or fix `path`"),
    (lambda c: c["sources"][0].update(fields={"question": "q"}), "Unknown `fields` keys \\['question'\\]"),
    (lambda c: c.update(seed=1), "unknown top-level keys"),
])
def test_mix_config_errors_name_the_problem_and_the_fix(tmp_path, mutate, message):
    config = {"sources": [llava_source(tmp_path)]}
    mutate(config)
    with pytest.raises(ValueError, match=message):
        load_mixture(config)


def test_image_prefix_filters_select_a_subset(tmp_path):
    records = [llava_record(0, image="docvqa/images/0.png"), llava_record(1, image="sam/images/1.jpg"),
               llava_record(2, image=None, question="Hi?")]
    path = write_json(tmp_path / "minigemini_instruction.json", records)
    source = {"name": "mgm", "format": "minigemini", "path": str(path)}
    only_doc = load_mixture({"sources": [dict(source, include_image_prefixes=["docvqa/", "chartqa/"])]})
    without_sam = load_mixture({"sources": [dict(source, exclude_image_prefixes=["sam/"])]}, shuffle=False)
    assert [only_doc.origin(i)[1] for i in range(len(only_doc))] == [0]
    assert [without_sam.origin(i)[1] for i in range(len(without_sam))] == [0, 2]


def test_the_dataset_holds_references_not_images(tmp_path):
    dataset = load_mixture({"sources": [llava_source(tmp_path, n=5), text_source(tmp_path)]})
    for i in range(len(dataset)):
        assert isinstance(dataset[i]["images"], list)  # loading does not keep anything either
    assert no_pil(vars(dataset))
    assert all(no_pil(dataset.row(i)) for i in range(len(dataset)))
    assert all(isinstance(v, np.ndarray) for k, v in vars(dataset).items() if k in ("_data", "_order", "_offsets"))
    assert len(pickle.dumps(dataset)) < 20_000  # what a DataLoader worker receives


# ----------------------------------------------------------------------------------------------------------------
# Skip policy
# ----------------------------------------------------------------------------------------------------------------
def test_a_missing_image_is_skipped_logged_replaced_and_counted(tmp_path):
    log = tmp_path / "out" / "skipped_samples.jsonl"
    dataset = load_mixture({"sources": [llava_source(tmp_path, n=4, missing=(1,))]}, skip_log=log, shuffle=False)
    sample = dataset[1]
    assert sample["messages"][1]["content"][0]["text"] == "Answer 2."  # the next valid sample replaces it
    assert dataset[1] == sample  # deterministic, and the bad sample is not retried
    event = json.loads(log.read_text())
    assert event == {"source": "llava", "index": 1, "path": str(tmp_path / "images/coco/train2017/000001.jpg"),
                     "reason": "missing_image"}
    assert dataset.skipped == {("llava", "missing_image"): 1}
    assert skip_summary(log) == {"total": 1, "by_source": {"llava": {"missing_image": 1}},
                                 "by_reason": {"missing_image": 1}}


def test_a_truncated_image_is_skipped_the_same_way_and_the_mix_wraps(tmp_path):
    source = llava_source(tmp_path, n=3)
    image = tmp_path / "images/coco/train2017/000002.jpg"
    image.write_bytes(image.read_bytes()[:60])
    log = tmp_path / "skipped.jsonl"
    dataset = load_mixture({"sources": [source]}, skip_log=log, shuffle=False)
    assert dataset[2]["messages"][1]["content"][0]["text"] == "Answer 0."  # 2 is bad: wraps to 0
    event = json.loads(log.read_text())
    assert event["index"] == 2 and event["reason"].startswith("unreadable_image: ")


def test_an_oversized_image_is_skipped_not_fatal(tmp_path, monkeypatch):
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 100)  # 30 x 20 px > 2 x 100: PIL's decompression-bomb error
    log = tmp_path / "s.jsonl"
    dataset = load_mixture({"sources": [llava_source(tmp_path, n=1), text_source(tmp_path, n=1)]}, skip_log=log,
                           shuffle=False)
    assert dataset[0]["images"] == []
    assert json.loads(log.read_text())["reason"].startswith("unreadable_image: DecompressionBombError")


def test_nothing_loadable_raises_a_runtime_error(tmp_path):
    dataset = load_mixture({"sources": [llava_source(tmp_path, n=2, missing=(0, 1))]}, skip_log=tmp_path / "s.jsonl")
    with pytest.raises(RuntimeError, match="None of the 2 samples"):
        dataset[0]
    with pytest.raises(IndexError):
        dataset[2]


def test_malformed_records_are_logged_at_load_and_a_wrong_format_raises(tmp_path):
    records = [llava_record(0), llava_record(1, question="<image>\n<image>\nTwo?"),
               {"id": "x", "conversations": [{"from": "human", "value": "no answer"}]}]
    path = write_json(tmp_path / "data.json", records)
    png(tmp_path / "coco/train2017/000000.jpg")
    log = tmp_path / "s.jsonl"
    dataset = load_mixture({"sources": [{"name": "s", "format": "llava", "path": str(path)}]}, skip_log=log)
    assert len(dataset) == 1
    assert skip_summary(log)["by_source"] == {"s": {"malformed": 2}}
    assert "2 image placeholder(s) but 1 image(s)" in log.read_text()
    with pytest.raises(ValueError, match="no usable record.*no field 'instruction'.*`fields: {question: NAME}`"):
        load_mixture({"sources": [{"name": "s", "format": "mathinstruct", "path": str(path)}]}, skip_log=log)


def test_a_too_long_sample_is_skipped_with_its_length_and_the_limit(tmp_path):
    records = [llava_record(0), llava_record(1, question="<image>\n" + "Why? " * 40)]
    for i in range(2):
        png(tmp_path / f"coco/train2017/{i:06d}.jpg")
    path = write_json(tmp_path / "data.json", records)
    log = tmp_path / "s.jsonl"
    proc = processor()
    dataset = load_mixture({"sources": [{"name": "s", "format": "llava", "path": str(path)}]}, skip_log=log,
                           processor=proc, max_length=300, shuffle=False)
    short = dataset.processed_length(dataset.row(0)["messages"], dataset[0]["images"])
    assert short <= 300
    assert dataset[1]["messages"][1]["content"][0]["text"] == "Answer 0."
    long = dataset.processed_length(dataset.row(1)["messages"], [PIL.Image.new("RGB", (30, 20))])
    assert json.loads(log.read_text())["reason"] == f"too_long: {long} tokens > max_length 300"
    assert long > 300


@pytest.mark.parametrize("tiling", [False, True])
def test_the_length_filter_counts_exactly_what_the_collator_builds(tmp_path, tiling):
    png(tmp_path / "coco/train2017/000000.jpg", size=(112, 28))  # 4x1 tiles + thumbnail when tiling
    path = write_json(tmp_path / "data.json", [llava_record(0)])
    proc = TrolProcessor(trol_internvl_image_processor(28, max_tiles=6), char_tokenizer(),
                         chat_template=TROL_PHI3_TEMPLATE, num_image_tokens=2, image_context_token="<IMG_CONTEXT>",
                         image_start_token="<img>", image_end_token="</img>") if tiling else processor()
    dataset = load_mixture({"sources": [{"name": "s", "format": "llava", "path": str(path)}]}, processor=proc,
                           max_length=4096)
    batch = DataCollatorForVisionLanguageModeling(processor=proc, max_length=4096)([dataset[0]])
    assert dataset.processed_length(dataset.row(0)["messages"], dataset[0]["images"]) == batch["input_ids"].shape[1]
    if tiling:
        assert batch["pixel_values"].shape[0] == 5


def test_dataloader_workers_append_to_the_same_log(tmp_path):
    log = tmp_path / "s.jsonl"
    dataset = load_mixture({"sources": [llava_source(tmp_path, n=6, missing=(1, 4))]}, skip_log=log, shuffle=False)
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=2, collate_fn=lambda rows: rows)
    texts = [row["messages"][1]["content"][0]["text"] for batch in loader for row in batch]
    assert texts == ["Answer 0.", "Answer 2.", "Answer 2.", "Answer 3.", "Answer 5.", "Answer 5."]
    assert skip_summary(log)["by_reason"] == {"missing_image": 2}


def test_the_callback_warns_on_new_skips_and_prints_the_summary(tmp_path, capsys, caplog):
    log = tmp_path / "s.jsonl"
    dataset = load_mixture({"sources": [llava_source(tmp_path, n=4, missing=(1,)), text_source(tmp_path)]},
                           skip_log=log, shuffle=False)
    callback = SkippedSamplesCallback(log)
    args, control = TrainingArguments(output_dir=str(tmp_path), report_to="none"), TrainerControl()
    state = TrainerState()
    with caplog.at_level(logging.WARNING, logger="trol.trainer.data"):
        callback.on_log(args, state, control, logs={})
        assert not caplog.records
        dataset[1], dataset[1]  # logged once per process, and counted once by the summary anyway
        callback.on_log(args, state, control, logs={})
        callback.on_log(args, state, control, logs={})
    assert len(caplog.records) == 1 and "1 new skipped samples" in caplog.records[0].getMessage()
    callback.on_train_end(args, state, control)
    assert "Skipped 1 samples: llava (missing_image 1)" in capsys.readouterr().out
    state.is_world_process_zero = False
    callback.on_train_end(args, state, control)
    assert capsys.readouterr().out == ""


# ----------------------------------------------------------------------------------------------------------------
# TRL
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("positions", [(0, 2, 1), (2, 0), (2, 3)])  # 0, 1: one image each; 2, 3: text only
def test_trl_collator_batches_text_only_and_image_rows_with_assistant_only_labels(tmp_path, positions):
    proc = processor()
    dataset = load_mixture({"sources": [llava_source(tmp_path, n=2), text_source(tmp_path, n=2)]}, shuffle=False,
                           processor=proc, max_length=1024)
    rows = [dataset[i] for i in positions]
    n_images = [len(row["images"]) for row in rows]
    assert n_images == [1 if i < 2 else 0 for i in positions]
    # What SFTTrainer builds for a vision dataset with SFTConfig(max_length=1024, assistant_only_loss=True)
    collator = DataCollatorForVisionLanguageModeling(processor=proc, max_length=1024, completion_only_loss=False,
                                                     pad_to_multiple_of=None, dataset_text_field="text",
                                                     assistant_only_loss=True, chat_template=None)
    batch = collator(rows)
    assert batch.get("pixel_values", torch.empty(0, 3, 28, 28)).shape == (sum(n_images), 3, 28, 28)
    assert ((batch["input_ids"] == IMAGE_TOKEN).sum(-1)).tolist() == [4 * n for n in n_images]
    tokenizer = proc.tokenizer
    for row, ids, labels, mask in zip(rows, batch["input_ids"], batch["labels"], batch["attention_mask"]):
        answer = row["messages"][-1]["content"][0]["text"] + ANSWER_END
        expected = tokenizer.encode(answer, add_special_tokens=False)
        trained = (labels != -100).nonzero().flatten()
        assert labels[labels != -100].tolist() == expected == ids[trained].tolist()
        assert trained.tolist() == list(range(trained[0], trained[0] + len(expected)))  # one contiguous span
        assert tokenizer.decode(ids[: trained[0]]).endswith("[UNUSED_TOKEN_146]assistant\n")
        assert (labels[ids == IMAGE_TOKEN] == -100).all() and (labels[mask == 0] == -100).all()


def test_sft_trainer_trains_on_the_mix_through_its_hf_view(tmp_path, capsys):
    proc, log = processor(), tmp_path / "out" / "skipped_samples.jsonl"
    mix = load_mixture({"sources": [llava_source(tmp_path, n=5, missing=(2,)), text_source(tmp_path, n=3)]},
                       processor=proc, max_length=512, skip_log=log)
    args = SFTConfig(output_dir=str(tmp_path / "out"), max_length=512, assistant_only_loss=True, bf16=False,
                     use_cpu=True, report_to="none", per_device_train_batch_size=4, num_train_epochs=1,
                     logging_steps=1, save_strategy="no", activation_checkpointing=False)
    with pytest.raises(TypeError, match="must be a `Dataset` or `IterableDataset`"):  # TRL 1.16 refuses torch datasets
        SFTTrainer(model=tiny_model(), args=args, train_dataset=mix, processing_class=proc)
    view = mix.as_hf_dataset()
    assert view.column_names == ["messages"] and len(view) == len(mix) == 8
    assert copy.deepcopy(view)[0] == view[0] == mix[0]  # a copy (Trainer's remove_columns) shares the mix
    trainer = SFTTrainer(model=tiny_model(), args=args, train_dataset=view, processing_class=proc,
                         callbacks=[SkippedSamplesCallback(log)])
    collator = trainer.data_collator
    assert isinstance(collator, DataCollatorForVisionLanguageModeling)
    assert (collator.max_length, collator.assistant_only_loss, collator.chat_template) == (512, True, None)
    trainer.train()
    assert trainer.state.global_step == 2
    assert "Skipped 1 samples: llava (missing_image 1)" in capsys.readouterr().out


def test_the_paper_mix_recipe_loads_on_a_miniature_of_its_layout(tmp_path):
    recipe = (Path(__file__).parents[1] / "trainer" / "recipes" / "data_mix.yaml").read_text()
    for image in ["coco/train2017/0.jpg", "sam/images/1.jpg", "docvqa/images/2.png", "gqa/images/3.jpg",
                  "imgs/DUE_Benchmark/DocVQA/pngs/4.png", "geo3k/train/0/img_diagram.png", "images/5.jpg"]:
        png(tmp_path / image)
    caption = [llava_record(0, image="coco/train2017/0.jpg"), llava_record(1, image="sam/images/1.jpg")]
    docowl = {"image": ["./imgs/DUE_Benchmark/DocVQA/pngs/4.png"], "messages": [
        {"role": "user", "content": "<|image|>Title?"}, {"role": "assistant", "content": "Report"}]}
    geo = {"image": {"bytes": None, "path": "geo3k/train/0/img_diagram.png"}, "conversations": [
        {"from": "human", "value": "<image>\nFind x."}, {"from": "gpt", "value": "3"}]}
    write_json(tmp_path / "sharegpt4v_instruct_gpt4-vision_cap100k.json", caption)
    write_json(tmp_path / "sharegpt4v_mix665k_cap23k_coco-ap9k_lcs3k_sam9k_div2k.json",
               [llava_record(3, image="gqa/images/3.jpg")])
    write_json(tmp_path / "Evol-Instruct-GPT4-Turbo-143K.json", [llava_record(0, image=None, question="Hi?")])
    write_json(tmp_path / "minigemini_instruction.json", [llava_record(2, image="docvqa/images/2.png"),
                                                         llava_record(0, image="sam/images/1.jpg")])
    write_jsonl(tmp_path / "train.jsonl", [docowl])
    write_jsonl(tmp_path / "detailed_explanation.jsonl", [docowl, docowl])
    write_parquet(tmp_path / "gllava_align.parquet", [geo])
    write_parquet(tmp_path / "gllava_qa.parquet", [geo, geo])
    write_parquet(tmp_path / "mathvision.parquet", [{"question": "<image1>\nSides?", "options": [], "answer": "4",
                                                     "image": "images/5.jpg", "solution": None}])
    write_json(tmp_path / "MathInstruct.json", [{"instruction": "1+1?", "output": "2", "source": "x"}])
    write_parquet(tmp_path / "mathplus.parquet", [{"instruction": "2+2?", "output": "4"}])
    (tmp_path / "mix.yaml").write_text(recipe.replace("/path/to/TroL_Dataset_Path", str(tmp_path)))
    mix = load_mixture(tmp_path / "mix.yaml", seed=0, skip_log=tmp_path / "skipped.jsonl")
    assert mix.num_samples_per_source == {
        "sharegpt4v_caption": 1, "sharegpt4v_instruct": 1, "allava_text": 1, "minigemini_instruct": 1,
        "docdownstream": 1, "docreason": 2, "gllava_align": 1, "gllava_qa": 2, "mathvision": 1, "mathinstruct": 1,
        "mathplus": 1}
    assert sum(len(mix[i]["images"]) for i in range(len(mix))) == 10
    assert not (tmp_path / "skipped.jsonl").exists()
