"""One Setokim training step's inputs, prepared in one ordered pass (stages 2-3).

The collator cannot know the image token counts (only SeTok does), so a collated batch holds one `<image>` per image,
`pixel_values` and labels. `prepare_step` turns it into what the model takes, and what the generation head must
predict, in this order:

    0. dropout     with `DiffusionSettings.condition_dropout`, a drawing sample's condition (`condition_text`,
                   `condition_images` from the collator) may be removed: its tokens cut from the row (re-padded), a
                   dropped source image's pixels too, so SeTok never sees it (classifier-free guidance's training)
    1. flags       which images are targets (a placeholder inside an assistant turn: an image to draw); a
                   referred object's answer placeholder (`segmentation_answers`) stands for no image
    2. SeTok       `model.get_image_features(pixel_values)` once for every image of the step: tokens and counts;
                   each object's answer length m_s (its image's clusters on its mask, `segmentation_targets`)
    3. hidden      for each target image, 70-100 % of its tokens hidden at random (MAR's masking)
    4. visible     the features that enter the LLM: every input image's, the target images' unhidden ones
    5. expansion   `model.encode_and_expand`: each placeholder -> `[Img]`, n_i (or m_s) x `<image>`, `[/Img]`; the
                   hidden positions become `masked_image_tokens`, the answers' slots `segmentation_prompts` (with
                   `target_masks` and `mask_image_index`, for the mask decoder)
    6. diffusion   the hidden tokens' noised copies (R draws each, laid out by `repeat_noise_draws`), timesteps,
                   and the head's targets
    -> SetokimStepInputs(model_kwargs, diffusion)

The trainer prepares every micro-batch of an optimizer step once, before the step (`SetokimInputsMixin`), so the
loss normaliser counts the expanded labels and nothing runs SeTok a second time.
"""

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from ..modeling.diffusion_head_setokim import repeat_noise_draws
from ..modeling.placeholders_setokim import IGNORE_INDEX
from .generation_targets import (
    ConditionDropout,
    draw_condition_drops,
    draw_noise,
    image_target_flags,
    prediction_target,
    sample_hidden_tokens,
)
from .segmentation_targets import object_token_counts

__all__ = [
    "ConditionDropout",
    "DiffusionSettings",
    "DiffusionTargets",
    "SetokimStepInputs",
    "eval_mode",
    "frozen_vision_tower",
    "prepare_step",
    "special_token_ids",
]


@dataclass
class DiffusionSettings:
    """How a step's target images become the generation head's inputs: the model's noise `scheduler`
    (`transformers_setok.generation.noise_scheduler_for`), the `token_scale` applied to SeTok tokens, MAR's
    `mask_ratio_min`, the `noise_repeats` R per hidden token and the `condition_dropout` of drawing samples (None:
    none, as in evaluation)."""

    scheduler: object
    token_scale: float = 1.0
    mask_ratio_min: float = 0.7
    noise_repeats: int = 4
    condition_dropout: ConditionDropout | None = None


@dataclass
class DiffusionTargets:
    """What the generation head must predict for a step's hidden tokens.

    `target` `(R * N, token_dim)`: the velocity or noise, after the scheduler's `prediction_type`; `weights`
    `(R * N,)`: n_i / (k_i R) for a row of image i (n_i tokens, k_i hidden), so that a weighted sum of the rows'
    errors counts each target token once; `num_target_tokens`: the tokens of this micro-batch's target images;
    `step_target_tokens`: those of the whole accumulated step on all processes (set by the trainer before the step,
    None outside training).
    """

    target: torch.Tensor
    weights: torch.Tensor
    num_target_tokens: int
    step_target_tokens: float | None = None


@dataclass
class SetokimStepInputs(Mapping):
    """A prepared micro-batch: `model_kwargs` for `model(**model_kwargs)` and, when it draws images, `diffusion`
    (and, for referring segmentation, `target_masks` and `mask_image_index` among the kwargs).

    It reads as the mapping of its model kwargs, since the Trainer inspects a batch that way (`labels`,
    `input_ids`); the targets stay out of the kwargs, so nothing has to be popped before the model is called.
    """

    model_kwargs: dict
    diffusion: DiffusionTargets | None = None
    # The step's referred objects on all processes (set by the trainer before the step, None outside training).
    step_objects: float | None = None

    @property
    def num_objects(self) -> int:
        """The referred objects (masks to predict) of this micro-batch."""
        index = self.model_kwargs.get("mask_image_index")
        return 0 if index is None else len(index)

    def __getitem__(self, key):
        return self.model_kwargs[key]

    def __iter__(self) -> Iterator:
        return iter(self.model_kwargs)

    def __len__(self) -> int:
        return len(self.model_kwargs)


def special_token_ids(processor_or_ids) -> dict[str, int]:
    """The ids the expansion needs (`image_token_id`, `boi_token_id`, `eoi_token_id`, `pad_token_id`), from a
    SetokimProcessor or a mapping that names them."""
    names = ("image_token_id", "boi_token_id", "eoi_token_id", "pad_token_id")
    if isinstance(processor_or_ids, Mapping):
        missing = [name for name in names if processor_or_ids.get(name) is None]
        if missing:
            raise ValueError(f"The token ids {missing} are missing.")
        return {name: processor_or_ids[name] for name in names}
    processor = processor_or_ids
    pad_token_id = processor.tokenizer.pad_token_id
    if pad_token_id is None:
        raise ValueError("The tokenizer has no pad token: set `processor.tokenizer.pad_token` (e.g. to its eos).")
    return {
        "image_token_id": processor.image_token_id,
        "boi_token_id": processor.boi_token_id,
        "eoi_token_id": processor.eoi_token_id,
        "pad_token_id": pad_token_id,
    }


def frozen_vision_tower(model: torch.nn.Module) -> torch.nn.Module:
    """The model's `vision_tower` submodule (found by name, so PEFT and DDP wrappers are fine), checked frozen."""
    towers = [module for name, module in model.named_modules() if name.rsplit(".", 1)[-1] == "vision_tower"]
    if len(towers) != 1:
        raise ValueError(f"Expected one `vision_tower` submodule in {type(model).__name__}, found {len(towers)}.")
    trainable = [name for name, param in towers[0].named_parameters() if param.requires_grad]
    if trainable:
        raise ValueError(
            f"The vision tower has {len(trainable)} trainable parameters (e.g. {trainable[0]!r}), but SeTok must be "
            "frozen to train Setokim (stages 2-3): call `model.model.vision_tower.requires_grad_(False)` first."
        )
    return towers[0]


@contextmanager
def eval_mode(module: torch.nn.Module):
    # A frozen tower should give the same tokens in train and eval steps (the merger has dropout).
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


def prepare_step(
    model,
    batch: Mapping[str, torch.Tensor],
    processor_or_ids,
    *,
    padding_side: str = "right",
    max_length: int | None = None,
    diffusion: DiffusionSettings | None = None,
    generator: torch.Generator | None = None,
    others_read_images: bool = False,
) -> SetokimStepInputs:
    """A collated batch (see `SetokimChatCollator`) -> the step's `SetokimStepInputs`, SeTok run once.

    `model`: the (unwrapped) Setokim, its vision tower frozen (else ValueError). The call is deliberately NOT wrapped
    in `torch.no_grad()`: the projector runs inside `get_image_features` and must be trained; with every tower
    parameter frozen, autograd records nothing for the tower. `padding_side` should be the collator's (either side
    gives the same loss); `max_length` bounds the expanded rows (nothing is truncated). `diffusion` is required when
    the batch holds images to draw; `generator` (a CPU `torch.Generator`) draws the condition dropout, masks, noise
    and timesteps, in that order (no dropout draws nothing, so its settings of 0 leave the other draws as they were).

    `others_read_images`: another process has images in its batch of this micro-step (the trainer asks them all).
    A batch without images then still runs SeTok and the projector, on one blank image whose features fill no
    placeholder: under ZeRO-3 (and FSDP) every process must gather the same parameters in the same order, and the
    projector must get a (zero) gradient on every process for DDP's and ZeRO-2's reductions to match. The result is
    the same as without it: the blank image's features are cut to none before they reach the LLM.
    """
    batch = dict(batch)
    pixel_values = batch.pop("pixel_values", None)
    objects = {key: batch.pop(key) for key in ("target_masks", "mask_image_index") if key in batch}
    conditions = {key: batch.pop(key) for key in ("condition_text", "condition_images") if key in batch}
    ids = special_token_ids(processor_or_ids)
    # 0. condition dropout, before SeTok: a dropped source image is not encoded
    dropout = diffusion.condition_dropout if diffusion is not None else None
    if dropout is not None and dropout.active and conditions:
        batch, pixel_values, objects = _drop_conditions(
            batch, pixel_values, objects, conditions, dropout, generator, ids, padding_side
        )
    expand = dict(padding_side=padding_side, pad_token_id=ids["pad_token_id"], max_length=max_length)
    if pixel_values is None and (objects or "segmentation_answers" in batch):
        raise ValueError("The batch has segmentation answers (`target_masks`) but no `pixel_values`: their images.")
    if pixel_values is None:
        expanded, _ = model.encode_and_expand(batch, **expand)
        if others_read_images:
            expanded["mm_encoder_outputs"] = {"image": _blank_image_features(model, expanded["input_ids"].device)}
        return SetokimStepInputs(expanded)

    # 1. flags, on the collated batch (a target placeholder is labelled with its own id; an object's answer
    #    placeholder too, but it stands for no image of its own)
    is_target = image_target_flags(batch, ids["image_token_id"])
    if "segmentation_answers" in batch:
        is_target = is_target[~_answer_flags(batch, ids["image_token_id"])]
    # 2. SeTok, once; an object's answer gets as many slots as its image has clusters on it
    with eval_mode(frozen_vision_tower(model)):
        image_outputs = model.get_image_features(pixel_values)
    counts = torch.tensor([len(tokens) for tokens in image_outputs.pooler_output], device=is_target.device)
    if objects:
        expand["answer_token_counts"] = object_token_counts(
            image_outputs.cluster_assignment, objects["target_masks"], objects["mask_image_index"]
        )
    if not bool(is_target.any()):
        expanded, _ = model.encode_and_expand(batch, image_outputs=image_outputs, **expand)
        expanded.update(mm_encoder_outputs={"image": image_outputs}, **objects)
        return SetokimStepInputs(expanded)
    if diffusion is None:
        raise ValueError(
            "The batch has images in assistant turns (images to generate) but the model has no generation head: "
            "build it with `use_generation_head=True`, or move the images to user turns."
        )

    # 3. hidden tokens of the target images, image after image
    target_images = is_target.nonzero().flatten().tolist()
    target_counts = counts[is_target]
    hidden = sample_hidden_tokens(target_counts.cpu(), diffusion.mask_ratio_min, generator)
    hidden_of = dict(zip(target_images, hidden.split(target_counts.tolist())))
    # 4. visible features: what the LLM reads at the unhidden placeholders
    visible = [
        tokens[~hidden_of[i].to(tokens.device)] if i in hidden_of else tokens
        for i, tokens in enumerate(image_outputs.pooler_output)
    ]
    # 5. expansion, and the hidden positions in it (a target's `<image>` tokens are labelled, in image order)
    expanded, _ = model.encode_and_expand(batch, image_outputs=image_outputs, **expand)
    expanded.update(objects)
    target_positions = expanded["labels"] == ids["image_token_id"]
    if "segmentation_prompts" in expanded:  # an object's answer slots are labelled too, but nothing is drawn there
        target_positions &= ~expanded["segmentation_prompts"]
    masked_image_tokens = torch.zeros_like(target_positions)
    masked_image_tokens[target_positions] = hidden.to(target_positions.device)
    expanded["masked_image_tokens"] = masked_image_tokens
    # The same outputs (the encoder grid and clusters a mask decoder reads included), the visible features only.
    expanded["mm_encoder_outputs"] = {"image": type(image_outputs)(**{**image_outputs, "pooler_output": visible})}
    # 6. diffusion inputs: the hidden SeTok tokens (before the projector: what the head draws), scaled, R draws
    setok_tokens = image_outputs.last_hidden_state
    clean = torch.cat([setok_tokens[i, : int(counts[i])] for i in target_images])[hidden.to(setok_tokens.device)]
    clean = repeat_noise_draws(clean.float() * diffusion.token_scale, diffusion.noise_repeats)
    noise, timesteps = draw_noise(clean, diffusion.scheduler.config.num_train_timesteps, generator)
    expanded["noisy_image_tokens"] = diffusion.scheduler.add_noise(clean, noise, timesteps)
    expanded["diffusion_timesteps"] = timesteps
    hidden_per_image = torch.stack([part.sum() for part in hidden_of.values()])
    image_of_row = torch.repeat_interleave(torch.arange(len(hidden_per_image)), hidden_per_image)
    weights = (target_counts.cpu() / hidden_per_image)[image_of_row].float()
    targets = DiffusionTargets(
        target=prediction_target(diffusion.scheduler, clean, noise, timesteps),
        weights=(repeat_noise_draws(weights, diffusion.noise_repeats) / diffusion.noise_repeats).to(clean.device),
        num_target_tokens=int(target_counts.sum()),
    )
    return SetokimStepInputs(expanded, targets)


def _drop_conditions(batch, pixel_values, objects, conditions, dropout, generator, ids, padding_side: str):
    """The collated batch with the dropped conditions cut out (`draw_condition_drops`, one draw per row): a dropped
    text's tokens and a dropped source image's placeholder leave their row, which is re-padded; the image's pixels
    leave `pixel_values` (and `mask_image_index` follows). Returns `(batch, pixel_values, objects)`."""
    input_ids = batch["input_ids"]
    flags = []
    for key in ("condition_text", "condition_images"):
        value = conditions.get(key)
        if value is None:
            value = torch.zeros_like(input_ids, dtype=torch.bool)
        if value.shape != input_ids.shape or value.dtype != torch.bool:
            raise ValueError(
                f"`{key}` must be a bool tensor of `input_ids`' shape {tuple(input_ids.shape)}, got {value.dtype} "
                f"{tuple(value.shape)}."
            )
        flags.append(value)
    drop_text, drop_image = draw_condition_drops(len(input_ids), dropout, generator)
    device = input_ids.device
    removed = (flags[0] & drop_text.to(device)[:, None]) | (flags[1] & drop_image.to(device)[:, None])
    real = batch.get("attention_mask", torch.ones_like(input_ids)).bool()
    removed &= real
    if not bool(removed.any()):
        return batch, pixel_values, objects
    images = (input_ids == ids["image_token_id"]) & real  # the placeholders of `pixel_values`, in order
    if "segmentation_answers" in batch:
        images &= ~batch["segmentation_answers"]
    gone = removed[images].cpu()  # (N_images,)
    if bool(gone.any()):
        pixel_values = pixel_values[~gone.to(pixel_values.device)]
        if "mask_image_index" in objects:  # a referred object's image is never a condition: it stays, renumbered
            renumbered = (~gone).long().cumsum(0) - 1
            index = objects["mask_image_index"]
            objects = {**objects, "mask_image_index": renumbered.to(index.device)[index]}
    return _without_tokens(batch, removed, real, padding_side, ids["pad_token_id"]), pixel_values, objects


# What a collated `(B, T)` field is padded with once tokens are cut out of its rows.
_PADDING = {"input_ids": None, "attention_mask": 0, "labels": IGNORE_INDEX, "segmentation_answers": False}


def _without_tokens(batch, removed, real, padding_side: str, pad_token_id: int) -> dict:
    """`batch` with the `removed` `(B, T)` tokens cut out of every per-token field, rows re-padded on
    `padding_side` to the longest that remains."""
    shape = batch["input_ids"].shape
    keep = real & ~removed
    lengths = keep.sum(1).tolist()
    width = max(lengths, default=0)
    result = dict(batch)
    result.setdefault("attention_mask", real.long())
    for key, value in result.items():
        if not torch.is_tensor(value) or value.shape != shape:
            continue
        if key not in _PADDING:
            raise ValueError(
                f"The batch field `{key}` has `input_ids`' shape, but condition dropout does not know how to pad it "
                f"once tokens leave its rows (it pads {sorted(_PADDING)})."
            )
        pad = pad_token_id if _PADDING[key] is None else _PADDING[key]
        padded = torch.full((shape[0], width), pad, dtype=value.dtype, device=value.device)
        for row, length in enumerate(lengths):
            start = 0 if padding_side == "right" else width - length
            padded[row, start : start + length] = value[row][keep[row]]
        result[key] = padded
    return result


def _answer_flags(batch: Mapping[str, torch.Tensor], image_token_id: int) -> torch.Tensor:
    """`(P,)` bool, one entry per placeholder of the collated batch: True on a referred object's answer."""
    real = batch.get("attention_mask", torch.ones_like(batch["input_ids"])).bool()
    return batch["segmentation_answers"][(batch["input_ids"] == image_token_id) & real]


def _blank_image_features(model, device) -> BaseModelOutputWithPooling:
    """SeTok and the projector run on one blank image, its features cut to none (see `prepare_step`'s
    `others_read_images`): the same parameters take part as for a real image, and nothing reaches the LLM."""
    tower = frozen_vision_tower(model)
    vision_config = model.config.vision_config
    channels = getattr(getattr(vision_config, "vision_config", None), "num_channels", 3)
    dtype = next(tower.parameters()).dtype
    blank = torch.zeros(1, channels, vision_config.image_size, vision_config.image_size, dtype=dtype, device=device)
    with eval_mode(tower):
        outputs = model.get_image_features(blank)
    return BaseModelOutputWithPooling(
        last_hidden_state=outputs.last_hidden_state[:0], pooler_output=[outputs.pooler_output[0][:0]]
    )
