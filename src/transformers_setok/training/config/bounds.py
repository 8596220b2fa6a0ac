"""Range checks of config values whose type is already checked, each a ConfigError naming the dotted key."""

from ..._checks import check_positive_int
from .typed_yaml import ConfigError

__all__ = ["check_between", "check_count", "check_not_negative", "check_positive"]


def check_count(value, key: str):
    """A positive integer (batch sizes, layers, steps), by the package's shared rule and message."""
    check_positive_int(value, key, ConfigError)


def check_positive(value, key: str):
    if not value > 0:
        raise ConfigError(f"`{key}` must be > 0, got {value}.")


def check_not_negative(value, key: str):
    if value < 0:
        raise ConfigError(f"`{key}` must be >= 0, got {value}.")


def check_between(value, low, high, key: str):
    """`low` <= `value` <= `high`."""
    if not low <= value <= high:
        raise ConfigError(f"`{key}` must lie in [{low}, {high}], got {value}.")
