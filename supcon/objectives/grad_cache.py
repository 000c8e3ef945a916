"""``--grad_cache M``: the exact gradient of a large batch in the memory of M images (gradient
caching, Gao et al. 2021).

A process's batch of b images is cut into W = b / M chunks; chunk j holds images j, j + W,
j + 2W, ... (strided: the seeded sampler shards the global order over processes with the same
stride, so chunk j is exactly the batch process j of W would get, and under torchrun rank r's
chunk j is process r + world * j of world * W processes). A step then runs in two passes:

1. every chunk through the model without autograd, the random generators' state noted before
   each; the projections and encoder features of the whole batch are put together in two leaf
   tensors, and the loss (SupCon, SimCLR, the hybrid, partial and multi-hot labels, --moco's keys
   and queue, the probe's and the joint classifier) is computed on them as on a plain batch;
2. ``backward``: the loss's gradient with respect to those leaves, then every chunk through the
   model again, with autograd and the random state of its first pass (the same dropout and drop
   path), backpropagating its rows of the leaves' gradient. The encoder's parameters collect the
   whole batch's gradient; only one chunk's activations are alive at a time.

BatchNorm normalises each chunk by its own statistics, as it would on W processes, and its
running statistics move once per chunk (the first pass; the second pass's updates are undone).
Under DDP every chunk but the last backpropagates under ``no_sync``, so gradients are reduced
once. With --moco the key encoder runs per chunk too, shuffle-BN drawing the permutation
``moco.shuffle_across_ranks`` would draw on world * W processes, and the keys enter the queue in
those processes' order: the step is that of batch / M processes of M images (tested).
"""

import contextlib
import itertools

import torch
import torch.nn as nn

from supcon.errors import UserError
from supcon.system.distributed import all_gather_rows, get_rank, get_world_size
from supcon.system.runtime import autocast

#: Options a resume may not change.
FIXED = ('grad_cache',)


def add_arguments(parser):
    """--grad_cache (main_supcon.py)."""
    parser.add_argument(
        '--grad_cache',
        type=int,
        default=0,
        metavar='M',
        help='images per chunk: the batch is encoded M images at a time and the exact'
        ' large-batch gradient is put together from the chunks (gradient caching; BatchNorm'
        ' per chunk, as on batch / M GPUs); M divides each process\'s batch; 0 = off'
        ' (docs/small-batches.md)',
    )


def check_options(opt, script):
    """A chunk size that divides the batch; nothing that ties the chunks together."""
    if script != 'supcon':
        return
    size = opt.grad_cache
    if size < 0:
        raise UserError(f'--grad_cache must be 0 (off) or a number of images per chunk, got {size}')
    if not size:
        return
    if opt.batch_size % size:
        raise UserError(
            f'--grad_cache {size} does not divide --batch_size {opt.batch_size}; pick a'
            f' divisor of the batch as the images per chunk'
        )
    if getattr(opt, 'syncBN', False):
        raise UserError(
            '--grad_cache cannot combine with --syncBN: BatchNorm synchronised over processes'
            ' would not see the chunks as separate processes; drop one of them'
        )


def run_name(opt, script):
    return [f'gc{opt.grad_cache}'] if getattr(opt, 'grad_cache', 0) else []


def strided_chunks(bsz, n_chunks, device=None):
    """The images of each chunk of a batch of ``bsz``: chunk j holds j, j + n_chunks, ...
    (the last, shorter batch of an epoch gives shorter chunks; empty ones are left out)."""
    return [torch.arange(j, bsz, n_chunks, device=device) for j in range(min(n_chunks, bsz))]


def view_rows(images, n_views, bsz):
    """The rows of view-major [n_views * bsz, ...] tensors that hold ``images`` (view-major)."""
    offsets = torch.arange(n_views, device=images.device) * bsz
    return (offsets[:, None] + images[None, :]).reshape(-1)


def norm_buffers(model):
    """The running statistics of every BatchNorm (and instance norm) of ``model``."""
    found = []
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._NormBase):
            for name in ('running_mean', 'running_var', 'num_batches_tracked'):
                buffer = getattr(module, name, None)
                if buffer is not None:
                    found.append(buffer)
    return found


def cuda_devices(model, device):
    """The CUDA devices whose random state a forward pass of ``model`` draws from: the run's
    device and those of a DataParallel inside it (one process on several GPUs)."""
    if device.type != 'cuda':
        return []
    found = {device.index}
    for module in model.modules():
        if isinstance(module, nn.DataParallel):
            found.update(module.device_ids)
    return sorted(found)


class Pass:
    """What the second pass needs of a step's first one: the model, the batch's images, the
    chunks, the random state before each chunk, and the two leaves (projections, encoder
    features) whose gradients it backpropagates."""

    def __init__(self, model, images, bsz, chunks, states, projected, encoded):
        self.model, self.images, self.bsz = model, images, bsz
        self.chunks, self.states = chunks, states
        self.projected, self.encoded = projected, encoded


class GradCache:
    """The chunked forward and backward passes of a ``TrainingStep`` (see the module); the
    step calls ``forward`` and ``backward``, and --moco's ``MomentumContrast`` calls ``keys``
    and ``queue_order`` (``chunks`` set to this object)."""

    @classmethod
    def build(cls, opt, rt):
        """The run's ``GradCache``, or None without --grad_cache. Refuses a chunk size that
        does not divide each process's batch (under torchrun: --batch_size / processes)."""
        size = getattr(opt, 'grad_cache', 0)
        if not size:
            return None
        if rt.local_batch_size % size:
            raise UserError(
                f'--grad_cache {size} does not divide the {rt.local_batch_size} images of each'
                f' process\'s batch (--batch_size {opt.batch_size} over {rt.world_size}'
                f' processes); pick a divisor of {rt.local_batch_size}'
            )
        return cls(rt, size)

    def __init__(self, rt, chunk_size):
        self.rt = rt
        self.chunk_size = int(chunk_size)
        # the full batch fixes the chunks; a shorter last batch keeps their number and stride
        self.n_chunks = rt.local_batch_size // self.chunk_size
        self._devices = None

    # ------------------------------------------------------------------ the two passes

    def _take(self, images, rows):
        chunk = images.index_select(0, rows)
        if self.rt.channels_last and chunk.dim() == 4:
            chunk = chunk.contiguous(memory_format=torch.channels_last)
        return chunk

    def _encode(self, model, images, bsz, chunk):
        """(projections, encoder features, rows) of one chunk, one forward per view size;
        ``rows`` are where they go in the batch's [V * bsz, ...] (sizes one after another)."""
        outputs, offset = [], 0
        with autocast(self.rt):
            for views in images:
                n_views = len(views) // bsz
                rows = view_rows(chunk, n_views, bsz)
                projected, encoded = model(self._take(views, rows), with_features=True)
                outputs.append((projected, encoded, rows + offset))
                offset += len(views)
        return outputs

    def _rng_state(self):
        return torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in self._devices]

    @contextlib.contextmanager
    def _replayed(self, state):
        """The random state of a chunk's first pass, for its second; the generators continue
        afterwards as if the chunk had run once (``torch.utils.checkpoint`` does the same)."""
        cpu, cuda = state
        with torch.random.fork_rng(devices=self._devices):
            torch.set_rng_state(cpu)
            for device, device_state in zip(self._devices, cuda):
                torch.cuda.set_rng_state(device_state, device)
            yield

    def forward(self, model, images, bsz):
        """First pass over ``images`` (the batch's list of view-major tensors, one per view
        size): (projections [V * bsz, D], encoder features [V * bsz, dim], the ``Pass``), the
        first two leaves that require a gradient, rows in the batch's view-major order."""
        if self._devices is None:
            self._devices = cuda_devices(model, self.rt.device)
        chunks = strided_chunks(bsz, self.n_chunks, device=images[0].device)
        total = sum(len(views) for views in images)
        projected = encoded = None
        states = []
        with torch.no_grad():
            for chunk in chunks:
                states.append(self._rng_state())
                for p, e, rows in self._encode(model, images, bsz, chunk):
                    if projected is None:
                        projected = p.new_empty((total,) + p.shape[1:])
                        encoded = e.new_empty((total,) + e.shape[1:])
                    projected[rows] = p
                    encoded[rows] = e
        projected.requires_grad_(True)
        encoded.requires_grad_(True)
        return projected, encoded, Pass(model, images, bsz, chunks, states, projected, encoded)

    def backward(self, scaled_loss, record):
        """The loss's gradient into the leaves (and the heads' classifiers), then each chunk's
        second pass backpropagating its rows of it; BatchNorm's running statistics are put back
        as the first pass left them."""
        scaled_loss.backward()
        model = record.model
        grad_p, grad_e = record.projected.grad, record.encoded.grad
        buffers = norm_buffers(model)
        saved = [buffer.clone() for buffer in buffers]
        no_sync = getattr(model, 'no_sync', None)  # DDP: reduce once, after the last chunk
        last = len(record.chunks) - 1
        for j, (chunk, state) in enumerate(zip(record.chunks, record.states)):
            sync = no_sync() if no_sync is not None and j < last else contextlib.nullcontext()
            with sync, self._replayed(state):
                outputs, grads = [], []
                for p, e, rows in self._encode(model, record.images, record.bsz, chunk):
                    outputs.append(p)
                    grads.append(grad_p[rows])
                    if grad_e is not None:  # the joint classifier's gradient
                        outputs.append(e)
                        grads.append(grad_e[rows])
                torch.autograd.backward(outputs, grads)
        with torch.no_grad():
            for buffer, value in zip(buffers, saved):
                buffer.copy_(value)
        record.model = record.images = record.states = None

    # ------------------------------------------------------------------ --moco's keys

    def _process_order(self, sizes_per_chunk, device):
        """Index into the rows gathered from all ranks (rank-major, then chunk by chunk) that
        puts them in the order of world * W processes: process r + world * j is rank r's
        chunk j. ``sizes_per_chunk``: each chunk's rows (the same on every rank)."""
        world, per_rank = get_world_size(), sum(sizes_per_chunk)
        starts = itertools.accumulate(sizes_per_chunk[:-1], initial=0)
        pieces = [
            torch.arange(n, device=device) + rank * per_rank + start
            for start, n in zip(starts, sizes_per_chunk)
            for rank in range(world)
        ]
        return torch.cat(pieces)

    @torch.no_grad()
    def keys(self, key_encoder, images, bsz, shuffle_seed=None):
        """The key encoder's output for this process's ``images`` (view-major [V * bsz, ...]),
        each chunk through it on its own. With ``shuffle_seed``: shuffle-BN across the chunks of
        all ranks, with the permutation ``moco.shuffle_across_ranks`` draws for world * W
        processes (the same generator and seed), so every key equals that process's key."""
        n_views = len(images) // bsz
        chunks = strided_chunks(bsz, self.n_chunks, device=images.device)
        rows = [view_rows(chunk, n_views, bsz) for chunk in chunks]
        world = get_world_size()
        if shuffle_seed is None or world * len(chunks) == 1:
            outputs = [key_encoder(self._take(images, r)) for r in rows]
            return self._assemble(outputs, rows)
        sizes = [len(r) for r in rows]
        local = torch.cat([images.index_select(0, r) for r in rows])
        order = self._process_order(sizes, images.device)
        everything = all_gather_rows(local, [len(local)] * world)[order] if world > 1 else local
        process_sizes = [n for n in sizes for _ in range(world)]  # in the processes' order
        generator = torch.Generator().manual_seed(int(shuffle_seed))
        permutation = torch.randperm(len(everything), generator=generator).to(images.device)
        shares = permutation.split(process_sizes)
        rank = get_rank()
        outputs = [
            key_encoder(self._take(everything, shares[rank + world * j])) for j in range(len(rows))
        ]
        keys = torch.cat(outputs)
        if world > 1:
            keys = all_gather_rows(keys, [len(keys)] * world)[order]
        undo = torch.argsort(permutation).split(process_sizes)
        return self._assemble([keys[undo[rank + world * j]] for j in range(len(rows))], rows)

    @staticmethod
    def _assemble(outputs, rows):
        """The chunks' outputs back in the batch's rows."""
        whole = outputs[0].new_empty((sum(len(r) for r in rows),) + outputs[0].shape[1:])
        for output, r in zip(outputs, rows):
            whole[r] = output
        return whole

    def queue_order(self, bsz, device):
        """(this rank's rows chunk by chunk, the index that puts the rows gathered from all
        ranks in the processes' order or None in one process): the order in which world * W
        processes would enqueue their keys."""
        chunks = strided_chunks(bsz, self.n_chunks, device=device)
        local = torch.cat(chunks)
        if get_world_size() == 1:
            return local, None
        return local, self._process_order([len(c) for c in chunks], device)
