"""Training utilities shared by the entry scripts.

Schedules, meters, checkpoints, device and distributed set-up, mixed precision
and TensorBoard logging live here; datasets and transforms live in ``data.py``.
"""
import argparse
import contextlib
import glob
import math
import os
import random
import re
import shlex
import signal
import sys
import tempfile
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn


class UserError(Exception):
    """A problem the user can fix; the message is one line naming it and the fix."""


class NonFiniteLossError(UserError):
    """The loss became NaN or infinite: training diverged."""


# --------------------------------------------------------------------------- options

def add_data_arguments(parser, test_folder=True):
    """Data flags of the reference and of the fork that added ``--dataset path``."""
    from data import DATASET_NAMES  # data imports util: import here, not at the top
    group = parser.add_argument_group('data')
    group.add_argument('--dataset', type=str, default='cifar10', choices=DATASET_NAMES,
                       help='digits is scikit-learn\'s 8x8 digits, shipped offline for demos')
    group.add_argument('--data_folder', type=str, default=None,
                       help='CIFAR root or, for --dataset path, the training image folder'
                            ' (one sub-folder per class); default ./datasets/')
    if test_folder:
        group.add_argument('--test_folder', type=str, default=None,
                           help='test image folder for --dataset path')
    group.add_argument('--mean', type=str, default=None,
                       help='per-channel mean as text, e.g. "(0.4914, 0.4822, 0.4465)"')
    group.add_argument('--std', type=str, default=None,
                       help='per-channel std as text, e.g. "(0.2675, 0.2565, 0.2761)"')
    group.add_argument('--size', type=int, default=32, help='crop size fed to the network')
    group.add_argument('--num_classes', type=int, default=None,
                       help='number of classes; read from the data when not given')
    group.add_argument('--batch_size_val', type=int, default=256, help='evaluation batch size')
    return group


def add_runtime_arguments(parser):
    """Flags the reference does not have: devices, precision, resuming, seeds."""
    group = parser.add_argument_group('runtime (not in the reference)')
    group.add_argument('--device', type=str, default='auto',
                       help='auto (CUDA when present, else CPU), cpu, cuda or cuda:N')
    group.add_argument('--amp', action='store_true',
                       help='mixed precision: bfloat16 autocast on CPU, float16 or bfloat16 on'
                            ' CUDA; the contrastive loss and softmax stay in float32')
    group.add_argument('--amp_dtype', type=str, default='auto',
                       choices=['auto', 'bfloat16', 'float16'],
                       help='auto: bfloat16 on CPU and on GPUs that support it, else float16'
                            ' with a gradient scaler')
    group.add_argument('--channels_last', action=argparse.BooleanOptionalAction, default=None,
                       help='NHWC memory format for the conv net; default: on with --amp,'
                            ' where it measured faster (benchmarks/README.md)')
    group.add_argument('--compile', action='store_true',
                       help='torch.compile the model (pays on CUDA; long warm-up on CPU)')
    group.add_argument('--seed', type=int, default=None,
                       help='seed for data order, augmentation and initialisation;'
                            ' random (and recorded in the checkpoint) when not given')
    group.add_argument('--resume', type=str, default=None,
                       help='checkpoint to continue from, or "auto" for the newest one in'
                            ' this run\'s save folder')
    return group


def parse_decay_epochs(text):
    try:
        return [int(item) for item in str(text).split(',') if item.strip()]
    except ValueError:
        raise UserError(f'--lr_decay_epochs must be comma-separated epochs such as'
                        f' "700,800,900", got {text!r}') from None


def configure_warmup(opt, large_batch=256):
    """Reference warm-up: from 0.01 over 10 epochs, forced on for large batches.

    ``large_batch=None`` keeps warm-up opt-in (the reference's linear script).
    """
    if large_batch is not None and opt.batch_size > large_batch:
        opt.warm = True
    if opt.warm:
        opt.model_name = '{}_warm'.format(opt.model_name)
        opt.warmup_from = 0.01
        opt.warm_epochs = 10
        if opt.cosine:
            eta_min = opt.learning_rate * (opt.lr_decay_rate ** 3)
            opt.warmup_to = eta_min + (opt.learning_rate - eta_min) * (
                1 + math.cos(math.pi * opt.warm_epochs / opt.epochs)) / 2
        else:
            opt.warmup_to = opt.learning_rate


def check_choice(value, choices, flag):
    if value not in choices:
        raise UserError(f'{flag} {value} is not known; choose one of {", ".join(choices)}')


def check_common_options(opt):
    for name in ('batch_size', 'epochs', 'save_freq', 'print_freq', 'size', 'batch_size_val'):
        value = getattr(opt, name, None)
        if value is not None and value < 1:
            raise UserError(f'--{name} must be a positive integer, got {value}')
    if opt.learning_rate <= 0:
        raise UserError(f'--learning_rate must be positive, got {opt.learning_rate}')
    if opt.num_workers < 0:
        raise UserError(f'--num_workers must be 0 or more, got {opt.num_workers}')


def print_options(opt):
    if not is_main_process():
        return
    print('options:')
    for key, value in sorted(plain_options(opt).items()):
        print(f'  {key}: {value}')
    sys.stdout.flush()


def plain_options(opt):
    """The options as a dict of plain values, safe for ``weights_only`` loading."""
    plain = {}
    for key, value in vars(opt).items():
        if isinstance(value, torch.device):
            value = str(value)
        if value is None or isinstance(value, (bool, int, float, str)):
            plain[key] = value
        elif isinstance(value, (list, tuple)) and all(
                isinstance(v, (bool, int, float, str)) for v in value):
            plain[key] = list(value)
    return plain


# --------------------------------------------------------------------------- schedule

def learning_rate_at(opt, epoch):
    """Epoch learning rate of the reference: cosine to lr * rate**3, or step decay."""
    lr = opt.learning_rate
    if opt.cosine:
        eta_min = lr * (opt.lr_decay_rate ** 3)
        lr = eta_min + (lr - eta_min) * (1 + math.cos(math.pi * epoch / opt.epochs)) / 2
    else:
        steps = int(np.sum(epoch > np.asarray(opt.lr_decay_epochs)))
        if steps > 0:
            lr = lr * (opt.lr_decay_rate ** steps)
    return lr


def adjust_learning_rate(opt, optimizer, epoch):
    set_lr(optimizer, learning_rate_at(opt, epoch))


def warmup_learning_rate(opt, epoch, batch_id, total_batches, optimizer):
    """Per-batch linear warm-up over the first ``warm_epochs`` epochs (1-based)."""
    if opt.warm and epoch <= opt.warm_epochs:
        p = (batch_id + (epoch - 1) * total_batches) / (opt.warm_epochs * total_batches)
        set_lr(optimizer, opt.warmup_from + p * (opt.warmup_to - opt.warmup_from))


def set_lr(optimizer, lr):
    for param_group in optimizer.param_groups:
        param_group['lr'] = lr


def set_optimizer(opt, model):
    return torch.optim.SGD(model.parameters(), lr=opt.learning_rate,
                           momentum=opt.momentum, weight_decay=opt.weight_decay)


# --------------------------------------------------------------------------- meters

class AverageMeter:
    """Running value, sum, count and average."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.val = 0.0
        self.avg = 0.0
        self.sum = 0.0
        self.count = 0

    def update(self, val, n=1):
        self.val = val
        self.sum += val * n
        self.count += n
        self.avg = self.sum / self.count if self.count else 0.0

    def state_dict(self):
        return {'sum': self.sum, 'count': self.count}

    def load_state_dict(self, state):
        self.sum, self.count = float(state['sum']), int(state['count'])
        self.avg = self.sum / self.count if self.count else 0.0


def correct_counts(output, target, topk=(1,)):
    """Number of samples whose label is among the top-k predictions, per k."""
    maxk = min(max(topk), output.shape[1])
    _, pred = output.topk(maxk, 1, True, True)
    hits = pred.t().eq(target.view(1, -1))
    return [hits[:min(k, maxk)].reshape(-1).float().sum() for k in topk]


def accuracy(output, target, topk=(1,)):
    """Top-k accuracies in percent, as the reference's ``accuracy``."""
    with torch.no_grad():
        batch_size = target.size(0)
        return [c.mul(100.0 / batch_size) for c in correct_counts(output, target, topk)]


# --------------------------------------------------------------------------- devices

def setup_runtime(opt):
    """Choose the device, start the process group under torchrun, size the loaders.

    Sets ``opt.device``, ``opt.distributed``, ``opt.rank``, ``opt.world_size``,
    ``opt.local_batch_size`` and caps ``opt.num_workers`` at the CPUs present.
    """
    opt.distributed = 'WORLD_SIZE' in os.environ and 'LOCAL_RANK' in os.environ
    opt.rank, opt.world_size, local_rank = 0, 1, 0
    want = opt.device
    if want == 'auto':
        want = 'cuda' if torch.cuda.is_available() else 'cpu'
    if want.startswith('cuda') and not torch.cuda.is_available():
        raise UserError(f'--device {opt.device}: CUDA is not available on this machine;'
                        f' use --device cpu')
    if opt.distributed:
        opt.rank = int(os.environ['RANK'])
        opt.world_size = int(os.environ['WORLD_SIZE'])
        local_rank = int(os.environ['LOCAL_RANK'])
        if want.startswith('cuda'):
            want = f'cuda:{local_rank}'
    try:
        opt.device = torch.device(want)
    except RuntimeError:
        raise UserError(f'--device must be auto, cpu, cuda or cuda:N, got {opt.device!r}') from None
    # checked before the process group starts, so every rank fails at once
    if opt.batch_size % opt.world_size:
        raise UserError(f'--batch_size {opt.batch_size} does not divide by the {opt.world_size}'
                        f' processes; --batch_size is the global batch, pick a multiple of'
                        f' {opt.world_size}')
    if opt.distributed and getattr(opt, 'syncBN', False) and opt.device.type != 'cuda':
        raise UserError(f'--syncBN needs CUDA devices (PyTorch\'s SyncBatchNorm does not run on'
                        f' {opt.device.type}); drop --syncBN or run with --device cuda')
    if opt.device.type == 'cuda':
        if opt.device.index is None:  # set_device and DDP need an explicit index
            opt.device = torch.device('cuda', torch.cuda.current_device())
        torch.cuda.set_device(opt.device)
        torch.backends.cudnn.benchmark = True
    if opt.distributed and not dist.is_initialized():
        dist.init_process_group(backend='nccl' if opt.device.type == 'cuda' else 'gloo')
    opt.local_batch_size = opt.batch_size // opt.world_size
    opt.local_batch_size_val = max(1, getattr(opt, 'batch_size_val', 256) // opt.world_size)
    local_world = int(os.environ.get('LOCAL_WORLD_SIZE', 1))
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
    opt.num_workers = min(opt.num_workers, max(1, (cpus or 1) // local_world))
    opt.pin_memory = opt.device.type == 'cuda'
    configure_precision(opt)
    if getattr(opt, 'syncBN', False) and not opt.distributed and is_main_process():
        print('note: --syncBN has no effect without torchrun (a single process already sees'
              ' the whole batch); start with torchrun to synchronise BatchNorm across GPUs')
    if opt.seed is None:
        opt.seed = random.SystemRandom().randrange(2 ** 31)
        if opt.distributed:
            # the samplers shard one shared permutation: every rank must draw it from one seed
            seed = torch.tensor([opt.seed], dtype=torch.long, device=opt.device)
            dist.broadcast(seed, src=0)
            opt.seed = int(seed.item())
        opt.seed_given = False
    else:
        opt.seed_given = True
    seed_everything(opt.seed + opt.rank)


def configure_precision(opt):
    """Resolve --amp/--amp_dtype/--channels_last into ``opt.amp_torch_dtype``."""
    opt.amp_torch_dtype = None
    if opt.amp:
        dtype = opt.amp_dtype
        if opt.device.type == 'cpu':
            if dtype == 'float16':
                raise UserError('--amp_dtype float16 is for CUDA; on CPU use --amp_dtype'
                                ' bfloat16 (or auto)')
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

    Under torchrun: SyncBatchNorm when --syncBN, then DistributedDataParallel
    over the whole model (when it has anything to train). In a single process
    with several GPUs: DataParallel over ``model.<parallel>`` as the reference
    does, over the whole module for ``parallel=''``, never for ``None``.
    Returns the module to call; ``bare_state_dict`` gives keys without wrappers.
    """
    if opt.distributed and getattr(opt, 'syncBN', False):
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(opt.device)
    if opt.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if (not opt.distributed and parallel is not None and opt.device.type == 'cuda'
            and torch.cuda.device_count() > 1):
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


# the look-behind leaves the dot unconsumed, so nested wrappers (module._orig_mod.) all go
_WRAPPER_KEY = re.compile(r'(^|(?<=\.))(module|_orig_mod)\.')


def strip_wrapper_keys(state_dict):
    """Drop ``module.``/``_orig_mod.`` segments left by DataParallel, DDP or compile."""
    return {_WRAPPER_KEY.sub(r'\1', key): value for key, value in state_dict.items()}


def bare_state_dict(model):
    return strip_wrapper_keys(unwrap(model).state_dict())


def load_bare_state_dict(model, state_dict):
    """Load wrapper-free keys into a model whose sub-modules may be wrapped."""
    target = unwrap(model)
    actual = {_WRAPPER_KEY.sub(r'\1', key): key for key in target.state_dict()}
    target.load_state_dict({actual.get(key, key): value for key, value in state_dict.items()})


# --------------------------------------------------------------------------- distributed

def is_main_process():
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def all_reduce_sum(tensor):
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor)
    return tensor


@contextlib.contextmanager
def main_process_first():
    """Let rank 0 go first (e.g. to download a data set) while the others wait."""
    distributed = dist.is_available() and dist.is_initialized()
    if distributed and not is_main_process():
        dist.barrier()
    yield
    if distributed and is_main_process():
        dist.barrier()


def cleanup_runtime():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------- checkpoints

def save_checkpoint(state, path):
    """Write atomically: a temporary file, flushed and synced, then renamed.

    A kill at any moment leaves either the previous file or the new one, never
    a truncated checkpoint. Only the main process writes.
    """
    if not is_main_process():
        return
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix='.' + os.path.basename(path) + '.', suffix='.tmp',
                               dir=folder)
    try:
        # mkstemp makes the file private (0600); give it what torch.save's open() would
        umask = os.umask(0o022)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with os.fdopen(fd, 'wb') as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def load_checkpoint(path, flag='--ckpt'):
    """Load with ``weights_only=True``; accepts the reference's checkpoints.

    The reference stores its options as an ``argparse.Namespace``: it is the one
    class allowed besides tensors and plain containers, and is turned into a dict.
    """
    if not path or not os.path.isfile(path):
        raise UserError(f'{flag} {path}: no such file; pass the path of a .pth file written'
                        f' by main_supcon.py, main_ce.py or main_linear.py')
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as exc:  # truncated zip, random bytes, forbidden pickled code
        reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise UserError(f'{flag} {path} is not a readable checkpoint ({reason}); it may be'
                        f' truncated or not written by these scripts: pass another file')
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get('model'), dict):
        raise UserError(f'{flag} {path} is not a SupContrast checkpoint (it has no model'
                        f' weights under "model"); pass a .pth written by these scripts')
    if isinstance(ckpt.get('opt'), argparse.Namespace):
        ckpt['opt'] = vars(ckpt['opt'])
    ckpt.setdefault('opt', {})
    ckpt['model'] = strip_wrapper_keys(ckpt['model'])
    return ckpt


def load_encoder(encoder, state_dict, path, model_name):
    """Load the ``encoder.*`` weights of a checkpoint into ``encoder`` strictly."""
    prefix = 'encoder.'
    enc_state = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    if not enc_state:
        raise UserError(f'--ckpt {path} holds no encoder weights (no "encoder." keys); pass a'
                        f' checkpoint written by main_supcon.py or main_ce.py')
    try:
        encoder.load_state_dict(enc_state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[1].strip() if len(str(exc).splitlines()) > 1 else str(exc)
        raise UserError(f'--ckpt {path} does not fit --model {model_name} ({first[:160]});'
                        f' pass the --model (and --stem) it was trained with') from None


def rng_state():
    np_state = np.random.get_state(legacy=False)
    state = {
        'python': random.getstate(),
        'numpy_key': torch.from_numpy(np_state['state']['key'].astype(np.int64)),
        'numpy_pos': int(np_state['state']['pos']),
        'numpy_gauss': (int(np_state['has_gauss']), float(np_state['gauss'])),
        'torch': torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    if not state:
        return
    version, internal, gauss = state['python']
    random.setstate((version, tuple(internal), gauss))
    np.random.set_state({'bit_generator': 'MT19937',
                         'state': {'key': state['numpy_key'].numpy().astype(np.uint32),
                                   'pos': state['numpy_pos']},
                         'has_gauss': state['numpy_gauss'][0],
                         'gauss': state['numpy_gauss'][1]})
    torch.set_rng_state(state['torch'])
    if 'cuda' in state and torch.cuda.is_available():
        with contextlib.suppress(RuntimeError, IndexError):
            torch.cuda.set_rng_state_all(state['cuda'])


# --------------------------------------------------------------------------- runs

class Run:
    """Resuming, per-epoch checkpoints and TensorBoard for one training run.

    The run's own ``checkpoint.pth`` is refreshed after every epoch (and on a
    signal), so a crash loses at most one epoch; ``ckpt_epoch_{N}.pth`` and
    ``last.pth`` are written as the reference does.
    """

    #: Options that define the run: resuming with another value is refused.
    FIXED = ('model', 'dataset', 'method', 'batch_size', 'size', 'stem', 'head', 'feat_dim',
             'temp', 'ckpt', 'seed', 'learning_rate', 'cosine', 'num_classes', 'weight_decay',
             'momentum', 'lr_decay_rate', 'lr_decay_epochs', 'warm')

    def __init__(self, opt, meters=None):
        """Find and read the ``--resume`` checkpoint; call before building loaders.

        The checkpoint's seed is adopted here (when --seed is not given), so data
        order and augmentation continue exactly where the run stopped.
        """
        self.opt = opt
        self.meters = meters or {}
        self.model = self.optimizer = self.scaler = None
        self.extra = {}
        self.start_epoch = 1
        self.start_step = 0
        self.stop = GracefulStop()
        self._writer = None
        self._ckpt, self._ckpt_path = None, None
        self._remove_stale_temporaries()  # left by a kill during a save; never loaded
        if opt.resume is None:
            return
        path = opt.resume
        if path == 'auto':
            path = newest_checkpoint(opt.save_folder)
            if path is None:
                if is_main_process():
                    print(f'--resume auto: no checkpoint in {opt.save_folder} yet; starting a'
                          f' fresh run')
                return
        self._ckpt, self._ckpt_path = load_checkpoint(path, flag='--resume'), path
        self._check_same_run(self._ckpt.get('opt', {}), path)

    def restore(self, model, optimizer, scaler=None):
        """Attach what is trained and restore its state; returns the first epoch to run."""
        self.model, self.optimizer, self.scaler = model, optimizer, scaler
        ckpt, path = self._ckpt, self._ckpt_path
        if ckpt is None:
            return self.start_epoch
        try:
            load_bare_state_dict(self.model, ckpt['model'])
        except RuntimeError:
            raise UserError(f'--resume {path}: its weights do not fit this model; resume with'
                            f' the options it was trained with') from None
        if 'optimizer' in ckpt:
            self.optimizer.load_state_dict(ckpt['optimizer'])
        if self.scaler is not None and ckpt.get('scaler'):
            self.scaler.load_state_dict(ckpt['scaler'])
        set_rng_state(ckpt.get('rng'))
        for name, meter in self.meters.items():
            if name in ckpt.get('meters', {}):
                meter.load_state_dict(ckpt['meters'][name])
        self.extra = dict(ckpt.get('extra', {}))
        epoch, step = int(ckpt['epoch']), int(ckpt.get('step', 0))
        # a mid-epoch checkpoint records the last complete epoch and the steps done since
        self.start_epoch, self.start_step = epoch + 1, step
        self._ckpt = None
        if is_main_process():
            if self.start_epoch > self.opt.epochs:
                print(f'resumed from {path}: all {self.opt.epochs} epochs are done already')
            else:
                where = f'epoch {self.start_epoch}' + (f', step {step + 1}' if step else '')
                print(f'resumed from {path}: continuing at {where}')
        return self.start_epoch

    def _check_same_run(self, saved, path):
        opt = self.opt
        if not opt.seed_given and saved.get('seed') is not None:
            opt.seed = int(saved['seed'])
            seed_everything(opt.seed + opt.rank)
        for key in self.FIXED:
            if key in saved and hasattr(opt, key) and saved[key] != getattr(opt, key):
                now, then = getattr(opt, key), saved[key]
                if isinstance(then, bool):  # a switch such as --cosine
                    raise UserError(f'--resume {path}: the run was trained'
                                    f' {"with" if then else "without"} --{key}; resume'
                                    f' {"with" if then else "without"} it or start a new run'
                                    f' (another --trial)')
                if isinstance(then, (list, tuple)):  # --lr_decay_epochs
                    now, then = ','.join(map(str, now)), ','.join(map(str, then))
                raise UserError(f'--resume {path}: --{key} {now} differs from the'
                                f' run\'s {then}; resume with --{key} {then} or start'
                                f' a new run (another --trial)')

    def _remove_stale_temporaries(self):
        if is_main_process():
            for tmp in glob.glob(os.path.join(self.opt.save_folder, '.*.tmp')):
                with contextlib.suppress(OSError):
                    os.remove(tmp)

    def begin_epoch(self, epoch, sampler):
        """Point the sampler at this epoch (and past the steps a resumed epoch did)."""
        sampler.set_epoch(epoch)
        sampler.set_start(self.start_step * self.opt.local_batch_size
                          if epoch == self.start_epoch else 0)
        adjust_learning_rate(self.opt, self.optimizer, epoch)

    def epoch_start_step(self, epoch):
        """Steps of ``epoch`` already done before a mid-epoch resume (else 0)."""
        start = self.start_step if epoch == self.start_epoch else 0
        if not start:
            for meter in self.meters.values():
                meter.reset()
        return start

    # -- saving
    def state(self, epoch, step=0):
        return {
            'model': bare_state_dict(self.model),
            'optimizer': self.optimizer.state_dict(),
            'epoch': epoch,
            'step': step,
            'opt': plain_options(self.opt),
            'scaler': self.scaler.state_dict() if self.scaler is not None and
            self.scaler.is_enabled() else None,
            'rng': rng_state(),
            'meters': {name: m.state_dict() for name, m in self.meters.items()} if step else {},
            'extra': self.extra,
        }

    def save(self, name, epoch, step=0):
        path = os.path.join(self.opt.save_folder, name)
        save_checkpoint(self.state(epoch, step), path)
        return path

    def end_epoch(self, epoch):
        """Refresh the run's checkpoint; keep a numbered one every save_freq epochs."""
        if not is_main_process():
            return
        state = self.state(epoch)
        save_checkpoint(state, os.path.join(self.opt.save_folder, 'checkpoint.pth'))
        if epoch % self.opt.save_freq == 0:
            save_checkpoint(state, os.path.join(self.opt.save_folder,
                                                f'ckpt_epoch_{epoch}.pth'))

    def interrupted(self, epoch, step):
        """Save the position after a signal and exit non-zero with how to resume."""
        path = self.save('checkpoint.pth', epoch - 1, step)
        if is_main_process():
            command = shlex.join([sys.argv[0]] + without_resume(sys.argv[1:])
                                 + ['--resume', 'auto'])
            launcher = ('torchrun <the same torchrun options>' if self.opt.distributed
                        else 'python')
            print(f'stopped by {self.stop.name} at epoch {epoch}, step {step}; saved {path}.'
                  f' Continue with: {launcher} {command}', flush=True)
        self.close()
        cleanup_runtime()
        sys.exit(128 + self.stop.signum)

    # -- logging
    @property
    def logger(self):
        if self._writer is None:
            self._writer = TBLogger(self.opt.tb_folder, purge_step=self.start_epoch)
        return self._writer

    def close(self):
        if self._writer is not None:
            self._writer.close()


def newest_checkpoint(folder):
    """The most recently written loadable checkpoint of a run folder, or None."""
    paths = [p for p in glob.glob(os.path.join(folder, '*.pth'))]
    for path in sorted(paths, key=os.path.getmtime, reverse=True):
        try:
            load_checkpoint(path, flag='--resume')
        except UserError:
            if is_main_process():
                print(f'note: --resume auto skips {path}: not a readable checkpoint')
            continue
        return path
    return None


def without_resume(args):
    """Command-line arguments less any ``--resume X`` / ``--resume=X``."""
    kept, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg == '--resume':
            skip = True
        elif not arg.startswith('--resume='):
            kept.append(arg)
    return kept


class GracefulStop:
    """SIGTERM/Ctrl-C ask the loop to stop after the current step; a second Ctrl-C aborts."""

    def __init__(self):
        self.signum = 0
        try:
            signal.signal(signal.SIGTERM, self._handle)
            signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread (e.g. under a test runner's thread)
            pass

    def _handle(self, signum, frame):
        if self.signum and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        if is_main_process():
            print(f'\n{self.name} received: finishing the current step, then saving',
                  flush=True)

    @property
    def name(self):
        return signal.Signals(self.signum).name if self.signum else ''

    @property
    def requested(self):
        return bool(self.signum)


def wait_for_a_later_second(log_dir):
    """Sleep (under a second) until the clock is past every event file's timestamp in ``log_dir``.

    TensorBoard reads a folder's event files in name order, and a name starts with the second the
    writer was created, then host and process id. A resumed run whose writer started in the same
    second as the killed run's could sort first; its purge_step would then erase the killed run's
    earlier epochs instead of hiding its later ones.
    """
    stamps = []
    for name in os.listdir(log_dir) if os.path.isdir(log_dir) else ():
        parts = name.split('.')
        if name.startswith('events.out.tfevents.') and len(parts) > 3 and parts[3].isdigit():
            stamps.append(int(parts[3]))
    if stamps:
        delay = max(stamps) + 1 - time.time()
        if 0 < delay <= 2:
            time.sleep(delay)


class TBLogger:
    """``log_value(name, value, step)`` as tensorboard_logger had, on the main process.

    ``purge_step`` hides events at or after the step a resumed run starts from,
    so a run killed after logging but before saving shows no duplicated step.
    """

    def __init__(self, log_dir, purge_step=None):
        self.writer = None
        if is_main_process():
            from torch.utils.tensorboard import SummaryWriter
            wait_for_a_later_second(log_dir)
            self.writer = SummaryWriter(log_dir=log_dir, purge_step=purge_step)

    def log_value(self, name, value, step):
        if self.writer is not None:
            self.writer.add_scalar(name, value, step)

    def flush(self):
        if self.writer is not None:
            self.writer.flush()

    def close(self):
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def step_statistics(opt, *values):
    """Sum per-step statistics over ranks in one collective and one host sync.

    Values may be tensors on the device or numbers. Callers pass the stop flag
    last: every rank then stops at the same step, so none waits forever in a
    collective the others left.
    """
    stats = torch.stack([torch.as_tensor(v, device=opt.device).detach().double().reshape(())
                         for v in values])
    all_reduce_sum(stats)
    return stats.tolist()


def train_classifier(train_loader, forward, criterion, optimizer, scaler, epoch, opt, run):
    """One epoch of cross-entropy training (main_ce.py and main_linear.py).

    ``forward(images)`` returns logits. Returns ``(loss, top-1, stopped_at)``;
    ``stopped_at`` is the step a signal stopped the epoch at, else None.
    """
    batch_time, data_time = AverageMeter(), AverageMeter()
    losses, top1 = run.meters['loss'], run.meters['acc']
    start = run.epoch_start_step(epoch)
    end = time.time()
    for i, (images, labels) in enumerate(train_loader):
        step = start + i
        # measure data loading time
        data_time.update(time.time() - end)
        images = to_device(images, opt)
        labels = labels.to(opt.device, non_blocking=True)
        bsz = labels.shape[0]

        warmup_learning_rate(opt, epoch, step, opt.steps_per_epoch, optimizer)

        # compute loss; logits go to float32 so the softmax is never in half precision
        with autocast(opt):
            output = forward(images)
        loss = criterion(output.float(), labels)

        # compute gradient and do SGD step
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

        # one host sync a step: statistics summed over ranks, NaN check, agreed stop
        correct, = correct_counts(output.detach(), labels)
        loss_sum, correct, n, stop = step_statistics(
            opt, loss.detach() * bsz, correct, bsz, run.stop.requested)
        check_finite(loss_sum, epoch, step + 1, opt)
        losses.update(loss_sum / n, n)
        top1.update(100.0 * correct / n, n)
        batch_time.update(time.time() - end)
        end = time.time()

        if (step + 1) % opt.print_freq == 0 and is_main_process():
            print('Train: [{0}][{1}/{2}]\t'
                  'BT {batch_time.val:.3f} ({batch_time.avg:.3f})\t'
                  'DT {data_time.val:.3f} ({data_time.avg:.3f})\t'
                  'loss {loss.val:.3f} ({loss.avg:.3f})\t'
                  'Acc@1 {top1.val:.3f} ({top1.avg:.3f})'.format(
                      epoch, step + 1, opt.steps_per_epoch, batch_time=batch_time,
                      data_time=data_time, loss=losses, top1=top1), flush=True)
        if stop:
            return losses.avg, top1.avg, step + 1
    return losses.avg, top1.avg, None


def validate(val_loader, forward, criterion, opt):
    """Loss, top-1 and top-5 (None under 5 classes) over the whole test split.

    Under torchrun each rank evaluates its own share (no padding) and the sums
    are added up, so every test image counts exactly once.
    """
    topk = (1, 5) if opt.n_cls >= 5 else (1,)
    totals = torch.zeros(2 + len(topk), dtype=torch.float64, device=opt.device)
    batch_time = AverageMeter()
    with torch.no_grad():
        end = time.time()
        for idx, (images, labels) in enumerate(val_loader):
            images = to_device(images, opt)
            labels = labels.to(opt.device, non_blocking=True)
            with autocast(opt):
                output = forward(images)
            output = output.float()
            loss = criterion(output, labels)
            counts = correct_counts(output, labels, topk)
            totals += torch.stack([loss * labels.shape[0],
                                   torch.tensor(float(labels.shape[0]), device=opt.device),
                                   *counts]).double()
            batch_time.update(time.time() - end)
            end = time.time()
            if idx % opt.print_freq == 0 and is_main_process():
                loss_avg, n, correct1 = totals[0].item(), totals[1].item(), totals[2].item()
                print('Test: [{0}/{1}]\t'
                      'Time {batch_time.val:.3f} ({batch_time.avg:.3f})\t'
                      'Loss {2:.4f}\tAcc@1 {3:.3f}'.format(
                          idx, len(val_loader), loss_avg / n, 100.0 * correct1 / n,
                          batch_time=batch_time), flush=True)
    all_reduce_sum(totals)
    loss_sum, n, *correct = totals.tolist()
    n = max(n, 1.0)
    accs = [100.0 * c / n for c in correct]
    top5 = accs[1] if len(accs) > 1 else None
    if is_main_process():
        print(' * Acc@1 {:.3f}'.format(accs[0])
              + (' Acc@5 {:.3f}'.format(top5) if top5 is not None else ''), flush=True)
    return loss_sum / n, accs[0], top5


def check_finite(loss, epoch, step, opt):
    if not math.isfinite(loss):
        raise NonFiniteLossError(
            f'loss is {loss} at epoch {epoch}, step {step}: training diverged and nothing was'
            f' saved from it; lower --learning_rate (now {opt.learning_rate}), add --warm, or'
            f' resume from the last checkpoint in {opt.save_folder}')


def run_main(main):
    """Run a script's ``main``; user errors print one line and exit 2."""
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
    cleanup_runtime()
