"""Stage 3 (instruction tuning) with SetokimSFTTrainer on tiny models, CPU: a full fine-tune, LoRA and QLoRA, resuming,
the settings it enforces, adapter merging and a two-process `accelerate launch` run (gloo)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import bitsandbytes as bnb
import numpy as np
import peft
import pytest
import torch
from conftest import assistant, tiny_processor, tiny_setokim, user
from datasets import Dataset
from PIL import Image
from trl import SFTConfig

from transformers_setok import SetokimForConditionalGeneration, SetokimProcessor
from transformers_setok.training.collators import SetokimChatCollator
from transformers_setok.training.sft_trainer import (
    SetokimSFTTrainer,
    merge_adapters,
    merge_adapters_from,
    setokim_4bit_config,
    setokim_lora_config,
    setokim_sft_config,
)
from transformers_setok.training.step_inputs import prepare_step

TESTS = Path(__file__).parent
IMAGE_ID = tiny_processor().image_token_id


@pytest.fixture
def processor():
    return tiny_processor()


@pytest.fixture
def records(photos):
    """Four chats with 1, 0, 2 and 1 images (the third is captioning-style: its user turn holds only images)."""
    image = {name: Image.fromarray(photo) for name, photo in photos.items()}
    return [
        {"images": [image["chelsea"]], "messages": [user(None, "what is in the image ?"), assistant("a cat")]},
        {"images": [], "messages": [user("what is the cat ?"), assistant("the cat is a cat")]},
        {"images": [image["astronaut"], image["coffee"]], "messages": [user(None, None), assistant("a cat")]},
        {"images": [image["rocket"]], "messages": [user(None, "what is the image ?"), assistant("the image")]},
    ]


def sft_args(out_dir, **overrides) -> SFTConfig:
    kwargs = dict(
        output_dir=str(out_dir),
        use_cpu=True,
        bf16=False,  # TRL's default; needs a GPU
        max_steps=2,
        per_device_train_batch_size=2,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=0,
    )
    kwargs.update(overrides)
    return setokim_sft_config(**kwargs)


def trainer_for(model, processor, records, out_dir, peft_config=None, **overrides) -> SetokimSFTTrainer:
    return SetokimSFTTrainer(
        model,
        sft_args(out_dir, **overrides),
        train_dataset=Dataset.from_list(records),
        processing_class=processor,
        peft_config=peft_config,
    )


def logged_losses(trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def fresh_model(processor) -> SetokimForConditionalGeneration:
    torch.manual_seed(0)
    return tiny_setokim(processor)


def small_lora(**overrides):
    return setokim_lora_config(**{"r": 4, "lora_alpha": 8, **overrides})


@torch.no_grad()
def logits_of(model, processor, records):
    model.eval()
    for name, module in model.named_modules():
        if name.endswith("vision_tower"):
            module.requires_grad_(False)  # a freshly loaded SeTok has a trainable merger (stage 1)
    inputs = prepare_step(model, SetokimChatCollator(processor)(records), processor).model_kwargs
    return model(**inputs).logits


# --------------------------------------------------------------------------------------------------------------------
# Full fine-tune


def test_two_steps_train_the_llm_and_projector_but_never_setok(processor, records, tmp_path):
    model = fresh_model(processor)
    assert any(p.requires_grad for p in model.model.vision_tower.parameters())  # SeTok's merger trains in stage 1
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainer = trainer_for(model, processor, records, tmp_path)
    assert not any(p.requires_grad for p in model.model.vision_tower.parameters())
    trainer.train()

    assert len(logged_losses(trainer)) == 2 and all(np.isfinite(logged_losses(trainer)))
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    setok = {name for name in before if name.startswith("model.vision_tower.")}
    assert not changed & setok, "SeTok is frozen"
    assert changed == set(before) - setok, "every LLM and projector weight moved"
    assert any(name.startswith("model.multi_modal_projector.") for name in changed)


def test_loss_falls_on_a_tiny_overfit_set(processor, records, tmp_path):
    overfit = dict(max_steps=12, learning_rate=1e-2, lr_scheduler_type="constant")
    trainer = trainer_for(fresh_model(processor), processor, records[:2], tmp_path, **overfit)
    trainer.train()
    losses = logged_losses(trainer)
    assert np.mean(losses[-3:]) < 0.5 * np.mean(losses[:3]), losses


def test_resuming_from_a_checkpoint_gives_the_same_later_losses(processor, records, tmp_path):
    # LoRA with dropout: the resumed run must also restore the adapter, the projector copy and the RNG.
    kwargs = dict(max_steps=4, save_strategy="steps", save_steps=2, peft_config=small_lora())
    straight = trainer_for(fresh_model(processor), processor, records, tmp_path / "straight", **kwargs)
    straight.train()
    checkpoint = tmp_path / "straight" / "checkpoint-2"
    assert (checkpoint / "adapter_model.safetensors").is_file()

    resumed = trainer_for(fresh_model(processor), processor, records, tmp_path / "resumed", **kwargs)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    # The resumed log starts with the two entries restored from the checkpoint, then its own two.
    assert len(logged_losses(resumed)) == 4
    np.testing.assert_allclose(logged_losses(resumed)[2:], logged_losses(straight)[2:], rtol=1e-5)
    assert resumed.state.log_history[-2]["step"] == 4 and resumed.state.global_step == 4


# --------------------------------------------------------------------------------------------------------------------
# LoRA


def test_lora_preset_is_the_papers_on_the_llm_only():
    lora = setokim_lora_config()
    assert (lora.r, lora.lora_alpha, lora.lora_dropout) == (128, 256, 0.05)
    assert list(lora.modules_to_save) == ["multi_modal_projector", "mask_decoder"]
    assert setokim_lora_config(r=8, lora_dropout=0.0).r == 8

    wrapped = peft.get_peft_model(tiny_setokim(tiny_processor()), small_lora())
    adapted = [name for name, m in wrapped.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)]
    layers = "base_model.model.model.language_model.layers"
    attention = [f"self_attn.{name}_proj" for name in "qkvo"]
    mlp = [f"mlp.{name}_proj" for name in ("gate", "up", "down")]
    assert set(adapted) == {f"{layers}.{i}.{module}" for i in range(2) for module in attention + mlp}


def test_lora_trains_adapters_and_projector_then_merges_to_the_same_logits(processor, records, tmp_path):
    trainer = trainer_for(fresh_model(processor), processor, records, tmp_path / "run", peft_config=small_lora())
    model = trainer.model
    assert isinstance(model, peft.PeftModel)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert any("lora_B" in name for name in trainable)
    assert all("lora_" in name or "multi_modal_projector.modules_to_save" in name for name in trainable), trainable
    tower = model.get_base_model().model.vision_tower
    assert not any(isinstance(m, peft.tuners.lora.LoraLayer) for m in tower.modules())
    assert not any(p.requires_grad for p in tower.parameters())

    lora_b = {name: p.detach().clone() for name, p in model.named_parameters() if "lora_B" in name}
    projector = {name: p.detach().clone() for name, p in model.named_parameters() if "modules_to_save" in name}
    trainer.train()
    params = dict(model.named_parameters())
    assert all(not torch.equal(params[name], value) for name, value in {**lora_b, **projector}.items())

    expected = logits_of(model, processor, records)
    merge_adapters(model, tmp_path / "merged", processor)
    loaded = SetokimForConditionalGeneration.from_pretrained(tmp_path / "merged")
    assert not any("lora" in name for name, _ in loaded.named_parameters())
    saved_processor = SetokimProcessor.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(logits_of(loaded, saved_processor, records), expected)


# --------------------------------------------------------------------------------------------------------------------
# QLoRA


def save_wide_setokim(processor, path):
    """A tiny Setokim whose LLM layers are all >= 64 wide: bitsandbytes' CPU 4-bit kernels fail on narrower ones."""
    torch.manual_seed(0)
    tiny_setokim(processor, hidden_size=64, intermediate_size=128, num_key_value_heads=4).save_pretrained(path)
    processor.save_pretrained(path)


def test_qlora_keeps_setok_and_projector_unquantized_and_merges_from_the_full_base(processor, records, tmp_path):
    save_wide_setokim(processor, tmp_path / "base")
    quantization = setokim_4bit_config(bnb_4bit_compute_dtype=torch.float32)
    model = SetokimForConditionalGeneration.from_pretrained(tmp_path / "base", quantization_config=quantization)
    assert isinstance(model.model.language_model.layers[0].mlp.down_proj, bnb.nn.Linear4bit)
    for unquantized in (model.model.vision_tower, model.model.multi_modal_projector, model.lm_head):
        assert not any(isinstance(m, bnb.nn.Linear4bit) for m in unquantized.modules())
        assert all(p.dtype == torch.float32 for p in unquantized.parameters())

    trainer = trainer_for(model, processor, records, tmp_path / "run", peft_config=small_lora())
    projector = trainer.model.get_base_model().model.multi_modal_projector
    assert all(p.dtype == torch.float32 for p in projector.parameters()), "the projector reads float32 SeTok tokens"
    trained = {name: p.detach().clone() for name, p in projector.named_parameters() if "modules_to_save" in name}
    trainer.train()
    assert len(logged_losses(trainer)) == 2 and all(np.isfinite(logged_losses(trainer)))
    assert all(not torch.equal(p, trained[name]) for name, p in projector.named_parameters() if name in trained)

    with pytest.raises(ValueError, match="merge_adapters_from"):
        merge_adapters(trainer.model, tmp_path / "lossy")
    trainer.save_model(str(tmp_path / "adapter"))
    merged = merge_adapters_from(tmp_path / "base", tmp_path / "adapter", tmp_path / "merged", processor)
    loaded = SetokimForConditionalGeneration.from_pretrained(tmp_path / "merged")
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in loaded.modules())
    assert not any("lora" in name for name, _ in loaded.named_parameters())
    for name, p in loaded.model.multi_modal_projector.named_parameters():
        torch.testing.assert_close(p, dict(projector.named_parameters())[f"modules_to_save.default.{name}"])

    reference = peft.PeftModel.from_pretrained(
        SetokimForConditionalGeneration.from_pretrained(tmp_path / "base"), str(tmp_path / "adapter")
    )
    torch.testing.assert_close(logits_of(loaded, processor, records), logits_of(reference, processor, records))
    torch.testing.assert_close(logits_of(merged, processor, records), logits_of(loaded, processor, records))


# --------------------------------------------------------------------------------------------------------------------
# Settings and inputs


def test_trl_defaults_are_settled_for_the_collator(processor, records, tmp_path):
    args = SFTConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none")
    assert args.remove_unused_columns and args.max_length == 1024  # TRL's defaults
    trainer = SetokimSFTTrainer(
        fresh_model(processor), args, train_dataset=Dataset.from_list(records), processing_class=processor
    )
    assert trainer.args.remove_unused_columns is False and trainer.args.max_length is None
    assert trainer.args.dataset_kwargs == {"skip_prepare_dataset": True}
    assert isinstance(trainer.data_collator, SetokimChatCollator)


@pytest.mark.parametrize(
    "setting, value",
    [
        ("packing", True),
        ("padding_free", True),
        ("assistant_only_loss", True),
        ("completion_only_loss", True),
        ("max_length", 64),
        ("dataset_kwargs", {"skip_prepare_dataset": False}),
    ],
)
def test_conflicting_settings_are_refused_by_name(processor, records, tmp_path, setting, value):
    with pytest.raises(ValueError, match=rf"SFTConfig\({setting}="):
        trainer_for(fresh_model(processor), processor, records, tmp_path, **{setting: value})


@pytest.mark.parametrize("max_length", [64, 1024])
def test_an_explicit_max_length_is_refused_even_at_trls_default(max_length):
    # setokim_sft_config sees its caller's keywords, so 1024 passed on purpose is not mistaken for TRL's default.
    with pytest.raises(ValueError, match=rf"SFTConfig\(max_length=None\).*max_length={max_length}\)"):
        setokim_sft_config(output_dir="out", max_length=max_length)


def test_other_models_processors_and_formatting_are_refused(processor, records, tmp_path):
    dataset = Dataset.from_list(records)
    with pytest.raises(TypeError, match="SetokimForConditionalGeneration"):
        SetokimSFTTrainer(torch.nn.Linear(2, 2), sft_args(tmp_path), train_dataset=dataset, processing_class=processor)
    model = fresh_model(processor)
    with pytest.raises(TypeError, match="SetokimProcessor"):
        SetokimSFTTrainer(model, sft_args(tmp_path), train_dataset=dataset, processing_class=processor.tokenizer)
    with pytest.raises(ValueError, match="formatting_func"):
        SetokimSFTTrainer(
            model, sft_args(tmp_path), train_dataset=dataset, processing_class=processor, formatting_func=str
        )


# --------------------------------------------------------------------------------------------------------------------
# Two processes


def launch_two_processes(tmp_path, mode: str) -> list[dict]:
    """tests/accelerate_training_script.py in `mode` under `accelerate launch` with two CPU processes (gloo)."""
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        ACCELERATE_USE_CPU="true",  # `--multi_gpu` is accelerate's torchrun launcher; the processes stay on the CPU
        HF_HOME=str(tmp_path / "hf_home"),  # no user `accelerate config` file can change the launch
    )
    # `--cpu` alone would start a single process: only the torchrun launcher starts several on one machine.
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    command += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]
    command += [str(TESTS / "accelerate_training_script.py"), str(tmp_path), mode]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]

    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    for rank, report in enumerate(ranks):
        assert (report["rank"], report["world_size"], report["backend"]) == (rank, 2, "gloo")
        assert report["distributed_type"].endswith("MULTI_CPU")
        assert len(report["batches"]) == 2 and len(report["losses"]) == 2
        assert report["projector"] != report["projector_before"], "the projector trained"
        assert report["trained"] != report["trained_before"], f"the {mode} weights trained"
    assert ranks[0]["batches"] != ranks[1]["batches"], "the ranks saw different records"
    assert ranks[0]["projector"] == ranks[1]["projector"]
    assert ranks[0]["trained"] == ranks[1]["trained"]
    return ranks


def test_two_process_accelerate_launch_synchronises_every_trained_weight(tmp_path):
    """Each rank trains on other records; identical LoRA and projector weights afterwards prove that DDP averaged the
    gradients, the projector's too, although it runs in `prepare_step` outside DDP's forward."""
    ranks = launch_two_processes(tmp_path, "sft")
    has_image = [[IMAGE_ID in batch[0] for batch in report["batches"]] for report in ranks]
    assert any(a != b for a, b in zip(*has_image)), "one step had an image on one rank only"


def test_two_process_stage_two_synchronises_the_generation_head(tmp_path):
    """Stage 2 with the generation head under DDP: in a step where one rank draws an image and the other captions,
    the head gets a gradient on one rank only; identical heads afterwards prove DDP reduced it all the same."""
    ranks = launch_two_processes(tmp_path, "generation")
    draws = [[IMAGE_ID in labels[0] for labels in report["labels"]] for report in ranks]
    assert any(a != b for a, b in zip(*draws)), "one step drew an image on one rank only"
