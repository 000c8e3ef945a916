"""t-SNE figure of a trained encoder's features on the test split.

Reads a checkpoint of main_supcon.py (SupCon or SimCLR) or main_ce.py (ours or
the reference's), embeds a fixed, class-balanced subset of the test images (with
``--val_split``, of the held-out training images) with the frozen encoder (or,
with ``--features head``, the projection head), and draws the 2-D t-SNE map one
colour per class. The data set, image size, mean/std and folders default to what
the checkpoint records. Default output: next to the checkpoint,
``<ckpt name>_tsne_[key_]<features>[_val_<fraction>].png``.
"""

import argparse
import math
import os
import time

import matplotlib

matplotlib.use('Agg')  # files only: no display needed on a training machine
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from sklearn.manifold import TSNE  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402

from networks import from_checkpoint  # noqa: E402
from networks.from_checkpoint import (  # noqa: E402
    checkpoint_method,
    checkpoint_model,
    encoder_from_checkpoint,
    head_from_checkpoint,
)
from supcon import options  # noqa: E402
from supcon.data import datasets
from supcon.data.augment import test_transform  # noqa: E402
from supcon.data.labelling import is_multilabel, labelled_part  # noqa: E402
from supcon.data.sampling import build_loader  # noqa: E402
from supcon.errors import UserError  # noqa: E402
from supcon.evaluation.extract import extract_features  # noqa: E402
from supcon.system import cli, runtime  # noqa: E402
from supcon.system.checkpoint import folder_write_problem, load_checkpoint  # noqa: E402

FIGSIZE, DPI = (5, 5), 100  # 500x500 px: small enough to commit next to the code


def parse_option(argv=None):
    parser = cli.ArgumentParser(
        prog='main_tsne.py',
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description='Draw a t-SNE map of a checkpoint\'s features on the test split (or, with'
        ' --val_split, on the held-out training images).',
    )

    from_checkpoint.add_checkpoint_arguments(parser, 'tsne')
    parser.add_argument(
        '--max_samples',
        type=int,
        default=2000,
        help='images embedded at most (a fixed class-balanced subset);'
        ' t-SNE time grows quickly with it',
    )
    parser.add_argument(
        '--perplexity',
        type=float,
        default=30.0,
        help='t-SNE perplexity (capped at the number of points - 1)',
    )
    parser.add_argument(
        '--out',
        type=str,
        default=None,
        help='PNG to write; default: <ckpt dir>/<ckpt name>_tsne_[key_]<features>'
        '[_val_<fraction>].png',
    )
    parser.add_argument(
        '--num_workers',
        type=int,
        default=16,
        help='data loading workers, capped at the CPUs present',
    )
    parser.add_argument(
        '--projector',
        action='store_true',
        help='also write the features, labels and image thumbnails for TensorBoard\'s embedding'
        ' projector in <--out without .png>_projector/ (tensorboard --logdir that folder)',
    )

    datasets.add_arguments(parser, test_folder=True)
    runtime.add_runtime_arguments(parser, training=False)
    describe_checkpoint_defaults(parser)
    opt = parser.parse_args(argv)

    if opt.max_samples < 2:
        raise UserError(
            f'--max_samples must be at least 2 (t-SNE needs two points), got {opt.max_samples}'
        )
    if not math.isfinite(opt.perplexity) or opt.perplexity <= 0:
        raise UserError(f'--perplexity must be a finite number > 0, got {opt.perplexity}')
    for name in ('size', 'batch_size_val'):
        if getattr(opt, name) is not None and getattr(opt, name) < 1:
            raise UserError(f'--{name} must be a positive integer, got {getattr(opt, name)}')
    if opt.num_workers < 0:
        raise UserError(f'--num_workers must be 0 or more, got {opt.num_workers}')
    from_checkpoint.check_checkpoint_arguments(opt, 'tsne')
    if opt.out is None:
        stem = os.path.splitext(os.path.basename(opt.ckpt))[0]
        key = 'key_' if opt.key_encoder else ''
        held_out = f'_val_{opt.val_split}' if opt.val_split else ''
        opt.out = os.path.join(
            os.path.dirname(os.path.abspath(opt.ckpt)),
            f'{stem}_tsne_{key}{opt.features}{held_out}.png',
        )
    check_output(opt.out)

    # what the checkpoint records fills what is not given (read lazily: set_model loads
    # the weights); a timm encoder is built for its image size, so no other is taken
    saved = load_checkpoint(opt.ckpt, mmap=True)
    opt.model, _ = checkpoint_model(saved, opt.ckpt, opt.model)
    opt.ckpt_defaults = options.take_checkpoint_defaults(opt, saved['opt'])
    del saved
    datasets.resolve_defaults(opt)
    if opt.dataset == 'path' and opt.val_split and opt.data_folder == './datasets/':
        raise UserError(
            '--dataset path with --val_split embeds held-out training images: it needs'
            ' --data_folder (one sub-folder per class) and --mean/--std'
        )
    if opt.dataset == 'path' and not opt.val_split and opt.test_folder is None:
        raise UserError(
            '--dataset path needs --test_folder (one sub-folder per class) and --mean/--std'
        )
    return opt


def describe_checkpoint_defaults(parser):
    """--dataset and the data flags default to the checkpoint's, not to cifar10: say so in
    their help, and leave --dataset unset so that the checkpoint can fill it."""
    recorded = {
        'dataset': 'default: the checkpoint\'s (cifar10 for one that does not say)',
        'size': 'default: the checkpoint\'s when it is of this --dataset (always for a'
        ' timm encoder, which takes no other), else 224 for imagenet and 32 otherwise',
        'data_folder': 'default: the checkpoint\'s when it is of this --dataset',
        'test_folder': 'default: the checkpoint\'s when it is of this --dataset',
        'mean': 'default: the checkpoint\'s when it is of this --dataset, else the'
        ' data set\'s constants',
        'std': 'default: the checkpoint\'s when it is of this --dataset, else the'
        ' data set\'s constants',
    }
    for action in parser._actions:
        if action.dest in recorded:
            action.help = (action.help or '').split(' (default')[0] + '; ' + recorded[action.dest]
        elif action.dest == 'val_split':
            action.help = (
                'embed this held-out fraction of the training images (the split'
                ' main_*.py --val_split held out: stratified, the same for every seed)'
                ' instead of the test split; 0 = the test split'
            )
    parser.set_defaults(dataset=None)


def check_output(path):
    """Refuse an --out the figure could not be written to, before any data or t-SNE work."""
    from matplotlib.backend_bases import FigureCanvasBase

    kinds = FigureCanvasBase.get_supported_filetypes()
    extension = os.path.splitext(path)[1].lower().lstrip('.')
    problem = None
    if os.path.isdir(path):
        problem = 'it is a directory'
    elif extension not in kinds:
        problem = (
            f'{"." + extension if extension else "no"} extension; matplotlib writes'
            f' {", ".join(sorted(kinds))}'
        )
    elif os.path.exists(path) and not os.access(path, os.W_OK):
        problem = 'the file is read-only'
    else:
        problem = folder_write_problem(os.path.dirname(os.path.abspath(path)))
    if problem:
        raise UserError(
            f'--out {path}: cannot write the figure there ({problem}); pass a'
            f' writable path ending in .png'
        )


def stratified_subset(targets, max_samples, seed):
    """At most ``max_samples`` indices, each class in proportion to its size, fixed by the seed.

    Every class's images are shuffled and spread evenly over [0, 1); the
    smallest positions win, so a class of share p gets about p * max_samples.
    """
    targets = np.asarray(targets)
    if len(targets) <= max_samples:
        return np.arange(len(targets))
    rng = np.random.default_rng(seed)
    position = np.empty(len(targets))
    for label in np.unique(targets):
        members = np.flatnonzero(targets == label)
        position[rng.permutation(members)] = (np.arange(len(members)) + 0.5) / len(members)
    tie_break = rng.permutation(len(targets))
    chosen = np.lexsort((tie_break, position))[:max_samples]
    return np.sort(chosen)


def set_loader(opt, rt):
    """The loader of a fixed class-balanced subset of the test split (with --val_split, of
    the held-out training images), and the class names."""
    mean, std = datasets.resolve_mean_std(opt.dataset, opt.mean, opt.std)
    with runtime.main_process_first():
        test_dataset = datasets.build_dataset(
            opt.dataset,
            'test',
            test_transform(opt.size, mean, std),
            data_folder=opt.data_folder,
            test_folder=opt.test_folder,
            val_split=opt.val_split,
        )
    if is_multilabel(test_dataset):
        raise UserError(
            f'main_tsne.py colours each image by its one class, but {opt.test_folder} has rows'
            f' with several labels; pass a --test_csv with one label per row'
        )
    # --val_split's held-out part of a partly labelled CSV: images without a class to colour
    test_dataset, unlabelled = labelled_part(test_dataset)
    if unlabelled and runtime.is_main_process():
        print(
            f'note: left out {unlabelled} images without a label (no class to colour)', flush=True
        )
    class_names = list(test_dataset.classes)
    if opt.num_classes is not None and opt.num_classes != len(class_names):
        raise UserError(
            f'--num_classes {opt.num_classes} does not match the'
            f' {len(class_names)} classes of the {split_name(opt)} data; drop'
            f' --num_classes or fix it'
        )
    subset = stratified_subset(test_dataset.targets, opt.max_samples, opt.seed)
    loader, _ = build_loader(
        torch.utils.data.Subset(test_dataset, subset.tolist()),
        rt.local_batch_size_val,
        shuffle=False,
        pad=False,
        **rt.loader_options(),
    )
    return loader, class_names


def set_model(opt, rt):
    """(encoder, head or None, title): the checkpoint's networks, frozen, and what they are."""
    ckpt = load_checkpoint(opt.ckpt)
    encoder, model = encoder_from_checkpoint(ckpt, opt.ckpt, opt.model, key_encoder=opt.key_encoder)
    head = (
        head_from_checkpoint(
            ckpt, opt.ckpt, model, encoder.feature_dim, key_encoder=opt.key_encoder
        )
        if opt.features == 'head'
        else None
    )
    epoch = '?' if ckpt.get('epoch') is None else ckpt['epoch']
    which = ' · key encoder' if opt.key_encoder else ''
    title = f'{checkpoint_method(ckpt)} · {model}{which} · epoch {epoch}'
    del ckpt
    # frozen: nothing to train, so no DDP wrapper under torchrun either
    encoder.requires_grad_(False)
    encoder = runtime.prepare_model(encoder, rt, parallel=None)
    if head is not None:
        head = head.requires_grad_(False).to(rt.device)
    return encoder, head, title


def split_name(opt):
    """The images embedded, in words: 'test', or 'held-out (val_split 0.2)'."""
    return f'held-out (val_split {opt.val_split})' if opt.val_split else 'test'


def embed(features, opt):
    """2-D t-SNE coordinates of the features."""
    perplexity = min(opt.perplexity, features.shape[0] - 1)
    tsne = TSNE(n_components=2, perplexity=perplexity, init='pca', random_state=opt.seed)
    # torch and scikit-learn each bring an OpenMP runtime; their spinning thread pools
    # fight over the cores and made t-SNE 10x slower here than with one OpenMP thread
    with threadpool_limits(limits=1, user_api='openmp'):
        return tsne.fit_transform(features.numpy().astype(np.float64))


def plot(points, labels, names, title, opt):
    n = len(names)
    if n <= 10:
        colours = plt.get_cmap('tab10').colors
    elif n <= 20:
        colours = plt.get_cmap('tab20').colors
    else:
        colours = plt.get_cmap('turbo')(np.linspace(0, 1, n))

    fig, ax = plt.subplots(figsize=FIGSIZE, dpi=DPI)
    for c in range(n):
        mask = labels == c
        if mask.any():
            ax.scatter(
                points[mask, 0],
                points[mask, 1],
                s=6,
                color=colours[c],
                label=names[c],
                linewidths=0,
                alpha=0.8,
            )
    ax.set_title(title, fontsize=11, pad=14)
    ax.text(
        0.5,
        1.01,
        f'{opt.dataset} {split_name(opt)}, {len(labels)} images, {opt.features} features',
        transform=ax.transAxes,
        ha='center',
        va='bottom',
        fontsize=7,
        color='0.4',
    )
    ax.set_xticks([])
    ax.set_yticks([])
    if n <= 20:  # beyond that a legend is unreadable; the colours still separate classes
        fig.subplots_adjust(left=0.02, right=0.80, top=0.90, bottom=0.02)
        ax.legend(
            loc='center left',
            bbox_to_anchor=(1.01, 0.5),
            fontsize=7,
            markerscale=2,
            frameon=False,
            handletextpad=0.2,
        )
    else:
        fig.subplots_adjust(left=0.02, right=0.98, top=0.90, bottom=0.02)
    return fig


def write_projector(loader, features, labels, class_names, opt):
    """The embedding projector's files next to the figure, thumbnails from the same images."""
    from supcon.training.tb_logger import thumbnails
    from supcon.training.tb_logger import write_projector as write_files

    subset = loader.dataset.dataset  # the loader's class-balanced Subset, in its order
    images = torch.stack([subset[i][0] for i in range(len(subset))])
    mean, std = datasets.resolve_mean_std(opt.dataset, opt.mean, opt.std)
    folder = os.path.splitext(opt.out)[0] + '_projector'
    try:
        config = write_files(
            folder,
            features,
            labels,
            class_names,
            thumbnails(images, mean, std),
            tag=opt.features,
        )
    except OSError as exc:
        raise UserError(
            f'--projector: cannot write {folder} ({exc.strerror or exc}); pass an --out in a'
            f' folder you can write to'
        ) from None
    print(f'wrote {config} (tensorboard --logdir {folder})', flush=True)


def main():
    opt = parse_option()
    rt = runtime.setup_runtime(opt)
    if opt.ckpt_defaults and runtime.is_main_process():
        print(f'note: from the checkpoint: {" ".join(opt.ckpt_defaults)}', flush=True)

    # build data loader
    loader, class_names = set_loader(opt, rt)

    # build model
    encoder, head, title = set_model(opt, rt)

    # extract features (every rank's share, gathered) and embed them on the main process
    if runtime.is_main_process():
        print(
            f'extracting {opt.features} features of {len(loader.dataset)} {opt.dataset}'
            f' {split_name(opt)} images with {opt.ckpt}',
            flush=True,
        )
    desc = 'held-out split' if opt.val_split else 'test split'
    features, labels = extract_features(encoder, loader, rt, head=head, desc=desc)
    if not runtime.is_main_process():
        return
    start = time.time()
    print(f'running t-SNE on {features.shape[0]} x {features.shape[1]} features', flush=True)
    points = embed(features, opt)
    print(f't-SNE done in {time.time() - start:.1f} s', flush=True)

    fig = plot(points, labels.numpy(), class_names, title, opt)
    try:
        os.makedirs(os.path.dirname(os.path.abspath(opt.out)), exist_ok=True)
        fig.savefig(opt.out, dpi=DPI)
    except (OSError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f'--out {opt.out}: cannot write the figure ({reason}); pass a'
            f' writable path ending in .png'
        ) from None
    finally:
        plt.close(fig)
    print(f'wrote {opt.out}', flush=True)
    if opt.projector:
        write_projector(loader, features, labels, class_names, opt)


if __name__ == '__main__':
    runtime.launch(main)
