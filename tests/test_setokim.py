"""Setokim on tiny backbones: image features spliced at the placeholders, batches with 0-2 images, generation."""

import pytest
import torch
from conftest import BOI, EOI, IMAGE, PAD, counts_of, image_block, setokim_config, tiny_config
from transformers import AutoModelForImageTextToText

from transformers_setok import (
    SetokImageProcessor,
    SetokimConfig,
    SetokimForConditionalGeneration,
)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return SetokimForConditionalGeneration(setokim_config()).eval()


@pytest.fixture(scope="module")
def pixels(photos):
    return SetokImageProcessor(size=32)(
        [photos["astronaut"], photos["coffee"], photos["chelsea"]], return_tensors="pt"
    )["pixel_values"]


def test_image_features_are_per_image_lists(model, pixels):
    features = model.get_image_features(pixels)
    counts = counts_of(model, pixels)
    assert len(set(counts)) > 1, "the photos should get different token counts"
    assert [tuple(f.shape) for f in features.pooler_output] == [(n, 32) for n in counts]


@pytest.mark.parametrize(
    "shift, message",
    [(1, "tokens: .*, features"), (-1, "tokens: .*, features")],
)
def test_placeholders_and_features_must_match(model, pixels, shift, message):
    count = counts_of(model, pixels[:1])[0]
    ids = torch.tensor([[1, 2] + image_block(count + shift) + [3]])
    with pytest.raises(ValueError, match="Image features and image tokens do not match"):
        model(input_ids=ids, pixel_values=pixels[:1])


def test_image_tokens_without_an_image_are_rejected(model):
    ids = torch.tensor([[1] + image_block(3)])
    with pytest.raises(ValueError, match="Image features and image tokens do not match"):
        model(input_ids=ids)
    with pytest.raises(ValueError, match="Image features and image tokens do not match"):
        model.generate(input_ids=ids, max_new_tokens=2)  # the prefill already holds a (still empty) cache


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_batch_with_zero_one_and_two_images_matches_each_sample_alone(model, pixels, padding_side):
    counts = counts_of(model, pixels)
    samples = [
        ([5, 6, 7, 8], pixels[:0]),
        ([5] + image_block(counts[0]) + [9, 10], pixels[:1]),
        ([11] + image_block(counts[1]) + [12] + image_block(counts[2]) + [13], pixels[1:3]),
    ]
    length = max(len(ids) for ids, _ in samples)
    batch_ids, batch_mask = [], []
    for ids, _ in samples:
        pad = [PAD] * (length - len(ids))
        batch_ids.append(pad + ids if padding_side == "left" else ids + pad)
        mask = [0] * len(pad) + [1] * len(ids) if padding_side == "left" else [1] * len(ids) + [0] * len(pad)
        batch_mask.append(mask)
    ids, mask = torch.tensor(batch_ids), torch.tensor(batch_mask)
    with torch.no_grad():
        batched = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
        for row, (sample_ids, sample_pixels) in enumerate(samples):
            alone = model(
                input_ids=torch.tensor([sample_ids]),
                pixel_values=sample_pixels if len(sample_pixels) else None,
            ).logits[0]
            real = mask[row].bool()
            torch.testing.assert_close(batched[row, real], alone, atol=1e-4, rtol=1e-4)


def test_greedy_generate_equals_step_by_step_argmax(model, pixels):
    count = counts_of(model, pixels[:1])[0]
    ids = torch.tensor([[1, 5, 6] + image_block(count) + [7]])
    with torch.no_grad():
        generated = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            pixel_values=pixels[:1],
            max_new_tokens=6,
            do_sample=False,
        )[0, ids.shape[1] :]
        current, expected = ids, []
        for _ in range(6):
            token = model(input_ids=current, pixel_values=pixels[:1]).logits[0, -1].argmax()
            expected.append(int(token))
            current = torch.cat([current, token.view(1, 1)], dim=1)
    assert generated.tolist() == expected


def test_generate_reuses_precomputed_image_features(model, pixels, monkeypatch):
    count = counts_of(model, pixels[:1])[0]
    ids = torch.tensor([[1] + image_block(count) + [7]])
    features = model.get_image_features(pixels[:1])
    with torch.no_grad():
        expected = model.generate(input_ids=ids, pixel_values=pixels[:1], max_new_tokens=4, do_sample=False)
        calls = []
        monkeypatch.setattr(model.model.vision_tower, "forward", lambda *a, **k: calls.append(1))
        reused = model.generate(
            input_ids=ids, mm_encoder_outputs={"image": features}, max_new_tokens=4, do_sample=False
        )
    assert torch.equal(reused, expected) and not calls, "SeTok must not run again"


def test_beam_search_with_two_images(model, pixels):
    counts = counts_of(model, pixels[:2])
    ids = torch.tensor([[1] + image_block(counts[0]) + [2] + image_block(counts[1]) + [3]])
    with torch.no_grad():
        out = model.generate(
            input_ids=ids, pixel_values=pixels[:2], max_new_tokens=4, num_beams=3, num_return_sequences=2
        )
    assert out.shape == (2, ids.shape[1] + 4)
    assert torch.equal(out[:, : ids.shape[1]], ids.expand(2, -1))


@pytest.mark.parametrize("backbone", ["qwen2", "gemma3_text"])
def test_other_backbones(backbone, pixels):
    model = SetokimForConditionalGeneration(setokim_config(backbone)).eval()
    count = counts_of(model, pixels[:1])[0]
    ids = torch.tensor([[1] + image_block(count) + [2]])
    with torch.no_grad():
        out = model.generate(input_ids=ids, pixel_values=pixels[:1], max_new_tokens=3, do_sample=False)
    assert out.shape == (1, ids.shape[1] + 3)


def test_loss_trains_projector_and_llm_not_the_frozen_encoder(pixels):
    model = SetokimForConditionalGeneration(setokim_config())
    count = counts_of(model, pixels[:1])[0]
    ids = torch.tensor([[1] + image_block(count) + [2, 3, 4]])
    labels = ids.masked_fill((ids == IMAGE) | (ids == BOI) | (ids == EOI), -100)
    output = model(input_ids=ids, pixel_values=pixels[:1], labels=labels)
    output.loss.backward()
    assert torch.isfinite(output.loss)
    assert model.model.multi_modal_projector.linear_1.weight.grad.abs().sum() > 0
    assert model.model.vision_tower.merger.input_proj.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.model.vision_tower.vision_model.parameters())


def test_save_load_round_trip_and_auto_class(model, pixels, tmp_path):
    model.save_pretrained(tmp_path)
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    assert type(loaded) is SetokimForConditionalGeneration
    original, restored = model.state_dict(), loaded.state_dict()
    assert original.keys() == restored.keys()
    assert all(torch.equal(original[key], restored[key]) for key in original)
    assert not any(p.requires_grad for p in loaded.model.vision_tower.vision_model.parameters())
    count = counts_of(model, pixels[:1])[0]
    ids = torch.tensor([[1] + image_block(count) + [2]])
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(input_ids=ids, pixel_values=pixels[:1]).logits, model(input_ids=ids, pixel_values=pixels[:1]).logits
        )


def test_config_rejects_clashing_special_tokens():
    with pytest.raises(ValueError, match="must differ"):
        SetokimConfig(vision_config=tiny_config(), image_token_id=5, boi_token_id=5, eoi_token_id=6)
