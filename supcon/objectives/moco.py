"""Momentum ("key") encoder, label-aware feature queue and shuffle-BN for SupCon/SimCLR with
``--moco``.

The query model is trained by SGD as usual. A frozen copy of it, the key encoder, follows it as an
exponential moving average and embeds the second view of each image; those keys are appended to a
queue so that the contrastive loss sees many more (labelled) rows than one small batch holds.

Distributed use (``torch.distributed``, gloo or nccl): every collective here expects each rank to
pass the same number of rows (DistributedSampler gives every rank the same number of samples), and
tensors on the device the backend works with (CUDA for nccl). Without an initialised process group,
or with a world size of 1, the helpers work on the local tensors alone.
"""

import copy
import math

import torch
import torch.distributed as dist
from torch import nn

from supcon.data.labelling import is_multilabel, multilabel_refusal
from supcon.errors import UserError
from supcon.system.distributed import all_gather_rows, get_rank, get_world_size, note


@torch.no_grad()
def gather_no_grad(tensor):
    """All ranks' rows of ``tensor`` concatenated in rank order, detached (no gradient flows back).

    Every rank must pass a tensor of the same shape. With one process it returns
    ``tensor.detach()``.
    """
    return all_gather_rows(tensor, [tensor.shape[0]] * get_world_size())


@torch.no_grad()
def shuffle_across_ranks(x, seed):
    """Shuffle-BN, first half: returns (this rank's share of a random permutation of all ranks'
    rows, the index that undoes it), for ``unshuffle_across_ranks``.

    The permutation of the ``world * len(x)`` gathered rows is drawn on rank 0 from its own
    ``torch.Generator`` seeded with ``seed`` (the global RNG is not touched, so a run is repeatable
    and resumable) and broadcast, so all ranks agree even if their seeds differ. Pass a different
    seed at every step (e.g. derived from the global step), or every step uses the same permutation.

    With one process this is a no-op: it returns ``x`` itself and the identity index. Reordering
    rows inside one process changes nothing for BatchNorm, which then sees the whole batch of keys.
    The leak shuffle-BN guards against (keys whose BN statistics come from the same sub-batch as
    their queries) is not prevented there; since those statistics are shared by every key of the
    batch, it can only help tell this batch's keys from the queue's older keys, not one key of the
    batch from another.
    """
    rank, world = get_rank(), get_world_size()
    if world == 1:
        return x, torch.arange(len(x), device=x.device)
    gathered = gather_no_grad(x)
    if rank == 0:
        generator = torch.Generator().manual_seed(int(seed))
        permutation = torch.randperm(len(gathered), generator=generator).to(x.device)
    else:
        permutation = torch.empty(len(gathered), dtype=torch.int64, device=x.device)
    dist.broadcast(permutation, src=0)
    local = permutation.view(world, -1)[rank]
    return gathered[local], torch.argsort(permutation)


@torch.no_grad()
def unshuffle_across_ranks(y, index):
    """Shuffle-BN, second half: given this rank's rows ``y`` computed from the shuffled rows and the
    ``index`` from ``shuffle_across_ranks``, returns the rows in this rank's original order."""
    rank, world = get_rank(), get_world_size()
    if world == 1:
        return y[index]
    return gather_no_grad(y)[index.view(world, -1)[rank]]


class KeyEncoder(nn.Module):
    """A frozen deep copy of the query model (encoder + projection head) that follows it by EMA.

    Build it from the bare model (not a DDP wrapper), after it is on its device and after any
    SyncBatchNorm conversion. Its parameters have ``requires_grad=False`` and must not be given to
    the optimizer; only ``update`` changes them. Its train/eval mode is its own and starts as the
    query model's mode at construction; keep it in train mode while training, as MoCo does.

    BatchNorm buffers (running mean/var, batch counts) are NOT copied by ``update``: the key encoder
    keeps statistics of its own, collected by its own forward passes in train mode (MoCo's choice).
    In train mode BatchNorm normalises with the current batch's statistics, so the running buffers
    never influence the keys; they would only matter if the key encoder were run in eval mode, and
    then statistics measured on the key encoder's own activations (and own, shuffled, sub-batches)
    describe it better than the query model's. Copying them would buy nothing and cost a copy a
    step.
    """

    def __init__(self, query_model):
        super().__init__()
        self.model = copy.deepcopy(query_model)
        self.model.requires_grad_(False)
        self.train(query_model.training)

    @torch.no_grad()
    def update(self, query_model, momentum):
        """EMA step, in place, for every parameter: key = momentum * key + (1 - momentum) * query.

        Call it after every optimizer step, with the bare query model. ``momentum=1`` leaves the key
        encoder unchanged, ``momentum=0`` copies the query parameters. Buffers are left alone (see
        the class docstring). Raises ValueError if the models' parameter names or shapes differ (a
        DDP wrapper, for one, prefixes every name with ``module.``).
        """
        key_params = list(self.model.named_parameters())
        query_params = list(query_model.named_parameters())
        if [(n, p.shape) for n, p in key_params] != [(n, p.shape) for n, p in query_params]:
            raise ValueError(
                'query model does not match the key encoder; pass the bare module the key '
                'encoder was built from, not a DistributedDataParallel wrapper'
            )
        momentum = float(momentum)
        for (_, key), (_, query) in zip(key_params, query_params):
            key.mul_(momentum).add_(query.detach(), alpha=1.0 - momentum)

    @torch.no_grad()
    def forward(self, images):
        """The key model's output for ``images``, without autograd. In train mode this also updates
        the key encoder's own BatchNorm running statistics (as any train-mode forward does)."""
        return self.model(images)

    @torch.no_grad()
    def encode(self, images, shuffle_seed=None):
        """Keys for this rank's ``images``, in their order. With ``shuffle_seed`` set and several
        ranks, the batch is shuffled across ranks before the forward pass and unshuffled after it
        (shuffle-BN), so no key is normalised together with the other keys of its own rank's batch;
        with one process, or ``shuffle_seed=None``, it is a plain ``forward``."""
        if shuffle_seed is None:
            return self(images)
        shuffled, index = shuffle_across_ranks(images, shuffle_seed)
        return unshuffle_across_ranks(self(shuffled), index)


class LabelQueue(nn.Module):
    """A ring buffer of the ``size`` most recent keys [size, dim] (float32, detached) and their
    int64 labels [size], shared by all ranks.

    State, all registered buffers so ``state_dict()`` restores the queue exactly: ``features``,
    ``labels`` (unfilled rows hold zeros and -1), ``ptr`` (the slot the next row goes to) and
    ``count`` (how many slots hold a row, at most ``size``). Move it with ``.to(device)``.
    """

    def __init__(self, size, dim):
        super().__init__()
        if size < 1 or dim < 1:
            raise ValueError(f'queue size and dim must be positive, got {size} and {dim}')
        self.size, self.dim = int(size), int(dim)
        self.register_buffer('features', torch.zeros(self.size, self.dim))
        self.register_buffer('labels', torch.full((self.size,), -1, dtype=torch.int64))
        self.register_buffer('ptr', torch.zeros((), dtype=torch.int64))
        self.register_buffer('count', torch.zeros((), dtype=torch.int64))

    @torch.no_grad()
    def enqueue(self, features, labels, order=None):
        """Append this rank's keys ``features`` [n, dim] (L2-normalised by the caller; stored as
        given, cast to float32) and ``labels`` [n], overwriting the oldest rows.

        Side effects: when a process group with world size > 1 is initialised, it first gathers the
        rows and labels of all ranks (a collective: every rank must call it, with the same n), so
        every rank stores the same rows in rank order (or in ``order``, an index into the gathered
        rows: --grad_cache's processes). Writes start at ``ptr`` and wrap around the
        end; if more than ``size`` rows arrive only the last ``size`` are kept, placed where writing
        them one by one would leave them. ``ptr`` advances by the number of rows modulo ``size``.
        """
        if features.dim() != 2 or features.shape[1] != self.dim:
            raise ValueError(f'features must be [n, {self.dim}], got {tuple(features.shape)}')
        if labels.shape != features.shape[:1]:
            raise ValueError(f'labels must be [{len(features)}], got {tuple(labels.shape)}')
        features = gather_no_grad(features.to(self.features.device, torch.float32))
        labels = gather_no_grad(labels.to(self.labels.device, torch.int64))
        if order is not None:
            features, labels = features[order], labels[order]
        n = len(features)
        if n == 0:
            return
        # Rows beyond the last `size` would be overwritten within this same call: skip them, and
        # start where the first surviving row would have landed.
        skipped = max(0, n - self.size)
        slots = (self.ptr + skipped + torch.arange(n - skipped, device=self.ptr.device)) % self.size
        self.features[slots] = features[skipped:]
        self.labels[slots] = labels[skipped:]
        self.ptr.copy_((self.ptr + n) % self.size)
        self.count.add_(n).clamp_(max=self.size)

    def contents(self):
        """(features [n, dim], labels [n]) of the n filled rows, copies (later enqueues, which write
        in place, cannot disturb a loss that holds them). Order: by slot, not by age;
        until the queue is full the filled slots are 0..n-1, then all slots are returned."""
        n = int(self.count)
        return self.features[:n].clone(), self.labels[:n].clone()

    def __len__(self):
        return int(self.count)

    def extra_repr(self):
        return f'size={self.size}, dim={self.dim}'


class MomentumContrast(nn.Module):
    """``--moco``'s per-step machinery behind one call, owned by one module (as MoCo's builder).

    It holds the key encoder and the labelled queue (its state dict is ``key_encoder.*`` and
    ``queue.*``, what checkpoints store under ``'moco'``). A training step is::

        loss = moco(criterion, images, features, labels, loss_labels, rt, shuffle_seed)
        ...backward, optimizer step...
        moco.step_done(bare_query_model)   # EMA update, then this step's keys enter the queue
    """

    @classmethod
    def build(cls, opt, rt, model):
        """The run's ``MomentumContrast`` on the device, or None without --moco. ``model`` is
        the bare query model after ``runtime.prepare_model`` (the key encoder copies it as it
        runs: device, SyncBatchNorm)."""
        if not getattr(opt, 'moco', False):
            return None
        return cls(model, opt.moco_k, opt.moco_m).to(rt.device)

    def __init__(self, query_model, queue_size, momentum):
        super().__init__()
        self.key_encoder = KeyEncoder(query_model)
        self.queue = LabelQueue(queue_size, query_model.feat_dim)
        self.momentum = float(momentum)  # an option (checked on resume), not state
        self._step_keys = None
        # --grad_cache's GradCache: keys per chunk, enqueued in its processes' order
        self.chunks = None

    def forward(self, criterion, images, features, labels, loss_labels, rt, shuffle_seed=None):
        """The loss of ``features`` [bsz, 2, D] against the keys of ``images`` and the queue.

        ``images`` are both views stacked view-major [2 * bsz, ...] as the query model saw them;
        ``loss_labels`` is None for SimCLR (every queue row is then a negative), ``labels`` are
        what enters the queue either way.
        """
        from supcon.system.runtime import autocast  # runtime imports nothing of moco; keep it lazy

        bsz = features.shape[0]
        with autocast(rt):
            # shuffled across ranks for BatchNorm (shuffle-BN); one process shuffles nothing
            if self.chunks is not None:
                keys = self.chunks.keys(self.key_encoder, images, bsz, shuffle_seed)
            else:
                keys = self.key_encoder.encode(images, shuffle_seed=shuffle_seed)
        k1, k2 = torch.split(keys.float(), [bsz, bsz], dim=0)  # keys: [bsz, D] per view
        self._step_keys = (k1, k2, labels)
        queue, queue_labels = self.queue.contents()
        return criterion(
            features,
            loss_labels,
            keys=torch.stack([k1, k2], dim=1),  # [bsz, 2, D]
            queue=queue,
            queue_labels=queue_labels if loss_labels is not None else None,
        )

    @torch.no_grad()
    def step_done(self, query_model):
        """After the optimizer step: the key encoder follows ``query_model`` (bare, unwrapped),
        then the step's keys are enqueued view by view, so the queue's order is the global
        batch's on any number of ranks."""
        self.key_encoder.update(query_model, self.momentum)
        k1, k2, labels = self._step_keys
        order = None
        if self.chunks is not None:
            local, order = self.chunks.queue_order(len(labels), labels.device)
            k1, k2, labels = k1[local], k2[local], labels[local]
        for view_keys in (k1, k2):
            self.queue.enqueue(view_keys, labels, order=order)
        self._step_keys = None


#: Options a resume may not change.
FIXED = ('moco', 'moco_k', 'moco_m')


def add_arguments(parser):
    """--moco, --moco_k, --moco_m (main_supcon.py, in its method section)."""
    parser.add_argument(
        '--moco',
        action='store_true',
        help='momentum key encoder and a labelled queue of past keys (for small'
        ' batches; docs/small-batches.md)',
    )
    parser.add_argument(
        '--moco_k', type=int, default=None, help='--moco: queue length (4096 when not given)'
    )
    parser.add_argument(
        '--moco_m',
        type=float,
        default=None,
        help='--moco: momentum of the key encoder\'s moving average (0.999 when not given)',
    )


def check_options(opt, script):
    """Check --moco / --moco_k / --moco_m at parse time and fill in the defaults (4096, 0.999)."""
    if script != 'supcon':
        return
    if not opt.moco and (opt.moco_k is not None or opt.moco_m is not None):
        raise UserError('--moco_k/--moco_m only act with --moco; add --moco or drop them')
    if opt.moco:
        opt.moco_k = 4096 if opt.moco_k is None else opt.moco_k
        opt.moco_m = 0.999 if opt.moco_m is None else opt.moco_m
        if opt.moco_k < 1:
            raise UserError(f'--moco_k must be a positive queue length, got {opt.moco_k}')
        if not 0 <= opt.moco_m <= 1:
            raise UserError(
                f'--moco_m must be in [0, 1] (0 copies the trained encoder, 1 never'
                f' updates the key encoder), got {opt.moco_m}'
            )
        if opt.moco_m == 1:
            note(
                '--moco_m 1 never updates the key encoder: its keys come from its random'
                ' initial weights all run long (MoCo uses 0.99 to 0.999)'
            )


def run_name(opt, script):
    return [f'moco_k{opt.moco_k}_m{opt.moco_m}'] if getattr(opt, 'moco', False) else []


def check_data(opt, dataset):
    """One label per key in the queue: multi-hot rows are refused; a queue longer than the
    training images is noted (docs/small-batches.md)."""
    if not getattr(opt, 'moco', False):
        return
    if is_multilabel(dataset):
        raise multilabel_refusal(
            opt, '--moco\'s label queue holds one label per key', 'drop --moco'
        )
    n_images = len(dataset)
    if opt.moco_k > n_images:
        below = 2 ** int(math.log2(n_images))
        note(
            f'--moco_k {opt.moco_k} is longer than the {n_images} training images: the queue'
            f' holds stale keys of the same images from earlier epochs; docs/small-batches.md'
            f' keeps it well below the data set (e.g. --moco_k {below} or less)'
        )
