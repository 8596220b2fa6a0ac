"""The `model` section of each stage: which sources go together, the values beyond their types, and, with
`check_paths`, the checkpoints named (their model type and head, from `SavedModelConfig`)."""

import os

from .bounds import check_between, check_count, check_not_negative
from .saved_model import SavedModelConfig
from .schema import (
    EXPECTED_MODEL_TYPE,
    GenerationTrainingConfig,
    PretrainModelConfig,
    SFTModelConfig,
    TokenizerModelConfig,
)
from .setok_config import check_setok_config
from .typed_yaml import ConfigError

__all__ = [
    "MASK_DECODER_SIZES",
    "check_generation_training",
    "check_pretrain_model",
    "check_sft_model",
    "check_source",
    "check_tokenizer_model",
    "has_concept_contrast",
    "mask_decoder_sizes",
]

RECONSTRUCTION_HEAD = "SetokForImageReconstruction"  # the stage-1 model: SeTok with its detokenizer and losses
MASK_DECODER_SIZES = ("width", "depth", "heads")  # `model.mask_decoder_<size>`, SetokimConfig's `mask_decoder_<size>`


def check_source(value: str | None, key: str, check_paths: bool):
    """A Hub id or folder: a local-looking path must exist (a Hub id is checked when it is downloaded)."""
    if value is None or not check_paths:
        return
    from ..data import is_local_path

    if is_local_path(value) and not os.path.exists(value):
        raise FileNotFoundError(f"`{key}`: no such folder: {value}")


def has_concept_contrast(model: TokenizerModelConfig) -> bool:
    """Whether the stage-1 model has a text encoder (and so needs texts and a text tokenizer)."""
    if model.init_from is not None:
        return SavedModelConfig.read(model.init_from, "model.init_from").has_text_config
    return model.text_model is not None or (model.setok_config or {}).get("text_config") is not None


def check_tokenizer_model(model: TokenizerModelConfig, check_paths: bool):
    fresh = [key for key in ("setok_config", "vision_model", "text_model") if getattr(model, key) is not None]
    if model.init_from is not None and fresh:
        raise ConfigError(
            f"`model.init_from` continues a saved SeTok, whose config is fixed: drop `model.{fresh[0]}` (or "
            "`model.init_from` to build a new one)."
        )
    if model.init_from is None and not fresh:
        raise ConfigError(
            "`model` needs `init_from` (a saved SetokForImageReconstruction) or `setok_config` and/or `vision_model` "
            "(a new SeTok)."
        )
    setok_config = model.setok_config or {}
    if model.text_model is not None and model.vision_model is None and "vision_config" not in setok_config:
        # Without it SetokConfig would fall back to a randomly initialised SigLIP so400m: surely not what was meant.
        raise ConfigError(
            "`model.text_model` without `model.vision_model` trains a fresh vision encoder: describe it in "
            "`model.setok_config.vision_config` (or name a pretrained one in `model.vision_model`)."
        )
    for key, source in (("vision_config", "vision_model"), ("text_config", "text_model")):
        if key in setok_config and getattr(model, source) is not None:
            raise ConfigError(f"`model.setok_config.{key}` and `model.{source}` both describe that encoder: keep one.")
    if model.setok_config is not None:
        check_setok_config(setok_config)
    for key in ("vision_model", "text_model", "text_tokenizer"):
        check_source(getattr(model, key), f"model.{key}", check_paths)

    if model.init_from is not None and check_paths:
        saved = SavedModelConfig.read(model.init_from, "model.init_from")
        saved.require(EXPECTED_MODEL_TYPE["tokenizer"], RECONSTRUCTION_HEAD)
        saved_tokenizer = os.path.isfile(os.path.join(model.init_from, "tokenizer_config.json"))
        if saved.has_text_config and model.text_tokenizer is None and not saved_tokenizer:
            raise ConfigError(
                f"`model.init_from` {model.init_from} has a concept contrast but no tokenizer for its text encoder: "
                "set `model.text_tokenizer`."
            )
    fresh_text_encoder = model.init_from is None and model.text_model is None and has_concept_contrast(model)
    if fresh_text_encoder and model.text_tokenizer is None:
        raise ConfigError(
            "The concept contrast (`model.setok_config.text_config`) needs a tokenizer for its text encoder: set "
            "`model.text_tokenizer` (a folder or Hub id)."
        )


def check_pretrain_model(model: PretrainModelConfig, check_paths: bool):
    # With `init_from`, `setok` may still supply the detokenizer of a generation head to add.
    assembly_only = ("language_model", "tokenizer", "gguf_file") + (() if model.train_generation_head else ("setok",))
    assembled = [key for key in assembly_only if getattr(model, key)]
    if model.init_from is not None and assembled:
        raise ConfigError(
            f"`model.init_from` continues a saved Setokim: drop `model.{assembled[0]}` (or `model.init_from` to "
            "assemble a new one from `setok` and `language_model`)."
        )
    if model.init_from is None and (model.setok is None or model.language_model is None):
        raise ConfigError(
            "`model` needs `init_from` (a saved Setokim) or both `setok` (the stage-1 SeTok folder) and "
            "`language_model` (a causal LM's Hub id or folder)."
        )
    for key in ("generation_head_width", "generation_head_depth"):
        check_count(getattr(model, key), f"model.{key}")
    check_generation_training(model)
    if not check_paths:
        return
    if model.init_from is None:
        # A generation head needs the stage-1 detokenizer, which only the full SetokForImageReconstruction holds.
        architecture = RECONSTRUCTION_HEAD if model.train_generation_head else None
        SavedModelConfig.read(model.setok, "model.setok").require(EXPECTED_MODEL_TYPE["tokenizer"], architecture)
        check_source(model.language_model, "model.language_model", check_paths)
        check_source(model.tokenizer, "model.tokenizer", check_paths)
        return
    saved = SavedModelConfig.read(model.init_from, "model.init_from").require(EXPECTED_MODEL_TYPE["pretrain"])
    if model.train_generation_head and not saved.has_generation_head:
        if model.setok is None:
            raise ConfigError(
                f"`model.init_from` {model.init_from} has no generation head: set `model.setok` (the stage-1 SeTok, "
                "whose detokenizer the new head draws for) so that one can be added."
            )
        SavedModelConfig.read(model.setok, "model.setok").require(
            EXPECTED_MODEL_TYPE["tokenizer"], RECONSTRUCTION_HEAD
        )
    elif model.setok is not None:
        raise ConfigError(
            f"`model.init_from` {model.init_from} already has a generation head: drop `model.setok`, which only "
            "supplies the detokenizer of a new one."
        )


def check_generation_training(model: GenerationTrainingConfig):
    """The generation head's training keys, which stages 2 and 3 share: the loss settings' ranges, and condition
    dropout's probabilities (three exclusive cases of one draw) and its need of the head."""
    check_count(model.diffusion_noise_repeats, "model.diffusion_noise_repeats")
    check_between(model.generation_mask_ratio_min, 0, 1, "model.generation_mask_ratio_min")
    check_not_negative(model.diffusion_loss_weight, "model.diffusion_loss_weight")
    dropout = {kind: getattr(model, f"condition_{kind}_dropout") for kind in ("text", "image", "both")}
    for kind, value in dropout.items():
        check_between(value, 0, 1, f"model.condition_{kind}_dropout")
    if sum(dropout.values()) > 1:
        raise ConfigError(
            "`model.condition_text_dropout`, `condition_image_dropout` and `condition_both_dropout` are exclusive "
            f"cases of one draw: their sum must be at most 1, got {sum(dropout.values()):g}."
        )
    if any(dropout.values()) and not model.train_generation_head:
        raise ConfigError(
            "`model.condition_*_dropout` trains classifier-free guidance of the generation head: set "
            "`model.train_generation_head: true`."
        )


def mask_decoder_sizes(model: SFTModelConfig) -> dict[str, int]:
    """The sizes of the mask decoder `model.train_mask_decoder` adds: the section's, else SetokimConfig's defaults
    (keyword arguments of `add_mask_decoder`)."""
    sizes = {name: getattr(model, f"mask_decoder_{name}") for name in MASK_DECODER_SIZES}
    return {name: _default_size(name) if value is None else value for name, value in sizes.items()}


def _default_size(name: str) -> int:
    from ...modeling import SetokimConfig

    return getattr(SetokimConfig, f"mask_decoder_{name}")


def check_sft_model(model: SFTModelConfig, check_paths: bool) -> SavedModelConfig | None:
    """The stage-3 `model` section; with `check_paths`, returns the `init_from` checkpoint's config (read once)."""
    if model.lora is False and (model.qlora or model.merge_adapters):
        flag = "qlora" if model.qlora else "merge_adapters"
        raise ConfigError(f"`model.{flag}` needs LoRA adapters: set `model.lora` to true or to LoraConfig overrides.")
    if isinstance(model.lora, dict):
        from ..sft_trainer import GENERATION_HEAD, setokim_lora_config

        try:
            lora = setokim_lora_config(**model.lora)
        except (TypeError, ValueError) as error:
            raise ConfigError(f"`model.lora` (LoraConfig overrides): {error}") from error
        if not model.train_generation_head and GENERATION_HEAD in (lora.modules_to_save or []):
            raise ConfigError(
                f"`model.lora` sets `modules_to_save` to {lora.modules_to_save!r}, which trains the generation head, "
                f"but `model.train_generation_head` is false: drop {GENERATION_HEAD!r} from it (or set "
                "`model.train_generation_head: true`)."
            )
        if model.train_mask_decoder and "mask_decoder" not in (lora.modules_to_save or []):
            raise ConfigError(
                f"`model.lora` sets `modules_to_save` to {lora.modules_to_save!r}, without `mask_decoder`: under LoRA "
                "the decoder that `model.train_mask_decoder` trains would stay frozen. Add 'mask_decoder' to it."
            )
    written = _check_mask_decoder(model)
    check_generation_training(model)
    if not check_paths:
        return None
    saved = SavedModelConfig.read(model.init_from, "model.init_from").require(EXPECTED_MODEL_TYPE["sft"])
    if model.train_generation_head and not saved.has_generation_head:
        raise ConfigError(
            f"`model.train_generation_head` trains the generation head, and `model.init_from` {model.init_from} has "
            "none (stage 3 adds no head): train one in stage 2 (`model.train_generation_head: true` there) and start "
            "from that model."
        )
    if model.train_generation_head and model.lora is not False and saved.generation_token_scale is None:
        raise ConfigError(
            f"`model.train_generation_head` with LoRA: `model.init_from` {model.init_from} has no "
            "`generation_token_scale` (stage 2 sets it when it trains the head), and a scale estimated now could not "
            "be saved with the adapter: start from a model with a trained head, or set `model.lora: false`."
        )
    if saved.has_mask_decoder:
        for name, value in written.items():
            has = saved.mask_decoder_sizes.get(name) or _default_size(name)
            if value != has:
                raise ConfigError(
                    f"`model.mask_decoder_{name}` is {value}, but `model.init_from` {model.init_from} already has a "
                    f"mask decoder, of {name} {has}, which is trained as it is: drop the key (or write {has})."
                )
    return saved


def _check_mask_decoder(model: SFTModelConfig) -> dict[str, int]:
    """The mask decoder's keys; returns the sizes the section writes."""
    written = {
        name: getattr(model, f"mask_decoder_{name}")
        for name in MASK_DECODER_SIZES
        if getattr(model, f"mask_decoder_{name}") is not None
    }
    for name, value in written.items():
        check_count(value, f"model.mask_decoder_{name}")
    check_not_negative(model.mask_loss_weight, "model.mask_loss_weight")
    if written and not model.train_mask_decoder:
        raise ConfigError(
            f"`model.mask_decoder_{next(iter(written))}` sizes the mask decoder that `model.train_mask_decoder: true` "
            "adds, and that is false here: drop the key (or set `model.train_mask_decoder: true`)."
        )
    if model.train_mask_decoder:
        from ...modeling import SetokimConfig

        sizes = mask_decoder_sizes(model)
        try:  # the model config's own rules for the sizes, which the decoder's layers need
            SetokimConfig(use_mask_decoder=True, **{f"mask_decoder_{name}": v for name, v in sizes.items()})
        except ValueError as error:
            keys = " and ".join(f"`model.mask_decoder_{name}` ({sizes[name]})" for name in ("width", "heads"))
            raise ConfigError(f"{keys}: {error}") from error
    return written
