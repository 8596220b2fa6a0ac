"""`load_config`: a YAML file to a checked StageConfig, in order: the top level, each section against its schema,
the stage's checks, then the Trainer's own checks of the training arguments. Nothing heavy is built or loaded."""

import copy
import typing
import warnings

from .schema import SCHEMA, StageConfig
from .stage_checks import check_stage
from .training_arguments import build_training_arguments, training_section
from .typed_yaml import ConfigError, build_section, check_keys, check_type, merge, read_yaml

__all__ = ["load_config", "move_gan_schedule"]

# Keys of the PatchGAN schedule that stage 1 files of the previous release held in the model section, and where
# they live now: the trainer owns the schedule (`SetokTrainingArguments`).
_OLD_GAN_KEYS = {
    ("model", "setok_config", "disc_start"): "disc_start",
    ("model", "setok_config", "disc_weight"): "disc_weight",
    ("model", "discriminator_learning_rate"): "discriminator_learning_rate",
}


def move_gan_schedule(raw: dict) -> dict:
    """A stage-1 file with the GAN schedule at its old place (`model.setok_config.disc_start`, `.disc_weight`,
    `model.discriminator_learning_rate`) -> the same file with the keys under `training` (FutureWarning); both places
    with different values is an error."""
    raw = copy.deepcopy(raw)  # the file's dicts stay as read
    for (*parents, key), new_key in _OLD_GAN_KEYS.items():
        section = raw
        for parent in parents:
            section = section.get(parent) if isinstance(section, dict) else None
        if not isinstance(section, dict) or section.get(key) is None:
            if isinstance(section, dict):
                section.pop(key, None)
            continue
        old = ".".join([*parents, key])
        value = section.pop(key)
        training = raw.setdefault("training", {}) or {}
        raw["training"] = training
        if training.get(new_key, value) != value:
            raise ConfigError(
                f"`{old}` ({value!r}) and `training.{new_key}` ({training[new_key]!r}) disagree: the schedule is "
                f"`training.{new_key}` now; remove `{old}`."
            )
        training[new_key] = value
        warnings.warn(
            f"`{old}` moved to `training.{new_key}`; the old key goes away in the next release.",
            FutureWarning,
            stacklevel=2,
        )
    return raw


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
    if raw.get("stage") == "tokenizer":
        raw = move_gan_schedule(raw)
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
        training=training_section(file_stage, raw.get("training") or {}),
    )
    check_stage(config, check_paths)
    build_training_arguments(config)  # the Trainer's own checks, now rather than after the model has loaded
    return config
