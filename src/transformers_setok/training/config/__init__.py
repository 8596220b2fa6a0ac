"""Training configs: one YAML file per stage, checked in full before anything heavy is built or loaded.

    stage: tokenizer          # tokenizer (1) | pretrain (2) | sft (3); must match `setok train STAGE`
    output_dir: runs/setok    # checkpoints go to output_dir/checkpoint-N, the final model to output_dir/final
    model: {...}              # TokenizerModelConfig | PretrainModelConfig | SFTModelConfig
    data: {...}               # TokenizerDataConfig | PretrainDataConfig | SFTDataConfig (stage 3's
                              # `segmentation` and `editing` nested SegmentationDataConfig, EditingDataConfig)
    training: {...}           # TrainingArguments (stages 1-2) or trl's SFTConfig (stage 3) fields, over the
                              # stage's defaults (TRAINING_DEFAULTS)

`load_config` rejects, each with the dotted key it is about: unknown keys (listing the allowed ones), values of the
wrong type, missing required keys, a `stage` that is not the command's, training arguments the Trainer would refuse
or reinterpret, SetokConfig keys and values (the nested encoder configs included) their config classes would not
take or would keep unused, dataset and model paths that do not exist, and `init_from` checkpoints of another model
type. Errors are `ConfigError` (a ValueError), or FileNotFoundError for missing paths.

The modules, one job each:

    typed_yaml          YAML reading; keys and types of a section against a dataclass schema (generic)
    schema              the sections of each stage, as dataclasses, and StageConfig
    bounds              range checks of single values
    setok_config        `model.setok_config` against SetokConfig and the nested encoder config classes
    saved_model         a checkpoint folder's config.json, read once (SavedModelConfig)
    model_checks        each stage's `model` section
    data_checks         each stage's `data` section
    stage_checks        which checks each stage runs, and those between its sections
    training_arguments  the `training` section, and the TrainingArguments / SFTConfig built from it
    loading             load_config
"""

from .loading import load_config
from .model_checks import has_concept_contrast, mask_decoder_sizes
from .saved_model import SavedModelConfig, check_checkpoint_type, read_model_type
from .schema import (
    DTYPE,
    EXPECTED_MODEL_TYPE,
    ON_ERROR,
    SCHEMA,
    STAGES,
    EditingDataConfig,
    GenerationTrainingConfig,
    PretrainDataConfig,
    PretrainModelConfig,
    SegmentationDataConfig,
    SFTDataConfig,
    SFTModelConfig,
    StageConfig,
    TokenizerDataConfig,
    TokenizerModelConfig,
)
from .training_arguments import TRAINING_DEFAULTS, build_training_arguments
from .typed_yaml import ConfigError, build_section, check_keys, check_type, merge, read_yaml

__all__ = [
    "DTYPE",
    "EXPECTED_MODEL_TYPE",
    "ON_ERROR",
    "SCHEMA",
    "STAGES",
    "TRAINING_DEFAULTS",
    "ConfigError",
    "EditingDataConfig",
    "GenerationTrainingConfig",
    "PretrainDataConfig",
    "PretrainModelConfig",
    "SFTDataConfig",
    "SFTModelConfig",
    "SavedModelConfig",
    "SegmentationDataConfig",
    "StageConfig",
    "TokenizerDataConfig",
    "TokenizerModelConfig",
    "build_section",
    "build_training_arguments",
    "check_checkpoint_type",
    "check_keys",
    "check_type",
    "has_concept_contrast",
    "load_config",
    "mask_decoder_sizes",
    "merge",
    "read_model_type",
    "read_yaml",
]
