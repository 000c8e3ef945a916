"""Gathering rows of a tensor from every torch.distributed rank, with or without gradient.

The contrastive loss, the MoCo queue and feature extraction all need "every rank's rows, in
rank order"; ranks may hold different numbers of rows (a test split rarely divides evenly).
Without an initialised process group of more than one rank, everything here is the identity.
"""
import torch
import torch.distributed as dist


def is_distributed():
    """True inside a process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_sizes(n_rows, device):
    """Rows per rank, in rank order (one small all_gather)."""
    size = torch.tensor([n_rows], dtype=torch.long, device=device)
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)
    return [int(s) for s in sizes]


def all_gather_rows(tensor, sizes=None):
    """Every rank's ``tensor`` concatenated along dim 0 in rank order; no gradient flows back.

    ``sizes`` (rows per rank) is gathered when not given. all_gather needs equal shapes, so
    shorter ranks pad and the padding is dropped afterwards.
    """
    if not is_distributed():
        return tensor.detach()
    tensor = tensor.detach().contiguous()
    if sizes is None:
        sizes = gather_sizes(tensor.shape[0], tensor.device)
    padded = tensor.new_zeros((max(sizes),) + tuple(tensor.shape[1:]))
    padded[:tensor.shape[0]] = tensor
    pieces = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(pieces, padded)
    return torch.cat([piece[:n] for piece, n in zip(pieces, sizes)])


class _GatherWithGrad(torch.autograd.Function):

    @staticmethod
    def forward(ctx, tensor, sizes):
        rank = dist.get_rank()
        ctx.rows = slice(sum(sizes[:rank]), sum(sizes[:rank + 1]))
        return all_gather_rows(tensor, sizes)

    @staticmethod
    def backward(ctx, grad):
        # Every rank's loss depends on our rows; summing all ranks' gradients gives the gradient of the sum
        # of the ranks' losses. gloo has no reduce_scatter, so all-reduce everything and keep our slice.
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rows], None


def gather_with_grad(tensor, sizes=None):
    """all_gather along dim 0 whose backward sends each rank the summed gradient of its own rows.

    ``sizes`` (rows per rank) is gathered when not given; ranks may hold different numbers of rows.
    """
    if sizes is None:
        sizes = gather_sizes(tensor.shape[0], tensor.device)
    return _GatherWithGrad.apply(tensor, sizes)
