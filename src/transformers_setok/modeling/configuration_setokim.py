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
    """

    model_type = "setokim"
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

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        # Backbones that tie their embeddings (Gemma, small Qwen2) keep doing so inside Setokim.
        if not self.tie_word_embeddings and getattr(self.text_config, "tie_word_embeddings", False):
            self.tie_word_embeddings = True
        ids = {"image_token_id": self.image_token_id, "boi_token_id": self.boi_token_id}
        ids["eoi_token_id"] = self.eoi_token_id
        if len(set(ids.values())) != 3:
            raise ValueError(f"`image_token_id`, `boi_token_id` and `eoi_token_id` must differ, got {ids}.")


__all__ = ["SetokimConfig"]
