"""Loading guards shared by the SeTok and Setokim model classes (shipped with them as Hub remote code).

- `check_model_type`: `from_pretrained` of a checkpoint of another model type (a BERT folder into `SetokModel`) is an
  error, where transformers would only warn and return a randomly initialised model.
- `initialize_native_submodels`: transformers initialises the sub-models of a model defined outside `transformers.`
  through its custom-code branch, which skips every module without parameters of its own (SigLIP's attention and
  MLP blocks), so missing weights got another init than in a freshly built model. Running each native sub-model's own
  `initialize_weights` first makes both ways one init.
"""

import os

from transformers import PreTrainedConfig, PreTrainedModel

__all__ = ["HUB_KWARGS", "check_model_type", "initialize_native_submodels"]

# The `from_pretrained` keyword arguments that say where config.json is read from.
HUB_KWARGS = ("cache_dir", "force_download", "proxies", "token", "local_files_only", "revision", "subfolder")


def check_model_type(
    pretrained_model_name_or_path: str | os.PathLike | None,
    expected_model_type: str,
    *,
    class_name: str | None = None,
    **from_pretrained_kwargs,
) -> str | None:
    """Refuse a checkpoint whose config.json names another `model_type` than `expected_model_type`.

    Call it first in a `from_pretrained` override with the same arguments: `check_model_type(name_or_path,
    cls.config_class.model_type, class_name=cls.__name__, **kwargs)`. Of `from_pretrained_kwargs` only the Hub
    arguments (`subfolder`, `revision`, `token`, ...) are used and a `config`: an explicit config object is honoured
    (nothing is checked), a config path or name is checked instead of the checkpoint. Returns the model type that was
    read, or `None` when nothing was checked (no checkpoint, an explicit config, a GGUF file, a config without
    `model_type`). Raises `ValueError` naming the checkpoint, its model type and the expected one; a missing
    checkpoint raises what transformers raises for it.
    """
    config = from_pretrained_kwargs.get("config")
    if isinstance(config, PreTrainedConfig) or from_pretrained_kwargs.get("gguf_file"):
        return None
    source = config if config is not None else pretrained_model_name_or_path
    if source is None:
        return None
    hub_kwargs = {
        key: from_pretrained_kwargs[key] for key in HUB_KWARGS if from_pretrained_kwargs.get(key) is not None
    }
    config_dict, _ = PreTrainedConfig.get_config_dict(source, **hub_kwargs)
    found = config_dict.get("model_type")
    if found is None or found == expected_model_type:
        return found
    where = os.path.join(str(source), hub_kwargs["subfolder"]) if hub_kwargs.get("subfolder") else str(source)
    loader = f"{class_name} loads" if class_name else "Expected"
    raise ValueError(
        f"{where} holds a checkpoint of model type {found!r} (its config.json), but {loader} {expected_model_type!r} "
        f"checkpoints. Load it with its own class (AutoModel.from_pretrained), or pass `config=` to load its weights "
        f"into this architecture anyway."
    )


def initialize_native_submodels(model: PreTrainedModel) -> None:
    """Initialise every transformers-native sub-model of `model` (the vision or text encoder) with its own
    `initialize_weights`, as its own constructor does; weights already loaded or initialised are left alone."""
    for module in model.modules():
        if module is not model and isinstance(module, PreTrainedModel) and not module.is_custom_code():
            module.initialize_weights()
