"""The optional capabilities of the training scripts, each declared in the one module that owns it.

A capability module declares what it adds to a run, with these module-level names (each
optional; ``script`` is ``'supcon'``, ``'ce'`` or ``'linear'``):

- ``add_arguments(parser, ...)``: its flags. The scripts call it where the flags stand in their
  ``--help`` (the reference's order), so it is not looped over here.
- ``check_options(opt, script)``: its checks at parse time (one-line ``UserError``) and the
  defaults that depend on other flags.
- ``take_from_checkpoint(opt, saved)``: main_linear.py's defaults from the checkpoint's options.
- ``check_data(opt, train_set)``: what it refuses about the training data (e.g. multi-hot rows).
- ``run_name(opt, script)``: its parts of the run name, empty while it is off, so that the
  reference's run names stay as they were.
- ``FIXED``: the options a ``--resume`` may not change.
- ``reads_test_split(opt)``: main_supcon.py: whether it scores the test split while pretraining.

``CAPABILITIES`` lists them in the order their parts join a run name. Adding a capability is a
new module with these names and one entry here.
"""

from networks import encoders, from_checkpoint
from supcon.data import augment, balanced, labelling, long_tail, subset, val_split, views
from supcon.evaluation import knn
from supcon.objectives import grad_cache, moco, probe
from supcon.training import finetune, optim

CAPABILITIES = (
    encoders,  # --model's backbone: stem, patch size, timm checkpoint
    knn,  # --knn_every (no run-name part; checked before --moco, as always)
    moco,  # the momentum key encoder and the labelled queue
    grad_cache,  # --grad_cache: the batch in chunks
    optim,  # --optimizer lars
    augment,  # --aug policies, --gpu_aug
    views,  # --n_views, --small_views (multi-crop)
    from_checkpoint,  # main_linear.py --key_encoder
    val_split,  # --val_split
    labelling,  # partial and multiple labels
    balanced,  # --sampler balanced
    long_tail,  # the long-tailed training split
    probe,  # the online probe and the joint classifier
    subset,  # --train_subset
    finetune,  # main_linear.py --finetune (its part ends the run name, as it always has)
)

#: Options of every training run that a resume may not change; the capabilities add theirs.
BASE_FIXED = (
    'model', 'dataset', 'method', 'batch_size', 'size', 'stem', 'head', 'feat_dim', 'temp',
    'ckpt', 'seed', 'learning_rate', 'cosine', 'num_classes', 'weight_decay', 'momentum',
    'lr_decay_rate', 'lr_decay_epochs', 'warm',
)  # fmt: skip

FIXED = BASE_FIXED + tuple(name for cap in CAPABILITIES for name in getattr(cap, 'FIXED', ()))


def _each(hook):
    return [getattr(cap, hook) for cap in CAPABILITIES if hasattr(cap, hook)]


def check_options(opt, script):
    """Every capability's parse-time checks and defaults, in ``CAPABILITIES``' order."""
    for check in _each('check_options'):
        check(opt, script)


def take_from_checkpoint(opt, saved):
    """main_linear.py: the defaults each capability takes from the checkpoint's options."""
    for take in _each('take_from_checkpoint'):
        take(opt, saved)


def check_data(opt, train_set):
    """Every capability's refusals of the training data (before partial labels are applied)."""
    for check in _each('check_data'):
        check(opt, train_set)


def reads_test_split(opt):
    """Whether a capability in use scores the test split during pretraining."""
    return any(reads(opt) for reads in _each('reads_test_split'))


def test_split_flags():
    """'--knn_every, --online_probe, ...': the flags with which pretraining reads the test split."""
    return ', '.join(flag for flags in _each('TEST_SPLIT_FLAGS') for flag in flags)


def run_name_parts(opt, script):
    """The parts the capabilities in use add to the run name, in their order."""
    return [part for name in _each('run_name') for part in name(opt, script)]
