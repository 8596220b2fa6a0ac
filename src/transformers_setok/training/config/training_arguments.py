"""The `training` section: its keys and values checked against the Trainer's argument class (`TrainingArguments`
for stages 1-2, trl's `SFTConfig` for stage 3) over the stage's defaults, and the argument object built from it."""

import dataclasses
import re
import typing

from .bounds import check_count, check_not_negative, check_positive
from .schema import StageConfig
from .typed_yaml import ConfigError, check_type, did_you_mean

__all__ = ["TRAINING_DEFAULTS", "arguments_class", "build_training_arguments", "training_section"]

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


def _max_steps(value, key: str):
    if value != -1 and value < 1:
        raise ConfigError(
            f"`{key}` must be a number of steps (at least 1) or -1 (not set: `num_train_epochs` decides), got {value}."
        )


def _interval(value, key: str):
    if not value > 0:
        raise ConfigError(f"`{key}` must be > 0 (a number of steps; below 1, a fraction of the run), got {value}.")


# Values the argument class takes but the Trainer would reinterpret (a negative `max_steps` trains by epochs, a
# `save_total_limit` of 0 keeps every checkpoint) or trip over mid-run (a batch of 0): refused, key by key. None, where
# a field allows it, means "not set" and is not checked.
_BOUNDS = {
    "max_steps": _max_steps,
    "num_train_epochs": check_positive,
    "save_steps": _interval,
    "logging_steps": _interval,
    "eval_steps": _interval,
    "per_device_train_batch_size": check_count,
    "per_device_eval_batch_size": check_count,
    "gradient_accumulation_steps": check_count,
    "save_total_limit": check_count,
    "learning_rate": check_positive,
    "warmup_steps": check_not_negative,
    "weight_decay": check_not_negative,
    "max_grad_norm": check_not_negative,
    "dataloader_num_workers": check_not_negative,
}


def arguments_class(stage: str):
    if stage == "sft":
        from trl import SFTConfig

        return SFTConfig
    if stage == "tokenizer":
        from ..setok_trainer import SetokTrainingArguments  # TrainingArguments + the PatchGAN schedule

        return SetokTrainingArguments
    from transformers import TrainingArguments

    return TrainingArguments


def training_section(stage: str, raw) -> dict:
    """The file's `training` section checked key by key against the argument class's fields, over the defaults."""
    cls = arguments_class(stage)
    if not isinstance(raw, dict):
        raise ConfigError(f"`training` must be a mapping of {cls.__name__} keys, got {raw!r:.80}.")
    fields = {f.name for f in dataclasses.fields(cls) if f.init and not f.name.startswith("_")}
    hints = typing.get_type_hints(cls)
    for key, value in raw.items():
        if key in _NOT_IN_TRAINING:
            raise ConfigError(f"`training.{key}` is not set here: {_NOT_IN_TRAINING[key]}.")
        if key not in fields:
            raise ConfigError(
                f"Unknown key `training.{key}`: not a field of {cls.__name__}, whose fields are the keys of "
                f"`training`.{did_you_mean(key, fields)}"
            )
        check_type(value, hints[key], f"training.{key}")
    if raw.get("remove_unused_columns") is True:
        raise ConfigError("`training.remove_unused_columns` must be false: the collators read the raw record columns.")
    for key, check in _BOUNDS.items():
        if raw.get(key) is not None:
            check(raw[key], f"training.{key}")
    # Only the raw file tells an explicit `max_length: 1024` from SFTConfig's default 1024, which the stage-3 trainer
    # reads as "not set" and drops: without this check the user's limit would vanish silently.
    if stage == "sft" and raw.get("max_length") is not None:
        raise ConfigError(
            f"`training.max_length` ({raw['max_length']}) would make TRL truncate samples, cutting image placeholders "
            "or answers: set `data.max_length` instead, which refuses a longer sample (image tokens included)."
        )
    return {**TRAINING_DEFAULTS[stage], **raw}


def build_training_arguments(config: StageConfig):
    """`TrainingArguments` (stages 1-2) or `SFTConfig` (stage 3) from the config. The constructor's own complaints
    (an invalid enum value, contradictory settings) come back as ConfigError naming the `training` key(s)."""
    cls = arguments_class(config.stage)
    kwargs = dict(config.training, output_dir=config.output_dir)
    if config.data.streaming:
        from ..streaming import STREAMING_TRAINING_ARGUMENTS  # skip no data on resume (its state is restored), no
        # dispatching of batches from process 0 (each process reads its own shards)

        kwargs.update(STREAMING_TRAINING_ARGUMENTS)
    try:
        return _construct(config.stage, cls, kwargs)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{_blame(config, cls, error)}: {error}") from error


def _construct(stage: str, cls, kwargs: dict):
    if stage != "sft":
        return cls(**kwargs)
    from ..sft_trainer import setokim_sft_config, settle_sft_config

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
