"""Training configs: one YAML file per stage, checked in full before anything heavy is built or loaded.

    stage: tokenizer          # tokenizer (1) | pretrain (2) | sft (3); must match `setok train STAGE`
    output_dir: runs/setok    # checkpoints go to output_dir/checkpoint-N, the final model to output_dir/final
    model: {...}              # TokenizerModelConfig | PretrainModelConfig | SFTModelConfig
    data: {...}               # TokenizerDataConfig | PretrainDataConfig | SFTDataConfig
    training: {...}           # TrainingArguments (stages 1-2) or trl's SFTConfig (stage 3) fields, over the
                              # stage's defaults (TRAINING_DEFAULTS)

`load_config` rejects, each with the dotted key it is about: unknown keys (listing the allowed ones), values of the
wrong type, missing required keys, a `stage` that is not the command's, training arguments the Trainer would refuse,
dataset and model paths that do not exist, and `init_from` checkpoints of another model type. Errors are
`ConfigError` (a ValueError), or FileNotFoundError for missing paths.
"""

import dataclasses
import json
import os
import re
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from .typed_yaml import ConfigError, build_section, check_keys, check_type, merge, read_yaml

__all__ = [
    "STAGES",
    "TRAINING_DEFAULTS",
    "ConfigError",
    "PretrainDataConfig",
    "PretrainModelConfig",
    "SFTDataConfig",
    "SFTModelConfig",
    "StageConfig",
    "TokenizerDataConfig",
    "TokenizerModelConfig",
    "build_training_arguments",
    "check_checkpoint_type",
    "has_concept_contrast",
    "load_config",
    "read_model_type",
]

STAGES = ("tokenizer", "pretrain", "sft")
ON_ERROR = Literal["fail", "skip"]
DTYPE = Literal["auto", "float32", "bfloat16", "float16"]


# --------------------------------------------------------------------------------------------------------------------
# The schema, one model and one data section per stage


@dataclass
class TokenizerModelConfig:
    """Stage 1: what SeTok starts from.

    Either `init_from` a saved SetokForImageReconstruction (to continue training it), or a fresh model from
    `setok_config` (SetokConfig keys), optionally around pretrained encoders: `vision_model` and `text_model` (the
    frozen text encoder of the concept contrast) name checkpoints for `from_pretrained_encoders`. `text_model` alone
    pairs the pretrained text encoder with a fresh vision encoder from `setok_config.vision_config`, trained from
    scratch when `setok_config.freeze_vision_encoder` is false.
    """

    init_from: str | None = None
    setok_config: dict | None = None
    vision_model: str | None = None
    text_model: str | None = None
    # The concept contrast's tokenizer; defaults to `text_model`, or to `init_from` (stage 1 saves it there).
    text_tokenizer: str | None = None
    # The PatchGAN discriminator has its own optimiser (SetokTrainer); None uses training.learning_rate.
    discriminator_learning_rate: float | None = None


@dataclass
class PretrainModelConfig:
    """Stage 2: either `init_from` a saved Setokim, or assemble one from the stage-1 `setok` folder and a causal LM
    (`language_model`, a Hub id or folder; `gguf_file` for a GGUF checkpoint; `tokenizer` defaults to the LM's).
    `train_generation_head` also trains the generation head (adding one when the model has none)."""

    init_from: str | None = None
    setok: str | None = None
    language_model: str | None = None
    tokenizer: str | None = None
    gguf_file: str | None = None
    dtype: DTYPE | None = None
    train_language_model: bool = False  # False: the projector and the new token rows only (spec 3)
    # The generation head (spec 2), trained on text-to-image chats (`data.text_to_image`). A model without one gets a
    # fresh head of this width x depth and the detokenizer of the stage-1 SeTok (`setok`, also with `init_from`).
    train_generation_head: bool = False
    generation_head_width: int = 1024
    generation_head_depth: int = 3
    generation_mask_ratio_min: float = 0.7  # each target image hides 70-100 % of its tokens (MAR)
    diffusion_noise_repeats: int = 4  # noise draws per hidden token
    diffusion_loss_weight: float = 1.0


@dataclass
class SFTModelConfig:
    """Stage 3: the stage-2 Setokim to tune. `lora`: false (full fine-tuning of the LLM and projector), true (the
    paper's r=128, alpha=256, dropout=0.05) or a mapping of LoraConfig overrides. `qlora` loads the LLM in 4 bits
    (needs LoRA). `merge_adapters` also writes output_dir/merged, a plain Setokim with the adapter folded in."""

    init_from: str
    lora: bool | dict = True
    qlora: bool = False
    merge_adapters: bool = False
    dtype: DTYPE | None = None


@dataclass
class TokenizerDataConfig:
    """Stage 1: a JSON Lines file of {"image": path, "caption": str, "concepts": [str]} (`load_image_text_jsonl`)."""

    path: str
    format: Literal["image_text"] = "image_text"
    image_folder: str | None = None  # image paths are relative to it; default: the file's folder
    on_error: ON_ERROR = "fail"  # "skip" drops bad records (counted in the log) instead of stopping
    verify_images: bool = False  # also decode every image at load time (slow on big sets)
    text_source: Literal["concepts", "caption"] = "concepts"  # what the concept contrast matches tokens against
    concept_template: str = "a photo of a {}"


@dataclass
class PretrainDataConfig:
    """Stage 2: captions (`image_text`, turned into captioning chats with `caption_prompt`), LLaVA JSON (`llava`)
    or a dataset with `images` and `messages` columns (`hub`: a Hub id or a local dataset folder)."""

    path: str
    format: Literal["image_text", "llava", "hub"] = "image_text"
    image_folder: str | None = None
    split: str = "train"  # hub only
    image_column: str = "images"  # hub only
    messages_column: str = "messages"  # hub only
    on_error: ON_ERROR = "fail"
    verify_images: bool = False
    caption_prompt: str = "Describe the image."  # image_text only
    # image_text only: each pair as a captioning chat, and/or as a text-to-image chat (needs the generation head).
    captioning: bool = True
    text_to_image: bool = False
    text_to_image_template: str = "Generate an image of {}"  # the user turn; `{}` is the caption
    max_length: int | None = None  # longest sample, image tokens included; longer ones are an error, never cut


@dataclass
class SFTDataConfig:
    """Stage 3: LLaVA JSON (`llava`) or a dataset with `images` and `messages` columns (`hub`)."""

    path: str
    format: Literal["llava", "hub"] = "llava"
    image_folder: str | None = None
    split: str = "train"
    image_column: str = "images"
    messages_column: str = "messages"
    on_error: ON_ERROR = "fail"
    verify_images: bool = False
    max_length: int | None = None


@dataclass
class StageConfig:
    """A whole config file, checked. `training` holds the merged training arguments (defaults, then the file's);
    `build_training_arguments` turns them into the Trainer's argument object."""

    stage: Literal["tokenizer", "pretrain", "sft"]
    output_dir: str
    model: Any
    data: Any
    training: dict = field(default_factory=dict)

    @property
    def final_dir(self) -> str:
        return os.path.join(self.output_dir, "final")


SCHEMA = {
    "tokenizer": (TokenizerModelConfig, TokenizerDataConfig),
    "pretrain": (PretrainModelConfig, PretrainDataConfig),
    "sft": (SFTModelConfig, SFTDataConfig),
}
# The model_type each stage's `init_from` must hold (config.json), and for stage 1 the head it must have.
EXPECTED_MODEL_TYPE = {"tokenizer": "setok", "pretrain": "setokim", "sft": "setokim"}

# Spec 3's recipe (lr 1e-3, cosine, 3% warmup) plus what every run needs whatever the file says. Batch sizes and
# precision depend on the hardware, so they live in the example configs, not here.
_RECIPE = dict(learning_rate=1e-3, lr_scheduler_type="cosine", warmup_steps=0.03, num_train_epochs=1.0)
# Periodic checkpoints, so that an interrupted run loses at most `save_steps` steps (then `--resume auto`).
_CHECKPOINTS = dict(save_strategy="steps", save_steps=500)
TRAINING_DEFAULTS = {
    "tokenizer": dict(**_RECIPE, **_CHECKPOINTS, logging_steps=10, remove_unused_columns=False),
    "pretrain": dict(**_RECIPE, **_CHECKPOINTS, logging_steps=10, remove_unused_columns=False),
    # TRL turns activation (gradient) checkpointing on by default; it costs a third more compute, so large runs opt
    # in (configs/sft.yaml does). `activation_checkpointing` is the name transformers 5 keeps.
    "sft": dict(
        **_RECIPE, **_CHECKPOINTS, logging_steps=10, remove_unused_columns=False, activation_checkpointing=False
    ),
}
# Training keys with a home elsewhere, and why.
_NOT_IN_TRAINING = {
    "output_dir": "set the top-level `output_dir`",
    "resume_from_checkpoint": "pass `--resume PATH|auto` to `setok train`",
}


# --------------------------------------------------------------------------------------------------------------------
# Loading


def load_config(path, stage: str | None = None, *, check_paths: bool = True, overrides: dict | None = None):
    """Reads and checks the YAML file at `path` for `stage` (None: whatever stage the file names).

    `check_paths=False` skips the checks that need the data and checkpoints to be present (for checking a config's
    structure, like the examples in `configs/`). `overrides` is a nested mapping merged over the file's contents.
    Nothing heavy happens here: no model, data set or weights are loaded.
    """
    raw = read_yaml(path)
    if overrides:
        raw = merge(raw, overrides)
    check_keys(raw, StageConfig, "")
    file_stage = raw["stage"]
    check_type(file_stage, typing.get_type_hints(StageConfig)["stage"], "stage")
    if stage is not None and file_stage != stage:
        raise ConfigError(
            f"{path}: `stage` is {file_stage!r} but the command trains {stage!r}: use `setok train {file_stage}` or "
            "the config file of that stage."
        )
    check_type(raw["output_dir"], str, "output_dir")
    model_class, data_class = SCHEMA[file_stage]
    config = StageConfig(
        stage=file_stage,
        output_dir=raw["output_dir"],
        model=build_section(model_class, raw["model"], "model"),
        data=build_section(data_class, raw["data"], "data"),
        training=_training_dict(file_stage, raw.get("training") or {}),
    )
    _CHECK_MODEL[file_stage](config.model, check_paths)
    _check_data(config.data, check_paths)
    if getattr(config.data, "text_to_image", False) and not config.model.train_generation_head:
        raise ConfigError("`data.text_to_image` trains the generation head: set `model.train_generation_head: true`.")
    if file_stage == "pretrain" and config.data.format == "image_text":
        if config.model.train_generation_head and not config.data.text_to_image:
            raise ConfigError(
                "`model.train_generation_head` needs text-to-image chats: set `data.text_to_image: true` (captions "
                "alone never reach the head)."
            )
    build_training_arguments(config)  # the Trainer's own checks, now rather than after the model has loaded
    return config


# --------------------------------------------------------------------------------------------------------------------
# Training arguments


def _arguments_class(stage: str):
    if stage == "sft":
        from trl import SFTConfig

        return SFTConfig
    from transformers import TrainingArguments

    return TrainingArguments


def _training_dict(stage: str, raw) -> dict:
    """The file's `training` section checked key by key against the argument class's fields, over the defaults."""
    if not isinstance(raw, dict):
        raise ConfigError(f"`training` must be a mapping of {_arguments_class(stage).__name__} keys, got {raw!r:.80}.")
    cls = _arguments_class(stage)
    fields = {f.name for f in dataclasses.fields(cls) if f.init and not f.name.startswith("_")}
    hints = typing.get_type_hints(cls)
    for key, value in raw.items():
        if key in _NOT_IN_TRAINING:
            raise ConfigError(f"`training.{key}` is not set here: {_NOT_IN_TRAINING[key]}.")
        if key not in fields:
            close = [name for name in sorted(fields) if _similar(str(key), name)]
            hint = f" Did you mean {', '.join(f'`{name}`' for name in close)}?" if close else ""
            raise ConfigError(
                f"Unknown key `training.{key}`: not a field of {cls.__name__}, whose fields are the keys of "
                f"`training`.{hint}"
            )
        check_type(value, hints[key], f"training.{key}")
    if raw.get("remove_unused_columns") is True:
        raise ConfigError("`training.remove_unused_columns` must be false: the collators read the raw record columns.")
    for key in ("per_device_train_batch_size", "gradient_accumulation_steps"):
        if key in raw and raw[key] < 1:
            raise ConfigError(f"`training.{key}` must be at least 1, got {raw[key]}.")
    if "learning_rate" in raw and raw["learning_rate"] <= 0:
        raise ConfigError(f"`training.learning_rate` must be > 0, got {raw['learning_rate']}.")
    # Only the raw file tells an explicit `max_length: 1024` from SFTConfig's default 1024, which the stage-3 trainer
    # reads as "not set" and drops: without this check the user's limit would vanish silently.
    if stage == "sft" and raw.get("max_length") is not None:
        raise ConfigError(
            f"`training.max_length` ({raw['max_length']}) would make TRL truncate samples, cutting image placeholders "
            "or answers: set `data.max_length` instead, which refuses a longer sample (image tokens included)."
        )
    return {**TRAINING_DEFAULTS[stage], **raw}


def _similar(key: str, name: str) -> bool:
    """A likely typo: one name inside the other, or the same words in another order (`steps_save`)."""
    key, name = key.lower(), name.lower()
    return len(key) > 3 and (key in name or name in key or sorted(key.split("_")) == sorted(name.split("_")))


def build_training_arguments(config: StageConfig):
    """`TrainingArguments` (stages 1-2) or `SFTConfig` (stage 3) from the config. The constructor's own complaints
    (an invalid enum value, contradictory settings) come back as ConfigError naming the `training` key(s)."""
    cls = _arguments_class(config.stage)
    kwargs = dict(config.training, output_dir=config.output_dir)
    try:
        args = _construct(config.stage, cls, kwargs)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{_blame(config, cls, error)}: {error}") from error
    return args


def _construct(stage: str, cls, kwargs: dict):
    if stage != "sft":
        return cls(**kwargs)
    from .sft_trainer import setokim_sft_config, settle_sft_config

    # The stage-3 trainer fills in (or refuses) TRL's data-path settings; doing it here reports a conflict now.
    return settle_sft_config(setokim_sft_config(**kwargs))


def _blame(config: StageConfig, cls, error: Exception) -> str:
    """The `training.<key>` an error is about: a key the message names, else the one key that fails on its own."""
    named = [key for key in config.training if re.search(rf"\b{re.escape(key)}\b", str(error))]
    if named:
        return ", ".join(f"`training.{key}`" for key in named)
    alone = []
    for key in config.training:
        try:
            _construct(config.stage, cls, {key: config.training[key], "output_dir": config.output_dir})
        except (TypeError, ValueError):
            alone.append(key)
    if alone:
        return ", ".join(f"`training.{key}`" for key in alone)
    return "`training`"


# --------------------------------------------------------------------------------------------------------------------
# Model sections


def read_model_type(path: str, key: str) -> tuple[str | None, list]:
    """(model_type, architectures) from the config.json of the checkpoint folder `path`, named `key` in errors."""
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"`{key}`: {path} holds no config.json, so it is not a saved model.")
    try:
        with open(config_file, encoding="utf-8") as file:
            saved = json.load(file)
    except (OSError, json.JSONDecodeError) as error:
        raise ConfigError(f"`{key}`: cannot read {config_file}: {error}") from error
    return saved.get("model_type"), saved.get("architectures") or []


def check_checkpoint_type(path: str, key: str, expected: str, architecture: str | None = None):
    """A checkpoint folder of another model type (or, with `architecture`, another head) is refused."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"`{key}`: no such folder: {path}")
    found, architectures = read_model_type(path, key)
    if found != expected:
        raise ConfigError(
            f"`{key}`: {path} holds a model of type {found!r}, but this stage needs a {expected!r} model."
        )
    if architecture is not None and architectures and architecture not in architectures:
        raise ConfigError(
            f"`{key}`: {path} holds a {', '.join(architectures)}, but this stage needs a {architecture} (the "
            "detokenizer and losses are part of it)."
        )


def _is_local(name: str) -> bool:
    """A name that can only be a local path (a Hub id is `name` or `owner/name`)."""
    return os.path.exists(name) or not re.fullmatch(r"[\w-][\w.-]*(/[\w-][\w.-]*)?", name)


def _check_source(value: str | None, key: str, check_paths: bool):
    """A Hub id or folder: a local-looking path must exist (a Hub id is checked when it is downloaded)."""
    if value is not None and check_paths and _is_local(value) and not os.path.exists(value):
        raise FileNotFoundError(f"`{key}`: no such folder: {value}")


def _check_tokenizer_model(model: TokenizerModelConfig, check_paths: bool):
    fresh = [key for key in ("setok_config", "vision_model", "text_model") if getattr(model, key) is not None]
    if model.init_from is not None and fresh:
        raise ConfigError(
            f"`model.init_from` continues a saved SeTok, whose config is fixed: drop `model.{fresh[0]}` (or "
            "`model.init_from` to build a new one)."
        )
    if model.init_from is None and not fresh:
        raise ConfigError(
            "`model` needs `init_from` (a saved SetokForImageReconstruction) or `setok_config` and/or `vision_model` "
            "(a new SeTok)."
        )
    setok_config = model.setok_config or {}
    if model.text_model is not None and model.vision_model is None and "vision_config" not in setok_config:
        # Without it SetokConfig would fall back to a randomly initialised SigLIP so400m: surely not what was meant.
        raise ConfigError(
            "`model.text_model` without `model.vision_model` trains a fresh vision encoder: describe it in "
            "`model.setok_config.vision_config` (or name a pretrained one in `model.vision_model`)."
        )
    for key, source in (("vision_config", "vision_model"), ("text_config", "text_model")):
        if key in setok_config and getattr(model, source) is not None:
            raise ConfigError(f"`model.setok_config.{key}` and `model.{source}` both describe that encoder: keep one.")
    if model.setok_config is not None:
        _check_setok_config(setok_config)
    if model.discriminator_learning_rate is not None and model.discriminator_learning_rate <= 0:
        raise ConfigError(f"`model.discriminator_learning_rate` must be > 0, got {model.discriminator_learning_rate}.")
    for key in ("vision_model", "text_model", "text_tokenizer"):
        _check_source(getattr(model, key), f"model.{key}", check_paths)

    if model.init_from is not None and check_paths:
        check_checkpoint_type(
            model.init_from, "model.init_from", EXPECTED_MODEL_TYPE["tokenizer"], "SetokForImageReconstruction"
        )
        saved_tokenizer = os.path.isfile(os.path.join(model.init_from, "tokenizer_config.json"))
        if has_concept_contrast(model) and model.text_tokenizer is None and not saved_tokenizer:
            raise ConfigError(
                f"`model.init_from` {model.init_from} has a concept contrast but no tokenizer for its text encoder: "
                "set `model.text_tokenizer`."
            )
    fresh_text_encoder = model.init_from is None and model.text_model is None and has_concept_contrast(model)
    if fresh_text_encoder and model.text_tokenizer is None:
        raise ConfigError(
            "The concept contrast (`model.setok_config.text_config`) needs a tokenizer for its text encoder: set "
            "`model.text_tokenizer` (a folder or Hub id)."
        )


def has_concept_contrast(model: TokenizerModelConfig) -> bool:
    """Whether the stage-1 model has a text encoder (and so needs texts and a text tokenizer)."""
    if model.init_from is not None:
        read_model_type(model.init_from, "model.init_from")  # a clear error when there is no readable config.json
        with open(os.path.join(model.init_from, "config.json"), encoding="utf-8") as file:
            return json.load(file).get("text_config") is not None
    return model.text_model is not None or (model.setok_config or {}).get("text_config") is not None


def _check_setok_config(setok_config: dict):
    """SetokConfig keys and values, by building the (small) config object itself."""
    from transformers import PreTrainedConfig

    from ..modeling import SetokConfig

    allowed = [f.name for f in dataclasses.fields(SetokConfig) if f.init]
    unknown = [key for key in setok_config if key not in allowed]
    if unknown:
        common = {f.name for f in dataclasses.fields(PreTrainedConfig)}
        own = [name for name in allowed if name not in common]  # the generic PreTrainedConfig keys would drown them
        raise ConfigError(
            f"Unknown key `model.setok_config.{unknown[0]}`; the keys of `model.setok_config` are SetokConfig's: "
            f"{', '.join(own)}."
        )
    try:
        SetokConfig(**setok_config)
    except (TypeError, ValueError, KeyError) as error:
        raise ConfigError(f"`model.setok_config`: {error}") from error


def _check_pretrain_model(model: PretrainModelConfig, check_paths: bool):
    # With `init_from`, `setok` may still supply the detokenizer of a generation head to add.
    assembly_only = ("language_model", "tokenizer", "gguf_file") + (() if model.train_generation_head else ("setok",))
    assembled = [key for key in assembly_only if getattr(model, key)]
    if model.init_from is not None and assembled:
        raise ConfigError(
            f"`model.init_from` continues a saved Setokim: drop `model.{assembled[0]}` (or `model.init_from` to "
            "assemble a new one from `setok` and `language_model`)."
        )
    if model.init_from is None and (model.setok is None or model.language_model is None):
        raise ConfigError(
            "`model` needs `init_from` (a saved Setokim) or both `setok` (the stage-1 SeTok folder) and "
            "`language_model` (a causal LM's Hub id or folder)."
        )
    for key in ("generation_head_width", "generation_head_depth", "diffusion_noise_repeats"):
        if getattr(model, key) < 1:
            raise ConfigError(f"`model.{key}` must be at least 1, got {getattr(model, key)}.")
    if not 0 <= model.generation_mask_ratio_min <= 1:
        raise ConfigError(
            f"`model.generation_mask_ratio_min` must lie in [0, 1], got {model.generation_mask_ratio_min}."
        )
    if model.diffusion_loss_weight < 0:
        raise ConfigError(f"`model.diffusion_loss_weight` must be >= 0, got {model.diffusion_loss_weight}.")
    if not check_paths:
        return
    if model.init_from is not None:
        check_checkpoint_type(model.init_from, "model.init_from", EXPECTED_MODEL_TYPE["pretrain"])
        if model.train_generation_head and not _has_generation_head(model.init_from):
            if model.setok is None:
                raise ConfigError(
                    f"`model.init_from` {model.init_from} has no generation head: set `model.setok` (the stage-1 "
                    "SeTok, whose detokenizer the new head draws for) so that one can be added."
                )
            check_checkpoint_type(
                model.setok, "model.setok", EXPECTED_MODEL_TYPE["tokenizer"], "SetokForImageReconstruction"
            )
        elif model.setok is not None:
            raise ConfigError(
                f"`model.init_from` {model.init_from} already has a generation head: drop `model.setok`, which only "
                "supplies the detokenizer of a new one."
            )
    else:
        # A generation head needs the stage-1 detokenizer, which only the full SetokForImageReconstruction holds.
        architecture = "SetokForImageReconstruction" if model.train_generation_head else None
        check_checkpoint_type(model.setok, "model.setok", EXPECTED_MODEL_TYPE["tokenizer"], architecture)
        _check_source(model.language_model, "model.language_model", check_paths)
        _check_source(model.tokenizer, "model.tokenizer", check_paths)


def _has_generation_head(path: str) -> bool:
    with open(os.path.join(path, "config.json"), encoding="utf-8") as file:
        return bool(json.load(file).get("use_generation_head"))


def _check_sft_model(model: SFTModelConfig, check_paths: bool):
    if model.lora is False and (model.qlora or model.merge_adapters):
        flag = "qlora" if model.qlora else "merge_adapters"
        raise ConfigError(f"`model.{flag}` needs LoRA adapters: set `model.lora` to true or to LoraConfig overrides.")
    if isinstance(model.lora, dict):
        from .sft_trainer import setokim_lora_config

        try:
            setokim_lora_config(**model.lora)
        except (TypeError, ValueError) as error:
            raise ConfigError(f"`model.lora` (LoraConfig overrides): {error}") from error
    if check_paths:
        check_checkpoint_type(model.init_from, "model.init_from", EXPECTED_MODEL_TYPE["sft"])


_CHECK_MODEL = {"tokenizer": _check_tokenizer_model, "pretrain": _check_pretrain_model, "sft": _check_sft_model}


# --------------------------------------------------------------------------------------------------------------------
# Data sections


# Data keys that only one format reads: under another format a changed value would be ignored without a word.
_FORMAT_ONLY_KEYS = {
    "caption_prompt": "image_text",
    "captioning": "image_text",
    "text_to_image": "image_text",
    "text_to_image_template": "image_text",
    "split": "hub",
    "image_column": "hub",
    "messages_column": "hub",
}


def _check_data(data, check_paths: bool):
    max_length = getattr(data, "max_length", None)
    if max_length is not None and max_length < 1:
        raise ConfigError(f"`data.max_length` must be at least 1, got {max_length}.")
    if data.format == "hub" and data.image_folder is not None:
        raise ConfigError(
            "`data.image_folder` applies to `image_text` and `llava` files; a `hub` dataset has its own."
        )
    defaults = {f.name: f.default for f in dataclasses.fields(data)}
    for key, used_by in _FORMAT_ONLY_KEYS.items():
        if key in defaults and data.format != used_by and getattr(data, key) != defaults[key]:
            raise ConfigError(
                f"`data.{key}` applies to the `{used_by}` format only; `data.format` is `{data.format}`, which "
                "ignores it: drop it."
            )
    if hasattr(data, "concept_template"):
        _check_template(data.concept_template, "data.concept_template", "concept", "'a photo of a {}'")
    if hasattr(data, "text_to_image"):
        if not (data.captioning or data.text_to_image):
            raise ConfigError("`data.captioning` and `data.text_to_image` are both false: nothing would be trained.")
        if data.text_to_image:
            _check_template(data.text_to_image_template, "data.text_to_image_template", "caption", "'Draw {}.'")
    if not check_paths:
        return
    if data.format == "hub":
        if _is_local(data.path) and not os.path.exists(data.path):
            raise FileNotFoundError(f"`data.path`: no such dataset folder: {data.path}")
        return
    if not os.path.isfile(data.path):
        raise FileNotFoundError(f"`data.path`: no such file: {data.path}")
    if data.image_folder is not None and not os.path.isdir(data.image_folder):
        raise FileNotFoundError(f"`data.image_folder`: no such folder: {data.image_folder}")


def _check_template(template: str, key: str, what: str, example: str):
    """The template must take the {what} through one `{}`: other fields would fail mid-training, and a template without
    a field would give every record the same text."""
    try:
        filled = {template.format(value) for value in ("x", "y")}
    except (IndexError, KeyError, ValueError, AttributeError, TypeError) as error:
        raise ConfigError(
            f"`{key}` {template!r} cannot be filled with a {what} ({type(error).__name__}: {error}): use one `{{}}` "
            f"for it, as in {example}."
        ) from error
    if len(filled) == 1:
        raise ConfigError(
            f"`{key}` {template!r} does not use the {what}, so every one reads the same: put a `{{}}` where it goes, "
            f"as in {example}."
        )
