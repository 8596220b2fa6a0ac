"""Setokim training batches: the chat collator's label masks, the id-level expansion of image placeholders once SeTok
has counted each image's tokens, and `prepare_step` against the processor's own (string-level) expansion."""

import pytest
import torch
from conftest import assistant, tiny_setokim, user, word_tokenizer
from PIL import Image

from transformers_setok import SetokImageProcessor, SetokimProcessor
from transformers_setok.training.collators import (
    IGNORE_INDEX,
    SetokimChatCollator,
    expand_image_placeholders,
)
from transformers_setok.training.step_inputs import prepare_step

X = IGNORE_INDEX


def chat_processor() -> SetokimProcessor:
    return SetokimProcessor(image_processor=SetokImageProcessor(size=32), tokenizer=word_tokenizer())


@pytest.fixture
def processor():
    return chat_processor()


@pytest.fixture
def images(photos):
    return {name: Image.fromarray(photo) for name, photo in photos.items()}


def tokens(processor, ids):
    return processor.tokenizer.convert_ids_to_tokens([int(i) for i in ids])


def targets(processor, labels):
    """Labels as tokens, IGNORE_INDEX shown as X."""
    return [X if int(label) == X else processor.tokenizer.convert_ids_to_tokens(int(label)) for label in labels]


def expand(processor, batch, counts, padding_side="right", **kwargs):
    return expand_image_placeholders(
        batch,
        counts,
        image_token_id=processor.image_token_id,
        boi_token_id=processor.boi_token_id,
        eoi_token_id=processor.eoi_token_id,
        pad_token_id=processor.tokenizer.pad_token_id,
        padding_side=padding_side,
        **kwargs,
    )


@pytest.fixture
def records(images):
    """Three samples with 1, 0 and 2 images; the last is captioning-style (user turn: images only)."""
    return [
        {"images": [images["chelsea"]], "messages": [user(None, "what is in the image ?"), assistant("a cat")]},
        {"images": [], "messages": [user("what is the cat ?"), assistant("a cat")]},
        {"images": [images["astronaut"], images["coffee"]], "messages": [user(None, None), assistant("a cat")]},
    ]


# The three records, token by token (`<pad>` and X = IGNORE_INDEX come from padding).
ONE_IMAGE = ["User", ":", "<image>", "what", "is", "in", "the", "image", "?", "Assistant", ":", "a", "cat", "</s>"]
ONE_IMAGE_LABELS = [X] * 11 + ["a", "cat", "</s>"]
NO_IMAGE = ["User", ":", "what", "is", "the", "cat", "?", "Assistant", ":", "a", "cat", "</s>"]
NO_IMAGE_LABELS = [X] * 9 + ["a", "cat", "</s>"]
TWO_IMAGES = ["User", ":", "<image>", "<image>", "Assistant", ":", "a", "cat", "</s>"]
TWO_IMAGES_LABELS = [X] * 6 + ["a", "cat", "</s>"]


def test_collator_masks_everything_but_the_answer_token_by_token(processor, records):
    batch = SetokimChatCollator(processor)(records)
    assert set(batch) == {"input_ids", "attention_mask", "labels", "pixel_values"}
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (3, 14)
    assert processor.image_token_id == 15 and batch["input_ids"][0, :3].tolist() == [4, 6, 15]  # User : <image>

    assert tokens(processor, batch["input_ids"][0]) == ONE_IMAGE
    assert targets(processor, batch["labels"][0]) == ONE_IMAGE_LABELS
    assert tokens(processor, batch["input_ids"][1]) == NO_IMAGE + ["<pad>"] * 2
    assert targets(processor, batch["labels"][1]) == NO_IMAGE_LABELS + [X] * 2
    assert tokens(processor, batch["input_ids"][2]) == TWO_IMAGES + ["<pad>"] * 5
    assert targets(processor, batch["labels"][2]) == TWO_IMAGES_LABELS + [X] * 5
    assert batch["attention_mask"].sum(1).tolist() == [14, 12, 9]
    assert batch["attention_mask"][1].tolist() == [1] * 12 + [0] * 2


def test_pixel_values_hold_the_batch_images_in_placeholder_order(processor, records, images):
    batch = SetokimChatCollator(processor)(records)
    expected = processor.image_processor(
        [images["chelsea"], images["astronaut"], images["coffee"]], return_tensors="pt"
    )["pixel_values"]
    assert batch["pixel_values"].shape == (3, 3, 32, 32)
    torch.testing.assert_close(batch["pixel_values"], expected)
    text_only = SetokimChatCollator(processor)([records[1]])
    assert "pixel_values" not in text_only


def test_left_padding(processor, records):
    batch = SetokimChatCollator(processor, padding_side="left")(records)
    assert tokens(processor, batch["input_ids"][1]) == ["<pad>"] * 2 + NO_IMAGE
    assert targets(processor, batch["labels"][1]) == [X] * 2 + NO_IMAGE_LABELS
    assert tokens(processor, batch["input_ids"][2]) == ["<pad>"] * 5 + TWO_IMAGES
    assert batch["attention_mask"][2].tolist() == [0] * 5 + [1] * 9
    assert tokens(processor, batch["input_ids"][0]) == ONE_IMAGE


def test_multi_turn_keeps_every_assistant_turn_and_masks_every_user_turn(processor, images):
    record = {
        "images": [images["chelsea"]],
        "messages": [
            {"role": "system", "content": "a cat"},
            user(None, "what is in the image ?"),
            assistant("a cat"),
            user("what is the cat ?"),
            assistant("the cat is a cat"),
        ],
    }
    batch = SetokimChatCollator(processor)([record])
    expected_tokens = (
        ["<unk>", ":", "a", "cat"]  # "System" is not in the vocabulary
        + ["User", ":", "<image>", "what", "is", "in", "the", "image", "?"]
        + ["Assistant", ":", "a", "cat", "</s>"]
        + ["User", ":", "what", "is", "the", "cat", "?"]
        + ["Assistant", ":", "the", "cat", "is", "a", "cat", "</s>"]
    )
    expected_targets = [X] * 13 + [X, X, "a", "cat", "</s>"] + [X] * 7 + [X, X, "the", "cat", "is", "a", "cat", "</s>"]
    assert tokens(processor, batch["input_ids"][0]) == expected_tokens
    assert targets(processor, batch["labels"][0]) == expected_targets


def test_collator_errors(processor, records, images):
    with pytest.raises(ValueError, match=r"Sample 0 has 14 tokens before image expansion, more than max_length=10"):
        SetokimChatCollator(processor, max_length=10)(records)
    at_the_limit = SetokimChatCollator(processor, max_length=14)(records)
    assert at_the_limit["input_ids"].shape[1] == 14
    bad = {"images": [images["chelsea"], images["coffee"]], "messages": [user(None, "what ?"), assistant("a cat")]}
    with pytest.raises(ValueError, match="Sample 1 has 1 image parts in its messages but 2 images"):
        SetokimChatCollator(processor)([records[1], bad])
    with pytest.raises(ValueError, match="Sample 0 has no assistant turn"):
        SetokimChatCollator(processor)([{"images": [], "messages": [user("what is the cat ?")]}])
    with pytest.raises(ValueError, match="padding_side"):
        SetokimChatCollator(processor, padding_side="middle")


def block(n):
    return ["[Img]"] + ["<image>"] * n + ["[/Img]"]


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_expansion_token_by_token(processor, records, padding_side):
    batch = SetokimChatCollator(processor, padding_side=padding_side)(records)
    batch["position_ids"] = torch.zeros_like(batch["input_ids"])
    expanded = expand(processor, batch, [2, 3, 1], padding_side=padding_side)

    rows = [
        ["User", ":"] + block(2) + ONE_IMAGE[3:],
        NO_IMAGE,
        ["User", ":"] + block(3) + block(1) + TWO_IMAGES[4:],
    ]
    labels = [
        [X] * 14 + ["a", "cat", "</s>"],
        NO_IMAGE_LABELS,
        [X] * 12 + ["a", "cat", "</s>"],
    ]
    assert [len(row) for row in rows] == [17, 12, 15]
    assert expanded["input_ids"].shape == expanded["labels"].shape == expanded["attention_mask"].shape == (3, 17)
    for i in range(3):
        pad = 17 - len(rows[i])
        before, after = (0, pad) if padding_side == "right" else (pad, 0)
        assert tokens(processor, expanded["input_ids"][i]) == ["<pad>"] * before + rows[i] + ["<pad>"] * after
        assert targets(processor, expanded["labels"][i]) == [X] * before + labels[i] + [X] * after
        assert expanded["attention_mask"][i].tolist() == [0] * before + [1] * len(rows[i]) + [0] * after
    assert "position_ids" not in expanded  # stale after expansion: the model derives positions itself
    assert expanded["pixel_values"] is batch["pixel_values"]  # other keys pass through


def test_expansion_without_images_only_repads(processor, records):
    batch = SetokimChatCollator(processor)(records[1:2])
    expanded = expand(processor, batch, [])
    for key in ("input_ids", "attention_mask", "labels"):
        assert torch.equal(expanded[key], batch[key])


def test_expansion_checks_counts_and_length(processor, records):
    batch = SetokimChatCollator(processor)(records)
    with pytest.raises(ValueError, match="3 image placeholders but 2 image token counts"):
        expand(processor, batch, [2, 3])
    with pytest.raises(ValueError, match="3 image placeholders but 4 image token counts"):
        expand(processor, batch, torch.tensor([2, 3, 1, 1]))
    for counts in ([2, 0, 1], [2, -1, 1], [2.0, 3.0, 1.0], [True, True, True]):
        with pytest.raises(ValueError, match="positive integers"):
            expand(processor, batch, counts)
    with pytest.raises(ValueError, match="Sample 0 has 17 tokens once its images are expanded"):
        expand(processor, batch, [2, 3, 1], max_length=16)
    assert expand(processor, batch, torch.tensor([2, 3, 1]), max_length=17)["input_ids"].shape == (3, 17)


@pytest.fixture
def model(processor):
    model = tiny_setokim(processor)
    model.model.vision_tower.requires_grad_(False)  # stages 2-3 train with SeTok frozen
    return model


def test_expanded_batch_matches_the_processor_and_per_sample_losses(model, processor, records):
    batch = SetokimChatCollator(processor)(records)
    inputs = prepare_step(model, batch, processor).model_kwargs
    assert "pixel_values" not in inputs and set(inputs["mm_encoder_outputs"]) == {"image"}
    with torch.no_grad():
        batch_loss = model(**inputs).loss

    weighted, num_targets = 0.0, 0
    for i, record in enumerate(records):
        prompt = processor.apply_chat_template(record["messages"], tokenize=False)
        single = model.prepare_inputs(processor, [prompt], record["images"] or None)
        counts = None
        if record["images"]:
            features = single["mm_encoder_outputs"]["image"].pooler_output
            counts = [len(tokens) for tokens in features]
        string_level = processor(text=[prompt], images=record["images"] or None, image_token_counts=counts)
        row = inputs["input_ids"][i][inputs["attention_mask"][i].bool()]
        assert row.tolist() == string_level["input_ids"][0]  # id-level expansion == the processor's string-level one
        assert torch.equal(row, single["input_ids"][0])
        answer = processor.tokenizer("a cat</s>", add_special_tokens=False)["input_ids"]
        labels = torch.full_like(single["input_ids"], X)
        labels[0, -len(answer) :] = torch.tensor(answer)
        with torch.no_grad():
            loss = model(**single, labels=labels).loss
        weighted += float(loss) * len(answer)  # the batch loss averages over all answer tokens
        num_targets += len(answer)
    torch.testing.assert_close(float(batch_loss), weighted / num_targets, rtol=1e-5, atol=1e-6)


def test_projector_is_trained_and_setok_is_not(model, processor, records):
    model.train()
    inputs = prepare_step(model, SetokimChatCollator(processor)(records), processor).model_kwargs
    features = inputs["mm_encoder_outputs"]["image"]
    assert not features.last_hidden_state.requires_grad  # no autograd graph through the frozen tower
    assert all(image.requires_grad for image in features.pooler_output)
    model(**inputs).loss.backward()

    projector = dict(model.model.multi_modal_projector.named_parameters())
    assert all(param.grad is not None and param.grad.abs().sum() > 0 for param in projector.values())
    assert all(param.grad is None for param in model.model.vision_tower.parameters())
    assert model.model.vision_tower.training  # put back in train mode after running in eval mode


def test_trainable_tower_is_refused(processor, records):
    model = tiny_setokim(processor)  # SeTok's merger is trainable by default (stage 1)
    with pytest.raises(ValueError, match="vision tower has .* trainable parameters"):
        prepare_step(model, SetokimChatCollator(processor)(records), processor)


def test_text_only_batch_needs_no_model_images(model, processor, records):
    inputs = prepare_step(model, SetokimChatCollator(processor)(records[1:2]), processor).model_kwargs
    assert "mm_encoder_outputs" not in inputs
    assert model(**inputs).loss.isfinite()


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_an_image_in_an_assistant_turn_is_a_generation_target(processor, images, padding_side):
    """Text-to-image: the answer's image block ([Img], each image token, [/Img]) is a target, token by token, so the
    LLM learns to open an image, its length and to close it; an image in the user turn stays an input."""
    answer = {"role": "assistant", "content": [{"type": "text", "text": "a"}, {"type": "image"}]}
    record = {"images": [images["coffee"], images["chelsea"]], "messages": [user(None, "the cat ?"), answer]}
    batch = SetokimChatCollator(processor, padding_side=padding_side)([record])
    assert tokens(processor, batch["input_ids"][0])[-5:] == ["Assistant", ":", "a", "<image>", "</s>"]
    assert targets(processor, batch["labels"][0])[-5:] == [X, X, "a", "<image>", "</s>"]

    expanded = expand(processor, batch, [2, 3], padding_side=padding_side)
    row = ["User", ":"] + block(2) + ["the", "cat", "?", "Assistant", ":", "a"] + block(3) + ["</s>"]
    labels = [X] * 11 + ["a"] + block(3) + ["</s>"]
    assert tokens(processor, expanded["input_ids"][0]) == row
    assert targets(processor, expanded["labels"][0]) == labels


def test_records_from_a_datasets_table(processor, records):
    """`datasets` stores images as files and fills the parts' missing keys with None: the batch is the same."""
    from datasets import Dataset

    table = Dataset.from_list(records)
    assert table[0]["messages"][0]["content"][0] == {"type": "image", "text": None}
    from_table = SetokimChatCollator(processor)([table[i] for i in range(len(table))])
    from_lists = SetokimChatCollator(processor)(records)
    for key in from_lists:
        torch.testing.assert_close(from_table[key], from_lists[key])
