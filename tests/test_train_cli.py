"""`setok train`: configs checked before anything heavy (each bad input named), tiny CPU runs of the three stages
through the CLI, periodic checkpoints and `--resume auto` after an interruption, and the example configs."""

import copy
import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY_SETOK_KWARGS, TINY_TEXT_CONFIG, TINY_VISION_KWARGS, tiny_config
from PIL import Image
from test_setok_trainer import WORDS as CONCEPT_WORDS
from test_setok_trainer import text_tokenizer
from test_setokim_processor import tiny_processor, tiny_setokim, word_tokenizer
from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer, Trainer

from transformers_setok import (
    SetokForImageReconstruction,
    SetokImageProcessor,
    SetokimForConditionalGeneration,
    SetokModel,
    cli,
)
from transformers_setok.training import runners
from transformers_setok.training.config import ConfigError, load_config
from transformers_setok.training.setok_trainer import SetokTrainer

REPO = Path(__file__).resolve().parents[1]
CONCEPTS = {"astronaut": ["man", "rocket"], "chelsea": ["cat"], "coffee": ["cup"], "rocket": ["rocket"]}
# Two steps of batch 2 on the CPU, a checkpoint after each.
CPU_TRAINING = dict(
    max_steps=2,
    per_device_train_batch_size=2,
    save_steps=1,
    logging_steps=1,
    use_cpu=True,
    dataloader_pin_memory=False,
    seed=0,
    disable_tqdm=True,
)
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
def setok_dir(tmp_path) -> Path:
    """A saved tiny SetokForImageReconstruction (stage 1's output) with its image processor."""
    SetokForImageReconstruction(tiny_config()).save_pretrained(tmp_path / "setok")
    SetokImageProcessor(size=32).save_pretrained(tmp_path / "setok")
    return tmp_path / "setok"


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
    for name in ("build_tokenizer_model", "build_pretrain_model"):
        monkeypatch.setattr(runners, name, refuse)


# --------------------------------------------------------------------------------------------------------------------
# Bad input: a clear error, before any model is built


def _drop(section, key):
    def edit(config):
        del config[section][key]

    return edit


def _set(section, key, value):
    def edit(config):
        if section is None:
            config[key] = value
        else:
            config[section][key] = value

    return edit


BAD_CONFIGS = {
    "unknown top-level key": (_set(None, "trainer", {}), r"Unknown key `trainer`; the keys of the top level are: "),
    "unknown model key": (_set("model", "vision_modle", "x"), r"Unknown key `model.vision_modle`; .*vision_model"),
    "unknown data key": (_set("data", "pth", "x"), r"Unknown key `data.pth`; the keys of `data` are: path, format"),
    "unknown setok_config key": (
        lambda config: config["model"]["setok_config"].update(token_dims=4),
        r"Unknown key `model.setok_config.token_dims`",
    ),
    "invalid setok_config value": (
        lambda config: config["model"]["setok_config"].update(token_dim=0),
        r"`model.setok_config`: `token_dim` must be a positive integer",
    ),
    "unknown training key": (
        _set("training", "learning_rat", 0.1),
        r"Unknown key `training.learning_rat`: not a field of TrainingArguments.*Did you mean `learning_rate`",
    ),
    "string for a float": (
        _set("training", "learning_rate", "fast"),
        r"`training.learning_rate` must be a number, got 'fast' \(str\)",
    ),
    "bool for an int": (
        _set("training", "max_steps", True),
        r"`training.max_steps` must be an integer, got True \(bool\)",
    ),
    "string for a bool": (
        _set("data", "verify_images", "yes"),
        r"`data.verify_images` must be true or false, got 'yes'",
    ),
    "value outside a Literal": (
        _set("data", "on_error", "ignore"),
        r"`data.on_error` must be one of 'fail', 'skip', got 'ignore'",
    ),
    "list for an optional string": (
        _set("model", "vision_model", ["a", "b"]),
        r"`model.vision_model` must be a string or null, got \['a', 'b'\] \(list\)",
    ),
    "invalid TrainingArguments value": (
        _set("training", "save_strategy", "sometimes"),
        r"`training.save_strategy`: sometimes is not a valid SaveStrategy",
    ),
    "contradictory TrainingArguments": (
        _set("training", "load_best_model_at_end", True),
        r"`training.load_best_model_at_end`: --load_best_model_at_end requires the save and eval strategy to match",
    ),
    "output_dir under training": (_set("training", "output_dir", "x"), r"set the top-level `output_dir`"),
    "missing required key": (_drop("data", "path"), r"Missing required key `data.path`"),
    "missing section": (lambda config: config.pop("data"), r"Missing required key `data`"),
    "stage of another command": (
        _set(None, "stage", "pretrain"),
        r"`stage` is 'pretrain' but the command trains 'tokenizer'",
    ),
    "no model source": (
        lambda config: config.update(model={}),
        r"`model` needs `init_from` .* or `setok_config` and/or `vision_model`",
    ),
    "concept template without a field": (
        _set("data", "concept_template", "a photo"),
        r"`data.concept_template` 'a photo' does not use the concept",
    ),
    "concept template with a named field": (
        _set("data", "concept_template", "a photo of a {concept}"),
        r"`data.concept_template` 'a photo of a \{concept\}' cannot be filled with a concept \(KeyError",
    ),
    "concept template with two fields": (
        _set("data", "concept_template", "{} and {}"),
        r"`data.concept_template` '\{\} and \{\}' cannot be filled with a concept \(IndexError",
    ),
    "concept contrast without a tokenizer": (
        _drop("model", "text_tokenizer"),
        r"needs a tokenizer for its text encoder: set `model.text_tokenizer`",
    ),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_config_is_named_before_anything_is_built(case, tmp_path, image_text, concept_tokenizer, no_training):
    edit, message = BAD_CONFIGS[case]
    config = tokenizer_config(tmp_path, image_text, concept_tokenizer)
    edit(config)
    path = write_config(tmp_path / "bad.yaml", config)
    with pytest.raises(ConfigError, match=message):
        load_config(path, "tokenizer")
    with pytest.raises(SystemExit, match=message):  # the CLI prints the same message and exits non-zero
        train("tokenizer", path)
    assert not (tmp_path / "run-tokenizer").exists()


def _head(**keys):
    """Sets `keys` in `model`, with the generation head trained."""

    def edit(config):
        config["model"].update(train_generation_head=True, **keys)

    return edit


def _text_to_image(**keys):
    """Sets `keys` in `data`, with text-to-image chats and the generation head trained."""

    def edit(config):
        config["model"]["train_generation_head"] = True
        config["data"].update({"text_to_image": True, **keys})

    return edit


BAD_PRETRAIN_CONFIGS = {
    "string for train_generation_head": (
        _set("model", "train_generation_head", "yes"),
        r"`model.train_generation_head` must be true or false, got 'yes'",
    ),
    "head width 0": (_head(generation_head_width=0), r"`model.generation_head_width` must be at least 1, got 0\."),
    "head depth 0": (_head(generation_head_depth=0), r"`model.generation_head_depth` must be at least 1, got 0\."),
    "float for the head width": (
        _head(generation_head_width=1.5),
        r"`model.generation_head_width` must be an integer, got 1.5",
    ),
    "no noise draws": (_head(diffusion_noise_repeats=0), r"`model.diffusion_noise_repeats` must be at least 1, got 0"),
    "mask ratio above 1": (
        _head(generation_mask_ratio_min=1.5),
        r"`model.generation_mask_ratio_min` must lie in \[0, 1\], got 1.5",
    ),
    "negative mask ratio": (
        _head(generation_mask_ratio_min=-0.1),
        r"`model.generation_mask_ratio_min` must lie in \[0, 1\], got -0.1",
    ),
    "negative diffusion weight": (
        _head(diffusion_loss_weight=-1),
        r"`model.diffusion_loss_weight` must be >= 0, got -1",
    ),
    # Checked even when the head is not trained: a value nothing reads is still a mistake worth naming.
    "head width 0 without the head": (
        _set("model", "generation_head_width", 0),
        r"`model.generation_head_width` must be at least 1",
    ),
    "string for text_to_image": (
        _set("data", "text_to_image", "yes"),
        r"`data.text_to_image` must be true or false, got 'yes'",
    ),
    "nothing to train on": (
        _set("data", "captioning", False),
        r"`data.captioning` and `data.text_to_image` are both false: nothing would be trained",
    ),
    "nothing to train on, head or not": (
        _text_to_image(captioning=False, text_to_image=False),
        r"`data.captioning` and `data.text_to_image` are both false",
    ),
    "text to image without the head": (
        _set("data", "text_to_image", True),
        r"`data.text_to_image` trains the generation head: set `model.train_generation_head: true`",
    ),
    "text-to-image template without a field": (
        _text_to_image(text_to_image_template="Draw it."),
        r"`data.text_to_image_template` 'Draw it.' does not use the caption, .*as in 'Draw \{\}.'",
    ),
    "text-to-image template with a named field": (
        _text_to_image(text_to_image_template="Draw {caption}."),
        r"`data.text_to_image_template` 'Draw \{caption\}.' cannot be filled with a caption \(KeyError",
    ),
    "text-to-image template with two fields": (
        _text_to_image(text_to_image_template="{} and {}"),
        r"`data.text_to_image_template` '\{\} and \{\}' cannot be filled with a caption \(IndexError",
    ),
}


@pytest.mark.parametrize("case", list(BAD_PRETRAIN_CONFIGS))
def test_bad_pretrain_config_is_named_before_anything_is_built(
    case, tmp_path, image_text, setok_dir, llm_dir, no_training
):
    edit, message = BAD_PRETRAIN_CONFIGS[case]
    config = pretrain_config(tmp_path, image_text, setok_dir, llm_dir)
    edit(config)
    path = write_config(tmp_path / "bad.yaml", config)
    with pytest.raises(ConfigError, match=message):
        load_config(path, "pretrain")
    with pytest.raises(SystemExit, match=message):
        train("pretrain", path)
    assert not (tmp_path / "run-pretrain").exists()


def test_generation_head_sources_of_a_saved_setokim(tmp_path, image_text, setokim_dir, setok_dir, no_training):
    """`init_from` a Setokim without a head: `setok` (the stage-1 SeTok) must come along to add one, and only then."""
    config = {
        "stage": "pretrain",
        "output_dir": str(tmp_path / "run-pretrain"),
        "model": {"init_from": str(setokim_dir), "train_generation_head": True},
        "data": {"path": str(image_text), "text_to_image": True},
        "training": CPU_TRAINING,
    }
    assert json.loads((setokim_dir / "config.json").read_text()).get("use_generation_head") is not True

    def attempt(error, message):
        path = write_config(tmp_path / "pretrain.yaml", config)
        with pytest.raises(error, match=message):
            load_config(path, "pretrain")
        with pytest.raises(SystemExit, match=message):
            train("pretrain", path)

    attempt(ConfigError, r"`model.init_from` .*setokim has no generation head: set `model.setok`")
    config["model"]["setok"] = str(setokim_dir)
    attempt(ConfigError, r"`model.setok`: .*setokim holds a model of type 'setokim', but this stage needs a 'setok'")
    config["model"]["setok"] = str(tmp_path / "no-setok")
    attempt(FileNotFoundError, r"`model.setok`: no such folder: .*no-setok")
    config["model"]["setok"] = str(setok_dir)
    loaded = load_config(write_config(tmp_path / "pretrain.yaml", config), "pretrain")
    assert loaded.model.setok == str(setok_dir) and loaded.data.text_to_image

    # Without the head to add, `setok` has nothing to do next to `init_from`.
    config["model"] = {"init_from": str(setokim_dir), "setok": str(setok_dir)}
    config["data"] = {"path": str(image_text)}
    attempt(ConfigError, r"`model.init_from` continues a saved Setokim: drop `model.setok`")
    config["model"] = {"init_from": str(setokim_dir), "train_generation_head": True, "language_model": "some/llm"}
    attempt(ConfigError, r"`model.init_from` continues a saved Setokim: drop `model.language_model`")


def test_generation_head_needs_a_setok_with_its_detokenizer(
    tmp_path, image_text, setokim_dir, setok_dir, llm_dir, no_training
):
    bare = tmp_path / "bare-setok"
    SetokModel(tiny_config()).save_pretrained(bare)
    message = r"`model.setok`: .*bare-setok holds a SetokModel, but this stage needs a SetokForImageReconstruction"
    headless = {"init_from": str(setokim_dir), "setok": str(bare), "train_generation_head": True}
    assembled = {"setok": str(bare), "language_model": str(llm_dir), "train_generation_head": True}
    for model in (headless, assembled):
        config = pretrain_config(tmp_path, image_text, setok_dir, llm_dir)
        config["model"] = model
        config["data"]["text_to_image"] = True
        path = write_config(tmp_path / "bad.yaml", config)
        with pytest.raises(ConfigError, match=message):
            load_config(path, "pretrain")
        with pytest.raises(SystemExit, match=message):
            train("pretrain", path)


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
    text = yaml.safe_dump(config, sort_keys=False) + "\n"
    text = text.replace("training:\n", "training:\n  learning_rate: 1e-3\n  warmup_steps: 1\n  weight_decay: 0\n")
    path = tmp_path / "ok.yaml"
    path.write_text(text)
    loaded = load_config(path, "tokenizer")
    assert loaded.training["learning_rate"] == 1e-3 and loaded.training["warmup_steps"] == 1
    assert loaded.training["save_strategy"] == "steps"  # the checkpointing default, under the file's keys


def test_missing_paths_and_wrong_checkpoints(
    tmp_path, image_text, concept_tokenizer, setokim_dir, setok_dir, no_training
):
    def attempt(stage, config, error, message):
        path = write_config(tmp_path / f"{stage}.yaml", config)
        with pytest.raises(error, match=message):
            load_config(path, stage)
        with pytest.raises(SystemExit, match=message):
            train(stage, path)

    config = tokenizer_config(tmp_path, image_text, concept_tokenizer)
    config["data"]["path"] = str(tmp_path / "missing.jsonl")
    attempt("tokenizer", config, FileNotFoundError, r"`data.path`: no such file: .*missing.jsonl")

    config = tokenizer_config(tmp_path, image_text, concept_tokenizer)
    config["data"]["image_folder"] = str(tmp_path / "nowhere")
    attempt("tokenizer", config, FileNotFoundError, r"`data.image_folder`: no such folder")

    config = tokenizer_config(tmp_path, image_text, concept_tokenizer)
    config["model"] = {"init_from": str(setokim_dir)}
    attempt(
        "tokenizer",
        config,
        ConfigError,
        r"`model.init_from`: .*setokim holds a model of type 'setokim', but "
        r"this stage needs a 'setok' model",
    )

    config["model"] = {"init_from": str(tmp_path / "pairs")}
    attempt("tokenizer", config, FileNotFoundError, r"`model.init_from`: .* holds no config.json")

    pretrain = {
        "stage": "pretrain",
        "output_dir": str(tmp_path / "run-pretrain"),
        "model": {"init_from": str(setok_dir)},
        "data": {"path": str(image_text)},
        "training": CPU_TRAINING,
    }
    attempt("pretrain", pretrain, ConfigError, r"holds a model of type 'setok', but this stage needs a 'setokim'")
    pretrain["model"] = {"setok": str(setokim_dir), "language_model": "some/llm"}
    attempt("pretrain", pretrain, ConfigError, r"`model.setok`: .* type 'setokim', but this stage needs a 'setok'")
    pretrain["model"] = {"setok": str(setok_dir), "language_model": str(tmp_path / "no-llm")}
    attempt("pretrain", pretrain, FileNotFoundError, r"`model.language_model`: no such folder")


def test_empty_or_unusable_data_stops_before_the_model_is_built(tmp_path, image_text, concept_tokenizer, no_training):
    config = tokenizer_config(tmp_path, image_text, concept_tokenizer)
    empty = tmp_path / "pairs" / "empty.jsonl"
    empty.write_text("\n")
    config["data"]["path"] = str(empty)
    path = write_config(tmp_path / "empty.yaml", config)
    with pytest.raises(SystemExit, match=r"`data.path` \(.*empty.jsonl\): .*empty.jsonl holds no records"):
        train("tokenizer", path)

    broken = tmp_path / "pairs" / "broken.jsonl"
    broken.write_text('{"image": "missing.png", "caption": "a cat"}\n')
    config["data"]["path"] = str(broken)
    path = write_config(tmp_path / "broken.yaml", config)
    with pytest.raises(SystemExit, match=r"line 1: missing image file"):
        train("tokenizer", path)

    # Captions only, but the contrast is asked to match concepts: refused up front, not at the first batch.
    captions = tmp_path / "pairs" / "captions.jsonl"
    captions.write_text('{"image": "chelsea.png", "caption": "a cat"}\n')
    config["data"]["path"] = str(captions)
    path = write_config(tmp_path / "captions.yaml", config)
    with pytest.raises(SystemExit, match=r"`data.text_source` is 'concepts', but 1 of 1 records .* use `data.text_"):
        train("tokenizer", path)
    assert not (tmp_path / "run-tokenizer").exists()


def test_resume_needs_a_checkpoint_of_this_stage(tmp_path, image_text, concept_tokenizer, setokim_dir, no_training):
    path = write_config(tmp_path / "c.yaml", tokenizer_config(tmp_path, image_text, concept_tokenizer))
    with pytest.raises(SystemExit, match=r"--resume auto: no complete checkpoint-N folder in `output_dir`"):
        train("tokenizer", path, "--resume", "auto")
    with pytest.raises(SystemExit, match=r"--resume: no such checkpoint folder"):
        train("tokenizer", path, "--resume", str(tmp_path / "checkpoint-9"))
    fake = tmp_path / "run-tokenizer" / "checkpoint-4"
    fake.mkdir(parents=True)
    (fake / "config.json").write_text((setokim_dir / "config.json").read_text())
    (fake / "trainer_state.json").write_text("{}")
    with pytest.raises(SystemExit, match=r"`--resume`: .*checkpoint-4 holds a model of type 'setokim', but this"):
        train("tokenizer", path, "--resume", "auto")
    # A fresh run would overwrite that run's checkpoints.
    with pytest.raises(SystemExit, match=r"already holds checkpoints .*pass `--resume auto`"):
        train("tokenizer", path)


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
    with pytest.raises(KeyboardInterrupt):
        train("tokenizer", path)
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


def test_pretrain_stage_adds_a_head_to_a_saved_setokim(tmp_path, image_text, setokim_dir, setok_dir):
    config = {
        "stage": "pretrain",
        "output_dir": str(tmp_path / "run-pretrain"),
        "model": {
            "init_from": str(setokim_dir),
            "setok": str(setok_dir),
            "train_generation_head": True,
            "generation_head_width": 32,
            "generation_head_depth": 1,
        },
        "data": {"path": str(image_text), "captioning": False, "text_to_image": True},
        "training": dict(CPU_TRAINING, max_steps=1),
    }
    train("pretrain", write_config(tmp_path / "pretrain.yaml", config))
    state = trainer_state(config["output_dir"])
    assert state["global_step"] == 1 and "diffusion_loss" in state["log_history"][0]
    model = SetokimForConditionalGeneration.from_pretrained(Path(config["output_dir"]) / "final")
    assert model.config.use_generation_head and model.generation_head is not None


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


def test_sft_config_errors(tmp_path, llava, setokim_dir, no_training):
    config = {
        "stage": "sft",
        "output_dir": str(tmp_path / "run-sft"),
        "model": {"init_from": str(setokim_dir), "lora": False, "qlora": True},
        "data": {"format": "llava", "path": str(llava)},
        "training": {"use_cpu": True},
    }
    path = write_config(tmp_path / "sft.yaml", config)
    with pytest.raises(ConfigError, match=r"`model.qlora` needs LoRA adapters"):
        load_config(path, "sft")
    config["model"] = {"init_from": str(setokim_dir), "lora": {"rank": 4}}
    with pytest.raises(ConfigError, match=r"`model.lora` \(LoraConfig overrides\):.*rank"):
        load_config(write_config(path, config), "sft")
    config["model"] = {"init_from": str(setokim_dir)}
    config["training"] = {"use_cpu": True, "packing": True}
    with pytest.raises(ConfigError, match=r"`training.packing`: SetokimSFTTrainer needs `SFTConfig\(packing=False\)`"):
        load_config(write_config(path, config), "sft")
    for max_length in (512, 1024):  # 1024, TRL's default, too: written in the file, it is meant, not a default
        config["training"] = {"use_cpu": True, "max_length": max_length}
        with pytest.raises(ConfigError, match=rf"`training.max_length` \({max_length}\).*set `data.max_length`"):
            load_config(write_config(path, config), "sft")
    config["training"] = {"use_cpu": True, "max_length": None}
    assert load_config(write_config(path, config), "sft").training["max_length"] is None
    config["training"] = {"use_cpu": True, "max_seq_length": 512}
    with pytest.raises(ConfigError, match=r"Unknown key `training.max_seq_length`: not a field of SFTConfig"):
        load_config(write_config(path, config), "sft")


@pytest.mark.parametrize(
    "stage, data, key, used_by",
    [
        ("pretrain", {"format": "llava", "caption_prompt": "Caption it."}, "caption_prompt", "image_text"),
        ("pretrain", {"format": "hub", "caption_prompt": "Caption it."}, "caption_prompt", "image_text"),
        ("pretrain", {"format": "llava", "captioning": False}, "captioning", "image_text"),
        ("pretrain", {"format": "hub", "text_to_image": True}, "text_to_image", "image_text"),
        (
            "pretrain",
            {"format": "llava", "text_to_image_template": "Draw {}."},
            "text_to_image_template",
            "image_text",
        ),
        ("pretrain", {"format": "image_text", "split": "validation"}, "split", "hub"),
        ("sft", {"format": "llava", "image_column": "pictures"}, "image_column", "hub"),
        ("sft", {"format": "llava", "messages_column": "chat"}, "messages_column", "hub"),
    ],
)
def test_data_keys_another_format_would_ignore_are_refused(tmp_path, stage, data, key, used_by):
    model = {"init_from": str(tmp_path / "saved")}
    config = {"stage": stage, "output_dir": str(tmp_path / "run"), "model": model, "training": {"use_cpu": True}}
    config["data"] = {"path": "train.json", **data}
    message = rf"`data.{key}` applies to the `{used_by}` format only; .*`{data['format']}`"
    with pytest.raises(ConfigError, match=message):
        load_config(write_config(tmp_path / "bad.yaml", config), stage, check_paths=False)
    defaults = {
        "caption_prompt": "Describe the image.",
        "captioning": True,
        "text_to_image": False,
        "text_to_image_template": "Generate an image of {}",
        "split": "train",
        "image_column": "images",
    }
    config["data"][key] = defaults.get(key, "messages")
    load_config(write_config(tmp_path / "ok.yaml", config), stage, check_paths=False)  # the default is harmless


# --------------------------------------------------------------------------------------------------------------------
# The example configs


@pytest.mark.parametrize("name", ["tokenizer", "pretrain", "sft"])
def test_example_configs_are_valid(name):
    # The data and checkpoints they name are placeholders; everything else is checked. bf16 needs `use_cpu` here.
    config = load_config(
        REPO / "configs" / f"{name}.yaml", name, check_paths=False, overrides={"training": {"use_cpu": True}}
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
    config["data"]["path"] = str(tmp_path / "not-saved")
    with pytest.raises(FileNotFoundError, match=r"`data.path`: no such dataset folder"):
        load_config(write_config(tmp_path / "hub.yaml", config), "sft")
    config["data"] = {"format": "hub", "path": "owner/name", "image_folder": str(tmp_path)}
    with pytest.raises(ConfigError, match=r"`data.image_folder` applies to `image_text` and `llava` files"):
        load_config(write_config(tmp_path / "hub.yaml", config), "sft")


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
