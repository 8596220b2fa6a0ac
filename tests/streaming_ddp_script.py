"""Stage-3 training on every kind of stream under `accelerate launch` (used by tests/test_streaming.py, not collected
by pytest).

Usage: accelerate launch --multi_gpu --num_processes 2 tests/streaming_ddp_script.py DATA_DIR OUT_DIR
(with ACCELERATE_USE_CPU=true on a CPU machine), after `build_sources(DATA_DIR)`. Every rank trains a tiny Setokim for
`STEPS` steps on each source of `SOURCES` in turn (stage 3; stage 2 on the captions), resuming one run from its
checkpoint, and writes
`rank{R}.json`: the record ids each run collated (every record's answer ends with its id), and the ids of the whole
stream as `split_for_process` splits it.
"""

import io
import json
import re
import sys
import tarfile
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from conftest import tiny_processor, tiny_setokim, tiny_training_arguments

from transformers_setok.training.collators import SetokimChatCollator
from transformers_setok.training.data import (
    captions_to_messages,
    load_hub_dataset,
    load_image_text_jsonl,
    load_llava_json,
    load_webdataset,
)
from transformers_setok.training.runners import end_process_group
from transformers_setok.training.setokim_trainer import SetokimPretrainTrainer
from transformers_setok.training.sft_trainer import SetokimSFTTrainer, setokim_sft_config
from transformers_setok.training.streaming import (
    STREAMING_TRAINING_ARGUMENTS,
    StreamStateCallback,
    split_for_process,
)

STEPS, BATCH = 3, 2  # per rank: 6 records of a source
RECORDS = 16  # per source, spread over its files
QUESTION = "what is in the image ?"
ID = re.compile(r"\b([a-z]+\d+)$")
# What each source is made of (files, shards), which `open_source` reads. "llava" is one file: fewer shards than
# processes, so accelerate falls back to splitting records; the others have a shard (or more) per process.
SOURCES = ("llava", "pairs", "parquet", "saved", "webdataset")
RESUMED = "parquet"  # trained for 2 x 2 steps, with a checkpoint after 2, then resumed from it


def record_ids(source: str, count: int = RECORDS) -> list[str]:
    return [f"{source[:3]}{index}" for index in range(count)]


def png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    PIL.Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def chat(answer: str) -> list[dict]:
    return [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]},
        {"role": "assistant", "content": [{"type": "text", "text": f"a cat {answer}"}]},
    ]


def build_sources(root: Path):
    """Every source of `SOURCES` under `root`, RECORDS records each."""
    import datasets

    images = root / "images"
    images.mkdir(parents=True)
    for index in range(4):
        (images / f"{index}.png").write_bytes(png(index))

    def jsonl(path: Path, lines: list[dict]):
        path.write_text("".join(json.dumps(line) + "\n" for line in lines))

    turns = [{"from": "human", "value": f"<image>\n{QUESTION}"}]
    llava = [
        {
            "id": name,
            "image": f"images/{i % 4}.png",
            "conversations": turns + [{"from": "gpt", "value": f"a cat {name}"}],
        }
        for i, name in enumerate(record_ids("llava"))
    ]
    jsonl(root / "llava.jsonl", llava)

    pairs = [
        {"image": f"../images/{i % 4}.png", "caption": f"a cat {name}"} for i, name in enumerate(record_ids("pairs"))
    ]
    (root / "pairs").mkdir()
    for part in range(2):
        jsonl(root / "pairs" / f"part-{part}.jsonl", pairs[part::2])

    rows = {
        "images": [[str(images / f"{i % 4}.png")] for i in range(RECORDS)],
        "messages": [chat(name) for name in record_ids("parquet")],
    }
    table = datasets.Dataset.from_dict(rows)
    (root / "parquet").mkdir()
    for part in range(2):
        table.select(range(part, RECORDS, 2)).to_parquet(str(root / "parquet" / f"part-{part}.parquet"))
    rows["messages"] = [chat(name) for name in record_ids("saved")]
    datasets.Dataset.from_dict(rows).save_to_disk(str(root / "saved"))

    (root / "webdataset").mkdir()
    for part in range(2):
        with tarfile.open(root / "webdataset" / f"shard-{part}.tar", "w") as tar:
            for i, name in list(enumerate(record_ids("webdataset")))[part::2]:
                messages = [
                    {"role": "user", "content": f"<image>{QUESTION}"},
                    {"role": "assistant", "content": f"a cat {name}"},
                ]
                text = json.dumps(messages)
                for field, content in (("png", png(i % 4)), ("json", text.encode())):
                    member = tarfile.TarInfo(f"{name}.{field}")
                    member.size = len(content)
                    tar.addfile(member, io.BytesIO(content))


def open_source(root: Path, source: str):
    """The stream of `source`, as the runner would open it (`streaming=True`)."""
    if source == "llava":
        return load_llava_json(root / "llava.jsonl", streaming=True)
    if source == "pairs":
        return captions_to_messages(load_image_text_jsonl(root / "pairs", streaming=True), prompt=QUESTION)
    if source == "parquet":
        return load_hub_dataset(str(root / "parquet"), streaming=True)
    if source == "saved":
        return load_hub_dataset(str(root / "saved"), streaming=True)
    return load_webdataset(root / "webdataset", {"image": "png", "messages": "json"}, streaming=True)


def answer_id(record) -> str:
    return ID.search(record["messages"][-1]["content"][-1]["text"]).group(1)


class RecordingCollator(SetokimChatCollator):
    """Keeps the id of every record it collates."""

    def __call__(self, examples):
        self.seen = getattr(self, "seen", []) + [answer_id(example) for example in examples]
        return super().__call__(examples)


def train(stream, out_dir: Path, processor, steps: int, resume=None, stage: str = "sft", **overrides) -> list[str]:
    """Train a tiny Setokim on `stream` (stage 3 with `SetokimSFTTrainer`, or stage 2 with `SetokimPretrainTrainer`)
    for `steps` steps with `StreamStateCallback`; the ids of the records collated, in order."""
    torch.manual_seed(0)
    collator = RecordingCollator(processor)
    arguments = {
        **dict(per_device_train_batch_size=BATCH, max_steps=steps, **STREAMING_TRAINING_ARGUMENTS),
        **overrides,
    }
    common = dict(
        data_collator=collator,
        train_dataset=stream,
        processing_class=processor,
        callbacks=[StreamStateCallback(resume)],
    )
    if stage == "pretrain":
        trainer = SetokimPretrainTrainer(
            model=tiny_setokim(processor), args=tiny_training_arguments(out_dir, **arguments), **common
        )
    else:
        args = tiny_training_arguments(out_dir, factory=setokim_sft_config, **{"bf16": False, **arguments})
        trainer = SetokimSFTTrainer(tiny_setokim(processor), args, **common)
    trainer.train(resume_from_checkpoint=resume)
    return getattr(collator, "seen", [])


def main(root: Path, out_dir: Path):
    import torch.distributed as dist

    torch.set_num_threads(1)
    processor = tiny_processor()
    report = {"trained": {}}
    for source in SOURCES:
        stream = open_source(root, source)
        if source == RESUMED:
            checkpoints = dict(save_strategy="steps", save_steps=2)
            straight = train(stream, out_dir / source, processor, 4, **checkpoints)
            checkpoint = str(out_dir / source / "checkpoint-2")
            resumed = train(open_source(root, source), out_dir / "resumed", processor, 4, checkpoint, **checkpoints)
            report["straight"], report["resumed"] = straight, resumed
            report["trained"][source] = straight[: STEPS * BATCH]
        else:
            stage = "pretrain" if source == "pairs" else "sft"  # captions: stage 2
            report["trained"][source] = train(stream, out_dir / source, processor, STEPS, stage=stage)
    rank, world_size = dist.get_rank(), dist.get_world_size()
    report.update(rank=rank, world_size=world_size)
    report["split"] = {
        source: [answer_id(record) for record in split_for_process(open_source(root, source))]
        for source in ("llava", "webdataset")
    }
    (out_dir / f"rank{rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
    end_process_group()
