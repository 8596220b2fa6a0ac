"""The concept contrast's batch across processes: every image meets every text of every process (spec 1.6).

Each process brings its images' token embeddings `(B_r, L_r, D)`, its texts' embeddings `(U_r, D)` with their ids,
and its positives `(B_r, U_r)`. Shapes differ between processes, so everything is padded to the largest shape,
gathered, and the padding is cut off again. A phrase that several processes hold (two batches that both show a
"cat") is kept once, positive for all of their images: texts are matched by their token ids, so the global batch is
exactly the one a single process would have built from all the records.

Gradients: the token embeddings are gathered with the differentiable all-gather, whose backward sums every process's
gradient for this process's slice. Every process computes the same loss, so after DDP averages the parameter
gradients they equal the gradient of that one loss, as if the whole global batch were on one process.
"""

import torch
import torch.distributed as dist
import torch.nn.functional as F


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _gather_sizes(*sizes: int) -> torch.Tensor:
    """`(world, len(sizes))`: each process's sizes."""
    local = torch.tensor(sizes, device=_device())
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, local)
    return torch.stack(gathered).cpu()


def _device() -> torch.device:
    # NCCL gathers CUDA tensors only; gloo takes CPU ones.
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def _pad_to(tensor: torch.Tensor, shape: tuple[int, ...], value=0) -> torch.Tensor:
    padding = []
    for size, target in zip(reversed(tensor.shape), reversed(shape)):
        padding += [0, target - size]
    return F.pad(tensor, padding, value=value)


class _DifferentiableAllGather(torch.autograd.Function):
    """All-gather whose backward hands each process the sum, over processes, of the gradient of its own slice."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, tensor.contiguous())
        return torch.stack(gathered)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[dist.get_rank()]


def _gather(tensor: torch.Tensor, shape: tuple[int, ...], differentiable: bool, value=0) -> list[torch.Tensor]:
    padded = _pad_to(tensor, shape, value).to(_device())
    if differentiable:
        return list(_DifferentiableAllGather.apply(padded))
    gathered = [torch.empty_like(padded) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, padded)
    return gathered


def gather_contrast_batch(
    image_side: torch.Tensor,
    real: torch.Tensor,
    texts: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    positives: torch.Tensor,
):
    """All processes' `image_side` `(B, L, D)`, token mask `(B, L)`, `texts` `(U, D)` and positives `(B, U)`;
    `input_ids` and `attention_mask` `(U, T)` identify the texts.

    Returns the first four for the global batch, on this process's device; positives span processes (see above).
    """
    device = image_side.device
    # Padding of any origin or side reads -1 and moves to the end, so a text padded otherwise still matches its copies.
    padding = attention_mask == 0
    order = padding.long().argsort(dim=1, stable=True)
    input_ids = input_ids.masked_fill(padding, -1).gather(1, order)
    sizes = _gather_sizes(*image_side.shape[:2], *input_ids.shape)  # B, L, U, T per process
    batch, tokens, num_texts, length = (int(sizes[:, i].max()) for i in range(4))

    images = _gather(image_side, (batch, tokens, image_side.shape[-1]), differentiable=True)
    masks = _gather(real.long(), (batch, tokens), differentiable=False)
    text_embeddings = _gather(texts, (num_texts, texts.shape[-1]), differentiable=False)
    ids = _gather(input_ids, (num_texts, length), differentiable=False, value=-1)
    local_positives = _gather(positives.float(), (batch, num_texts), differentiable=False)

    b, u = sizes[:, 0].tolist(), sizes[:, 2].tolist()
    image_side = torch.cat([x[:n] for x, n in zip(images, b)]).to(device)
    real = torch.cat([x[:n] for x, n in zip(masks, b)]).to(device).bool()
    texts = torch.cat([x[:n] for x, n in zip(text_embeddings, u)]).to(device)
    ids = torch.cat([x[:n] for x, n in zip(ids, u)]).to(device)

    # Positives of each process's images against its own texts, placed block-diagonally, then spread to every
    # identical text of the global batch.
    block = torch.zeros(sum(b), sum(u), device=device)
    row = column = 0
    for rank_positives, rows, columns in zip(local_positives, b, u):
        block[row : row + rows, column : column + columns] = rank_positives[:rows, :columns].to(device)
        row, column = row + rows, column + columns
    same_text = (ids[:, None, :] == ids[None, :, :]).all(-1)
    first_copy = same_text.float().argmax(0) == torch.arange(len(ids), device=device)
    positives = (block @ same_text.float() > 0).float()
    return image_side, real, texts[first_copy], positives[:, first_copy]
