"""Argument checks that modules across the package share, so that each rule and its message are written once."""


def check_positive_int(value, name: str, error: type[Exception] = ValueError) -> int:
    """`value` when it is an int of at least 1 (a bool is no count); otherwise raise `error` (a `ConfigError`,
    say) with the package's message: "`name` must be a positive integer, got 0."."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise error(f"`{name}` must be a positive integer, got {value!r}.")
    return value
