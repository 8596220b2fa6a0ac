"""Stage 1 through SetokTrainer: loss terms logged, the discriminator's own step, checkpoints and exact resume."""

import numpy as np
import pytest
import torch
from conftest import TINY_TEXT_CONFIG, tiny_config, tiny_training_arguments
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, TrainingArguments

from transformers_setok import SetokForImageReconstruction, SetokImageProcessor
from transformers_setok.training.setok_trainer import SetokImageTextCollator, SetokTrainer

WORDS = ["[UNK]", "[PAD]", "a", "photo", "of", "cat", "cup", "rocket", "man"]
CONCEPTS = {"astronaut": ["man", "rocket"], "chelsea": ["cat"], "coffee": ["cup"], "rocket": ["rocket"]}


def text_tokenizer() -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.WordLevel({word: i for i, word in enumerate(WORDS)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]")


@pytest.fixture
def records(photos):
    return [
        {"images": [Image.fromarray(photos[name])], "concepts": concepts, "caption": f"a photo of a {concepts[0]}"}
        for name, concepts in CONCEPTS.items()
    ]


def stage1_model(**overrides) -> SetokForImageReconstruction:
    torch.manual_seed(0)
    config = dict(text_config=dict(TINY_TEXT_CONFIG, vocab_size=len(WORDS)), disc_start=0)
    return SetokForImageReconstruction(tiny_config(**{**config, **overrides}))


def trainer_for(model, records, tmp_path, **kwargs) -> SetokTrainer:
    discriminator_lr = kwargs.pop("discriminator_learning_rate", None)
    args = tiny_training_arguments(tmp_path, **kwargs)
    collator = SetokImageTextCollator(SetokImageProcessor(size=32), text_tokenizer())
    return SetokTrainer(
        model=model,
        args=args,
        train_dataset=records,
        data_collator=collator,
        discriminator_learning_rate=discriminator_lr,
    )


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
