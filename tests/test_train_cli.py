"""`setok train`: configs checked before anything heavy (each bad input named: `BAD_INPUTS`, one matrix for every
stage), tiny CPU runs of the three stages through the CLI, periodic checkpoints and `--resume auto` after an
interruption, a finished run replaced only with `--overwrite`, and the example configs."""

import copy
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import (
    CONCEPT_WORDS,
    TINY_SETOK_KWARGS,
    TINY_TEXT_CONFIG,
    TINY_TRAINING_KWARGS,
    TINY_VISION_KWARGS,
    text_tokenizer,
    tiny_config,
    tiny_processor,
    tiny_setokim,
    word_tokenizer,
)
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer, Trainer

from transformers_setok import (
    SetokForImageReconstruction,
    SetokImageProcessor,
    SetokimForConditionalGeneration,
    SetokModel,
    cli,
)
from transformers_setok.training import runners
from transformers_setok.training.config import ConfigError, build_training_arguments, load_config
from transformers_setok.training.setok_trainer import SetokTrainer

REPO = Path(__file__).resolve().parents[1]
CONCEPTS = {"astronaut": ["man", "rocket"], "chelsea": ["cat"], "coffee": ["cup"], "rocket": ["rocket"]}
# Two steps of batch 2 on the CPU (conftest's tiny runs), a checkpoint after each.
CPU_TRAINING = dict(TINY_TRAINING_KWARGS, save_strategy="steps", save_steps=1, disable_tqdm=True)
TINY_SETOK_CONFIG = dict(
    vision_config=dict(model_type="siglip_vision_model", **TINY_VISION_KWARGS),
    text_config=dict(TINY_TEXT_CONFIG, vocab_size=len(CONCEPT_WORDS)),
    **TINY_SETOK_KWARGS,
)


# --------------------------------------------------------------------------------------------------------------------
# Fixtures: data files and tiny checkpoints on disk, and config files


@pytest.fixture
def image_text(tmp_path, photos) -> Path:
    """Four photos (48 x 48 PNGs) and `pairs.jsonl` with a caption and concepts each."""
    folder = tmp_path / "pairs"
    folder.mkdir()
    with open(folder / "pairs.jsonl", "w") as file:
        for name, concepts in CONCEPTS.items():
            Image.fromarray(photos[name]).resize((48, 48)).save(folder / f"{name}.png")
            record = {"image": f"{name}.png", "caption": f"a {concepts[0]}", "concepts": concepts}
            file.write(json.dumps(record) + "\n")
    return folder / "pairs.jsonl"


@pytest.fixture
def llava(tmp_path, photos) -> Path:
    """Four LLaVA records, one image each."""
    folder = tmp_path / "llava"
    folder.mkdir()
    records = []
    for index, name in enumerate(CONCEPTS):
        Image.fromarray(photos[name]).resize((48, 48)).save(folder / f"{name}.png")
        turns = [{"from": "human", "value": "<image>\nwhat is in the image ?"}, {"from": "gpt", "value": "a cat"}]
        records.append({"id": str(index), "image": f"{name}.png", "conversations": turns})
    (folder / "chat.json").write_text(json.dumps(records))
    return folder / "chat.json"


@pytest.fixture
def concept_tokenizer(tmp_path) -> Path:
    text_tokenizer().save_pretrained(tmp_path / "concept-tokenizer")
    return tmp_path / "concept-tokenizer"


@pytest.fixture
def setokim_dir(tmp_path) -> Path:
    """A saved tiny Setokim with its processor (what stage 2 writes and stage 3 starts from)."""
    torch.manual_seed(0)
    processor = tiny_processor()
    tiny_setokim(processor).save_pretrained(tmp_path / "setokim")
    processor.save_pretrained(tmp_path / "setokim")
    return tmp_path / "setokim"


@pytest.fixture
def setokim_mask_dir(tmp_path) -> Path:
    """A saved tiny Setokim that has a mask decoder (conftest's TINY_MASK_DECODER: width 32, depth 2, 4 heads)."""
    torch.manual_seed(0)
    processor = tiny_processor()
    tiny_setokim(processor, use_mask_decoder=True).save_pretrained(tmp_path / "setokim-mask")
    processor.save_pretrained(tmp_path / "setokim-mask")
    return tmp_path / "setokim-mask"


@pytest.fixture
def segmentation_jsonl(tmp_path, photos) -> Path:
    """Four referring-segmentation records on real images, one per mask form: skimage's horse silhouette on a canvas
    (a PNG mask), the coffee cup (COCO polygons), the astronaut (COCO RLE), and the cat asked with `messages` (a PNG
    mask): `segmentation/objects.jsonl`, paths relative to its folder."""
    from skimage import data

    from transformers_setok.training.masks import encode_rle

    folder = tmp_path / "segmentation"
    folder.mkdir()
    horse = ~data.horse()
    canvas = np.full((*horse.shape, 3), 40, dtype=np.uint8)
    canvas[horse] = (200, 160, 90)
    Image.fromarray(canvas).resize((80, 66)).save(folder / "horse.png")
    Image.fromarray(horse).resize((80, 66), Image.NEAREST).save(folder / "horse_mask.png")
    box = np.zeros((48, 48), dtype=bool)
    box[8:40, 12:36] = True
    for name in ("coffee", "astronaut", "chelsea"):
        Image.fromarray(photos[name]).resize((48, 48)).save(folder / f"{name}.png")
    Image.fromarray(box).save(folder / "chelsea_mask.png")
    request = [{"role": "user", "content": "<image>\nwhere is the cat ?"}]
    records = [
        {"image": "horse.png", "expression": "the horse", "mask": "horse_mask.png"},
        {"image": "coffee.png", "expression": "the cup", "mask": [[12, 8, 36, 8, 36, 40, 12, 40]]},
        {"image": "astronaut.png", "expression": "the man", "mask": encode_rle(box)},
        {"image": "chelsea.png", "messages": request, "mask": "chelsea_mask.png"},
    ]
    (folder / "objects.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    return folder / "objects.jsonl"


@pytest.fixture
def setok_dir(tmp_path) -> Path:
    """A saved tiny SetokForImageReconstruction (stage 1's output) with its image processor."""
    SetokForImageReconstruction(tiny_config()).save_pretrained(tmp_path / "setok")
    SetokImageProcessor(size=32).save_pretrained(tmp_path / "setok")
    return tmp_path / "setok"


@pytest.fixture
def bare_setok_dir(tmp_path) -> Path:
    """A saved SetokModel: SeTok without the detokenizer a generation head draws for."""
    SetokModel(tiny_config()).save_pretrained(tmp_path / "bare-setok")
    return tmp_path / "bare-setok"


@pytest.fixture
def llm_dir(tmp_path) -> Path:
    """A tiny Llama with the word-level tokenizer, as a causal-LM checkpoint for `build_setokim`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = word_tokenizer()
    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=len(tokenizer)
    )
    LlamaForCausalLM(config).save_pretrained(tmp_path / "llm")
    tokenizer.save_pretrained(tmp_path / "llm")
    return tmp_path / "llm"


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def tokenizer_config(tmp_path, image_text, concept_tokenizer, **training) -> dict:
    return {
        "stage": "tokenizer",
        "output_dir": str(tmp_path / "run-tokenizer"),
        "model": {"setok_config": copy.deepcopy(TINY_SETOK_CONFIG), "text_tokenizer": str(concept_tokenizer)},
        "data": {"path": str(image_text), "text_source": "concepts"},
        "training": {**CPU_TRAINING, **training},
    }


def pretrain_config(tmp_path, image_text, setok_dir, llm_dir, **training) -> dict:
    return {
        "stage": "pretrain",
        "output_dir": str(tmp_path / "run-pretrain"),
        "model": {"setok": str(setok_dir), "language_model": str(llm_dir)},
        "data": {"format": "image_text", "path": str(image_text), "caption_prompt": "what is in the image ?"},
        "training": {**CPU_TRAINING, **training},
    }


def sft_config(tmp_path, llava, setokim_dir, **training) -> dict:
    return {
        "stage": "sft",
        "output_dir": str(tmp_path / "run-sft"),
        "model": {"init_from": str(setokim_dir)},
        "data": {"format": "llava", "path": str(llava)},
        "training": {**CPU_TRAINING, "bf16": False, **training},
    }


def train(stage: str, config: Path, *extra: str):
    cli.main(["train", stage, "--config", str(config), *extra])


def trainer_state(output_dir) -> dict:
    return json.loads((Path(output_dir) / "trainer_state.json").read_text())


@pytest.fixture
def no_training(monkeypatch):
    """Fails a test whose bad input got as far as building a model or training."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was built or training started before the bad input was reported")

    monkeypatch.setattr(Trainer, "train", refuse)
    for name in ("build_tokenizer_model", "build_pretrain_model", "build_sft_model"):
        monkeypatch.setattr(runners, name, refuse)


# --------------------------------------------------------------------------------------------------------------------
# Bad input: one matrix of training configs (and the runs they start) that must fail with a clear error naming the key
# or argument, before any model is built and without touching output_dir. A new check adds its rows here.


@dataclass
class Bad:
    """A bad input: the stage's good config (`GOOD_CONFIGS`) after `edit(config, inputs)`, then `setok train STAGE
    --config FILE *args` with `before(config, inputs)` on disk first. `inputs.NAME` is the fixture NAME, made on first
    use. `at_load`: `load_config` itself refuses the file; else the run does (the data set, `--resume`, output_dir)."""

    stage: str
    edit: Callable | None
    message: str
    error: type = ConfigError
    args: Callable | tuple = ()
    before: Callable | None = None
    at_load: bool = True


class Inputs:
    """The test's fixtures by attribute, each made when a row first asks for it."""

    def __init__(self, request):
        self._request = request

    def __getattr__(self, name):
        return self._request.getfixturevalue(name)


GOOD_CONFIGS = {
    "tokenizer": lambda inputs: tokenizer_config(inputs.tmp_path, inputs.image_text, inputs.concept_tokenizer),
    "pretrain": lambda inputs: pretrain_config(inputs.tmp_path, inputs.image_text, inputs.setok_dir, inputs.llm_dir),
    "sft": lambda inputs: sft_config(inputs.tmp_path, inputs.llava, inputs.setokim_dir),
}


def _value(value, inputs):
    """A row's value, or for a callable (a path under a fixture) what it gives, as a string."""
    return str(value(inputs)) if callable(value) else value


def _set(section, key, value):
    def edit(config, inputs):
        (config if section is None else config[section])[key] = _value(value, inputs)

    return edit


def _drop(section, key):
    def edit(config, inputs):
        del config[section][key]

    return edit


def _update(*sections, **keys):
    """Sets `keys` in the mapping at the path `sections` (`"model", "setok_config"`)."""

    def edit(config, inputs):
        target = config
        for section in sections:
            target = target[section]
        target.update({key: _value(value, inputs) for key, value in keys.items()})

    return edit


def _model(**keys):
    """Replaces the `model` section by `keys`."""

    def edit(config, inputs):
        config["model"] = {key: _value(value, inputs) for key, value in keys.items()}

    return edit


def _data(**keys):
    """Replaces the `data` section by `keys`, on the same data file."""

    def edit(config, inputs):
        config["data"] = {"path": config["data"]["path"], **keys}

    return edit


def _edits(*edits):
    def edit(config, inputs):
        for each in edits:
            each(config, inputs)

    return edit


def _vision(**keys):
    return _update("model", "setok_config", "vision_config", **keys)


def _text(**keys):
    return _update("model", "setok_config", "text_config", **keys)


def _head(**keys):
    """Sets `keys` in `model`, with the generation head trained."""
    return _update("model", train_generation_head=True, **keys)


def _text_to_image(**keys):
    """Sets `keys` in `data`, with text-to-image chats and the generation head trained."""
    return _edits(_update("model", train_generation_head=True), _update("data", **{"text_to_image": True, **keys}))


def _segmentation(model=None, **keys):
    """Sets `data.segmentation` to the segmentation JSONL with `keys`; `model` (a mapping) updates `model`."""

    def edit(config, inputs):
        segmentation = {"path": str(inputs.segmentation_jsonl), **keys}
        config["data"]["segmentation"] = {key: _value(value, inputs) for key, value in segmentation.items()}
        config["model"].update({key: _value(value, inputs) for key, value in (model or {}).items()})

    return edit


def _drop_segmentation(key):
    def edit(config, inputs):
        del config["data"]["segmentation"][key]

    return edit


def _segmentation_file(text):
    """Points `data.segmentation.path` at a new file of the segmentation folder holding `text`."""

    def edit(config, inputs):
        path = inputs.segmentation_jsonl.parent / "odd.jsonl"
        path.write_text(text)
        config["data"]["segmentation"]["path"] = str(path)

    return edit


def _mask_training(**keys):
    """`data.segmentation` (with `keys`) and a mask decoder trained with full fine-tuning."""
    return _segmentation({"train_mask_decoder": True, "lora": False}, **keys)


def _refcoco(**keys):
    """`data.segmentation` in the `refcoco` format (its files need not exist for these rows), with `keys`."""
    return _mask_training(format="refcoco", path="refs(unc).p", **keys)


def _data_file(name, text):
    """Points `data.path` at a new file of the image-text folder holding `text`."""

    def edit(config, inputs):
        path = inputs.image_text.parent / name
        path.write_text(text)
        config["data"]["path"] = str(path)

    return edit


def _saved_config(text):
    """`model.init_from` a folder whose config.json holds `text`."""

    def edit(config, inputs):
        folder = inputs.tmp_path / "odd-model"
        folder.mkdir()
        (folder / "config.json").write_text(text)
        config["model"] = {"init_from": str(folder)}

    return edit


def _checkpoint(model_dir):
    """A complete checkpoint-4 of a `model_dir` model in output_dir, as an earlier run would leave it."""

    def before(config, inputs):
        folder = Path(config["output_dir"]) / "checkpoint-4"
        folder.mkdir(parents=True)
        (folder / "config.json").write_text((getattr(inputs, model_dir) / "config.json").read_text())
        (folder / "trainer_state.json").write_text("{}")

    return before


def _finished_run(config, inputs):
    """output_dir/final holds the SeTok a run without checkpoints (`save_strategy: no`) saved."""
    shutil.copytree(inputs.setok_dir, Path(config["output_dir"]) / "final")


BAD_INPUTS = {
    # The file's structure: keys and types, against the schema
    "unknown top-level key": Bad(
        "tokenizer", _set(None, "trainer", {}), r"Unknown key `trainer`; the keys of the top "
    ),
    "unknown model key": Bad(
        "tokenizer", _set("model", "vision_modle", "x"), r"Unknown key `model.vision_modle`; .*vis"
    ),
    "unknown data key": Bad(
        "tokenizer", _set("data", "pth", "x"), r"Unknown key `data.pth`; the keys of `data` are: path, format"
    ),
    "missing required key": Bad("tokenizer", _drop("data", "path"), r"Missing required key `data.path`"),
    "missing section": Bad("tokenizer", lambda config, inputs: config.pop("data"), r"Missing required key `data`"),
    "stage of another command": Bad(
        "tokenizer", _set(None, "stage", "pretrain"), r"`stage` is 'pretrain' but the command trains 'tokenizer'"
    ),
    "string for a bool": Bad(
        "tokenizer", _set("data", "verify_images", "yes"), r"`data.verify_images` must be true or false, got 'yes'"
    ),
    "value outside a Literal": Bad(
        "tokenizer", _set("data", "on_error", "ignore"), r"`data.on_error` must be one of 'fail', 'skip', got 'ignore'"
    ),
    "list for an optional string": Bad(
        "tokenizer",
        _set("model", "vision_model", ["a", "b"]),
        r"`model.vision_model` must be a string or null, got \['a', 'b'\] \(list\)",
    ),
    "string for train_generation_head": Bad(
        "pretrain",
        _set("model", "train_generation_head", "yes"),
        r"`model.train_generation_head` must be true or false, got 'yes'",
    ),
    "float for the head width": Bad(
        "pretrain", _head(generation_head_width=1.5), r"`model.generation_head_width` must be an integer, got 1.5"
    ),
    "string for text_to_image": Bad(
        "pretrain", _set("data", "text_to_image", "yes"), r"`data.text_to_image` must be true or false, got 'yes'"
    ),
    # `training`: the argument class's fields and values, and what the Trainer would reinterpret
    "unknown training key": Bad(
        "tokenizer",
        _set("training", "learning_rat", 0.1),
        r"Unknown key `training.learning_rat`: not a field of SetokTrainingArguments.*Did you mean `learning_rate`",
    ),
    "unknown SFTConfig key": Bad(
        "sft",
        _set("training", "max_seq_length", 512),
        r"Unknown key `training.max_seq_length`: not a field of SFTConf",
    ),
    "string for a float": Bad(
        "tokenizer",
        _set("training", "learning_rate", "fast"),
        r"`training.learning_rate` must be a number, got 'fast'",
    ),
    "bool for an int": Bad(
        "tokenizer", _set("training", "max_steps", True), r"`training.max_steps` must be an integer, got True \(bool\)"
    ),
    "invalid TrainingArguments value": Bad(
        "tokenizer",
        _set("training", "save_strategy", "sometimes"),
        r"`training.save_strategy`: sometimes is not a valid SaveStrategy",
    ),
    "contradictory TrainingArguments": Bad(
        "tokenizer",
        _set("training", "load_best_model_at_end", True),
        r"`training.load_best_model_at_end`: --load_best_model_at_end requires the save and eval strategy to match",
    ),
    "output_dir under training": Bad("tokenizer", _set("training", "output_dir", "x"), r"set the top-level `output_d"),
    "negative max_steps": Bad(
        "tokenizer",
        _set("training", "max_steps", -5),
        r"`training.max_steps` must be a number of steps \(at least 1\) or -1 \(not set: `num_train_epochs` decides\), "
        r"got -5\.",
    ),
    "max_steps 0": Bad("tokenizer", _set("training", "max_steps", 0), r"`training.max_steps` must be a number of st"),
    "negative max_steps, stage 3": Bad("sft", _set("training", "max_steps", -2), r"`training.max_steps` must be a nu"),
    "no epochs": Bad(
        "tokenizer", _set("training", "num_train_epochs", 0), r"`training.num_train_epochs` must be > 0, got 0\."
    ),
    "save_steps 0": Bad(
        "tokenizer",
        _set("training", "save_steps", 0),
        r"`training.save_steps` must be > 0 \(a number of steps; below 1, a fraction of the run\), got 0\.",
    ),
    "negative logging_steps": Bad(
        "tokenizer", _set("training", "logging_steps", -1), r"`training.logging_steps` must be > 0 .*got -1\."
    ),
    "batch of 0": Bad(
        "tokenizer",
        _set("training", "per_device_train_batch_size", 0),
        r"`training.per_device_train_batch_size` must be a positive integer, got 0\.",
    ),
    "no gradient accumulation": Bad(
        "tokenizer",
        _set("training", "gradient_accumulation_steps", 0),
        r"`training.gradient_accumulation_steps` must be a positive integer, got 0\.",
    ),
    "negative learning rate": Bad(
        "tokenizer", _set("training", "learning_rate", -1e-3), r"`training.learning_rate` must be > 0, got -0.001\."
    ),
    "save_total_limit 0": Bad(
        "tokenizer", _set("training", "save_total_limit", 0), r"`training.save_total_limit` must be a positive integ"
    ),
    "negative weight decay": Bad(
        "tokenizer", _set("training", "weight_decay", -0.1), r"`training.weight_decay` must be >= 0, got -0.1\."
    ),
    "negative dataloader workers": Bad(
        "tokenizer", _set("training", "dataloader_num_workers", -1), r"`training.dataloader_num_workers` must be >= 0"
    ),
    "packing": Bad(
        "sft",
        _set("training", "packing", True),
        r"`training.packing`: SetokimSFTTrainer needs `SFTConfig\(packing=False\)`",
    ),
    "training.max_length": Bad(
        "sft", _set("training", "max_length", 512), r"`training.max_length` \(512\).*set `data.max_length`"
    ),
    # 1024 is TRL's default: written in the file, it is meant, not a default.
    "training.max_length of TRL's default": Bad(
        "sft", _set("training", "max_length", 1024), r"`training.max_length` \(1024\).*set `data.max_length`"
    ),
    # `model.setok_config`: SetokConfig's keys and values, and its encoders' against their own config classes
    "unknown setok_config key": Bad(
        "tokenizer",
        _update("model", "setok_config", token_dims=4),
        r"Unknown key `model.setok_config.token_dims`\. Did you mean `token_dim`\?",
    ),
    "invalid setok_config value": Bad(
        "tokenizer",
        _update("model", "setok_config", token_dim=0),
        r"`model.setok_config`: `token_dim` must be a positive integer",
    ),
    "string for a SetokConfig number": Bad(
        "tokenizer",
        _update("model", "setok_config", cluster_threshold="0.4"),
        r"`model.setok_config.cluster_threshold` must be a number, got '0.4' \(str\)",
    ),
    "string for a SetokConfig choice": Bad(
        "tokenizer",
        _update("model", "setok_config", concept_pooling="max"),
        r"`model.setok_config.concept_pooling` must be one of 'concept', 'image', got 'max'",
    ),
    "typo in vision_config": Bad(
        "tokenizer",
        _vision(hiden_size=16),
        r"Unknown key `model.setok_config.vision_config.hiden_size`: not a field of SiglipVisionConfig "
        r"\(`model.setok_config.vision_config.model_type` 'siglip_vision_model'\)\. Did you mean `hidden_size`",
    ),
    "typo in text_config": Bad(
        "tokenizer",
        _text(num_layers=3),
        r"Unknown key `model.setok_config.text_config.num_layers`: not a field of BertConfig .*Did you mean "
        r"`num_hidden_layers`\?",
    ),
    "typo in the vision model_type": Bad(
        "tokenizer",
        _vision(model_type="siglip_vison_model"),
        r"`model.setok_config.vision_config.model_type`: 'siglip_vison_model' is no transformers model type\. Did you "
        r"mean `siglip_vision_model`",
    ),
    "string for a vision_config int": Bad(
        "tokenizer",
        _vision(hidden_size="32"),
        r"`model.setok_config.vision_config.hidden_size` must be an integer, got '32' \(str\)",
    ),
    "string for a text_config int": Bad(
        "tokenizer",
        _text(num_hidden_layers="1"),
        r"`model.setok_config.text_config.num_hidden_layers` must be an integer, got '1'",
    ),
    "vision heads that do not divide the width": Bad(
        "tokenizer",
        _vision(hidden_size=30),
        r"`model.setok_config.vision_config.hidden_size` \(30\) must be divisible by "
        r"`model.setok_config.vision_config.num_attention_heads` \(4\).*28 or 32",
    ),
    "no vision heads": Bad(
        "tokenizer",
        _vision(num_attention_heads=0),
        r"`model.setok_config.vision_config.num_attention_heads` must be a positive integer, got 0",
    ),
    "image not tiled by its patches": Bad(
        "tokenizer",
        _vision(image_size=30),
        r"`model.setok_config.vision_config.image_size` \(30\) is not a multiple of "
        r"`model.setok_config.vision_config.patch_size` \(4\): the last 2 pixels .*28 or 32\.",
    ),
    "image side not tiled by its patches": Bad(
        "tokenizer",
        _vision(image_size=[32, 32], patch_size=[4, 3]),
        r"`model.setok_config.vision_config.image_size` \(32\) is not a multiple of .*patch_size` \(3\)",
    ),
    # Which sources go together, and values beyond their types
    "no model source": Bad(
        "tokenizer", _model(), r"`model` needs `init_from` .* or `setok_config` and/or `vision_model`"
    ),
    "concept contrast without a tokenizer": Bad(
        "tokenizer",
        _drop("model", "text_tokenizer"),
        r"needs a tokenizer for its text encoder: set `model.text_tokenizer`",
    ),
    "head width 0": Bad(
        "pretrain", _head(generation_head_width=0), r"`model.generation_head_width` must be a positive integer, got 0"
    ),
    "head depth 0": Bad(
        "pretrain", _head(generation_head_depth=0), r"`model.generation_head_depth` must be a positive integer, got 0"
    ),
    "no noise draws": Bad(
        "pretrain",
        _head(diffusion_noise_repeats=0),
        r"`model.diffusion_noise_repeats` must be a positive integer, got 0",
    ),
    "mask ratio above 1": Bad(
        "pretrain",
        _head(generation_mask_ratio_min=1.5),
        r"`model.generation_mask_ratio_min` must lie in \[0, 1\], got 1.5",
    ),
    "negative mask ratio": Bad(
        "pretrain",
        _head(generation_mask_ratio_min=-0.1),
        r"`model.generation_mask_ratio_min` must lie in \[0, 1\], got -0.1",
    ),
    "negative diffusion weight": Bad(
        "pretrain", _head(diffusion_loss_weight=-1), r"`model.diffusion_loss_weight` must be >= 0, got -1"
    ),
    "condition dropout above 1": Bad(
        "pretrain",
        _head(condition_text_dropout=1.5),
        r"`model.condition_text_dropout` must lie in \[0, 1\], got 1.5",
    ),
    "condition dropouts summing past 1": Bad(
        "pretrain",
        _head(condition_text_dropout=0.6, condition_both_dropout=0.6),
        r"are exclusive cases of one draw: their sum must be at most 1, got 1.2",
    ),
    "condition dropout without the head": Bad(
        "pretrain",
        _set("model", "condition_image_dropout", 0.1),
        r"`model.condition_\*_dropout` trains classifier-free guidance of the generation head",
    ),
    # Checked even when the head is not trained: a value nothing reads is still a mistake worth naming.
    "head width 0 without the head": Bad(
        "pretrain", _set("model", "generation_head_width", 0), r"`model.generation_head_width` must be a positive"
    ),
    "qlora without lora": Bad("sft", _update("model", lora=False, qlora=True), r"`model.qlora` needs LoRA adapters"),
    "merged adapters without lora": Bad(
        "sft", _update("model", lora=False, merge_adapters=True), r"`model.merge_adapters` needs LoRA adapters"
    ),
    "bad LoraConfig override": Bad(
        "sft", _update("model", lora={"rank": 4}), r"`model.lora` \(LoraConfig overrides\):.*rank"
    ),
    # `data`: templates, what would train nothing, keys the chosen format ignores
    "concept template without a field": Bad(
        "tokenizer",
        _set("data", "concept_template", "a photo"),
        r"`data.concept_template` 'a photo' does not use the concept",
    ),
    "concept template with a named field": Bad(
        "tokenizer",
        _set("data", "concept_template", "a photo of a {concept}"),
        r"`data.concept_template` 'a photo of a \{concept\}' cannot be filled with a concept \(KeyError",
    ),
    "concept template with two fields": Bad(
        "tokenizer",
        _set("data", "concept_template", "{} and {}"),
        r"`data.concept_template` '\{\} and \{\}' cannot be filled with a concept \(IndexError",
    ),
    "nothing to train on": Bad(
        "pretrain",
        _set("data", "captioning", False),
        r"`data.captioning` and `data.text_to_image` are both false: nothing would be trained",
    ),
    "nothing to train on, head or not": Bad(
        "pretrain",
        _text_to_image(captioning=False, text_to_image=False),
        r"`data.captioning` and `data.text_to_image` are both false",
    ),
    "text to image without the head": Bad(
        "pretrain",
        _set("data", "text_to_image", True),
        r"`data.text_to_image` trains the generation head: set `model.train_generation_head: true`",
    ),
    "the head without text to image": Bad(
        "pretrain", _head(), r"`model.train_generation_head` needs text-to-image chats: set `data.text_to_image: true`"
    ),
    "text-to-image template without a field": Bad(
        "pretrain",
        _text_to_image(text_to_image_template="Draw it."),
        r"`data.text_to_image_template` 'Draw it.' does not use the caption, .*as in 'Draw \{\}.'",
    ),
    "text-to-image template with a named field": Bad(
        "pretrain",
        _text_to_image(text_to_image_template="Draw {caption}."),
        r"`data.text_to_image_template` 'Draw \{caption\}.' cannot be filled with a caption \(KeyError",
    ),
    "text-to-image template with two fields": Bad(
        "pretrain",
        _text_to_image(text_to_image_template="{} and {}"),
        r"`data.text_to_image_template` '\{\} and \{\}' cannot be filled with a caption \(IndexError",
    ),
    "data.max_length 0": Bad("sft", _set("data", "max_length", 0), r"`data.max_length` must be a positive integer"),
    "caption_prompt of LLaVA data": Bad(
        "pretrain",
        _data(format="llava", caption_prompt="Caption it."),
        r"`data.caption_prompt` applies to the `image_text` format only; `data.format` is `llava`",
    ),
    "caption_prompt of a hub dataset": Bad(
        "pretrain",
        _data(format="hub", caption_prompt="Caption it."),
        r"`data.caption_prompt` applies to the `image_text` format only; `data.format` is `hub`",
    ),
    "captioning of LLaVA data": Bad(
        "pretrain", _data(format="llava", captioning=False), r"`data.captioning` applies to the `image_text"
    ),
    "text_to_image of a hub dataset": Bad(
        "pretrain",
        _data(format="hub", text_to_image=True),
        r"`data.text_to_image` applies to the `image_text` format only",
    ),
    "text_to_image_template of LLaVA data": Bad(
        "pretrain",
        _data(format="llava", text_to_image_template="Draw {}."),
        r"`data.text_to_image_template` applies to the `image_text` format only",
    ),
    "split of image-text pairs": Bad(
        "pretrain", _update("data", split="validation"), r"`data.split` applies to the `hub` format only; .*`image_te"
    ),
    "image_column of LLaVA data": Bad(
        "sft", _update("data", image_column="pictures"), r"`data.image_column` applies to the `hub` format only"
    ),
    "messages_column of LLaVA data": Bad(
        "sft", _update("data", messages_column="chat"), r"`data.messages_column` applies to the `hub` format only"
    ),
    "image_folder of a hub dataset": Bad(
        "sft",
        _update("data", format="hub", path="owner/name", image_folder=lambda inputs: inputs.tmp_path),
        r"`data.image_folder` applies to `image_text` and `llava` files",
    ),
    # Paths, and the checkpoints they name (their config.json)
    "missing data file": Bad(
        "tokenizer",
        _set("data", "path", lambda inputs: inputs.tmp_path / "missing.jsonl"),
        r"`data.path`: no such file: .*missing.jsonl",
        FileNotFoundError,
    ),
    "missing image folder": Bad(
        "tokenizer",
        _set("data", "image_folder", lambda inputs: inputs.tmp_path / "nowhere"),
        r"`data.image_folder`: no such folder",
        FileNotFoundError,
    ),
    "missing hub dataset folder": Bad(
        "sft",
        _update("data", format="hub", path=lambda inputs: inputs.tmp_path / "not-saved"),
        r"`data.path`: no such dataset folder",
        FileNotFoundError,
    ),
    "init_from a Setokim for stage 1": Bad(
        "tokenizer",
        _model(init_from=lambda inputs: inputs.setokim_dir),
        r"`model.init_from`: .*setokim holds a model of type 'setokim', but this stage needs a 'setok' model",
    ),
    "init_from a folder without config.json": Bad(
        "tokenizer",
        _model(init_from=lambda inputs: inputs.image_text.parent),
        r"`model.init_from`: .* holds no config.json",
        FileNotFoundError,
    ),
    "init_from a broken config.json": Bad(
        "tokenizer", _saved_config('{"model_type": '), r"`model.init_from`: cannot read .*odd-model.config.json"
    ),
    "init_from a config.json that is no mapping": Bad(
        "tokenizer", _saved_config('["setok"]'), r"`model.init_from`: .*config.json holds no JSON object"
    ),
    "init_from a SeTok for stage 2": Bad(
        "pretrain",
        _model(init_from=lambda inputs: inputs.setok_dir),
        r"holds a model of type 'setok', but this stage needs a 'setokim'",
    ),
    "init_from a SeTok for stage 3": Bad(
        "sft",
        _model(init_from=lambda inputs: inputs.setok_dir),
        r"`model.init_from`: .*setok holds a model of type 'setok', but this stage needs a 'setokim'",
    ),
    "setok a Setokim": Bad(
        "pretrain",
        _model(setok=lambda inputs: inputs.setokim_dir, language_model="some/llm"),
        r"`model.setok`: .* type 'setokim', but this stage needs a 'setok'",
    ),
    "missing language model folder": Bad(
        "pretrain",
        _set("model", "language_model", lambda inputs: inputs.tmp_path / "no-llm"),
        r"`model.language_model`: no such folder",
        FileNotFoundError,
    ),
    "a head for a Setokim without setok": Bad(
        "pretrain",
        _edits(_model(init_from=lambda inputs: inputs.setokim_dir, train_generation_head=True), _text_to_image()),
        r"`model.init_from` .*setokim has no generation head: set `model.setok`",
    ),
    "a head drawing for a Setokim's detokenizer": Bad(
        "pretrain",
        _edits(_model(init_from=lambda i: i.setokim_dir, setok=lambda i: i.setokim_dir), _text_to_image()),
        r"`model.setok`: .*setokim holds a model of type 'setokim', but this stage needs a 'setok'",
    ),
    "a head drawing for a missing SeTok": Bad(
        "pretrain",
        _edits(_model(init_from=lambda i: i.setokim_dir, setok=lambda i: i.tmp_path / "no-setok"), _text_to_image()),
        r"`model.setok`: no such folder: .*no-setok",
        FileNotFoundError,
    ),
    "setok next to init_from without a head": Bad(
        "pretrain",
        _model(init_from=lambda inputs: inputs.setokim_dir, setok=lambda inputs: inputs.setok_dir),
        r"`model.init_from` continues a saved Setokim: drop `model.setok`",
    ),
    "language_model next to init_from": Bad(
        "pretrain",
        _edits(
            _model(init_from=lambda inputs: inputs.setokim_dir, train_generation_head=True, language_model="some/llm"),
            _text_to_image(),
        ),
        r"`model.init_from` continues a saved Setokim: drop `model.language_model`",
    ),
    "a head for a Setokim, drawing for a SeTok without detokenizer": Bad(
        "pretrain",
        _edits(_model(init_from=lambda i: i.setokim_dir, setok=lambda i: i.bare_setok_dir), _text_to_image()),
        r"`model.setok`: .*bare-setok holds a SetokModel, but this stage needs a SetokForImageReconstruction",
    ),
    "a new head drawing for a SeTok without detokenizer": Bad(
        "pretrain",
        _edits(_update("model", setok=lambda inputs: inputs.bare_setok_dir), _text_to_image()),
        r"`model.setok`: .*bare-setok holds a SetokModel, but this stage needs a SetokForImageReconstruction",
    ),
    # The data set, read at the start of the run
    "empty data file": Bad(
        "tokenizer",
        _data_file("empty.jsonl", "\n"),
        r"`data.path` \(.*empty.jsonl\): .*empty.jsonl holds no records",
        at_load=False,
    ),
    "record without its image": Bad(
        "tokenizer",
        _data_file("broken.jsonl", '{"image": "missing.png", "caption": "a cat"}\n'),
        r"line 1: missing image file",
        at_load=False,
    ),
    # Captions only, but the contrast is asked to match concepts: refused up front, not at the first batch.
    "captions for a concept contrast": Bad(
        "tokenizer",
        _data_file("captions.jsonl", '{"image": "chelsea.png", "caption": "a cat"}\n'),
        r"`data.text_source` is 'concepts', but 1 of 1 records .* use `data.text_",
        at_load=False,
    ),
    # output_dir and `--resume`: what the run would continue or replace
    "--resume auto without checkpoints": Bad(
        "tokenizer",
        None,
        r"--resume auto: no complete checkpoint-N folder in `output_dir`",
        args=("--resume", "auto"),
        at_load=False,
    ),
    "--resume a missing folder": Bad(
        "tokenizer",
        None,
        r"--resume: no such checkpoint folder",
        args=lambda inputs: ("--resume", str(inputs.tmp_path / "checkpoint-9")),
        at_load=False,
    ),
    "--resume a checkpoint of another stage": Bad(
        "tokenizer",
        None,
        r"`--resume`: .*checkpoint-4 holds a model of type 'setokim', but this",
        args=("--resume", "auto"),
        before=_checkpoint("setokim_dir"),
        at_load=False,
    ),
    "--resume and --overwrite": Bad(
        "tokenizer",
        None,
        r"--resume continues the run in `output_dir` and --overwrite replaces it with a new one: pass one of them",
        args=("--resume", "auto", "--overwrite"),
        before=_checkpoint("setok_dir"),
        at_load=False,
    ),
    # A fresh run would overwrite that run's checkpoints...
    "a new run over checkpoints": Bad(
        "tokenizer",
        None,
        r"already holds checkpoints .*pass `--resume auto` to continue that run, `--overwrite` to replace it",
        before=_checkpoint("setok_dir"),
        at_load=False,
    ),
    # ... or, with no checkpoints to warn of it, that run's model.
    "a new run over a finished model": Bad(
        "tokenizer",
        _set("training", "save_strategy", "no"),
        r"`output_dir` .*run-tokenizer already holds a trained model \(.*final\): pass `--overwrite` to replace it",
        before=_finished_run,
        at_load=False,
    ),
    # Streaming data: what a stream without a length needs
    "streaming without max_steps": Bad(
        "sft",
        _edits(_update("data", streaming=True), _set("training", "max_steps", -1)),
        r"`data.streaming` reads a stream without a length: set `training.max_steps`",
    ),
    "streaming with dataloader workers": Bad(
        "sft",
        _edits(_update("data", streaming=True), _set("training", "dataloader_num_workers", 2)),
        r"`data.streaming` with `training.dataloader_num_workers` > 0",
    ),
    "a list of data files without streaming": Bad(
        "sft",
        lambda config, inputs: config["data"].update(path=[config["data"]["path"]] * 2),
        r"`data.path` is a list of files: set `data.streaming: true`",
    ),
    "data files on another format": Bad(
        "sft", _update("data", data_files="shards/*.parquet"), r"`data.data_files` applies to the `hub` format only"
    ),
    "webdataset columns on another format": Bad(
        "sft",
        _update("data", webdataset_columns={"image": "png"}),
        r"`data.webdataset_columns` applies to the `webdataset`",
    ),
    "a shard pattern that matches nothing": Bad(
        "sft",
        _update("data", streaming=True, path=lambda inputs: inputs.tmp_path / "shards-*.jsonl"),
        r"`data.path`: no such file, folder or pattern: .*shards-\*\.jsonl",
        error=FileNotFoundError,
    ),
    # Referring segmentation in stage 3: `data.segmentation` (a nested section) and the mask decoder
    "no data at all": Bad(
        "sft", _drop("data", "path"), r"`data` needs `path` \(conversations\) and/or `segmentation`"
    ),
    "segmentation as a file name": Bad(
        "sft",
        _set("data", "segmentation", "objects.jsonl"),
        r"`data.segmentation` must be a mapping with the keys path, format, instances, .* or null, got 'objects.jsonl'",
    ),
    "unknown segmentation key": Bad(
        "sft", _mask_training(masks="m/"), r"Unknown key `data.segmentation.masks`; the keys of `data.segmentation` ar"
    ),
    "segmentation without a path": Bad(
        "sft", _edits(_mask_training(), _drop_segmentation("path")), r"Missing required key `data.segmentation.path`"
    ),
    "unknown segmentation format": Bad(
        "sft", _mask_training(format="coco"), r"`data.segmentation.format` must be one of 'jsonl', 'refcoco', 'hub'"
    ),
    "string for train_mask_decoder": Bad(
        "sft", _set("model", "train_mask_decoder", "yes"), r"`model.train_mask_decoder` must be true or false"
    ),
    "train_mask_decoder without segmentation data": Bad(
        "sft",
        _update("model", train_mask_decoder=True, lora=False),
        r"`model.train_mask_decoder` trains the mask decoder on referring-segmentation records: set `data.segmentati",
    ),
    "segmentation data for a model without a decoder": Bad(
        "sft",
        _segmentation({"lora": False}),
        r"`data.segmentation` needs a mask decoder, and `model.init_from` .*setokim has none: set "
        r"`model.train_mask_decoder: true`",
    ),
    "a new decoder under LoRA without merged adapters": Bad(
        "sft",
        _segmentation({"train_mask_decoder": True}),
        r"`model.train_mask_decoder` adds a mask decoder to `model.init_from` .*: set `model.merge_adapters: true`",
    ),
    "LoRA modules_to_save without the decoder": Bad(
        "sft",
        _segmentation({"train_mask_decoder": True, "lora": {"modules_to_save": ["multi_modal_projector"]}}),
        r"`model.lora` sets `modules_to_save` to .*without `mask_decoder`",
    ),
    "mask decoder width 0": Bad(
        "sft",
        _segmentation({"train_mask_decoder": True, "lora": False, "mask_decoder_width": 0}),
        r"`model.mask_decoder_width` must be a positive integer, got 0",
    ),
    "mask decoder heads 0": Bad(
        "sft",
        _segmentation({"train_mask_decoder": True, "lora": False, "mask_decoder_heads": 0}),
        r"`model.mask_decoder_heads` must be a positive integer, got 0",
    ),
    "float for the decoder depth": Bad(
        "sft",
        _segmentation({"train_mask_decoder": True, "lora": False, "mask_decoder_depth": 1.5}),
        r"`model.mask_decoder_depth` must be an integer or null, got 1.5",
    ),
    "decoder width that its heads do not divide": Bad(
        "sft",
        _segmentation({"train_mask_decoder": True, "lora": False, "mask_decoder_width": 100}),
        r"`model.mask_decoder_width` \(100\) and `model.mask_decoder_heads` \(8\): `mask_decoder_width` must be a mult",
    ),
    "decoder sizes without train_mask_decoder": Bad(
        "sft",
        _update("model", mask_decoder_width=64),
        r"`model.mask_decoder_width` sizes the mask decoder that `model.train_mask_decoder: true` adds, and that is f",
    ),
    "decoder sizes other than the model's decoder": Bad(
        "sft",
        _edits(
            _mask_training(),
            _update("model", init_from=lambda inputs: inputs.setokim_mask_dir, mask_decoder_width=64),
        ),
        r"`model.mask_decoder_width` is 64, but `model.init_from` .*setokim-mask already has a mask decoder, of width 3",
    ),
    "negative mask loss weight": Bad(
        "sft",
        _segmentation({"train_mask_decoder": True, "lora": False, "mask_loss_weight": -1}),
        r"`model.mask_loss_weight` must be >= 0, got -1",
    ),
    "mask loss weight without segmentation data": Bad(
        "sft",
        _update("model", mask_loss_weight=2.0),
        r"`model.mask_loss_weight` weighs the mask loss of `data.segmentation` records, and this config has none",
    ),
    "refcoco without instances": Bad(
        "sft",
        _refcoco(image_folder="train2014"),
        r"`data.segmentation.format` `refcoco` needs `data.segmentation.instances`: the COCO instances.json",
    ),
    "refcoco without an image folder": Bad(
        "sft",
        _refcoco(instances="instances.json"),
        r"`data.segmentation.format` `refcoco` needs `data.segmentation.image_folder`",
    ),
    "instances of a segmentation JSONL": Bad(
        "sft",
        _mask_training(instances="instances.json"),
        r"`data.segmentation.instances` applies to the `refcoco` format only; `data.segmentation.format` is `jsonl`",
    ),
    "split of a segmentation JSONL": Bad(
        "sft",
        _mask_training(split="val"),
        r"`data.segmentation.split` applies to the `refcoco` and `hub` formats only; .*is `jsonl`, which ignores it",
    ),
    "data_files of RefCOCO": Bad(
        "sft",
        _refcoco(instances="instances.json", image_folder="train2014", data_files="*.parquet"),
        r"`data.segmentation.data_files` applies to the `hub` format only; `data.segmentation.format` is `refcoco`",
    ),
    "image_folder of a hub segmentation set": Bad(
        "sft",
        _mask_training(format="hub", path="owner/refcoco", image_folder="images"),
        r"`data.segmentation.image_folder` applies to the `jsonl` and `refcoco` formats only",
    ),
    "segmentation prompt without the expression": Bad(
        "sft",
        _mask_training(prompt="Segment it."),
        r"`data.segmentation.prompt` 'Segment it.' does not hold `\{expression\}`, where each referring expression",
    ),
    "segmentation prompt with another field": Bad(
        "sft",
        _mask_training(prompt="Segment {}."),
        r"`data.segmentation.prompt` 'Segment \{\}.' does not hold `\{expression\}`",
    ),
    "streaming with segmentation data": Bad(
        "sft",
        _edits(_mask_training(), _update("data", streaming=True)),
        r"`data.streaming` with `data.segmentation`: referring-segmentation records are not streamed yet",
    ),
    "conversation keys without data.path": Bad(
        "sft",
        _edits(_mask_training(), _drop("data", "path"), _update("data", image_folder="images")),
        r"`data.image_folder` applies to the records of `data.path`, which is not set",
    ),
    "missing segmentation file": Bad(
        "sft",
        _mask_training(path=lambda inputs: inputs.tmp_path / "nothing.jsonl"),
        r"`data.segmentation.path`: no such file: .*nothing.jsonl",
        FileNotFoundError,
    ),
    "missing segmentation image folder": Bad(
        "sft",
        _mask_training(image_folder=lambda inputs: inputs.tmp_path / "nowhere"),
        r"`data.segmentation.image_folder`: no such folder: .*nowhere",
        FileNotFoundError,
    ),
    "missing RefCOCO instances": Bad(
        "sft",
        _edits(
            _refcoco(instances=lambda inputs: inputs.tmp_path / "instances.json", image_folder="train2014"),
            _update("data", "segmentation", path=lambda inputs: inputs.segmentation_jsonl),
        ),
        r"`data.segmentation.instances`: no such file: .*instances.json",
        FileNotFoundError,
    ),
    "missing hub segmentation folder": Bad(
        "sft",
        _mask_training(format="hub", path=lambda inputs: inputs.tmp_path / "not-saved"),
        r"`data.segmentation.path`: no such dataset folder: .*not-saved",
        FileNotFoundError,
    ),
    # ... and what only reading the records finds
    "a segmentation record without a mask": Bad(
        "sft",
        _edits(_mask_training(), _segmentation_file('{"image": "horse.png", "expression": "the horse"}\n')),
        r"`data.segmentation.path` \(.*odd.jsonl\): .*odd.jsonl, line 1: missing mask",
        at_load=False,
    ),
}


def _tree(folder: Path) -> dict | None:
    """Every file and folder under `folder` with its modification time; None when there is no such folder."""
    if not folder.exists():
        return None
    return {str(path.relative_to(folder)): path.stat().st_mtime_ns for path in folder.rglob("*")}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_named_before_anything_is_built(case, request, no_training):
    bad = BAD_INPUTS[case]
    inputs = Inputs(request)
    config = GOOD_CONFIGS[bad.stage](inputs)
    if bad.edit is not None:
        bad.edit(config, inputs)
    if bad.before is not None:
        bad.before(config, inputs)
    output_dir = Path(config.get("output_dir", inputs.tmp_path / "no-output-dir"))
    before = _tree(output_dir)
    path = write_config(inputs.tmp_path / "bad.yaml", config)
    if bad.at_load:
        with pytest.raises(bad.error, match=bad.message):
            load_config(path, bad.stage)
    args = bad.args(inputs) if callable(bad.args) else bad.args
    with pytest.raises(SystemExit, match=bad.message):  # the CLI prints the same message and exits non-zero
        train(bad.stage, path, *args)
    assert _tree(output_dir) == before  # nothing written, replaced or removed


def test_the_good_configs_of_the_bad_input_matrix_load(request):
    """Each row's error is its edit's: without it the stage's config loads."""
    inputs = Inputs(request)
    for stage, good in GOOD_CONFIGS.items():
        load_config(write_config(inputs.tmp_path / f"{stage}.yaml", good(inputs)), stage)


# --------------------------------------------------------------------------------------------------------------------
# Inputs that look odd but are meant


def test_bad_yaml_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="No such config file"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "twice.yaml").write_text("stage: tokenizer\nstage: sft\n")
    with pytest.raises(ConfigError, match=r"Key `stage` appears twice .*line 2"):
        load_config(tmp_path / "twice.yaml")
    (tmp_path / "list.yaml").write_text("- stage\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(tmp_path / "list.yaml")
    (tmp_path / "broken.yaml").write_text("stage: [tokenizer\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(tmp_path / "broken.yaml")


def test_numbers_as_people_write_them(tmp_path, image_text, concept_tokenizer):
    # YAML 1.1 reads `1e-3` as a string; an int is fine where a float is expected.
    config = tokenizer_config(tmp_path, image_text, concept_tokenizer)
    del config["training"]["learning_rate"]  # written below, as people do
    text = yaml.safe_dump(config, sort_keys=False) + "\n"
    text = text.replace("training:\n", "training:\n  learning_rate: 1e-3\n  warmup_steps: 1\n  weight_decay: 0\n")
    path = tmp_path / "ok.yaml"
    path.write_text(text)
    loaded = load_config(path, "tokenizer")
    assert loaded.training["learning_rate"] == 1e-3 and loaded.training["warmup_steps"] == 1
    assert loaded.training["save_strategy"] == "steps"  # the checkpointing default, under the file's keys


def test_values_the_trainer_documents_are_accepted(tmp_path, image_text, concept_tokenizer):
    """-1 is TrainingArguments' "not set" for max_steps; intervals below 1 are fractions of the run."""
    training = dict(max_steps=-1, num_train_epochs=0.5, save_steps=0.25, logging_steps=0.1, max_grad_norm=0)
    config = tokenizer_config(tmp_path, image_text, concept_tokenizer, **training, save_total_limit=None)
    loaded = load_config(write_config(tmp_path / "ok.yaml", config), "tokenizer")
    assert {key: loaded.training[key] for key in training} == training


def test_encoder_configs_take_the_keys_every_transformers_config_takes(tmp_path, image_text, concept_tokenizer):
    """Generic keys that transformers' config classes read themselves are no typo; a key of another encoder's config
    class is one. Square sizes may be written as [height, width]."""
    config = tokenizer_config(tmp_path, image_text, concept_tokenizer)
    vision = config["model"]["setok_config"]["vision_config"]
    vision.update(torch_dtype="float32", attn_implementation="eager", image_size=[32, 32], patch_size=[4, 4])
    config["model"]["setok_config"]["text_config"].update(num_labels=3, dtype="float32")
    load_config(write_config(tmp_path / "ok.yaml", config), "tokenizer")

    vision.update(model_type="clip_vision_model", vision_use_head=False)  # SigLIP's, not CLIP's
    with pytest.raises(
        ConfigError, match=r"`model.setok_config.vision_config.vision_use_head`: not a field of CLIPVis"
    ):
        load_config(write_config(tmp_path / "bad.yaml", config), "tokenizer")
    del vision["vision_use_head"]
    load_config(write_config(tmp_path / "ok.yaml", config), "tokenizer")


def test_gan_schedule_keys_of_earlier_releases_move_to_training(tmp_path, image_text, concept_tokenizer):
    """`disc_start`/`disc_weight` in `model.setok_config` and `model.discriminator_learning_rate`, as configs of
    earlier releases have them, load with a FutureWarning as the trainer's `training.*` keys."""
    config = tokenizer_config(tmp_path, image_text, concept_tokenizer)
    config["model"]["setok_config"].update(use_discriminator=True, disc_start=0, disc_weight=0.5)
    config["model"]["discriminator_learning_rate"] = 1e-4
    with pytest.warns(FutureWarning, match="moved to `training.disc_start`"):
        loaded = load_config(write_config(tmp_path / "gan.yaml", config), "tokenizer")
    assert "disc_start" not in loaded.model.setok_config
    assert (loaded.training["disc_start"], loaded.training["disc_weight"]) == (0, 0.5)
    assert loaded.training["discriminator_learning_rate"] == 1e-4
    assert build_training_arguments(loaded).disc_start == 0
    config["training"] = {**config.get("training", {}), "disc_start": 5}
    with pytest.raises(ConfigError, match=r"`model.setok_config.disc_start` \(0\) and `training.disc_start` \(5\)"):
        load_config(write_config(tmp_path / "gan.yaml", config), "tokenizer")
    config["training"]["disc_start"] = "soon"
    del config["model"]["setok_config"]["disc_start"]
    with pytest.raises(ConfigError, match=r"`training.disc_start` must be an integer"):
        load_config(write_config(tmp_path / "gan.yaml", config), "tokenizer")


def test_format_keys_at_their_default_are_harmless(tmp_path):
    """A key another format reads is refused only when it says something (`BAD_INPUTS`); its default is harmless."""
    for stage, data in [
        ("pretrain", {"format": "llava", "caption_prompt": "Describe the image.", "captioning": True}),
        ("pretrain", {"format": "hub", "text_to_image": False, "text_to_image_template": "Generate an image of {}"}),
        ("pretrain", {"format": "image_text", "split": "train", "image_column": "images"}),
        ("sft", {"format": "llava", "messages_column": "messages"}),
    ]:
        config = {"stage": stage, "output_dir": str(tmp_path / "run"), "model": {"init_from": "saved"}}
        config.update(data={"path": "train.json", **data}, training={"use_cpu": True})
        load_config(write_config(tmp_path / "ok.yaml", config), stage, check_paths=False)


def test_sft_training_max_length_null_is_the_default(tmp_path, llava, setokim_dir):
    config = sft_config(tmp_path, llava, setokim_dir, max_length=None)
    assert load_config(write_config(tmp_path / "sft.yaml", config), "sft").training["max_length"] is None


def test_a_saved_setokim_takes_a_head_for_the_detokenizer_of_setok(tmp_path, image_text, setokim_dir, setok_dir):
    """`init_from` a Setokim without a head: `setok` (the stage-1 SeTok) comes along to add one."""
    assert json.loads((setokim_dir / "config.json").read_text()).get("use_generation_head") is not True
    config = pretrain_config(tmp_path, image_text, setok_dir, setokim_dir)
    config["model"] = {"init_from": str(setokim_dir), "setok": str(setok_dir), "train_generation_head": True}
    config["data"] = {"path": str(image_text), "text_to_image": True}
    loaded = load_config(write_config(tmp_path / "pretrain.yaml", config), "pretrain")
    assert loaded.model.setok == str(setok_dir) and loaded.data.text_to_image


def test_a_checkpoint_config_json_is_read_once(tmp_path, image_text, setok_dir, monkeypatch):
    """`SavedModelConfig` reads a checkpoint's config.json once for all the checks of its section."""
    import builtins

    config = {
        "stage": "tokenizer",
        "output_dir": str(tmp_path / "run"),
        "model": {"init_from": str(setok_dir)},
        "data": {"path": str(image_text)},
        "training": CPU_TRAINING,
    }
    path = write_config(tmp_path / "c.yaml", config)
    opened = []
    real_open = builtins.open

    def counting_open(file, *args, **kwargs):
        opened.append(os.fspath(file) if isinstance(file, (str, os.PathLike)) else file)
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", counting_open)
    load_config(path, "tokenizer")
    assert opened.count(str(setok_dir / "config.json")) == 1


def test_the_config_package_keeps_the_old_import_paths():
    import importlib
    import sys

    import transformers_setok.training.config as config

    names = ["STAGES", "TRAINING_DEFAULTS", "ConfigError", "PretrainDataConfig", "PretrainModelConfig"]
    names += ["SFTDataConfig", "SFTModelConfig", "StageConfig", "TokenizerDataConfig", "TokenizerModelConfig"]
    names += ["build_training_arguments", "check_checkpoint_type", "has_concept_contrast", "load_config"]
    names += ["read_model_type", "EXPECTED_MODEL_TYPE", "SCHEMA", "merge", "read_yaml", "SavedModelConfig"]
    assert [name for name in names if not hasattr(config, name)] == []
    sys.modules.pop("transformers_setok.training.typed_yaml", None)
    with pytest.warns(FutureWarning, match="moved to `transformers_setok.training.config.typed_yaml`"):
        old = importlib.import_module("transformers_setok.training.typed_yaml")
    assert old.merge is config.merge and old.ConfigError is ConfigError


# --------------------------------------------------------------------------------------------------------------------
# Tiny runs through the CLI


def test_tokenizer_stage_survives_an_interruption(tmp_path, image_text, concept_tokenizer, monkeypatch):
    config = tokenizer_config(tmp_path, image_text, concept_tokenizer, max_steps=4, save_steps=2)
    path = write_config(tmp_path / "tokenizer.yaml", config)
    output_dir = Path(config["output_dir"])

    # Stop the run in the middle of step 3, after checkpoint-2, as a crash or a killed job would.
    step = SetokTrainer.training_step

    def crash_at_step_3(self, *args, **kwargs):
        if self.state.global_step == 2:
            raise KeyboardInterrupt
        return step(self, *args, **kwargs)

    monkeypatch.setattr(SetokTrainer, "training_step", crash_at_step_3)
    with pytest.raises(SystemExit) as interrupted:  # the CLI's exit status for Ctrl-C
        train("tokenizer", path)
    assert interrupted.value.code == 130
    monkeypatch.setattr(SetokTrainer, "training_step", step)
    assert [name for name in os.listdir(output_dir) if name.startswith("checkpoint")] == ["checkpoint-2"]
    # A checkpoint cut short while being written (no trainer state yet) is passed over.
    (output_dir / "checkpoint-3").mkdir()
    (output_dir / "checkpoint-3" / "model.safetensors").write_bytes(b"partial")

    train("tokenizer", path, "--resume", "auto")
    state = trainer_state(output_dir)
    assert state["global_step"] == 4
    logged_steps = [entry["step"] for entry in state["log_history"] if "loss" in entry]
    assert logged_steps == [1, 2, 3, 4]  # steps 1-2 from the checkpoint's history, 3-4 trained after the resume
    assert {"reconstruction_loss", "concept_loss"} <= set(state["log_history"][-2])

    final = output_dir / "final"
    model = SetokForImageReconstruction.from_pretrained(final)
    assert model.config.token_dim == TINY_SETOK_KWARGS["token_dim"] and model.concept_contrast is not None
    assert AutoImageProcessor.from_pretrained(final).size == {"height": 32, "width": 32}
    assert AutoTokenizer.from_pretrained(final).convert_tokens_to_ids("cat") == CONCEPT_WORDS.index("cat")

    # The saved SeTok continues training as `init_from`, finding its text tokenizer next to it.
    config = dict(config, output_dir=str(tmp_path / "again"), model={"init_from": str(final)})
    config["training"] = dict(config["training"], max_steps=1)
    train("tokenizer", write_config(tmp_path / "again.yaml", config))
    assert trainer_state(tmp_path / "again")["global_step"] == 1


def test_a_finished_run_is_replaced_only_with_overwrite(tmp_path, image_text, concept_tokenizer):
    config = tokenizer_config(tmp_path, image_text, concept_tokenizer, max_steps=1, save_strategy="no")
    path = write_config(tmp_path / "tokenizer.yaml", config)
    output_dir = Path(config["output_dir"])
    train("tokenizer", path)
    weights = output_dir / "final" / "model.safetensors"
    first = weights.stat().st_mtime_ns
    with pytest.raises(SystemExit, match=r"already holds a trained model .*pass `--overwrite`"):
        train("tokenizer", path)
    assert weights.stat().st_mtime_ns == first

    # A run with checkpoints, replaced by one without: none of the old run's checkpoints is left to `--resume auto`.
    config["training"].update(max_steps=2, save_strategy="steps", save_steps=1)
    train("tokenizer", write_config(path, config), "--overwrite")
    assert {"checkpoint-1", "checkpoint-2", "final"} <= set(os.listdir(output_dir))
    assert weights.stat().st_mtime_ns != first
    config["training"].update(max_steps=1, save_strategy="no")
    train("tokenizer", write_config(path, config), "--overwrite")
    assert not [name for name in os.listdir(output_dir) if name.startswith("checkpoint")]
    assert trainer_state(output_dir)["global_step"] == 1
    SetokForImageReconstruction.from_pretrained(output_dir / "final")


def test_pretrain_stage_assembles_trains_and_resumes(tmp_path, image_text, setok_dir, llm_dir):
    config = {
        "stage": "pretrain",
        "output_dir": str(tmp_path / "run-pretrain"),
        "model": {"setok": str(setok_dir), "language_model": str(llm_dir)},
        "data": {"format": "image_text", "path": str(image_text), "caption_prompt": "what is in the image ?"},
        "training": CPU_TRAINING,
    }
    train("pretrain", write_config(tmp_path / "pretrain.yaml", config))
    output_dir = Path(config["output_dir"])
    assert trainer_state(output_dir)["global_step"] == 2
    assert {"checkpoint-1", "checkpoint-2", "final"} <= set(os.listdir(output_dir))

    final = output_dir / "final"
    model = AutoModelForImageTextToText.from_pretrained(final)
    processor = AutoProcessor.from_pretrained(final)
    assert isinstance(model, SetokimForConditionalGeneration)
    assert model.get_input_embeddings().weight.shape[0] == len(processor.tokenizer)

    # Two more steps from the last checkpoint, on a longer schedule.
    config["training"] = dict(CPU_TRAINING, max_steps=4)
    train("pretrain", write_config(tmp_path / "pretrain.yaml", config), "--resume", "auto")
    state = trainer_state(output_dir)
    assert state["global_step"] == 4
    assert [entry["step"] for entry in state["log_history"] if "loss" in entry] == [1, 2, 3, 4]


def test_pretrain_stage_trains_a_new_generation_head(tmp_path, image_text, setok_dir, llm_dir):
    # Two steps of 4 cover the 8 chats: the 4 captioning ones and the 4 text-to-image ones.
    config = pretrain_config(tmp_path, image_text, setok_dir, llm_dir, per_device_train_batch_size=4)
    config["model"].update(train_generation_head=True, generation_head_width=32, generation_head_depth=1)
    config["data"].update(text_to_image=True, text_to_image_template="the image ? {}")
    path = write_config(tmp_path / "pretrain.yaml", config)

    records = runners._load_data(load_config(path, "pretrain").data, conversations=True)
    assert len(records) == 2 * len(CONCEPTS)
    captions = [f"a {concepts[0]}" for concepts in CONCEPTS.values()]
    assert [chat[0]["content"][0]["text"] for chat in records["messages"][len(CONCEPTS) :]] == [
        f"the image ? {caption}" for caption in captions
    ]
    assert all(chat[1]["content"][0]["type"] == "image" for chat in records["messages"][len(CONCEPTS) :])

    train("pretrain", path)
    output_dir = Path(config["output_dir"])
    state = trainer_state(output_dir)
    assert state["global_step"] == 2
    assert any("diffusion_loss" in entry for entry in state["log_history"])
    final = output_dir / "final"
    saved = json.loads((final / "config.json").read_text())
    assert saved["use_generation_head"] is True
    assert (saved["generation_head_width"], saved["generation_head_depth"]) == (32, 1)

    model = SetokimForConditionalGeneration.from_pretrained(final)
    assert model.generation_head is not None and model.image_decoder is not None
    # The detokenizer is stage 1's, copied and left as it was.
    detokenizer = SetokForImageReconstruction.from_pretrained(setok_dir).detokenizer.state_dict()
    assert all(torch.equal(weight, detokenizer[name]) for name, weight in model.image_decoder.state_dict().items())

    # The saved model has its head: it continues with `init_from` alone, no `setok` needed.
    config = dict(config, output_dir=str(tmp_path / "again"))
    config["model"] = {"init_from": str(final), "train_generation_head": True}
    config["training"] = dict(config["training"], max_steps=1)
    train("pretrain", write_config(tmp_path / "again.yaml", config))
    assert trainer_state(tmp_path / "again")["global_step"] == 1


def test_pretrain_stage_adds_a_head_to_a_saved_setokim(tmp_path, image_text, setokim_dir, setok_dir, monkeypatch):
    from transformers_setok.training import setokim_trainer

    config = {
        "stage": "pretrain",
        "output_dir": str(tmp_path / "run-pretrain"),
        "model": {
            "init_from": str(setokim_dir),
            "setok": str(setok_dir),
            "train_generation_head": True,
            "generation_head_width": 32,
            "generation_head_depth": 1,
            "condition_text_dropout": 0.25,
            "condition_both_dropout": 0.5,
        },
        "data": {"path": str(image_text), "captioning": False, "text_to_image": True},
        "training": dict(CPU_TRAINING, max_steps=1),
    }
    dropouts = []
    condition_dropout = setokim_trainer.SetokimInputsMixin._condition_dropout
    monkeypatch.setattr(
        setokim_trainer.SetokimInputsMixin,
        "_condition_dropout",
        lambda self: dropouts.append(condition_dropout(self)) or dropouts[-1],
    )
    train("pretrain", write_config(tmp_path / "pretrain.yaml", config))
    assert {(d.text, d.image, d.both) for d in dropouts} == {(0.25, 0.0, 0.5)}  # the YAML keys reach the trainer
    state = trainer_state(config["output_dir"])
    assert state["global_step"] == 1 and "diffusion_loss" in state["log_history"][0]
    model = SetokimForConditionalGeneration.from_pretrained(Path(config["output_dir"]) / "final")
    assert model.config.use_generation_head and model.generation_head is not None


def test_sft_stage_streams_its_data_and_resumes_from_the_stream_state(tmp_path, llava, setokim_dir):
    """`data.streaming: true`: the records come from a `datasets.IterableDataset`; a resumed run continues from the
    stream's saved position (no consumed batch is collated again) and ends where the uninterrupted run ends."""
    from transformers_setok.training.streaming import STREAM_STATE_FILE

    def config(name, steps):
        return {
            "stage": "sft",
            "output_dir": str(tmp_path / name),
            "model": {"init_from": str(setokim_dir), "lora": False},
            "data": {"format": "llava", "path": str(llava), "streaming": True},
            "training": dict(CPU_TRAINING, bf16=False, max_steps=steps),
        }

    train("sft", write_config(tmp_path / "straight.yaml", config("straight", 3)))
    assert trainer_state(tmp_path / "straight")["global_step"] == 3
    assert any(
        path.name.startswith(STREAM_STATE_FILE.split("{")[0])
        for path in (tmp_path / "straight" / "checkpoint-1").iterdir()
    )
    train("sft", write_config(tmp_path / "first.yaml", config("resumed", 1)))
    train(
        "sft",
        write_config(tmp_path / "second.yaml", config("resumed", 3)),
        "--resume",
        str(tmp_path / "resumed" / "checkpoint-1"),
    )
    final = {
        name: SetokimForConditionalGeneration.from_pretrained(tmp_path / name / "final").state_dict()
        for name in ("straight", "resumed")
    }
    assert all(torch.equal(final["straight"][key], final["resumed"][key]) for key in final["straight"])


def test_sft_stage_with_lora_and_merged_adapters(tmp_path, llava, setokim_dir):
    config = {
        "stage": "sft",
        "output_dir": str(tmp_path / "run-sft"),
        "model": {"init_from": str(setokim_dir), "lora": {"r": 4, "lora_alpha": 8}, "merge_adapters": True},
        "data": {"format": "llava", "path": str(llava)},
        "training": dict(CPU_TRAINING, bf16=False),
    }
    train("sft", write_config(tmp_path / "sft.yaml", config))
    output_dir = Path(config["output_dir"])
    assert trainer_state(output_dir)["global_step"] == 2
    adapter = json.loads((output_dir / "final" / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and adapter["lora_alpha"] == 8
    assert AutoProcessor.from_pretrained(output_dir / "final").image_token_id == tiny_processor().image_token_id

    merged = SetokimForConditionalGeneration.from_pretrained(output_dir / "merged")
    base = SetokimForConditionalGeneration.from_pretrained(setokim_dir)
    changed = [
        name for name, weight in merged.state_dict().items() if not torch.equal(weight, base.state_dict()[name])
    ]
    assert any(".q_proj." in name for name in changed)  # the LoRA delta folded into the LLM
    assert not any("vision_tower" in name for name in changed)  # SeTok untouched
    AutoProcessor.from_pretrained(output_dir / "merged")

    # The LoRA checkpoints (adapter only, no config.json) resume too.
    config["training"] = dict(config["training"], max_steps=3)
    train("sft", write_config(tmp_path / "sft.yaml", config), "--resume", "auto")
    state = trainer_state(output_dir)
    assert state["global_step"] == 3
    assert [entry["step"] for entry in state["log_history"] if "loss" in entry] == [1, 2, 3]


# --------------------------------------------------------------------------------------------------------------------
# The example configs


@pytest.mark.parametrize(
    "name, stage",
    [("tokenizer", "tokenizer"), ("pretrain", "pretrain"), ("sft", "sft"), ("sft_segmentation", "sft")],
)
def test_example_configs_are_valid(name, stage):
    # The data and checkpoints they name are placeholders; everything else is checked. bf16 needs `use_cpu` here.
    config = load_config(
        REPO / "configs" / f"{name}.yaml", stage, check_paths=False, overrides={"training": {"use_cpu": True}}
    )
    assert config.training["learning_rate"] == 1e-3 and config.training["lr_scheduler_type"] == "cosine"
    assert config.training["warmup_steps"] == 0.03


@pytest.mark.parametrize("name", ["ddp", "deepspeed_zero2", "deepspeed_zero3", "fsdp"])
def test_accelerate_configs_parse_with_accelerate(name):
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
    from accelerate.commands.launch import launch_command_parser
    from accelerate.utils import DistributedType

    path = REPO / "configs" / "accelerate" / f"{name}.yaml"
    config = load_config_from_file(str(path))
    assert isinstance(config, ClusterConfig)
    expected = {"ddp": "MULTI_GPU", "fsdp": "FSDP"}.get(name, "DEEPSPEED")
    assert config.distributed_type == DistributedType(expected)
    # `accelerate launch` copies each nested key onto the argument of that name (fsdp_config.x -> --fsdp_x); a key
    # that names no argument would be ignored silently.
    arguments = {action.dest for action in launch_command_parser()._actions}
    nested = list(config.deepspeed_config) + [
        key if key.startswith("fsdp") else f"fsdp_{key}" for key in config.fsdp_config
    ]
    assert [key for key in nested if key not in arguments] == []
    assert bool(nested) == (name != "ddp")


def test_hub_format_reads_a_saved_dataset_folder(tmp_path, llava, setokim_dir):
    from datasets import load_from_disk

    from transformers_setok.training.data import load_llava_json

    load_llava_json(llava).save_to_disk(tmp_path / "saved")
    config = {
        "stage": "sft",
        "output_dir": str(tmp_path / "run-sft"),
        "model": {"init_from": str(setokim_dir)},
        "data": {"format": "hub", "path": str(tmp_path / "saved")},
        "training": {"use_cpu": True},
    }
    loaded = load_config(write_config(tmp_path / "hub.yaml", config), "sft")
    records = runners._load_data(loaded.data, conversations=True)
    assert len(records) == len(load_from_disk(tmp_path / "saved")) == 4


@pytest.mark.slow
def test_accelerate_launch_with_the_ddp_config(tmp_path, image_text, concept_tokenizer):
    """The README's launch line, on two CPU processes (gloo): `accelerate launch --config_file
    configs/accelerate/ddp.yaml -m transformers_setok.cli train ...`."""
    import subprocess
    import sys

    config = tokenizer_config(tmp_path, image_text, concept_tokenizer, save_steps=2)
    path = write_config(tmp_path / "tokenizer.yaml", config)
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        ACCELERATE_USE_CPU="true",  # the config's MULTI_GPU launcher (torchrun), with the processes on the CPU
        HF_HOME=str(tmp_path / "hf_home"),  # no user `accelerate config` file can change the launch
    )
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file"]
    command += [str(REPO / "configs" / "accelerate" / "ddp.yaml"), "--num_processes", "2", "--main_process_port", "0"]
    command += ["-m", "transformers_setok.cli", "train", "tokenizer", "--config", str(path)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.count("Trained to step 2") == 1  # the main process reports
    # Two steps of 2 x 2 records are two passes over the 4 records: both processes trained.
    assert trainer_state(config["output_dir"])["epoch"] == 2.0
    SetokForImageReconstruction.from_pretrained(Path(config["output_dir"]) / "final")

    # A bad input stops every process with one message.
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and result.stderr.count("already holds checkpoints") == 1


@pytest.mark.slow
def test_a_fresh_tokenizer_trains_under_the_deepspeed_zero3_config(tmp_path, image_text, concept_tokenizer):
    """`setok train tokenizer` with the shipped ZeRO-3 config on two CPU processes: a fresh SeTok is built before the
    training arguments, whose ZeRO-3 config would otherwise build it already sharded (its initialisation then fails:
    "Fan in and fan out can not be computed"), and its checkpoint is gathered into one loadable model."""
    from conftest import accelerate_launch

    config = tokenizer_config(tmp_path, image_text, concept_tokenizer, save_steps=2)
    path = write_config(tmp_path / "tokenizer.yaml", config)
    result = accelerate_launch(
        "-m",
        ["transformers_setok.cli", "train", "tokenizer", "--config", str(path)],
        tmp_path,
        config="deepspeed_zero3.yaml",
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.count("Trained to step 2") == 1
    assert trainer_state(config["output_dir"])["epoch"] == 2.0
    SetokForImageReconstruction.from_pretrained(Path(config["output_dir"]) / "final")
