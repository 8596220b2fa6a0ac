"""Training data: loaders that turn files or Hub datasets into checked `datasets.Dataset`s.

Two schemas come out, and the collators and trainers rely on them exactly:

* Conversations, for stages 2 and 3 (`load_llava_json`, `load_hub_dataset`, `captions_to_messages`):
  `images` is a list of images (`List(Image())`: file paths or bytes, decoded to PIL on access) and `messages` is
  TRL's conversational vision format, a list of {"role": "system" | "user" | "assistant", "content": [part, ...]}
  where a part is {"type": "image", "text": None} or {"type": "text", "text": str}. The image parts, read across
  all messages in order, are the images in order, so there are exactly `len(images)` of them (none when a record is
  text only).
* Image-text pairs, for stage 1 (`load_image_text_jsonl`): `images` holds exactly one image, `caption` is a string
  or None and `concepts` a list of strings, possibly empty; every record has a caption or a concept.
* Referring segmentation, for stage 3 (`load_refcoco`, `load_segmentation_jsonl`, `load_segmentation_dataset`, and
  `transformers_setok.scenes`; `SEGMENTATION_FEATURES`): `images` holds exactly one image; exactly one of
  `expression` (the referring phrase, "the bag on the left") and `messages` (a conversation in the format above,
  with exactly one image part, ending with the user's request) is set, the other is None; `mask` is the object's
  mask as COCO compressed RLE, `{"size": [height, width], "counts": str}`, of the image's own size, checked at load
  time to be binary and not empty. `masks.decode_mask(record["mask"])` gives it back as a bool `(height, width)`
  array; the image processor's `masks=` brings it to the model's resolution with the image (`target_masks`). The
  collator writes the prompt around `expression` and appends the mask answer after the last message.
* Image editing, for stage 3 (`load_instructpix2pix`, `load_magicbrush`, `load_editing_jsonl`, and
  `transformers_setok.scenes.edit_records`; `EDITING_FEATURES`): `images` holds exactly two images, the source then
  the target (the edited image); `instruction` is the edit asked for ("replace the bag with a sneaker"), a string
  that is not blank and holds no `<image>`; `edit_mask` is None or the edited region, a mask as `mask` above (COCO
  RLE of the images' size, binary, not empty). A record is the chat "user: <source image> {instruction}" ->
  "assistant: <target image>": the target sits in the assistant turn, an image to draw, as a text-to-image answer
  does (`editing_messages`; `edits_to_messages` writes the records as conversations the collator trains today).
  The mask is `edit_mask`, not `mask`: the collator reads a record with a `mask` as a segmentation request.
  Source and target must be the same size (else "image size mismatch"): an instruction edit keeps the frame (the
  pairs of MagicBrush and InstructPix2Pix are pixel-aligned), MagicBrush's L1/L2 compare the two pixel by pixel,
  and the edit mask must fit both; a pair of two sizes is most often two images wrongly paired, and a data set that
  does change sizes can resize its targets before it is loaded.

Every record is checked at load time: the JSON parses, the image files exist and are images (each header is read;
`verify_images=True` also reads the rest of each file), the placeholders match the images, the roles are known.
`on_error="fail"` raises `DataValidationError` at the first bad record, naming the file, the record and the
problem; `on_error="skip"` drops the bad records and logs how many, by reason, at WARNING.

`streaming=True` (the conversation and image-text loaders) returns a `datasets.IterableDataset` of the same records
instead, checked one by one as they are read, by the same rules (see `streaming`, which also has the webdataset reader
and what the Trainer needs to train and resume on a stream).
"""

import functools
import io
import json
import logging
import os
import pickle
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import datasets
import numpy as np
import PIL.Image

from .. import _checks
from . import masks

logger = logging.getLogger(__name__)

IMAGE_PLACEHOLDER = "<image>"
ROLES = ("system", "user", "assistant")
LLAVA_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}
ON_ERROR = ("fail", "skip")
REQUIRE_TEXT = (None, "caption", "concepts")  # image-text records: the text every record must have, if any
SHOWN_PER_REASON = 3  # records named per reason in the skip summary; the count covers them all
STREAM_SKIP_LOG_EVERY = 1000  # a stream logs its first skipped record, then every this many

_TEXT = datasets.Value("string")
CONVERSATION_FEATURES = datasets.Features(
    {
        "images": datasets.List(datasets.Image()),
        "messages": datasets.List({"role": _TEXT, "content": datasets.List({"type": _TEXT, "text": _TEXT})}),
    }
)
IMAGE_TEXT_FEATURES = datasets.Features(
    {"images": datasets.List(datasets.Image()), "caption": _TEXT, "concepts": datasets.List(_TEXT)}
)
SEGMENTATION_FEATURES = datasets.Features(
    {
        "images": CONVERSATION_FEATURES["images"],
        "expression": _TEXT,
        "messages": CONVERSATION_FEATURES["messages"],
        "mask": {"size": datasets.List(datasets.Value("int64")), "counts": _TEXT},
    }
)
EDITING_FEATURES = datasets.Features(
    {
        "images": CONVERSATION_FEATURES["images"],  # [source, target]
        "instruction": _TEXT,
        "edit_mask": SEGMENTATION_FEATURES["mask"],  # None when the record has no mask
    }
)
EDIT_ROLES = ("source", "target")  # the order of an editing record's images

# A Hub id: "name" or "owner/name"; anything else (absolute, "./x", "a/b/c") can only be a local path
# (`is_local_path`). Defined once, in `transformers_setok._checks`.
HUB_ID = _checks.HUB_ID
# One newline, Unix or Windows, at the start / end of a piece of text next to a placeholder.
_LEADING_NEWLINE = re.compile(r"\A\r?\n")
_TRAILING_NEWLINE = re.compile(r"\r?\n\Z")


class DataValidationError(ValueError):
    """A record that cannot be used. The message names the file, the record and the problem; `reason` is the kind
    of problem alone, which the skip summary counts by."""

    def __init__(self, where, reason: str, detail: str = ""):
        super().__init__(f"{where}: {reason}" + (f": {detail}" if detail else ""))
        self.where, self.reason = where, reason


@dataclass(frozen=True)
class RecordPlace:
    """Where a record lives, as messages print it: `train.json, record 3 (id 'abc')`."""

    source: str
    position: str  # "line 7" (1-based, as editors count) or "record 3" (0-based, as Python indexes)
    id: str | None = None

    @property
    def label(self) -> str:
        return self.position if self.id is None else f"{self.position} (id {self.id!r})"

    def __str__(self):
        return f"{self.source}, {self.label}"


# --- Public loaders ---


def load_llava_json(
    json_path, image_folder=None, *, on_error: str = "fail", verify_images: bool = False, streaming: bool = False
):
    """LLaVA-format records -> conversations.

    `json_path` holds a JSON list of records (or one record a line when it ends in `.jsonl`) like
    {"id": "1", "image": "a.jpg", "conversations": [{"from": "human", "value": "<image>\\nWhat is it?"},
    {"from": "gpt", "value": "A cat."}]}. `image` may be a list of paths, or absent for a text-only record; paths are
    relative to `image_folder` (default: the JSON file's folder). Each `<image>` becomes an image part.
    Every image's header is read, so a file that is no image is a bad record; `verify_images=True` also reads the
    rest of every image to check that it is whole (slow on big sets).

    `streaming=True`: a `datasets.IterableDataset` (`streaming.stream_llava_json`); `json_path` may then also be a
    folder, a glob or a list of files, one shard each.
    """
    if streaming:
        from .streaming import stream_llava_json

        return stream_llava_json(json_path, image_folder, on_error=on_error, verify_images=verify_images)
    return _load_record_file(
        json_path,
        "json_path",
        image_folder,
        read_json_records,
        llava_to_conversation,
        CONVERSATION_FEATURES,
        on_error=on_error,
        verify_images=verify_images,
    )


def load_image_text_jsonl(
    jsonl_path,
    image_folder=None,
    *,
    on_error: str = "fail",
    verify_images: bool = False,
    require_text: str | None = None,
    streaming: bool = False,
):
    """Images with captions and/or concepts -> image-text pairs (stage 1; `captions_to_messages` for stage 2).

    Each line of `jsonl_path` is like {"image": "a.jpg", "caption": "A cat on a sofa.", "concepts": ["cat", "sofa"]},
    where either `caption` or `concepts` may be left out, not both. Image paths are relative to `image_folder`
    (default: the JSONL file's folder); images are checked as by `load_llava_json`. `require_text="caption"` (or
    `"concepts"`) also makes a record without that text a bad one ("no caption" / "no concepts").

    `streaming=True`: a `datasets.IterableDataset` (`streaming.stream_image_text_jsonl`); `jsonl_path` may then also
    be a folder, a glob or a list of files, one shard each.
    """
    check_require_text(require_text)
    if streaming:
        from .streaming import stream_image_text_jsonl

        return stream_image_text_jsonl(
            jsonl_path, image_folder, on_error=on_error, verify_images=verify_images, require_text=require_text
        )
    return _load_record_file(
        jsonl_path,
        "jsonl_path",
        image_folder,
        read_jsonl,
        functools.partial(to_image_text, require_text=require_text),
        IMAGE_TEXT_FEATURES,
        on_error=on_error,
        verify_images=verify_images,
    )


def load_hub_dataset(
    name_or_path,
    *,
    split: str = "train",
    image_column: str = "images",
    messages_column: str = "messages",
    data_files=None,
    on_error: str = "fail",
    verify_images: bool = False,
    streaming: bool = False,
    num_shards: int | None = None,
):
    """A dataset with image and messages columns -> conversations.

    `name_or_path` is a Hub id, a local folder (one written by `save_to_disk`, or data files `load_dataset` reads) or
    a `datasets.Dataset` already loaded; with `data_files` (files, a glob or a split -> files dict) it is what
    `load_dataset` reads them with: a builder such as `"parquet"` or `"json"`, or a Hub id. The image column holds a
    list of images or, as a fallback when `image_column="images"` is absent, an `image` column with one image a
    record. Message contents may be lists of parts or strings; a string is split at `<image>` placeholders, and when
    no message has one (TRL's convention) the images go before the first user message's text. Columns other than
    these two are dropped.

    `streaming=True`, or a `datasets.IterableDataset` given: a `datasets.IterableDataset`
    (`streaming.stream_hub_dataset`, where `num_shards` is described).
    """
    if streaming or isinstance(name_or_path, (datasets.IterableDataset, datasets.IterableDatasetDict)):
        from .streaming import stream_hub_dataset

        return stream_hub_dataset(
            name_or_path,
            split=split,
            image_column=image_column,
            messages_column=messages_column,
            data_files=data_files,
            num_shards=num_shards,
            on_error=on_error,
            verify_images=verify_images,
        )
    check_on_error(on_error)
    dataset, source = open_dataset(name_or_path, split, data_files)
    dataset, image_column = conversation_columns(dataset, image_column, messages_column, source)
    columns = dict(image_column=image_column, messages_column=messages_column)

    def check(indexed_row, where):
        index, row = indexed_row
        check_hub_row(row, where, verify_images=verify_images, **columns)
        return index

    records = (
        (RecordPlace(source, f"record {index}", record_id(row)), (index, row)) for index, row in enumerate(dataset)
    )
    keep = _collect(records, check, on_error, source)
    if len(keep) < len(dataset):
        dataset = dataset.select(keep)
    return dataset.map(
        _hub_to_conversation,  # images are not opened again: every row passed the check above
        fn_kwargs=dict(where=source, **columns),  # nor is `where` ever shown, for the same reason
        remove_columns=dataset.column_names,
        features=CONVERSATION_FEATURES,
    )


def load_webdataset(
    tar_paths,
    columns: dict | None = None,
    *,
    on_error: str = "fail",
    verify_images: bool = False,
    require_text: str | None = None,
    streaming: bool = False,
):
    """WebDataset tar shards -> conversations or image-text pairs, as `columns` maps the tar members to the record's
    fields (`streaming.stream_webdataset` describes the mapping and the checks). In memory, the images' bytes are held
    in the dataset: for big sets, use `streaming=True`."""
    from .streaming import stream_webdataset

    stream = stream_webdataset(
        tar_paths, columns, on_error=on_error, verify_images=verify_images, require_text=require_text
    )
    if streaming:
        return stream
    features = stream.features
    undecoded = stream.cast_column("images", undecoded_images(features["images"]))  # the tar's bytes, not re-encoded
    return datasets.Dataset.from_list(list(undecoded), features=features)


def captions_to_messages(dataset, prompt: str = "Describe the image."):
    """Image-text pairs -> captioning conversations for stage 2: the user sends the image and `prompt`, the
    assistant answers with the caption. Records with concepts but no caption are left out, with a count in the log
    (for a `datasets.IterableDataset`, lazily: the first one and every `STREAM_SKIP_LOG_EVERY`-th are logged)."""
    return _captions_to_chats(dataset, _caption_to_conversation, "captions_to_messages", prompt=prompt)


def captions_to_generation_messages(dataset, template: str = "Generate an image of {}"):
    """Image-text pairs -> text-to-image conversations for stage 2 (the generation head): the user asks with
    `template.format(caption)`, the assistant answers with the image. Records without a caption are left out, with a
    count in the log (lazily for a `datasets.IterableDataset`, as in `captions_to_messages`)."""
    return _captions_to_chats(dataset, _caption_to_generation, "captions_to_generation_messages", template=template)


def _captions_to_chats(dataset, to_chat, name: str, **fn_kwargs):
    if isinstance(dataset, datasets.IterableDataset):
        captioned = dataset.filter(_count_caption, input_columns="caption", fn_kwargs={"left_out": _LeftOut(name)})
    else:
        captioned = dataset.filter(_has_caption, input_columns="caption")
        if len(captioned) < len(dataset):
            logger.warning(
                "%s: left out %d of %d records, which have concepts but no caption.",
                name,
                len(dataset) - len(captioned),
                len(dataset),
            )
        if len(captioned) == 0:
            raise ValueError(f"{name}: none of the {len(dataset)} records has a caption.")
    return _to_chats(captioned, to_chat, IMAGE_TEXT_FEATURES, **fn_kwargs)


def _to_chats(dataset, to_chat, features: datasets.Features, **fn_kwargs):
    """Records of `features` (in memory or streamed) -> conversations, `to_chat(record, **fn_kwargs)` each."""
    # Paths stay paths: decoding to PIL here would re-encode every image into the new table.
    dataset = dataset.cast_column("images", datasets.List(datasets.Image(decode=False)))
    if isinstance(dataset, datasets.IterableDataset):
        # `cast`, not `map(features=)`: a stream's map only declares them, and the records must get them.
        columns = dataset.column_names or list(features)
        chats = dataset.map(_stored_chat, fn_kwargs=dict(to_chat=to_chat, **fn_kwargs), remove_columns=columns)
        return chats.cast(CONVERSATION_FEATURES)
    return dataset.map(
        to_chat, fn_kwargs=fn_kwargs, remove_columns=dataset.column_names, features=CONVERSATION_FEATURES
    )


class _LeftOut:
    """Counts the records of a stream that `captions_to_*` leaves out, and logs the first and every
    `STREAM_SKIP_LOG_EVERY`-th (a stream has no end to log a total at)."""

    def __init__(self, name: str):
        self.name, self.read, self.left_out = name, 0, 0

    def __call__(self, caption) -> bool:
        self.read += 1
        if caption is not None:
            return True
        self.left_out += 1
        if self.left_out == 1 or self.left_out % STREAM_SKIP_LOG_EVERY == 0:
            logger.warning(
                "%s: left out %d of the %d records read so far, which have concepts but no caption.",
                self.name,
                self.left_out,
                self.read,
            )
        return False


def _count_caption(caption, left_out: _LeftOut) -> bool:
    return left_out(caption)


def _stored_chat(record: dict, to_chat, **fn_kwargs) -> dict:
    return stored_image(to_chat(record, **fn_kwargs))


# --- Arguments ---


def conversation_columns(dataset, image_column, messages_column: str, source: str):
    """A Hub/saved data set (in memory or streamed) cut to its image, messages (and id) columns, images kept as
    {"bytes", "path"} (checking a record needs the image count and paths, not pixels). Returns it and the image
    column's name."""
    image_column = find_image_column(dataset, image_column, source)
    if messages_column not in dataset.column_names:
        raise ValueError(
            f"{source} has no {messages_column!r} column (`messages_column`); its columns are {dataset.column_names}."
        )
    id_column = ["id"] if "id" in dataset.column_names and "id" not in (image_column, messages_column) else []
    dataset = dataset.select_columns([image_column, messages_column, *id_column])
    if undecoded_images(dataset.features[image_column]) != dataset.features[image_column]:
        dataset = dataset.cast_column(image_column, undecoded_images(dataset.features[image_column]))
    return dataset, image_column


def is_local_path(name: str) -> bool:
    """Whether `name` can only mean a local path: it exists, or it is no Hub id (`HUB_ID`)."""
    return os.path.exists(name) or not HUB_ID.fullmatch(name)


def check_on_error(on_error):
    if on_error not in ON_ERROR:
        raise ValueError(f"`on_error` must be one of {ON_ERROR}, got {on_error!r}.")


def check_require_text(require_text):
    if require_text not in REQUIRE_TEXT:
        raise ValueError(f"`require_text` must be one of {REQUIRE_TEXT}, got {require_text!r}.")


def existing_file(path, argument: str) -> str:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"`{argument}`: no such file: {path}")
    return path


def existing_folder(path, argument: str) -> str:
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"`{argument}`: no such folder: {path}")
    return path


# --- Reading records, and keeping the good ones ---


def _load_record_file(
    path,
    argument: str,
    image_folder,
    read: Callable[[str], Iterable],
    convert: Callable,
    features: datasets.Features,
    *,
    on_error: str,
    verify_images: bool,
) -> datasets.Dataset:
    """What the file loaders share: check the arguments (`argument` names `path` in messages), `read(path)` the
    (where, record) pairs, `convert(record, where, images)` each with the `ImageFolder` (by default the file's
    folder), keep the good rows and make them a dataset of `features`."""
    check_on_error(on_error)
    path = existing_file(path, argument)
    folder = existing_folder(image_folder or os.path.dirname(path) or ".", "image_folder")
    images = ImageFolder(folder, verify_images)

    def convert_one(record, where):
        return convert(record, where, images)

    rows = _collect(read(path), convert_one, on_error, path)
    return datasets.Dataset.from_list(rows, features=features)


def read_json_records(path: str):
    """Yield (where, record) from a JSON list, or from JSON Lines when the name ends in `.jsonl`."""
    if path.endswith(".jsonl"):
        yield from read_jsonl(path)
        return
    records = read_json_document(path)
    if not isinstance(records, list):
        raise DataValidationError(path, "bad JSON", f"expected a list of records, got a {type(records).__name__}")
    for index, record in enumerate(records):
        yield RecordPlace(path, f"record {index}", record_id(record)), record


def read_json_document(path: str):
    """The JSON value in file `path`. A broken or undecodable document fails whatever `on_error` says: it loses
    every record."""
    with open(path, "rb") as file:
        data = file.read()
    try:
        # utf-8-sig: editors on Windows start files with a BOM, which would make the first character bad JSON.
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        # Like a broken document, an undecodable one fails whatever `on_error` says.
        line = data[: error.start].count(b"\n") + 1
        where = RecordPlace(path, f"line {line}")
        raise DataValidationError(where, "bad encoding", f"not UTF-8: {error.reason}") from error
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        where = RecordPlace(path, f"line {error.lineno}, column {error.colno}")
        raise DataValidationError(where, "bad JSON", error.msg) from error


def read_jsonl(path: str):
    """Yield (where, record) a line; a line that does not parse yields its error, so that it can be skipped."""
    # Bytes, decoded a line at a time: a line that is not UTF-8 is then one bad record, not a crash of the whole file.
    with open(path, "rb") as file:
        for number, raw in enumerate(file, start=1):
            try:
                line = raw.decode("utf-8-sig")  # -sig: drops the BOM Windows editors put before line 1
            except UnicodeDecodeError as error:
                where = RecordPlace(path, f"line {number}")
                detail = f"not UTF-8 at byte {error.start} of the line: {error.reason}"
                yield where, DataValidationError(where, "bad encoding", detail)
                continue
            if not line.strip():
                continue  # blank lines (a trailing one, say) hold no record
            try:
                # Parsed without its line break: json counts columns in the text it is given, and a line cut short
                # would otherwise be reported at the break, "column 1" of a second line.
                record = json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as error:
                where = RecordPlace(path, f"line {number}")
                yield where, DataValidationError(where, "bad JSON", f"column {error.colno}: {error.msg}")
                continue
            yield RecordPlace(path, f"line {number}", record_id(record)), record


def record_id(record) -> str | None:
    if isinstance(record, dict) and record.get("id") is not None:
        return str(record["id"])
    return None


class SkipCount:
    """The records of `source` read, kept and skipped (by reason, the first `SHOWN_PER_REASON` of each named).

    With `log_every` (streams), the first skipped record and then every `log_every`-th are logged as they come, with
    the count so far: a stream read by a Trainer may never reach its end, where `finish` logs the total.
    """

    def __init__(self, source: str, log_every: int | None = None):
        self.source, self.log_every = source, log_every
        self.read = self.kept = 0
        self.counts: dict[str, int] = {}  # per reason, in the order the reasons first came
        self.shown: dict[str, list] = {}

    @property
    def skipped(self) -> int:
        return self.read - self.kept

    def add(self, error: "DataValidationError"):
        self.counts[error.reason] = self.counts.get(error.reason, 0) + 1
        shown = self.shown.setdefault(error.reason, [])
        if len(shown) < SHOWN_PER_REASON:
            shown.append(error.where)
        if self.log_every and (self.skipped == 1 or self.skipped % self.log_every == 0):
            logger.warning(
                "Skipped %d of the %d records of %s read so far: %s.",
                self.skipped,
                self.read,
                self.source,
                self.summary(),
            )

    def summary(self) -> str:
        """`2 missing image file (record 1 (id 'a'), record 4)` per reason."""
        parts = []
        for reason, count in self.counts.items():
            shown = ", ".join(where.label for where in self.shown[reason])
            parts.append(f"{count} {reason} ({shown}{', ...' if count > len(self.shown[reason]) else ''})")
        return "; ".join(parts)

    def finish(self):
        """At the end of `source`: log the skipped records, and refuse a source without a good record."""
        if self.skipped:
            logger.warning("Skipped %d of %d records of %s: %s.", self.skipped, self.read, self.source, self.summary())
        if self.read == 0:
            raise ValueError(f"{self.source} holds no records.")
        if not self.kept:
            raise ValueError(f"All {self.read} records of {self.source} are bad: {self.summary()}.")


def checked_records(records, convert, on_error: str, count: SkipCount):
    """The skip/fail rule, lazily: `convert(record, where)` for each (where, record) as it comes. A bad record (a
    `DataValidationError` raised, or given in place of the record) raises (`on_error="fail"`) or is counted in
    `count` and dropped."""
    for where, record in records:
        count.read += 1
        try:
            if isinstance(record, DataValidationError):
                raise record
            row = convert(record, where)
        except DataValidationError as error:
            if on_error == "fail":
                raise
            count.add(error)
            continue
        count.kept += 1
        yield row


def _collect(records, convert, on_error: str, source: str) -> list:
    """`checked_records` read to the end: the good rows; the drops are logged, and nothing left is an error."""
    count = SkipCount(source)
    kept = list(checked_records(records, convert, on_error, count))
    count.finish()
    return kept


def require_object(record, where):
    if not isinstance(record, dict):
        raise DataValidationError(where, "malformed record", f"expected a JSON object, got {_short(record)}")


def _short(value, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --- Text and images ---


def _text_to_parts(text: str) -> list[dict]:
    """Split `text` at each `<image>` into text and image parts, in order.

    LLaVA writes `<image>\\n` before the question (or `\\n<image>` after it); the newline only separated the image
    from the text, so one newline (`\\n`, or Windows' `\\r\\n`) next to each placeholder goes. Other whitespace
    is kept.
    """
    pieces = text.split(IMAGE_PLACEHOLDER)
    parts = []
    for index, piece in enumerate(pieces):
        if index > 0:
            parts.append({"type": "image"})
            piece = _LEADING_NEWLINE.sub("", piece, count=1)
        if index < len(pieces) - 1:
            piece = _TRAILING_NEWLINE.sub("", piece, count=1)
        if piece:
            parts.append({"type": "text", "text": piece})
    return parts or [{"type": "text", "text": ""}]  # an empty turn stays a turn, with an empty text


def _check_image_parts(messages: list[dict], num_images: int, where):
    num_parts = sum(part["type"] == "image" for message in messages for part in message["content"])
    if num_parts != num_images:
        raise DataValidationError(
            where, "placeholder count mismatch", f"{num_parts} image placeholders for {num_images} images"
        )


@dataclass(frozen=True)
class ImageFolder:
    """The folder a record file's image paths are relative to, and how closely to check the images."""

    path: str
    verify: bool  # read each image whole, not just its header

    def resolve(self, name: str, where) -> str:
        """The absolute path of image `name`, checked to be a file that is an image."""
        return self.resolve_sized(name, where)[0]

    def resolve_sized(self, name: str, where) -> tuple[str, tuple[int, int]]:
        """`resolve`, and the image's (height, width) from its header."""
        path = os.path.abspath(os.path.join(self.path, name))
        if not os.path.isfile(path):
            raise DataValidationError(where, "missing image file", f"{path} (from {name!r})")
        return path, _check_image(path, path, where, self.verify)


def _check_image(file, shown: str, where, verify: bool) -> tuple[int, int]:
    """Read the header of image `file` (a path or a binary file; `shown` names it): its format and size, no pixels.
    What fails here would fail in training, inside `datasets`' decoding, far from the record. `verify` also reads
    the rest of the file, which finds a truncated or corrupt one (slow on big sets). Returns (height, width)."""
    try:
        with PIL.Image.open(file) as image:
            if verify:
                image.verify()
            return image.height, image.width
    except PIL.UnidentifiedImageError as error:
        raise DataValidationError(where, "unreadable image", f"{shown}: not an image PIL can read") from error
    except Exception as error:  # PIL signals a broken file with many exception types
        raise DataValidationError(where, "unreadable image", f"{shown}: {error or type(error).__name__}") from error


# --- LLaVA records ---


def llava_to_conversation(record, where, images: ImageFolder) -> dict:
    require_object(record, where)
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise DataValidationError(where, "malformed message", "'conversations' must be a non-empty list of turns")
    messages = [_llava_turn_to_message(turn, where, number) for number, turn in enumerate(turns)]
    names = _llava_image_names(record, where)
    _check_image_parts(messages, len(names), where)
    return {"images": [images.resolve(name, where) for name in names], "messages": messages}


def _llava_turn_to_message(turn, where, number: int) -> dict:
    if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
        raise DataValidationError(
            where,
            "malformed message",
            f"conversations[{number}] needs 'from' and a string 'value', got {_short(turn)}",
        )
    role = LLAVA_ROLES.get(turn.get("from"))
    if role is None:
        raise DataValidationError(
            where,
            "unknown role",
            f"conversations[{number}] is from {turn.get('from')!r}, not one of {list(LLAVA_ROLES)}",
        )
    return {"role": role, "content": _text_to_parts(turn["value"])}


def _llava_image_names(record: dict, where) -> list[str]:
    names = record.get("image")
    if names is None:
        return []
    names = [names] if isinstance(names, str) else names
    if not isinstance(names, list) or not all(isinstance(name, str) and name for name in names):
        raise DataValidationError(
            where, "malformed image field", f"expected a path or a list of paths, got {_short(record['image'])}"
        )
    return names


# --- Image-text records ---


def to_image_text(record, where, images: ImageFolder, require_text: str | None = None) -> dict:
    require_object(record, where)
    name = record.get("image")
    if not isinstance(name, str) or not name:
        raise DataValidationError(where, "malformed image field", f"expected a path in 'image', got {_short(name)}")
    caption, concepts = image_texts(record, where, require_text)
    return {
        "images": [images.resolve(name, where)],
        "caption": caption,
        "concepts": concepts,
    }


def image_texts(record: dict, where, require_text: str | None = None) -> tuple[str | None, list[str]]:
    """The caption and concepts of an image-text record, checked (the webdataset reader shares this)."""
    caption, concepts = _caption(record, where), _concepts(record, where)
    if caption is None and not concepts:
        raise DataValidationError(where, "no caption or concepts", "a record needs a 'caption' or 'concepts'")
    if require_text == "caption" and caption is None:
        raise DataValidationError(where, "no caption", "`require_text='caption'`: this record has concepts only")
    if require_text == "concepts" and not concepts:
        raise DataValidationError(where, "no concepts", "`require_text='concepts'`: this record has a caption only")
    return caption, concepts


def _caption(record: dict, where) -> str | None:
    caption = record.get("caption")
    if caption is not None and not isinstance(caption, str):
        raise DataValidationError(where, "malformed caption", f"expected a string, got {_short(caption)}")
    return caption if caption and caption.strip() else None  # a blank caption teaches nothing: treat it as absent


def _concepts(record: dict, where) -> list[str]:
    concepts = record.get("concepts")
    if concepts is None:
        return []
    # A lone string would otherwise pass as a list of its characters.
    if not isinstance(concepts, list) or not all(isinstance(concept, str) and concept.strip() for concept in concepts):
        raise DataValidationError(where, "malformed concepts", f"expected a list of phrases, got {_short(concepts)}")
    return concepts


def _has_caption(caption) -> bool:
    return caption is not None


def _caption_to_conversation(record: dict, prompt: str) -> dict:
    user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}
    assistant = {"role": "assistant", "content": [{"type": "text", "text": record["caption"]}]}
    return {"images": record["images"], "messages": [user, assistant]}


def _caption_to_generation(record: dict, template: str) -> dict:
    user = {"role": "user", "content": [{"type": "text", "text": template.format(record["caption"])}]}
    assistant = {"role": "assistant", "content": [{"type": "image"}]}
    return {"images": record["images"], "messages": [user, assistant]}


# --- Hub datasets ---


def open_dataset(name_or_path, split: str, data_files=None, streaming: bool = False):
    """The split to load, and a name for it in messages. `streaming` opens files and Hub sets as a
    `datasets.IterableDataset`; a dataset already loaded, or saved with `save_to_disk`, is returned as it is."""
    if isinstance(name_or_path, (datasets.Dataset, datasets.IterableDataset)):
        return name_or_path, "the dataset"
    if isinstance(name_or_path, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        return _pick_split(name_or_path, split, "the dataset"), "the dataset"
    name = os.fspath(name_or_path)
    if data_files is None and _is_saved_dataset(name):
        return _pick_split(datasets.load_from_disk(name), split, name), name
    if not os.path.exists(name) and not HUB_ID.fullmatch(name):
        raise FileNotFoundError(f"`name_or_path`: no such folder: {name}")
    try:
        return datasets.load_dataset(name, data_files=data_files, split=split, streaming=streaming), name
    except OSError as error:  # not found on the Hub, no network, no data files
        raise FileNotFoundError(
            f"`name_or_path`: {name!r} is no local dataset folder, and loading it failed: {error}"
        ) from error


def _is_saved_dataset(path: str) -> bool:
    """A folder written by `save_to_disk`, which only `load_from_disk` reads."""
    return os.path.isfile(os.path.join(path, "state.json")) or os.path.isfile(os.path.join(path, "dataset_dict.json"))


def _pick_split(loaded, split: str, source: str):
    if isinstance(loaded, (datasets.Dataset, datasets.IterableDataset)):
        return loaded
    if split not in loaded:
        raise ValueError(f"{source} has no split {split!r} (`split`); its splits are {list(loaded)}.")
    return loaded[split]


def find_image_column(dataset, image_column: str, source: str) -> str:
    if image_column in dataset.column_names:
        return image_column
    if image_column == "images" and "image" in dataset.column_names:
        return "image"
    raise ValueError(
        f"{source} has no {image_column!r} column (`image_column`); its columns are {dataset.column_names}."
    )


def undecoded_images(feature):
    """`feature` with its images left as {"bytes", "path"} dicts (image columns of file paths stay strings)."""
    if isinstance(feature, datasets.Image):
        return datasets.Image(decode=False)
    if isinstance(feature, datasets.List) and isinstance(feature.feature, datasets.Image):
        return datasets.List(datasets.Image(decode=False))
    return feature


def _row_images(row: dict, image_column: str) -> list:
    """A row's images as a list: the column holds a list of images, one image, or None."""
    value = row[image_column]
    return [] if value is None else value if isinstance(value, list) else [value]


def _hub_to_conversation(row: dict, where, image_column: str, messages_column: str) -> dict:
    """A row as a conversation, its messages checked; its images are checked apart (`check_hub_image`), once."""
    images = _row_images(row, image_column)
    raw = row[messages_column]
    if not isinstance(raw, list) or not raw:
        raise DataValidationError(
            where, "malformed message", f"expected a non-empty list of messages, got {_short(raw)}"
        )
    messages = [_hub_message(message, where, number) for number, message in enumerate(raw)]
    if images and all(isinstance(message["content"], str) for message in raw):
        _put_images_first(messages, len(images))
    _check_image_parts(messages, len(images), where)
    return {"images": images, "messages": messages}


def check_hub_row(row: dict, where, image_column: str, messages_column: str, verify_images: bool) -> dict:
    """A row as a conversation, its messages and its images checked (each image once)."""
    conversation = _hub_to_conversation(row, where, image_column, messages_column)
    for number, image in enumerate(conversation["images"]):
        check_hub_image(image, where, number, verify_images)
    return conversation


def check_hub_image(image, where, number: int, verify: bool) -> tuple[int, int]:
    """Image `number` of a row: a path to an image file or the bytes of one (`_check_image`); its (height, width)."""
    if isinstance(image, str):  # a column of file paths
        image = {"bytes": None, "path": image}
    if not isinstance(image, dict) or (image.get("bytes") is None and not image.get("path")):
        raise DataValidationError(where, "missing image", f"image {number} is {_short(image)}")
    if image.get("bytes") is None and not os.path.isfile(image["path"]):
        raise DataValidationError(where, "missing image file", f"image {number}: {image['path']}")
    if image.get("bytes") is None:
        return _check_image(image["path"], f"image {number} ({image['path']})", where, verify)
    return _check_image(io.BytesIO(image["bytes"]), f"image {number}", where, verify)


def _hub_message(message, where, number: int) -> dict:
    if not isinstance(message, dict):
        raise DataValidationError(where, "malformed message", f"messages[{number}] is {_short(message)}")
    role = message.get("role")
    if role not in ROLES:
        raise DataValidationError(where, "unknown role", f"messages[{number}] has role {role!r}, not one of {ROLES}")
    content = message.get("content")
    if isinstance(content, str):
        return {"role": role, "content": _text_to_parts(content)}
    if not isinstance(content, list):
        raise DataValidationError(
            where, "malformed message", f"messages[{number}] content must be a string or a list, got {_short(content)}"
        )
    return {"role": role, "content": [_hub_part(part, where, number) for part in content]}


def _hub_part(part, where, number: int) -> dict:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "image":
        return {"type": "image"}  # Arrow pads parts with the other parts' keys ("text": None, ...): drop them
    if kind == "text" and isinstance(part.get("text"), str):
        if IMAGE_PLACEHOLDER in part["text"]:
            # The processor would read it as an image with no image behind it.
            raise DataValidationError(
                where, "placeholder in text part", f"messages[{number}]: use an image part, not {IMAGE_PLACEHOLDER}"
            )
        return {"type": "text", "text": part["text"]}
    raise DataValidationError(
        where,
        "malformed message",
        f"messages[{number}] has part {_short(part)}; parts are {{'type': 'image'}} or {{'type': 'text', 'text': str}}",
    )


def stored_image(conversation: dict) -> dict:
    """`conversation` with every part holding both keys, as a table stores it ("text": None for an image). A stream
    needs this done here: `Features.encode_example` leaves a list as it is when its first item needs no change."""
    for message in conversation["messages"]:
        message["content"] = [{"type": part["type"], "text": part.get("text")} for part in message["content"]]
    return conversation


def _put_images_first(messages: list[dict], num_images: int):
    """TRL's convention for string contents without placeholders: the images open the first user message."""
    if any(part["type"] == "image" for message in messages for part in message["content"]):
        return
    for message in messages:
        if message["role"] == "user":
            message["content"][:0] = [{"type": "image"} for _ in range(num_images)]
            return


# --- Referring segmentation ---


def load_refcoco(
    refs_path,
    instances_path,
    image_folder,
    *,
    split: str = "train",
    on_error: str = "fail",
    verify_images: bool = False,
):
    """RefCOCO / RefCOCO+ / RefCOCOg as their authors lay them out -> referring-segmentation records, one per
    (referring expression, sentence) of `split`.

    `refs_path` is the refs pickle (`refs(unc).p`, `refs(google).p`, ...): a list of refs like {"ref_id": 0,
    "ann_id": 1706357, "image_id": 581857, "split": "train", "sentences": [{"sent": "the lady with the blue shirt"},
    ...]}. `instances_path` is the COCO `instances.json` beside it: "images" (id, file_name, height, width) and
    "annotations" (id, image_id, segmentation as polygons or RLE). `image_folder` holds the images (COCO's
    train2014/). The pickle is read with an unpickler that builds plain lists, dicts, strings and numbers only, so a
    pickle that would run code is refused, not run.

    A ref is one record for `on_error` (named `refs(unc).p, record 12 (id '42')`, its index in the pickle): its
    annotation and image must exist, the image file must be an image of the size `instances.json` gives, the mask
    must decode at that size and not be empty, and every sentence must be a non-empty string; a bad ref drops all its
    sentences.
    """
    check_on_error(on_error)
    refs_path = existing_file(refs_path, "refs_path")
    instances_path = existing_file(instances_path, "instances_path")
    images = ImageFolder(existing_folder(image_folder, "image_folder"), verify_images)
    refs = read_refs_pickle(refs_path)
    image_index, annotation_index = _read_coco_instances(instances_path)
    splits = {ref.get("split") for ref in refs if isinstance(ref, dict)}
    if split not in splits:
        raise ValueError(
            f"{refs_path} has no ref of split {split!r} (`split`); its splits are {sorted(map(str, splits))}."
        )
    chosen = (
        (RecordPlace(refs_path, f"record {index}", _ref_id(ref)), ref)
        for index, ref in enumerate(refs)
        if not isinstance(ref, dict) or ref.get("split") == split  # a ref that is no dict is bad in every split
    )

    def convert(ref, where):
        return _refcoco_rows(ref, where, images, image_index, annotation_index)

    rows = [row for ref_rows in _collect(chosen, convert, on_error, refs_path) for row in ref_rows]
    return datasets.Dataset.from_list(rows, features=SEGMENTATION_FEATURES)


def load_segmentation_jsonl(jsonl_path, image_folder=None, *, on_error: str = "fail", verify_images: bool = False):
    """A JSONL file of referring-segmentation records -> referring-segmentation records.

    Each line is like {"image": "a.jpg", "expression": "the dog on the left", "mask": "a_dog.png"} or has "messages"
    (a conversation up to the mask answer, as `load_hub_dataset` reads them) in place of "expression". "mask" is a
    binary PNG's path, COCO polygons or a COCO RLE dict (`masks`). Image and mask paths are relative to `image_folder`
    (default: the JSONL file's folder). Every mask is decoded and checked against its image: a bad one makes a bad
    record (`on_error`), named by its line.
    """
    return _load_record_file(
        jsonl_path,
        "jsonl_path",
        image_folder,
        read_jsonl,
        _segmentation_line,
        SEGMENTATION_FEATURES,
        on_error=on_error,
        verify_images=verify_images,
    )


def load_segmentation_dataset(
    name_or_path,
    *,
    split: str = "train",
    image_column: str = "image",
    expression_column: str = "expression",
    messages_column: str = "messages",
    mask_column: str = "mask",
    data_files=None,
    on_error: str = "fail",
    verify_images: bool = False,
):
    """A dataset with image, expression (or messages) and mask columns -> referring-segmentation records.

    `name_or_path`, `split` and `data_files` are read as by `load_hub_dataset`. The image column holds one image a
    record (or a list of one; `images` is used when `image_column="image"` is absent). The mask column holds an image
    (a binary PNG: an `Image` feature, or a path), COCO polygons or a COCO RLE dict. A record has an expression or
    messages, not both. Each row is checked as `load_segmentation_jsonl` checks a line, and named by its index.
    """
    check_on_error(on_error)
    dataset, source = open_dataset(name_or_path, split, data_files)
    if image_column == "image" and "image" not in dataset.column_names and "images" in dataset.column_names:
        image_column = "images"
    text_columns = [column for column in (expression_column, messages_column) if column in dataset.column_names]
    for column, argument in ((image_column, "image_column"), (mask_column, "mask_column")):
        if column not in dataset.column_names:
            raise ValueError(
                f"{source} has no {column!r} column (`{argument}`); its columns are {dataset.column_names}."
            )
    if not text_columns:
        raise ValueError(
            f"{source} has neither an {expression_column!r} nor a {messages_column!r} column (`expression_column`, "
            f"`messages_column`); its columns are {dataset.column_names}."
        )
    dataset = dataset.select_columns([image_column, *text_columns, mask_column])
    for column in (image_column, mask_column):  # bytes and paths: a check needs sizes and values, not PIL images
        if undecoded_images(dataset.features[column]) != dataset.features[column]:
            dataset = dataset.cast_column(column, undecoded_images(dataset.features[column]))
    keys = dict(expression_key=expression_column, messages_key=messages_column)

    def check(indexed_row, where):
        index, row = indexed_row
        images = _row_images(row, image_column)
        if len(images) != 1:
            raise DataValidationError(where, "not one image", f"a segmentation record has 1 image, got {len(images)}")
        image_size = check_hub_image(images[0], where, 0, verify_images)
        return index, _segmentation_fields(row, where, image_size, mask=row[mask_column], folder=None, **keys)

    records = ((RecordPlace(source, f"record {index}"), (index, row)) for index, row in enumerate(dataset))
    kept = _collect(records, check, on_error, source)
    if len(kept) < len(dataset):
        dataset = dataset.select([index for index, _ in kept])
    fields = [row_fields for _, row_fields in kept]
    return dataset.map(
        _with_checked_fields,
        with_indices=True,
        fn_kwargs=dict(fields=fields, image_column=image_column),
        remove_columns=dataset.column_names,
        features=SEGMENTATION_FEATURES,
    )


def _with_checked_fields(row: dict, index: int, fields: list, image_column: str) -> dict:
    return {"images": _row_images(row, image_column), **fields[index]}


def _segmentation_line(record, where, images: ImageFolder) -> dict:
    require_object(record, where)
    name = record.get("image")
    if not isinstance(name, str) or not name:
        raise DataValidationError(where, "malformed image field", f"expected a path in 'image', got {_short(name)}")
    path, image_size = images.resolve_sized(name, where)
    fields = _segmentation_fields(record, where, image_size, mask=record.get("mask"), folder=images.path)
    return {"images": [path], **fields}


def _segmentation_fields(
    record: dict, where, image_size, mask, folder, expression_key="expression", messages_key="messages"
) -> dict:
    """The expression (or messages) and the checked mask of a record whose one image is `image_size` (h, w)."""
    expression, messages = record.get(expression_key), record.get(messages_key)
    if expression is not None and messages is not None:
        raise DataValidationError(
            where, "malformed record", f"a record has {expression_key!r} or {messages_key!r}, not both"
        )
    if expression is not None:
        if not isinstance(expression, str) or not expression.strip():
            raise DataValidationError(where, "malformed expression", f"expected a phrase, got {_short(expression)}")
        if IMAGE_PLACEHOLDER in expression:
            raise DataValidationError(where, "placeholder in text part", f"the expression holds {IMAGE_PLACEHOLDER}")
    elif messages is not None:
        messages = _segmentation_messages(messages, where)
    else:
        raise DataValidationError(where, "no expression", f"a record needs {expression_key!r} or {messages_key!r}")
    return {"expression": expression, "messages": messages, "mask": _checked_mask(mask, image_size, where, folder)}


def _segmentation_messages(raw, where) -> list[dict]:
    if not isinstance(raw, list) or not raw:
        raise DataValidationError(
            where, "malformed message", f"expected a non-empty list of messages, got {_short(raw)}"
        )
    messages = [_hub_message(message, where, number) for number, message in enumerate(raw)]
    if all(isinstance(message.get("content"), str) for message in raw):
        _put_images_first(messages, 1)
    _check_image_parts(messages, 1, where)
    if messages[-1]["role"] != "user":
        raise DataValidationError(
            where, "malformed message", "the messages must end with the user's request: the mask answer comes next"
        )
    return messages


def _checked_mask(mask, image_size, where, folder) -> dict:
    """`mask` (any form `masks.decode_mask` reads; paths relative to `folder`) checked against its image -> RLE."""
    if mask is None:
        raise DataValidationError(where, "missing mask", "a segmentation record needs a 'mask'")
    if isinstance(mask, dict) and "counts" not in mask and ("bytes" in mask or "path" in mask):
        mask = _stored_image_mask(mask, where)  # an `Image` column's {"bytes", "path"}
    elif isinstance(mask, str) and folder is not None:
        mask = os.path.join(folder, mask)
    try:
        return masks.encode_rle(masks.validate_mask(mask, image_size))
    except masks.MaskError as error:
        raise DataValidationError(where, error.reason, error.detail) from error


def _stored_image_mask(stored: dict, where):
    """A mask stored as an `Image` feature: a PIL image from its bytes, else its path."""
    if stored.get("bytes") is None:
        if not stored.get("path"):
            raise DataValidationError(where, "missing mask", "the mask image has neither bytes nor a path")
        return stored["path"]
    try:
        with PIL.Image.open(io.BytesIO(stored["bytes"])) as image:
            image.load()
            return image.copy()
    except Exception as error:  # PIL signals a broken file with many exception types
        raise DataValidationError(where, "unreadable mask file", str(error) or type(error).__name__) from error


def read_refs_pickle(path: str) -> list:
    """The refs list of a RefCOCO pickle, built from plain values only (`_PlainUnpickler`)."""
    with open(path, "rb") as file:
        try:
            # The pickles were written by Python 2: its byte strings are read as text.
            refs = _PlainUnpickler(file, encoding="utf-8").load()
        except (pickle.UnpicklingError, EOFError, UnicodeDecodeError, ValueError) as error:
            raise DataValidationError(path, "bad pickle", str(error) or type(error).__name__) from error
    if not isinstance(refs, list):
        raise DataValidationError(path, "bad pickle", f"expected a list of refs, got a {type(refs).__name__}")
    return refs


class _PlainUnpickler(pickle.Unpickler):
    """Lists, dicts, strings and numbers only: a pickle that names any class or function (which is how a pickle runs
    code) is refused."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"refs pickles hold plain values; this one names {module}.{name}")


def _read_coco_instances(path: str) -> tuple[dict, dict]:
    """COCO `instances.json` -> (image id -> image, annotation id -> annotation)."""
    data = read_json_document(path)
    if not isinstance(data, dict):
        raise DataValidationError(path, "bad JSON", f"expected a COCO object, got a {type(data).__name__}")
    tables = {}
    for key in ("images", "annotations"):
        entries = data.get(key)
        if not isinstance(entries, list) or not all(isinstance(entry, dict) and "id" in entry for entry in entries):
            raise DataValidationError(path, "bad COCO instances", f"{key!r} must be a list of objects with an 'id'")
        tables[key] = {entry["id"]: entry for entry in entries}
    return tables["images"], tables["annotations"]


def _ref_id(ref) -> str | None:
    return str(ref["ref_id"]) if isinstance(ref, dict) and ref.get("ref_id") is not None else None


def _refcoco_rows(ref, where, images: ImageFolder, image_index: dict, annotation_index: dict) -> list[dict]:
    if not isinstance(ref, dict):
        raise DataValidationError(where, "malformed record", f"expected a ref (a dict), got {_short(ref)}")
    annotation = annotation_index.get(ref.get("ann_id"))
    if annotation is None:
        raise DataValidationError(
            where, "unknown annotation", f"ann_id {ref.get('ann_id')!r} is not in instances.json"
        )
    if annotation.get("image_id") != ref.get("image_id"):
        raise DataValidationError(
            where,
            "annotation mismatch",
            f"the ref is on image {ref.get('image_id')!r}, its annotation on {annotation.get('image_id')!r}",
        )
    image = image_index.get(ref.get("image_id"))
    if image is None:
        raise DataValidationError(where, "unknown image", f"image_id {ref.get('image_id')!r} is not in instances.json")
    if not isinstance(image.get("file_name"), str) or not image["file_name"]:
        raise DataValidationError(where, "malformed image field", f"image {image['id']!r} has no 'file_name'")
    path, image_size = images.resolve_sized(image["file_name"], where)
    stated = (image.get("height"), image.get("width"))
    if stated != (None, None) and stated != image_size:
        raise DataValidationError(
            where,
            "image size mismatch",
            f"instances.json gives {image['file_name']} as {stated[0]} x {stated[1]} (height x width), the file is "
            f"{image_size[0]} x {image_size[1]}",
        )
    mask = _checked_mask(annotation.get("segmentation"), image_size, where, folder=None)
    sentences = ref.get("sentences")
    if not isinstance(sentences, list) or not sentences:
        raise DataValidationError(where, "no sentences", f"expected a list of sentences, got {_short(sentences)}")
    texts = []
    for number, sentence in enumerate(sentences):
        text = sentence.get("sent") if isinstance(sentence, dict) else None
        if not isinstance(text, str) or not text.strip():
            raise DataValidationError(where, "malformed sentence", f"sentences[{number}] is {_short(sentence)}")
        texts.append(text)
    return [{"images": [path], "expression": text, "messages": None, "mask": mask} for text in texts]


# --- Image editing ---


def load_editing_jsonl(jsonl_path, image_folder=None, *, on_error: str = "fail", verify_images: bool = False):
    """A JSONL file of editing triplets -> editing records (`EDITING_FEATURES`).

    Each line is like {"source": "a.png", "instruction": "remove the bag", "target": "b.png", "mask": "m.png"};
    "mask" (the edited region) may be left out, or be a binary PNG's path, COCO polygons or a COCO RLE dict (`masks`).
    Paths are relative to `image_folder` (default: the JSONL file's folder). Both images are checked as by
    `load_llava_json` and must be of one size; a bad line is a bad record (`on_error`), named by its number.
    """
    return _load_record_file(
        jsonl_path,
        "jsonl_path",
        image_folder,
        read_jsonl,
        _editing_line,
        EDITING_FEATURES,
        on_error=on_error,
        verify_images=verify_images,
    )


def load_instructpix2pix(
    name_or_path,
    *,
    split: str = "train",
    source_column: str = "input_image",
    instruction_column: str = "edit_prompt",
    target_column: str = "edited_image",
    data_files=None,
    on_error: str = "fail",
    verify_images: bool = False,
):
    """InstructPix2Pix's layout -> editing records: `source_column` (the image before the edit), `instruction_column`
    (the edit) and `target_column` (the image after it), one triplet a row, no mask.

    The defaults are the names of diffusers' InstructPix2Pix examples (`fusing/instructpix2pix-1000-samples`); the
    paper's own set, `timbrooks/instructpix2pix-clip-filtered`, names its source `original_image`, which is used
    when `source_column="input_image"` is absent. `name_or_path`, `split` and `data_files` are read as by
    `load_hub_dataset`; the image columns hold images (an `Image` feature) or paths. Each row is checked as
    `load_editing_jsonl` checks a line, and named by its index.
    """
    return _load_editing_dataset(
        name_or_path,
        split,
        data_files,
        {"source": source_column, "instruction": instruction_column, "target": target_column, "mask": None},
        fallback_source="original_image" if source_column == "input_image" else None,
        on_error=on_error,
        verify_images=verify_images,
    )


def load_magicbrush(
    name_or_path,
    *,
    split: str = "train",
    source_column: str = "source_img",
    instruction_column: str = "instruction",
    target_column: str = "target_img",
    mask_column: str | None = "mask_img",
    data_files=None,
    on_error: str = "fail",
    verify_images: bool = False,
):
    """MagicBrush's layout (`osunlp/MagicBrush`, splits `train` and `dev`) -> editing records, one per turn.

    Columns as in `load_instructpix2pix`, and `mask_column`, the edited region: an image per row (or None: that row
    has no mask), read as a binary mask (`masks`); a colour mask image with fully transparent pixels is read in
    DALL-E 2's convention, in whose editor MagicBrush's masks were drawn: the transparent pixels are the region.
    `mask_column=None` reads no masks. A multi-turn session's turns are separate records, each its own source.
    """
    return _load_editing_dataset(
        name_or_path,
        split,
        data_files,
        {"source": source_column, "instruction": instruction_column, "target": target_column, "mask": mask_column},
        on_error=on_error,
        verify_images=verify_images,
    )


def editing_messages(instruction: str) -> list[dict]:
    """The chat of an edit: "user: <source image> {instruction}" -> "assistant: <target image>" (two image parts:
    the source an input, the target an image to draw)."""
    user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": instruction}]}
    return [user, {"role": "assistant", "content": [{"type": "image"}]}]


def edits_to_messages(dataset):
    """Editing records (in memory or streamed) -> conversations for stage 3 (`editing_messages`), which
    `SetokimChatCollator` trains as it trains text-to-image answers. `edit_mask` is not carried."""
    names = dataset.column_names  # None for a stream whose columns are not known before it is read
    missing = [column for column in ("images", "instruction") if names is not None and column not in names]
    if missing:
        raise ValueError(
            f"`edits_to_messages` needs editing records (`EDITING_FEATURES`); the dataset has no {missing} column, "
            f"only {names}."
        )
    return _to_chats(dataset, _edit_to_conversation, EDITING_FEATURES)


def _edit_to_conversation(record: dict) -> dict:
    return {"images": record["images"], "messages": editing_messages(record["instruction"])}


def _load_editing_dataset(
    name_or_path, split, data_files, columns: dict, *, fallback_source=None, on_error: str, verify_images: bool
):
    """What the layout loaders share: open the split, find `columns` (role -> column name; a mask of None: none),
    check every row (`_editing_row`) and keep the good ones as editing records."""
    check_on_error(on_error)
    dataset, source = open_dataset(name_or_path, split, data_files)
    if isinstance(dataset, datasets.IterableDataset):
        raise TypeError(
            "`name_or_path`: the editing loaders read a `datasets.Dataset` (every row is checked before training); "
            "got a `datasets.IterableDataset`."
        )
    if fallback_source and columns["source"] not in dataset.column_names and fallback_source in dataset.column_names:
        columns = {**columns, "source": fallback_source}
    for role, column in columns.items():
        if column is not None and column not in dataset.column_names:
            hint = " (`mask_column=None` reads no masks)" if role == "mask" else ""
            raise ValueError(
                f"{source} has no {column!r} column (`{role}_column`{hint}); its columns are {dataset.column_names}."
            )
    used = list(dict.fromkeys(column for column in columns.values() if column is not None))
    dataset = dataset.select_columns(used)
    for role in ("source", "target", "mask"):  # bytes and paths: a check needs sizes and values, not PIL images
        column = columns[role]
        if column is not None and undecoded_images(dataset.features[column]) != dataset.features[column]:
            dataset = dataset.cast_column(column, undecoded_images(dataset.features[column]))

    def check(indexed_row, where):
        index, row = indexed_row
        return index, _editing_row(row, where, columns, verify_images)

    records = ((RecordPlace(source, f"record {index}"), (index, row)) for index, row in enumerate(dataset))
    kept = _collect(records, check, on_error, source)
    if len(kept) < len(dataset):
        dataset = dataset.select([index for index, _ in kept])
    return dataset.map(
        _edit_with_checked_fields,  # images are not opened again: every row passed the check above
        with_indices=True,
        fn_kwargs=dict(fields=[fields for _, fields in kept], image_columns=[columns[role] for role in EDIT_ROLES]),
        remove_columns=dataset.column_names,
        features=EDITING_FEATURES,
    )


def _edit_with_checked_fields(row: dict, index: int, fields: list, image_columns: list) -> dict:
    return {"images": [row[column] for column in image_columns], **fields[index]}


def _editing_row(row: dict, where, columns: dict, verify: bool) -> dict:
    """A data set row's instruction and mask, checked with its two images (which stay in the table)."""
    sizes = []
    for number, role in enumerate(EDIT_ROLES):
        image = row[columns[role]]
        if image is None:
            raise DataValidationError(where, f"missing {role} image", f"image {number}, the {role}, is None")
        sizes.append(check_hub_image(image, where, number, verify))
    mask = row[columns["mask"]] if columns["mask"] is not None else None
    return _editing_fields(row[columns["instruction"]], mask, _same_size(*sizes, where), where, folder=None)


def _editing_line(record, where, images: ImageFolder) -> dict:
    require_object(record, where)
    paths, sizes = [], []
    for role in EDIT_ROLES:
        name = record.get(role)
        if name is None or name == "":
            raise DataValidationError(where, f"missing {role} image", f"a record needs a path in {role!r}")
        if not isinstance(name, str):
            raise DataValidationError(
                where, "malformed image field", f"expected a path in {role!r}, got {_short(name)}"
            )
        path, size = images.resolve_sized(name, where)
        paths.append(path)
        sizes.append(size)
    size = _same_size(*sizes, where)
    return {
        "images": paths,
        **_editing_fields(record.get("instruction"), record.get("mask"), size, where, images.path),
    }


def _same_size(source_size, target_size, where) -> tuple[int, int]:
    if source_size != target_size:
        raise DataValidationError(
            where,
            "image size mismatch",
            f"the source is {source_size[0]} x {source_size[1]} (height x width), the target {target_size[0]} x "
            f"{target_size[1]}: an edit keeps the image's size",
        )
    return source_size


def _editing_fields(instruction, mask, image_size, where, folder) -> dict:
    """The checked instruction and mask (RLE, or None) of an edit whose images are `image_size` (h, w)."""
    if instruction is None or (isinstance(instruction, str) and not instruction.strip()):
        raise DataValidationError(
            where, "empty instruction", f"an edit needs an instruction, got {_short(instruction)}"
        )
    if not isinstance(instruction, str):
        raise DataValidationError(where, "malformed instruction", f"expected a string, got {_short(instruction)}")
    if IMAGE_PLACEHOLDER in instruction:
        raise DataValidationError(where, "placeholder in text part", f"the instruction holds {IMAGE_PLACEHOLDER}")
    return {
        "instruction": instruction,
        "edit_mask": None if mask is None else _edit_mask(mask, image_size, where, folder),
    }


def _edit_mask(mask, image_size, where, folder) -> dict:
    """An edit's mask, checked as a segmentation mask is (`_checked_mask`); a colour image that a binary mask cannot
    be, with fully transparent pixels, is read in DALL-E 2's convention: those pixels are the region to edit."""
    try:
        return _checked_mask(mask, image_size, where, folder)
    except DataValidationError as error:
        if error.reason != "bad mask values":
            raise
        region = _transparent_region(mask, where, folder)
        if region is None:
            raise
        return _checked_mask(region, image_size, where, folder=None)


def _transparent_region(mask, where, folder):
    """The fully transparent pixels of mask image `mask` (a path, a stored image or a PIL image), bool `(H, W)`; None
    when it is no image with an alpha channel or has no such pixel."""
    if isinstance(mask, dict) and "counts" not in mask:
        mask = _stored_image_mask(mask, where)
    if isinstance(mask, str):
        with PIL.Image.open(mask if folder is None else os.path.join(folder, mask)) as image:
            image.load()
            mask = image.copy()
    if not isinstance(mask, PIL.Image.Image) or "A" not in mask.getbands():
        return None
    transparent = np.asarray(mask.getchannel("A")) == 0
    return transparent if transparent.any() else None


__all__ = [
    "CONVERSATION_FEATURES",
    "EDITING_FEATURES",
    "IMAGE_TEXT_FEATURES",
    "SEGMENTATION_FEATURES",
    "HUB_ID",
    "DataValidationError",
    "captions_to_generation_messages",
    "captions_to_messages",
    "editing_messages",
    "edits_to_messages",
    "is_local_path",
    "load_editing_jsonl",
    "load_hub_dataset",
    "load_image_text_jsonl",
    "load_instructpix2pix",
    "load_llava_json",
    "load_magicbrush",
    "load_refcoco",
    "load_segmentation_dataset",
    "load_segmentation_jsonl",
    "load_webdataset",
]
