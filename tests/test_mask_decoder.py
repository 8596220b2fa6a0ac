"""Setokim's mask decoder (referring segmentation): losses, gradients, batch invariance, an overfit run, save/load and
the errors of bad segmentation inputs."""

import copy
import json
import math

import numpy as np
import peft
import pytest
import torch
from conftest import (
    BOI,
    EOI,
    IMAGE,
    TINY_MASK_DECODER,
    WITHOUT_THE_PACKAGE,
    count_setok_calls,
    image_block,
    setokim_config,
)
from PIL import Image
from skimage import data
from test_attention_paths import emulated_flash_attention  # noqa: F401  (registers "emulated_varlen")

from transformers_setok import SetokImageProcessor, SetokimConfig, SetokimForConditionalGeneration
from transformers_setok.modeling.losses_setok import dice_loss, mask_iou, mask_losses, sigmoid_focal_loss
from transformers_setok.modeling.mask_decoder_setokim import SetokimMaskDecoder, SetokimPromptStandardization
from transformers_setok.modeling.modeling_setokim import segmentation_prompt_lengths

LLM_PROJECTIONS = r".*language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"


def decoder_config(**overrides) -> SetokimConfig:
    return SetokimConfig.from_dict({**setokim_config().to_dict(), **TINY_MASK_DECODER, **overrides})


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return SetokimForConditionalGeneration(decoder_config()).eval()


@pytest.fixture(scope="module")
def pixels():
    photos = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket()]
    return SetokImageProcessor(size=32)(photos, return_tensors="pt")["pixel_values"]


@pytest.fixture(scope="module")
def features(model, pixels):
    with torch.no_grad():
        return model.get_image_features(pixels)


def segmentation_batch(counts, rows):
    """Right-padded `input_ids`, `attention_mask` and `segmentation_prompts` for rows of (image index, answer prompt
    lengths): each row reads its image block, then writes `[Img] <image> x m [/Img]` per object, separated by text."""
    sequences, prompts = [], []
    for image, lengths in rows:
        ids, marks = [1, *image_block(counts[image]), 2], []
        for length in lengths:
            ids += [3, BOI]
            marks += list(range(len(ids), len(ids) + length))
            ids += [IMAGE] * length + [EOI]
        sequences.append(ids)
        prompts.append(marks)
    width = max(map(len, sequences))
    input_ids = torch.zeros(len(rows), width, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    segmentation = torch.zeros_like(input_ids, dtype=torch.bool)
    for row, (ids, marks) in enumerate(zip(sequences, prompts)):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention_mask[row, : len(ids)] = 1
        segmentation[row, marks] = True
    return {"input_ids": input_ids, "attention_mask": attention_mask, "segmentation_prompts": segmentation}


def counts_of(features) -> list[int]:
    return [len(tokens) for tokens in features.pooler_output]


def some_images(features, *indices):
    """The image outputs of some of the images, as `get_image_features` would give them for those alone."""
    index = list(indices)
    return type(features)(
        last_hidden_state=features.last_hidden_state[index],
        pooler_output=[features.pooler_output[i] for i in index],
        patch_features=features.patch_features[index],
    )


# --------------------------------------------------------------------------------------------------------------------
# Losses


def test_mask_loss_matches_a_hand_computed_case():
    # Object 0: 2x2 logits at the target's size. Object 1: zero logits, bilinearly resized to a 4x4 target (a
    # constant stays a constant).
    logits = torch.tensor([[[0.0, 2.0], [-2.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]])
    iou_scores = torch.tensor([0.8, 0.1])
    first = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    second = torch.zeros(4, 4)
    second[:2, :2] = 1
    terms = mask_losses(logits, iou_scores, [first, second.bool()])

    # Focal, alpha 0.25 on positives and 0.75 on negatives, gamma 2: alpha_t (1 - p_t)^2 BCE per pixel.
    ce_confident = math.log(1 + math.exp(-2))  # BCE of a logit of 2 on a positive (or -2 on a negative)
    focal_0 = (
        0.25 * 0.5**2 * math.log(2)  # logit 0 on a positive
        + 0.25 * sigmoid(-2) ** 2 * ce_confident  # logit 2 on a positive
        + 0.75 * sigmoid(-2) ** 2 * ce_confident  # logit -2 on a negative
        + 0.75 * 0.5**2 * math.log(2)  # logit 0 on a negative
    ) / 4
    # Dice with smoothing 1: probabilities 0.5, s(2), s(-2), 0.5 (sum 2) against two positives.
    dice_0 = 1 - (2 * (0.5 + sigmoid(2)) + 1) / (2 + 2 + 1)
    iou_0 = (0.8 - 0.5) ** 2  # prediction {(0, 1)}, target {(0, 0), (0, 1)}: IoU 1/2
    focal_1 = (4 * 0.25 + 12 * 0.75) * 0.5**2 * math.log(2) / 16
    dice_1 = 1 - (2 * 4 * 0.5 + 1) / (16 * 0.5 + 4 + 1)
    iou_1 = (0.1 - 0.0) ** 2  # nothing predicted (logit 0 is not > 0): IoU 0

    expected = {"focal": [focal_0, focal_1], "dice": [dice_0, dice_1], "iou": [iou_0, iou_1]}
    for name, values in expected.items():
        torch.testing.assert_close(getattr(terms, name), torch.tensor(values), rtol=1e-6, atol=1e-7, msg=name)
    totals = [20 * f + d + i for f, d, i in zip(expected["focal"], expected["dice"], expected["iou"])]
    torch.testing.assert_close(terms.loss, torch.tensor(totals), rtol=1e-6, atol=1e-7)


def test_focal_and_dice_on_empty_and_full_masks():
    empty, full = torch.zeros(1, 4, 4), torch.ones(1, 4, 4)
    for logit in (-100.0, -10.0, 0.0, 10.0, 100.0):
        logits = torch.full((1, 4, 4), logit, requires_grad=True)
        for target in (empty, full):
            focal, dice = sigmoid_focal_loss(logits, target), dice_loss(logits, target)
            (focal + dice).sum().backward()
            assert torch.isfinite(focal).all() and torch.isfinite(dice).all() and torch.isfinite(logits.grad).all()
            logits.grad = None
            p = sigmoid(logit)
            positives = float(target.sum())
            hand_dice = 1 - (2 * p * positives + 1) / (16 * p + positives + 1)
            assert dice.item() == pytest.approx(hand_dice, abs=1e-6)
    # A confident right answer costs ~nothing; a confident wrong one on an empty mask costs ~the whole dice.
    assert sigmoid_focal_loss(torch.full((1, 4, 4), -10.0), empty).item() < 1e-9
    assert dice_loss(torch.full((1, 4, 4), 10.0), full).item() < 1e-4
    assert dice_loss(torch.full((1, 4, 4), 10.0), empty).item() == pytest.approx(16 / 17, abs=1e-3)
    # The IoU target: 1 for empty against empty, full against full; 0 for full against empty.
    assert mask_iou(torch.full((1, 4, 4), -1.0), empty).item() == 1.0
    assert mask_iou(torch.full((1, 4, 4), 1.0), full).item() == 1.0
    assert mask_iou(torch.full((1, 4, 4), 1.0), empty).item() == 0.0


# --------------------------------------------------------------------------------------------------------------------
# The model


def test_forward_returns_masks_and_loss_and_runs_setok_once(model, pixels, monkeypatch):
    with torch.no_grad():
        counts = counts_of(model.get_image_features(pixels[:2]))
    batch = segmentation_batch(counts, [(0, [2]), (1, [1, 3])])
    calls = count_setok_calls(model, monkeypatch)
    targets = [torch.rand(32, 32) > 0.5, torch.rand(20, 24), torch.ones(64, 64)]
    with torch.no_grad():
        out = model(**batch, pixel_values=pixels[:2], target_masks=targets, mask_image_index=torch.tensor([0, 1, 1]))
    assert calls == [2], "SeTok runs once, for both the LLM's tokens and the decoder's patch grid"
    side = 4 * model.config.vision_config.grid_size
    assert out.pred_masks.shape == (3, side, side) and out.iou_scores.shape == (3,)
    assert ((out.iou_scores > 0) & (out.iou_scores < 1)).all()
    terms = model.mask_loss_terms(out.pred_masks, out.iou_scores, targets)
    assert out.mask_loss.item() == pytest.approx(terms.loss.mean().item(), rel=1e-6)
    assert out.mask_focal_loss.item() == pytest.approx(terms.focal.mean().item(), rel=1e-6)
    assert out.loss is None, "the mask loss is not folded into the LM loss (the trainer weighs the tasks)"


def test_prompt_slots_keep_the_image_embedding_and_the_decoder_reads_their_hidden_states(model, features):
    features = some_images(features, 1)
    batch = segmentation_batch(counts_of(features), [(0, [2])])
    image_outputs = {"image": features}
    with torch.no_grad():
        out = model(**batch, mm_encoder_outputs=image_outputs, mask_image_index=torch.tensor([0]))
        # Same sequence through the model alone: the prompt slots are hidden like generation targets.
        hidden = model.model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            mm_encoder_outputs=image_outputs,
            masked_image_tokens=batch["segmentation_prompts"],
        ).last_hidden_state
        direct = model.predict_masks(hidden[batch["segmentation_prompts"]], [2], features, torch.tensor([0]))
    torch.testing.assert_close(out.pred_masks, direct.pred_masks)
    torch.testing.assert_close(out.iou_scores, direct.iou_scores)


def test_object_runs_are_row_major_and_end_at_row_ends():
    prompts = torch.tensor([[0, 1, 1, 0, 1], [1, 0, 1, 1, 1], [0, 0, 0, 0, 0]], dtype=torch.bool)
    assert segmentation_prompt_lengths(prompts).tolist() == [2, 1, 1, 3]


def test_masks_are_batch_invariant(model, features):
    # Far from the small initial weights, so that attending to padding would show.
    model = copy.deepcopy(model)
    with torch.no_grad():
        for parameter in model.mask_decoder.parameters():
            parameter.normal_(0, 0.3)
    hidden = model.config.text_config.hidden_size
    lengths = [2, 1, 4, 3]
    prompts = torch.randn(sum(lengths), hidden)
    index = torch.tensor([1, 0, 1, 3])
    with torch.no_grad():
        batch = model.predict_masks(prompts, lengths, features, index)
        offset = 0
        for i, length in enumerate(lengths):
            alone = model.predict_masks(prompts[offset : offset + length], [length], features, index[i : i + 1])
            offset += length
            torch.testing.assert_close(alone.pred_masks[0], batch.pred_masks[i], atol=1e-6, rtol=0)
            torch.testing.assert_close(alone.iou_scores[0], batch.iou_scores[i], atol=1e-6, rtol=0)

    # Through the whole model: one row alone and the same row among others of other lengths and prompt counts.
    # Rows in image order 2, 0, 1, 3: image index = row.
    reordered = some_images(features, 2, 0, 1, 3)
    counts = counts_of(reordered)
    rows = [(0, [3]), (1, [1, 2]), (2, [4]), (3, [2, 1, 1])]
    with torch.no_grad():
        together = model(
            **segmentation_batch(counts, rows), mm_encoder_outputs={"image": reordered},
            mask_image_index=torch.tensor([0, 1, 1, 2, 3, 3, 3]),
        )  # fmt: skip
        alone = model(
            **segmentation_batch(counts_of(features), [(0, [1, 2])]), mm_encoder_outputs={"image": some_images(features, 0)},
            mask_image_index=torch.tensor([0, 0]),
        )  # fmt: skip
    torch.testing.assert_close(alone.pred_masks, together.pred_masks[1:3], atol=1e-5, rtol=0)
    torch.testing.assert_close(alone.iou_scores, together.iou_scores[1:3], atol=1e-6, rtol=0)


def test_flash_style_and_eager_attention_match_sdpa(features):
    torch.manual_seed(0)
    decoder = SetokimMaskDecoder(decoder_config()).eval()
    with torch.no_grad():
        for parameter in decoder.parameters():
            parameter.normal_(0, 0.3)
    lengths = torch.tensor([1, 4, 2])
    real = torch.arange(4)[None] < lengths[:, None]
    prompts = torch.randn(3, 4, 32) * real[..., None]
    grid = features.patch_features[[0, 2, 3]]
    outputs = {}
    for implementation in ("sdpa", "eager", "emulated_varlen"):
        decoder.config._attn_implementation = implementation
        with torch.no_grad():
            outputs[implementation] = decoder(prompts, real, grid)
    for implementation in ("eager", "emulated_varlen"):
        for got, reference in zip(outputs[implementation], outputs["sdpa"]):
            torch.testing.assert_close(got, reference, atol=1e-5, rtol=1e-5, msg=implementation)


# --------------------------------------------------------------------------------------------------------------------
# Training


def test_the_mask_loss_alone_trains_lora_on_the_llm_and_not_the_frozen_encoder(pixels):
    torch.manual_seed(0)
    base = SetokimForConditionalGeneration(decoder_config())
    lora = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=LLM_PROJECTIONS, modules_to_save=["multi_modal_projector", "mask_decoder"]
    )
    wrapped = peft.get_peft_model(base, lora).train()
    with torch.no_grad():
        counts = counts_of(base.get_image_features(pixels[:1]))
    batch = segmentation_batch(counts, [(0, [3])])
    out = wrapped(
        **batch, pixel_values=pixels[:1], target_masks=[torch.rand(32, 32) > 0.5], mask_image_index=torch.tensor([0])
    )
    out.mask_loss.backward()
    lora_b = {name: p.grad for name, p in wrapped.named_parameters() if "lora_B" in name}
    assert lora_b and all(grad is not None and grad.abs().sum() > 0 for grad in lora_b.values()), lora_b.keys()
    decoder = [p.grad for name, p in wrapped.named_parameters() if "mask_decoder" in name and p.requires_grad]
    assert decoder and all(grad is not None for grad in decoder)
    encoder = list(base.model.vision_tower.vision_model.parameters())
    assert not any(p.requires_grad for p in encoder) and all(p.grad is None for p in encoder)


def test_a_batch_without_objects_gives_the_decoder_zero_gradients(model, pixels):
    model.train()
    try:
        with torch.no_grad():
            count = counts_of(model.get_image_features(pixels[:1]))[0]
        ids = torch.tensor([[1, *image_block(count), 2, 3]])
        model.zero_grad()
        model(input_ids=ids, pixel_values=pixels[:1], labels=ids.masked_fill(ids == IMAGE, -100)).loss.backward()
        grads = [p.grad for p in model.mask_decoder.parameters()]
        assert all(grad is not None for grad in grads), "every process must reduce the decoder's gradients"
        assert all(not grad.any() for grad in grads)
        # Also with the prompts given but empty (a collator that always passes them).
        model.zero_grad()
        empty = torch.zeros_like(ids, dtype=torch.bool)
        out = model(
            input_ids=ids, pixel_values=pixels[:1], segmentation_prompts=empty, target_masks=[],
            mask_image_index=torch.zeros(0, dtype=torch.long),
        )  # fmt: skip
        assert out.pred_masks.shape[0] == 0 and out.mask_loss.item() == 0.0
        (out.logits.sum() * 0 + out.mask_loss).backward()
        assert all(p.grad is not None and not p.grad.any() for p in model.mask_decoder.parameters())
    finally:
        model.zero_grad()
        model.eval()


def test_gradient_checkpointing_gives_the_decoder_the_same_gradients(pixels):
    torch.manual_seed(0)
    model = SetokimForConditionalGeneration(decoder_config()).train()
    with torch.no_grad():
        features = some_images(model.get_image_features(pixels), 0, 1)
    batch = segmentation_batch(counts_of(features), [(0, [2]), (1, [3, 1])])
    inputs = dict(batch, mm_encoder_outputs={"image": features}, mask_image_index=torch.tensor([0, 1, 1]))
    inputs["target_masks"] = [torch.rand(32, 32) > 0.5 for _ in range(3)]
    grads = []
    for checkpointing in (False, True):
        model.zero_grad()
        if checkpointing:
            model.gradient_checkpointing_enable()
        model(**inputs).mask_loss.backward()
        grads.append({name: p.grad.clone() for name, p in model.mask_decoder.named_parameters()})
    assert model.mask_decoder.blocks[0].gradient_checkpointing
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5, msg=name)


def horse_scene(size: int):
    """The horse silhouette from scikit-image as a black-on-white RGB image and its mask at `size` x `size`."""
    horse = ~data.horse()  # True on the horse
    image = np.where(horse[..., None], 40, 235).astype(np.uint8).repeat(3, axis=-1)
    mask = Image.fromarray(horse.astype(np.uint8) * 255).resize((size, size), Image.Resampling.BILINEAR)
    return image, torch.from_numpy(np.asarray(mask) > 127)


def test_an_overfit_run_segments_its_training_image():
    torch.manual_seed(0)
    model = SetokimForConditionalGeneration(decoder_config()).train()
    image, mask = horse_scene(64)  # the target at twice the decoder's 32 x 32: the loss resizes the logits
    pixels = SetokImageProcessor(size=32)([image], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        features = model.get_image_features(pixels)
    batch = segmentation_batch(counts_of(features), [(0, [2])])
    inputs = dict(
        batch, mm_encoder_outputs={"image": features}, target_masks=[mask], mask_image_index=torch.tensor([0])
    )
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3, weight_decay=0.0)
    for _ in range(200):
        optimizer.zero_grad()
        out = model(**inputs)
        out.mask_loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        out = model(**inputs)
    logits = torch.nn.functional.interpolate(out.pred_masks[:, None], size=mask.shape, mode="bilinear")[0, 0]
    iou = ((logits > 0) & mask).sum() / ((logits > 0) | mask).sum()
    assert iou > 0.9, f"IoU {iou:.3f} after overfitting one image"
    assert abs(out.iou_scores.item() - iou.item()) < 0.1, "the IoU head learns the IoU of its own mask"


# --------------------------------------------------------------------------------------------------------------------
# Saving, loading, config


def test_save_and_load_keep_the_decoder(model, features, tmp_path):
    model.save_pretrained(tmp_path)
    loaded = SetokimForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert loaded.config.use_mask_decoder and loaded.config.mask_decoder_width == 32
    lengths, index = [2, 1], torch.tensor([0, 3])
    prompts = torch.randn(3, model.config.text_config.hidden_size)
    with torch.no_grad():
        before = model.predict_masks(prompts, lengths, features, index)
        after = loaded.predict_masks(prompts, lengths, features, index)
    torch.testing.assert_close(after.pred_masks, before.pred_masks, atol=0, rtol=0)
    torch.testing.assert_close(after.iou_scores, before.iou_scores, atol=0, rtol=0)
    assert not any(p.requires_grad for p in loaded.model.vision_tower.vision_model.parameters())


def test_configs_from_before_the_decoder_load_without_it(tmp_path):
    torch.manual_seed(0)
    SetokimForConditionalGeneration(setokim_config()).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    old = {key: value for key, value in saved.items() if not key.startswith("mask_") and key != "use_mask_decoder"}
    assert len(old) < len(saved)
    (tmp_path / "config.json").write_text(json.dumps(old))
    loaded = SetokimForConditionalGeneration.from_pretrained(tmp_path)
    assert loaded.config.use_mask_decoder is False and loaded.mask_decoder is None
    assert loaded.config.mask_focal_weight == 20.0 and loaded.config.mask_dice_weight == 1.0


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(mask_decoder_width=36), "multiple of 8 and of 2 x `mask_decoder_heads`"),
        (dict(mask_decoder_width=32, mask_decoder_heads=32), "multiple of 8 and of 2 x `mask_decoder_heads`"),
        (dict(mask_decoder_depth=0), "`mask_decoder_depth` must be a positive integer"),
        (dict(mask_focal_weight=-1.0), "`mask_focal_weight` must be a non-negative number"),
        (dict(mask_iou_weight=float("nan")), "`mask_iou_weight` must be a non-negative number"),
        (dict(mask_focal_alpha=1.5), r"`mask_focal_alpha` must lie in \[0, 1\]"),
        (dict(use_mask_decoder="yes"), "`use_mask_decoder` must be True or False"),
    ],
)
def test_bad_decoder_configs_say_what_is_wrong(overrides, message):
    with pytest.raises(ValueError, match=message):
        decoder_config(**overrides)


# --------------------------------------------------------------------------------------------------------------------
# Bad inputs


def test_bad_segmentation_inputs_say_what_is_wrong(model, features):
    features = some_images(features, 0, 1)
    counts = counts_of(features)
    batch = segmentation_batch(counts, [(0, [2]), (1, [1, 3])])
    images = {"image": features}
    index = torch.tensor([0, 1, 1])
    masks = [torch.ones(8, 8)] * 3
    prompts = batch["segmentation_prompts"]

    def call(**overrides):
        kwargs = dict(batch, mm_encoder_outputs=images, target_masks=masks, mask_image_index=index)
        kwargs.update(overrides)
        with torch.no_grad():
            return model(**kwargs)

    cases = [
        (dict(segmentation_prompts=None), "`target_masks` and `mask_image_index` need `segmentation_prompts`"),
        (dict(segmentation_prompts=None, mask_image_index=None), "`target_masks` need `segmentation_prompts`"),
        (dict(mask_image_index=None), "`segmentation_prompts` need `mask_image_index`"),
        (dict(target_masks=masks[:2]), "got 3 objects in `segmentation_prompts`, 3 `mask_image_index` entries, 2"),
        (dict(mask_image_index=index[:2]), "got 3 objects in `segmentation_prompts`, 2 `mask_image_index`"),
        (dict(mask_image_index=torch.tensor([0, 1, 2])), r"must index the batch's 2 images \(0 to 1\)"),
        (dict(mask_image_index=torch.tensor([0, -1, 1])), r"must index the batch's 2 images"),
        (dict(mask_image_index=torch.tensor([0.0, 1.0, 1.0])), "must be a 1-D integer tensor"),
        (dict(segmentation_prompts=prompts.long()), "`segmentation_prompts` must be a bool tensor of shape"),
        (dict(segmentation_prompts=prompts | (batch["input_ids"] == 3)), "may only mark `<image>` positions"),
        (dict(masked_image_tokens=prompts), "`segmentation_prompts` and `masked_image_tokens` overlap"),
        (dict(target_masks=[torch.ones(8, 8), torch.ones(8, 8), torch.full((8, 8), 2.0)]), r"`target_masks\[2\]`"),
        (dict(target_masks=[torch.ones(8, 8), torch.ones(8), torch.ones(8, 8)]), r"`target_masks\[1\]` must be a"),
        (dict(mm_encoder_outputs=None), "need the images they refer to"),
    ]
    for overrides, message in cases:
        with pytest.raises((ValueError, TypeError), match=message):
            call(**overrides)

    # Image outputs without the patch grid (built by hand, not by this model's `get_image_features`).
    bare = type(features)(last_hidden_state=features.last_hidden_state, pooler_output=features.pooler_output)
    with pytest.raises(ValueError, match="carry no `patch_features`"):
        call(mm_encoder_outputs={"image": bare})
    with pytest.raises(ValueError, match="`prompt_lengths` sum to 3 but `prompt_hidden_states` has 2 rows"):
        model.predict_masks(torch.zeros(2, 32), [1, 2], features, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="`prompt_lengths` must be a 1-D tensor of positive integers"):
        model.predict_masks(torch.zeros(2, 32), [2, 0], features, torch.tensor([0, 1]))


def test_a_model_without_a_decoder_says_how_to_build_one(features):
    model = SetokimForConditionalGeneration(setokim_config()).eval()
    prompts = torch.zeros(1, 4, dtype=torch.bool)
    message = r"has no mask decoder: build it with `SetokimConfig\(use_mask_decoder=True\)`"
    with pytest.raises(ValueError, match=message):
        model(input_ids=torch.ones(1, 4, dtype=torch.long), segmentation_prompts=prompts)
    with pytest.raises(ValueError, match=message):
        model.predict_masks(torch.zeros(1, 32), [1], features, torch.tensor([0]))


REMOTE_CHILD = (
    WITHOUT_THE_PACKAGE
    + r"""
import json
import torch
from transformers import AutoModelForImageTextToText

torch.set_num_threads(1)
folder = sys.argv[1]
model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
inputs = torch.load(f"{folder}/inputs.pt")
with torch.no_grad():
    features = model.get_image_features(inputs["pixel_values"])
    out = model.predict_masks(inputs["prompts"], inputs["lengths"], features, inputs["index"])
print(json.dumps({
    "module": type(model.mask_decoder).__module__,
    "masks": out.pred_masks.tolist(),
    "iou": out.iou_scores.tolist(),
    "setok_imported": "transformers_setok" in sys.modules,
}))
"""
)


def test_remote_code_carries_the_decoder(model, pixels, tmp_path, monkeypatch):
    import subprocess
    import sys

    for cls in (SetokimForConditionalGeneration, SetokimConfig):
        monkeypatch.setattr(cls, "_auto_class", getattr(cls, "_auto_class", None))
    model = copy.deepcopy(model)  # saving with an auto class writes `auto_map` into the config
    model.register_for_auto_class("AutoModelForImageTextToText")
    model.config.register_for_auto_class()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "mask_decoder_setokim.py").is_file()
    inputs = {
        "pixel_values": pixels[:2],
        "prompts": torch.randn(3, model.config.text_config.hidden_size),
        "lengths": torch.tensor([1, 2]),
        "index": torch.tensor([1, 0]),
    }
    torch.save(inputs, tmp_path / "inputs.pt")
    child = subprocess.run(
        [sys.executable, "-c", REMOTE_CHILD, str(tmp_path)], capture_output=True, text=True, timeout=300
    )
    assert child.returncode == 0, child.stderr[-3000:]
    result = json.loads(child.stdout.strip().splitlines()[-1])
    assert not result["setok_imported"] and "mask_decoder_setokim" in result["module"]
    with torch.no_grad():
        expected = model.predict_masks(
            inputs["prompts"], inputs["lengths"], model.get_image_features(inputs["pixel_values"]), inputs["index"]
        )
    torch.testing.assert_close(torch.tensor(result["masks"]), expected.pred_masks, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.tensor(result["iou"]), expected.iou_scores, atol=1e-6, rtol=1e-5)


def test_prompt_standardization_tracks_the_real_slots_and_stays_fixed_in_eval():
    norm = SetokimPromptStandardization(3, momentum=0.25)
    first = torch.tensor([[[1.0, 2, 3], [3, 6, 9]], [[5, 4, 3], [100, 100, 100]]])
    real = torch.tensor([[1, 1], [1, 0]])  # the last slot is padding: it must not count
    states = first[real.bool()]
    norm.train()
    out = norm(first, real)
    # The first batch sets the statistics, which standardise this very batch.
    torch.testing.assert_close(norm.running_mean, states.mean(0))
    torch.testing.assert_close(norm.running_var, states.var(0, correction=0))
    torch.testing.assert_close(out, (first - states.mean(0)) / torch.sqrt(states.var(0, correction=0) + norm.eps))
    second = torch.randn(2, 4, 3) * 3 + 7
    norm(second, torch.ones(2, 4))
    flat = second.reshape(-1, 3)
    torch.testing.assert_close(norm.running_mean, 0.75 * states.mean(0) + 0.25 * flat.mean(0))
    torch.testing.assert_close(norm.running_var, 0.75 * states.var(0, correction=0) + 0.25 * flat.var(0, correction=0))
    assert int(norm.num_batches_tracked) == 2
    norm(torch.zeros(0, 2, 3), torch.zeros(0, 2))  # no objects on this process: nothing moves
    assert int(norm.num_batches_tracked) == 2
    norm.eval()
    mean, var = norm.running_mean.clone(), norm.running_var.clone()
    alone = norm(second[:1], torch.ones(1, 4))
    torch.testing.assert_close(alone, norm(second, torch.ones(2, 4))[:1])  # the batch plays no part
    torch.testing.assert_close(alone, (second[:1] - mean) / torch.sqrt(var + norm.eps))
    assert torch.equal(norm.running_mean, mean) and torch.equal(norm.running_var, var)


def _track_on_two_processes(rank, init_file, batches, results):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        norm = SetokimPromptStandardization(3).train()
        for prompts, real in batches[rank]:
            norm(prompts, real)
        results[rank] = (norm.running_mean.clone(), norm.running_var.clone())
    finally:
        torch.distributed.destroy_process_group()


def test_prompt_statistics_are_those_of_the_global_batch_on_every_process(tmp_path):
    torch.manual_seed(0)
    steps = [(torch.randn(3, 2, 3) * 2 + 1, torch.randn(1, 4, 3) - 2) for _ in range(3)]
    one_process = SetokimPromptStandardization(3).train()
    for a, b in steps:  # rank 0's objects have 2 slots, rank 1's 4: one process pads them into one batch
        both = torch.cat([torch.cat([a, torch.zeros(3, 2, 3)], 1), b])
        one_process(both, torch.cat([torch.tensor([[1, 1, 0, 0]] * 3), torch.ones(1, 4)]))
    batches = [[(a, torch.ones(3, 2)) for a, _ in steps], [(b, torch.ones(1, 4)) for _, b in steps]]
    results = torch.multiprocessing.Manager().dict()
    torch.multiprocessing.spawn(
        _track_on_two_processes, args=(str(tmp_path / "store"), batches, results), nprocs=2, join=True
    )
    for rank in (0, 1):
        mean, var = results[rank]
        torch.testing.assert_close(mean, one_process.running_mean, atol=1e-6, rtol=0)
        torch.testing.assert_close(var, one_process.running_var, atol=1e-5, rtol=0)


def test_a_checkpoint_without_prompt_statistics_loads_them_unset(model, tmp_path):
    from safetensors.torch import load_file, save_file

    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    saved = sorted(key for key in weights if "prompt_norm" in key)
    assert saved == [f"mask_decoder.prompt_norm.{n}" for n in ("num_batches_tracked", "running_mean", "running_var")]
    save_file({k: v for k, v in weights.items() if "prompt_norm" not in k}, tmp_path / "model.safetensors",
              metadata={"format": "pt"})  # fmt: skip
    norm = SetokimForConditionalGeneration.from_pretrained(tmp_path).mask_decoder.prompt_norm
    assert torch.equal(norm.running_mean, torch.zeros(norm.running_mean.shape))
    assert torch.equal(norm.running_var, torch.ones(norm.running_var.shape))
    assert int(norm.num_batches_tracked) == 0
