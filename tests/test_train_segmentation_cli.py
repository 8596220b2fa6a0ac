"""`setok train sft` with referring-segmentation data from YAML (`data.segmentation`): the records of each format
mixed with the conversations of `data.path`, a mask decoder added to a Setokim without one and trained (full
fine-tuning and LoRA), the saved model segmenting through the pipeline, and a decoder kept frozen when
`train_mask_decoder` is false. The bad configs are rows of `BAD_INPUTS` in test_train_cli.py."""

import json
import logging
from pathlib import Path

import datasets
import numpy as np
import PIL.Image
import pytest
import test_train_cli
import torch
from conftest import tiny_processor, tiny_setokim
from safetensors.torch import load_file
from test_segmentation_data import HEIGHT, WIDTH, write_refcoco
from test_train_cli import CPU_TRAINING, train, trainer_state, write_config
from transformers import AutoProcessor

from transformers_setok import SetokimForConditionalGeneration, add_mask_decoder, assembly
from transformers_setok.pipelines import SetokimReferringSegmentationPipeline
from transformers_setok.training import runners
from transformers_setok.training.config import load_config
from transformers_setok.training.data import SEGMENTATION_FEATURES
from transformers_setok.training.masks import encode_rle

# The CLI tests' data files and tiny checkpoints, as fixtures of this module too.
llava, setokim_dir, setokim_mask_dir = (
    test_train_cli.llava,
    test_train_cli.setokim_dir,
    test_train_cli.setokim_mask_dir,
)
segmentation_jsonl = test_train_cli.segmentation_jsonl

TINY_DECODER = {"mask_decoder_width": 32, "mask_decoder_depth": 1, "mask_decoder_heads": 4}
# One epoch of the 4 conversations and 4 segmentation records in 2 steps of 4: every record is trained on once.
ONE_EPOCH = dict(CPU_TRAINING, bf16=False, per_device_train_batch_size=4, max_steps=2, save_strategy="no")


def segmentation_config(tmp_path, init_from, segmentation: dict, path=None, **model) -> dict:
    data = {"segmentation": segmentation} if path is None else {"path": str(path), "segmentation": segmentation}
    return {
        "stage": "sft",
        "output_dir": str(tmp_path / "run-sft"),
        "model": {"init_from": str(init_from), "train_mask_decoder": True, **TINY_DECODER, **model},
        "data": data,
        "training": ONE_EPOCH,
    }


@pytest.fixture
def added(monkeypatch) -> list:
    """The state of each mask decoder `add_mask_decoder` builds from now on, as first initialised."""
    states = []
    add = assembly.add_mask_decoder

    def recording(model, **sizes):
        add(model, **sizes)
        states.append({name: p.detach().clone() for name, p in model.mask_decoder.state_dict().items()})
        return model

    monkeypatch.setattr(assembly, "add_mask_decoder", recording)
    return states


def segment(folder, image) -> dict:
    model = SetokimForConditionalGeneration.from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder)
    assert model.config.use_mask_decoder and model.mask_decoder is not None
    result = SetokimReferringSegmentationPipeline(model=model, processor=processor)(
        image, expression="the horse", max_text_tokens=2
    )
    assert result["mask"].mode == "L" and result["mask"].size == image.size
    assert set(np.unique(np.asarray(result["mask"]))) <= {0, 255}
    return result


def changed(after: dict, before: dict) -> set:
    return {name for name, value in before.items() if not torch.equal(after[name], value)}


def test_the_sources_are_mixed_into_segmentation_records(tmp_path, llava, segmentation_jsonl, setokim_dir, caplog):
    lines = segmentation_jsonl.read_text() + json.dumps({"image": "horse.png", "expression": "the horse"}) + "\n"
    segmentation_jsonl.write_text(lines)  # a fifth record, without its mask
    config = segmentation_config(
        tmp_path, setokim_dir, {"path": str(segmentation_jsonl), "on_error": "skip"}, path=llava, lora=False
    )
    loaded = load_config(write_config(tmp_path / "sft.yaml", config), "sft")
    with caplog.at_level(logging.WARNING):
        records = runners._load_sft_data(loaded.data)
    assert "Skipped 1 of 5 records of" in caplog.text and "missing mask (line 5)" in caplog.text
    assert records.features == SEGMENTATION_FEATURES and len(records) == 8
    assert [record["mask"] is None for record in records] == [True] * 4 + [False] * 4
    assert records[0]["messages"][0]["content"][0] == {"type": "image", "text": None}
    stored = records.data.column("images")[0].as_py()[0]  # a conversation's image, after the cast
    assert stored["bytes"] is None and stored["path"].endswith(".png")  # still the file's path, not re-encoded
    assert records[4]["expression"] == "the horse" and records[7]["messages"][0]["role"] == "user"
    assert records[4]["images"][0].size == (80, 66)  # the stored paths, opened on access

    # `hub`: a dataset folder with image, expression and mask columns, alone (no `data.path`).
    horse = np.asarray(PIL.Image.open(segmentation_jsonl.parent / "horse_mask.png")) > 0
    rows = {"image": [str(segmentation_jsonl.parent / "horse.png")], "expression": ["the horse"]}
    saved = datasets.Dataset.from_dict({**rows, "mask": [encode_rle(horse)]})
    saved.cast_column("image", datasets.Image()).save_to_disk(tmp_path / "hub")
    config = segmentation_config(tmp_path, setokim_dir, {"format": "hub", "path": str(tmp_path / "hub")}, lora=False)
    records = runners._load_sft_data(load_config(write_config(tmp_path / "hub.yaml", config), "sft").data)
    assert len(records) == 1 and records.features == SEGMENTATION_FEATURES
    assert np.array_equal(np.asarray(PIL.Image.open(segmentation_jsonl.parent / "horse.png")), records[0]["images"][0])


def test_full_fine_tuning_adds_and_trains_a_mask_decoder(
    tmp_path, llava, segmentation_jsonl, setokim_dir, added, trainers
):
    segmentation = {"path": str(segmentation_jsonl), "prompt": "Segment: {expression}"}
    config = segmentation_config(tmp_path, setokim_dir, segmentation, path=llava, lora=False, mask_loss_weight=0.5)
    train("sft", write_config(tmp_path / "sft.yaml", config))
    (trainer,) = trainers
    assert trainer.mask_loss_weight == 0.5
    state = trainer_state(config["output_dir"])
    assert state["global_step"] == 2 and any(
        np.isfinite(entry.get("mask_loss", np.nan)) for entry in state["log_history"]
    )

    final = Path(config["output_dir"]) / "final"
    saved = json.loads((final / "config.json").read_text())
    assert saved["use_mask_decoder"] and (saved["mask_decoder_width"], saved["mask_decoder_depth"]) == (32, 1)
    assert saved["mask_decoder_heads"] == 4 and saved["mask_decoder_intermediate_size"] == 8 * 32
    weights = SetokimForConditionalGeneration.from_pretrained(final).state_dict()
    (fresh,) = added
    assert changed({name: weights[f"mask_decoder.{name}"] for name in fresh}, fresh)  # the new decoder trained
    base = SetokimForConditionalGeneration.from_pretrained(setokim_dir).state_dict()
    moved = changed(weights, base)
    assert any(name.startswith("model.language_model.") for name in moved)
    assert not any(name.startswith("model.vision_tower.") for name in moved)
    assert AutoProcessor.from_pretrained(final).segmentation_prompt == "Segment: {expression}"
    segment(final, PIL.Image.open(segmentation_jsonl.parent / "horse.png"))


def test_lora_trains_the_new_decoder_whole_and_merges_it(tmp_path, llava, segmentation_jsonl, setokim_dir, added):
    lora = {"lora": {"r": 4, "lora_alpha": 8}, "merge_adapters": True}
    config = segmentation_config(tmp_path, setokim_dir, {"path": str(segmentation_jsonl)}, path=llava, **lora)
    train("sft", write_config(tmp_path / "sft.yaml", config))
    output_dir = Path(config["output_dir"])
    adapter = load_file(output_dir / "final" / "adapter_model.safetensors")
    fresh = added[0]  # then the merge's base gets one of the same sizes, which the trained copy replaces
    # PEFT saves the trained copy (`modules_to_save`) under the module's own name.
    trained = {name: adapter[f"base_model.model.mask_decoder.{name}"] for name in fresh}
    assert changed(trained, fresh)  # the whole decoder is saved with the adapter, trained

    assert len(added) == 2
    merged = SetokimForConditionalGeneration.from_pretrained(output_dir / "merged")
    assert all(torch.equal(merged.mask_decoder.state_dict()[name], value) for name, value in trained.items())
    base = SetokimForConditionalGeneration.from_pretrained(setokim_dir).state_dict()
    moved = changed(merged.state_dict(), base)
    assert any(".q_proj." in name for name in moved) and not any("vision_tower" in name for name in moved)
    segment(output_dir / "merged", PIL.Image.open(segmentation_jsonl.parent / "horse.png"))


def test_refcoco_layout_alone(tmp_path, setokim_dir, added):
    from skimage import data

    (tmp_path / "images").mkdir()
    PIL.Image.fromarray(data.astronaut()).resize((WIDTH, HEIGHT)).save(tmp_path / "images" / "photo.jpg")
    refs, instances, images = write_refcoco(tmp_path, ~data.horse())
    segmentation = {"format": "refcoco", "path": str(refs), "instances": str(instances), "image_folder": str(images)}
    config = segmentation_config(tmp_path, setokim_dir, segmentation, lora=False)
    config["training"] = dict(ONE_EPOCH, per_device_train_batch_size=2)
    assert len(runners._load_sft_data(load_config(write_config(tmp_path / "sft.yaml", config), "sft").data)) == 4
    train("sft", write_config(tmp_path / "sft.yaml", config))
    logged = [entry for entry in trainer_state(config["output_dir"])["log_history"] if "mask_loss" in entry]
    assert len(logged) == 2 and all(np.isfinite(entry["mask_dice_loss"]) for entry in logged)  # every step segments
    model = SetokimForConditionalGeneration.from_pretrained(Path(config["output_dir"]) / "final")
    assert model.config.use_mask_decoder and len(added) == 1


def test_a_decoder_the_model_has_stays_frozen_unless_trained(
    tmp_path, llava, segmentation_jsonl, setokim_mask_dir, added
):
    config = segmentation_config(tmp_path, setokim_mask_dir, {"path": str(segmentation_jsonl)}, path=llava, lora=False)
    for key in TINY_DECODER:
        del config["model"][key]
    config["model"]["train_mask_decoder"] = False
    train("sft", write_config(tmp_path / "sft.yaml", config))
    base = SetokimForConditionalGeneration.from_pretrained(setokim_mask_dir).state_dict()
    weights = SetokimForConditionalGeneration.from_pretrained(Path(config["output_dir"]) / "final").state_dict()
    moved = changed(weights, base)
    assert not any(name.startswith("mask_decoder.") for name in moved)
    assert any(name.startswith("model.language_model.") for name in moved)  # the mask loss still trains the LLM
    assert "mask_loss" in json.dumps(trainer_state(config["output_dir"])["log_history"])

    config["model"]["train_mask_decoder"] = True  # its own decoder trained, none added
    config["output_dir"] = str(tmp_path / "trained")
    train("sft", write_config(tmp_path / "sft.yaml", config))
    weights = SetokimForConditionalGeneration.from_pretrained(tmp_path / "trained" / "final").state_dict()
    assert any(name.startswith("mask_decoder.") for name in changed(weights, base)) and added == []


def test_add_mask_decoder_builds_the_decoder_a_config_would():
    processor = tiny_processor()
    model = tiny_setokim(processor)
    before = {name: value.clone() for name, value in model.state_dict().items()}
    add_mask_decoder(model, width=32, depth=2, heads=4, intermediate_size=64)
    assert not changed(model.state_dict(), before)  # nothing else re-initialised
    built = tiny_setokim(processor, use_mask_decoder=True)  # conftest's decoder: the same sizes, from the config
    shapes = {name: value.shape for name, value in built.state_dict().items()}
    assert {name: value.shape for name, value in model.state_dict().items()} == shapes
    assert model.config.use_mask_decoder and model.config.mask_decoder_intermediate_size == 64
    with pytest.raises(ValueError, match="already has a mask decoder"):
        add_mask_decoder(model)
    with pytest.raises(ValueError, match="`depth` must be a positive integer, got 0"):
        add_mask_decoder(tiny_setokim(processor), depth=0)
    fresh = tiny_setokim(processor)
    with pytest.raises(ValueError, match="`mask_decoder_width` must be a multiple of 8 and of 2 x `mask_decoder_hea"):
        add_mask_decoder(fresh, width=36, heads=4)
    assert fresh.mask_decoder is None and not fresh.config.use_mask_decoder  # refused before any change


@pytest.mark.parametrize("weight", [-1.0, float("nan"), float("inf"), True, "1"])
def test_the_trainer_refuses_a_mask_loss_weight_that_is_no_weight(tmp_path, weight):
    from transformers_setok.training.sft_trainer import SetokimSFTTrainer

    processor = tiny_processor()
    with pytest.raises(ValueError, match=r"`mask_loss_weight` must be a finite number >= 0, got"):
        SetokimSFTTrainer(tiny_setokim(processor), processing_class=processor, mask_loss_weight=weight)
