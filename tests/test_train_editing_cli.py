"""`setok train sft` with image edits from YAML (`data.editing`, `model.train_generation_head`,
`model.condition_*_dropout`): the edits of each format mixed with conversations and segmentation records, a full
fine-tune and a LoRA run end to end whose saved model edits through the pipeline, the shipped example config, and
bad configs named by their key."""

import json
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import test_train_cli
import torch
from conftest import tiny_processor, tiny_setokim
from safetensors.torch import load_file
from test_editing_data import instructpix2pix_table, magicbrush_table
from test_train_cli import (
    CPU_TRAINING,
    REPO,
    Bad,
    Inputs,
    _edits,
    _tree,
    _update,
    sft_config,
    train,
    trainer_state,
    write_config,
)
from transformers import AutoProcessor

from transformers_setok import SetokimForConditionalGeneration
from transformers_setok.generation import noise_scheduler_for
from transformers_setok.pipelines import SetokimImageEditingPipeline
from transformers_setok.training import runners
from transformers_setok.training.config import ConfigError, load_config
from transformers_setok.training.data import CONVERSATION_FEATURES, SEGMENTATION_FEATURES

# The CLI tests' data files, tiny checkpoints and guard, as fixtures of this module too.
llava, setokim_dir, segmentation_jsonl, no_training = (
    test_train_cli.llava,
    test_train_cli.setokim_dir,
    test_train_cli.segmentation_jsonl,
    test_train_cli.no_training,
)

# (source, instruction, target) of the four edits, in the tiny tokenizer's words.
EDITS = [
    ("astronaut", "a cat", "chelsea"),
    ("chelsea", "what is the cat ?", "coffee"),
    ("coffee", "the image", "rocket"),
    ("rocket", "is the cat in the image ?", "astronaut"),
]
TINY_DECODER = {"mask_decoder_width": 32, "mask_decoder_depth": 1, "mask_decoder_heads": 4}
# One epoch of the records in steps of 4: 4 conversations + 4 edits (+ 4 segmentation records) in 2 (or 3) steps.
EPOCH = dict(CPU_TRAINING, bf16=False, per_device_train_batch_size=4, max_steps=-1, num_train_epochs=1)
EPOCH.pop("save_steps")
EPOCH["save_strategy"] = "no"
PIPELINE = dict(num_inference_steps=3, num_unmasking_rounds=2, max_image_tokens=6)


@pytest.fixture
def editing_jsonl(tmp_path, photos) -> Path:
    """Four edits between skimage's photos: `editing/edits.jsonl`, its images (48 x 48) in `editing/images/`."""
    folder = tmp_path / "editing"
    (folder / "images").mkdir(parents=True)
    for name in ("astronaut", "chelsea", "coffee", "rocket"):
        PIL.Image.fromarray(photos[name]).resize((48, 48)).save(folder / "images" / f"{name}.png")
    lines = [
        {"source": f"{source}.png", "instruction": instruction, "target": f"{target}.png"}
        for source, instruction, target in EDITS
    ]
    (folder / "edits.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return folder / "edits.jsonl"


def save_head_model(path: Path, token_scale: float | None) -> Path:
    """A tiny Setokim with a generation head (whose weights say something), as stage 2 leaves it; `token_scale` None:
    a head never trained, so without a scale."""
    torch.manual_seed(0)
    processor = tiny_processor()
    model = tiny_setokim(processor, use_generation_head=True)
    for parameter in model.generation_head.parameters():
        torch.nn.init.normal_(parameter, std=0.05)
    model.config.generation_token_scale = token_scale
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


@pytest.fixture
def setokim_head_dir(tmp_path) -> Path:
    return save_head_model(tmp_path / "setokim-head", token_scale=1.0)


def editing_config(tmp_path, init_from, editing_jsonl, path=None, **model) -> dict:
    """Stage 3 on the edits of `editing_jsonl` (and the conversations of `path`), in the keys
    scripts/fashion_mnist_editing.py writes."""
    editing = {"format": "jsonl", "path": str(editing_jsonl), "image_folder": str(editing_jsonl.parent / "images")}
    data = {"editing": editing} if path is None else {"format": "llava", "path": str(path), "editing": editing}
    return {
        "stage": "sft",
        "output_dir": str(tmp_path / "run-sft"),
        "model": {"init_from": str(init_from), "train_generation_head": True, **model},
        "data": data,
        "training": EPOCH,
    }


def state_of(folder) -> dict:
    return SetokimForConditionalGeneration.from_pretrained(folder).state_dict()


def changed(after: dict, before: dict) -> set:
    return {name for name, value in before.items() if not torch.equal(after[name], value)}


def edit_with(folder, image):
    """The saved model at `folder` edits `image` through the pipeline: one image of the source's size."""
    model = SetokimForConditionalGeneration.from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder)
    pipe = SetokimImageEditingPipeline(model=model, processor=processor, scheduler=noise_scheduler_for(model.config))
    pipe.set_progress_bar_config(disable=True)
    out = pipe(image=image, prompt="a cat", generator=torch.Generator().manual_seed(0), **PIPELINE)
    assert len(out.images) == 1 and out.images[0].size == (32, 32)  # the model's image size
    assert len(out.image_tokens[0]) > 0
    return out


# --------------------------------------------------------------------------------------------------------------------
# The sources, mixed


def test_edits_are_chats_mixed_with_conversations_and_segmentation_records(
    tmp_path, llava, editing_jsonl, segmentation_jsonl, setokim_head_dir, caplog
):
    config = editing_config(tmp_path, setokim_head_dir, editing_jsonl, path=llava, lora=False)
    config["data"]["segmentation"] = {"path": str(segmentation_jsonl)}
    config["model"].update(train_mask_decoder=True, **TINY_DECODER)
    loaded = load_config(write_config(tmp_path / "sft.yaml", config), "sft")
    with caplog.at_level("INFO", logger=runners.logger.name):
        records = runners._load_sft_data(loaded.data)
    assert "Stage 3 trains on 4 conversations, 4 edits, 4 segmentation records." in caplog.text
    assert records.features == SEGMENTATION_FEATURES and len(records) == 12
    assert [record["mask"] is None for record in records] == [True] * 8 + [False] * 4
    for record, (source, instruction, target) in zip(records.select(range(4, 8)), EDITS):
        assert record["messages"] == [
            {"role": "user", "content": [{"type": "image", "text": None}, {"type": "text", "text": instruction}]},
            {"role": "assistant", "content": [{"type": "image", "text": None}]},
        ]
        expected = [PIL.Image.open(editing_jsonl.parent / "images" / f"{name}.png") for name in (source, target)]
        assert [np.asarray(image).tobytes() for image in record["images"]] == [
            np.asarray(image).tobytes() for image in expected
        ]

    # Edits alone: `data.path` left out.
    alone = editing_config(tmp_path, setokim_head_dir, editing_jsonl, lora=False)
    records = runners._load_sft_data(load_config(write_config(tmp_path / "alone.yaml", alone), "sft").data)
    assert records.features == CONVERSATION_FEATURES and len(records) == 4
    assert records[1]["messages"][0]["content"][1]["text"] == "what is the cat ?"


def test_the_dataset_layouts_with_their_own_column_names(tmp_path, setokim_head_dir, photos):
    """InstructPix2Pix's layout under other column names (`*_column`), and MagicBrush's, whose masks are not read (a
    colour mask image, which its loader would refuse, trains nothing here)."""
    from test_editing_data import HEIGHT, WIDTH

    folder = tmp_path / "triplets"
    folder.mkdir()
    for name, photo in (("a", "astronaut"), ("b", "chelsea"), ("c", "coffee")):
        PIL.Image.fromarray(photos[photo]).resize((WIDTH, HEIGHT)).save(folder / f"{name}.png")
    PIL.Image.fromarray(photos["coffee"]).resize((WIDTH, HEIGHT)).save(folder / "colour.png")
    table = instructpix2pix_table(folder).rename_columns(
        {"input_image": "before", "edit_prompt": "prompt", "edited_image": "after"}
    )
    table.save_to_disk(tmp_path / "ip2p")
    editing = {
        "format": "instructpix2pix",
        "path": str(tmp_path / "ip2p"),
        "source_column": "before",
        "instruction_column": "prompt",
        "target_column": "after",
    }
    config = editing_config(tmp_path, setokim_head_dir, tmp_path / "unused.jsonl", lora=False)
    config["data"] = {"editing": editing}
    records = runners._load_sft_data(load_config(write_config(tmp_path / "ip2p.yaml", config), "sft").data)
    assert len(records) == 2 and records[0]["messages"][0]["content"][1]["text"] == table[0]["prompt"]
    assert np.array_equal(np.asarray(records[1]["images"][1]), np.asarray(table[1]["after"]))

    magicbrush_table(folder, masks=("colour.png", None)).save_to_disk(tmp_path / "magicbrush")
    config["data"] = {"editing": {"format": "magicbrush", "path": str(tmp_path / "magicbrush"), "split": "train"}}
    records = runners._load_sft_data(load_config(write_config(tmp_path / "mb.yaml", config), "sft").data)
    assert len(records) == 2 and records.features == CONVERSATION_FEATURES


# --------------------------------------------------------------------------------------------------------------------
# End to end


def test_full_fine_tuning_on_edits_conversations_and_segmentation(
    tmp_path, llava, editing_jsonl, segmentation_jsonl, photos, trainers
):
    """The fashion script's keys, with segmentation records mixed in: one epoch through the CLI trains the head, the
    LLM and the new decoder (never SeTok); a head without a token scale gets one, saved; the model then edits."""
    init_from = save_head_model(tmp_path / "untrained-head", token_scale=None)
    dropout = dict(condition_text_dropout=0.1, condition_image_dropout=0.1, condition_both_dropout=0.1)
    config = editing_config(tmp_path, init_from, editing_jsonl, path=llava, lora=False, **dropout)
    config["data"]["segmentation"] = {"path": str(segmentation_jsonl)}
    config["model"].update(train_mask_decoder=True, **TINY_DECODER)
    train("sft", write_config(tmp_path / "sft.yaml", config))
    (trainer,) = trainers
    assert trainer.train_generation_head
    assert (trainer.condition_text_dropout, trainer.condition_image_dropout, trainer.condition_both_dropout) == (
        0.1,
        0.1,
        0.1,
    )
    state = trainer_state(config["output_dir"])
    logged = [entry for entry in state["log_history"] if "loss" in entry]
    assert state["global_step"] == 3 and len(logged) == 3
    assert any(np.isfinite(entry.get("diffusion_loss", np.nan)) for entry in logged)
    assert any(np.isfinite(entry.get("mask_loss", np.nan)) for entry in logged)

    final = Path(config["output_dir"]) / "final"
    saved = json.loads((final / "config.json").read_text())
    assert saved["use_generation_head"] and saved["use_mask_decoder"]
    assert saved["generation_token_scale"] is not None and saved["generation_token_scale"] > 0
    moved = changed(state_of(final), state_of(init_from))
    for trained in ("generation_head.", "model.language_model.", "model.multi_modal_projector."):
        assert any(name.startswith(trained) for name in moved), trained
    assert not any(name.startswith(("model.vision_tower.", "image_decoder.")) for name in moved)
    edit_with(final, PIL.Image.fromarray(photos["astronaut"]))


def test_lora_trains_the_head_whole_and_merges_it(tmp_path, editing_jsonl, setokim_head_dir, photos):
    config = editing_config(
        tmp_path, setokim_head_dir, editing_jsonl, lora={"r": 4, "lora_alpha": 8}, merge_adapters=True
    )
    config["training"] = dict(EPOCH, per_device_train_batch_size=2)  # two steps: the first one only warms up
    train("sft", write_config(tmp_path / "sft.yaml", config))
    output_dir = Path(config["output_dir"])
    assert trainer_state(output_dir)["global_step"] == 2
    adapter = load_file(output_dir / "final" / "adapter_model.safetensors")
    base = state_of(setokim_head_dir)
    head = {name: value for name, value in base.items() if name.startswith("generation_head.")}
    # PEFT saves the trained copy (`modules_to_save`) under the module's own name.
    trained = {name: adapter[f"base_model.model.{name}"] for name in head}
    assert changed(trained, head)

    merged = state_of(output_dir / "merged")
    assert all(torch.equal(merged[name], value) for name, value in trained.items())
    moved = changed(merged, base)
    assert any(".q_proj." in name for name in moved)
    assert not any(name.startswith(("model.vision_tower.", "image_decoder.")) for name in moved)
    edit_with(output_dir / "merged", PIL.Image.fromarray(photos["coffee"]))


# --------------------------------------------------------------------------------------------------------------------
# The example config


def test_the_example_editing_config_is_valid():
    # The data and checkpoint it names are placeholders; everything else is checked. bf16 needs `use_cpu` here.
    config = load_config(
        REPO / "configs" / "sft_editing.yaml", "sft", check_paths=False, overrides={"training": {"use_cpu": True}}
    )
    assert config.model.train_generation_head and config.data.editing is not None
    assert config.data.editing.format in ("jsonl", "instructpix2pix", "magicbrush")
    assert config.training["learning_rate"] == 1e-3 and config.training["lr_scheduler_type"] == "cosine"
    assert config.training["warmup_steps"] == 0.03


# --------------------------------------------------------------------------------------------------------------------
# Bad configs, named by their key before anything is built (rows as test_train_cli's BAD_INPUTS)


def _edits_on(model=None, **editing):
    """`data.editing` on the editing JSONL (with `editing`), the model with a head; `model` (a mapping) updates the
    `model` section after that."""

    def edit(config, inputs):
        jsonl = inputs.editing_jsonl
        section = {"path": str(jsonl), "image_folder": str(jsonl.parent / "images"), **editing}
        config["data"]["editing"] = {
            key: value(inputs) if callable(value) else value for key, value in section.items()
        }
        config["model"].update(init_from=str(inputs.setokim_head_dir), train_generation_head=True, lora=False)
        config["model"].update(
            {key: value(inputs) if callable(value) else value for key, value in (model or {}).items()}
        )

    return edit


def _editing_lines(*lines):
    """`data.editing.path` a new JSONL of the editing folder holding `lines`."""

    def edit(config, inputs):
        _edits_on()(config, inputs)
        path = inputs.editing_jsonl.parent / "odd.jsonl"
        path.write_text("".join(json.dumps(line) + "\n" for line in lines))
        config["data"]["editing"]["path"] = str(path)

    return edit


def _model(**keys):
    return _update("model", **keys)


def _data_key(**keys):
    return _update("data", **keys)


GOOD_LINE = {"source": "astronaut.png", "instruction": "a cat", "target": "chelsea.png"}
BAD_EDITING = {
    "condition dropout without the head": Bad("sft", _model(condition_text_dropout=0.1), r"`model.condition_\*_dropo"),
    "condition dropouts summing past 1": Bad(
        "sft",
        _edits_on({"condition_image_dropout": 0.7, "condition_both_dropout": 0.4}),
        r"are exclusive cases of one draw: their sum must be at most 1, got 1.1",
    ),
    "condition dropout above 1": Bad(
        "sft", _edits_on({"condition_both_dropout": 2}), r"`model.condition_both_dropout` must lie in \[0, 1\], got 2"
    ),
    "negative diffusion weight": Bad(
        "sft", _edits_on({"diffusion_loss_weight": -1}), r"`model.diffusion_loss_weight` must be >= 0, got -1"
    ),
    "no noise draws": Bad(
        "sft", _edits_on({"diffusion_noise_repeats": 0}), r"`model.diffusion_noise_repeats` must be a positive integer"
    ),
    "editing without the head": Bad(
        "sft",
        _edits_on({"train_generation_head": False}),
        r"`data.editing` trains the generation head, .*set `model.train_generation_head: true`",
    ),
    "the head for a model without one": Bad(
        "sft",
        _edits_on({"init_from": lambda inputs: str(inputs.setokim_dir)}),
        r"`model.train_generation_head` trains the generation head, and `model.init_from` .*setokim has none",
    ),
    "the head under LoRA without a token scale": Bad(
        "sft",
        _edits_on(
            {"init_from": lambda inputs: str(save_head_model(inputs.tmp_path / "no-scale", None)), "lora": True}
        ),
        r"`model.train_generation_head` with LoRA: `model.init_from` .*no-scale has no `generation_token_scale`",
    ),
    "LoRA modules_to_save with the head, not trained": Bad(
        "sft",
        _model(lora={"modules_to_save": ["multi_modal_projector", "generation_head"]}),
        r"`model.lora` sets `modules_to_save` to .*which trains the generation head, but `model.train_generation_he",
    ),
    "unknown editing format": Bad(
        "sft",
        _edits_on(format="pix2pix"),
        r"`data.editing.format` must be one of 'jsonl', 'instructpix2pix', 'magicbrush', got 'pix2pix'",
    ),
    "unknown editing key": Bad(
        "sft", _edits_on(masks="m/"), r"Unknown key `data.editing.masks`; the keys of `data.editing` are: path, format"
    ),
    "editing without a path": Bad(
        "sft",
        lambda config, inputs: config["data"].update(editing={"format": "jsonl"}),
        r"Missing required key `data.editing.path`",
    ),
    "image_folder of a dataset layout": Bad(
        "sft",
        _edits_on(format="magicbrush"),
        r"`data.editing.image_folder` applies to the `jsonl` format only; `data.editing.format` is `magicbrush`",
    ),
    "split of a JSONL": Bad(
        "sft",
        _edits_on(split="dev"),
        r"`data.editing.split` applies to the `instructpix2pix` and `magicbrush` formats only; .*is `jsonl`",
    ),
    "a column name of a JSONL": Bad(
        "sft", _edits_on(source_column="before"), r"`data.editing.source_column` applies to the `instructpix2pix` and"
    ),
    "an empty column name": Bad(
        "sft",
        _edits_on(format="instructpix2pix", image_folder=None, target_column=""),
        r"`data.editing.target_column` is empty",
    ),
    "streaming with editing data": Bad(
        "sft",
        _edits(_edits_on(), lambda config, inputs: config["data"].update(streaming=True)),
        r"`data.streaming` with `data.editing`: image edits are not streamed yet",
    ),
    "conversation keys without data.path": Bad(
        "sft",
        _edits(_edits_on(), lambda config, inputs: config["data"].pop("path"), _data_key(on_error="skip")),
        r"`data.on_error` applies to the records of `data.path`, which is not set \(stage 3 trains on `data.editing`",
    ),
    "missing editing file": Bad(
        "sft",
        _edits_on(path=lambda inputs: str(inputs.tmp_path / "none.jsonl")),
        r"`data.editing.path`: no such file: .*none.jsonl",
        FileNotFoundError,
    ),
    "missing editing image folder": Bad(
        "sft",
        _edits_on(image_folder=lambda inputs: str(inputs.tmp_path / "nowhere")),
        r"`data.editing.image_folder`: no such folder: .*nowhere",
        FileNotFoundError,
    ),
    "missing editing dataset folder": Bad(
        "sft",
        _edits_on(format="magicbrush", image_folder=None, path=lambda inputs: str(inputs.tmp_path / "not-saved")),
        r"`data.editing.path`: no such dataset folder: .*not-saved",
        FileNotFoundError,
    ),
    # ... and what only reading the records finds
    "an edit without its source": Bad(
        "sft",
        _editing_lines(GOOD_LINE, {"instruction": "a cat", "target": "chelsea.png"}),
        r"`data.editing.path` \(.*odd.jsonl\): .*odd.jsonl, line 2: missing source image",
        at_load=False,
    ),
    "an edit without its target": Bad(
        "sft",
        _editing_lines({"source": "astronaut.png", "instruction": "a cat"}),
        r"`data.editing.path` \(.*odd.jsonl\): .*odd.jsonl, line 1: missing target image",
        at_load=False,
    ),
    "an edit without an instruction": Bad(
        "sft",
        _editing_lines({**GOOD_LINE, "instruction": " "}),
        r"odd.jsonl, line 1: empty instruction",
        at_load=False,
    ),
    "an image file that is not there": Bad(
        "sft",
        _editing_lines({**GOOD_LINE, "target": "gone.png"}),
        r"odd.jsonl, line 1: missing image file: .*gone.png",
        at_load=False,
    ),
}


@pytest.mark.parametrize("case", list(BAD_EDITING))
def test_bad_editing_config_is_named_before_anything_is_built(case, request, no_training):
    bad = BAD_EDITING[case]
    inputs = Inputs(request)
    config = sft_config(inputs.tmp_path, inputs.llava, inputs.setokim_dir)
    bad.edit(config, inputs)
    output_dir = Path(config["output_dir"])
    before = _tree(output_dir)
    path = write_config(inputs.tmp_path / "bad.yaml", config)
    if bad.at_load:
        with pytest.raises(bad.error, match=bad.message):
            load_config(path, "sft")
    with pytest.raises(SystemExit, match=bad.message):  # the CLI prints the same message and exits non-zero
        train("sft", path)
    assert _tree(output_dir) == before  # nothing written, replaced or removed


def test_the_good_editing_config_of_the_bad_rows_loads(request):
    """Each row's error is its edit's: the editing config it starts from loads."""
    inputs = Inputs(request)
    config = sft_config(inputs.tmp_path, inputs.llava, inputs.setokim_dir)
    _edits_on()(config, inputs)
    loaded = load_config(write_config(inputs.tmp_path / "good.yaml", config), "sft")
    assert loaded.model.train_generation_head and loaded.data.editing.format == "jsonl"
    config["model"]["condition_text_dropout"] = 0.5
    assert load_config(write_config(inputs.tmp_path / "good.yaml", config), "sft").model.condition_text_dropout == 0.5
    with pytest.raises(ConfigError, match="`data.editing` trains the generation head"):
        config["model"].update(train_generation_head=False, condition_text_dropout=0.0)
        load_config(write_config(inputs.tmp_path / "good.yaml", config), "sft")
