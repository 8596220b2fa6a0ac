"""Stage 3 trains image edits with the generation head (`SetokimSFTTrainer(train_generation_head=True)`): an edit's
chat token by token once expanded, exactly the head (and the LLM, or LoRA) trained, the loss falling, condition
dropout from the trainer's own arguments, LoRA's head copy merged and saved, and one step on a batch that mixes
understanding, text-to-image, editing and segmentation records."""

import copy

import numpy as np
import peft
import pytest
import torch
from conftest import tiny_processor, tiny_setokim
from datasets import Dataset
from PIL import Image
from test_sft_trainer import sft_args, small_lora

from transformers_setok import SetokimForConditionalGeneration
from transformers_setok.generation import noise_scheduler_for
from transformers_setok.modeling.placeholders_setokim import IGNORE_INDEX
from transformers_setok.training.collators import SetokimChatCollator
from transformers_setok.training.data import SEGMENTATION_FEATURES, editing_messages
from transformers_setok.training.masks import encode_rle
from transformers_setok.training.sft_trainer import SetokimSFTTrainer, merge_adapters, merge_adapters_from
from transformers_setok.training.step_inputs import DiffusionSettings, prepare_step

INSTRUCTION = "what is the cat ?"  # every word is in the tiny tokenizer's vocabulary


@pytest.fixture(scope="module")
def processor():
    return tiny_processor()


@pytest.fixture(scope="module")
def pictures(photos):
    return {name: Image.fromarray(photo) for name, photo in photos.items()}


def edit(source, target, instruction=INSTRUCTION):
    return {"images": [source, target], "messages": editing_messages(instruction)}


def text_to_image(image, caption="a cat"):
    user = {"role": "user", "content": [{"type": "text", "text": caption}]}
    return {"images": [image], "messages": [user, {"role": "assistant", "content": [{"type": "image"}]}]}


def captioning(image, caption="a cat"):
    user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is in the image ?"}]}
    return {
        "images": [image],
        "messages": [user, {"role": "assistant", "content": [{"type": "text", "text": caption}]}],
    }


def segmentation(image):
    mask = np.zeros((image.height, image.width), dtype=bool)
    mask[: image.height // 2, : image.width // 2] = True
    return {"images": [image], "expression": "the cat", "messages": None, "mask": encode_rle(mask)}


@pytest.fixture
def edits(pictures):
    return [
        edit(pictures["astronaut"], pictures["chelsea"]),
        edit(pictures["coffee"], pictures["rocket"]),
        edit(pictures["chelsea"], pictures["coffee"]),
        edit(pictures["rocket"], pictures["astronaut"]),
    ]


def head_model(processor, **kwargs) -> SetokimForConditionalGeneration:
    torch.manual_seed(0)
    model = tiny_setokim(processor, use_generation_head=True, **kwargs)
    # As stage 2 leaves it: a token scale set, and a head that says something (a fresh one predicts 0, its gates
    # closed, so most of its weights would get no gradient at first).
    model.config.generation_token_scale = 1.0
    for parameter in model.generation_head.parameters():
        torch.nn.init.normal_(parameter, std=0.05)
    return model


def sft_trainer(model, processor, records, out_dir, peft_config=None, features=None, trainer_kwargs=None, **args):
    return SetokimSFTTrainer(
        model,
        sft_args(out_dir, **args),
        train_dataset=Dataset.from_list(records, features=features),
        processing_class=processor,
        peft_config=peft_config,
        **(trainer_kwargs or {}),
    )


def words(processor, ids) -> list[str]:
    return processor.tokenizer.convert_ids_to_tokens(ids.tolist())


def snapshot(model) -> dict:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def changed(model, before: dict) -> set[str]:
    return {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}


def part(name: str) -> str:
    """The model part a parameter name belongs to (`generation_head`, `model.language_model`, ...)."""
    for prefix in (
        "generation_head",
        "image_decoder",
        "mask_decoder",
        "lm_head",
        "model.language_model",
        "model.multi_modal_projector",
        "model.vision_tower",
    ):
        if name.startswith(prefix):
            return prefix
    raise AssertionError(f"unexpected parameter {name}")


# --------------------------------------------------------------------------------------------------------------------
# The edit's chat


def test_an_edit_reads_its_source_and_learns_its_target_block_token_by_token(processor, pictures):
    """Collated, the source's placeholder is an input and the target's a label; expanded, the source's block is
    read whole and unlabelled, the target's block (`[Img]`, n_t x `<image>`, `[/Img]`) and eos are the labels, and
    only the target's tokens are hidden for the head."""
    model = head_model(processor)
    model.model.vision_tower.requires_grad_(False)
    record = edit(pictures["astronaut"], pictures["chelsea"])
    batch = SetokimChatCollator(processor)([record])
    X = "X"  # an IGNORE_INDEX label
    collated = ["User", ":", "<image>", "what", "is", "the", "cat", "?", "Assistant", ":", "<image>", "</s>"]
    assert words(processor, batch["input_ids"][0]) == collated
    labels = batch["labels"][0].tolist()
    assert [X if label == IGNORE_INDEX else processor.tokenizer.convert_ids_to_tokens(label) for label in labels] == [
        X
    ] * 10 + ["<image>", "</s>"]

    scheduler = noise_scheduler_for(model.config)
    step = prepare_step(
        model, batch, processor, diffusion=DiffusionSettings(scheduler), generator=torch.Generator().manual_seed(0)
    )
    kwargs = step.model_kwargs
    counts = [len(t) for t in model.get_image_features(batch["pixel_values"]).pooler_output]
    n_source, n_target = counts

    def block(n):
        return ["[Img]"] + ["<image>"] * n + ["[/Img]"]

    row = ["User", ":"] + block(n_source) + ["what", "is", "the", "cat", "?", "Assistant", ":"]
    row += block(n_target) + ["</s>"]
    assert words(processor, kwargs["input_ids"][0]) == row
    expanded = kwargs["labels"][0].tolist()
    answer = len(row) - n_target - 3  # where the target's block opens
    assert all(label == IGNORE_INDEX for label in expanded[:answer])
    assert words(processor, torch.tensor(expanded[answer:])) == block(n_target) + ["</s>"]
    hidden = kwargs["masked_image_tokens"][0]
    assert not bool(hidden[: answer + 1].any()) and not bool(hidden[-2:].any())  # only inside the target's block
    assert int(hidden.sum()) >= round(0.7 * n_target)  # MAR: 70-100 % hidden
    assert step.diffusion.num_target_tokens == n_target
    assert kwargs["noisy_image_tokens"].shape == (4 * int(hidden.sum()), model.config.vision_config.token_dim)


# --------------------------------------------------------------------------------------------------------------------
# What trains


def test_full_fine_tuning_trains_the_head_llm_and_projector_and_the_loss_falls(processor, edits, tmp_path):
    model = head_model(processor)
    trainer = sft_trainer(
        model,
        processor,
        edits[:1],
        tmp_path,
        trainer_kwargs=dict(train_generation_head=True, diffusion_noise_repeats=16),
        eval_strategy="no",
        max_steps=30,
        learning_rate=3e-3,
        per_device_train_batch_size=1,
        logging_steps=10,
    )
    trainer.eval_dataset = trainer.train_dataset
    before_eval = trainer.evaluate()
    before = snapshot(model)
    trainer.train()
    after_eval = trainer.evaluate()
    moved = {part(name) for name in changed(model, before)}
    assert moved == {"generation_head", "model.language_model", "model.multi_modal_projector", "lm_head"}
    # The same masks and noise in both evaluations: the losses compare.
    assert after_eval["eval_diffusion_loss"] < 0.6 * before_eval["eval_diffusion_loss"], (before_eval, after_eval)
    assert after_eval["eval_loss"] < 0.6 * before_eval["eval_loss"], (before_eval, after_eval)
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 3 and all(np.isfinite(entry["diffusion_loss"]) for entry in logged)


def test_without_train_generation_head_the_head_stays_and_its_loss_still_trains_the_llm(processor, edits, tmp_path):
    model = head_model(processor)
    trainer = sft_trainer(model, processor, edits, tmp_path)
    assert not any(p.requires_grad for p in model.generation_head.parameters())
    assert not any(p.requires_grad for p in model.image_decoder.parameters())
    before = snapshot(model)
    trainer.train()
    moved = {part(name) for name in changed(model, before)}
    assert moved == {"model.language_model", "model.multi_modal_projector", "lm_head"}
    assert all(np.isfinite(entry["diffusion_loss"]) for entry in trainer.state.log_history if "loss" in entry)


def test_lora_trains_the_head_whole_then_merges_and_saves_it(processor, edits, tmp_path):
    model = head_model(processor)
    lora = small_lora()
    given = copy.deepcopy(lora)
    trainer = sft_trainer(
        model, processor, edits, tmp_path / "run", peft_config=lora, trainer_kwargs=dict(train_generation_head=True)
    )
    assert lora.modules_to_save == given.modules_to_save  # the caller's config is left as it is
    wrapped = trainer.model
    assert isinstance(wrapped, peft.PeftModel)
    trainable = {name for name, p in wrapped.named_parameters() if p.requires_grad}
    head_copy = {name for name in trainable if ".generation_head.modules_to_save." in name}
    assert head_copy and all(
        "lora_" in name or ".multi_modal_projector.modules_to_save." in name or name in head_copy for name in trainable
    ), trainable
    heads = {name: p.detach().clone() for name, p in wrapped.named_parameters() if name in head_copy}
    trainer.train()
    params = dict(wrapped.named_parameters())
    assert all(not torch.equal(params[name], value) for name, value in heads.items())
    trained_head = {
        name.split(".generation_head.modules_to_save.default.", 1)[1]: value.detach().clone()
        for name, value in params.items()
        if name in head_copy
    }

    # The saved adapter holds the head: applied to the base checkpoint, it merges into the same head.
    trainer.save_model(tmp_path / "adapter")
    model_dir = tmp_path / "base"
    head_model(processor).save_pretrained(model_dir)  # the same seed: the base the run started from
    processor.save_pretrained(model_dir)
    from_files = merge_adapters_from(model_dir, tmp_path / "adapter", tmp_path / "merged-from", processor)
    merged = merge_adapters(wrapped, tmp_path / "merged", processor)
    for each in (merged, from_files, SetokimForConditionalGeneration.from_pretrained(tmp_path / "merged")):
        state = each.generation_head.state_dict()
        assert state.keys() == trained_head.keys()
        assert all(torch.equal(state[name], value) for name, value in trained_head.items())


def test_the_head_settings_are_checked_by_name(processor, edits, tmp_path):
    with pytest.raises(ValueError, match="`train_generation_head=True` needs a model with a generation head"):
        sft_trainer(
            tiny_setokim(processor), processor, edits, tmp_path, trainer_kwargs=dict(train_generation_head=True)
        )
    bad = [
        (dict(condition_text_dropout=1.5), "`condition_text_dropout`"),
        (dict(condition_image_dropout=0.6, condition_both_dropout=0.6), "must sum to at most 1"),
        (dict(diffusion_loss_weight=-1.0), "`diffusion_loss_weight` must be a finite number >= 0"),
        (dict(diffusion_noise_repeats=0), "`diffusion_noise_repeats`"),
        (dict(generation_mask_ratio_min=1.5), "`generation_mask_ratio_min` must lie in"),
    ]
    for kwargs, message in bad:
        with pytest.raises(ValueError, match=message):
            sft_trainer(
                head_model(processor),
                processor,
                edits,
                tmp_path,
                trainer_kwargs=dict(train_generation_head=True, **kwargs),
            )
    lora = small_lora(modules_to_save=["multi_modal_projector", "generation_head"])
    with pytest.raises(ValueError, match=r"`peft_config.modules_to_save` .* but `train_generation_head=False`"):
        sft_trainer(head_model(processor), processor, edits, tmp_path, peft_config=lora)
    no_scale = head_model(processor)
    no_scale.config.generation_token_scale = None  # an estimate could not be saved with the adapter
    with pytest.raises(ValueError, match=r"with LoRA needs `model.config.generation_token_scale`"):
        sft_trainer(
            no_scale,
            processor,
            edits,
            tmp_path,
            peft_config=small_lora(),
            trainer_kwargs=dict(train_generation_head=True),
        )
    wrapped = peft.get_peft_model(head_model(processor), small_lora())
    with pytest.raises(ValueError, match="the PeftModel does not train its generation head"):
        sft_trainer(wrapped, processor, edits, tmp_path, trainer_kwargs=dict(train_generation_head=True))


def test_a_model_without_a_token_scale_gets_one_from_the_training_images(processor, edits, tmp_path):
    model = head_model(processor)
    model.config.generation_token_scale = None
    sft_trainer(model, processor, edits, tmp_path, trainer_kwargs=dict(train_generation_head=True))
    tokens = model.model.vision_tower(
        processor.image_processor([image for record in edits for image in record["images"]], return_tensors="pt")[
            "pixel_values"
        ]
    )
    values = tokens.last_hidden_state[tokens.attention_mask.bool()].double()
    assert model.config.generation_token_scale == pytest.approx(float(values.std(unbiased=False)) ** -1, rel=1e-6)


# --------------------------------------------------------------------------------------------------------------------
# Condition dropout in stage 3


def rows(processor, kwargs) -> list[str]:
    """Each row's words, image blocks written `[Img]...[/Img]`."""
    out = []
    for ids, mask in zip(kwargs["input_ids"], kwargs["attention_mask"]):
        text = " ".join(words(processor, ids[mask.bool()])).replace(" <image>", "")
        out.append(text.replace("[Img] [/Img]", "[Img]...[/Img]"))
    return out


def test_condition_dropout_from_the_trainers_arguments(processor, pictures, tmp_path):
    records = [edit(pictures["astronaut"], pictures["chelsea"]), text_to_image(pictures["coffee"])]
    batch = SetokimChatCollator(processor)(records)
    without_conditions = {key: value for key, value in batch.items() if not key.startswith("condition_")}

    def step(micro_batch=0, **dropout):
        trainer = sft_trainer(
            head_model(processor),
            processor,
            records,
            tmp_path,
            trainer_kwargs=dict(train_generation_head=True, **dropout),
        )
        return trainer, trainer.prepare_step(trainer.model, batch, micro_batch=micro_batch)

    full = [
        "User : [Img]...[/Img] what is the cat ? Assistant : [Img]...[/Img] </s>",
        "User : a cat Assistant : [Img]...[/Img] </s>",
    ]
    # Probabilities of 0 change nothing: the step of a batch without its condition fields, the same draws.
    trainer, zero = step()
    plain = trainer.prepare_step(trainer.model, without_conditions, micro_batch=0)
    assert rows(processor, zero.model_kwargs) == full
    for key, value in plain.model_kwargs.items():
        if torch.is_tensor(value):
            assert torch.equal(value, zero.model_kwargs[key]), key
    assert torch.equal(plain.diffusion.target, zero.diffusion.target)

    _, text = step(condition_text_dropout=1.0)
    assert rows(processor, text.model_kwargs) == [
        "User : [Img]...[/Img] Assistant : [Img]...[/Img] </s>",
        "User : Assistant : [Img]...[/Img] </s>",
    ]
    _, image = step(condition_image_dropout=1.0)
    assert rows(processor, image.model_kwargs) == ["User : what is the cat ? Assistant : [Img]...[/Img] </s>", full[1]]
    assert len(image.model_kwargs["mm_encoder_outputs"]["image"].pooler_output) == 2  # the source left before SeTok
    _, both = step(condition_both_dropout=1.0)
    assert rows(processor, both.model_kwargs) == ["User : Assistant : [Img]...[/Img] </s>"] * 2
    # Outside a training step (evaluation) nothing is dropped.
    _, evaluated = step(micro_batch=None, condition_both_dropout=1.0)
    assert rows(processor, evaluated.model_kwargs) == full


# --------------------------------------------------------------------------------------------------------------------
# A mixed batch


def test_one_step_on_a_mixed_batch_trains_every_head(processor, pictures, tmp_path):
    """Understanding, text-to-image, an edit and a segmentation request in one batch, on a model with both heads:
    finite LM, diffusion and mask losses, and gradients in the head, the decoder, the LLM and the projector."""
    model = head_model(processor, use_mask_decoder=True)
    records = [
        captioning(pictures["coffee"]),
        text_to_image(pictures["rocket"]),
        edit(pictures["astronaut"], pictures["chelsea"]),
        segmentation(pictures["chelsea"]),
    ]
    for record in records:
        record.setdefault("expression", None)
        record.setdefault("mask", None)
    trainer = sft_trainer(
        model,
        processor,
        records,
        tmp_path,
        features=SEGMENTATION_FEATURES,
        trainer_kwargs=dict(train_generation_head=True),
        per_device_train_batch_size=4,
        max_steps=1,
    )
    batch = SetokimChatCollator(processor)([trainer.train_dataset[i] for i in range(4)])
    (prepared,), num_items = trainer.get_batch_samples(iter([batch]), 1, torch.device("cpu"))
    assert prepared.diffusion is not None and prepared.num_objects == 1
    model.train()
    loss, outputs = trainer.compute_loss(model, prepared, return_outputs=True, num_items_in_batch=num_items)
    assert torch.isfinite(outputs.loss) and torch.isfinite(outputs.mask_loss) and torch.isfinite(loss)
    diffusion = trainer._loss_terms["train"]["diffusion_loss"]
    assert len(diffusion) == 1 and all(torch.isfinite(part) for part in diffusion[0])  # (value x weight, weight)
    loss.backward()
    grads = {}
    for name, p in model.named_parameters():
        if p.grad is not None:
            grads.setdefault(part(name), []).append(float(p.grad.abs().sum()))
    for reached in ("generation_head", "mask_decoder", "model.language_model", "model.multi_modal_projector"):
        assert sum(grads.get(reached, [])) > 0, reached
    assert "model.vision_tower" not in grads and "image_decoder" not in grads
    model.zero_grad()

    before = snapshot(model)
    trainer.train()
    (entry,) = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert all(np.isfinite(entry[key]) for key in ("loss", "diffusion_loss", "mask_loss"))
    moved = {part(name) for name in changed(model, before)}
    assert {"generation_head", "mask_decoder", "model.language_model", "model.multi_modal_projector"} <= moved
    assert "model.vision_tower" not in moved and "image_decoder" not in moved
