"""Assembling a Setokim from a SeTok checkpoint and a causal-LM checkpoint, and giving one a generation head or a
mask decoder."""

import torch
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

from ._checks import check_positive_int
from .modeling import SetokForImageReconstruction, SetokimConfig, SetokimDiffusionHead, SetokimForConditionalGeneration
from .modeling.mask_decoder_setokim import SetokimMaskDecoder
from .modeling.modeling_setok import SetokDetokenizer
from .processing import SetokImageProcessor, SetokimProcessor

__all__ = ["add_generation_head", "add_mask_decoder", "build_setokim"]


def build_setokim(
    setok_name_or_path: str,
    language_model_name_or_path: str,
    *,
    tokenizer_name_or_path: str | None = None,
    projector_hidden_act: str = "gelu",
    use_generation_head: bool = False,
    generation_head_width: int = 1024,
    generation_head_depth: int = 3,
    **language_model_kwargs,
) -> tuple[SetokimForConditionalGeneration, SetokimProcessor]:
    """A Setokim made of a trained SeTok and a pretrained causal LM, with a fresh projector, and its processor.

    The tokenizer gets `<image>`, `[Img]` and `[/Img]` when it lacks them; the LLM's embeddings (and an untied LM
    head) grow to the new vocabulary with the new rows set to the mean of the existing ones, so the new tokens start
    as an "average word" rather than noise. `language_model_kwargs` go to `AutoModelForCausalLM.from_pretrained`
    (for example `dtype`, or `gguf_file` for a GGUF checkpoint). `use_generation_head` also adds a fresh generation
    head and SeTok's detokenizer (`add_generation_head`), so `setok_name_or_path` must then be a stage-1
    `SetokForImageReconstruction`.

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
    model.model.vision_tower.freeze_encoders()
    if use_generation_head:
        add_generation_head(model, setok_name_or_path, width=generation_head_width, depth=generation_head_depth)
    return model, processor


def add_generation_head(
    model: SetokimForConditionalGeneration, setok_name_or_path: str, *, width: int = 1024, depth: int = 3
) -> SetokimForConditionalGeneration:
    """Gives `model` (in place) a freshly initialised generation head of `width` x `depth` and the detokenizer of the
    stage-1 SeTok at `setok_name_or_path` (a saved `SetokForImageReconstruction`, whose tokenizer `model` carries),
    and sets `config.use_generation_head`. Stage 2 with `train_generation_head` then trains the head."""
    if model.generation_head is not None:
        raise ValueError("The model already has a generation head.")
    check_positive_int(width, "width")
    check_positive_int(depth, "depth")
    setok, info = SetokForImageReconstruction.from_pretrained(setok_name_or_path, output_loading_info=True)
    if any(key.startswith("detokenizer.") for key in info["missing_keys"]):
        raise ValueError(
            f"{setok_name_or_path!r} holds no trained detokenizer: pass the stage-1 SetokForImageReconstruction."
        )
    config = model.config
    ours, theirs = config.vision_config.to_diff_dict(), setok.config.to_diff_dict()
    differing = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k) and "detokenizer" in k)
    if differing or config.vision_config.token_dim != setok.config.token_dim:
        raise ValueError(f"{setok_name_or_path!r} is not this model's SeTok: its detokenizer differs in {differing}.")
    config.use_generation_head = True
    config.generation_head_width, config.generation_head_depth = width, depth
    reference = model.lm_head.weight
    model.generation_head = SetokimDiffusionHead(
        config.vision_config.token_dim, config.text_config.hidden_size, width, depth
    )
    model.image_decoder = SetokDetokenizer(config.vision_config)
    model.initialize_weights()  # only the new modules: loaded parameters are marked initialised
    model.image_decoder.load_state_dict(setok.detokenizer.state_dict())
    model.generation_head.to(reference.device, reference.dtype)
    model.image_decoder.to(reference.device, reference.dtype)
    return model


def add_mask_decoder(
    model: SetokimForConditionalGeneration,
    *,
    width: int = 256,
    depth: int = 2,
    heads: int = 8,
    intermediate_size: int | None = None,
) -> SetokimForConditionalGeneration:
    """Gives `model` (in place) a freshly initialised referring-segmentation mask decoder (`SetokimMaskDecoder`) of
    `width` x `depth` two-way blocks with `heads` attention heads and MLPs of `intermediate_size` (default 8 x
    `width`, SAM's 2048 at 256), and sets `config.use_mask_decoder` and the `mask_decoder_*` sizes, so that the model
    saves and loads with it. Stage 3 with `train_mask_decoder` then trains it on referring-segmentation records."""
    if model.mask_decoder is not None:
        raise ValueError("The model already has a mask decoder.")
    intermediate_size = 8 * width if intermediate_size is None else intermediate_size
    for name, value in (
        ("width", width),
        ("depth", depth),
        ("heads", heads),
        ("intermediate_size", intermediate_size),
    ):
        check_positive_int(value, name)
    sizes = dict(
        mask_decoder_width=width,
        mask_decoder_depth=depth,
        mask_decoder_heads=heads,
        mask_decoder_intermediate_size=intermediate_size,
    )
    SetokimConfig(use_mask_decoder=True, **sizes)  # the config's own rules for the sizes, before any change
    config = model.config
    for name, value in sizes.items():
        setattr(config, name, value)
    config.use_mask_decoder = True  # also makes SeTok return its encoder grid, which the decoder reads
    reference = model.lm_head.weight
    model.mask_decoder = SetokimMaskDecoder(config)  # as `SetokimForConditionalGeneration.__init__` builds it
    model.initialize_weights()  # only the new module: loaded parameters are marked initialised
    model.mask_decoder.to(reference.device, reference.dtype)
    return model


@torch.no_grad()
def _grow_embeddings_to_mean(language_model, vocab_size: int):
    embeddings = language_model.get_input_embeddings().weight
    old = embeddings.shape[0]
    if vocab_size <= old:
        return
    language_model.resize_token_embeddings(vocab_size, mean_resizing=False)
    for layer in {language_model.get_input_embeddings(), language_model.get_output_embeddings()}:
        layer.weight[old:] = layer.weight[:old].mean(0)
