"""Two-step Setokim training runs on deliberately mixed batches, for `accelerate launch` under DDP, DeepSpeed or FSDP 2
(used by tests/test_engines.py, not collected by pytest), or in one process for the reference.

Usage: accelerate launch ... tests/engine_training_script.py OUT_DIR MODE[,MODE...]
(DDP with ACCELERATE_USE_CPU=true; DeepSpeed without it; FSDP with SETOK_FSDP_CPU_SHIM=1, see tests/fsdp_cpu_shim.py)

Modes: `tokenizer` (stage 1: SeTok's reconstruction and concept contrast, no discriminator), `tokenizer_discriminator`
(stage 1 with the PatchGAN discriminator: only builds the trainer, and reports the error that refuses it, or None),
`sft_lora` (stage 3, LoRA), `sft_full` (stage 3, the whole LLM), `sft_full_tied` (the same with the LM head
tied to the input embeddings), `sft_segmentation` (stage 3 with the mask decoder, three steps of two records per process
on `segmentation_records`, see there), `generation` (stage 2 with the generation head), `generation_llm` (the same training
the whole LLM, as FSDP requires), `merge` (after `sft_lora`: `merge_adapters` on every process), `MODE_resume` (MODE
twice: two steps saving a checkpoint after each, then step 2 again from checkpoint-1; `{mode}.pt` holds the
uninterrupted run's parameters). The records are read in order (no shuffle), one per process and step, so with two
processes
    step 1: rank 0 has a text-only chat, rank 1 an image to read (sft) or to draw (generation)
    step 2: rank 0 reads an image, rank 1 draws one (generation) / reads one (sft)
and in stage 1 (`TOKENIZER_RECORDS`) each process has a photo of its own with one or two concepts, one of them shared
across the processes in step 1, so the contrast gathers batches of other sizes and merges a text.
Each mode writes `{mode}.pt` (rank 0: the trained parameters in full, gathered under ZeRO-3 / FSDP; `tokenizer` also
its `save_model` checkpoint, `tokenizer_final/`) and
`{mode}.rank{R}.json` (the losses, the batches' image flags, a digest of that rank's full parameters and the modules
FSDP made units of).
One process with `per_device_train_batch_size=2` trains on the same two records per step (4 for `sft_segmentation`,
whose `{mode}.rank{R}.buffers.pt` also holds that rank's `mask_decoder.prompt_norm` statistics).
"""

import hashlib
import json
import os
import sys
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from conftest import (
    CONCEPT_WORDS,
    TINY_TEXT_CONFIG,
    assistant,
    text_tokenizer,
    tiny_config,
    tiny_processor,
    tiny_setokim,
    tiny_training_arguments,
    user,
)
from datasets import Dataset
from PIL import Image
from skimage import data
from torch.utils.data import SequentialSampler
from transformers.integrations.deepspeed import unset_hf_deepspeed_config

from transformers_setok import SetokForImageReconstruction, SetokImageProcessor
from transformers_setok.training.collators import SetokimChatCollator
from transformers_setok.training.data import SEGMENTATION_FEATURES
from transformers_setok.training.masks import encode_rle
from transformers_setok.training.runners import end_process_group
from transformers_setok.training.setok_trainer import SetokImageTextCollator, SetokTrainer, SetokTrainingArguments
from transformers_setok.training.setokim_trainer import SetokimPretrainTrainer
from transformers_setok.training.sft_trainer import (
    SetokimSFTTrainer,
    merge_adapters,
    setokim_lora_config,
    setokim_sft_config,
)

if os.environ.get("SETOK_FSDP_CPU_SHIM") == "1":
    import fsdp_cpu_shim

    fsdp_cpu_shim.install()

PHOTOS = ["astronaut", "chelsea", "coffee"]


def _image(photo):
    return Image.fromarray(getattr(data, photo)())


def sft_records() -> list[dict]:
    """text-only, image, image, image: step 1 is mixed (one process reads no image)."""
    text_only = {"images": [], "messages": [user("what is the cat ?"), assistant("the cat")]}
    read = [
        {"images": [_image(photo)], "messages": [user(None, question), assistant("a cat")]}
        for photo, question in zip(PHOTOS, ["what is in the image ?", "what is the cat ?", "what is the image ?"])
    ]
    return [text_only, *read]


def generation_records() -> list[dict]:
    """text-only / image to draw, then image to read / image to draw: the head and SeTok run on one process only."""
    text_only = {"images": [], "messages": [user("what is the cat ?"), assistant("the cat")]}
    read = {"images": [_image(PHOTOS[1])], "messages": [user(None, "what is in the image ?"), assistant("a cat")]}

    def drawn(photo, caption):
        return {
            "images": [_image(photo)],
            "messages": [user(caption), {"role": "assistant", "content": [{"type": "image"}]}],
        }

    return [text_only, drawn(PHOTOS[0], "a cat"), read, drawn(PHOTOS[2], "the cat")]


def segmentation_records() -> list[dict]:
    """Twelve stage-3 records (`SEGMENTATION_FEATURES`), read in order by two processes of two records per step (rank 0
    the first two of each four) or by one process of four, so that step by step the objects per process are
        step 1: 0 (a text-only chat and a chat about an image) / 2
        step 2: 1 (and a chat about an image) / 2
        step 3: 2 / 0 (two text-only chats: this process has no image at all)
    A process without objects still runs the mask decoder, whose prompt statistics are an all-reduce."""
    horse = ~data.horse()
    canvas = np.full((*horse.shape, 3), 40, dtype=np.uint8)
    canvas[horse] = (200, 160, 90)

    def segment(image, mask, expression):
        return {"images": [image], "expression": expression, "messages": None, "mask": encode_rle(mask)}

    def box(photo, rows, cols):  # a photo and the box (fractions of its sides) that stands for its object
        image = _image(photo)
        mask = np.zeros((image.height, image.width), dtype=bool)
        mask[
            int(rows[0] * image.height) : int(rows[1] * image.height),
            int(cols[0] * image.width) : int(cols[1] * image.width),
        ] = True
        return image, mask

    def chat(images, question, answer):
        parts = [None] * len(images) + [question]
        return {"images": images, "expression": None, "messages": [user(*parts), assistant(answer)], "mask": None}

    horse_object = (Image.fromarray(canvas), horse)
    cat = box("chelsea", (0.1, 0.8), (0.2, 0.7))
    cup = box("coffee", (0.2, 0.9), (0.0, 0.5))
    man = box("astronaut", (0.0, 0.6), (0.3, 0.9))
    text_only = chat([], "what is the cat ?", "the cat")
    return [
        text_only,
        chat([_image("chelsea")], "what is in the image ?", "a cat"),
        segment(*horse_object, "the horse"),
        segment(*cat, "the cat"),
        segment(*man, "the image"),
        chat([_image("coffee")], "what is the image ?", "a cat"),
        segment(*cup, "a cat"),
        segment(*horse_object, "the image"),
        segment(*cat, "a cat"),
        segment(*cup, "the cat"),
        text_only,
        chat([], "what is the image ?", "a cat"),
    ]


# Stage 1, in the order the processes read them: step 1 rank 0 / rank 1 ("rocket" on both), step 2 rank 0 / rank 1.
TOKENIZER_RECORDS = {"astronaut": ["man", "rocket"], "rocket": ["rocket"], "chelsea": ["cat"], "coffee": ["cup"]}


def tokenizer_records() -> list[dict]:
    return [{"images": [_image(photo)], "concepts": concepts} for photo, concepts in TOKENIZER_RECORDS.items()]


class RecordingCollator(SetokimChatCollator):
    """Notes whether each batch reads an image, whether it draws one and how many objects it segments."""

    def __call__(self, examples):
        batch = super().__call__(examples)
        draws = bool((batch["labels"] == self.processor.image_token_id).any()) and "target_masks" not in batch
        seen = {"reads": "pixel_values" in batch, "draws": draws, "objects": len(batch.get("target_masks", []))}
        self.seen = getattr(self, "seen", []) + [seen]
        return batch


class RecordingImageTextCollator(SetokImageTextCollator):
    """Notes the concepts of each stage-1 batch and how many distinct texts it holds."""

    def __call__(self, records):
        batch = super().__call__(records)
        seen = {"concepts": [record["concepts"] for record in records], "texts": len(batch["concept_input_ids"])}
        self.seen = getattr(self, "seen", []) + [seen]
        return batch


class InOrder:
    """Reads the records in order: the test decides which process gets which record."""

    def _get_train_sampler(self, *args, **kwargs):
        return SequentialSampler(self.train_dataset)


class OrderedSFTTrainer(InOrder, SetokimSFTTrainer):
    pass


class OrderedPretrainTrainer(InOrder, SetokimPretrainTrainer):
    pass


class OrderedSetokTrainer(InOrder, SetokTrainer):
    pass


def tokenizer_model(use_discriminator: bool = False) -> SetokForImageReconstruction:
    """The tiny SeTok with the concept contrast's frozen text encoder (and the discriminator if asked)."""
    text_config = dict(TINY_TEXT_CONFIG, vocab_size=len(CONCEPT_WORDS))
    return SetokForImageReconstruction(tiny_config(text_config=text_config, use_discriminator=use_discriminator))


def build_tokenizer_trainer(mode: str, out_dir: Path, common: dict) -> SetokTrainer:
    # SeTok's merger has many gradient entries near 1e-6 (with eps=1e-6: one process against two moved them by up to
    # 8e-6, next to the 1e-5 of the comparison); eps=1e-4 keeps it to the real updates, as `build_trainer` explains.
    common = {**common, "adam_epsilon": 1e-4}
    # The model before the arguments, as in every mode here: `TrainingArguments` register DeepSpeed's ZeRO-3 config
    # even with `zero3_init_flag: false`, and a SeTok built after that gets its SigLIP from transformers' zero.Init
    # (partitioned), which SeTok's own initialisation then fails on ("Fan in and fan out can not be computed").
    return OrderedSetokTrainer(
        model=tokenizer_model(use_discriminator=mode == "tokenizer_discriminator"),
        args=tiny_training_arguments(out_dir / mode, factory=SetokTrainingArguments, disc_start=0, **common),
        train_dataset=Dataset.from_list(tokenizer_records()),
        data_collator=RecordingImageTextCollator(SetokImageProcessor(size=32), text_tokenizer()),
    )


def build_trainer(mode: str, out_dir: Path, processor, batch_size: int, **arguments):
    # Adam moves an entry by about lr x g / (|g| + eps): with eps=1e-8 a gradient entry that is rounding noise (one
    # batch of two against two of one) moves by up to lr, so a larger eps keeps the comparisons to the real updates.
    common = dict(
        per_device_train_batch_size=batch_size, learning_rate=1e-2, adam_epsilon=1e-6, seed=0, data_seed=0, **arguments
    )
    if mode.startswith("tokenizer"):
        return build_tokenizer_trainer(mode, out_dir, common)
    if mode.startswith("generation"):
        return OrderedPretrainTrainer(
            model=tiny_setokim(processor, use_generation_head=True),
            args=tiny_training_arguments(out_dir / mode, **common),
            data_collator=RecordingCollator(processor),
            train_dataset=Dataset.from_list(generation_records()),
            processing_class=processor,
            train_generation_head=True,
            train_language_model=mode == "generation_llm",
        )
    if mode == "sft_segmentation":
        common = {"max_steps": 3, **common}
        return OrderedSFTTrainer(
            tiny_setokim(processor, use_mask_decoder=True),
            tiny_training_arguments(out_dir / mode, factory=setokim_sft_config, **common, bf16=False),
            data_collator=RecordingCollator(processor),
            train_dataset=Dataset.from_list(segmentation_records(), features=SEGMENTATION_FEATURES),
            processing_class=processor,
        )
    text = {"tie_word_embeddings": True} if mode.endswith("_tied") else {}
    return OrderedSFTTrainer(
        tiny_setokim(processor, **text),
        tiny_training_arguments(out_dir / mode, factory=setokim_sft_config, **common, bf16=False),
        data_collator=RecordingCollator(processor),
        train_dataset=Dataset.from_list(sft_records()),
        processing_class=processor,
        peft_config=setokim_lora_config(r=4, lora_alpha=8, lora_dropout=0.0) if mode == "sft_lora" else None,
    )


def gathered(model):
    """All parameters in full (a ZeRO-3 or FSDP 2 parameter is gathered from its shards), as CPU float tensors."""
    names = [name for name, _ in model.named_parameters()]
    if any(hasattr(param, "full_tensor") for param in model.parameters()):
        # FSDP 2: torch's own full-state-dict route (every rank gets every tensor), not one gather per parameter.
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
        return {name: state[name].detach().float().cpu().clone() for name in names}
    params = {}
    for name, param in model.named_parameters():
        context = nullcontext()
        if hasattr(param, "ds_id"):
            import deepspeed

            context = deepspeed.zero.GatheredParameters([param], modifier_rank=None)
        with context:
            params[name] = param.detach().float().cpu().clone()
    return params


def fsdp_units(model) -> list[str]:
    """The names of the modules that FSDP 2 made units of (`fully_shard` turns each into an FSDPModule), "" for
    the root; empty without FSDP."""
    from torch.distributed.fsdp import FSDPModule

    return [name for name, module in model.named_modules() if isinstance(module, FSDPModule)]


def digest(params: dict) -> str:
    sha = hashlib.sha256()
    for name in sorted(params):
        sha.update(name.encode())
        sha.update(params[name].contiguous().numpy().tobytes())
    return sha.hexdigest()


def train(mode: str, out_dir: Path, batch_size: int = 1, resume_from_checkpoint=None, **arguments) -> dict:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    np.random.seed(0)
    processor = tiny_processor()
    # A previous run's TrainingArguments leave DeepSpeed's ZeRO-3 config registered, which would build this model
    # already partitioned (`zero3_init_flag: false` is the shipped config's choice): forget it first.
    unset_hf_deepspeed_config()
    trainer = build_trainer(mode, out_dir, processor, batch_size, **arguments)
    trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    params = gathered(trainer.model)
    state = trainer.accelerator.state
    report = {
        "rank": state.process_index,
        "world_size": state.num_processes,
        "distributed_type": str(state.distributed_type),
        "batches": trainer.data_collator.seen,
        "losses": [entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
        "loss_terms": {  # stage 1's reconstruction and concept terms, as logged (averaged over the processes)
            key: [entry[key] for entry in trainer.state.log_history if key in entry]
            for key in sorted(
                {k for entry in trainer.state.log_history for k in entry if k.endswith("_loss")} - {"train_loss"}
            )
        },
        "digest": digest(params),
        "fsdp_units": fsdp_units(trainer.model),
    }
    buffers = {  # the mask decoder's prompt statistics (none without a decoder)
        name: buffer.detach().cpu().clone()
        for name, buffer in trainer.model.named_buffers()
        if name.startswith("mask_decoder.prompt_norm.")
    }
    return {"trainer": trainer, "params": params, "buffers": buffers, "report": report}


PER_PROCESS_BATCH = {"sft_segmentation": 2}  # records per process and step; 1 for the other modes


def main(out_dir: Path, modes: list[str]):
    lora = None
    for mode in modes:
        if mode == "merge":
            merged = merge_adapters(lora["trainer"].model, out_dir / "merged")  # on every process
            rank = lora["report"]["rank"]
            (out_dir / f"merge.rank{rank}.json").write_text(json.dumps({"returned": merged is not None}))
            continue
        if mode == "tokenizer_discriminator":  # refused under DeepSpeed and FSDP when the trainer is built
            unset_hf_deepspeed_config()
            try:
                build_trainer(mode, out_dir, None, 1)
                refused = None
            except ValueError as error:
                refused = str(error)
            rank = int(os.environ.get("RANK", "0"))
            (out_dir / f"{mode}.rank{rank}.json").write_text(json.dumps({"refused": refused}))
            continue
        if mode.endswith("_resume"):  # two steps saving after each, then step 2 again from the step-1 checkpoint
            trained, saving = mode.removesuffix("_resume"), dict(save_strategy="steps", save_steps=1)
            whole = train(trained, out_dir / "whole", **saving)
            resumed = train(
                trained,
                out_dir / "whole",
                resume_from_checkpoint=str(out_dir / "whole" / trained / "checkpoint-1"),
                **saving,
            )
            rank = whole["report"]["rank"]
            report = {"whole": whole["report"], "resumed": resumed["report"]}
            report["max_diff"] = max(
                float((whole["params"][k] - resumed["params"][k]).abs().max()) for k in whole["params"]
            )
            (out_dir / f"{mode}.rank{rank}.json").write_text(json.dumps(report))
            if rank == 0:  # the uninterrupted run, to compare with another engine's
                torch.save(whole["params"], out_dir / f"{mode}.pt")
            continue
        run = train(mode, out_dir, batch_size=PER_PROCESS_BATCH.get(mode, 1))
        rank = run["report"]["rank"]
        (out_dir / f"{mode}.rank{rank}.json").write_text(json.dumps(run["report"]))
        if run["buffers"]:
            torch.save(run["buffers"], out_dir / f"{mode}.rank{rank}.buffers.pt")
        if rank == 0:
            torch.save(run["params"], out_dir / f"{mode}.pt")
        if mode == "sft_lora":
            lora = run
        if mode == "tokenizer":  # on every process (ZeRO-3 gathers the shards); loaded by the test
            run["trainer"].save_model(str(out_dir / "tokenizer_final"))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2].split(","))
    end_process_group()
