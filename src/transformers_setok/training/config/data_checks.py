"""The `data` section of each stage: values beyond their types, keys the chosen format would ignore, templates, and,
with `check_paths`, the files and folders named."""

import dataclasses
import glob
import os

from .bounds import check_count
from .schema import (
    EditingDataConfig,
    PretrainDataConfig,
    SegmentationDataConfig,
    SFTDataConfig,
    TokenizerDataConfig,
)
from .typed_yaml import ConfigError

__all__ = [
    "check_editing_data",
    "check_pretrain_data",
    "check_segmentation_data",
    "check_sft_data",
    "check_template",
    "check_tokenizer_data",
]

# Data keys that only one format reads: under another format a changed value would be ignored without a word.
_ONE_FORMAT_ONLY = {
    "split": "hub",
    "image_column": "hub",
    "messages_column": "hub",
    "data_files": "hub",
    "webdataset_columns": "webdataset",
}
_PRETRAIN_FORMAT_ONLY = {
    "caption_prompt": "image_text",
    "captioning": "image_text",
    "text_to_image": "image_text",
    "text_to_image_template": "image_text",
    **_ONE_FORMAT_ONLY,
}
# `data.segmentation` keys that only some of its formats read.
_SEGMENTATION_FORMATS_ONLY = {
    "instances": ("refcoco",),
    "image_folder": ("jsonl", "refcoco"),
    "split": ("refcoco", "hub"),
    "data_files": ("hub",),
}
# `data.editing` keys that only some of its formats read.
_EDITING_FORMATS_ONLY = {
    "image_folder": ("jsonl",),
    "split": ("instructpix2pix", "magicbrush"),
    "data_files": ("instructpix2pix", "magicbrush"),
    "source_column": ("instructpix2pix", "magicbrush"),
    "instruction_column": ("instructpix2pix", "magicbrush"),
    "target_column": ("instructpix2pix", "magicbrush"),
}
# The stage-3 sources that are read in memory only, as a message names their records.
_NOT_STREAMED = {"segmentation": "referring-segmentation records", "editing": "image edits"}
# What `data.segmentation.format: refcoco` cannot do without.
_REFCOCO_NEEDS = {
    "instances": "the COCO instances.json beside the refs pickle",
    "image_folder": "the folder of the COCO images (train2014/)",
}
# `data` keys that only the records of `data.path` use: `max_length` bounds every sample, `streaming` has its own
# check with segmentation data.
_PATH_KEYS = (
    "format",
    "image_folder",
    "split",
    "image_column",
    "messages_column",
    "data_files",
    "on_error",
    "verify_images",
    "webdataset_columns",
)


def check_tokenizer_data(data: TokenizerDataConfig, check_paths: bool):
    check_template(data.concept_template, "data.concept_template", "concept", "'a photo of a {}'")
    if data.format != "webdataset" and data.webdataset_columns is not None:
        raise ConfigError("`data.webdataset_columns` applies to the `webdataset` format only: drop it.")
    _check_files(data, check_paths)


def check_pretrain_data(data: PretrainDataConfig, check_paths: bool):
    _check_conversations(data, _PRETRAIN_FORMAT_ONLY)
    if not (data.captioning or data.text_to_image):
        raise ConfigError("`data.captioning` and `data.text_to_image` are both false: nothing would be trained.")
    if data.text_to_image:
        check_template(data.text_to_image_template, "data.text_to_image_template", "caption", "'Draw {}.'")
    _check_files(data, check_paths)


def check_sft_data(data: SFTDataConfig, check_paths: bool):
    segmentation, editing = data.segmentation, data.editing
    for key, source in (("segmentation", segmentation), ("editing", editing)):
        if source is not None and data.streaming:
            raise ConfigError(
                f"`data.streaming` with `data.{key}`: {_NOT_STREAMED[key]} are not streamed yet; set "
                "`data.streaming: false` (every source is then read in memory) or train on `data.path` alone."
            )
    if data.path is not None:
        _check_conversations(data, _ONE_FORMAT_ONLY)
        _check_files(data, check_paths)
    elif segmentation is None and editing is None:
        raise ConfigError(
            "`data` needs `path` (conversations) and/or `segmentation` (referring-segmentation records) and/or "
            "`editing` (image edits): set one."
        )
    else:
        if data.max_length is not None:
            check_count(data.max_length, "data.max_length")
        defaults = {f.name: f.default for f in dataclasses.fields(data)}
        for key in _PATH_KEYS:
            if getattr(data, key) != defaults[key]:
                raise ConfigError(
                    f"`data.{key}` applies to the records of `data.path`, which is not set (stage 3 trains on "
                    "`data.editing` and/or `data.segmentation` alone): drop it (those sections have their own "
                    "`image_folder`, `split`, `data_files`, `on_error` and `verify_images`)."
                )
    if segmentation is not None:
        check_segmentation_data(segmentation, check_paths)
    if editing is not None:
        check_editing_data(editing, check_paths)


def check_segmentation_data(data: SegmentationDataConfig, check_paths: bool):
    """The referring-segmentation source of stage 3: the keys its format reads, its prompt, and its files."""
    where = "data.segmentation"
    _check_format_keys(data, _SEGMENTATION_FORMATS_ONLY, where)
    if data.format == "refcoco":
        for key, what in _REFCOCO_NEEDS.items():
            if getattr(data, key) is None:
                raise ConfigError(f"`{where}.format` `refcoco` needs `{where}.{key}`: {what}.")
    if data.prompt is not None and "{expression}" not in data.prompt:
        raise ConfigError(
            f"`{where}.prompt` {data.prompt!r} does not hold `{{expression}}`, where each referring expression goes, "
            "so every request would read the same: as in 'Please segment: {expression}'."
        )
    if check_paths:
        _check_source_files(data, where, hub=data.format == "hub", files=("path", "instances"))


def check_editing_data(data: EditingDataConfig, check_paths: bool):
    """The image-editing source of stage 3: the keys its format reads, and its files."""
    where = "data.editing"
    _check_format_keys(data, _EDITING_FORMATS_ONLY, where)
    for key in ("source_column", "instruction_column", "target_column"):
        if getattr(data, key) == "":
            raise ConfigError(f"`{where}.{key}` is empty: name the column, or drop the key for the layout's own.")
    if check_paths:
        _check_source_files(data, where, hub=data.format != "jsonl", files=("path",))


def _check_format_keys(data, formats_only: dict, where: str):
    """A key that the section's format does not read, set to anything but its default, is refused."""
    defaults = {f.name: f.default for f in dataclasses.fields(data)}
    for key, formats in formats_only.items():
        if data.format not in formats and getattr(data, key) != defaults[key]:
            names = " and ".join(f"`{name}`" for name in formats)
            raise ConfigError(
                f"`{where}.{key}` applies to the {names} format{'s' if len(formats) > 1 else ''} only; "
                f"`{where}.format` is `{data.format}`, which ignores it: drop it."
            )


def _check_source_files(data, where: str, hub: bool, files: tuple[str, ...]):
    """A Hub-or-folder source's local folder exists; a file source's `files` and `image_folder` exist."""
    if hub:
        from ..data import is_local_path

        if is_local_path(data.path) and not os.path.exists(data.path):
            raise FileNotFoundError(f"`{where}.path`: no such dataset folder: {data.path}")
        return
    for key in files:
        path = getattr(data, key)
        if path is not None and not os.path.isfile(path):
            raise FileNotFoundError(f"`{where}.{key}`: no such file: {path}")
    if data.image_folder is not None and not os.path.isdir(data.image_folder):
        raise FileNotFoundError(f"`{where}.image_folder`: no such folder: {data.image_folder}")


def check_template(template: str, key: str, what: str, example: str):
    """The template must take the {what} through one `{}`: other fields would fail mid-training, and a template without
    a field would give every record the same text."""
    try:
        filled = {template.format(value) for value in ("x", "y")}
    except (IndexError, KeyError, ValueError, AttributeError, TypeError) as error:
        raise ConfigError(
            f"`{key}` {template!r} cannot be filled with a {what} ({type(error).__name__}: {error}): use one `{{}}` "
            f"for it, as in {example}."
        ) from error
    if len(filled) == 1:
        raise ConfigError(
            f"`{key}` {template!r} does not use the {what}, so every one reads the same: put a `{{}}` where it goes, "
            f"as in {example}."
        )


def _check_conversations(data: PretrainDataConfig | SFTDataConfig, format_only: dict[str, str]):
    """What the chat data sections of stages 2 and 3 share: the length bound, and the keys of other formats."""
    if data.max_length is not None:
        check_count(data.max_length, "data.max_length")
    if data.format == "hub" and data.image_folder is not None:
        raise ConfigError(
            "`data.image_folder` applies to `image_text` and `llava` files; a `hub` dataset has its own."
        )
    defaults = {f.name: f.default for f in dataclasses.fields(data)}
    for key, used_by in format_only.items():
        if data.format != used_by and getattr(data, key) != defaults[key]:
            raise ConfigError(
                f"`data.{key}` applies to the `{used_by}` format only; `data.format` is `{data.format}`, which "
                "ignores it: drop it."
            )


def _check_files(data, check_paths: bool):
    """The data file (or, for `hub`, a local dataset folder) and the image folder exist. A list of paths, a folder or
    a glob are streaming's (and webdataset's shards)."""
    sharded = data.streaming or data.format == "webdataset"
    if isinstance(data.path, list) and not sharded:
        raise ConfigError("`data.path` is a list of files: set `data.streaming: true` to read them as shards.")
    if not check_paths:
        return
    if sharded and data.format != "hub":
        for path in data.path if isinstance(data.path, list) else [data.path]:
            if not (os.path.exists(path) or glob.glob(path)):
                raise FileNotFoundError(f"`data.path`: no such file, folder or pattern: {path}")
        return
    if data.format == "hub":
        from ..data import is_local_path

        if is_local_path(data.path) and not os.path.exists(data.path):
            raise FileNotFoundError(f"`data.path`: no such dataset folder: {data.path}")
        return
    if not os.path.isfile(data.path):
        raise FileNotFoundError(f"`data.path`: no such file: {data.path}")
    if data.image_folder is not None and not os.path.isdir(data.image_folder):
        raise FileNotFoundError(f"`data.image_folder`: no such folder: {data.image_folder}")
