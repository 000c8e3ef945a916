"""Where and how a run executes: devices, torchrun / DDP, mixed precision, seeding.

``rt = setup_runtime(opt)`` resolves the runtime flags once, at the start of every script,
into a ``Runtime`` that the scripts pass on (``opt`` stays the parsed options); the rest are
small helpers the training loops call with it (``autocast(rt)``, ``to_device(images, rt)``,
``step_statistics(rt, ...)``) and ``launch``, which turns a ``UserError`` into one line on
stderr and exit code 2. Rank and world size come from ``supcon.system.distributed``.
"""

import argparse
import contextlib
import os
import random
import re
import sys
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from networks.cpu_bf16_conv import use_matmul_weight_grad
from supcon.errors import UserError
from supcon.system import run_lock, slurm
from supcon.system.distributed import (  # noqa: F401 (re-exported for the scripts)
    all_reduce_sum,
    destroy_process_group,
    is_initialized,
    is_main_process,
    launch_rank,
    main_process_first,
)


def add_runtime_arguments(parser, training=True):
    """Flags the reference does not have: devices, precision, resuming, seeds.

    ``training=False`` (main_tsne.py) leaves out what only a training run uses
    (--resume, --cpu_bf16_wgrad) and makes the seed default to 0.
    """
    group = parser.add_argument_group('runtime (not in the reference)')
    group.add_argument(
        '--device',
        type=str,
        default='auto',
        help='auto (CUDA when present, else CPU), cpu, cuda or cuda:N',
    )
    group.add_argument(
        '--amp',
        action='store_true',
        help='mixed precision: bfloat16 autocast on CPU, float16 or bfloat16 on'
        ' CUDA; the contrastive loss and softmax stay in float32',
    )
    group.add_argument(
        '--amp_dtype',
        type=str,
        default='auto',
        choices=['auto', 'bfloat16', 'float16'],
        help='auto: bfloat16 on CPU and on GPUs that support it, else float16'
        ' with a gradient scaler',
    )
    group.add_argument(
        '--channels_last',
        action=argparse.BooleanOptionalAction,
        default=None,
        help='NHWC memory format for the conv net; default: on with --amp,'
        ' where it measured faster (benchmarks/README.md)',
    )
    if training:
        group.add_argument(
            '--cpu_bf16_wgrad',
            type=str,
            default='onednn',
            choices=['onednn', 'matmul'],
            help='CPU with --amp only: compute the weight gradient of convolutions with oneDNN,'
            ' as stock PyTorch does, or, for small output maps, as one matrix product (matmul;'
            ' measured 1.07x faster per ResNet-18 step on torch 2.14, below the 1.1x that would'
            ' make it the default: docs/speed.md)',
        )
    group.add_argument(
        '--compile',
        action='store_true',
        help='torch.compile the model (pays on CUDA; long warm-up on CPU)',
    )
    if not training:
        group.add_argument(
            '--seed', type=int, default=0, help='picks the subset of test images and seeds t-SNE'
        )
        return group
    group.add_argument(
        '--seed',
        type=int,
        default=None,
        help='seed for data order, augmentation and initialisation;'
        ' random (and recorded in the checkpoint) when not given',
    )
    group.add_argument(
        '--resume',
        type=str,
        default=slurm.default_resume(),  # a requeued SLURM job continues where it stopped
        help='checkpoint to continue from, or "auto" for the one furthest in training (epoch,'
        ' step) in this run\'s save folder; auto when SLURM starts a job again'
        ' (SLURM_RESTART_COUNT > 0)',
    )
    return group


# --------------------------------------------------------------------------- devices


@dataclass
class Runtime:
    """What ``setup_runtime`` decided for this process; the scripts pass it where it is needed.

    ``opt`` keeps the parsed options; this holds what they resolved to on this machine and in
    this process group (a device, a rank, per-process batch sizes, the autocast dtype, ...).
    """

    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_batch_size: int = 1
    local_batch_size_val: int = 1
    num_workers: int = 0
    pin_memory: bool = False
    amp_dtype: torch.dtype | None = None  # the autocast dtype; None runs in float32
    channels_last: bool = False
    compile: bool = False
    sync_bn: bool = False  # SyncBatchNorm: only under torchrun with --syncBN
    matmul_wgrad: bool = False  # networks/cpu_bf16_conv.py's weight gradient (CPU + bf16)
    seed: int = 0
    seed_given: bool = True

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def loader_options(self) -> dict:
        """The keyword arguments ``sampling.build_loader`` takes from the runtime."""
        return dict(
            seed=self.seed,
            rank=self.rank,
            world_size=self.world_size,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
        )

    def recorded(self) -> dict:
        """What checkpoints' ``opt`` has always recorded of the runtime, in that order."""
        values = dict(
            world_size=self.world_size,
            rank=self.rank,
            distributed=self.distributed,
            device=str(self.device),
            local_batch_size=self.local_batch_size,
            local_batch_size_val=self.local_batch_size_val,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            amp_dtype=str(self.amp_dtype).removeprefix('torch.') if self.amp_dtype else None,
            channels_last=self.channels_last,
            seed=self.seed,
            seed_given=self.seed_given,
        )
        if values['amp_dtype'] is None:  # without --amp the flag's own value stays
            del values['amp_dtype']
        return values


def setup_runtime(opt) -> Runtime:
    """Choose the device, start the process group under torchrun, size the loaders, seed.

    Returns the ``Runtime``; ``opt`` is only read. Caps the loader workers at the CPUs
    present and draws a seed (the same on every rank) when --seed is not given.
    """
    world_size, rank, local_rank = torchrun_environment()
    distributed = world_size > 1
    want = str(opt.device)
    if not DEVICE_PATTERN.fullmatch(want):
        raise UserError(f'--device must be auto, cpu, cuda or cuda:N, got {want!r}')
    if want == 'auto':
        want = 'cuda' if torch.cuda.is_available() else 'cpu'
    if want.startswith('cuda') and not torch.cuda.is_available():
        raise UserError(
            f'--device {opt.device}: CUDA is not available on this machine; use --device cpu'
        )
    if want.startswith('cuda:') and int(want[5:]) >= torch.cuda.device_count():
        raise UserError(
            f'--device {want}: this machine has {torch.cuda.device_count()} CUDA'
            f' device(s), numbered from 0'
        )
    if distributed and want.startswith('cuda'):
        want = f'cuda:{local_rank}'
    device = torch.device(want)
    # checked before the process group starts, so every rank fails at once
    batch_size = getattr(opt, 'batch_size', world_size)  # main_tsne.py only evaluates
    if batch_size % world_size:
        raise UserError(
            f'--batch_size {opt.batch_size} does not divide by the {world_size}'
            f' processes; --batch_size is the global batch, pick a multiple of'
            f' {world_size}'
        )
    sync_bn = getattr(opt, 'syncBN', False)  # main_tsne.py and main_linear.py have none
    if distributed and sync_bn and device.type != 'cuda':
        raise UserError(
            f'--syncBN needs CUDA devices (PyTorch\'s SyncBatchNorm does not run on'
            f' {device.type}); drop --syncBN or run with --device cuda'
        )
    if device.type == 'cuda':
        if device.index is None:  # set_device and DDP need an explicit index
            device = torch.device('cuda', torch.cuda.current_device())
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
    if distributed and not is_initialized():
        dist.init_process_group(backend='nccl' if device.type == 'cuda' else 'gloo')
    local_world = int(os.environ.get('LOCAL_WORLD_SIZE', 1))
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
    amp_dtype, channels_last = resolve_precision(opt, device)
    rt = Runtime(
        device=device,
        rank=rank,
        world_size=world_size,
        local_batch_size=batch_size // world_size,
        local_batch_size_val=max(1, getattr(opt, 'batch_size_val', 256) // world_size),
        num_workers=min(opt.num_workers, max(1, (cpus or 1) // local_world)),
        pin_memory=device.type == 'cuda',
        amp_dtype=amp_dtype,
        channels_last=channels_last,
        compile=opt.compile,
        sync_bn=sync_bn and distributed,
        matmul_wgrad=(
            device.type == 'cpu'
            and amp_dtype == torch.bfloat16
            and not opt.compile
            and getattr(opt, 'cpu_bf16_wgrad', 'onednn') == 'matmul'  # main_tsne.py has none
        ),
    )
    if sync_bn and not distributed and is_main_process():
        print(
            'note: --syncBN has no effect without torchrun (a single process already sees'
            ' the whole batch); start with torchrun to synchronise BatchNorm across GPUs'
        )
    if opt.seed is None:
        rt.seed = random.SystemRandom().randrange(2**31)
        if distributed:
            # the samplers shard one shared permutation: every rank must draw it from one seed
            seed = torch.tensor([rt.seed], dtype=torch.long, device=device)
            dist.broadcast(seed, src=0)
            rt.seed = int(seed.item())
        rt.seed_given = False
    else:
        rt.seed, rt.seed_given = opt.seed, True
    seed_everything(rt.seed + rt.rank)
    return rt


DEVICE_PATTERN = re.compile(r'auto|cpu|cuda(:[0-9]+)?')


def torchrun_environment():
    """(world size, rank, local rank) from torchrun's variables; (1, 0, 0) for one process.

    Without torchrun's variables, a task started by ``srun`` takes SLURM's
    (``slurm.torchrun_variables``) and exports them as torchrun would, for the
    ``env://`` rendezvous; torchrun's win when both are set.
    WORLD_SIZE=1 (torchrun with one process, or variables left over in a shell) is one
    process: no process group is started. Values that are not numbers, or a rank outside
    the world, are refused with a one-line error.
    """
    if 'WORLD_SIZE' not in os.environ:
        variables = slurm.torchrun_variables()
        if variables is None:
            return 1, 0, 0
        os.environ.update(variables)
    values = []
    for name in ('WORLD_SIZE', 'RANK', 'LOCAL_RANK'):
        text = os.environ.get(name, '0' if name != 'WORLD_SIZE' else '')
        try:
            values.append(int(text))
        except ValueError:
            raise UserError(
                f'the environment variable {name}={text!r} is not a whole number;'
                f' start the processes with torchrun, or unset WORLD_SIZE, RANK and'
                f' LOCAL_RANK to run one process'
            ) from None
    world_size, rank, local_rank = values
    if world_size < 1 or not 0 <= rank < world_size or local_rank < 0:
        raise UserError(
            f'the environment says WORLD_SIZE={world_size}, RANK={rank},'
            f' LOCAL_RANK={local_rank}, which cannot be: start the processes with'
            f' torchrun, or unset WORLD_SIZE, RANK and LOCAL_RANK to run one process'
        )
    if world_size == 1:
        return 1, 0, 0
    missing = [
        name
        for name in ('RANK', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT')
        if not os.environ.get(name)
    ]
    if missing:  # variables left in a shell, not torchrun (which sets them all)
        names = ' and '.join([', '.join(missing[:-1]), missing[-1]] if missing[:-1] else missing)
        raise UserError(
            f'WORLD_SIZE={world_size} is set but {names}'
            f' {"is" if len(missing) == 1 else "are"} not: start the processes'
            f' with torchrun (e.g. torchrun --nproc_per_node {world_size}'
            f' {os.path.basename(sys.argv[0])} ...), or unset WORLD_SIZE, RANK and'
            f' LOCAL_RANK to run one process'
        )
    return world_size, rank, local_rank


def resolve_precision(opt, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None, channels_last) from --amp, --amp_dtype and --channels_last."""
    amp_dtype = None
    if opt.amp:
        name = opt.amp_dtype
        if device.type == 'cpu':
            if name == 'float16':
                raise UserError(
                    '--amp_dtype float16 is for CUDA; on CPU use --amp_dtype bfloat16 (or auto)'
                )
            name = 'bfloat16'
        elif device.type == 'cuda' and name == 'auto':
            name = 'bfloat16' if torch.cuda.is_bf16_supported() else 'float16'
        amp_dtype = getattr(torch, name)
    channels_last = bool(opt.amp) if opt.channels_last is None else bool(opt.channels_last)
    return amp_dtype, channels_last


def autocast(rt: Runtime):
    if rt.amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=rt.device.type, dtype=rt.amp_dtype)


def make_scaler(rt: Runtime) -> torch.amp.GradScaler:
    """A gradient scaler, enabled only for float16 on CUDA (bfloat16 needs none)."""
    enabled = rt.device.type == 'cuda' and rt.amp_dtype == torch.float16
    return torch.amp.GradScaler('cuda', enabled=enabled)


def to_device(images: torch.Tensor, rt: Runtime) -> torch.Tensor:
    images = images.to(rt.device, non_blocking=True)
    if rt.channels_last and images.dim() == 4:
        images = images.contiguous(memory_format=torch.channels_last)
    return images


def prepare_model(model: nn.Module, rt: Runtime, parallel: str | None = 'encoder') -> nn.Module:
    """Move to the device and wrap for several GPUs.

    On the CPU under bfloat16 --amp, convolutions get the matmul weight gradient
    (``networks/cpu_bf16_conv.py``) when asked for with --cpu_bf16_wgrad matmul.
    Under torchrun: SyncBatchNorm when --syncBN, then DistributedDataParallel
    over the whole model (when it has anything to train). In a single process
    with several GPUs: DataParallel over ``model.<parallel>`` as the reference
    does, over the whole module for ``parallel=''``, never for ``None``.
    Returns the module to call; ``bare_state_dict`` gives keys without wrappers.
    """
    if rt.sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if rt.matmul_wgrad:
        use_matmul_weight_grad(model)
    model = model.to(rt.device)
    if rt.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if (
        not rt.distributed
        and parallel is not None
        and rt.device.type == 'cuda'
        and torch.cuda.device_count() > 1
    ):
        if parallel:
            setattr(model, parallel, nn.DataParallel(getattr(model, parallel)))
        else:
            model = nn.DataParallel(model)
    if rt.compile:
        model = torch.compile(model)
    if rt.distributed and any(p.requires_grad for p in model.parameters()):
        device_ids = [rt.device.index] if rt.device.type == 'cuda' else None
        model = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The bare module under DDP/DataParallel/torch.compile wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, '_orig_mod'):
            model = model._orig_mod
        else:
            return model


# --------------------------------------------------------------------------- distributed


def cleanup_runtime():
    destroy_process_group()


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def step_statistics(rt: Runtime, *values) -> list[float]:
    """Sum per-step statistics over ranks in one collective and one host sync.

    Values may be tensors on the device (a vector is flattened into the returned
    list in its place) or numbers. Callers pass the stop flag last: every rank
    then stops at the same step, so none waits forever in a collective the
    others left.
    """
    stats = torch.cat(
        [torch.as_tensor(v, device=rt.device).detach().double().reshape(-1) for v in values]
    )
    all_reduce_sum(stats)
    return stats.tolist()


def launch(main):
    """Run a script's ``main``; user errors print one line and exit 2, Ctrl-C exits 130.

    Under torchrun every rank meets the same bad option or data (they run the same command),
    so only rank 0 prints the error; the others exit 2 in silence. An error only one rank
    can see (a broken image in its share, ``rank_local``) is printed by that rank.
    """
    try:
        main()
    except UserError as exc:
        message = str(exc)
        if 'Traceback' in message:  # raised in a DataLoader worker: keep the last line
            lines = [line for line in message.splitlines() if line.strip()]
            message = lines[-1].split(': ', 1)[-1] if lines else message
        if launch_rank() == 0 or getattr(exc, 'rank_local', False):
            print(f'error: {message}', file=sys.stderr, flush=True)
        cleanup_runtime()
        sys.exit(2)
    except KeyboardInterrupt as exc:  # Ctrl-C without a handler, or GracefulStop's second one
        message = str(exc).strip() or 'interrupted by Ctrl-C'
        print(f'error: {message}', file=sys.stderr, flush=True)
        with contextlib.suppress(Exception):
            cleanup_runtime()
        sys.exit(130)
    finally:
        run_lock.release()  # the save folder's lock, however the run ended
    cleanup_runtime()
