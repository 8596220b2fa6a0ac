"""Old import paths kept for one release after a module moved (the package layout of 0.2)."""

import warnings


def warn_moved(old: str, new: str):
    warnings.warn(
        f"`{old}` moved to `{new}`; the old path goes away in the next release.", FutureWarning, stacklevel=3
    )
