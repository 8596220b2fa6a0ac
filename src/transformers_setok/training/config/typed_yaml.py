"""YAML as people write it, checked against dataclass schemas: unknown keys, missing keys and wrong types are
errors that name the dotted key. Generic: the training configs (`schema.py` of this package) define the schemas."""

import dataclasses
import difflib
import os
import re
import sys
import types
import typing
from enum import Enum
from typing import Any, Literal, Union

import yaml

__all__ = [
    "ConfigError",
    "build_section",
    "check_keys",
    "check_type",
    "close_matches",
    "describe",
    "did_you_mean",
    "dotted",
    "field_types",
    "matches",
    "merge",
    "nested_section",
    "read_yaml",
]


class ConfigError(ValueError):
    """A training config that cannot be used; the message names the key and what is wrong with it."""


class _Loader(yaml.SafeLoader):
    """YAML as people write it: `1e-3` is a float (YAML 1.1 wants `1.0e-3`) and a repeated key is an error."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(
                    f"Key `{key}` appears twice in the same section (line {key_node.start_mark.line + 1})."
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(\d[\d_]*(\.\d*)?|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def read_yaml(path) -> dict:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No such config file: {path}")
    with open(path, encoding="utf-8") as file:
        try:
            raw = yaml.load(file, Loader=_Loader)
        except yaml.YAMLError as error:
            raise ConfigError(f"{path} is not valid YAML: {error}") from error
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping with `stage`, `output_dir`, `model`, `data` and `training`.")
    return raw


def merge(base: dict, overrides: dict) -> dict:
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


# --------------------------------------------------------------------------------------------------------------------
# Keys and types


def dotted(where: str, key) -> str:
    return f"{where}.{key}" if where else str(key)


def check_keys(raw, cls, where: str):
    """Unknown and missing keys of the section `where`, whose schema is the dataclass `cls`."""
    if not isinstance(raw, dict):
        raise ConfigError(f"`{where}` must be a mapping of keys to values, got {raw!r:.80}.")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [key for key in raw if key not in fields]
    if unknown:
        section = f"`{where}`" if where else "the top level"
        raise ConfigError(
            f"Unknown key `{dotted(where, unknown[0])}`; the keys of {section} are: {', '.join(fields)}."
        )
    for name, f in fields.items():
        if name not in raw and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"Missing required key `{dotted(where, name)}`.")


def close_matches(key, names) -> list[str]:
    """The `names` a mistyped `key` likely meant, likeliest first: close spellings (`hiden_size`, `num_layers` for
    `num_hidden_layers`), then names with the key inside (or inside the key) or with its words in another order."""
    key = str(key).lower()
    lowered = {str(name).lower(): name for name in names}
    spelled = [lowered[name] for name in difflib.get_close_matches(key, list(lowered), n=5, cutoff=0.7)]

    def similar(name: str) -> bool:
        name = name.lower()
        inside = len(key) > 3 and (key in name or name in key)
        return inside or sorted(key.split("_")) == sorted(name.split("_"))

    return spelled + [name for name in sorted(names) if name not in spelled and similar(name)]


def did_you_mean(key, names, most: int = 8) -> str:
    """` Did you mean `a`, `b`?` for an error message (at most `most` names), or "" when nothing is close."""
    close = close_matches(key, names)[:most]
    return f" Did you mean {', '.join(f'`{name}`' for name in close)}?" if close else ""


def build_section(cls, raw, where: str):
    """The dataclass `cls` from the YAML mapping `raw` of the section `where`, keys and types checked. A field
    annotated with a dataclass (or a dataclass or None) is a nested section: its mapping is built the same way,
    its keys named `where.field.key` in errors."""
    check_keys(raw, cls, where)
    hints = typing.get_type_hints(cls)
    values = {}
    for key, value in raw.items():
        section = nested_section(hints[key])
        if section is not None and isinstance(value, dict):
            values[key] = build_section(section, value, dotted(where, key))
        else:
            check_type(value, hints[key], dotted(where, key))
            values[key] = value
    return cls(**values)


def nested_section(annotation):
    """The dataclass a field of that annotation holds as a nested section (`Section` or `Section | None`), or None."""
    options = typing.get_args(annotation) if typing.get_origin(annotation) in (Union, types.UnionType) else ()
    sections = [arg for arg in options or (annotation,) if isinstance(arg, type) and dataclasses.is_dataclass(arg)]
    return sections[0] if len(sections) == 1 else None


def field_types(cls) -> dict:
    """The annotation of each init field of the dataclass `cls`, resolved field by field: one that cannot be resolved
    (a name imported only for type checkers, like transformers' `torch.dtype`) is `Any` rather than an error."""
    resolved = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        annotation = f.type
        if isinstance(annotation, str):
            owner = next((base for base in cls.__mro__ if f.name in getattr(base, "__annotations__", {})), cls)
            try:  # what typing.get_type_hints does, one field at a time
                annotation = eval(annotation, vars(sys.modules[owner.__module__]))
            except Exception:  # an unresolvable annotation checks nothing
                annotation = Any
        resolved[f.name] = annotation
    return resolved


def check_type(value, annotation, key: str):
    if not matches(value, annotation):
        raise ConfigError(f"`{key}` must be {describe(annotation)}, got {value!r:.80} ({type(value).__name__}).")


def matches(value, annotation) -> bool:
    """Whether a YAML value fits a type annotation. An int fits a float field; a bool is not an int. Annotations
    this does not know (classes no YAML value can be) are left to the constructor that uses the value."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is Any:
        return True
    if annotation is type(None) or annotation is None:
        return value is None
    if origin in (Union, types.UnionType):
        return any(matches(value, arg) for arg in args)
    if origin is Literal:
        return any(value == arg and type(value) is type(arg) for arg in args)
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    if annotation is list or origin is list:
        return isinstance(value, list) and all(matches(item, args[0]) for item in value if args)
    if annotation is tuple or origin is tuple:  # YAML has no tuples: a list of the right items stands for one
        if not isinstance(value, (list, tuple)):
            return False
        if not args or args[-1] is Ellipsis:
            return all(matches(item, args[0]) for item in value) if args else True
        return len(value) == len(args) and all(matches(item, arg) for item, arg in zip(value, args))
    if annotation is dict or origin is dict:
        if not isinstance(value, dict):
            return False
        return not args or all(matches(k, args[0]) and matches(v, args[1]) for k, v in value.items())
    if isinstance(annotation, type) and issubclass(annotation, Enum):
        return isinstance(value, annotation) or value in [member.value for member in annotation]
    if isinstance(annotation, type):
        return isinstance(value, annotation)
    return True


_NAMES = {
    bool: "true or false",
    int: "an integer",
    float: "a number",
    str: "a string",
    list: "a list",
    dict: "a mapping",
}


def describe(annotation) -> str:
    """What a type annotation asks for, in words: `an integer`, `one of 'a', 'b'`, `a list of a string or null`."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is type(None) or annotation is None:
        return "null"
    if origin in (Union, types.UnionType):
        return " or ".join(describe(arg) for arg in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(arg) for arg in args)
    if origin in (list, dict):
        return _NAMES[origin] + (f" of {describe(args[0])}" if origin is list and args else "")
    if annotation is tuple or origin is tuple:
        return "a list" + (f" of {len(args)} items" if args and args[-1] is not Ellipsis else "")
    if isinstance(annotation, type) and issubclass(annotation, Enum):
        return "one of " + ", ".join(repr(member.value) for member in annotation)
    if isinstance(annotation, type) and dataclasses.is_dataclass(annotation):
        return "a mapping with the keys " + ", ".join(f.name for f in dataclasses.fields(annotation) if f.init)
    return _NAMES.get(annotation, getattr(annotation, "__name__", str(annotation)))
