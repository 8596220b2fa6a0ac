"""Training inputs of the generation head: which image tokens are hidden, and what the head must denoise (spec 2).

An image inside an assistant turn is a target: the LLM must write `[Img]`, its n tokens and `[/Img]`. For each target
image (`step_inputs.prepare_step` puts these pieces together once SeTok has run and n is known):

    mask ratio r ~ U[mask_ratio_min, 1]       MAR's 70-100 %: k = round(r * n) tokens, at least one, chosen at random
    hidden tokens                              keep the `<image>` embedding (the mask) as LLM input; the others get
                                               their projected SeTok token, as in understanding
    each hidden token x0 (SeTok width)         scaled by `config.generation_token_scale` (unit variance, see
                                               `estimate_token_scale`), then R noise draws: t ~ U{0..T-1},
                                               eps ~ N(0, I), x_t = add_noise(x0, eps, t); the target is the
                                               velocity get_velocity(x0, eps, t) (or eps)

The model conditions its head on the LLM's hidden state at each hidden position and returns its prediction; the
trainer's loss is the MSE against the target. For classifier-free guidance a drawing sample's condition is sometimes
dropped before all this (`ConditionDropout`: its user text, an edit's source image, or both, removed from the chat),
so the head also learns the null condition the sampler's unconditional pass reads. The schedule is a diffusers scheduler built from the model's config, the same
one `transformers_setok.pipelines.SetokimTextToImagePipeline` samples with (`transformers_setok.generation`).
"""

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

__all__ = [
    "ConditionDropout",
    "draw_condition_drops",
    "draw_noise",
    "estimate_token_scale",
    "image_target_flags",
    "prediction_target",
    "sample_hidden_tokens",
]


@dataclass(frozen=True)
class ConditionDropout:
    """InstructPix2Pix's condition dropout for a sample that draws an image: with probability `text` its condition
    text alone is dropped, with `image` its source images alone (an edit's), with `both` the two. A text-to-image
    sample, which has no source image, so loses its text with probability `text + both`. Each lies in [0, 1] and
    they sum to at most 1; all 0 (the default) drops nothing and draws nothing from the generator.

    The trainer's settings of the same meaning are `condition_text_dropout`, `condition_image_dropout` and
    `condition_both_dropout` (`SetokimInputsMixin`)."""

    text: float = 0.0
    image: float = 0.0
    both: float = 0.0

    def __post_init__(self):
        for field in ("text", "image", "both"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ValueError(
                    f"`condition_{field}_dropout` (ConditionDropout.{field}) must be a probability in [0, 1], got "
                    f"{value!r}."
                )
        total = self.text + self.image + self.both
        if total > 1.0 + 1e-9:
            raise ValueError(
                "`condition_text_dropout`, `condition_image_dropout` and `condition_both_dropout` are the "
                f"probabilities of three exclusive cases and must sum to at most 1, got {total:g}."
            )

    @property
    def active(self) -> bool:
        return self.text + self.image + self.both > 0


def draw_condition_drops(
    num_samples: int, dropout: ConditionDropout, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """For `num_samples` samples: `(drop_text, drop_image)`, each `(num_samples,)` bool, one uniform draw per sample
    deciding among text alone, image alone, both and neither (see `ConditionDropout`). Draws nothing when
    `dropout` is inactive, so a run without dropout keeps every later draw of its generator."""
    if not dropout.active:
        none = torch.zeros(num_samples, dtype=torch.bool)
        return none, none.clone()
    u = torch.rand(num_samples, generator=generator, dtype=torch.float64)
    text_only = u < dropout.text
    image_only = (u >= dropout.text) & (u < dropout.text + dropout.image)
    both = (u >= dropout.text + dropout.image) & (u < math.fsum((dropout.text, dropout.image, dropout.both)))
    return text_only | both, image_only | both


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


def draw_noise(clean: torch.Tensor, num_train_timesteps: int, generator=None) -> tuple[torch.Tensor, torch.Tensor]:
    """eps ~ N(0, I) like `clean` `(M, D)`, and a timestep ~ U{0..T-1} per row."""
    noise = torch.randn(clean.shape, generator=generator).to(clean.device)
    timesteps = torch.randint(0, num_train_timesteps, (len(clean),), generator=generator).to(clean.device)
    return noise, timesteps


def prediction_target(scheduler, clean, noise, timesteps) -> torch.Tensor:
    """What the head must predict for `clean` noised with `noise` at `timesteps`: the noise or the velocity."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(clean, noise, timesteps)
    raise ValueError(f"The generation head predicts 'epsilon' or 'v_prediction', not {kind!r}.")
