"""Argument checks that modules across the package share, so that each rule and its message are written once."""

import re

# A Hub repository id: "owner/name", or a bare "name" (canonical data sets and models); each part letters, digits,
# "_", "-" and ".", not starting with "-" or ".". The one definition in the package.
HUB_ID = re.compile(r"(?:[A-Za-z0-9_][\w.-]*/)?[A-Za-z0-9_][\w.-]*")


def is_hub_id(name: str, *, owner_required: bool = False) -> bool:
    """Whether `name` reads as a Hub repository id (`owner_required`: only as "owner/name")."""
    return bool(HUB_ID.fullmatch(str(name))) and (not owner_required or "/" in str(name))


def check_positive_int(value, name: str, error: type[Exception] = ValueError) -> int:
    """`value` when it is an int of at least 1 (a bool is no count); otherwise raise `error` (a `ConfigError`,
    say) with the package's message: "`name` must be a positive integer, got 0."."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise error(f"`{name}` must be a positive integer, got {value!r}.")
    return value
