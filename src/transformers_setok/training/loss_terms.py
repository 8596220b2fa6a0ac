"""Logging each term of a composite loss next to the Trainer's own `loss`, for training and evaluation."""

from collections import defaultdict

import torch

__all__ = ["LossTermsMixin"]


class LossTermsMixin:
    """For a `Trainer` subclass: `record_loss_term(name, value, training)` during `compute_loss`; training logs then
    carry each term averaged over the steps since the previous log, evaluations `{prefix}_{name}` averaged over their
    batches (both averaged over processes too)."""

    @property
    def _loss_terms(self) -> dict[str, defaultdict]:
        if "_loss_terms_record" not in self.__dict__:
            self._loss_terms_record = {"train": defaultdict(list), "eval": defaultdict(list)}
        return self._loss_terms_record

    def record_loss_term(self, name: str, value: torch.Tensor, training: bool):
        self._loss_terms["train" if training else "eval"][name].append(value.detach().float())

    def evaluation_loop(
        self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"
    ):
        self._loss_terms["eval"].clear()
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        output.metrics.update(
            {f"{metric_key_prefix}_{name}": value for name, value in self._mean_loss_terms("eval").items()}
        )
        return output

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs:  # a training log
            logs.update(self._mean_loss_terms("train"))
        super().log(logs, *args, **kwargs)

    def _mean_loss_terms(self, split: str) -> dict[str, float]:
        """Each recorded term averaged over its steps (and over processes); the record is then cleared."""
        means = {}
        for name, values in self._loss_terms[split].items():
            if values:
                mean = self.accelerator.gather_for_metrics(torch.stack(values).mean()[None]).mean()
                means[name] = round(mean.item(), 6)
        self._loss_terms[split].clear()
        return means
