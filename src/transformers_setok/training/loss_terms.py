"""Logging each term of a composite loss next to the Trainer's own `loss`, for training and evaluation."""

from collections import defaultdict

import torch
from accelerate.utils import gather_object

__all__ = ["LossTermsMixin"]


class LossTermsMixin:
    """For a `Trainer` subclass: `record_loss_term(name, value, training)` during `compute_loss`; training logs then
    carry each term averaged over the steps since the previous log, evaluations `{prefix}_{name}` averaged over their
    batches (both over all processes)."""

    @property
    def _loss_terms(self) -> dict[str, defaultdict]:
        if "_loss_terms_record" not in self.__dict__:
            self._loss_terms_record = {"train": defaultdict(list), "eval": defaultdict(list)}
        return self._loss_terms_record

    def record_loss_term(self, name: str, value: torch.Tensor, training: bool, weight=1.0):
        """`value`: this micro-batch's mean of the term; `weight`: what it is a mean over (objects, target tokens), so
        that the logged value is the mean over all of them on all processes rather than a mean of means."""
        weight = torch.as_tensor(weight, dtype=torch.float32).detach().to(value.device)
        pair = torch.stack((value.detach().float() * weight, weight))  # (weighted value, weight)
        self._loss_terms["train" if training else "eval"][name].append(pair)

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
        """Each recorded term averaged over its steps on all processes, weighted by what each value is a mean over;
        the record is then cleared.

        Processes may have recorded different terms (a batch without images to draw has no diffusion loss), so they
        first agree on the names; then every process reduces one `(terms, 2)` tensor of (sum, count) rows in that
        order: one collective and one read per log."""
        record = self._loss_terms[split]
        names = sorted(record)
        if self.accelerator.num_processes > 1:
            names = sorted(set().union(*gather_object([names])))
        means = {}
        if names:
            device = self.accelerator.device
            none = torch.zeros(2, dtype=torch.float64, device=device)
            stats = torch.stack(
                [torch.stack(record[n]).double().sum(0).to(device) if n in record else none for n in names]
            )
            totals = self.accelerator.reduce(stats, reduction="sum").tolist()
            means = {name: round(total / count, 6) for name, (total, count) in zip(names, totals) if count}
        record.clear()
        return means
