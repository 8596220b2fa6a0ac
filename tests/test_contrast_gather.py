"""The concept contrast across two processes (gloo) equals the contrast of the whole batch on one process."""

import math

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import TINY_TEXT_CONFIG, tiny_config

from transformers_setok.modeling.distributed_setok import gather_contrast_batch
from transformers_setok.modeling.losses_setok import SetokConceptContrast

# Texts as token ids, padded with 1 to each process's own longest text: "cat" is on both processes, padded differently.
CAT, DOG, CUP = [2, 3, 4, 5], [2, 3, 6, 7, 8], [2, 9]


def padded(texts: list[list[int]], side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    length = max(map(len, texts))

    def pad(row, value):
        padding = [value] * (length - len(row))
        return row + padding if side == "right" else padding + row

    ids = torch.tensor([pad(text, 1) for text in texts])
    return ids, torch.tensor([pad([1] * len(text), 0) for text in texts])


def batch():
    """4 images with 3, 5, 2 and 4 tokens; process 0 holds images 0-1 (cat, dog), process 1 images 2-3 (cat, cup)."""
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randn(4, 5, 48, generator=generator)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 1, 0]])
    local = [
        dict(texts=[CAT, DOG], positives=torch.tensor([[1.0, 0.0], [1.0, 1.0]])),
        dict(texts=[CAT, CUP], positives=torch.tensor([[0.0, 1.0], [1.0, 0.0]])),
    ]
    # What one process builds from all four records: each phrase once, in order of appearance.
    whole = dict(texts=[CAT, DOG, CUP], positives=torch.tensor([[1.0, 0, 0], [1, 1, 0], [0, 0, 1], [1, 0, 0]]))
    return tokens, mask, local, whole


def contrast() -> SetokConceptContrast:
    torch.manual_seed(0)
    module = SetokConceptContrast(tiny_config(text_config=dict(TINY_TEXT_CONFIG, vocab_size=10))).train()
    module.logit_scale.data.fill_(math.log(1 / 0.07))  # the model's _init_weights sets it; here it stands alone
    return module


def loss_and_grads(module, tokens, mask, texts, positives, side="right"):
    ids, attention = padded(texts, side)
    loss = module(tokens, mask, ids, attention, positives)
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}


def worker(rank: int, store: str, side: str, results):
    # A file store, not a TCP port: no race for a free port with other jobs on the machine.
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        tokens, mask, local, _ = batch()
        rows = slice(2 * rank, 2 * rank + 2)
        # Each process pads its tokens to its own longest image, as the model's merger does.
        width = int(mask[rows].sum(1).max())
        loss, grads = loss_and_grads(contrast(), tokens[rows, :width], mask[rows, :width], **local[rank], side=side)
        for grad in grads.values():  # what DDP does to parameter gradients
            dist.all_reduce(grad)
            grad /= 2
        results[rank] = (loss, grads)
    finally:
        dist.destroy_process_group()


def test_two_processes_contrast_the_global_batch(tmp_path):
    tokens, mask, _, whole = batch()
    expected_loss, expected_grads = loss_and_grads(contrast(), tokens, mask, **whole)

    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(worker, args=(str(tmp_path / "store"), "right", results), nprocs=2, join=True)
        results = dict(results)
    for rank in (0, 1):
        loss, grads = results[rank]
        torch.testing.assert_close(loss, expected_loss)
        assert grads.keys() == expected_grads.keys() and "logit_scale" in grads
        for name, grad in grads.items():
            torch.testing.assert_close(grad, expected_grads[name], msg=name)


def gather_worker(rank: int, store: str, results):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        tokens, mask, local, _ = batch()
        ids, attention = padded(local[rank]["texts"], "left")
        texts = torch.randn(len(ids), 8)
        rows = slice(2 * rank, 2 * rank + 2)
        results[rank] = gather_contrast_batch(
            tokens[rows], mask[rows], texts, ids, attention, local[rank]["positives"]
        )
    finally:
        dist.destroy_process_group()


def test_left_padded_copies_of_a_phrase_are_one_text(tmp_path):
    """Left padding puts a text's padding in front, by another amount on each process: still the same phrase."""
    _, _, _, whole = batch()
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(gather_worker, args=(str(tmp_path / "store"), results), nprocs=2, join=True)
        results = dict(results)
    for rank in (0, 1):
        image_side, real, texts, positives = results[rank]
        assert image_side.shape[0] == 4 and texts.shape[0] == 3
        assert torch.equal(positives, whole["positives"])


def test_one_process_is_untouched():
    """Without an initialised process group the contrast stays local (the gather is a no-op, not an error)."""
    tokens, mask, local, _ = batch()
    loss, grads = loss_and_grads(contrast(), tokens[:2, :5], mask[:2], **local[0])
    local_only = contrast()
    local_only.gather = False
    expected_loss, expected_grads = loss_and_grads(local_only, tokens[:2, :5], mask[:2], **local[0])
    torch.testing.assert_close(loss, expected_loss, rtol=0, atol=0)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], rtol=0, atol=0, msg=name)
