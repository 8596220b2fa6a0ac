"""Configuration of Setokim, the multimodal LLM that reads SeTok tokens."""

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
    """

    model_type = "setokim"
    # Outputs that evaluation must not gather as predictions (their shapes vary from batch to batch).
    keys_to_ignore_at_inference = [
        "cache",
        "past_key_values",
        "image_hidden_states",
        "image_outputs",
        "diffusion_prediction",
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


__all__ = ["SetokimConfig"]
