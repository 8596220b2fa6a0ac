"""The entry point: load an upstream checkpoint, detect what it holds, convert it, build our model to save.

    upstream = load_upstream_checkpoint(path)                  # a file, a sharded save or a folder
    kind = detect_kind(upstream)                               # "tokenizer" (stage 1) or "mllm"
    config = load_config(config_path, kind)                    # optional: a saved config or config.json
    result = convert_checkpoint(upstream, kind, config)        # config=None: inferred from the shapes
    print(result.report())
    build_converted_model(result).save_pretrained(out)

The functions below come in that order; `scripts/convert_original_setok.py` is this sequence behind a command line.
"""

import json
import os

import torch

from ..modeling import SetokConfig, SetokimConfig
from .config_inference import infer_setok_config, infer_setokim_config
from .mapping import strip_ddp_prefix
from .mllm import convert_mllm_state_dict
from .report import ConversionError, ConversionResult
from .tokenizer import convert_tokenizer_state_dict

WEIGHTS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def load_upstream_checkpoint(path: str) -> dict[str, torch.Tensor]:
    """A state dict from `.safetensors`, or from `.bin`/`.pt` via `torch.load(weights_only=True)`.

    Also a sharded save: its `*.index.json` (HF `weight_map`) or the folder holding it, whose shards are merged; and a
    folder holding a single weights file. Trainer-style wrappers (`{"state_dict": ...}`, `{"module": ...}`,
    `{"model": ...}`) are unwrapped.
    """
    path = _resolve_checkpoint(str(path))
    if path.endswith(".index.json"):
        with open(path, encoding="utf-8") as file:
            weight_map = json.load(file)["weight_map"]
        folder = os.path.dirname(path)
        merged = {}
        for shard in sorted(set(weight_map.values())):
            merged |= load_upstream_checkpoint(os.path.join(folder, shard))
        if absent := sorted(set(weight_map) - set(merged)):
            raise ConversionError(f"{path} lists keys its shards do not hold: {absent[:5]}")
        return merged
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("state_dict", "module", "model"):
        if isinstance(loaded.get(wrapper), dict):
            loaded = loaded[wrapper]
            break
    return {key: value for key, value in loaded.items() if isinstance(value, torch.Tensor)}


def _resolve_checkpoint(path: str) -> str:
    """A folder -> its `*.index.json` (sharded save) or its single weights file; a file is returned unchanged."""
    if not os.path.isdir(path):
        return path
    files = sorted(os.listdir(path))
    indexes = [name for name in files if name.endswith(".index.json")]
    for candidates in (indexes, [name for name in files if name.endswith(WEIGHTS_SUFFIXES)]):
        if len(candidates) == 1:
            return os.path.join(path, candidates[0])
        if len(candidates) > 1:
            raise ConversionError(f"{path} holds several checkpoints {candidates}: pass the one to convert.")
    raise ConversionError(f"{path} holds no *.index.json nor weights file ({', '.join(WEIGHTS_SUFFIXES)}).")


def detect_kind(state_dict: dict[str, torch.Tensor]) -> str:
    """`"mllm"` for a full Setokim checkpoint, `"tokenizer"` for a stage-1 file."""
    keys = list(strip_ddp_prefix(state_dict))
    if any(
        key.startswith(("model.vision_tower.", "model.layers.", "model.embed_tokens.", "lm_head.")) for key in keys
    ):
        return "mllm"
    if any(key.startswith("tokenizer.") for key in keys):
        return "tokenizer"
    raise ConversionError(
        "Neither a stage-1 tokenizer (tokenizer.*) nor a Setokim (model.vision_tower.*, lm_head.*). A projector-only "
        "file (model.mm_in_projector.*, LLaVA's mm_projector.bin) is not supported: convert the full MLLM checkpoint."
    )


def load_config(path: str, kind: str) -> SetokConfig | SetokimConfig:
    """A config json file, or a saved folder holding config.json."""
    return (SetokimConfig if kind == "mllm" else SetokConfig).from_pretrained(path)


def convert_checkpoint(upstream: dict[str, torch.Tensor], kind: str, config=None) -> ConversionResult:
    """Convert `upstream` of `kind` ("tokenizer" or "mllm") for `config` (inferred from the shapes when None)."""
    if kind == "mllm":
        return convert_mllm_state_dict(upstream, config or infer_setokim_config(upstream))
    if kind == "tokenizer":
        return convert_tokenizer_state_dict(upstream, config or infer_setok_config(upstream))
    raise ValueError(f"`kind` must be 'tokenizer' or 'mllm', got {kind!r}.")


def build_converted_model(result: ConversionResult, dtype: torch.dtype = torch.float32):
    """Our model with the converted weights loaded; the keys in `result.missing` keep their initialisation."""
    model = result.model_class._from_config(result.config, dtype=dtype)
    loaded = model.load_state_dict(result.state_dict, strict=False)
    if loaded.unexpected_keys or set(loaded.missing_keys) != set(result.missing):
        raise RuntimeError(f"Converted weights do not fit {result.model_class.__name__}: {loaded}")
    return model
