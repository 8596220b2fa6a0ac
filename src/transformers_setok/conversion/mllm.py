"""The full upstream MLLM (Vicuna/Llama keys plus `model.vision_tower.*`, `model.mm_in_projector.*`, ...) onto
`SetokimForConditionalGeneration`; its tokenizer goes through the stage-1 rules of `tokenizer.py`."""

import torch

from ..modeling import SetokimConfig, SetokimForConditionalGeneration
from .mapping import Conversion
from .report import DETOKENIZER_REASON, GENERATION_HEAD_REASON, ConversionError, ConversionResult
from .tokenizer import map_tokenizer


def convert_mllm_state_dict(upstream: dict[str, torch.Tensor], config: SetokimConfig) -> ConversionResult:
    """An upstream Setokim (LLaVA-style Llama) state dict -> a `SetokimForConditionalGeneration` state dict."""
    conv = Conversion(upstream, SetokimForConditionalGeneration, config)
    map_tokenizer(conv, "model.vision_tower.", "model.vision_tower.", config.vision_config)
    conv.skip(
        "model.vision_generator.",
        f"Setokim's image_decoder is our stage-1 detokenizer (add_generation_head); the {DETOKENIZER_REASON}",
    )
    _convert_projector(conv, "model.mm_in_projector.", "model.multi_modal_projector.", config)
    conv.skip(
        "model.mm_out_projector.",
        "output projector of upstream's generation path: ours conditions the generation head on the hidden states",
    )
    conv.skip("model.diffloss.", GENERATION_HEAD_REASON)
    _convert_language_model(conv, config)
    conv.warn(
        "image_token_id / boi_token_id / eoi_token_id come from the config: check them against the upstream "
        "tokenizer's added tokens ([Img], [/Img]); the weights do not record them."
    )
    return conv.finish()


def _convert_projector(conv: Conversion, src: str, dst: str, config: SetokimConfig):
    """Upstream `mlp2x_gelu` (Linear, GELU, Linear as Sequential 0, 1, 2) onto our two-layer projector."""
    found = {key.rsplit(".", 1)[0] for key in conv.under(src)}
    if found and found != {"0", "2"}:
        raise ConversionError(
            f"Upstream {src}* holds modules {sorted(found)}; only the `mlp2x_gelu` projector (Linear, GELU, Linear: "
            "modules 0 and 2) matches ours. A `_Norm` variant, another depth or a single linear has no counterpart."
        )
    conv.take_params(src + "0", dst + "linear_1")
    conv.take_params(src + "2", dst + "linear_2")
    if found and config.projector_hidden_act != "gelu":
        conv.warn(
            f"{dst}: upstream used exact GELU; set projector_hidden_act='gelu' (is {config.projector_hidden_act!r})."
        )


def _convert_language_model(conv: Conversion, config: SetokimConfig):
    """Upstream's LlamaForCausalLM keys onto our language model and LM head."""
    for part in ("embed_tokens.", "layers.", "norm."):
        for rest in conv.under("model." + part):
            if rest.endswith("rotary_emb.inv_freq"):  # older transformers saved this buffer
                conv.skip_key(f"model.{part}{rest}", "recomputed: rotary frequencies are not weights")
            else:
                conv.take(f"model.{part}{rest}", f"model.language_model.{part}{rest}")
        conv.skip("model." + part, "no counterpart in our language model (check text_config's model type)")
    if config.tie_word_embeddings:
        conv.skip("lm_head.", "the target ties lm_head to model.language_model.embed_tokens")
        conv.explain_missing("lm_head.", "tied to model.language_model.embed_tokens")
        conv.warn("lm_head: the config ties it to the input embeddings; upstream's separate lm_head was dropped.")
    else:
        conv.take_params("lm_head", "lm_head", names=("weight",))
