"""Where and how a run executes: devices, torchrun / DDP, mixed precision, seeding, rank 0.

``setup_runtime(opt)`` resolves the runtime flags once, at the start of every
script; the rest are small helpers the training loops call (``autocast``,
``to_device``, ``step_statistics``) and ``run_main``, which turns a
``UserError`` into one line on stderr and exit code 2.
"""

import argparse
import contextlib
import os
import random
import re
import sys

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from networks.cpu_bf16_conv import use_matmul_weight_grad
from supcon import slurm
from supcon.distributed import (  # noqa: F401 (re-exported for the scripts)
    all_reduce_sum,
    destroy_process_group,
    is_initialized,
    is_main_process,
    main_process_first,
)
from supcon.errors import UserError


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
        help='checkpoint to continue from, or "auto" for the newest one in this run\'s save'
        ' folder; auto when SLURM starts a job again (SLURM_RESTART_COUNT > 0)',
    )
    return group


# --------------------------------------------------------------------------- devices


def setup_runtime(opt):
    """Choose the device, start the process group under torchrun, size the loaders.

    Sets ``opt.device``, ``opt.distributed``, ``opt.rank``, ``opt.world_size``,
    ``opt.local_batch_size`` and caps ``opt.num_workers`` at the CPUs present.
    """
    opt.world_size, opt.rank, local_rank = torchrun_environment()
    opt.distributed = opt.world_size > 1
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
    if opt.distributed and want.startswith('cuda'):
        want = f'cuda:{local_rank}'
    opt.device = torch.device(want)
    # checked before the process group starts, so every rank fails at once
    batch_size = getattr(opt, 'batch_size', opt.world_size)  # main_tsne.py only evaluates
    if batch_size % opt.world_size:
        raise UserError(
            f'--batch_size {opt.batch_size} does not divide by the {opt.world_size}'
            f' processes; --batch_size is the global batch, pick a multiple of'
            f' {opt.world_size}'
        )
    if opt.distributed and getattr(opt, 'syncBN', False) and opt.device.type != 'cuda':
        raise UserError(
            f'--syncBN needs CUDA devices (PyTorch\'s SyncBatchNorm does not run on'
            f' {opt.device.type}); drop --syncBN or run with --device cuda'
        )
    if opt.device.type == 'cuda':
        if opt.device.index is None:  # set_device and DDP need an explicit index
            opt.device = torch.device('cuda', torch.cuda.current_device())
        torch.cuda.set_device(opt.device)
        torch.backends.cudnn.benchmark = True
    if opt.distributed and not is_initialized():
        dist.init_process_group(backend='nccl' if opt.device.type == 'cuda' else 'gloo')
    opt.local_batch_size = batch_size // opt.world_size
    opt.local_batch_size_val = max(1, getattr(opt, 'batch_size_val', 256) // opt.world_size)
    local_world = int(os.environ.get('LOCAL_WORLD_SIZE', 1))
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
    opt.num_workers = min(opt.num_workers, max(1, (cpus or 1) // local_world))
    opt.pin_memory = opt.device.type == 'cuda'
    configure_precision(opt)
    if getattr(opt, 'syncBN', False) and not opt.distributed and is_main_process():
        print(
            'note: --syncBN has no effect without torchrun (a single process already sees'
            ' the whole batch); start with torchrun to synchronise BatchNorm across GPUs'
        )
    if opt.seed is None:
        opt.seed = random.SystemRandom().randrange(2**31)
        if opt.distributed:
            # the samplers shard one shared permutation: every rank must draw it from one seed
            seed = torch.tensor([opt.seed], dtype=torch.long, device=opt.device)
            dist.broadcast(seed, src=0)
            opt.seed = int(seed.item())
        opt.seed_given = False
    else:
        opt.seed_given = True
    seed_everything(opt.seed + opt.rank)


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


def configure_precision(opt):
    """Resolve --amp/--amp_dtype/--channels_last into ``opt.amp_torch_dtype``."""
    opt.amp_torch_dtype = None
    if opt.amp:
        dtype = opt.amp_dtype
        if opt.device.type == 'cpu':
            if dtype == 'float16':
                raise UserError(
                    '--amp_dtype float16 is for CUDA; on CPU use --amp_dtype bfloat16 (or auto)'
                )
            dtype = 'bfloat16'
        elif opt.device.type == 'cuda' and dtype == 'auto':
            dtype = 'bfloat16' if torch.cuda.is_bf16_supported() else 'float16'
        opt.amp_dtype = dtype
        opt.amp_torch_dtype = getattr(torch, dtype)
    if opt.channels_last is None:
        opt.channels_last = bool(opt.amp)


def autocast(opt):
    if opt.amp_torch_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=opt.device.type, dtype=opt.amp_torch_dtype)


def make_scaler(opt):
    """A gradient scaler, enabled only for float16 on CUDA (bfloat16 needs none)."""
    enabled = opt.device.type == 'cuda' and opt.amp_torch_dtype == torch.float16
    return torch.amp.GradScaler('cuda', enabled=enabled)


def to_device(images, opt):
    images = images.to(opt.device, non_blocking=True)
    if opt.channels_last and images.dim() == 4:
        images = images.contiguous(memory_format=torch.channels_last)
    return images


def prepare_model(model, opt, parallel='encoder'):
    """Move to the device and wrap for several GPUs.

    On the CPU under bfloat16 --amp, convolutions get the matmul weight gradient
    (``networks/cpu_bf16_conv.py``) when asked for with --cpu_bf16_wgrad matmul.
    Under torchrun: SyncBatchNorm when --syncBN, then DistributedDataParallel
    over the whole model (when it has anything to train). In a single process
    with several GPUs: DataParallel over ``model.<parallel>`` as the reference
    does, over the whole module for ``parallel=''``, never for ``None``.
    Returns the module to call; ``bare_state_dict`` gives keys without wrappers.
    """
    if opt.distributed and getattr(opt, 'syncBN', False):
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if (
        opt.device.type == 'cpu'
        and opt.amp_torch_dtype == torch.bfloat16
        and not opt.compile
        and getattr(opt, 'cpu_bf16_wgrad', 'onednn') == 'matmul'
    ):
        use_matmul_weight_grad(model)
    model = model.to(opt.device)
    if opt.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if (
        not opt.distributed
        and parallel is not None
        and opt.device.type == 'cuda'
        and torch.cuda.device_count() > 1
    ):
        if parallel:
            setattr(model, parallel, nn.DataParallel(getattr(model, parallel)))
        else:
            model = nn.DataParallel(model)
    if opt.compile:
        model = torch.compile(model)
    if opt.distributed and any(p.requires_grad for p in model.parameters()):
        device_ids = [opt.device.index] if opt.device.type == 'cuda' else None
        model = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    return model


def unwrap(model):
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


def step_statistics(opt, *values):
    """Sum per-step statistics over ranks in one collective and one host sync.

    Values may be tensors on the device or numbers. Callers pass the stop flag
    last: every rank then stops at the same step, so none waits forever in a
    collective the others left.
    """
    stats = torch.stack(
        [torch.as_tensor(v, device=opt.device).detach().double().reshape(()) for v in values]
    )
    all_reduce_sum(stats)
    return stats.tolist()


def run_main(main):
    """Run a script's ``main``; user errors print one line and exit 2, Ctrl-C exits 130."""
    try:
        main()
    except UserError as exc:
        message = str(exc)
        if 'Traceback' in message:  # raised in a DataLoader worker: keep the last line
            lines = [line for line in message.splitlines() if line.strip()]
            message = lines[-1].split(': ', 1)[-1] if lines else message
        print(f'error: {message}', file=sys.stderr, flush=True)
        cleanup_runtime()
        sys.exit(2)
    except KeyboardInterrupt as exc:  # Ctrl-C without a handler, or GracefulStop's second one
        message = str(exc).strip() or 'interrupted by Ctrl-C'
        print(f'error: {message}', file=sys.stderr, flush=True)
        with contextlib.suppress(Exception):
            cleanup_runtime()
        sys.exit(130)
    cleanup_runtime()
