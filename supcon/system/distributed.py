"""The process group as every module sees it: rank, world size, rank 0, and gathering rows.

The one source of truth for "is a process group running / which rank am I": every other
module calls these helpers. Without an initialised process group of more than one rank,
everything here is the identity (rank 0 of a world of 1). The contrastive loss, the MoCo
queue and feature extraction need "every rank's rows, in rank order"; ranks may hold
different numbers of rows (a test split rarely divides evenly).
"""

import contextlib
import os

import torch
import torch.distributed as dist


def is_initialized() -> bool:
    """True when a default process group exists (even one of a single rank)."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def is_distributed() -> bool:
    """True inside a process group of more than one rank."""
    return get_world_size() > 1


def is_main_process() -> bool:
    return get_rank() == 0


TORCHRUN_VARIABLES = ('WORLD_SIZE', 'RANK', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT')


def launch_rank() -> int:
    """This process's rank, also before the process group starts: torchrun's ``RANK``.

    0 unless the process group says otherwise or torchrun's variables are all set and
    consistent (variables left in a shell make a single process, which must speak).
    """
    if is_initialized():
        return dist.get_rank()
    if not all(os.environ.get(name) for name in TORCHRUN_VARIABLES):
        return 0
    try:
        world_size, rank = int(os.environ['WORLD_SIZE']), int(os.environ['RANK'])
    except ValueError:
        return 0
    return rank if world_size > 1 and 0 <= rank < world_size else 0


def note(message: str) -> None:
    """Print ``note: <message>`` once per run: on rank 0 (torchrun's, if no group runs yet)."""
    if launch_rank() == 0:
        print(f'note: {message}', flush=True)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks in place (and return it); the identity in one process."""
    if is_distributed():
        dist.all_reduce(tensor)
    return tensor


@contextlib.contextmanager
def main_process_first():
    """Let rank 0 go first (e.g. to download a data set) while the others wait."""
    if is_initialized() and not is_main_process():
        dist.barrier()
    yield
    if is_initialized() and is_main_process():
        dist.barrier()


def all_gather_objects(obj) -> list:
    """Every rank's ``obj`` (anything picklable), in rank order; ``[obj]`` in one process."""
    if not is_distributed():
        return [obj]
    gathered = [None] * get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def destroy_process_group() -> None:
    if is_initialized():
        dist.destroy_process_group()


def gather_sizes(n_rows, device):
    """Rows per rank, in rank order (one small all_gather)."""
    size = torch.tensor([n_rows], dtype=torch.long, device=device)
    sizes = [torch.zeros_like(size) for _ in range(get_world_size())]
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
    padded[: tensor.shape[0]] = tensor
    pieces = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(pieces, padded)
    return torch.cat([piece[:n] for piece, n in zip(pieces, sizes)])


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, sizes):
        rank = get_rank()
        ctx.rows = slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))
        return all_gather_rows(tensor, sizes)

    @staticmethod
    def backward(ctx, grad):
        # Every rank's loss depends on our rows; summing all ranks' gradients gives the gradient of
        # the sum of the ranks' losses. gloo has no reduce_scatter, so all-reduce everything and
        # keep our slice.
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
