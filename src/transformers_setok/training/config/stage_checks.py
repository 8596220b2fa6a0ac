"""Per stage, the checks of a built StageConfig: its model section's, its data section's, then those between the
two. Which checks run is decided by the stage alone."""

from .data_checks import check_pretrain_data, check_sft_data, check_tokenizer_data
from .model_checks import check_pretrain_model, check_sft_model, check_tokenizer_model
from .schema import SFTModelConfig, StageConfig
from .typed_yaml import ConfigError

__all__ = ["check_stage"]


def check_stage(config: StageConfig, check_paths: bool):
    """Every check of `config`'s stage; `check_paths=False` skips those that need the files named to exist."""
    _STAGE_CHECKS[config.stage](config, check_paths)
    if config.data.streaming:
        _check_streaming(config)


def _check_streaming(config: StageConfig):
    # A stream has no length: the Trainer needs a step count, and resuming needs the stream's state in this process.
    if config.training.get("max_steps", -1) < 1:
        raise ConfigError("`data.streaming` reads a stream without a length: set `training.max_steps`.")
    if config.training.get("dataloader_num_workers", 0) != 0:
        raise ConfigError(
            "`data.streaming` with `training.dataloader_num_workers` > 0: the stream's position would live in the "
            "workers and be lost on resume; use 0 (the stream reads ahead by itself)."
        )


def _check_tokenizer_stage(config: StageConfig, check_paths: bool):
    check_tokenizer_model(config.model, check_paths)
    check_tokenizer_data(config.data, check_paths)


def _check_pretrain_stage(config: StageConfig, check_paths: bool):
    model, data = config.model, config.data
    check_pretrain_model(model, check_paths)
    check_pretrain_data(data, check_paths)
    if data.text_to_image and not model.train_generation_head:
        raise ConfigError("`data.text_to_image` trains the generation head: set `model.train_generation_head: true`.")
    if data.format == "image_text" and model.train_generation_head and not data.text_to_image:
        raise ConfigError(
            "`model.train_generation_head` needs text-to-image chats: set `data.text_to_image: true` (captions alone "
            "never reach the head)."
        )


def _check_sft_stage(config: StageConfig, check_paths: bool):
    model, data = config.model, config.data
    saved = check_sft_model(model, check_paths)
    check_sft_data(data, check_paths)
    if data.segmentation is None:
        if model.train_mask_decoder:
            raise ConfigError(
                "`model.train_mask_decoder` trains the mask decoder on referring-segmentation records: set "
                "`data.segmentation` (or drop `model.train_mask_decoder`)."
            )
        if model.mask_loss_weight != SFTModelConfig.mask_loss_weight:
            raise ConfigError(
                "`model.mask_loss_weight` weighs the mask loss of `data.segmentation` records, and this config has "
                "none: drop it (or set `data.segmentation`)."
            )
    if data.editing is not None and not model.train_generation_head:
        raise ConfigError(
            "`data.editing` trains the generation head, which draws each edit's target: set "
            "`model.train_generation_head: true` (the `model.init_from` Setokim must have a head, from stage 2)."
        )
    if saved is None:  # without `check_paths`: what the checkpoint holds is not known
        return
    if data.segmentation is not None and not model.train_mask_decoder and not saved.has_mask_decoder:
        raise ConfigError(
            f"`data.segmentation` needs a mask decoder, and `model.init_from` {model.init_from} has none: set "
            "`model.train_mask_decoder: true` to add one and train it."
        )
    if (
        model.train_mask_decoder
        and not saved.has_mask_decoder
        and model.lora is not False
        and not model.merge_adapters
    ):
        raise ConfigError(
            f"`model.train_mask_decoder` adds a mask decoder to `model.init_from` {model.init_from}, which has none, "
            "so the LoRA adapter saved in output_dir/final would not load onto init_from: set "
            "`model.merge_adapters: true` (output_dir/merged is then a whole Setokim with the decoder), or "
            "`model.lora: false`."
        )


_STAGE_CHECKS = {"tokenizer": _check_tokenizer_stage, "pretrain": _check_pretrain_stage, "sft": _check_sft_stage}
