"""The two-stage recipe end to end on tiny models (CPU): stage 1 -> stage 2 (4-bit QLoRA) -> merge -> load -> generate."""

import json
import subprocess
import sys

import PIL.Image
import pytest
import torch
import yaml
from tiny import char_tokenizer, prompt_batch, save_pretrained_parts, tiny_model
from transformers import TrainerCallback

pytest.importorskip("trl")
pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")

from trl import SFTConfig  # noqa: E402

from trol import TrolProcessor, trol_clip_image_processor  # noqa: E402
from trol.trainer import TrolDataArguments, TrolModelArguments  # noqa: E402
from trol.trainer.train import train  # noqa: E402

ANSWERS = ["a red square", "two blue dots", "it is green", "no image here, hello"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Pretrained-looking vision and language folders, and a LLaVA-format dataset: 3 image samples (one image
    missing on disk) and one text-only sample."""
    root = tmp_path_factory.mktemp("recipe")
    save_pretrained_parts(root)
    images = root / "images"
    images.mkdir()
    for name, color in [("red.png", (220, 20, 20)), ("blue.png", (20, 20, 220))]:
        PIL.Image.new("RGB", (40, 30), color).save(images / name)
    samples = [
        {"id": "0", "image": "red.png", "conversations": [{"from": "human", "value": "<image>\nWhat is it?"},
                                                          {"from": "gpt", "value": ANSWERS[0]}]},
        {"id": "1", "image": "blue.png", "conversations": [{"from": "human", "value": "<image>\nHow many?"},
                                                           {"from": "gpt", "value": ANSWERS[1]}]},
        {"id": "2", "image": "missing.png", "conversations": [{"from": "human", "value": "<image>\nColour?"},
                                                              {"from": "gpt", "value": ANSWERS[2]}]},
        {"id": "3", "conversations": [{"from": "human", "value": "Say hello."}, {"from": "gpt", "value": ANSWERS[3]}]},
    ]
    (root / "data.json").write_text(json.dumps(samples))
    mix = {"sources": [{"name": "toy", "format": "llava", "path": str(root / "data.json"),
                        "image_root": str(images), "weight": 1.0}]}
    (root / "mix.yaml").write_text(yaml.safe_dump(mix))
    return root


def sft_config(output_dir, **overrides) -> SFTConfig:
    settings = dict(output_dir=str(output_dir), max_steps=3, per_device_train_batch_size=2,
                    gradient_accumulation_steps=1, learning_rate=1e-2, lr_scheduler_type="constant", bf16=False,
                    use_cpu=True, activation_checkpointing=True, max_length=None, assistant_only_loss=True,
                    report_to="none", save_strategy="no", logging_steps=1, seed=0, dataloader_num_workers=0)
    settings.update(overrides)
    return SFTConfig(**settings)


class Snapshot(TrainerCallback):
    """Parameters (as float copies) at the start and at the end of training, by name."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.before = {n: p.detach().clone() for n, p in model.named_parameters()}

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.after = {n: p.detach().clone() for n, p in model.named_parameters()}

    def changed(self) -> set[str]:
        return {n for n in self.before if not torch.equal(self.before[n], self.after[n])}


def test_stage1_stage2_merge_and_load(workspace, capsys):
    # ---- stage 1: projector + gates only
    stage1 = Snapshot()
    model_args = TrolModelArguments(stage=1, vision_model=str(workspace / "vision"),
                                    language_model=str(workspace / "text"), dtype="float32")
    data_args = TrolDataArguments(data_config=str(workspace / "mix.yaml"))
    trainer = train(model_args, data_args, sft_config(workspace / "stage1"), callbacks=[stage1])
    assert trainer.state.global_step == 3
    changed = stage1.changed()
    trol_params = {n for n in stage1.before if n.startswith(("model.multi_modal_projector.", "model.trol_gates."))}
    assert changed == trol_params  # exactly the projector and every gate
    assert "skipped" in capsys.readouterr().out.lower()  # the missing image was reported
    skipped = [json.loads(line) for line in (workspace / "stage1" / "skipped_samples.jsonl").read_text().splitlines()]
    assert skipped and all("missing.png" in row["path"] for row in skipped)

    # labels: only the assistant answers (and their end marker) carry loss
    batch = next(iter(trainer.get_train_dataloader()))
    tokenizer = trainer.processing_class.tokenizer
    for ids, labels in zip(batch["input_ids"], batch["labels"]):
        kept = labels[labels != -100]
        assert len(kept) > 0
        text = tokenizer.decode(kept)
        assert any(answer in text for answer in ANSWERS)
        assert "user" not in text and "What is it?" not in text and "<image>" not in text

    # ---- stage 2: QLoRA (4-bit NF4) + projector + gates
    stage2 = Snapshot()
    model_args = TrolModelArguments(stage=2, model_name_or_path=str(workspace / "stage1"), quantization="4bit",
                                    lora_r=4, lora_alpha=4, dtype="float32")
    trainer = train(model_args, data_args, sft_config(workspace / "stage2"), callbacks=[stage2])
    changed = stage2.changed()
    assert changed and all("lora_" in n or ".modules_to_save." in n for n in changed)
    assert any("lora_" in n for n in changed)
    assert any("multi_modal_projector.modules_to_save" in n for n in changed)
    assert any("trol_gates.0.modules_to_save" in n for n in changed)
    frozen = [n for n in stage2.before if "vision_tower" in n or ("language_model" in n and "lora_" not in n)]
    assert frozen and all(torch.equal(stage2.before[n], stage2.after[n]) for n in frozen)  # quantized base intact
    quantized = [m for n, m in trainer.model.named_modules() if type(m).__name__ == "Linear4bit"]
    assert quantized

    # ---- merge into a full-precision release folder and load it like any hub model
    result = subprocess.run([sys.executable, "-m", "trol.trainer", "merge", str(workspace / "stage2"), "--output",
                             str(workspace / "release"), "--dtype", "float32"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    from transformers import AutoModelForImageTextToText, AutoProcessor

    merged = AutoModelForImageTextToText.from_pretrained(workspace / "release", trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(workspace / "release", trust_remote_code=True)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    chat = [{"role": "user", "content": [{"type": "image", "image": PIL.Image.new("RGB", (40, 30), (220, 20, 20))},
                                         {"type": "text", "text": "What is it?"}]}]
    inputs = processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    out = merged.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 4 or out[0, -1] == merged.generation_config.eos_token_id


@pytest.mark.parametrize("quantization", ["8bit", "none"])
def test_stage2_other_quantizations_train_lora_projector_and_gates_only(workspace, tmp_path, quantization):
    from trol.trainer.train import build_model_and_processor, prepare_stage

    stage1 = tmp_path / "stage1"
    model = tiny_model("llama")
    model.save_pretrained(stage1)
    TrolProcessor(trol_clip_image_processor(28), char_tokenizer(), num_image_tokens=4).save_pretrained(stage1)
    args = TrolModelArguments(stage=2, model_name_or_path=str(stage1), quantization=quantization, lora_r=4,
                              lora_alpha=4, dtype="float32")
    model, processor = build_model_and_processor(args)
    quantized = [m for m in model.modules() if type(m).__name__ == "Linear8bitLt"]
    assert bool(quantized) == (quantization == "8bit")
    peft_model = prepare_stage(model, args).train()
    before = {n: p.detach().clone() for n, p in peft_model.named_parameters()}
    ids, mask, pixels = prompt_batch((9, 9))
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    peft_model(input_ids=ids, attention_mask=mask, pixel_values=pixels, labels=ids).loss.backward()
    optimizer.step()
    changed = {n for n, p in peft_model.named_parameters() if not torch.equal(before[n], p.detach())}
    assert any("lora_" in n for n in changed) and any("trol_gates.1.modules_to_save" in n for n in changed)
    assert all("lora_" in n or ".modules_to_save." in n for n in changed)


def test_bf16_recipe_trains_projector_and_gates_in_fp32(workspace, tmp_path):
    """In bf16 an AdamW step of ~1e-4 on a gate bias of ~-1.1 rounds to nothing: TroL's modules must stay fp32."""
    snapshot = Snapshot()
    model_args = TrolModelArguments(stage=1, vision_model=str(workspace / "vision"),
                                    language_model=str(workspace / "text"), dtype="bfloat16")
    data_args = TrolDataArguments(data_config=str(workspace / "mix.yaml"))
    trainer = train(model_args, data_args, sft_config(tmp_path / "bf16", learning_rate=1e-4), callbacks=[snapshot])
    trainable = {n: p for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert {p.dtype for p in trainable.values()} == {torch.float32}
    assert trainer.model.model.language_model.layers[0].mlp.down_proj.weight.dtype == torch.bfloat16
    for i in range(2):
        assert not torch.equal(snapshot.before[f"model.trol_gates.{i}.bias"], snapshot.after[f"model.trol_gates.{i}.bias"])
