"""Deprecated path: typed YAML reading is `transformers_setok.training.config.typed_yaml`."""

from .._deprecation import warn_moved
from .config.typed_yaml import (
    ConfigError,
    build_section,
    check_keys,
    check_type,
    describe,
    dotted,
    matches,
    merge,
    read_yaml,
)

warn_moved(__name__, "transformers_setok.training.config.typed_yaml")

__all__ = [
    "ConfigError",
    "build_section",
    "check_keys",
    "check_type",
    "describe",
    "dotted",
    "matches",
    "merge",
    "read_yaml",
]
