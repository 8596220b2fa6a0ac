"""Checking a model named on the command line before transformers reads it.

transformers' own errors for a bad local folder point elsewhere: a mistyped path is reported as a failed connection
to the Hub, a folder without config.json as a missing `model_type` key, a truncated safetensors file as
"incomplete metadata" without the file's name. `check_model_path` finds these first and says what is wrong with
which file; `load_pretrained` runs it, then loads.
"""

import json
import os
import struct
from pathlib import Path

from ._checks import is_hub_id

__all__ = ["check_model_path", "check_safetensors", "load_pretrained"]


WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def check_model_path(name_or_path: str, argument: str = "--model", required: tuple[str, ...] = ()) -> bool:
    """Checks `name_or_path` as given to `argument`: a local folder must hold config.json, complete weights and the
    `required` files; a name that is not on disk must look like a Hub id. Returns whether it is a local folder.
    Raises FileNotFoundError or ValueError whose one-line message names the argument and the file at fault."""
    path = Path(name_or_path)
    where = f"{argument} {name_or_path}"
    if not path.exists():
        if is_hub_id(name_or_path, owner_required=True):  # anything else can only be a mistyped local path
            return False  # loaded from the Hub (or its cache); `load_pretrained` words a failure
        raise FileNotFoundError(f"{where}: no such folder.")
    if not path.is_dir():
        raise ValueError(f"{where}: is a file, not a model folder (the folder `save_pretrained` writes).")
    config = path / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{where}: the folder has no config.json, so it holds no saved model.")
    try:
        json.loads(config.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{where}: {config} is not valid JSON ({error}).") from error
    weights = [name for name in WEIGHT_FILES if (path / name).is_file()]
    if not weights:
        raise FileNotFoundError(f"{where}: the folder has no model weights (model.safetensors).")
    if "model.safetensors" in weights:
        check_safetensors(path / "model.safetensors")
    elif "model.safetensors.index.json" in weights:
        for shard in _shards(path / "model.safetensors.index.json"):
            check_safetensors(shard)
    for name in required:
        if not (path / name).is_file():
            raise FileNotFoundError(f"{where}: the folder has no {name}.")
    return True


def check_safetensors(file: str | os.PathLike):
    """Raises FileNotFoundError or ValueError naming `file` if it is missing, truncated or not safetensors: its
    header (a little-endian u64 length, then JSON) must parse, and the file must hold every byte the header lists."""
    file = Path(file)
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no such file (listed in the weights index).")
    size = file.stat().st_size
    truncated = f"{file} looks truncated (an interrupted download or copy?)"
    with open(file, "rb") as handle:
        if size < 8:
            raise ValueError(f"{truncated}: it is {size} bytes long.")
        (header_size,) = struct.unpack("<Q", handle.read(8))
        if 8 + header_size > size:
            if header_size > 100_000_000:  # a real header is a few kB to a few MB
                raise ValueError(f"{file} is not a safetensors file: its first 8 bytes are no header length.")
            raise ValueError(f"{truncated}: its header is {header_size} bytes, the file {size}.")
        try:
            header = json.loads(handle.read(header_size))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"{file} is not a safetensors file: its header is no valid JSON.") from error
    if not isinstance(header, dict):
        raise ValueError(f"{file} is not a safetensors file: its header is no JSON object.")
    try:
        ends = [int(entry["data_offsets"][1]) for key, entry in header.items() if key != "__metadata__"]
    except (KeyError, TypeError, IndexError, ValueError) as error:
        raise ValueError(f"{file} is not a safetensors file: its header lists no tensor offsets.") from error
    expected = 8 + header_size + max(ends, default=0)
    if size < expected:
        raise ValueError(f"{truncated}: it is {size} bytes, its header lists {expected}.")


def _shards(index_file: Path) -> list[Path]:
    try:
        weight_map = json.loads(index_file.read_text(encoding="utf-8"))["weight_map"]
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as error:
        raise ValueError(f"{index_file} is no valid weights index (a JSON object with a `weight_map`).") from error
    return [index_file.parent / name for name in sorted(set(weight_map.values()))]


def load_pretrained(loader, name_or_path: str, argument: str = "--model", required: tuple[str, ...] = (), **kwargs):
    """`loader.from_pretrained(name_or_path, **kwargs)` after `check_model_path`. A failure comes back as one line
    naming the argument; only for a Hub id does it mention the Hub."""
    local = check_model_path(name_or_path, argument, required)
    try:
        return loader.from_pretrained(name_or_path, **kwargs)
    except (OSError, ValueError) as error:
        detail = " ".join(str(error).split())
        if local:
            raise (OSError if isinstance(error, OSError) else ValueError)(
                f"{argument} {name_or_path}: {detail}"
            ) from error
        raise OSError(
            f"{argument} {name_or_path}: no such local folder, and loading it from the Hub failed: {detail}"
        ) from error
