"""The schema of a training config: one model and one data section per stage, and the whole file (`StageConfig`).

Plain dataclasses: their fields are the keys a YAML section may hold and their annotations the values it takes
(`typed_yaml` checks both). What the values must satisfy beyond their types is for `model_checks`, `data_checks`
and `stage_checks`.
"""

import os
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = [
    "DTYPE",
    "EXPECTED_MODEL_TYPE",
    "ON_ERROR",
    "SCHEMA",
    "STAGES",
    "EditingDataConfig",
    "GenerationTrainingConfig",
    "PretrainDataConfig",
    "PretrainModelConfig",
    "SFTDataConfig",
    "SFTModelConfig",
    "SegmentationDataConfig",
    "StageConfig",
    "TokenizerDataConfig",
    "TokenizerModelConfig",
]

STAGES = ("tokenizer", "pretrain", "sft")
ON_ERROR = Literal["fail", "skip"]
DTYPE = Literal["auto", "float32", "bfloat16", "float16"]


@dataclass
class TokenizerModelConfig:
    """Stage 1: what SeTok starts from.

    Either `init_from` a saved SetokForImageReconstruction (to continue training it), or a fresh model from
    `setok_config` (SetokConfig keys), optionally around pretrained encoders: `vision_model` and `text_model` (the
    frozen text encoder of the concept contrast) name checkpoints for `from_pretrained_encoders`. `text_model` alone
    pairs the pretrained text encoder with a fresh vision encoder from `setok_config.vision_config`, trained from
    scratch when `setok_config.freeze_vision_encoder` is false.
    """

    init_from: str | None = None
    setok_config: dict | None = None
    vision_model: str | None = None
    text_model: str | None = None
    # The concept contrast's tokenizer; defaults to `text_model`, or to `init_from` (stage 1 saves it there).
    text_tokenizer: str | None = None


@dataclass(kw_only=True)
class GenerationTrainingConfig:
    """The generation head's training, the same keys in stages 2 and 3 (`model.*`): `train_generation_head` trains
    it on the chats that draw an image (text-to-image, edits), and the rest sets its loss and condition dropout."""

    train_generation_head: bool = False
    generation_mask_ratio_min: float = 0.7  # each target image hides 70-100 % of its tokens (MAR)
    diffusion_noise_repeats: int = 4  # noise draws per hidden token
    diffusion_loss_weight: float = 1.0
    # Classifier-free guidance: the probability that a drawing sample's prompt text, an edit's source image, or both
    # are dropped from its chat in a training step (InstructPix2Pix's three exclusive cases; their sum at most 1).
    condition_text_dropout: float = 0.0
    condition_image_dropout: float = 0.0
    condition_both_dropout: float = 0.0


@dataclass
class PretrainModelConfig(GenerationTrainingConfig):
    """Stage 2: either `init_from` a saved Setokim, or assemble one from the stage-1 `setok` folder and a causal LM
    (`language_model`, a Hub id or folder; `gguf_file` for a GGUF checkpoint; `tokenizer` defaults to the LM's).
    `train_generation_head` also trains the generation head (adding one when the model has none), on text-to-image
    chats (`data.text_to_image`). A model without one gets a fresh head of `generation_head_width` x
    `generation_head_depth` and the detokenizer of the stage-1 SeTok (`setok`, also with `init_from`)."""

    init_from: str | None = None
    setok: str | None = None
    language_model: str | None = None
    tokenizer: str | None = None
    gguf_file: str | None = None
    dtype: DTYPE | None = None
    train_language_model: bool = False  # False: the projector and the new token rows only (spec 3)
    generation_head_width: int = 1024
    generation_head_depth: int = 3


@dataclass
class SFTModelConfig(GenerationTrainingConfig):
    """Stage 3: the stage-2 Setokim to tune. `lora`: false (full fine-tuning of the LLM and projector), true (the
    paper's r=128, alpha=256, dropout=0.05) or a mapping of LoraConfig overrides. `qlora` loads the LLM in 4 bits
    (needs LoRA). `merge_adapters` also writes output_dir/merged, a plain Setokim with the adapter folded in.
    `train_generation_head` trains the generation head the stage-2 model has (whole, `modules_to_save` under LoRA)
    on the chats that draw an image: the edits of `data.editing`, and text-to-image chats among the conversations."""

    init_from: str
    lora: bool | dict = True
    qlora: bool = False
    merge_adapters: bool = False
    dtype: DTYPE | None = None
    # Referring segmentation (`data.segmentation`): true trains the mask decoder, adding a fresh one of these sizes
    # (default 256 wide, 2 deep, 8 heads) when the model has none; false leaves a decoder the model has frozen. A size
    # written for a model that has a decoder must be that decoder's.
    train_mask_decoder: bool = False
    mask_decoder_width: int | None = None
    mask_decoder_depth: int | None = None
    mask_decoder_heads: int | None = None
    mask_loss_weight: float = 1.0  # the mask decoder's loss (focal + dice + IoU) next to the LM loss


@dataclass
class TokenizerDataConfig:
    """Stage 1: a JSON Lines file of {"image": path, "caption": str, "concepts": [str]} (`load_image_text_jsonl`)."""

    path: str | list[str]
    format: Literal["image_text", "webdataset"] = "image_text"
    image_folder: str | None = None  # image paths are relative to it; default: the file's folder
    on_error: ON_ERROR = "fail"  # "skip" drops bad records (counted in the log) instead of stopping
    verify_images: bool = False  # also decode every image at load time (slow on big sets)
    # Read lazily (a datasets.IterableDataset: records checked as they stream, shards split across processes,
    # resumed from the stream's state); needs `training.max_steps`. `path` may then be a folder, a glob or a list.
    streaming: bool = False
    webdataset_columns: dict[str, str] | None = (
        None  # webdataset only: record field -> tar member, e.g. {"image": "png"}
    )
    text_source: Literal["concepts", "caption"] = "concepts"  # what the concept contrast matches tokens against
    concept_template: str = "a photo of a {}"


@dataclass
class PretrainDataConfig:
    """Stage 2: captions (`image_text`, turned into captioning chats with `caption_prompt`), LLaVA JSON (`llava`)
    or a dataset with `images` and `messages` columns (`hub`: a Hub id or a local dataset folder)."""

    path: str | list[str]
    format: Literal["image_text", "llava", "hub", "webdataset"] = "image_text"
    image_folder: str | None = None
    split: str = "train"  # hub only
    image_column: str = "images"  # hub only
    messages_column: str = "messages"  # hub only
    data_files: str | list[str] | None = None  # hub only: the files of a builder `path` (parquet, json, ...)
    on_error: ON_ERROR = "fail"
    verify_images: bool = False
    # Read lazily (a datasets.IterableDataset: records checked as they stream, shards split across processes,
    # resumed from the stream's state); needs `training.max_steps`. `path` may then be a folder, a glob or a list.
    streaming: bool = False
    webdataset_columns: dict[str, str] | None = (
        None  # webdataset only: record field -> tar member, e.g. {"image": "png"}
    )
    caption_prompt: str = "Describe the image."  # image_text only
    # image_text only: each pair as a captioning chat, and/or as a text-to-image chat (needs the generation head).
    captioning: bool = True
    text_to_image: bool = False
    text_to_image_template: str = "Generate an image of {}"  # the user turn; `{}` is the caption
    max_length: int | None = None  # longest sample, image tokens included; longer ones are an error, never cut


@dataclass
class SegmentationDataConfig:
    """Stage 3's referring-segmentation records (`data.segmentation`), mixed with the conversations of `data.path`:
    a JSONL file (`jsonl`, `load_segmentation_jsonl`), RefCOCO's refs pickle with its COCO `instances` JSON
    (`refcoco`, `load_refcoco`), or a dataset with image, expression (or messages) and mask columns (`hub`: a Hub id
    or a dataset folder, `load_segmentation_dataset`)."""

    path: str
    format: Literal["jsonl", "refcoco", "hub"] = "jsonl"
    instances: str | None = None  # refcoco only: the COCO instances.json beside the refs pickle
    image_folder: str | None = None  # jsonl and refcoco: image (and mask) paths are relative to it
    split: str = "train"  # refcoco and hub
    data_files: str | list[str] | None = None  # hub only: the files of a builder `path` (parquet, json, ...)
    on_error: ON_ERROR = "fail"
    verify_images: bool = False
    prompt: str | None = None  # the request around `{expression}`; sets the processor's `segmentation_prompt`


@dataclass
class EditingDataConfig:
    """Stage 3's image edits (`data.editing`), each trained as the chat "user: <source> {instruction}" ->
    "assistant: <target>" (`editing_messages`), mixed with the conversations of `data.path`: a JSONL file of
    {"source", "instruction", "target", "mask"?} lines (`jsonl`, `load_editing_jsonl`), or a Hub id or dataset
    folder in InstructPix2Pix's or MagicBrush's layout (`instructpix2pix`, `magicbrush`: `load_instructpix2pix`,
    `load_magicbrush`). An edit's mask is not trained on, so the layouts' mask columns are not read."""

    path: str
    format: Literal["jsonl", "instructpix2pix", "magicbrush"] = "jsonl"
    image_folder: str | None = None  # jsonl only: image (and mask) paths are relative to it; default the file's folder
    split: str = "train"  # instructpix2pix and magicbrush
    data_files: str | list[str] | None = None  # instructpix2pix and magicbrush: the files of a builder `path`
    # instructpix2pix and magicbrush: the layout's column names, when the dataset names them otherwise (null: the
    # layout's own, e.g. `input_image` / `edit_prompt` / `edited_image` for InstructPix2Pix)
    source_column: str | None = None
    instruction_column: str | None = None
    target_column: str | None = None
    on_error: ON_ERROR = "fail"
    verify_images: bool = False


@dataclass
class SFTDataConfig:
    """Stage 3: LLaVA JSON (`llava`) or a dataset with `images` and `messages` columns (`hub`), and/or image edits
    (`editing`) and referring-segmentation records (`segmentation`): `path` may be left out when either is given."""

    path: str | list[str] | None = None
    format: Literal["llava", "hub", "webdataset"] = "llava"
    image_folder: str | None = None
    split: str = "train"
    image_column: str = "images"
    messages_column: str = "messages"
    data_files: str | list[str] | None = None  # hub only: the files of a builder `path` (parquet, json, ...)
    on_error: ON_ERROR = "fail"
    verify_images: bool = False
    # Read lazily (a datasets.IterableDataset: records checked as they stream, shards split across processes,
    # resumed from the stream's state); needs `training.max_steps`. `path` may then be a folder, a glob or a list.
    streaming: bool = False
    webdataset_columns: dict[str, str] | None = (
        None  # webdataset only: record field -> tar member, e.g. {"image": "png"}
    )
    max_length: int | None = None
    segmentation: SegmentationDataConfig | None = None
    editing: EditingDataConfig | None = None


@dataclass
class StageConfig:
    """A whole config file, checked. `training` holds the merged training arguments (defaults, then the file's);
    `build_training_arguments` turns them into the Trainer's argument object."""

    stage: Literal["tokenizer", "pretrain", "sft"]
    output_dir: str
    model: Any
    data: Any
    training: dict = field(default_factory=dict)

    @property
    def final_dir(self) -> str:
        return os.path.join(self.output_dir, "final")


SCHEMA = {
    "tokenizer": (TokenizerModelConfig, TokenizerDataConfig),
    "pretrain": (PretrainModelConfig, PretrainDataConfig),
    "sft": (SFTModelConfig, SFTDataConfig),
}
# The model_type each stage's `init_from` must hold (config.json), and for stage 1 the head it must have.
EXPECTED_MODEL_TYPE = {"tokenizer": "setok", "pretrain": "setokim", "sft": "setokim"}
