"""The generation path: diffusion head, hidden image targets, stage-2 training of the head, text-to-image sampling."""

import numpy as np
import pytest
import torch
from conftest import (
    assert_accumulation_matches_one_batch,
    count_setok_calls,
    tiny_config,
    tiny_processor,
    tiny_setokim,
)
from conftest import trainer_for as pretrain_trainer_for
from PIL import Image
from transformers.modeling_outputs import BaseModelOutputWithPooling

from transformers_setok import (
    SetokForImageReconstruction,
    SetokimDiffusionHead,
    SetokimForConditionalGeneration,
    add_generation_head,
)
from transformers_setok.generation import noise_scheduler_for, revealed_counts
from transformers_setok.pipelines import SetokimTextToImagePipeline
from transformers_setok.training.collators import SetokimChatCollator
from transformers_setok.training.generation_targets import (
    image_target_flags,
    sample_hidden_tokens,
)
from transformers_setok.training.step_inputs import DiffusionSettings, prepare_step


@pytest.fixture
def processor():
    return tiny_processor()


@pytest.fixture
def model(processor):
    return tiny_setokim(processor, use_generation_head=True)


def text_to_image(image, caption):
    user = {"role": "user", "content": [{"type": "text", "text": caption}]}
    return {"images": [image], "messages": [user, {"role": "assistant", "content": [{"type": "image"}]}]}


def captioning(image, caption):
    user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is it ?"}]}
    return {
        "images": [image],
        "messages": [user, {"role": "assistant", "content": [{"type": "text", "text": caption}]}],
    }


@pytest.fixture
def records(photos):
    cat, cup = Image.fromarray(photos["chelsea"]), Image.fromarray(photos["coffee"])
    return [text_to_image(cat, "a cat"), captioning(cup, "a cup"), text_to_image(cup, "a cup"), captioning(cat, "a")]


def trainer_for(model, processor, records, tmp_path, **kwargs):
    """Stage 2 as test_pretrain_trainer builds it, training the head by default and without weight decay."""
    defaults = {"train_generation_head": True, "weight_decay": 0.0}
    return pretrain_trainer_for(model, processor, records, tmp_path, **{**defaults, **kwargs})


# --------------------------------------------------------------------------------------------------------------------
# The head


def test_fresh_head_predicts_zero_and_checks_shapes(model):
    head = model.generation_head
    assert isinstance(head, SetokimDiffusionHead)
    assert len(head.blocks) == 2 and head.input_proj.out_features == 48  # depth and width from the config
    noisy, condition = torch.randn(5, 48), torch.randn(5, 32)
    # Zero-initialised modulation and output layer: the usual DiT/MAR start.
    assert torch.equal(head(noisy, torch.arange(5), condition), torch.zeros(5, 48))
    assert head(noisy, torch.tensor(7), condition).shape == (5, 48)  # one timestep for all rows
    with pytest.raises(ValueError, match="same N"):
        head(noisy, torch.arange(5), torch.randn(4, 32))
    with pytest.raises(ValueError, match="`timesteps` must hold 1 or N=5"):
        head(noisy, torch.arange(3), condition)


def test_a_trained_head_depends_on_noise_timestep_and_condition(model):
    head = model.generation_head
    for parameter in head.parameters():
        torch.nn.init.normal_(parameter, std=0.1)
    noisy, condition, t = torch.randn(3, 48), torch.randn(3, 32), torch.tensor([1, 500, 999])
    base = head(noisy, t, condition)
    assert not torch.allclose(base, head(noisy + 1, t, condition))
    assert not torch.allclose(base, head(noisy, t + 1, condition))
    assert not torch.allclose(base, head(noisy, t, condition + 1))
    # Rows are independent: one row alone gives its row of the batch.
    torch.testing.assert_close(head(noisy[1:2], t[1:2], condition[1:2]), base[1:2])


def test_models_without_the_head_say_so(processor):
    model = tiny_setokim(processor)
    assert model.generation_head is None and model.image_decoder is None
    with pytest.raises(ValueError, match="no generation head"):
        model.decode_image_tokens(torch.randn(1, 3, 48), torch.tensor([3]))


# --------------------------------------------------------------------------------------------------------------------
# Hidden targets in the forward pass


def test_sample_hidden_tokens_hides_70_to_100_percent_of_each_image():
    counts = torch.tensor([1, 10, 40, 3])
    for seed in range(20):
        hidden = sample_hidden_tokens(counts, 0.7, torch.Generator().manual_seed(seed))
        per_image = [int(part.sum()) for part in hidden.split(counts.tolist())]
        for n, k in zip(counts.tolist(), per_image):
            assert max(1, round(0.7 * n)) <= k <= n
    everything = sample_hidden_tokens(counts, 1.0)
    assert bool(everything.all())
    with pytest.raises(ValueError, match="`mask_ratio_min`"):
        sample_hidden_tokens(counts, 1.5)


def _one_image_prompt(processor, n):
    """`x [Img] <image> x n [/Img]` as ids."""
    tokenizer = processor.tokenizer
    ids = tokenizer("a cat", add_special_tokens=False)["input_ids"]
    return torch.tensor([ids + [processor.boi_token_id] + [processor.image_token_id] * n + [processor.eoi_token_id]])


def test_hidden_tokens_keep_the_mask_embedding_and_leak_nothing(model, processor):
    n = 5
    input_ids = _one_image_prompt(processor, n)
    start = input_ids.shape[1] - n - 1
    hidden = torch.zeros_like(input_ids, dtype=torch.bool)
    hidden[0, [start + 1, start + 3, start + 4]] = True
    visible = torch.randn(2, 32)

    def run(visible_features):
        features = BaseModelOutputWithPooling(pooler_output=[visible_features])
        return model.model(input_ids=input_ids, masked_image_tokens=hidden, mm_encoder_outputs={"image": features})

    outputs = run(visible)
    # The same sequence written by hand: the `<image>` row where a token is hidden, the features elsewhere in order.
    embeddings = model.get_input_embeddings()(input_ids).clone()
    embeddings[0, [start, start + 2]] = visible
    manual = model.model(inputs_embeds=embeddings)
    torch.testing.assert_close(outputs.last_hidden_state, manual.last_hidden_state)
    # Changing the visible tokens changes the hidden positions' states; nothing of a hidden token exists to leak.
    assert not torch.allclose(run(visible + 1).last_hidden_state[hidden], outputs.last_hidden_state[hidden])
    with pytest.raises(ValueError, match="Image features and image tokens do not match"):
        run(torch.randn(3, 32))
    with pytest.raises(ValueError, match="may only mark `<image>` positions"):
        model.model(input_ids=input_ids, masked_image_tokens=torch.ones_like(hidden))


def test_prediction_row_r_times_n_plus_j_uses_the_jth_hidden_state(model, processor):
    for parameter in model.generation_head.parameters():
        torch.nn.init.normal_(parameter, std=0.1)
    input_ids = _one_image_prompt(processor, 3)
    hidden = input_ids == processor.image_token_id  # all three hidden
    noisy, timesteps = torch.randn(6, 48), torch.randint(0, 1000, (6,))
    outputs = model(
        input_ids=input_ids, masked_image_tokens=hidden, noisy_image_tokens=noisy, diffusion_timesteps=timesteps
    )
    states = model.model(input_ids=input_ids, masked_image_tokens=hidden).last_hidden_state[hidden]
    torch.testing.assert_close(
        outputs.diffusion_prediction, model.generation_head(noisy, timesteps, states.repeat(2, 1))
    )
    with pytest.raises(ValueError, match="R rows per masked image token"):
        model(
            input_ids=input_ids,
            masked_image_tokens=hidden,
            noisy_image_tokens=noisy[:5],
            diffusion_timesteps=timesteps[:5],
        )
    with pytest.raises(ValueError, match="together"):
        model(input_ids=input_ids, masked_image_tokens=hidden, noisy_image_tokens=noisy)


def test_diffusion_inputs_of_a_mixed_batch(model, processor, records):
    batch = SetokimChatCollator(processor)(records)
    flags = image_target_flags(batch, processor.image_token_id)
    assert flags.tolist() == [True, False, True, False]
    model.model.vision_tower.requires_grad_(False)
    scheduler = noise_scheduler_for(model.config)
    step = prepare_step(model, batch, processor, diffusion=DiffusionSettings(scheduler, noise_repeats=3))
    inputs = step.model_kwargs
    with torch.no_grad():
        features = model.get_image_features(batch["pixel_values"])
    counts = [len(tokens) for tokens in features.pooler_output]
    hidden = inputs["masked_image_tokens"]
    num_hidden = int(hidden.sum())
    # Only target images hide tokens, 70-100 % of each; their visible rest is what the features still hold.
    assert bool((inputs["input_ids"][hidden] == processor.image_token_id).all())
    assert bool((inputs["labels"][hidden] == processor.image_token_id).all())
    visible = [len(tokens) for tokens in inputs["mm_encoder_outputs"]["image"].pooler_output]
    assert visible[1] == counts[1] and visible[3] == counts[3]
    assert sum(counts) - sum(visible) == num_hidden
    for image in (0, 2):
        assert max(1, round(0.7 * counts[image])) <= counts[image] - visible[image] <= counts[image]
    assert inputs["noisy_image_tokens"].shape == step.diffusion.target.shape == (3 * num_hidden, 48)
    assert step.diffusion.num_target_tokens == counts[0] + counts[2]
    # The hidden SeTok tokens (before the projector) are the clean samples: the velocity target and x_t give them
    # back, x0 = sqrt(abar) x_t - sqrt(1 - abar) v.
    tokens = torch.cat([features.last_hidden_state[i, : counts[i]] for i in (0, 2)])
    is_hidden = hidden[inputs["labels"] == processor.image_token_id]
    clean = tokens[is_hidden].repeat(3, 1)
    abar = scheduler.alphas_cumprod[inputs["diffusion_timesteps"]][:, None]
    recovered = abar.sqrt() * inputs["noisy_image_tokens"] - (1 - abar).sqrt() * step.diffusion.target
    torch.testing.assert_close(recovered, clean, atol=1e-5, rtol=1e-4)
    scaled = prepare_step(model, batch, processor, diffusion=DiffusionSettings(scheduler, token_scale=10.0))
    abar = scheduler.alphas_cumprod[scaled.model_kwargs["diffusion_timesteps"]][:, None]
    recovered = abar.sqrt() * scaled.model_kwargs["noisy_image_tokens"] - (1 - abar).sqrt() * scaled.diffusion.target
    is_hidden = scaled.model_kwargs["masked_image_tokens"][scaled.model_kwargs["labels"] == processor.image_token_id]
    assert float(recovered.abs().mean()) == pytest.approx(10 * float(tokens[is_hidden].abs().mean()), rel=0.2)


def test_a_step_runs_setok_once_per_image(model, processor, records, tmp_path, monkeypatch):
    """Two accumulated micro-batches with images to draw and to read: SeTok's forward runs once per micro-batch (on
    all of its images), for the loss normaliser's count and the loss alike."""
    calls = count_setok_calls(model, monkeypatch)
    trainer = trainer_for(model, processor, records, tmp_path, per_device_train_batch_size=2)
    calls.clear()  # the token-scale estimate at set-up runs SeTok on the training images once
    batches = iter([SetokimChatCollator(processor)(records[:2]), SetokimChatCollator(processor)(records[2:])])
    prepared, _ = trainer.get_batch_samples(batches, 2, torch.device("cpu"))
    for step in prepared:
        trainer.compute_loss(model, step)
    assert calls == [2, 2]


# --------------------------------------------------------------------------------------------------------------------
# Stage 2


def snapshot(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def test_stage_two_trains_the_head_projector_and_new_rows_only(model, processor, records, tmp_path):
    before = snapshot(model)
    trainer = trainer_for(model, processor, records, tmp_path, per_device_train_batch_size=2)
    trainer.train()
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    head = {f"generation_head.{name}" for name, _ in model.generation_head.named_parameters()}
    projector = {
        f"model.multi_modal_projector.{name}" for name, _ in model.model.multi_modal_projector.named_parameters()
    }
    rows = {"model.language_model.embed_tokens.weight", "lm_head.weight"}
    assert trainable == head | projector | rows
    # Everything else (SeTok, its detokenizer, the LLM's layers) is bit-identical; the zero-initialised gates keep
    # some head parameters still for the first steps, but the output layer and the modulations move.
    assert changed <= trainable
    assert {"generation_head.output.linear.weight", "generation_head.blocks.0.modulation.1.weight"} <= changed
    assert projector | rows <= changed
    new = [processor.image_token_id, processor.boi_token_id, processor.eoi_token_id]
    old = [i for i in range(len(processor.tokenizer)) if i not in new]
    for name in ("model.language_model.embed_tokens.weight", "lm_head.weight"):
        assert torch.equal(dict(model.named_parameters())[name][old], before[name][old])
    # The mask embedding is the `<image>` row: text-to-image trains it (it is an input of every hidden token).
    image_row = model.get_input_embeddings().weight[processor.image_token_id]
    assert not torch.equal(image_row, before["model.language_model.embed_tokens.weight"][processor.image_token_id])
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert all(np.isfinite(entry["diffusion_loss"]) for entry in logged)


def test_the_head_stays_frozen_without_the_flag(model, processor, records, tmp_path):
    before = snapshot(model)
    trainer_for(model, processor, records, tmp_path, train_generation_head=False).train()
    assert all(torch.equal(p, before[f"generation_head.{n}"]) for n, p in model.generation_head.named_parameters())


def test_generation_needs_a_head(processor, records, tmp_path):
    with pytest.raises(ValueError, match="needs a model with a generation head"):
        trainer_for(tiny_setokim(processor), processor, records, tmp_path)
    trainer = trainer_for(tiny_setokim(processor), processor, records, tmp_path, train_generation_head=False)
    with pytest.raises(ValueError, match="images in assistant turns .* no generation head"):
        trainer.train()
    for bad in (dict(generation_mask_ratio_min=1.5), dict(diffusion_noise_repeats=0)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            trainer_for(tiny_setokim(processor, use_generation_head=True), processor, records, tmp_path, **bad)


@pytest.mark.parametrize("pair", [(0, 1), (0, 2)], ids=["drawn+captioned", "drawn+drawn"])
def test_gradient_accumulation_gives_the_diffusion_loss_of_the_whole_batch(
    processor, records, tmp_path, monkeypatch, pair
):
    """bs 2 == 2 x bs 1 accumulated, on a text-to-image chat next to a captioning one: the LM loss counts the image's
    target tokens (which the collated batch does not show) and the diffusion loss is a mean over the target tokens of
    the whole accumulated batch. The random draws are made equal: every token hidden, one fixed noise and timestep."""
    from transformers_setok.training import step_inputs

    def fixed(clean, num_train_timesteps, generator=None):
        return torch.linspace(-1, 1, clean.shape[-1]).expand_as(clean), torch.full((len(clean),), 321)

    monkeypatch.setattr(step_inputs, "draw_noise", fixed)

    def first_step(**kwargs):
        torch.manual_seed(0)
        model = tiny_setokim(processor, use_generation_head=True)
        for parameter in model.generation_head.parameters():
            torch.nn.init.normal_(parameter, std=0.05)
        trainer = trainer_for(
            model,
            processor,
            [records[i] for i in pair],
            tmp_path,
            max_steps=1,
            generation_mask_ratio_min=1.0,
            **kwargs,
        )
        trainer.train()
        return trainer.state.log_history[0]

    assert_accumulation_matches_one_batch(first_step)


def test_the_loss_normaliser_counts_every_target_token_of_the_drawn_images(model, processor, records, tmp_path):
    """The Trainer counts the labels of the collated batch, where an image to draw is one placeholder; the count must
    be the expanded batch's (the image's `[Img]`, tokens and `[/Img]`), which the model's loss sums over."""
    trainer = trainer_for(model, processor, records, tmp_path)
    batches = [SetokimChatCollator(processor)(records[:2]), SetokimChatCollator(processor)(records[2:])]
    prepared, counted = trainer.get_batch_samples(iter(batches), 2, torch.device("cpu"))
    expanded = [step.model_kwargs["labels"] for step in prepared]
    assert int(counted) == sum(int(labels[:, 1:].ne(-100).sum()) for labels in expanded)
    with torch.no_grad():
        counts = [
            len(tokens)
            for batch in batches
            for tokens in model.get_image_features(batch["pixel_values"]).pooler_output
        ]
    # the two drawn images' tokens, the step's total on every micro-batch that draws
    assert [step.diffusion.step_target_tokens for step in prepared] == [counts[0] + counts[2]] * 2


def test_resuming_gives_the_same_later_losses(processor, records, tmp_path):
    kwargs = dict(max_steps=4, save_strategy="steps", save_steps=2)
    torch.manual_seed(0)
    straight = trainer_for(
        tiny_setokim(processor, use_generation_head=True), processor, records, tmp_path / "a", **kwargs
    )
    straight.train()
    torch.manual_seed(1)
    resumed = trainer_for(
        tiny_setokim(processor, use_generation_head=True), processor, records, tmp_path / "b", **kwargs
    )
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))

    def losses(trainer):
        return [
            (entry["loss"], entry.get("diffusion_loss", 0)) for entry in trainer.state.log_history if "loss" in entry
        ]

    np.testing.assert_allclose(losses(resumed)[-2:], losses(straight)[2:], rtol=1e-5)


def test_resuming_mid_epoch_repeats_the_uninterrupted_step(processor, photos, tmp_path):
    """Resumed inside an epoch, the Trainer restores the checkpoint's RNG state only after it has fetched (and the
    trainer prepared) the first resumed step: the head's masks and noise must not come from the global RNG."""
    cat, cup = Image.fromarray(photos["chelsea"]), Image.fromarray(photos["coffee"])
    drawn = [text_to_image(cat, "a cat"), text_to_image(cup, "a cup")] * 2
    kwargs = dict(max_steps=2, per_device_train_batch_size=1, save_strategy="steps", save_steps=1)

    def run(seed, name, **train_kwargs):
        torch.manual_seed(seed)
        trainer = pretrain_trainer_for(
            tiny_setokim(processor, use_generation_head=True), processor, drawn, tmp_path / name, **kwargs
        )
        trainer.train(**train_kwargs)
        log = [entry for entry in trainer.state.log_history if "loss" in entry][-1]
        return (log["step"], log["loss"], log["diffusion_loss"]), snapshot(trainer.model)

    straight, straight_weights = run(0, "a")
    resumed, resumed_weights = run(1, "b", resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-1"))
    assert resumed == straight
    for name, weight in straight_weights.items():
        assert torch.equal(resumed_weights[name], weight), name


def test_diffusion_draws_are_seeded_from_the_step_and_leave_the_global_rng_alone(model, processor, records, tmp_path):
    trainer = pretrain_trainer_for(model, processor, records, tmp_path)

    def draws(micro_batch):
        return torch.rand(8, generator=trainer._diffusion_generator(micro_batch))

    first = draws(0)
    torch.manual_seed(123)
    rng = torch.get_rng_state()
    assert torch.equal(draws(0), first), "the same step and micro-batch draw alike, whatever the global RNG"
    assert torch.equal(torch.get_rng_state(), rng), "the global RNG (dropout's) is not drawn from"
    assert not torch.equal(draws(1), first), "each micro-batch of a step draws its own"
    trainer.state.global_step = 1
    assert not torch.equal(draws(0), first), "each step draws its own"
    trainer.args.seed = 1
    trainer.state.global_step = 0
    assert not torch.equal(draws(0), first), "the run's seed changes the draws"


def test_every_evaluation_draws_the_same_masks_and_noise(model, processor, records, tmp_path):
    """An evaluation's draws depend on the batch's place in it only: the same weights give the same loss later."""
    trainer = pretrain_trainer_for(model, processor, records, tmp_path)

    def losses():
        metrics = trainer.evaluate(eval_dataset=records)
        return metrics["eval_loss"], metrics["eval_diffusion_loss"]

    first = losses()
    torch.manual_seed(7)
    trainer.state.global_step = 5
    assert losses() == first


# --------------------------------------------------------------------------------------------------------------------
# Sampling


def test_revealed_counts_follow_the_cosine_schedule():
    assert revealed_counts(10, 4) == [1, 3, 7, 10]  # 10 - floor(10 cos(pi/2 k/4)): 10-9, 10-7, 10-3, 10-0
    assert revealed_counts(3, 8) == [1, 2, 3, 3, 3, 3, 3, 3]  # at least one more per round until all are drawn
    for n, rounds in ((1, 1), (7, 3), (64, 8)):
        counts = revealed_counts(n, rounds)
        assert counts[-1] == n and all(b >= a for a, b in zip(counts, counts[1:]))


def test_pipeline_draws_reproducible_images(model, processor):
    for parameter in model.generation_head.parameters():
        torch.nn.init.normal_(parameter, std=0.05)
    pipe = SetokimTextToImagePipeline(model=model, processor=processor, scheduler=noise_scheduler_for(model.config))
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(num_inference_steps=5, num_unmasking_rounds=3, max_image_tokens=6)
    first = pipe(["a cat", "a cup"], generator=torch.Generator().manual_seed(0), **kwargs)
    again = pipe(["a cat", "a cup"], generator=torch.Generator().manual_seed(0), **kwargs)
    assert len(first.images) == 2 and all(image.size == (32, 32) for image in first.images)
    for a, b in zip(first.image_tokens, again.image_tokens):
        assert 1 <= len(a) <= 6
        torch.testing.assert_close(a, b)
    other = pipe(["a cat", "a cup"], generator=torch.Generator().manual_seed(1), **kwargs)
    assert not torch.allclose(other.image_tokens[0], first.image_tokens[0])
    pixels = pipe("a cat", output_type="pt", generator=torch.Generator().manual_seed(0), **kwargs).images
    assert pixels.shape == (1, 3, 32, 32)
    # What the pipeline returns is the decoder's image of its tokens.
    expected = model.decode_image_tokens(first.image_tokens[0][None], torch.tensor([len(first.image_tokens[0])]))
    assert np.array_equal(np.asarray(first.images[0]), np.asarray(processor.image_processor.postprocess(expected)[0]))
    greedy = pipe("a cat", sample_length=False, **kwargs).image_tokens[0]
    assert len(greedy) == len(pipe("a cat", sample_length=False, **kwargs).image_tokens[0])  # no randomness in n
    with pytest.raises(ValueError, match="`num_unmasking_rounds`"):
        pipe("a cat", num_unmasking_rounds=0)
    with pytest.raises(ValueError, match="`generator` must be one torch.Generator"):
        pipe("a cat", generator=[torch.Generator()])
    with pytest.raises(ValueError, match="`output_type`"):
        pipe("a cat", output_type="np")


def test_an_overfit_model_draws_its_training_image(processor, photos, tmp_path):
    """One text-to-image pair learnt by heart: the pipeline then writes exactly as many tokens as SeTok gives that
    image, and draws tokens close to SeTok's (an untrained head would draw about zero)."""
    torch.manual_seed(0)
    model = tiny_setokim(processor, use_generation_head=True)
    record = text_to_image(Image.fromarray(photos["chelsea"]), "a cat")
    trainer = trainer_for(
        model,
        processor,
        [record],
        tmp_path,
        max_steps=100,
        learning_rate=1e-2,
        train_language_model=True,
        diffusion_noise_repeats=64,
        lr_scheduler_type="constant",
    )
    trainer.train()
    assert model.config.generation_token_scale > 1  # tiny SeTok tokens: the head sees them scaled to unit variance
    model.eval()
    pixel_values = processor.image_processor([record["images"][0]], return_tensors="pt")["pixel_values"]
    setok = model.model.vision_tower(pixel_values)
    target = setok.last_hidden_state[0, : int(setok.num_tokens[0])]

    pipe = SetokimTextToImagePipeline(model=model, processor=processor, scheduler=noise_scheduler_for(model.config))
    pipe.set_progress_bar_config(disable=True)
    drawn = pipe("a cat", num_inference_steps=50, generator=torch.Generator().manual_seed(0)).image_tokens[0]
    assert drawn.shape == target.shape
    error = (drawn - target).pow(2).mean()
    assert error < 0.5 * target.pow(2).mean(), (float(error), float(target.pow(2).mean()))


def test_the_sampler_recovers_the_tokens_an_exact_head_describes(model, processor):
    """With a head that returns the exact velocity of known tokens, the denoising loop lands on them: the loop, the
    scheduler and the scaling are right, whatever a trained head's accuracy."""
    scheduler = noise_scheduler_for(model.config)
    clean = torch.randn(5, 48)
    abar = scheduler.alphas_cumprod

    class ExactHead(torch.nn.Module):
        def forward(self, noisy, t, condition):
            a = abar[int(t)]
            noise = (noisy - a.sqrt() * clean) / (1 - a).sqrt()
            return a.sqrt() * noise - (1 - a).sqrt() * clean

    model.generation_head = ExactHead()
    pipe = SetokimTextToImagePipeline(model=model, processor=processor, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    for steps in (10, 100):
        drawn = pipe._denoise(torch.zeros(5, 32), 48, steps, torch.Generator().manual_seed(0))
        torch.testing.assert_close(drawn, clean, atol=1e-3, rtol=1e-3)


# --------------------------------------------------------------------------------------------------------------------
# Adding a head to a trained model, saving and loading


def test_add_generation_head_takes_the_stage_one_detokenizer(processor, tmp_path):
    setok = SetokForImageReconstruction(tiny_config())
    setok.save_pretrained(tmp_path / "setok")
    model = tiny_setokim(processor)
    model.model.vision_tower.load_state_dict(setok.model.state_dict())
    add_generation_head(model, str(tmp_path / "setok"), width=40, depth=1)
    assert model.config.use_generation_head and model.generation_head.input_proj.out_features == 40
    for name, value in setok.detokenizer.state_dict().items():
        torch.testing.assert_close(model.image_decoder.state_dict()[name], value)
    assert torch.equal(model.generation_head.output.linear.weight, torch.zeros(48, 40))
    with pytest.raises(ValueError, match="already has a generation head"):
        add_generation_head(model, str(tmp_path / "setok"))

    for parameter in model.generation_head.parameters():
        torch.nn.init.normal_(parameter, std=0.05)
    model.save_pretrained(tmp_path / "setokim")
    reloaded = SetokimForConditionalGeneration.from_pretrained(tmp_path / "setokim")
    assert reloaded.config.generation_head_width == 40
    noisy, t, condition = torch.randn(4, 48), torch.arange(4), torch.randn(4, 32)
    torch.testing.assert_close(
        reloaded.generation_head(noisy, t, condition), model.generation_head(noisy, t, condition)
    )
    tokens = torch.randn(1, 3, 48)
    torch.testing.assert_close(
        reloaded.decode_image_tokens(tokens, torch.tensor([3])), model.decode_image_tokens(tokens, torch.tensor([3]))
    )

    SetokForImageReconstruction(tiny_config()).model.save_pretrained(tmp_path / "encoder-only")
    with pytest.raises(ValueError, match="no trained detokenizer"):
        add_generation_head(tiny_setokim(processor), str(tmp_path / "encoder-only"))


def test_the_model_card_says_whether_the_model_draws(processor, model):
    from transformers_setok.hub.model_card import render_setokim_card

    card = render_setokim_card(model.config, name="tiny", repo="me/tiny", provenance="")
    assert "It also draws images" in card and "2 adaLN blocks of width 48" in card
    assert "draws images" not in render_setokim_card(
        tiny_setokim(processor).config, name="t", repo="me/t", provenance=""
    )
