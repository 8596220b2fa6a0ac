"""What a saved checkpoint folder is, from its `config.json`: the one place that reads that file for the training
configs and runners (its model type, its head, whether it has a concept contrast or a generation head)."""

import json
import os
from dataclasses import dataclass, field

from .typed_yaml import ConfigError

__all__ = ["CONFIG_FILE", "SavedModelConfig", "check_checkpoint_type", "read_model_type"]

CONFIG_FILE = "config.json"


@dataclass(frozen=True)
class SavedModelConfig:
    """The parts of a checkpoint's `config.json` that training decides on; `read` opens the file once.

    `key` is what the folder is called in error messages (`model.init_from`, `--resume`, ...).
    """

    path: str
    key: str
    model_type: str | None
    architectures: tuple[str, ...]
    has_text_config: bool  # SeTok: a text encoder, so a concept contrast
    has_generation_head: bool  # Setokim
    has_mask_decoder: bool = False  # Setokim
    # Setokim: the saved `mask_decoder_width` / `_depth` / `_heads` (None where config.json leaves one out)
    mask_decoder_sizes: dict = field(default_factory=dict)
    generation_token_scale: float | None = None  # Setokim: set once a generation head has been trained

    @classmethod
    def read(cls, path: str, key: str) -> "SavedModelConfig":
        """The config of the checkpoint folder `path`: FileNotFoundError when there is no such folder or it holds no
        config.json, ConfigError when that file cannot be read as a JSON mapping."""
        path = os.fspath(path)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"`{key}`: no such folder: {path}")
        config_file = os.path.join(path, CONFIG_FILE)
        if not os.path.isfile(config_file):
            raise FileNotFoundError(f"`{key}`: {path} holds no {CONFIG_FILE}, so it is not a saved model.")
        try:
            with open(config_file, encoding="utf-8") as file:
                saved = json.load(file)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ConfigError(f"`{key}`: cannot read {config_file}: {error}") from error
        if not isinstance(saved, dict):
            raise ConfigError(f"`{key}`: {config_file} holds no JSON object, so it is not a model config.")
        architectures = saved.get("architectures") or []
        if not isinstance(architectures, list):
            raise ConfigError(f"`{key}`: `architectures` of {config_file} is not a list: {architectures!r:.80}")
        return cls(
            path=path,
            key=key,
            model_type=saved.get("model_type"),
            architectures=tuple(str(name) for name in architectures),
            has_text_config=saved.get("text_config") is not None,
            has_generation_head=bool(saved.get("use_generation_head")),
            has_mask_decoder=bool(saved.get("use_mask_decoder")),
            mask_decoder_sizes={name: saved.get(f"mask_decoder_{name}") for name in ("width", "depth", "heads")},
            generation_token_scale=saved.get("generation_token_scale"),
        )

    @staticmethod
    def exists(path: str) -> bool:
        """Whether the folder `path` has a config.json (a whole model; a LoRA checkpoint holds an adapter only)."""
        return os.path.isfile(os.path.join(path, CONFIG_FILE))

    def require(self, expected: str, architecture: str | None = None) -> "SavedModelConfig":
        """A model of another type (or, with `architecture`, another head) is refused; returns itself."""
        if self.model_type != expected:
            raise ConfigError(
                f"`{self.key}`: {self.path} holds a model of type {self.model_type!r}, but this stage needs a "
                f"{expected!r} model."
            )
        if architecture is not None and self.architectures and architecture not in self.architectures:
            raise ConfigError(
                f"`{self.key}`: {self.path} holds a {', '.join(self.architectures)}, but this stage needs a "
                f"{architecture} (the detokenizer and losses are part of it)."
            )
        return self


def read_model_type(path: str, key: str) -> tuple[str | None, list]:
    """(model_type, architectures) from the config.json of the checkpoint folder `path`, named `key` in errors."""
    saved = SavedModelConfig.read(path, key)
    return saved.model_type, list(saved.architectures)


def check_checkpoint_type(path: str, key: str, expected: str, architecture: str | None = None) -> SavedModelConfig:
    """A checkpoint folder of another model type (or, with `architecture`, another head) is refused."""
    return SavedModelConfig.read(path, key).require(expected, architecture)
