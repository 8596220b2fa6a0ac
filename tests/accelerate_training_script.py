"""Two-step training runs for `accelerate launch` (used by tests/test_sft_trainer.py, not collected by pytest):
stage 3 with LoRA (`sft`), or stage 2 with the generation head (`generation`).

Usage: accelerate launch --multi_gpu --num_processes 2 tests/accelerate_training_script.py OUT_DIR sft|generation
(with ACCELERATE_USE_CPU=true on a CPU machine). Every rank builds the same tiny model, processor and four records,
trains two steps on its own share of the records and writes `rank{R}.json`: the batches it saw, its losses and the
SHA-256 of its trained weights (LoRA or generation head, and projector), which the test compares across ranks.
"""

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import torch
from conftest import assistant, tiny_processor, tiny_setokim, tiny_training_arguments, user
from datasets import Dataset
from PIL import Image
from skimage import data

from transformers_setok.training.collators import SetokimChatCollator
from transformers_setok.training.runners import end_process_group
from transformers_setok.training.setokim_trainer import SetokimPretrainTrainer
from transformers_setok.training.sft_trainer import SetokimSFTTrainer, setokim_lora_config, setokim_sft_config

QUESTIONS = ["what is in the image ?", "what is the cat ?", "what is the image ?", "what is in the cat ?"]
PHOTOS = ["astronaut", "chelsea", "coffee"]


def records() -> list[dict]:
    """Three chats with a photo and one text-only chat: a rank whose batch has no image leaves the projector without
    a gradient while the other rank gives it one, which DDP must still reduce."""

    def chat(question, answer, image=True):
        return [user(None, question) if image else user(question), assistant(answer)]

    with_images = [
        {"images": [Image.fromarray(getattr(data, photo)())], "messages": chat(question, "a cat")}
        for photo, question in zip(PHOTOS, QUESTIONS[:3])
    ]
    return with_images + [{"images": [], "messages": chat(QUESTIONS[3], "the cat", image=False)}]


def generation_records() -> list[dict]:
    """Three text-to-image chats and one captioning chat: whatever the shuffle, the captioning chat shares a step
    with a drawn image on the other rank, so the head gets a gradient on one rank only in that step."""
    images = [Image.fromarray(getattr(data, photo)()) for photo in PHOTOS]
    drawn = [
        {"images": [image], "messages": [user(caption), {"role": "assistant", "content": [{"type": "image"}]}]}
        for image, caption in zip(images, ("a cat", "the cat", "a cat"))
    ]
    return drawn + [{"images": [images[0]], "messages": [user(None, QUESTIONS[0]), assistant("a cat")]}]


class RecordingCollator(SetokimChatCollator):
    """Keeps the ids of every batch, to show that the two ranks trained on different records."""

    def __call__(self, examples):
        batch = super().__call__(examples)
        self.seen = getattr(self, "seen", []) + [batch["input_ids"].tolist()]
        self.seen_labels = getattr(self, "seen_labels", []) + [batch["labels"].tolist()]
        return batch


def digest(named_params) -> str:
    sha = hashlib.sha256()
    for name, param in sorted(named_params):
        sha.update(name.encode())
        sha.update(param.detach().cpu().contiguous().numpy().tobytes())
    return sha.hexdigest()


def trained_weights(model, part: str):
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad and part in name]


def build_trainer(mode: str, out_dir: Path, processor, collator):
    common = dict(per_device_train_batch_size=1, learning_rate=1e-2)  # one record a rank and step
    if mode == "generation":
        return SetokimPretrainTrainer(
            model=tiny_setokim(processor, use_generation_head=True),
            args=tiny_training_arguments(out_dir, **common),
            data_collator=collator,
            train_dataset=Dataset.from_list(generation_records()),
            processing_class=processor,
            train_generation_head=True,
        )
    return SetokimSFTTrainer(
        tiny_setokim(processor),
        tiny_training_arguments(out_dir, factory=setokim_sft_config, **common, bf16=False),
        data_collator=collator,
        train_dataset=Dataset.from_list(records()),
        processing_class=processor,
        peft_config=setokim_lora_config(r=4, lora_alpha=8),
    )


def main(out_dir: Path, mode: str):
    torch.set_num_threads(1)
    torch.manual_seed(0)
    np.random.seed(0)
    processor = tiny_processor()
    collator = RecordingCollator(processor)
    trainer = build_trainer(mode, out_dir, processor, collator)
    part = "generation_head" if mode == "generation" else "lora_"
    head_before = digest(trained_weights(trainer.model, part))
    before = digest(trained_weights(trainer.model, "multi_modal_projector"))
    trainer.train()

    state = trainer.accelerator.state
    report = {
        "rank": state.process_index,
        "world_size": state.num_processes,
        "distributed_type": str(state.distributed_type),
        "backend": state.backend,
        "batches": collator.seen,
        "labels": collator.seen_labels,
        "losses": [entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
        "projector_before": before,
        "projector": digest(trained_weights(trainer.model, "multi_modal_projector")),
        "trained_before": head_before,
        "trained": digest(trained_weights(trainer.model, part)),
    }
    (out_dir / f"rank{state.process_index}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
    end_process_group()
