"""Streaming training data: the loaders of `data` as `datasets.IterableDataset`s, for sets too big to hold (stage 2's
28M pairs), and what a Trainer needs to train and resume on them.

Every stream yields exactly the records its in-memory loader holds (`data.CONVERSATION_FEATURES` or
`data.IMAGE_TEXT_FEATURES`, images decoded to PIL as they are read), checked one at a time as they are read, by the
same rules and the same `on_error` (nothing is read before iteration starts):

* `on_error="fail"` raises `DataValidationError` at the first bad record, naming the file, the record and the problem.
* `on_error="skip"` drops bad records and counts them, by reason. The first one skipped, then every
  `data.STREAM_SKIP_LOG_EVERY`-th (1000), is logged at WARNING with the count so far ("Skipped 1000 of the 51234
  records of shard-03.tar read so far: ..."). The readers that read files themselves (JSON / JSON Lines, webdataset
  tars) also log the total at the end of each file, where, as in memory, a file with no record or no good record
  is a ValueError. A stream of `datasets`' own (`stream_hub_dataset`: parquet, Hub sets, saved sets) has no end
  of file to log at: it logs as it goes only (its counts are this process's, since it started).

Each file (JSON Lines file, tar, parquet file) is one shard; a set in memory or saved with `save_to_disk` is cut into
`num_shards` contiguous shards (default: one per record, at most 64).

Several processes (DDP). Under the `Trainer`, pass the whole stream: accelerate's `prepare` splits a
`datasets.IterableDataset` itself, and a stream split beforehand (`split_for_process`) would be split a second time,
silently losing data (accelerate 1.15; huggingface/accelerate#3547 and #4199). With `num_shards >= num_processes` it
gives each process a contiguous block of shards (`IterableDataset.shard`); with fewer shards every process reads every
record (and checks it) and keeps its own slice of each global batch (`IterableDatasetShard`). The Trainer needs
`accelerator_config={"dispatch_batches": False}`: accelerate's default for an iterable set has process 0 read and
collate every batch and cut the concatenation into pieces, which fails on batches padded to different lengths and
would hand out the wrong `pixel_values` (a batch holds one row per image, not per sample). `split_for_process`
(`datasets.distributed.split_dataset_by_node` with the torch.distributed rank) is for loops that do not go through
accelerate's `prepare`: shards when their number is a multiple of the world size, else every process reads every
record and keeps one in `world_size` (datasets' fallback).

Resuming. The Trainer skips the batches a checkpoint already trained on by drawing them from the dataloader again,
which reads and collates them all. `StreamStateCallback` instead saves each process's position in its stream
(`IterableDataset.state_dict()`, taken after the last batch the Trainer consumed) in every checkpoint and restores it
(`load_state_dict`) when training resumes; with `TrainingArguments(ignore_data_skip=True)` the Trainer then skips
nothing itself, and the first batch collated is the first one not trained on. See `StreamStateCallback`.
"""

import functools
import glob
import json
import logging
import os
import posixpath
import tarfile
import zlib
from collections import deque
from collections.abc import Mapping

import datasets
from transformers import TrainerCallback

from . import data as _data
from .data import (
    CONVERSATION_FEATURES,
    IMAGE_TEXT_FEATURES,
    DataValidationError,
    ImageFolder,
    RecordPlace,
    SkipCount,
    check_hub_image,
    check_hub_row,
    check_on_error,
    check_require_text,
    checked_records,
    conversation_columns,
    existing_file,
    existing_folder,
    image_texts,
    llava_to_conversation,
    open_dataset,
    read_json_records,
    read_jsonl,
    record_id,
    require_object,
    stored_image,
    to_image_text,
)

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_WEBDATASET_COLUMNS",
    "STREAMING_TRAINING_ARGUMENTS",
    "STREAM_STATE_FILE",
    "StreamStateCallback",
    "resolve_stream_features",
    "split_for_process",
    "stream_hub_dataset",
    "stream_image_text_jsonl",
    "stream_llava_json",
    "stream_webdataset",
]

MAX_DEFAULT_SHARDS = 64  # a set in memory or on disk is cut into min(records, this) shards unless told otherwise
WEBDATASET_SUFFIXES = (".tar", ".tar.gz", ".tgz")
DEFAULT_WEBDATASET_COLUMNS = {"image": "jpg;jpeg;png;webp", "messages": "json"}
WEBDATASET_FIELDS = ("image", "images", "messages", "caption", "concepts")  # what `columns` may map
IMAGE_EXTENSIONS = frozenset({"jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm", "pgm"})
STREAM_STATE_FILE = "stream_state_rank{rank}.json"  # in each checkpoint folder, one a process

# What a Trainer on a stream needs (`StreamStateCallback` checks them): no batch drawn again on resume (the callback
# restores the stream's position instead), each process reading its own records (see the module's docstring), and
# the stream read in the training process, where its position can be taken.
STREAMING_TRAINING_ARGUMENTS = {
    "ignore_data_skip": True,
    "accelerator_config": {"dispatch_batches": False},
    "dataloader_num_workers": 0,
}


# --------------------------------------------------------------------------------------------------------------------
# Record files: LLaVA JSON / JSON Lines, image-text JSON Lines


def stream_llava_json(json_path, image_folder=None, *, on_error: str = "fail", verify_images: bool = False):
    """`data.load_llava_json` as a stream. `json_path` is a file, a folder (its `.json` and `.jsonl` files), a glob or
    a list of files: one shard each. A `.jsonl` file is read a line at a time; a `.json` list is one document, parsed
    whole when its shard starts (convert big ones to JSON Lines)."""
    return _stream_record_files(json_path, "json_path", image_folder, "llava", on_error, verify_images, None)


def stream_image_text_jsonl(
    jsonl_path,
    image_folder=None,
    *,
    on_error: str = "fail",
    verify_images: bool = False,
    require_text: str | None = None,
):
    """`data.load_image_text_jsonl` as a stream. `jsonl_path` is a file, a folder (its `.jsonl` files), a glob or a
    list of files: one shard each. `require_text` ("caption" or "concepts") makes a record without that text a bad
    record, which a stream cannot check up front for the whole set (stage 1's `data.text_source`)."""
    check_require_text(require_text)
    return _stream_record_files(
        jsonl_path, "jsonl_path", image_folder, "image_text", on_error, verify_images, require_text
    )


# kind -> (reader, converter, features, file suffixes of a folder)
_RECORD_FILES = {
    "llava": (read_json_records, llava_to_conversation, CONVERSATION_FEATURES, (".json", ".jsonl")),
    "image_text": (read_jsonl, to_image_text, IMAGE_TEXT_FEATURES, (".jsonl",)),
}


def _stream_record_files(paths, argument, image_folder, kind, on_error, verify_images, require_text):
    check_on_error(on_error)
    files = _shard_files(paths, argument, _RECORD_FILES[kind][3], remote=False)
    if image_folder is not None:
        image_folder = existing_folder(image_folder, "image_folder")
    return datasets.IterableDataset.from_generator(
        _record_file_rows,
        features=_RECORD_FILES[kind][2],
        gen_kwargs=dict(  # a list is cut into shards: only `paths` is one
            paths=files,
            kind=kind,
            image_folder=image_folder,
            on_error=on_error,
            verify_images=verify_images,
            require_text=require_text,
        ),
    )


def _record_file_rows(paths, kind, image_folder, on_error, verify_images, require_text):
    """The good records of `paths` (one shard's files), checked as they are read."""
    read, convert, _, _ = _RECORD_FILES[kind]
    if kind == "image_text":
        convert = functools.partial(convert, require_text=require_text)
    for path in paths:
        images = ImageFolder(image_folder or os.path.dirname(path) or ".", verify_images)
        count = SkipCount(path, log_every=_data.STREAM_SKIP_LOG_EVERY)
        yield from checked_records(
            read(path), functools.partial(_convert_with, convert, images=images), on_error, count
        )
        count.finish()


def _convert_with(convert, record, where, images):
    row = convert(record, where, images)
    return stored_image(row) if "messages" in row else row


def _shard_files(paths, argument: str, suffixes: tuple, remote: bool) -> list[str]:
    """The files of `paths`: a file, a folder (its files ending in `suffixes`, sorted), a glob (sorted) or a list of
    files. `remote`: URLs (`scheme://...`) are taken as they are, for fsspec to open."""
    if isinstance(paths, (str, os.PathLike)):
        path = os.fspath(paths)
        if os.path.isdir(path):
            names = sorted(name for name in os.listdir(path) if name.endswith(suffixes))
            files = [os.path.join(path, name) for name in names if os.path.isfile(os.path.join(path, name))]
            if not files:
                raise FileNotFoundError(f"`{argument}`: no {' / '.join(suffixes)} files in the folder {path}")
            return files
        if glob.has_magic(path) and not (remote and "://" in path):
            files = sorted(glob.glob(path))
            if not files:
                raise FileNotFoundError(f"`{argument}`: no file matches {path}")
            return files
        paths = [path]
    files = [os.fspath(path) for path in paths]
    if not files:
        raise ValueError(f"`{argument}`: no files given.")
    return [path if remote and "://" in path else existing_file(path, argument) for path in files]


# --------------------------------------------------------------------------------------------------------------------
# Datasets: parquet and other data files, the Hub, save_to_disk folders


def stream_hub_dataset(
    name_or_path,
    *,
    split: str = "train",
    image_column: str = "images",
    messages_column: str = "messages",
    data_files=None,
    num_shards: int | None = None,
    on_error: str = "fail",
    verify_images: bool = False,
):
    """`data.load_hub_dataset` as a stream: a Hub id or a folder of data files (read by
    `load_dataset(..., streaming=True)`: one shard a file), `data_files` with a builder name (`"parquet"`, `"json"`;
    e.g. `stream_hub_dataset("parquet", data_files="shards/*.parquet")`), a `datasets.IterableDataset`, or a
    `datasets.Dataset` / a `save_to_disk` folder (memory-mapped, cut into `num_shards` contiguous shards; default
    one a record, at most 64). Records are checked as they stream, in batches of one (`IterableDataset.map`), so
    `state_dict()` resumes at the exact record."""
    check_on_error(on_error)
    dataset, source = open_dataset(name_or_path, split, data_files, streaming=True)
    if isinstance(dataset, datasets.Dataset):
        if len(dataset) == 0:
            raise ValueError(f"{source} holds no records.")
        shards = num_shards or min(len(dataset), MAX_DEFAULT_SHARDS)
        dataset = dataset.to_iterable_dataset(num_shards=shards)
    elif num_shards is not None:
        raise ValueError(
            f"`num_shards` cuts a dataset in memory or saved with `save_to_disk`; {source} streams from its files, "
            "one shard each."
        )
    if dataset.features is None:  # e.g. JSON files: the first records tell the columns
        dataset = resolve_stream_features(dataset)
    dataset, image_column = conversation_columns(dataset, image_column, messages_column, source)
    count = SkipCount(source, log_every=_data.STREAM_SKIP_LOG_EVERY)
    return dataset.map(
        _checked_hub_batch,
        batched=True,
        batch_size=1,  # checked one at a time, so a bad record drops out and nothing is read ahead
        with_indices=True,
        remove_columns=dataset.column_names,
        fn_kwargs=dict(
            source=source,
            image_column=image_column,
            messages_column=messages_column,
            verify_images=verify_images,
            on_error=on_error,
            count=count,
        ),
    ).cast(CONVERSATION_FEATURES)  # applied to each record as it comes (`map(features=)` would only declare them)


def _checked_hub_batch(batch, indices, source, image_column, messages_column, verify_images, on_error, count):
    rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
    records = ((RecordPlace(source, f"record {index}", record_id(row)), row) for index, row in zip(indices, rows))
    check = functools.partial(
        check_hub_row, image_column=image_column, messages_column=messages_column, verify_images=verify_images
    )
    kept = [stored_image(row) for row in checked_records(records, check, on_error, count)]
    return {"images": [row["images"] for row in kept], "messages": [row["messages"] for row in kept]}


# --------------------------------------------------------------------------------------------------------------------
# WebDataset tars


def stream_webdataset(
    tar_paths,
    columns: Mapping[str, str] | None = None,
    *,
    on_error: str = "fail",
    verify_images: bool = False,
    require_text: str | None = None,
):
    """WebDataset shards (tar files whose members `KEY.FIELD` form one sample a key, in order) -> conversations or
    image-text pairs. `tar_paths` is a tar, a folder of them, a glob, or a list (local paths or fsspec URLs).

    `columns` maps a record field to the member that holds it, by its FIELD (the name after the key's first dot,
    lower case): `{"image": "png", "messages": "json"}` (the default tries jpg, jpeg, png and webp images) gives
    conversations, like `load_hub_dataset`'s rows (message contents may be strings with `<image>` or lists of parts;
    no image member makes a text-only record); `{"image": "jpg", "caption": "txt"}` or
    `{"image": "jpg", "caption": "json:caption", "concepts": "json:concepts"}` gives image-text pairs (the image is
    then required). A field may list alternatives (`"jpg;png"`, `"txt;json:caption"`: the first the sample has) and
    may pick a key of a JSON object (`"json:caption"`). Image members stay bytes until read; `json` members are parsed, others are UTF-8 text
    (a trailing newline dropped). A member that does not decode makes a bad record ("bad JSON", "bad encoding");
    a tar that does not read fails whatever `on_error` says, like a JSON document that does not parse.
    """
    check_on_error(on_error)
    check_require_text(require_text)
    files = _shard_files(tar_paths, "tar_paths", WEBDATASET_SUFFIXES, remote=True)
    kind, _ = _parse_webdataset_columns(columns)
    return datasets.IterableDataset.from_generator(
        _webdataset_rows,
        features=CONVERSATION_FEATURES if kind == "conversation" else IMAGE_TEXT_FEATURES,
        gen_kwargs=dict(
            paths=files,
            columns=dict(columns or DEFAULT_WEBDATASET_COLUMNS),
            on_error=on_error,
            verify_images=verify_images,
            require_text=require_text,
        ),
    )


def _parse_webdataset_columns(columns) -> tuple[str, dict]:
    """("conversation" | "image_text", {record field: ((member field, JSON key or None), ...) in order})."""
    columns = DEFAULT_WEBDATASET_COLUMNS if columns is None else columns
    if not isinstance(columns, Mapping) or not all(isinstance(v, str) for v in columns.values()):
        raise ValueError(
            f"`columns` maps record fields to tar members, e.g. {DEFAULT_WEBDATASET_COLUMNS}; got {columns!r}."
        )
    unknown = sorted(set(columns) - set(WEBDATASET_FIELDS))
    if unknown:
        raise ValueError(f"`columns`: unknown record fields {unknown}; they are {list(WEBDATASET_FIELDS)}.")
    if "image" in columns and "images" in columns:
        raise ValueError("`columns`: map 'image' or 'images' (one image member a sample), not both.")
    texts = {"caption", "concepts"} & set(columns)
    if "messages" in columns and texts:
        raise ValueError(
            "`columns`: 'messages' makes conversations, 'caption' / 'concepts' image-text pairs: not both."
        )
    if "messages" not in columns and not texts:
        raise ValueError("`columns` must map 'messages' (conversations) or 'caption' / 'concepts' (image-text pairs).")
    spec = {}
    for name, value in columns.items():
        alternatives = []
        for member in value.split(";"):
            field, _, key = member.partition(":")
            if field.strip():
                alternatives.append((field.strip().lower(), key.strip() or None))
        if not alternatives:
            raise ValueError(f"`columns`: {name!r} names no tar member: {value!r}.")
        spec["image" if name == "images" else name] = tuple(alternatives)
    if texts and "image" not in spec:
        raise ValueError("`columns`: image-text pairs need an 'image' member.")
    return ("image_text" if texts else "conversation"), spec


def _webdataset_rows(paths, columns, on_error, verify_images, require_text):
    """The good records of `paths` (one shard's tars), checked as they are read."""
    kind, spec = _parse_webdataset_columns(columns)
    convert = functools.partial(
        _webdataset_record, spec=spec, kind=kind, verify_images=verify_images, require_text=require_text
    )
    for path in paths:
        count = SkipCount(path, log_every=_data.STREAM_SKIP_LOG_EVERY)
        yield from checked_records(_tar_samples(path), convert, on_error, count)
        count.finish()


def _tar_samples(path: str):
    """(where, (key, {field: bytes})) for each sample of the tar at `path`, read front to back."""
    number, key, fields = 0, None, {}
    try:
        with _open_binary(path) as file, tarfile.open(fileobj=file, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                folder, name = posixpath.split(member.name)
                if name.startswith(".") or "." not in name:
                    continue  # no FIELD (or a hidden file): no part of a sample
                stem, field = name.split(".", 1)
                sample = posixpath.join(folder, stem)
                if sample != key and fields:
                    yield RecordPlace(path, f"sample {number}", key), (key, fields)
                    number, fields = number + 1, {}
                key = sample
                fields[field.lower()] = tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, zlib.error, OSError) as error:
        # The rest of the tar is lost, like the records of a JSON document that does not parse.
        raise DataValidationError(path, "bad tar", f"after {number} samples: {error}") from error
    if fields:
        yield RecordPlace(path, f"sample {number}", key), (key, fields)


def _open_binary(path: str):
    if "://" in path:
        import fsspec

        return fsspec.open(path, "rb").open()
    return open(path, "rb")


def _webdataset_record(sample, where, spec: dict, kind: str, verify_images: bool, require_text) -> dict:
    key, fields = sample
    values = {name: _member(fields, key, alternatives, where) for name, alternatives in spec.items()}
    image = values.get("image")
    if kind == "conversation":
        row = {"images": [] if image is None else [image], "messages": values.get("messages")}
        return stored_image(check_hub_row(row, where, "images", "messages", verify_images))
    check_hub_image(image, where, 0, verify_images)  # "missing image" when the sample has none
    caption, concepts = image_texts(
        {"caption": values.get("caption"), "concepts": values.get("concepts")}, where, require_text
    )
    return {"images": [image], "caption": caption, "concepts": concepts}


def _member(fields: dict, key: str, alternatives: tuple, where):
    """The value of the first (field, JSON key) of `alternatives` the sample has (None if none): an image as
    {"bytes", "path"}, JSON parsed, anything else as text; a JSON key picks that key of a JSON object."""
    field, json_key = next(((field, json_key) for field, json_key in alternatives if field in fields), (None, None))
    if field is None:
        return None
    raw, extension = fields[field], field.rsplit(".", 1)[-1]
    if extension in IMAGE_EXTENSIONS:
        value = {"bytes": raw, "path": f"{key}.{field}"}
    else:
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as error:
            raise DataValidationError(
                where, "bad encoding", f"{field}: not UTF-8 at byte {error.start}: {error.reason}"
            ) from error
        if extension == "json":
            try:
                value = json.loads(text)
            except json.JSONDecodeError as error:
                detail = f"{field}: line {error.lineno}, column {error.colno}: {error.msg}"
                raise DataValidationError(where, "bad JSON", detail) from error
        else:
            value = text[:-1] if text.endswith("\n") else text
            value = value[:-1] if value.endswith("\r") else value
    if json_key is not None:
        require_object(value, where)
        value = value.get(json_key)
    return value


# --------------------------------------------------------------------------------------------------------------------
# Several processes


def resolve_stream_features(dataset: datasets.IterableDataset) -> datasets.IterableDataset:
    """`dataset` with its features read from its first records, for streams that do not declare them (e.g. a generator-built stream).

    The one place that touches a datasets internal, `IterableDataset._resolve_features` (datasets 5.1-5.2 have no
    public equivalent: `column_names` stays None until then). tests/test_streaming.py fails loudly if it moves.
    """
    resolve = getattr(dataset, "_resolve_features", None)
    if resolve is None:
        raise RuntimeError(
            f"datasets {datasets.__version__} has no `IterableDataset._resolve_features`; "
            "transformers_setok.training.streaming.resolve_stream_features needs another way to read a stream's "
            "columns."
        )
    return resolve()


def split_for_process(dataset: datasets.IterableDataset, rank: int | None = None, world_size: int | None = None):
    """This process's part of `dataset` (`datasets.distributed.split_dataset_by_node`), for loops that do not hand
    the stream to accelerate's `prepare` (the Trainer does: give it the whole stream, see the module's docstring).

    `rank` and `world_size` default to torch.distributed's, else the `RANK` / `WORLD_SIZE` that `torchrun` and
    `accelerate launch` set, else a single process. Shards go to processes when their number is a multiple of
    `world_size`; otherwise (fewer shards than processes, say) every process reads every record, checks it, and
    keeps one in `world_size`: still disjoint, but each process reads the whole set.
    """
    if rank is None or world_size is None:
        rank, world_size = _process_rank_and_world_size()
    if world_size == 1:
        return dataset
    if dataset.num_shards % world_size:
        logger.warning(
            "%d shards for %d processes: every process reads every record and keeps one in %d. Use a number of "
            "shards that is a multiple of %d (more files, `num_shards`, or `reshard()` for parquet).",
            dataset.num_shards,
            world_size,
            world_size,
            world_size,
        )
    from datasets.distributed import split_dataset_by_node

    return split_dataset_by_node(dataset, rank=rank, world_size=world_size)


def _process_rank_and_world_size() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


# --------------------------------------------------------------------------------------------------------------------
# Resuming


class StreamStateCallback(TrainerCallback):
    """Saves each process's position in its training stream with every checkpoint, and puts it back on resume, so
    that no record is read twice or collated again.

    Use: `trainer.add_callback(StreamStateCallback(checkpoint))` (`checkpoint`: what `train(resume_from_checkpoint=)`
    gets, or None for a fresh run or one that resumes from `output_dir/checkpoint-<step>`), with
    `TrainingArguments(**STREAMING_TRAINING_ARGUMENTS)`. It raises at the start of training when those are missing:
    without `ignore_data_skip=True` the Trainer would also skip the consumed batches itself (losing as many again);
    with dataloader workers the stream's position lives in the worker processes, out of reach.

    How: the dataloader's `collate_fn` is wrapped to take the stream's `state_dict()` right after each batch is
    read (the loader reads one batch ahead of training, so the stream's live position is one batch past what was
    trained); each micro-batch the Trainer trains on moves the saved position to after that batch. `on_save` writes it
    to `<checkpoint>/stream_state_rank<R>.json`; on resume, `load_state_dict` points the stream there before its first
    batch. A checkpoint taken when a pass over the stream had just ended resumes at the start of the next pass. The
    resumed Trainer counts epochs (passes) from 0 again, so the stream's epoch, which orders its shards, is kept in
    step with the saved one. Resume with the same number of processes.
    """

    def __init__(self, resume_from_checkpoint=None):
        self.resume_from_checkpoint = None if resume_from_checkpoint is None else os.fspath(resume_from_checkpoint)
        self._forget()

    def _forget(self):
        self._stream = self._loader = None
        self._produced = self._consumed = 0
        self._pending = deque()  # (batches produced, stream state after that batch), not yet trained on
        self._position = None  # the stream state after the last batch trained on (None: the stream's start)
        self._pass_complete = False  # the position is the end of a pass: resume at the next one

    # --- Events

    def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
        self._forget()
        stream = _check_streaming_run(args, train_dataloader)
        self._stream, self._loader = stream, train_dataloader
        base = getattr(train_dataloader, "base_dataloader", train_dataloader)
        base.collate_fn = _PositionTaker(base.collate_fn, self)
        if state.global_step > 0:
            self._restore(args, state)

    def on_substep_end(self, args, state, control, **kwargs):
        self._trained_one()

    def on_step_end(self, args, state, control, **kwargs):
        self._trained_one()

    def on_save(self, args, state, control, **kwargs):
        if self._stream is None:
            return
        complete = self._pass_complete
        if self._consumed and self._consumed == self._produced and getattr(self._loader, "end_of_dataloader", False):
            complete = True  # the batch trained last was the pass's last
        position = self._position
        saved = {
            "rank": args.process_index,
            "world_size": args.world_size,
            "epoch": self._stream.epoch if position is None else position["epoch"],
            "pass_complete": complete,
            "dataset_state": position,
        }
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, STREAM_STATE_FILE.format(rank=args.process_index)), "w") as file:
            json.dump(saved, file)

    # --- Bookkeeping

    def _produced_one(self):
        self._produced += 1
        self._pending.append((self._produced, self._stream.state_dict()))

    def _trained_one(self):
        self._consumed += 1
        while self._pending and self._pending[0][0] <= self._consumed:
            _, self._position = self._pending.popleft()
            self._pass_complete = False

    def _restore(self, args, state):
        folder = self.resume_from_checkpoint or os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        path = os.path.join(folder, STREAM_STATE_FILE.format(rank=args.process_index))
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"Resuming at step {state.global_step} on a stream, but {path} does not exist (a checkpoint saved "
                "without StreamStateCallback, or pass the checkpoint to StreamStateCallback(...)): with "
                "`ignore_data_skip=True` the stream would start again from its first record."
            )
        with open(path) as file:
            saved = json.load(file)
        if saved["world_size"] != args.world_size:
            raise ValueError(
                f"{folder} was saved by {saved['world_size']} processes, each with its own stream position; resume "
                f"with {saved['world_size']} processes, not {args.world_size}."
            )
        epoch = saved["epoch"] + int(saved["pass_complete"])
        if saved["dataset_state"] is not None and not saved["pass_complete"]:
            self._stream.load_state_dict(saved["dataset_state"])
        # The resumed Trainer starts counting passes at `global_step // max_steps` (0 until training is done).
        shift = epoch - state.global_step // max(args.max_steps, 1)
        if shift:
            _shift_epochs(self._stream, shift)
        self._position, self._pass_complete = saved["dataset_state"], saved["pass_complete"]
        logger.info(
            "Resuming the training stream of process %d at %s.",
            args.process_index,
            f"the start of pass {epoch}" if saved["pass_complete"] or self._position is None else "its saved position",
        )


class _PositionTaker:
    """A dataloader's `collate_fn` that tells `callback` the stream's position after each batch it collates."""

    def __init__(self, collate_fn, callback: StreamStateCallback):
        self.collate_fn, self.callback = collate_fn, callback

    def __call__(self, examples):
        batch = self.collate_fn(examples)
        self.callback._produced_one()
        return batch


def _check_streaming_run(args, train_dataloader) -> datasets.IterableDataset:
    """The stream `train_dataloader` reads; a ValueError for settings a streamed run cannot work with."""
    from accelerate.data_loader import DataLoaderDispatcher

    if not args.ignore_data_skip:
        raise ValueError(
            "StreamStateCallback restores the stream's position itself: set `TrainingArguments(ignore_data_skip=True)`, "
            "or a resumed Trainer would also skip (read and collate) the trained batches again, losing as many."
        )
    if args.dataloader_num_workers:
        raise ValueError(
            "StreamStateCallback needs `dataloader_num_workers=0`: with workers, the stream's position lives in the "
            "worker processes."
        )
    if isinstance(train_dataloader, DataLoaderDispatcher):
        raise ValueError(
            "A streamed run needs `TrainingArguments(accelerator_config={'dispatch_batches': False})`: with batches "
            "dispatched, process 0 reads and collates every process's batches and cuts them apart, which breaks on "
            "Setokim batches (one `pixel_values` row per image, lengths padded per batch)."
        )
    stream = _stream_of(train_dataloader)
    if stream is None:
        raise ValueError("StreamStateCallback is for a `datasets.IterableDataset` training set.")
    if args.process_index == 0 and not isinstance(
        getattr(train_dataloader, "dataset", None), datasets.IterableDataset
    ):
        logger.warning(
            "The training stream has %d shards for %d processes: accelerate has every process read (and check) every "
            "record and keep its share of each batch. A number of shards >= the number of processes splits the files "
            "instead.",
            stream.num_shards,
            args.world_size,
        )
    return stream


def _stream_of(loader):
    """The `datasets.IterableDataset` a (prepared) dataloader reads, through accelerate's wrappers."""
    dataset = getattr(loader, "dataset", None)
    while dataset is not None and not isinstance(dataset, datasets.IterableDataset):
        dataset = getattr(dataset, "dataset", None)  # accelerate's IterableDatasetShard
    return dataset


def _shift_epochs(stream: datasets.IterableDataset, shift: int):
    """Make the epoch the Trainer sets on `stream` (its pass count, restarted at 0 on resume) `shift` more."""
    set_epoch = type(stream).set_epoch
    stream.set_epoch = lambda epoch: set_epoch(stream, epoch + shift)
