"""Configuration of Setokim, the multimodal LLM that reads SeTok tokens."""

import math

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

from .configuration_setok import SetokConfig


class SetokimConfig(PreTrainedConfig):
    r"""
    Configuration of [`SetokimModel`] and [`SetokimForConditionalGeneration`].

    Args:
        vision_config (`dict` or `SetokConfig`, *optional*): the SeTok tokenizer.
        text_config (`dict` or `PreTrainedConfig`, *optional*): any causal LM (Llama by default).
        image_token_id (`int`): id of the placeholder that each SeTok token of an image replaces.
        boi_token_id, eoi_token_id (`int`): ids of `[Img]` and `[/Img]`, which open and close an image.
        projector_hidden_act (`str`): activation between the projector's two linear layers.
        tie_word_embeddings (`bool`): tie the LM head to the input embeddings (taken from `text_config` when it
            ties them).
        use_generation_head (`bool`): also build the generation path: the diffusion head that draws SeTok tokens from
            the LLM's hidden states, and SeTok's detokenizer (`image_decoder`) that turns them into pixels.
        generation_head_width, generation_head_depth (`int`): the head's MLP width and number of adaLN blocks (the
            paper's 1024 and 3).
        diffusion_num_train_timesteps (`int`), diffusion_beta_schedule (`str`): the noise schedule the head is trained
            and sampled with, as diffusers' `DDPMScheduler` names them (cosine: "squaredcos_cap_v2").
        diffusion_prediction_type (`str`): what the head predicts, "v_prediction" (the velocity; stable at the cosine
            schedule's near-zero signal end, where an eps prediction's error is amplified ~10^4 times when x_0 is
            recovered) or "epsilon" (the noise, as in MAR).
        diffusion_num_inference_steps (`int`): default number of denoising steps when sampling.
        generation_token_scale (`float`, *optional*): SeTok tokens are multiplied by it before diffusion (and drawn
            tokens divided by it), so that the head works on unit-variance data, like latent diffusion's VAE scaling
            factor. Stage 2 sets it to 1 / std of the training images' tokens when it is unset.
        use_mask_decoder (`bool`): also build the referring-segmentation mask decoder (`mask_decoder`,
            [`SetokimMaskDecoder`]): the LLM's hidden states at the `<image>` slots it writes for a referred object,
            with the encoder's patch grid of that object's image, give a mask (logits at 4 x the patch grid) and its
            predicted IoU. Configs saved before it existed load with it off.
        mask_decoder_width, mask_decoder_depth, mask_decoder_heads, mask_decoder_intermediate_size (`int`): the
            decoder's width D (a multiple of 8 and of 2 x heads: its cross-attentions run at D / 2 and its upsampled
            features have D / 8 channels), its number of two-way attention blocks, attention heads, and the blocks' MLP
            width (SAM's 256, 2, 8 and 2048).
        mask_focal_weight, mask_dice_weight, mask_iou_weight (`float`): the mask loss, `mask_focal_weight x sigmoid
            focal + mask_dice_weight x dice + mask_iou_weight x MSE(predicted IoU, IoU of the thresholded mask)` (SAM's
            20 : 1 : 1), each term a mean over the target mask's pixels, then over the objects.
        mask_focal_alpha, mask_focal_gamma (`float`): the focal loss's positive-class weight and focusing exponent
            (0.25 and 2, as in SAM and DETR).
    """

    model_type = "setokim"
    # Outputs that evaluation must not gather as predictions (their shapes vary from batch to batch).
    keys_to_ignore_at_inference = [
        "cache",
        "past_key_values",
        "image_hidden_states",
        "image_outputs",
        "diffusion_prediction",
        "pred_masks",
        "iou_scores",
        "mask_loss",
        "mask_focal_loss",
        "mask_dice_loss",
        "mask_iou_loss",
    ]
    sub_configs_defaults = {
        "vision_config": SetokConfig,
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama"),
    }

    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    image_token_id: int = 32000
    boi_token_id: int = 32001
    eoi_token_id: int = 32002
    projector_hidden_act: str = "gelu"
    tie_word_embeddings: bool = False
    use_generation_head: bool = False
    generation_head_width: int = 1024
    generation_head_depth: int = 3
    diffusion_num_train_timesteps: int = 1000
    diffusion_beta_schedule: str = "squaredcos_cap_v2"
    diffusion_prediction_type: str = "v_prediction"
    diffusion_num_inference_steps: int = 100
    generation_token_scale: float | None = None
    use_mask_decoder: bool = False
    mask_decoder_width: int = 256
    mask_decoder_depth: int = 2
    mask_decoder_heads: int = 8
    mask_decoder_intermediate_size: int = 2048
    mask_focal_weight: float = 20.0
    mask_dice_weight: float = 1.0
    mask_iou_weight: float = 1.0
    mask_focal_alpha: float = 0.25
    mask_focal_gamma: float = 2.0

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        # Backbones that tie their embeddings (Gemma, small Qwen2) keep doing so inside Setokim.
        if not self.tie_word_embeddings and getattr(self.text_config, "tie_word_embeddings", False):
            self.tie_word_embeddings = True
        ids = {"image_token_id": self.image_token_id, "boi_token_id": self.boi_token_id}
        ids["eoi_token_id"] = self.eoi_token_id
        if len(set(ids.values())) != 3:
            raise ValueError(f"`image_token_id`, `boi_token_id` and `eoi_token_id` must differ, got {ids}.")
        sizes = {
            "generation_head_width": self.generation_head_width,
            "generation_head_depth": self.generation_head_depth,
            "diffusion_num_train_timesteps": self.diffusion_num_train_timesteps,
            "diffusion_num_inference_steps": self.diffusion_num_inference_steps,
            "mask_decoder_width": self.mask_decoder_width,
            "mask_decoder_depth": self.mask_decoder_depth,
            "mask_decoder_heads": self.mask_decoder_heads,
            "mask_decoder_intermediate_size": self.mask_decoder_intermediate_size,
        }
        for name, value in sizes.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        if self.diffusion_prediction_type not in ("v_prediction", "epsilon"):
            raise ValueError(
                f"`diffusion_prediction_type` must be 'v_prediction' or 'epsilon', got {self.diffusion_prediction_type!r}."
            )
        scale = self.generation_token_scale
        if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0):
            raise ValueError(f"`generation_token_scale` must be a positive number or None, got {scale!r}.")
        self._validate_mask_decoder_fields()

    def _validate_mask_decoder_fields(self):
        if not isinstance(self.use_mask_decoder, bool):
            raise ValueError(f"`use_mask_decoder` must be True or False, got {self.use_mask_decoder!r}.")
        width, heads = self.mask_decoder_width, self.mask_decoder_heads
        if width % 8 or width % (2 * heads):
            raise ValueError(
                f"`mask_decoder_width` must be a multiple of 8 and of 2 x `mask_decoder_heads` (its cross-attentions "
                f"run at half the width, its upsampled features have width / 8 channels), got width {width} with "
                f"{heads} heads."
            )
        numbers = {
            "mask_focal_weight": self.mask_focal_weight,
            "mask_dice_weight": self.mask_dice_weight,
            "mask_iou_weight": self.mask_iou_weight,
            "mask_focal_gamma": self.mask_focal_gamma,
            "mask_focal_alpha": self.mask_focal_alpha,
        }
        for name, value in numbers.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"`{name}` must be a non-negative number, got {value!r}.")
        if self.mask_focal_alpha > 1:
            raise ValueError(f"`mask_focal_alpha` must lie in [0, 1], got {self.mask_focal_alpha!r}.")


__all__ = ["SetokimConfig"]
