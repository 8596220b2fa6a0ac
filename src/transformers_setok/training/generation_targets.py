"""Training inputs of the generation head: which image tokens are hidden, and what the head must denoise (spec 2).

An image inside an assistant turn is a target: the LLM must write `[Img]`, its n tokens and `[/Img]`. For each target
image (after `encode_and_expand`, so SeTok has run and n is known):

    mask ratio r ~ U[mask_ratio_min, 1]       MAR's 70-100 %: k = round(r * n) tokens, at least one, chosen at random
    hidden tokens                              keep the `<image>` embedding (the mask) as LLM input; the others get
                                               their projected SeTok token, as in understanding
    each hidden token x0 (SeTok width)         scaled by `config.generation_token_scale` (unit variance, see
                                               `estimate_token_scale`), then R noise draws: t ~ U{0..T-1},
                                               eps ~ N(0, I), x_t = add_noise(x0, eps, t); the target is the
                                               velocity get_velocity(x0, eps, t) (or eps)

The model conditions its head on the LLM's hidden state at each hidden position and returns its prediction; the
trainer's loss is the MSE against the target. The schedule is a diffusers scheduler built from the model's config, the same
one `transformers_setok.pipelines.SetokimTextToImagePipeline` samples with (`transformers_setok.generation`).
"""

from collections.abc import Mapping

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

__all__ = ["add_diffusion_inputs", "estimate_token_scale", "image_target_flags", "sample_hidden_tokens"]


@torch.no_grad()
def estimate_token_scale(model, records, collator, max_images: int = 64, batch_size: int = 8) -> float:
    """1 / std of the SeTok tokens of the first `max_images` images of `records` (in order, so every process and a
    resumed run get the same value): the factor that brings the head's targets to unit variance."""
    tower = model.model.vision_tower
    total = squares = count = 0.0
    batch, seen = [], 0
    for record in records:
        if seen >= max_images:
            break
        images = record.get("images") or ([record["image"]] if record.get("image") is not None else [])
        for image in images[: max_images - seen]:
            batch.append(image)
            seen += 1
        if len(batch) >= batch_size or seen >= max_images:
            total, squares, count = _accumulate(tower, collator, batch, total, squares, count)
            batch = []
    if batch:
        total, squares, count = _accumulate(tower, collator, batch, total, squares, count)
    if count == 0:
        raise ValueError("No image to estimate the generation token scale from.")
    variance = squares / count - (total / count) ** 2
    if not variance > 0:
        raise ValueError("SeTok's tokens of the training images are constant: no scale brings them to unit variance.")
    return float(variance**-0.5)


def _accumulate(tower, collator, images, total, squares, count):
    pixel_values = collator.processor.image_processor(images, return_tensors="pt")["pixel_values"]
    was_training = tower.training
    tower.eval()
    try:
        encoded = tower(pixel_values.to(tower.device))
    finally:
        tower.train(was_training)
    tokens = encoded.last_hidden_state[encoded.attention_mask.bool()].double()
    return total + float(tokens.sum()), squares + float(tokens.pow(2).sum()), count + tokens.numel()


def image_target_flags(batch: Mapping[str, torch.Tensor], image_token_id: int) -> torch.Tensor:
    """`(P,)` bool, one entry per image placeholder of a collated (not yet expanded) batch, in placeholder order: True
    where the placeholder is a target (the collator labels a placeholder inside an assistant turn with its own id)."""
    input_ids = batch["input_ids"]
    real = batch.get("attention_mask", torch.ones_like(input_ids)).bool()
    placeholders = (input_ids == image_token_id) & real
    labels = batch.get("labels")
    if labels is None:
        return torch.zeros(int(placeholders.sum()), dtype=torch.bool, device=input_ids.device)
    return labels[placeholders] == image_token_id


def sample_hidden_tokens(
    counts: torch.Tensor, mask_ratio_min: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """For images of `counts` `(M,)` tokens: a flat `(sum(counts),)` bool, image after image, True on the tokens to
    hide. Each image hides round(r * n) of its n tokens (at least one), r ~ U[mask_ratio_min, 1], at random places."""
    if not 0.0 <= mask_ratio_min <= 1.0:
        raise ValueError(f"`mask_ratio_min` must lie in [0, 1], got {mask_ratio_min}.")
    device = counts.device
    ratios = mask_ratio_min + (1.0 - mask_ratio_min) * torch.rand(len(counts), generator=generator).to(device)
    num_hidden = (ratios * counts).round().long().clamp(min=1)
    num_hidden = torch.minimum(num_hidden, counts)
    image = torch.repeat_interleave(torch.arange(len(counts), device=device), counts)
    scores = torch.rand(len(image), generator=generator, dtype=torch.float64).to(device)
    # Sorting by (image, random score) shuffles each image's tokens in place; a token's rank inside its image then
    # decides whether it is among the first k.
    order = torch.argsort(image.double() * 2 + scores)
    starts = counts.cumsum(0) - counts
    rank = torch.empty_like(image)
    rank[order] = torch.arange(len(image), device=device) - starts[image[order]]
    return rank < num_hidden[image]


def add_diffusion_inputs(
    expanded: Mapping,
    image_is_target: torch.Tensor,
    *,
    image_token_id: int,
    scheduler,
    token_scale: float = 1.0,
    mask_ratio_min: float = 0.7,
    noise_repeats: int = 4,
    generator: torch.Generator | None = None,
) -> dict:
    """Adds to an expanded batch (see `encode_and_expand`) the generation head's inputs for its target images.

    `generator` (a CPU `torch.Generator`) draws the masks, noise and timesteps; the global RNG when None.
    `image_is_target` `(P,)` (from `image_target_flags`) says which images are targets; the targets are the hidden
    SeTok tokens times `token_scale`. Returns a new dict with:
    `masked_image_tokens` `(B, T)`, the target images' features removed from `mm_encoder_outputs` at hidden
    positions, `noisy_image_tokens` `(R * N, token_dim)`, `diffusion_timesteps` `(R * N,)` and `diffusion_target`
    (what the head must predict, after the scheduler's `prediction_type`) and `diffusion_weights` `(R * N,)`: n_i /
    (k_i R) for a row of image i (n_i tokens, k_i hidden), so that a weighted sum of the rows' errors counts each
    target token once; pop both before calling the model. N is the number of hidden tokens, R `noise_repeats`.
    """
    if noise_repeats < 1:
        raise ValueError(f"`noise_repeats` must be a positive integer, got {noise_repeats}.")
    features = expanded["mm_encoder_outputs"]["image"]
    projected = list(features.pooler_output)
    counts = torch.tensor([len(tokens) for tokens in projected], device=image_is_target.device)
    if len(image_is_target) != len(counts):
        raise ValueError(f"{len(image_is_target)} target flags for {len(counts)} images.")
    target_positions = expanded["labels"] == image_token_id  # target `<image>` tokens, row-major = image order
    target_counts = counts[image_is_target]
    if int(target_positions.sum()) != int(target_counts.sum()):
        raise ValueError(
            f"The expanded labels mark {int(target_positions.sum())} image targets, the target images have "
            f"{int(target_counts.sum())} tokens."
        )
    hidden = sample_hidden_tokens(target_counts.cpu(), mask_ratio_min, generator).to(target_positions.device)
    masked_image_tokens = torch.zeros_like(target_positions)
    masked_image_tokens[target_positions] = hidden

    setok_tokens = features.last_hidden_state  # (P, L_max, token_dim), before the projector: what the head draws
    target_images = image_is_target.nonzero().flatten().tolist()
    clean = torch.cat([setok_tokens[i, : int(counts[i])] for i in target_images])[hidden.to(setok_tokens.device)]
    hidden_per_image = dict(zip(target_images, hidden.split(target_counts.tolist())))
    per_image = torch.stack([part.sum() for part in hidden_per_image.values()])
    image_of_row = torch.repeat_interleave(torch.arange(len(per_image), device=per_image.device), per_image)
    weights = (target_counts.to(per_image.device) / per_image)[image_of_row].float().repeat(noise_repeats)
    weights = weights / noise_repeats
    visible = [
        tokens[~hidden_per_image[i].to(tokens.device)] if i in hidden_per_image else tokens
        for i, tokens in enumerate(projected)
    ]

    clean = (clean.float() * token_scale).repeat(noise_repeats, 1)
    noise, timesteps = draw_noise(clean, scheduler.config.num_train_timesteps, generator)
    batch = dict(expanded)
    batch["mm_encoder_outputs"] = {
        **expanded["mm_encoder_outputs"],
        "image": BaseModelOutputWithPooling(last_hidden_state=setok_tokens, pooler_output=visible),
    }
    batch.update(
        masked_image_tokens=masked_image_tokens,
        noisy_image_tokens=scheduler.add_noise(clean, noise, timesteps),
        diffusion_timesteps=timesteps,
        diffusion_target=_prediction_target(scheduler, clean, noise, timesteps),
        diffusion_weights=weights.to(clean.device),
    )
    return batch


def draw_noise(clean: torch.Tensor, num_train_timesteps: int, generator=None) -> tuple[torch.Tensor, torch.Tensor]:
    """eps ~ N(0, I) like `clean` `(M, D)`, and a timestep ~ U{0..T-1} per row."""
    noise = torch.randn(clean.shape, generator=generator).to(clean.device)
    timesteps = torch.randint(0, num_train_timesteps, (len(clean),), generator=generator).to(clean.device)
    return noise, timesteps


def _prediction_target(scheduler, clean, noise, timesteps):
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(clean, noise, timesteps)
    raise ValueError(f"The generation head predicts 'epsilon' or 'v_prediction', not {kind!r}.")
