"""The bookkeeping every mapping rule shares: `Conversion` routes upstream tensors onto our keys, checks their shapes
against our model's, and records why every other key, theirs or ours, is left out."""

import torch

from .report import UNRECOGNISED, ConversionError, ConversionResult

# Wrapper prefixes: `module.` (DistributedDataParallel/DeepSpeed) and `_orig_mod.` (torch.compile).
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def strip_ddp_prefix(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop leading `module.` (DDP/DeepSpeed) and `_orig_mod.` (torch.compile) prefixes, in any order."""
    return {_strip_wrappers(key): value for key, value in state_dict.items()}


def _strip_wrappers(key: str) -> str:
    # Wrappers nest in either order (a compiled model wrapped in DDP saves `module._orig_mod.`), so strip repeatedly.
    while key.startswith(WRAPPER_PREFIXES):
        key = key.removeprefix("module.").removeprefix("_orig_mod.")
    return key


def target_shapes(model_class, config) -> dict[str, tuple[int, ...]]:
    """Our state dict's key -> shape, from a model built on the meta device (no memory, milliseconds)."""
    with torch.device("meta"):
        model = model_class(config)
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


class Conversion:
    """One conversion in progress: the upstream tensors (wrapper prefixes stripped), our target shapes and the
    `ConversionResult` being filled; `finish` accounts for every key no rule touched."""

    def __init__(self, upstream: dict[str, torch.Tensor], model_class, config):
        self.upstream = strip_ddp_prefix(upstream)
        self.result = ConversionResult(model_class, config)
        self.targets = target_shapes(model_class, config)
        self.missing_reasons: list[tuple[str, str]] = []

    def under(self, prefix: str) -> dict[str, torch.Tensor]:
        """Upstream tensors whose key starts with `prefix`, keyed by the rest of the key."""
        return {key[len(prefix) :]: value for key, value in self.upstream.items() if key.startswith(prefix)}

    def take(self, source: str, ours: str, tensor: torch.Tensor | None = None):
        """Map upstream `source` (or a tensor derived from it) onto our `ours`; absent sources are left missing."""
        if source not in self.upstream:
            return
        self._put(ours, self.upstream[source] if tensor is None else tensor, source)
        self.credit(source, ours)

    def take_params(self, source: str, ours: str, names=("weight", "bias")):
        for name in names:
            self.take(f"{source}.{name}", f"{ours}.{name}")

    def credit(self, source: str, ours: str):
        """Record that upstream `source` fills our `ours` (also for an alias of a tensor already taken)."""
        self.result.mapped.setdefault(source, []).append(ours)

    def build(self, ours: str, tensor: torch.Tensor, how: str, source: str = "(converter)"):
        self._put(ours, tensor, source)
        self.result.synthesised[ours] = how

    def _put(self, ours: str, tensor: torch.Tensor, source: str):
        expected = self.targets.get(ours)
        if expected is None:
            raise ConversionError(
                f"{source!r} maps to {ours!r}, which the target model does not have: check the config."
            )
        if tuple(tensor.shape) != expected:
            raise ConversionError(
                f"Shape mismatch: upstream {source!r} has shape {tuple(tensor.shape)} but our {ours!r} expects "
                f"{expected} from the config; the config does not describe this checkpoint."
            )
        self.result.state_dict[ours] = tensor

    def skip_key(self, key: str, reason: str):
        if key in self.upstream and key not in self.result.mapped:
            self.result.unmapped.setdefault(key, reason)

    def skip(self, prefix: str, reason: str):
        """Every upstream key starting with `prefix` has no counterpart, for `reason`."""
        for key in self.upstream:
            if key.startswith(prefix):
                self.skip_key(key, reason)

    def explain_missing(self, prefix: str, reason: str):
        self.missing_reasons.append((prefix, reason))

    def warn(self, message: str):
        self.result.warnings.append(message)

    def finish(self) -> ConversionResult:
        result = self.result
        for key in self.upstream:
            if key not in result.mapped and key not in result.unmapped:
                result.unmapped[key] = UNRECOGNISED
        for key in self.targets:
            if key not in result.state_dict:
                reasons = [(len(p), r) for p, r in self.missing_reasons if key.startswith(p)]
                result.missing[key] = max(reasons)[1] if reasons else "no upstream value"
        return result
