"""The three training stages, each from a checked `StageConfig` to a saved model:

    config -> data set (every record checked) -> model + processor -> collator -> trainer
           -> trainer.train(resume_from_checkpoint) -> output_dir/final (model and processor) -> metrics

Everything that can be wrong with the inputs fails before the model is built: the config (`load_config`), the
checkpoint to resume from (`resolve_resume`), then the data set, which is loaded and checked before the weights.
Checkpoints are the Trainer's own (`output_dir/checkpoint-N`: weights, optimiser, scheduler, RNG and data position),
written every `training.save_steps` steps, so a run stopped at any point resumes with `--resume auto` and loses only
the steps since the last complete checkpoint. A fresh run never silently replaces a previous one in its output_dir
(its checkpoints or its finished model): that takes `overwrite` (`setok train --overwrite`).
"""

import json
import logging
import os
import re
import shutil

import torch

from .config import (
    EXPECTED_MODEL_TYPE,
    ConfigError,
    SavedModelConfig,
    StageConfig,
    build_training_arguments,
    has_concept_contrast,
    mask_decoder_sizes,
)

__all__ = [
    "build_sft_model",
    "end_process_group",
    "finished_model",
    "last_complete_checkpoint",
    "previous_run",
    "resolve_resume",
    "run_pretrain_stage",
    "run_sft_stage",
    "run_stage",
    "run_tokenizer_stage",
]

logger = logging.getLogger(__name__)

TRAINER_STATE = "trainer_state.json"  # written last in a checkpoint: its presence marks a complete one
ADAPTER_CONFIG = "adapter_config.json"  # what stage 3 saves with LoRA instead of a whole model's config.json


def run_stage(config: StageConfig, resume: str | None = None, overwrite: bool = False) -> dict:
    """Trains the stage `config` describes; `resume` is a checkpoint folder, "auto" (the last one in output_dir) or
    None (a fresh run). A fresh run into an output_dir that holds a previous run (checkpoints, or a finished model in
    output_dir/final) is refused unless `overwrite`: then that run's checkpoints, final and merged folders are removed
    once the new run's data and model are ready, just before it trains. Returns the training metrics."""
    checkpoint = resolve_resume(config, resume, overwrite=overwrite)
    runner = {"tokenizer": run_tokenizer_stage, "pretrain": run_pretrain_stage, "sft": run_sft_stage}[config.stage]
    return runner(config, resume_from_checkpoint=checkpoint, overwrite=overwrite)


def end_process_group():
    """Ends a multi-process run in order: every process waits for the others, then leaves the process group. A
    process that exits with gloo's threads still running can abort ("terminate called without an active
    exception"), which turns a run that trained and saved correctly into a failed one. Without a process group (one
    process) it does nothing."""
    from accelerate import PartialState

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        state = PartialState()
        state.wait_for_everyone()
        state.destroy_process_group()


# --------------------------------------------------------------------------------------------------------------------
# Resuming


def _checkpoints(output_dir: str) -> list[str]:
    """`checkpoint-N` folders of `output_dir`, newest (highest N) first."""
    if not os.path.isdir(output_dir):
        return []
    steps = [
        (int(match.group(1)), name)
        for name in os.listdir(output_dir)
        if (match := re.fullmatch(r"checkpoint-(\d+)", name)) and os.path.isdir(os.path.join(output_dir, name))
    ]
    return [os.path.join(output_dir, name) for _, name in sorted(steps, reverse=True)]


def _is_complete(checkpoint: str) -> bool:
    try:
        with open(os.path.join(checkpoint, TRAINER_STATE), encoding="utf-8") as file:
            json.load(file)
    except (OSError, json.JSONDecodeError):
        return False
    return True


def last_complete_checkpoint(output_dir: str) -> str | None:
    """The newest checkpoint that was written to the end. A run killed while saving leaves a folder without (or
    with a truncated) trainer state; `transformers.trainer_utils.get_last_checkpoint` would pick that one."""
    for checkpoint in _checkpoints(output_dir):
        if _is_complete(checkpoint):
            return checkpoint
        logger.warning("Skipping %s: it was not written to the end (no readable %s).", checkpoint, TRAINER_STATE)
    return None


def finished_model(folder: str) -> bool:
    """Whether `folder` holds a saved model: a whole one (config.json) or a stage-3 LoRA adapter."""
    return SavedModelConfig.exists(folder) or os.path.isfile(os.path.join(folder, ADAPTER_CONFIG))


def previous_run(config: StageConfig) -> list[str]:
    """What a run into `config.output_dir` writes and a new one would replace: its checkpoint-N folders, newest first,
    then `final` and `merged` (stage 3's merged model), where they exist."""
    ends = [os.path.join(config.output_dir, name) for name in ("final", "merged")]
    return _checkpoints(config.output_dir) + [folder for folder in ends if os.path.isdir(folder)]


def resolve_resume(config: StageConfig, resume: str | None, overwrite: bool = False) -> str | None:
    """The checkpoint to resume from, checked. A fresh run into an output_dir with checkpoints, or with a finished
    model in `final`, is refused unless `overwrite`: its own checkpoints and model would replace them."""
    if resume is not None and overwrite:
        raise ConfigError(
            "--resume continues the run in `output_dir` and --overwrite replaces it with a new one: pass one of them."
        )
    if resume is None:
        existing = last_complete_checkpoint(config.output_dir)
        if existing is not None and not overwrite:
            raise ConfigError(
                f"`output_dir` {config.output_dir} already holds checkpoints (latest: {existing}): pass `--resume "
                "auto` to continue that run, `--overwrite` to replace it, or choose another `output_dir` for a new one."
            )
        if finished_model(config.final_dir) and not overwrite:
            raise ConfigError(
                f"`output_dir` {config.output_dir} already holds a trained model ({config.final_dir}): pass "
                "`--overwrite` to replace it with a new run, or choose another `output_dir`."
            )
        return None
    if resume == "auto":
        checkpoint = last_complete_checkpoint(config.output_dir)
        if checkpoint is None:
            raise ConfigError(
                f"--resume auto: no complete checkpoint-N folder in `output_dir` {config.output_dir} to resume from."
            )
    else:
        checkpoint = resume
        if not os.path.isdir(checkpoint):
            raise FileNotFoundError(f"--resume: no such checkpoint folder: {checkpoint}")
        if not _is_complete(checkpoint):
            raise ConfigError(
                f"--resume: {checkpoint} has no readable {TRAINER_STATE}: it is not a complete checkpoint."
            )
    if SavedModelConfig.exists(checkpoint):
        SavedModelConfig.read(checkpoint, "--resume").require(EXPECTED_MODEL_TYPE[config.stage])
    elif config.stage != "sft" or not os.path.isfile(os.path.join(checkpoint, ADAPTER_CONFIG)):
        # Only stage 3's LoRA checkpoints hold an adapter instead of a whole model.
        raise ConfigError(f"--resume: {checkpoint} holds no model of this stage (no config.json).")
    return checkpoint


# --------------------------------------------------------------------------------------------------------------------
# Shared steps


def _load_data(data, conversations: bool, require_text: str | None = None):
    """The data set of the `data` section (a `datasets.IterableDataset` with `data.streaming`); a bad or empty one is
    a ConfigError naming `data.path`. `require_text` makes a pair without that text a bad record (stage 1)."""
    from datasets import concatenate_datasets, interleave_datasets

    from .data import (
        captions_to_generation_messages,
        captions_to_messages,
        load_hub_dataset,
        load_image_text_jsonl,
        load_llava_json,
        load_webdataset,
    )

    checks = dict(on_error=data.on_error, verify_images=data.verify_images, streaming=data.streaming)
    try:
        if data.format == "hub":
            return load_hub_dataset(
                data.path,
                split=data.split,
                image_column=data.image_column,
                messages_column=data.messages_column,
                data_files=data.data_files,
                **checks,
            )
        if data.format == "llava":
            return load_llava_json(data.path, data.image_folder, **checks)
        if data.format == "webdataset":
            records = load_webdataset(data.path, data.webdataset_columns, require_text=require_text, **checks)
            if not conversations or "messages" in (records.features or {}):
                return records
            pairs = records
        else:
            pairs = load_image_text_jsonl(data.path, data.image_folder, require_text=require_text, **checks)
        if not conversations:
            return pairs
        chats = [captions_to_messages(pairs, data.caption_prompt)] if data.captioning else []
        if data.text_to_image:
            chats.append(captions_to_generation_messages(pairs, data.text_to_image_template))
        # A stream cannot be concatenated without reading the whole first part before the second: interleave.
        return interleave_datasets(chats) if data.streaming and len(chats) > 1 else concatenate_datasets(chats)
    except ValueError as error:  # DataValidationError included: a bad record, or nothing left to train on
        raise ConfigError(f"`data.path` ({data.path}): {error}") from error


def _stream_callbacks(config: StageConfig, resume_from_checkpoint: str | None) -> list:
    """With `data.streaming`, the callback that saves the stream's state in each checkpoint and restores it."""
    if not config.data.streaming:
        return []
    from .streaming import StreamStateCallback

    return [StreamStateCallback(resume_from_checkpoint)]


def _torch_dtype(name: str | None):
    return name if name in (None, "auto") else getattr(torch, name)


def _remove_previous_run(trainer, config: StageConfig):
    """`overwrite`: the main process removes the previous run (`previous_run`), the others wait for it, so that no
    stale checkpoint or model is left for `--resume auto` or a reader of `final` to take for the new run's."""
    if trainer.is_world_process_zero():
        folders = previous_run(config)
        if folders:
            logger.warning("--overwrite: removing the previous run in %s: %s", config.output_dir, ", ".join(folders))
        for folder in folders:
            shutil.rmtree(folder)
    trainer.accelerator.wait_for_everyone()


def _train_and_save(
    trainer, config: StageConfig, resume_from_checkpoint: str | None, overwrite: bool, extra_saves=()
) -> dict:
    """Train (with `overwrite`, after removing the previous run), then save the model (every process takes part:
    DeepSpeed and FSDP gather the shards) and, on the main process, what goes next to it: the processing class (saved
    by `save_model`) and `extra_saves`."""
    if overwrite:
        _remove_previous_run(trainer, config)
    final_dir = config.final_dir
    result = trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    trainer.save_model(final_dir)
    if trainer.is_world_process_zero():
        for item in extra_saves:
            item.save_pretrained(final_dir)
    metrics = dict(result.metrics, global_step=trainer.state.global_step)
    trainer.log_metrics("train", metrics)
    trainer.save_metrics("train", metrics)
    trainer.save_state()
    return metrics


# --------------------------------------------------------------------------------------------------------------------
# Stage 1: SeTok


def _training_seed(config: StageConfig) -> int:
    """`training.seed`, or the Trainer's default, before the training arguments are built."""
    import dataclasses

    from transformers import TrainingArguments

    default = {field.name: field.default for field in dataclasses.fields(TrainingArguments)}["seed"]
    return int(config.training.get("seed", default))


def run_tokenizer_stage(
    config: StageConfig, resume_from_checkpoint: str | None = None, overwrite: bool = False
) -> dict:
    from transformers import set_seed

    from .setok_trainer import SetokImageTextCollator, SetokTrainer

    contrast = has_concept_contrast(config.model)
    if config.data.streaming:  # checked record by record as it streams
        dataset = _load_data(
            config.data, conversations=False, require_text=config.data.text_source if contrast else None
        )
    else:
        dataset = _load_data(config.data, conversations=False)
        if contrast:
            _check_texts(dataset, config.data.text_source)
    # The model before the training arguments: with a DeepSpeed ZeRO-3 config, building the arguments turns on ZeRO-3's
    # partitioned construction for every model built after them, and a fresh SeTok's initialisation cannot run on
    # parameters that are already sharded (stage 1's models are small; stages 2-3 load theirs partitioned on purpose).
    set_seed(_training_seed(config))  # the fresh parts start alike in every process and every run
    model, image_processor, text_tokenizer = build_tokenizer_model(config.model)
    args = build_training_arguments(config)
    collator = SetokImageTextCollator(
        image_processor, text_tokenizer, text_source=config.data.text_source, template=config.data.concept_template
    )
    trainer = SetokTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=collator,
        processing_class=image_processor,
        callbacks=_stream_callbacks(config, resume_from_checkpoint),
    )
    # The text tokenizer goes next to the model so that `init_from: <output_dir>/final` finds it.
    extras = [text_tokenizer] if text_tokenizer is not None else []
    return _train_and_save(trainer, config, resume_from_checkpoint, overwrite, extras)


def build_tokenizer_model(model_config):
    """(SetokForImageReconstruction, SetokImageProcessor, text tokenizer or None) as the `model` section says."""
    from transformers import AutoTokenizer

    from ..modeling import SetokConfig, SetokForImageReconstruction
    from ..processing import SetokImageProcessor

    if model_config.init_from is not None:
        model = SetokForImageReconstruction.from_pretrained(model_config.init_from)
        if os.path.isfile(os.path.join(model_config.init_from, "preprocessor_config.json")):
            image_processor = SetokImageProcessor.from_pretrained(model_config.init_from)
        else:
            image_processor = _square_processor(model.config.image_size)
    elif model_config.vision_model is not None or model_config.text_model is not None:
        model = SetokForImageReconstruction.from_pretrained_encoders(
            model_config.vision_model, model_config.text_model, **(model_config.setok_config or {})
        )
        if model_config.vision_model is not None:
            image_processor = SetokImageProcessor.from_encoder(model_config.vision_model, model.config.image_size)
        else:
            image_processor = _square_processor(model.config.image_size)
    else:
        model = SetokForImageReconstruction(SetokConfig(**model_config.setok_config))
        image_processor = _square_processor(model.config.image_size)

    text_tokenizer = None
    if model.concept_contrast is not None:
        source = model_config.text_tokenizer or model_config.text_model or model_config.init_from
        text_tokenizer = AutoTokenizer.from_pretrained(source)
    return model, image_processor, text_tokenizer


def _square_processor(size: int):
    from ..processing import SetokImageProcessor

    return SetokImageProcessor(size={"height": size, "width": size})


def _check_texts(dataset, text_source: str):
    """Every record needs a text of the kind the concept contrast uses; the collator would stop mid-run otherwise."""
    column = "caption" if text_source == "caption" else "concepts"
    missing = sum(not value for value in dataset[column])  # the text columns only: no image is decoded
    if missing:
        other = "concepts" if text_source == "caption" else "caption"
        raise ConfigError(
            f"`data.text_source` is {text_source!r}, but {missing} of {len(dataset)} records of {column!r} have none: "
            f"use `data.text_source: {other}`, or fix the records."
        )


# --------------------------------------------------------------------------------------------------------------------
# Stage 2: Setokim pretraining


def run_pretrain_stage(
    config: StageConfig, resume_from_checkpoint: str | None = None, overwrite: bool = False
) -> dict:
    from transformers import set_seed

    from .collators import SetokimChatCollator
    from .setokim_trainer import SetokimPretrainTrainer

    dataset = _load_data(config.data, conversations=True)
    args = build_training_arguments(config)
    set_seed(args.seed)
    model, processor = build_pretrain_model(config.model)
    trainer = SetokimPretrainTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=SetokimChatCollator(processor, max_length=config.data.max_length),
        processing_class=processor,
        train_language_model=config.model.train_language_model,
        **_generation_training(config.model),
        callbacks=_stream_callbacks(config, resume_from_checkpoint),
    )
    return _train_and_save(trainer, config, resume_from_checkpoint, overwrite)


def _generation_training(model_config) -> dict:
    """The generation head's training keys of a stage-2 or stage-3 `model` section (`GenerationTrainingConfig`), as
    the trainers' keyword arguments of the same names."""
    from dataclasses import fields

    from .config import GenerationTrainingConfig

    return {field.name: getattr(model_config, field.name) for field in fields(GenerationTrainingConfig)}


def build_pretrain_model(model_config):
    """(SetokimForConditionalGeneration, SetokimProcessor): loaded, or assembled from SeTok and a causal LM."""
    from transformers import AutoProcessor

    from ..assembly import add_generation_head, build_setokim
    from ..modeling import SetokimForConditionalGeneration

    dtype = _torch_dtype(model_config.dtype)
    if model_config.init_from is not None:
        kwargs = {} if dtype is None else {"dtype": dtype}
        model = SetokimForConditionalGeneration.from_pretrained(model_config.init_from, **kwargs)
        processor = AutoProcessor.from_pretrained(model_config.init_from)
    else:
        lm_kwargs = {key: value for key, value in (("dtype", dtype), ("gguf_file", model_config.gguf_file)) if value}
        model, processor = build_setokim(
            model_config.setok, model_config.language_model, tokenizer_name_or_path=model_config.tokenizer, **lm_kwargs
        )
    if model_config.train_generation_head and model.generation_head is None:
        add_generation_head(
            model,
            model_config.setok,
            width=model_config.generation_head_width,
            depth=model_config.generation_head_depth,
        )
    _ensure_pad_token(processor)
    return model, processor


def _ensure_pad_token(processor):
    # Many causal LMs (Llama among them) ship without a pad token; padding positions are masked out anyway.
    tokenizer = processor.tokenizer
    if tokenizer.pad_token is None:
        logger.warning("The tokenizer has no pad token: padding with its eos token %r.", tokenizer.eos_token)
        tokenizer.pad_token = tokenizer.eos_token


# --------------------------------------------------------------------------------------------------------------------
# Stage 3: instruction tuning


def run_sft_stage(config: StageConfig, resume_from_checkpoint: str | None = None, overwrite: bool = False) -> dict:
    from transformers import set_seed

    from .collators import SetokimChatCollator
    from .sft_trainer import SetokimSFTTrainer, setokim_lora_config

    model_config, segmentation = config.model, config.data.segmentation
    dataset = _load_sft_data(config.data)
    args = build_training_arguments(config)
    set_seed(args.seed)
    model, processor, added_decoder = build_sft_model(model_config, args)
    if segmentation is not None and segmentation.prompt is not None:
        processor.segmentation_prompt = segmentation.prompt  # saved with the processor, read by the pipeline

    lora = model_config.lora
    peft_config = None if lora is False else setokim_lora_config(**(lora if isinstance(lora, dict) else {}))
    trainer = SetokimSFTTrainer(
        model,
        args=args,
        data_collator=SetokimChatCollator(processor, max_length=config.data.max_length),
        train_dataset=dataset,
        processing_class=processor,
        peft_config=peft_config,
        mask_loss_weight=model_config.mask_loss_weight,
        **_generation_training(model_config),
        callbacks=_stream_callbacks(config, resume_from_checkpoint),
    )
    if not model_config.train_mask_decoder:
        _freeze_mask_decoder(trainer.model)
    metrics = _train_and_save(trainer, config, resume_from_checkpoint, overwrite)

    if model_config.merge_adapters:
        # From the saved files, not the live model: that works the same after DDP, DeepSpeed or FSDP (whose live
        # weights are sharded) and for QLoRA (whose live base is 4-bit).
        trainer.accelerator.wait_for_everyone()
        if trainer.is_world_process_zero():
            merged_dir = os.path.join(config.output_dir, "merged")
            _merge_saved_adapters(model_config, config.final_dir, merged_dir, processor, added_decoder)
            metrics["merged_dir"] = merged_dir
    return metrics


def build_sft_model(model_config, args) -> tuple:
    """(SetokimForConditionalGeneration, SetokimProcessor, whether a mask decoder was added): the `init_from`
    checkpoint (its LLM in 4 bits for `qlora`), with a fresh mask decoder when `train_mask_decoder` asks for one and
    the model has none. `args` are the run's SFTConfig (its precision sets QLoRA's compute dtype)."""
    from accelerate import PartialState
    from transformers import AutoProcessor

    from ..assembly import add_mask_decoder
    from ..modeling import SetokimForConditionalGeneration
    from .sft_trainer import setokim_4bit_config

    kwargs = {} if model_config.dtype is None else {"dtype": _torch_dtype(model_config.dtype)}
    if model_config.qlora:
        compute = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32
        kwargs["quantization_config"] = setokim_4bit_config(bnb_4bit_compute_dtype=compute)
        # A quantized model is placed at load time, one whole copy per process (DDP).
        kwargs["device_map"] = {"": PartialState().local_process_index if torch.cuda.is_available() else "cpu"}
    model = SetokimForConditionalGeneration.from_pretrained(model_config.init_from, **kwargs)
    processor = AutoProcessor.from_pretrained(model_config.init_from)
    _ensure_pad_token(processor)
    added_decoder = model_config.train_mask_decoder and model.mask_decoder is None
    if added_decoder:
        add_mask_decoder(model, **mask_decoder_sizes(model_config))
        logger.info("Added a fresh mask decoder (%s) to %s.", mask_decoder_sizes(model_config), model_config.init_from)
    return model, processor, added_decoder


def _freeze_mask_decoder(model):
    """`train_mask_decoder: false`: a decoder the model has (LoRA's `modules_to_save` copy included) stays as it is;
    segmentation records then train the LLM and projector to prompt it. Before the optimizer is built (in `train`)."""
    for name, param in model.named_parameters():
        if ".mask_decoder." in f".{name}":
            param.requires_grad_(False)


def _merge_saved_adapters(model_config, final_dir: str, merged_dir: str, processor, added_decoder: bool):
    """output_dir/merged: the saved adapter folded into the full-precision `init_from` model. A decoder added by this
    run is not in `init_from`: the base gets one of the same sizes first, which the adapter's trained copy
    (`modules_to_save`) then replaces whole."""
    from ..assembly import add_mask_decoder
    from .sft_trainer import merge_adapters_from

    dtype = _torch_dtype(model_config.dtype) if model_config.dtype not in (None, "auto") else torch.float32
    sizes = mask_decoder_sizes(model_config)
    prepare = (lambda base: add_mask_decoder(base, **sizes)) if added_decoder else None
    merge_adapters_from(model_config.init_from, final_dir, merged_dir, processor, dtype=dtype, prepare_base=prepare)


def _load_sft_data(data):
    """Stage 3's records: the conversations of `data.path` and the edits of `data.editing` (as chats), the
    referring-segmentation records of `data.segmentation`, or all of them in one data set; with segmentation records
    it has `SEGMENTATION_FEATURES` (a conversation's `expression` and `mask` None), which the collator tells apart
    by the mask."""
    from datasets import concatenate_datasets

    conversations = None if data.path is None else _load_data(data, conversations=True)
    edits = None if data.editing is None else _load_editing_data(data.editing)
    chats = [part for part in (conversations, edits) if part is not None]
    if len(chats) > 1:
        # The images stay as stored (paths or bytes): the cast changes the schema, nothing is decoded.
        chats = [concatenate_datasets([conversations, edits.cast(conversations.features)])]
    objects = None if data.segmentation is None else _load_segmentation_data(data.segmentation)
    sources = {"conversations": conversations, "edits": edits, "segmentation records": objects}
    present = {what: part for what, part in sources.items() if part is not None}
    if len(present) > 1:  # all in memory: a stream is refused next to edits or segmentation records
        logger.info("Stage 3 trains on %s.", ", ".join(f"{len(part)} {what}" for what, part in present.items()))
    if objects is None:
        return chats[0]
    if not chats:
        return objects
    from .data import SEGMENTATION_FEATURES

    records = chats[0]
    empty = [None] * len(records)
    as_records = records.add_column("expression", empty).add_column("mask", empty).cast(SEGMENTATION_FEATURES)
    return concatenate_datasets([as_records, objects])


def _load_editing_data(editing):
    """The edits of `data.editing` as stage-3 chats (`edits_to_messages`), through the loader of its format; a bad
    or empty source is a ConfigError naming `data.editing.path` (skipped records are logged by the loader)."""
    from .data import edits_to_messages, load_editing_jsonl, load_instructpix2pix, load_magicbrush

    checks = dict(on_error=editing.on_error, verify_images=editing.verify_images)
    try:
        if editing.format == "jsonl":
            records = load_editing_jsonl(editing.path, editing.image_folder, **checks)
        else:
            columns = {
                f"{role}_column": getattr(editing, f"{role}_column")
                for role in ("source", "instruction", "target")
                if getattr(editing, f"{role}_column") is not None
            }
            # MagicBrush's masks are not read: stage 3 trains the edit's chat, which carries no mask.
            layout = dict(mask_column=None) if editing.format == "magicbrush" else {}
            loader = load_magicbrush if editing.format == "magicbrush" else load_instructpix2pix
            records = loader(
                editing.path, split=editing.split, data_files=editing.data_files, **columns, **layout, **checks
            )
        return edits_to_messages(records)
    except ValueError as error:  # DataValidationError included
        raise ConfigError(f"`data.editing.path` ({editing.path}): {error}") from error


def _load_segmentation_data(segmentation):
    """The records of `data.segmentation`, through the loader of its format; a bad or empty source is a ConfigError
    naming `data.segmentation.path` (skipped records are logged by the loader)."""
    from .data import load_refcoco, load_segmentation_dataset, load_segmentation_jsonl

    checks = dict(on_error=segmentation.on_error, verify_images=segmentation.verify_images)
    try:
        if segmentation.format == "refcoco":
            return load_refcoco(
                segmentation.path,
                segmentation.instances,
                segmentation.image_folder,
                split=segmentation.split,
                **checks,
            )
        if segmentation.format == "hub":
            return load_segmentation_dataset(
                segmentation.path, split=segmentation.split, data_files=segmentation.data_files, **checks
            )
        return load_segmentation_jsonl(segmentation.path, segmentation.image_folder, **checks)
    except ValueError as error:  # DataValidationError included
        raise ConfigError(f"`data.segmentation.path` ({segmentation.path}): {error}") from error
