"""Stage 2 through SetokimPretrainTrainer: exactly the projector and the new token rows train (or the whole LLM)."""

import numpy as np
import pytest
import torch
from conftest import assert_accumulation_matches_one_batch, tiny_processor, tiny_setokim, trainer_for
from PIL import Image
from transformers import TrainingArguments

from transformers_setok.training.setokim_trainer import SetokimPretrainTrainer


@pytest.fixture
def processor():
    return tiny_processor()


@pytest.fixture
def captions(photos):
    """Captioning records as `captions_to_messages` writes them: user turn = image + prompt, answer = caption."""

    def record(name, caption):
        user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is the image ?"}]}
        answer = {"role": "assistant", "content": [{"type": "text", "text": caption}]}
        return {"images": [Image.fromarray(photos[name])], "messages": [user, answer]}

    return [record("chelsea", "a cat"), record("coffee", "a cup"), record("astronaut", "a man"), record("rocket", "a")]


def snapshot(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def test_two_steps_train_the_projector_and_the_new_rows_only(processor, captions, tmp_path):
    torch.manual_seed(0)
    model = tiny_setokim(processor)
    before = snapshot(model)
    trainer_for(model, processor, captions, tmp_path).train()
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert changed == {
        "model.multi_modal_projector.linear_1.weight",
        "model.multi_modal_projector.linear_1.bias",
        "model.multi_modal_projector.linear_2.weight",
        "model.multi_modal_projector.linear_2.bias",
        "model.language_model.embed_tokens.weight",
        "lm_head.weight",
    }
    new = [processor.image_token_id, processor.boi_token_id, processor.eoi_token_id]
    old = [i for i in range(len(processor.tokenizer)) if i not in new]
    for name in ("model.language_model.embed_tokens.weight", "lm_head.weight"):
        weight = dict(model.named_parameters())[name]
        assert torch.equal(weight[old], before[name][old]), name  # exactly: no gradient and no weight decay
    # [Img] and [/Img] are inputs of every caption; the image token's own row is replaced by features, and the
    # head rows of all three receive the softmax gradient.
    embeddings = model.get_input_embeddings().weight
    for token_id in (processor.boi_token_id, processor.eoi_token_id):
        assert not torch.equal(embeddings[token_id], before["model.language_model.embed_tokens.weight"][token_id])
    assert not any(p.requires_grad for p in model.model.vision_tower.parameters())


def test_the_whole_llm_trains_with_the_flag(processor, captions, tmp_path):
    torch.manual_seed(0)
    model = tiny_setokim(processor)
    before = snapshot(model)
    trainer_for(model, processor, captions, tmp_path, train_language_model=True).train()
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert any(name.startswith("model.language_model.layers.") for name in changed)
    assert "model.multi_modal_projector.linear_1.weight" in changed
    assert not any(name.startswith("model.vision_tower.") for name in changed)


def test_loss_falls_on_a_tiny_overfit_set(processor, captions, tmp_path):
    torch.manual_seed(0)
    model = tiny_setokim(processor)
    trainer = trainer_for(model, processor, captions[:2], tmp_path, max_steps=25, train_language_model=True)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])


def test_resuming_gives_the_same_later_losses(processor, captions, tmp_path):
    kwargs = dict(max_steps=4, save_strategy="steps", save_steps=2)
    torch.manual_seed(0)
    straight = trainer_for(tiny_setokim(processor), processor, captions, tmp_path / "a", **kwargs)
    straight.train()
    torch.manual_seed(1)  # a different init: everything must come from the checkpoint
    resumed = trainer_for(tiny_setokim(processor), processor, captions, tmp_path / "b", **kwargs)
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))

    def losses(trainer):
        return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]

    np.testing.assert_allclose(losses(resumed)[-2:], losses(straight)[2:], rtol=1e-5)


def test_bad_arguments_are_rejected(processor, tmp_path):
    model = tiny_setokim(processor)
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    with pytest.raises(TypeError, match="`model` must be a SetokimForConditionalGeneration"):
        SetokimPretrainTrainer(model=torch.nn.Linear(2, 2), args=args, processing_class=processor)
    with pytest.raises(ValueError, match="`processing_class`"):
        SetokimPretrainTrainer(model=model, args=args)
    with pytest.raises(ValueError, match="`new_token_ids`"):
        SetokimPretrainTrainer(model=model, args=args, processing_class=processor, new_token_ids=[10**6])


def test_gradient_accumulation_gives_the_loss_of_the_whole_batch(processor, captions, tmp_path):
    """One step on 2 records equals one step on 2 x 1 accumulated records: the loss is normalised over the whole
    accumulated batch (`num_items_in_batch` reaches the model's loss), not summed per micro-batch."""

    def first_step(**kwargs):
        torch.manual_seed(0)
        trainer = trainer_for(tiny_setokim(processor), processor, captions[:2], tmp_path, max_steps=1, **kwargs)
        trainer.train()
        return trainer.state.log_history[0]

    assert_accumulation_matches_one_batch(first_step)


def test_predictions_and_labels_line_up(processor, captions, tmp_path):
    """`predict` returns the labels of the expanded batch, aligned with the logits (image tokens included)."""
    torch.manual_seed(0)
    trainer = trainer_for(tiny_setokim(processor), processor, captions, tmp_path)
    output = trainer.predict(captions[:2])
    logits = output.predictions[0] if isinstance(output.predictions, tuple) else output.predictions
    assert logits.shape[:2] == output.label_ids.shape
    # Every image token is in the inputs and masked in the labels; the answers remain targets.
    assert (output.label_ids != -100).sum() > 0
    assert np.isfinite(output.metrics["test_loss"])
