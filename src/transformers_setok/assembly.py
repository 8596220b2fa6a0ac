"""Assembling a Setokim from a SeTok checkpoint and a causal-LM checkpoint."""

import torch
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

from .modeling import SetokimConfig, SetokimForConditionalGeneration
from .processing import SetokImageProcessor, SetokimProcessor

__all__ = ["build_setokim"]


def build_setokim(
    setok_name_or_path: str,
    language_model_name_or_path: str,
    *,
    tokenizer_name_or_path: str | None = None,
    projector_hidden_act: str = "gelu",
    **language_model_kwargs,
) -> tuple[SetokimForConditionalGeneration, SetokimProcessor]:
    """A Setokim made of a trained SeTok and a pretrained causal LM, with a fresh projector, and its processor.

    The tokenizer gets `<image>`, `[Img]` and `[/Img]` when it lacks them; the LLM's embeddings (and an untied LM
    head) grow to the new vocabulary with the new rows set to the mean of the existing ones, so the new tokens start
    as an "average word" rather than noise. `language_model_kwargs` go to `AutoModelForCausalLM.from_pretrained`
    (for example `dtype`, or `gguf_file` for a GGUF checkpoint).

    ```python
    >>> model, processor = build_setokim("setok-demo/model", "meta-llama/Llama-3.2-1B")
    ```
    """
    setok = AutoModel.from_pretrained(setok_name_or_path)
    language_model = AutoModelForCausalLM.from_pretrained(language_model_name_or_path, **language_model_kwargs)
    tokenizer_kwargs = (
        {"gguf_file": language_model_kwargs["gguf_file"]} if "gguf_file" in language_model_kwargs else {}
    )
    tokenizer = AutoTokenizer.from_pretrained(
        tokenizer_name_or_path or language_model_name_or_path, **tokenizer_kwargs
    )
    processor = SetokimProcessor(
        image_processor=SetokImageProcessor.from_pretrained(setok_name_or_path), tokenizer=tokenizer
    )
    _grow_embeddings_to_mean(language_model, len(tokenizer))

    config = SetokimConfig(
        vision_config=setok.config,
        text_config=language_model.config,
        image_token_id=processor.image_token_id,
        boi_token_id=processor.boi_token_id,
        eoi_token_id=processor.eoi_token_id,
        projector_hidden_act=projector_hidden_act,
    )
    model = SetokimForConditionalGeneration(config).to(language_model.dtype)
    model.model.vision_tower.load_state_dict(setok.state_dict())
    model.model.language_model.load_state_dict(language_model.base_model.state_dict())
    model.lm_head.load_state_dict(language_model.get_output_embeddings().state_dict())
    model.model.vision_tower._freeze_encoders()
    return model, processor


@torch.no_grad()
def _grow_embeddings_to_mean(language_model, vocab_size: int):
    embeddings = language_model.get_input_embeddings().weight
    old = embeddings.shape[0]
    if vocab_size <= old:
        return
    language_model.resize_token_embeddings(vocab_size, mean_resizing=False)
    for layer in {language_model.get_input_embeddings(), language_model.get_output_embeddings()}:
        layer.weight[old:] = layer.weight[:old].mean(0)
