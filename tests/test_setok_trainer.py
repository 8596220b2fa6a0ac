"""Stage 1 through SetokTrainer: loss terms logged, the GAN schedule (the trainer's), the discriminator's own step,
checkpoints and exact resume."""

import ast
import inspect

import numpy as np
import pytest
import torch
from conftest import CONCEPT_WORDS, TINY_TEXT_CONFIG, text_tokenizer, tiny_config, tiny_training_arguments
from PIL import Image
from transformers import TrainingArguments

import transformers_setok.training.setok_trainer as setok_trainer
from transformers_setok import SetokForImageReconstruction, SetokImageProcessor
from transformers_setok.training.setok_trainer import (
    SetokImageTextCollator,
    SetokTrainer,
    SetokTrainingArguments,
    adaptive_adversarial_weight,
    discriminator_loss,
)

CONCEPTS = {"astronaut": ["man", "rocket"], "chelsea": ["cat"], "coffee": ["cup"], "rocket": ["rocket"]}


@pytest.fixture
def records(photos):
    return [
        {"images": [Image.fromarray(photos[name])], "concepts": concepts, "caption": f"a photo of a {concepts[0]}"}
        for name, concepts in CONCEPTS.items()
    ]


def stage1_model(**overrides) -> SetokForImageReconstruction:
    torch.manual_seed(0)
    config = dict(text_config=dict(TINY_TEXT_CONFIG, vocab_size=len(CONCEPT_WORDS)))
    return SetokForImageReconstruction(tiny_config(**{**config, **overrides}))


def setok_arguments(output_dir, **overrides) -> SetokTrainingArguments:
    """`tiny_training_arguments` as SetokTrainingArguments, with the adversarial term from the first step."""
    return tiny_training_arguments(output_dir, factory=SetokTrainingArguments, **{"disc_start": 0, **overrides})


def collator():
    return SetokImageTextCollator(SetokImageProcessor(size=32), text_tokenizer())


def trainer_for(model, records, tmp_path, **kwargs) -> SetokTrainer:
    args = setok_arguments(tmp_path, **kwargs)
    return SetokTrainer(model=model, args=args, train_dataset=records, data_collator=collator())


def logged(trainer, key) -> list[float]:
    return [entry[key] for entry in trainer.state.log_history if key in entry]


def test_collator_builds_multi_positive_concept_targets(records):
    batch = SetokImageTextCollator(SetokImageProcessor(size=32), text_tokenizer())(records)
    assert batch["pixel_values"].shape == (4, 3, 32, 32)
    # Distinct concepts in order of appearance: man, rocket, cat, cup; "rocket" is shared by two images.
    expected = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1], [0, 1, 0, 0]], dtype=torch.float)
    assert torch.equal(batch["concept_targets"], expected)
    words = text_tokenizer().convert_ids_to_tokens(batch["concept_input_ids"][1].tolist())
    assert words == ["a", "photo", "of", "a", "rocket"]
    records[3] = dict(records[3], caption=records[0]["caption"])
    captions = SetokImageTextCollator(SetokImageProcessor(size=32), text_tokenizer(), text_source="caption")(records)
    # Images 0 and 3 share their caption: one text, two positives (a second copy would be a false negative).
    expected = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 0, 0]], dtype=torch.float)
    assert torch.equal(captions["concept_targets"], expected)


def test_collator_rejects_records_without_texts(records):
    records[2] = dict(records[2], concepts=[])
    with pytest.raises(ValueError, match=r"Records \[2\] of the batch have no `concepts`"):
        SetokImageTextCollator(SetokImageProcessor(size=32), text_tokenizer())(records)
    with pytest.raises(ValueError, match="`text_source`"):
        SetokImageTextCollator(SetokImageProcessor(size=32), text_source="labels")


def test_two_steps_log_every_loss_term_and_train_only_the_stage1_parts(records, tmp_path):
    model = stage1_model(use_discriminator=True)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainer = trainer_for(model, records, tmp_path)
    trainer.train()
    for key in ("loss", "reconstruction_loss", "concept_loss", "generator_loss", "discriminator_loss"):
        assert len(logged(trainer, key)) == 2, key
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert any(name.startswith("model.merger.") for name in changed)
    assert any(name.startswith("detokenizer.") for name in changed)
    assert any(name.startswith("discriminator.") for name in changed)
    assert "concept_contrast.logit_scale" in changed
    assert not any(name.startswith(("model.vision_model.", "concept_contrast.text_encoder.")) for name in changed)
    # The Trainer's optimiser never holds the discriminator: it has its own.
    generator_params = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert not generator_params & {id(p) for p in model.discriminator.parameters()}


def test_discriminator_moves_only_through_its_own_optimiser(records, tmp_path):
    model = stage1_model(use_discriminator=True)
    before = [p.detach().clone() for p in model.discriminator.parameters()]
    trainer_for(model, records, tmp_path, discriminator_learning_rate=1e-12).train()
    # A vanishing discriminator learning rate leaves it (numerically) where it was: no other step touched it.
    assert all(torch.allclose(p, b, atol=1e-9, rtol=0) for p, b in zip(model.discriminator.parameters(), before))


def test_loss_falls_on_a_tiny_overfit_set(records, tmp_path):
    model = stage1_model()
    trainer = trainer_for(model, records[:2], tmp_path, max_steps=30, learning_rate=3e-3)
    trainer.train()
    for key, factor in (("loss", 0.7), ("reconstruction_loss", 0.98), ("concept_loss", 0.7)):
        losses = logged(trainer, key)
        assert np.mean(losses[-5:]) < factor * np.mean(losses[:5]), key


def test_resuming_from_a_checkpoint_gives_the_same_later_losses(records, tmp_path):
    kwargs = dict(max_steps=4, save_strategy="steps", save_steps=2)
    straight = trainer_for(stage1_model(use_discriminator=True), records, tmp_path / "straight", **kwargs)
    straight.train()
    checkpoint = tmp_path / "straight" / "checkpoint-2"
    assert (checkpoint / "discriminator_optimizer.pt").is_file()

    resumed = trainer_for(stage1_model(use_discriminator=True), records, tmp_path / "resumed", **kwargs)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    for key in ("loss", "reconstruction_loss", "discriminator_loss"):
        np.testing.assert_allclose(logged(resumed, key)[-2:], logged(straight, key)[2:], rtol=1e-5, err_msg=key)

    loaded = SetokForImageReconstruction.from_pretrained(tmp_path / "straight" / "checkpoint-4")
    for (name, ours), theirs in zip(loaded.state_dict().items(), straight.model.state_dict().values()):
        assert torch.equal(ours, theirs), name
    assert not any(p.requires_grad for p in loaded.model.vision_model.parameters())


def test_the_adversarial_term_starts_at_the_trainers_disc_start(records, tmp_path):
    trainer = trainer_for(stage1_model(use_discriminator=True), records, tmp_path, max_steps=3, disc_start=1)
    trainer.train()
    for key in ("generator_loss", "discriminator_loss"):
        assert [entry["step"] for entry in trainer.state.log_history if key in entry] == [2, 3], key
    assert len(logged(trainer, "reconstruction_loss")) == 3


def test_the_trainer_weights_the_generator_term_adaptively(records, tmp_path):
    """loss = the model's loss + disc_weight * VQGAN's adaptive weight * generator term, formed by the trainer."""
    model = stage1_model(use_discriminator=True).train()
    trainer = trainer_for(model, records, tmp_path, disc_weight=0.3)
    batch = collator()(records)
    loss, outputs = trainer.compute_loss(model, batch, return_outputs=True)
    reconstruction_side = model.config.reconstruction_loss_weight * outputs.reconstruction_loss
    last = model.detokenizer.pixel_head.weight
    nll_grad = torch.autograd.grad(reconstruction_side, last, retain_graph=True)[0]
    gen_grad = torch.autograd.grad(outputs.generator_loss, last, retain_graph=True)[0]
    weight = (nll_grad.norm() / (gen_grad.norm() + 1e-4)).clamp(0, 1e4)
    torch.testing.assert_close(loss, outputs.loss + 0.3 * weight * outputs.generator_loss)
    assert outputs.concept_loss is not None and not torch.allclose(outputs.loss, reconstruction_side)
    torch.testing.assert_close(
        adaptive_adversarial_weight(outputs.loss, outputs.generator_loss, model.get_last_layer()), weight
    )
    with torch.no_grad():  # evaluation: no adversarial term at all
        eval_loss, eval_outputs = trainer.compute_loss(model.eval(), batch, return_outputs=True)
    assert eval_outputs.generator_loss is None
    torch.testing.assert_close(eval_loss, eval_outputs.loss)


def test_discriminator_loss_is_the_hinge_on_real_and_detached_fake(records):
    model = stage1_model(use_discriminator=True).train()
    pixels = collator()(records)["pixel_values"]
    reconstruction = model(pixels).reconstruction
    loss = discriminator_loss(model, pixels, reconstruction)
    real, fake = model.discriminator(model.reconstruction_target(pixels)), model.discriminator(reconstruction)
    expected = 0.5 * (torch.relu(1 - real).mean() + torch.relu(1 + fake).mean())
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert all(p.grad is not None for p in model.discriminator.parameters())
    assert all(p.grad is None for p in model.detokenizer.parameters())  # the reconstruction is detached
    with pytest.raises(ValueError, match="use_discriminator"):
        discriminator_loss(stage1_model(), pixels, reconstruction)


def test_a_schedule_left_in_the_model_config_is_used_with_plain_training_arguments(records, tmp_path):
    """Configs written before the schedule moved to the trainer (old config.json, YAML `setok_config`) keep working."""
    with pytest.warns(FutureWarning, match="disc_start"):
        model = stage1_model(use_discriminator=True, disc_start=1, disc_weight=0.5)
    plain = tiny_training_arguments(tmp_path, max_steps=2)
    with pytest.warns(FutureWarning, match="SetokTrainingArguments"):
        trainer = SetokTrainer(model=model, args=plain, train_dataset=records, data_collator=collator())
    assert (trainer.disc_start, trainer.disc_weight) == (1, 0.5)
    trainer.train()
    assert len(logged(trainer, "generator_loss")) == 1 and len(logged(trainer, "discriminator_loss")) == 1

    explicit = SetokTrainer(model=model, args=setok_arguments(tmp_path, disc_weight=0.2), train_dataset=records)
    assert (explicit.disc_start, explicit.disc_weight) == (0, 0.2)  # the trainer's own arguments win
    default = SetokTrainer(model=stage1_model(use_discriminator=True), args=plain, train_dataset=records)
    assert (default.disc_start, default.disc_weight) == (10000, 0.8)


def test_discriminator_learning_rate_keyword_still_works(records, tmp_path):
    model = stage1_model(use_discriminator=True)
    with pytest.warns(FutureWarning, match="discriminator_learning_rate"):
        trainer = SetokTrainer(
            model=model,
            args=tiny_training_arguments(tmp_path),
            train_dataset=records,
            discriminator_learning_rate=5e-4,
        )
    assert trainer.discriminator_optimizer.param_groups[0]["lr"] == 5e-4
    args = setok_arguments(tmp_path, discriminator_learning_rate=2e-4)
    assert SetokTrainer(model=model, args=args).discriminator_optimizer.param_groups[0]["lr"] == 2e-4
    with pytest.raises(ValueError, match="discriminator_learning_rate"):
        SetokTrainer(model=model, args=args, discriminator_learning_rate=5e-4)


@pytest.mark.parametrize(
    "field, value", [("disc_start", -1), ("disc_weight", -0.5), ("discriminator_learning_rate", 0.0)]
)
def test_gan_arguments_are_checked(tmp_path, field, value):
    with pytest.raises(ValueError, match=field):
        setok_arguments(tmp_path, **{field: value})


def test_the_trainer_uses_only_public_model_api():
    """No `x._name` on anything but the trainer itself (its own and the Trainer's hooks): models are used publicly."""
    tree = ast.parse(inspect.getsource(setok_trainer))
    private = [
        f"line {node.lineno}: {ast.unparse(node)}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and node.attr.startswith("_")
        and not node.attr.startswith("__")
        and not (isinstance(node.value, ast.Name) and node.value.id == "self")
        and not (isinstance(node.value, ast.Call) and ast.unparse(node.value.func) == "super")
    ]
    assert not private, private
    imports = [node for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    assert not [alias.name for node in imports for alias in node.names if alias.name.startswith("_")]


def test_rejects_other_models(tmp_path):
    with pytest.raises(TypeError, match="`model` must be a SetokForImageReconstruction"):
        SetokTrainer(model=torch.nn.Linear(2, 2), args=TrainingArguments(output_dir=str(tmp_path), report_to=[]))


def test_discriminator_steps_with_the_generator_under_gradient_accumulation(records, tmp_path):
    """3 records, batches of 1, accumulation 2: each epoch ends on a short group, where both optimisers step."""
    model = stage1_model(use_discriminator=True)
    trainer = trainer_for(
        model,
        records[:3],
        tmp_path,
        per_device_train_batch_size=1,
        gradient_accumulation_steps=2,
        max_steps=-1,
        num_train_epochs=2,
    )
    steps = []
    step = trainer.discriminator_optimizer.step
    trainer.discriminator_optimizer.step = lambda *a, **k: (steps.append(trainer.state.global_step), step(*a, **k))
    trainer.train()
    assert trainer.state.global_step == 4
    assert steps == [0, 1, 2, 3]  # once per generator step, before the Trainer counts it
    assert all(p.grad is None for p in model.discriminator.parameters())


def test_evaluation_reports_each_term_under_its_prefix(records, tmp_path):
    trainer = trainer_for(stage1_model(), records, tmp_path)
    trainer.train()
    metrics = trainer.evaluate(records, metric_key_prefix="test")
    assert {"test_loss", "test_reconstruction_loss", "test_concept_loss"} <= set(metrics)
    assert not any(key in metrics for key in ("reconstruction_loss", "eval_reconstruction_loss"))
    assert trainer.evaluate(records)["eval_concept_loss"] == pytest.approx(metrics["test_concept_loss"])
