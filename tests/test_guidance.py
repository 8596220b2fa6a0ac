"""Classifier-free guidance: the condition of a drawing sample located in its chat, dropped in training (text, an
edit's source image, both), and the sampler's guided passes over the same chat without its text."""

import math

import numpy as np
import pytest
import torch
from conftest import count_setok_calls, tiny_processor, tiny_setokim
from conftest import trainer_for as pretrain_trainer_for
from PIL import Image, ImageOps

from transformers_setok.generation import (
    check_guidance_scale,
    classifier_free_guidance,
    instruct_pix2pix_guidance,
    noise_scheduler_for,
    tokens_in_spans,
    user_text_spans,
)
from transformers_setok.pipelines import SetokimTextToImagePipeline
from transformers_setok.training.collators import SetokimChatCollator
from transformers_setok.training.generation_targets import ConditionDropout, draw_condition_drops
from transformers_setok.training.masks import encode_rle
from transformers_setok.training.step_inputs import DiffusionSettings, prepare_step


@pytest.fixture(scope="module")
def processor():
    return tiny_processor()


@pytest.fixture
def model(processor):
    torch.manual_seed(0)
    model = tiny_setokim(processor, use_generation_head=True)
    for parameter in model.generation_head.parameters():
        torch.nn.init.normal_(parameter, std=0.05)
    model.model.vision_tower.requires_grad_(False)
    return model


@pytest.fixture(scope="module")
def cat(photos):
    return Image.fromarray(photos["chelsea"])


@pytest.fixture(scope="module")
def cup(photos):
    return Image.fromarray(photos["coffee"])


def text_to_image(image, caption):
    user = {"role": "user", "content": [{"type": "text", "text": caption}]}
    return {"images": [image], "messages": [user, {"role": "assistant", "content": [{"type": "image"}]}]}


def edit(source, target, instruction):
    user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": instruction}]}
    return {"images": [source, target], "messages": [user, {"role": "assistant", "content": [{"type": "image"}]}]}


def captioning(image, caption):
    user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is it ?"}]}
    return {
        "images": [image],
        "messages": [user, {"role": "assistant", "content": [{"type": "text", "text": caption}]}],
    }


def segmentation(image):
    mask = np.zeros((image.height, image.width), dtype=bool)
    mask[: image.height // 2] = True
    return {"images": [image], "expression": "the cat", "messages": None, "mask": encode_rle(mask)}


def words(processor, ids, mask=None):
    ids = ids if mask is None else ids[mask.bool()]
    return processor.tokenizer.convert_ids_to_tokens(ids.tolist())


def block(row: list[str]) -> str:
    """A row of words with each image block written `[Img]...[/Img]`."""
    return " ".join(row).replace(" <image>", "").replace("[Img] [/Img]", "[Img]...[/Img]")


def pipeline(model, processor):
    pipe = SetokimTextToImagePipeline(model=model, processor=processor, scheduler=noise_scheduler_for(model.config))
    pipe.set_progress_bar_config(disable=True)
    return pipe


# --------------------------------------------------------------------------------------------------------------------
# The combinations


def test_classifier_free_guidance_by_hand():
    uncond, cond = torch.tensor([[1.0, -2.0], [0.5, 4.0]]), torch.tensor([[3.0, -1.0], [0.5, 0.0]])
    # uncond + s (cond - uncond), s = 2.5: 1 + 2.5 * 2, -2 + 2.5 * 1, 0.5 + 0, 4 + 2.5 * -4
    assert classifier_free_guidance(uncond, cond, 2.5).tolist() == [[6.0, 0.5], [0.5, -6.0]]
    assert torch.equal(classifier_free_guidance(uncond, cond, 1.0), cond)
    assert torch.equal(classifier_free_guidance(uncond, cond, 0.0), uncond)
    with pytest.raises(ValueError, match="same shape"):
        classifier_free_guidance(uncond, cond[:1], 2.0)


def test_instruct_pix2pix_guidance_by_hand():
    uncond, image_only, full = torch.tensor([1.0, 0.0]), torch.tensor([2.0, 4.0]), torch.tensor([5.0, 3.0])
    # uncond + s_I (image_only - uncond) + s_T (full - image_only), s_T = 7.5, s_I = 1.5:
    # 1 + 1.5 * 1 + 7.5 * 3 = 25, 0 + 1.5 * 4 + 7.5 * -1 = -1.5
    assert instruct_pix2pix_guidance(uncond, image_only, full, 7.5, 1.5).tolist() == [25.0, -1.5]
    assert torch.equal(instruct_pix2pix_guidance(uncond, image_only, full, 1.0, 1.0), full)
    # No image guidance is plain guidance between the image-only and the full prediction.
    torch.testing.assert_close(
        instruct_pix2pix_guidance(uncond, image_only, full, 3.0, 1.0),
        classifier_free_guidance(image_only, full, 3.0),
    )
    with pytest.raises(ValueError, match="same shape"):
        instruct_pix2pix_guidance(uncond, image_only, full[:1], 1.0, 1.0)


@pytest.mark.parametrize("bad", [-0.5, math.nan, math.inf, -math.inf, "2", True, None])
def test_bad_guidance_scales_are_refused_by_name(bad, model, processor):
    with pytest.raises(ValueError, match="`image_guidance_scale` must be a finite number >= 0"):
        check_guidance_scale(bad, "image_guidance_scale")
    with pytest.raises(ValueError, match="`guidance_scale` must be a finite number >= 0"):
        pipeline(model, processor)("a cat", guidance_scale=bad)
    assert check_guidance_scale(0) == 0.0 and check_guidance_scale(np.float32(7.5)) == 7.5


# --------------------------------------------------------------------------------------------------------------------
# Where the condition is


def test_user_text_spans_locate_every_user_text_and_nothing_else(processor):
    def render(messages):
        return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    chat = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is the cat ?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "a cat"}]},
        {"role": "user", "content": "a cat"},
    ]
    text, spans = user_text_spans(render, chat)
    assert text == render(chat)
    assert [text[start:end] for start, end in spans] == ["what is the cat ?", "a cat"]
    # The system text and the assistant's "a cat" are not conditions; the second user turn's is.
    assert spans[1][0] == text.rindex("User: a cat") + len("User: ")
    assert user_text_spans(render, [{"role": "user", "content": [{"type": "image"}]}])[1] == []
    offsets = [(0, 4), (4, 5), (5, 9), (9, 9)]
    assert tokens_in_spans(offsets, [(4, 6)]) == [False, True, True, False]


def test_user_text_spans_of_templates_that_strip_repeat_or_rewrite_the_text():
    def template(body):
        return lambda messages: "".join(f"<{m['role']}>{body(m['content'])}</>" for m in messages)

    chat = [{"role": "user", "content": "  a cat "}]
    text, spans = user_text_spans(template(str.strip), chat)  # Llama 3 trims its contents
    assert text == "<user>a cat</>" and spans == [(6, 11)]
    with pytest.raises(ValueError, match="once and in order"):
        user_text_spans(template(lambda content: content + content), chat)
    with pytest.raises(ValueError, match="changes the user's text"):
        user_text_spans(template(lambda content: content.replace("cat", "dog")), chat)


# --------------------------------------------------------------------------------------------------------------------
# The collator marks the condition


def test_the_collator_marks_the_condition_of_every_drawing_sample(processor, cat, cup):
    records = [text_to_image(cat, "a cat"), edit(cat, cup, "what is the cat ?"), captioning(cup, "a cup")]
    batch = SetokimChatCollator(processor)(records)
    texts, images = batch["condition_text"], batch["condition_images"]
    assert texts.dtype == images.dtype == torch.bool and texts.shape == images.shape == batch["input_ids"].shape
    real = batch["attention_mask"].bool()
    marked = [
        [(word, int(t), int(i)) for word, t, i in zip(words(processor, ids), text[keep], image[keep])]
        for ids, text, image, keep in zip(batch["input_ids"], texts, images, real)
        for ids in [ids[keep]]
    ]
    assert marked[0] == [
        ("User", 0, 0), (":", 0, 0), ("a", 1, 0), ("cat", 1, 0), ("Assistant", 0, 0), (":", 0, 0),
        ("<image>", 0, 0), ("</s>", 0, 0),
    ]  # fmt: skip
    assert marked[1] == [
        ("User", 0, 0), (":", 0, 0), ("<image>", 0, 1), ("what", 1, 0), ("is", 1, 0), ("the", 1, 0), ("cat", 1, 0),
        ("?", 1, 0), ("Assistant", 0, 0), (":", 0, 0), ("<image>", 0, 0), ("</s>", 0, 0),
    ]  # fmt: skip
    # A captioning sample draws nothing: it has no condition to drop. Nor has padding.
    assert not bool(texts[2].any()) and not bool(images[2].any())
    assert not bool((texts | images)[~real].any())
    # A batch that draws nothing holds no condition fields.
    assert "condition_text" not in SetokimChatCollator(processor)([captioning(cup, "a cup"), segmentation(cat)])


# --------------------------------------------------------------------------------------------------------------------
# Condition dropout in `prepare_step`


def diffusion(model, **dropout):
    return DiffusionSettings(noise_scheduler_for(model.config), condition_dropout=ConditionDropout(**dropout))


def prepared(model, processor, batch, settings, seed=0, padding_side="right"):
    return prepare_step(
        model,
        batch,
        processor,
        padding_side=padding_side,
        diffusion=settings,
        generator=torch.Generator().manual_seed(seed),
    )


def assert_same_step(first, second):
    assert first.model_kwargs.keys() == second.model_kwargs.keys()
    for key, value in first.model_kwargs.items():
        if torch.is_tensor(value):
            assert torch.equal(value, second.model_kwargs[key]), key
    a, b = first.model_kwargs["mm_encoder_outputs"]["image"], second.model_kwargs["mm_encoder_outputs"]["image"]
    assert all(torch.equal(x, y) for x, y in zip(a.pooler_output, b.pooler_output))
    assert torch.equal(first.diffusion.target, second.diffusion.target)
    assert torch.equal(first.diffusion.weights, second.diffusion.weights)


@pytest.fixture
def mixed(processor, cat, cup):
    """A text-to-image chat, a captioning one, an edit and a referring-segmentation request."""
    return [
        text_to_image(cat, "a cat"),
        captioning(cup, "a cup"),
        edit(cat, cup, "what is the cat ?"),
        segmentation(cup),
    ]


def test_no_dropout_gives_the_batch_of_a_collator_without_conditions(model, processor, mixed):
    """Probabilities of 0 (the default) draw nothing: the step is the one prepared before condition dropout existed,
    from the same batch without its condition fields, with the same generator."""
    batch = SetokimChatCollator(processor)(mixed)
    before = {key: value for key, value in batch.items() if not key.startswith("condition_")}
    today = prepared(model, processor, before, DiffusionSettings(noise_scheduler_for(model.config)))
    assert_same_step(prepared(model, processor, batch, diffusion(model)), today)
    assert_same_step(prepared(model, processor, batch, DiffusionSettings(noise_scheduler_for(model.config))), today)
    assert not any(key.startswith("condition_") for key in today.model_kwargs)


def test_dropping_everything_leaves_the_null_chats(model, processor, mixed, monkeypatch):
    batch = SetokimChatCollator(processor)(mixed)
    calls = count_setok_calls(model, monkeypatch)
    step = prepared(model, processor, batch, diffusion(model, both=1.0))
    inputs = step.model_kwargs
    rows = [words(processor, ids, mask) for ids, mask in zip(inputs["input_ids"], inputs["attention_mask"])]

    assert block(rows[0]) == "User : Assistant : [Img]...[/Img] </s>"
    assert block(rows[2]) == "User : Assistant : [Img]...[/Img] </s>"  # no instruction, no source image
    # What draws nothing keeps its condition: the captioning chat and the segmentation request.
    assert block(rows[1]) == "User : [Img]...[/Img] what is <unk> ? Assistant : a <unk> </s>"
    assert rows[3][:2] == ["User", ":"] and "[Img]" in rows[3]
    # SeTok ran once, on the three images that stayed (the edit's source left before it).
    assert calls == [4]
    assert len(inputs["mm_encoder_outputs"]["image"].pooler_output) == 4
    assert inputs["mask_image_index"].tolist() == [3]  # the segmented image, renumbered after the source left
    assert inputs["target_masks"].shape[0] == 1 and bool(inputs["segmentation_prompts"][3].any())
    # Labels still hold both drawn images' blocks, and nothing else of the dropped chats.
    for row in (0, 2):
        labelled = words(processor, inputs["labels"][row][inputs["labels"][row] != -100])
        assert labelled[0] == "[Img]" and labelled[-2:] == ["[/Img]", "</s>"]


def test_text_dropout_and_image_dropout_each_drop_their_own(model, processor, mixed, cat, cup, monkeypatch):
    batch = SetokimChatCollator(processor)(mixed)
    text_only = prepared(model, processor, batch, diffusion(model, text=1.0)).model_kwargs
    # The edit keeps its source image and loses its instruction; the text-to-image chat loses its text.
    row = words(processor, text_only["input_ids"][2], text_only["attention_mask"][2])
    assert block(row) == "User : [Img]...[/Img] Assistant : [Img]...[/Img] </s>"
    first = words(processor, text_only["input_ids"][0], text_only["attention_mask"][0])
    assert block(first) == "User : Assistant : [Img]...[/Img] </s>"
    assert len(text_only["mm_encoder_outputs"]["image"].pooler_output) == 5

    calls = count_setok_calls(model, monkeypatch)
    image_only = prepared(model, processor, batch, diffusion(model, image=1.0)).model_kwargs
    row = words(processor, image_only["input_ids"][2], image_only["attention_mask"][2])
    assert block(row) == "User : what is the cat ? Assistant : [Img]...[/Img] </s>"
    # A text-to-image chat has no source image: it loses its text only with the text (or both).
    first = words(processor, image_only["input_ids"][0], image_only["attention_mask"][0])
    assert block(first) == "User : a cat Assistant : [Img]...[/Img] </s>"
    assert calls == [4]

    # Left padding is kept: the shortened rows are re-padded on the left.
    left = SetokimChatCollator(processor, padding_side="left")(mixed)
    step = prepared(model, processor, left, diffusion(model, both=1.0), padding_side="left").model_kwargs
    assert bool(step["attention_mask"][:, -1].all()) and not bool(step["attention_mask"][:, 0].all())


def test_dropout_draws_are_reproducible_and_follow_the_probabilities():
    dropout = ConditionDropout(text=0.2, image=0.3, both=0.1)
    text, image = draw_condition_drops(4000, dropout, torch.Generator().manual_seed(0))
    again = draw_condition_drops(4000, dropout, torch.Generator().manual_seed(0))
    assert torch.equal(text, again[0]) and torch.equal(image, again[1])
    other = draw_condition_drops(4000, dropout, torch.Generator().manual_seed(1))
    assert not torch.equal(text, other[0])
    # Exclusive cases: text alone 0.2, image alone 0.3, both 0.1 (4000 draws: within 0.03 of each).
    for observed, expected in ((text & ~image, 0.2), (image & ~text, 0.3), (text & image, 0.1)):
        assert abs(float(observed.double().mean()) - expected) < 0.03
    generator = torch.Generator().manual_seed(0)
    state = generator.get_state()
    none = draw_condition_drops(5, ConditionDropout(), generator)
    assert not bool(none[0].any() or none[1].any()) and torch.equal(generator.get_state(), state)
    for bad, name in ((dict(text=1.5), "condition_text_dropout"), (dict(image=-0.1), "condition_image_dropout")):
        with pytest.raises(ValueError, match=f"`{name}`"):
            ConditionDropout(**bad)
    with pytest.raises(ValueError, match="sum to at most 1"):
        ConditionDropout(text=0.5, image=0.4, both=0.2)


def test_the_trainer_drops_with_the_step_generator_in_training_only(model, processor, cat, tmp_path):
    records = [text_to_image(cat, "a cat")] * 16
    trainer = pretrain_trainer_for(
        model, processor, records, tmp_path, train_generation_head=True, condition_text_dropout=0.5
    )
    batch = SetokimChatCollator(processor)(records)
    text_tokens = int(batch["condition_text"][0].sum())
    # Outside a training step (evaluation, `micro_batch=None`) nothing is dropped: every row keeps its full length.
    full = trainer.prepare_step(model, batch).model_kwargs["attention_mask"].sum(1)
    assert len(set(full.tolist())) == 1

    def dropped(micro_batch) -> list[bool]:
        lengths = trainer.prepare_step(model, batch, micro_batch=micro_batch).model_kwargs["attention_mask"].sum(1)
        assert set((full - lengths).tolist()) <= {0, text_tokens}  # a row loses its whole text or nothing
        return (lengths < full).tolist()

    first = dropped(0)
    assert 0 < sum(first) < 16  # some rows lost their text, some kept it
    assert dropped(0) == first, "the same step and micro-batch drop alike"
    assert dropped(1) != first, "another micro-batch draws its own"
    trainer.state.global_step = 1
    assert dropped(0) != first, "another step draws its own"
    with pytest.raises(ValueError, match="`condition_both_dropout`"):
        pretrain_trainer_for(model, processor, records, tmp_path, condition_both_dropout=2.0)


# --------------------------------------------------------------------------------------------------------------------
# Guided sampling


def rows_read(model, monkeypatch) -> list[torch.Tensor]:
    """Records the `input_ids` of every LLM pass of the unmasking rounds."""
    seen = []
    conditions = model.image_token_conditions

    def spy(input_ids, attention_mask, *args, **kwargs):
        seen.append((input_ids.clone(), attention_mask.clone()))
        return conditions(input_ids, attention_mask, *args, **kwargs)

    monkeypatch.setattr(model, "image_token_conditions", spy)
    return seen


KWARGS = dict(num_inference_steps=5, num_unmasking_rounds=3, max_image_tokens=9)
PROMPTS = ["a cat", "what is in the image ?"]


def test_guidance_one_is_the_unguided_sampler_bit_for_bit(model, processor, monkeypatch):
    """Scale 1 never builds the unconditional rows: the LLM reads the B prompts only, and the samples are those of
    a call without guidance, bit for bit."""
    pipe = pipeline(model, processor)
    seen = rows_read(model, monkeypatch)
    plain = pipe(PROMPTS, generator=torch.Generator().manual_seed(12), **KWARGS)
    assert {len(ids) for ids, _ in seen} == {2}
    seen.clear()
    one = pipe(PROMPTS, guidance_scale=1.0, generator=torch.Generator().manual_seed(12), **KWARGS)
    assert {len(ids) for ids, _ in seen} == {2}
    assert [len(t) for t in one.image_tokens] == [len(t) for t in plain.image_tokens] == [4, 5]
    for a, b in zip(one.image_tokens, plain.image_tokens):
        assert torch.equal(a, b)
    assert np.array_equal(np.asarray(one.images[1]), np.asarray(plain.images[1]))


def test_a_guided_sample_reads_the_null_chat_differs_and_repeats(model, processor, cat, monkeypatch):
    pipe = pipeline(model, processor)
    plain = pipe(PROMPTS, generator=torch.Generator().manual_seed(12), **KWARGS)
    seen = rows_read(model, monkeypatch)
    guided = pipe(PROMPTS, guidance_scale=4.0, generator=torch.Generator().manual_seed(12), **KWARGS)
    # One batched pass per round over [cond; uncond]: the prompts, then the same chats without their text, each
    # followed by the same slots.
    ids, mask = seen[0]
    assert len(seen) == 3 and len(ids) == 4
    rows = [" ".join(words(processor, i, m)) for i, m in zip(ids, mask)]
    slots = [" ".join(["[Img]"] + ["<image>"] * n + ["[/Img]"]) for n in (4, 5)]
    assert rows == [
        f"User : a cat Assistant : {slots[0]}",
        f"User : what is in the image ? Assistant : {slots[1]}",
        f"User : Assistant : {slots[0]}",
        f"User : Assistant : {slots[1]}",
    ]
    # The null chat is what training's text dropout leaves of the same chat (expanded alike).
    step = prepared(
        model, processor, SetokimChatCollator(processor)([text_to_image(cat, "a cat")]), diffusion(model, text=1.0)
    )
    trained = words(processor, step.model_kwargs["input_ids"][0])
    assert trained[: trained.index("[Img]")] == rows[2].split()[: rows[2].split().index("[Img]")]
    # The length is the conditional prompt's; the tokens move; the same generator repeats them.
    assert [len(t) for t in guided.image_tokens] == [len(t) for t in plain.image_tokens]
    assert all(not torch.allclose(g, p) for g, p in zip(guided.image_tokens, plain.image_tokens))
    again = pipe(PROMPTS, guidance_scale=4.0, generator=torch.Generator().manual_seed(12), **KWARGS)
    assert all(torch.equal(a, b) for a, b in zip(again.image_tokens, guided.image_tokens))
    other = pipe(PROMPTS, guidance_scale=4.0, generator=torch.Generator().manual_seed(13), **KWARGS)
    assert not torch.allclose(other.image_tokens[0][:1], guided.image_tokens[0][:1])


def test_guidance_combines_the_head_predictions_of_both_rows_at_every_step(model, processor):
    """The denoising loop with guidance: each step's prediction is `uncond + s (cond - uncond)` of the head's two
    predictions on the same sample; rebuilt by hand from the head and the scheduler."""
    pipe = pipeline(model, processor)
    condition = torch.randn(2, 3, 32)  # (cond, uncond) x 3 tokens
    drawn = pipe._denoise(
        condition, 48, 4, torch.Generator().manual_seed(0), guide=lambda c, u: classifier_free_guidance(u, c, 2.0)
    )
    scheduler = noise_scheduler_for(model.config)
    scheduler.set_timesteps(4)
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(3, 48, generator=generator)
    for t in scheduler.timesteps:
        cond = model.run_generation_head(sample, t, condition[0])
        uncond = model.run_generation_head(sample, t, condition[1])
        sample = scheduler.step(uncond + 2.0 * (cond - uncond), t, sample, generator=generator).prev_sample
    torch.testing.assert_close(drawn, sample)


def test_guidance_on_an_overfit_model_separates_the_prompts_and_keeps_their_images(processor, photos, tmp_path):
    """Two prompts, two images of the same token count, learnt with the text dropped 30 % of the time. The null
    chat, the same for both prompts, learns what the two share: guidance 0 draws one and the same sample for both;
    guidance 1 draws each prompt's own image; guidance 3 pushes the two further apart, each still nearest its own.
    (Closer to its image than guidance 1 it cannot be: where the conditional prediction is right, extrapolating
    past it moves away.)"""
    torch.manual_seed(0)
    model = tiny_setokim(processor, use_generation_head=True)
    images = [ImageOps.invert(Image.fromarray(photos[name])) for name in ("chelsea", "astronaut")]
    records = [text_to_image(image, prompt) for image, prompt in zip(images, PROMPTS)]
    pixel_values = processor.image_processor(images, return_tensors="pt")["pixel_values"]
    setok = model.model.vision_tower(pixel_values)
    # The same length, so the null condition cannot tell the images apart by it (17 each with this seed's SeTok).
    assert setok.num_tokens.tolist() == [17, 17]
    targets = setok.last_hidden_state.detach()
    trainer = pretrain_trainer_for(
        model,
        processor,
        records,
        tmp_path,
        train_generation_head=True,
        weight_decay=0.0,
        max_steps=400,
        learning_rate=1e-2,
        train_language_model=True,
        diffusion_noise_repeats=32,
        lr_scheduler_type="constant",
        logging_steps=100,
        condition_text_dropout=0.3,
    )
    trainer.train()
    model.eval()
    pipe = pipeline(model, processor)

    def draws(scale):
        return [
            pipe(
                prompt, num_inference_steps=50, guidance_scale=scale, generator=torch.Generator().manual_seed(0)
            ).image_tokens[0]
            for prompt in PROMPTS
        ]

    def error(drawn, image):
        return float((drawn - targets[image]).pow(2).mean())

    null, plain, guided = draws(0.0), draws(1.0), draws(3.0)
    assert all(len(tokens) == 17 for tokens in null + plain + guided)  # the length: the prompt's, learnt
    # (Equal up to rounding: each null row is padded to its own prompt's length.)
    torch.testing.assert_close(null[0], null[1], atol=1e-4, rtol=1e-4)
    for drawn in (plain, guided):
        for own, other in ((0, 1), (1, 0)):
            assert error(drawn[own], own) < 0.75 * error(drawn[own], other), (own, error(drawn[own], own))
    separation = {name: float((a - b).pow(2).mean()) for name, (a, b) in (("plain", plain), ("guided", guided))}
    assert separation["guided"] > 2 * separation["plain"], separation


def test_stage_three_drops_the_condition_of_an_edit_and_trains(processor, cat, cup, tmp_path):
    """The SFT trainer shares the settings (`SetokimInputsMixin` attributes): an edit next to a text-to-image chat,
    everything dropped, trains through the model's own forward."""
    from test_sft_trainer import trainer_for as sft_trainer_for

    torch.manual_seed(0)
    model = tiny_setokim(processor, use_generation_head=True)
    records = [edit(cat, cup, "what is the cat ?"), text_to_image(cup, "a cat")]
    trainer = sft_trainer_for(model, processor, records, tmp_path, max_steps=1)
    trainer.condition_both_dropout = 1.0
    step = trainer.prepare_step(trainer.model, SetokimChatCollator(processor)(records), micro_batch=0).model_kwargs
    rows = [block(words(processor, ids, mask)) for ids, mask in zip(step["input_ids"], step["attention_mask"])]
    assert rows == ["User : Assistant : [Img]...[/Img] </s>"] * 2
    assert len(step["mm_encoder_outputs"]["image"].pooler_output) == 2  # the two targets; the source left
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logged and all(np.isfinite(entry["diffusion_loss"]) for entry in logged)
