"""Stage 2 with the generation head, stopped after step 1 and resumed, for `accelerate launch` (used by
tests/test_resume_generation.py, not collected by pytest).

Usage: accelerate launch ... tests/resume_generation_script.py OUT_DIR
(DDP with ACCELERATE_USE_CPU=true; DeepSpeed with a DeepSpeed accelerate config and without it).

Every process builds the same tiny Setokim and four shuffled records (three images to draw, one text-only chat) and
trains two steps, one record a process and step, saving a checkpoint after each (`whole/`). A second model, built from
another seed, then resumes from `whole/checkpoint-1` and trains step 2 again (`resumed/`): the middle of an epoch, the
Trainer's RNG restore after its first fetch. Each process writes `rank{R}.json`: for both runs the logged losses, what
the generation head was given in each step (hidden-token masks, timesteps and a digest of the noised tokens) and a
digest of its full parameters, and the largest difference between the two runs' parameters.
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
from transformers.integrations.deepspeed import unset_hf_deepspeed_config

from transformers_setok.training.collators import SetokimChatCollator
from transformers_setok.training.runners import end_process_group
from transformers_setok.training.setokim_trainer import SetokimPretrainTrainer


def records() -> list[dict]:
    def drawn(photo, caption):
        image = Image.fromarray(getattr(data, photo)())
        return {"images": [image], "messages": [user(caption), {"role": "assistant", "content": [{"type": "image"}]}]}

    text_only = {"images": [], "messages": [user("what is the cat ?"), assistant("the cat")]}
    return [drawn("astronaut", "a cat"), drawn("chelsea", "the cat"), drawn("coffee", "a cat"), text_only]


def tensor_digest(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()


class RecordingTrainer(SetokimPretrainTrainer):
    """Notes what each prepared training micro-batch gives the generation head."""

    def prepare_step(self, model, inputs, **options):
        step = super().prepare_step(model, inputs, **options)
        kwargs = step.model_kwargs
        drawn = step.diffusion is not None
        self.draws = getattr(self, "draws", []) + [
            {
                "step": self.state.global_step + 1,
                "draws": drawn,
                "masked": kwargs["masked_image_tokens"].nonzero().tolist() if drawn else None,
                "timesteps": kwargs["diffusion_timesteps"].tolist() if drawn else None,
                "noisy": tensor_digest(kwargs["noisy_image_tokens"]) if drawn else None,
            }
        ]
        return step


def train(out_dir: Path, model_seed: int, resume_from_checkpoint: str | None = None) -> dict:
    torch.set_num_threads(1)
    # A previous run's TrainingArguments leave its DeepSpeed config registered: forget it before building a model.
    unset_hf_deepspeed_config()
    torch.manual_seed(model_seed)  # the resumed run must take its weights from the checkpoint
    np.random.seed(model_seed)
    processor = tiny_processor()
    trainer = RecordingTrainer(
        model=tiny_setokim(processor, use_generation_head=True),
        args=tiny_training_arguments(
            out_dir,
            per_device_train_batch_size=1,
            learning_rate=1e-2,
            save_strategy="steps",
            save_steps=1,
            seed=0,
        ),
        data_collator=SetokimChatCollator(processor),
        train_dataset=Dataset.from_list(records()),
        processing_class=processor,
        train_generation_head=True,
    )
    trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    # DDP and ZeRO-2 keep every weight whole on every process (stage 2 refuses ZeRO-3 unless the LLM trains)
    params = {name: param.detach().float().cpu().clone() for name, param in trainer.model.named_parameters()}
    sha = hashlib.sha256()
    for name in sorted(params):
        sha.update(name.encode() + params[name].contiguous().numpy().tobytes())
    logs = [
        {"step": entry["step"], "loss": entry["loss"], "diffusion_loss": entry.get("diffusion_loss")}
        for entry in trainer.state.log_history
        if "loss" in entry
    ]
    report = {"logs": logs, "draws": trainer.draws, "digest": sha.hexdigest()}
    return {"trainer": trainer, "params": params, "report": report}


def main(out_dir: Path):
    whole = train(out_dir / "whole", model_seed=0)
    resumed = train(out_dir / "resumed", model_seed=1, resume_from_checkpoint=str(out_dir / "whole" / "checkpoint-1"))
    state = whole["trainer"].accelerator.state
    report = {
        "rank": state.process_index,
        "world_size": state.num_processes,
        "distributed_type": str(state.distributed_type),
        "zero_stage": getattr(getattr(state, "deepspeed_plugin", None), "zero_stage", None),
        "whole": whole["report"],
        "resumed": resumed["report"],
        "max_diff": max(float((whole["params"][k] - resumed["params"][k]).abs().max()) for k in whole["params"]),
    }
    (out_dir / f"rank{state.process_index}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
    end_process_group()
