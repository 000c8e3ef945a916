"""Retrieval metrics of a checkpoint's frozen features, as metric learning measures them.

Reads a checkpoint of main_supcon.py (SupCon, SimCLR, --moco) or main_ce.py (ours or the
reference's, the released ImageNet ResNet-50, timm encoders), embeds the evaluation split
(the queries: the test split, or with --val_split the held-out training images) and the
training split (the gallery; ``--gallery test`` searches the queries among themselves, each
leaving itself out) with the frozen encoder, and prints Precision@1, R-Precision, MAP@R,
Recall@1/5/10 (cosine similarity, exact nearest neighbours:
supcon/evaluation/retrieval.py) and the kNN
monitor's top-1 accuracy. Images without a label are left out (and counted); on multi-label
data a gallery image is relevant to a query that shares one of its labels. The results go to
TensorBoard and, as JSON, next to the checkpoint (``retrieval_<ckpt name>_<what was
measured>.json``); ``--save_embeddings`` writes the features for other tools. The definitions
are in docs/retrieval.md.
"""

import argparse
import json
import os
import time

import numpy as np
import torch.nn.functional as F

from networks import from_checkpoint
from networks.from_checkpoint import (
    checkpoint_method,
    encoder_from_checkpoint,
    head_from_checkpoint,
)
from networks.timm_backbone import is_timm_model
from supcon.data import datasets
from supcon.data.augment import test_transform
from supcon.data.labelling import is_multilabel, labelled_part
from supcon.data.sampling import build_loader
from supcon.errors import UserError
from supcon.evaluation.extract import extract_features
from supcon.evaluation.knn import knn_accuracy
from supcon.evaluation.retrieval import RECALL_KS, check_scorable, retrieval_metrics
from supcon.evaluation.retrieval_data import WholeBatchSampler, left_out_note, measurement_name
from supcon.system import cli, runtime
from supcon.system.atomic import atomic_write
from supcon.system.checkpoint import folder_write_problem, load_checkpoint
from supcon.training.tb_logger import TBLogger

GALLERIES = ('train', 'test')
# the kNN monitor's settings (supcon.evaluation.knn.KNNMonitor), so the numbers compare
KNN_K, KNN_TEMPERATURE = 200, 0.07
METRICS = ['precision_at_1', 'r_precision', 'mean_average_precision_at_r'] + [
    f'recall_at_{k}' for k in RECALL_KS
]


def parse_option(argv=None):
    parser = cli.ArgumentParser(
        prog='main_retrieval.py',
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description='Retrieval metrics (Precision@1, R-Precision, MAP@R, Recall@K) of a'
        ' checkpoint\'s frozen features: the evaluation split queried against the training'
        ' split.',
    )
    from_checkpoint.add_checkpoint_arguments(parser, 'retrieval')
    parser.add_argument(
        '--gallery',
        type=str,
        default='train',
        help='train: search the training split (less the held-out part with --val_split);'
        ' test: search the queries themselves, each query left out of its own search',
    )
    parser.add_argument(
        '--save_embeddings',
        type=str,
        default=None,
        help='write the L2-normalised features, labels, class names (and image paths for'
        ' image folders) to this .npz, readable with numpy.load(allow_pickle=False)',
    )
    parser.add_argument(
        '--out',
        type=str,
        default=None,
        help='JSON file of the results; default: <ckpt dir>/retrieval_<ckpt name>_<what was'
        ' measured>.json, e.g. retrieval_last_digits_test_size12_encoder.json',
    )
    parser.add_argument(
        '--tb_folder',
        type=str,
        default=None,
        help='TensorBoard folder (step: the checkpoint\'s epoch); default:'
        ' <ckpt dir>/retrieval_tensorboard/<what was measured>',
    )
    parser.add_argument(
        '--block_size',
        type=int,
        default=None,
        help='queries compared with the whole gallery at once; default: as many as keep'
        ' one block of similarities near 2M numbers (8 MiB), 64 rows at least',
    )
    parser.add_argument(
        '--num_workers',
        type=int,
        default=16,
        help='data loading workers, capped at the CPUs present',
    )

    datasets.add_arguments(parser, test_folder=True)
    runtime.add_runtime_arguments(parser, training=False)
    opt = parser.parse_args(argv)

    if opt.gallery not in GALLERIES:
        raise UserError(
            f'--gallery must be train (search the training split) or test (search the'
            f' queries themselves, leaving each out), got {opt.gallery!r}'
        )
    from_checkpoint.check_checkpoint_arguments(opt, 'retrieval')
    for name in ('batch_size_val', 'block_size'):
        value = getattr(opt, name)
        if value is not None and value < 1:
            raise UserError(f'--{name} must be a positive integer, got {value}')
    if opt.num_workers < 0:
        raise UserError(f'--num_workers must be 0 or more, got {opt.num_workers}')
    if opt.dataset == 'path':
        needs = []
        if opt.data_folder is None and (opt.gallery == 'train' or opt.val_split):
            needs.append('--data_folder (the training images: the gallery, or --val_split\'s)')
        if opt.test_folder is None and not opt.val_split:
            needs.append('--test_folder (the queries)')
        if needs:
            raise UserError(
                f'--dataset path needs {" and ".join(needs)}, one sub-folder per class, and'
                f' --mean/--std'
            )
    datasets.resolve_defaults(opt)
    if opt.size < 1:
        raise UserError(f'--size must be a positive integer, got {opt.size}')

    ckpt_path = os.path.abspath(opt.ckpt)
    folder, stem = os.path.dirname(ckpt_path), os.path.splitext(os.path.basename(ckpt_path))[0]
    # named for what is measured, so another data set or size never overwrites a result
    measured = measurement_name(opt)
    if opt.out is None:
        opt.out = os.path.join(folder, f'retrieval_{stem}_{measured}.json')
    if opt.tb_folder is None:
        opt.tb_folder = os.path.join(folder, 'retrieval_tensorboard', measured)
    check_writable('--out', opt.out, '.json')
    problem = folder_write_problem(opt.tb_folder)
    if problem:
        raise UserError(
            f'--tb_folder {opt.tb_folder}: cannot write there ({problem}); pass a writable folder'
        )
    if opt.save_embeddings is not None:
        check_writable('--save_embeddings', opt.save_embeddings, '.npz')
    return opt


def check_writable(flag, path, extension):
    """Refuse, before any work, a result file that could not be written."""
    problem = None
    if not path.endswith(extension):
        problem = f'the name does not end in {extension}'
    elif os.path.isdir(path):
        problem = 'it is a directory'
    elif os.path.exists(path) and not os.access(path, os.W_OK):
        problem = 'the file is read-only'
    else:
        problem = folder_write_problem(os.path.dirname(os.path.abspath(path)))
    if problem:
        raise UserError(
            f'{flag} {path}: cannot write there ({problem}); pass a writable path ending in'
            f' {extension}'
        )


def image_paths(dataset):
    """The image file of each item of an image folder (or a --val_split part of one), or None."""
    if isinstance(dataset, datasets.SplitSubset):
        paths = image_paths(dataset.dataset)
        return None if paths is None else [paths[i] for i in dataset.indices]
    samples = getattr(dataset, 'samples', None)
    return None if samples is None else [path for path, _ in samples]


def make_loader(dataset, opt, rt):
    """An unshuffled loader of --batch_size_val; under torchrun each rank embeds whole batches
    (``WholeBatchSampler``), each image once, so the features equal one process's."""
    sampler = WholeBatchSampler(
        len(dataset), opt.batch_size_val, seed=rt.seed, rank=rt.rank, world_size=rt.world_size
    )
    loader, _ = build_loader(
        dataset, opt.batch_size_val, shuffle=False, sampler=sampler, **rt.loader_options()
    )
    return loader


def set_loader(opt, rt):
    """(query loader, gallery loader or None for --gallery test, what the data are)."""
    mean, std = datasets.resolve_mean_std(opt.dataset, opt.mean, opt.std)
    splits = dict(data_folder=opt.data_folder, test_folder=opt.test_folder, val_split=opt.val_split)
    transform = test_transform(opt.size, mean, std)
    queries = 'held-out' if opt.val_split else 'test'
    try:
        with runtime.main_process_first():
            query_set = datasets.build_dataset(opt.dataset, 'test', transform, **splits)
            gallery_set = None
            if opt.gallery == 'train':
                gallery_set = datasets.build_dataset(opt.dataset, 'train', transform, **splits)
    except ValueError as exc:  # scikit-learn's refusal of a split that leaves a part empty
        if not opt.val_split:
            raise
        raise UserError(
            f'--val_split {opt.val_split} cannot split the {opt.dataset} training images'
            f' ({exc}); pick a fraction that leaves images on both sides'
        ) from None
    if gallery_set is not None:
        datasets.check_same_classes(gallery_set, query_set)
    # images without a label can neither be scored nor be relevant: left out, and counted
    query_set, queries_left_out = labelled_part(query_set)
    gallery_left_out = None
    if gallery_set is not None:
        gallery_set, gallery_left_out = labelled_part(gallery_set)
    class_names = list(query_set.classes)
    if opt.num_classes is not None and opt.num_classes != len(class_names):
        raise UserError(
            f'--num_classes {opt.num_classes} does not match the {len(class_names)} classes of'
            f' the data; drop --num_classes or fix it'
        )
    gallery_targets = query_set.targets if gallery_set is None else gallery_set.targets
    check_scorable(
        query_set.targets,
        gallery_targets,
        leave_one_out=gallery_set is None,
        what=f' ({opt.dataset} {queries} split, gallery: {opt.gallery} split)',
    )
    about = dict(
        class_names=class_names,
        queries=queries,
        query_paths=image_paths(query_set),
        gallery_paths=image_paths(query_set if gallery_set is None else gallery_set),
        multilabel=is_multilabel(query_set),
        unlabelled_queries_left_out=queries_left_out,
        unlabelled_gallery_left_out=gallery_left_out or 0,
        note=left_out_note(queries_left_out, gallery_left_out),
    )
    gallery_loader = None if gallery_set is None else make_loader(gallery_set, opt, rt)
    return make_loader(query_set, opt, rt), gallery_loader, about


def set_model(opt, rt):
    """(encoder, head or None, what the checkpoint is): its networks, frozen, on the device."""
    ckpt = load_checkpoint(opt.ckpt)
    encoder, model = encoder_from_checkpoint(ckpt, opt.ckpt, opt.model, key_encoder=opt.key_encoder)
    head = None
    if opt.features == 'head':
        head = head_from_checkpoint(
            ckpt, opt.ckpt, model, encoder.feature_dim, key_encoder=opt.key_encoder
        )
    trained_size = ckpt['opt'].get('size')
    if is_timm_model(model) and trained_size is not None and trained_size != opt.size:
        raise UserError(
            f'--size {opt.size} differs from the {trained_size} the {model} encoder was'
            f' built for; pass --size {trained_size}'
        )
    about = dict(method=checkpoint_method(ckpt), model=model, epoch=ckpt.get('epoch'))
    del ckpt
    # frozen: nothing to train, so no DDP wrapper under torchrun either
    encoder.requires_grad_(False)
    encoder = runtime.prepare_model(encoder, rt, parallel=None)
    if head is not None:
        head = head.requires_grad_(False).to(rt.device)
    return encoder, head, about


def save_embeddings(path, queries, gallery, about):
    """The .npz of --save_embeddings: plain arrays only (strings fixed-width unicode); labels
    are int64 class indices, or uint8 multi-hot rows [N, C] on multi-label data."""
    label_type = np.uint8 if about['multilabel'] else np.int64
    arrays = dict(
        query_features=queries[0].numpy().astype(np.float32),
        query_labels=queries[1].numpy().astype(label_type),
        gallery_features=gallery[0].numpy().astype(np.float32),
        gallery_labels=gallery[1].numpy().astype(label_type),
        class_names=np.array(about['class_names'], dtype=str),
    )
    for side in ('query', 'gallery'):
        paths = about[f'{side}_paths']
        if paths is not None:
            arrays[f'{side}_paths'] = np.array(paths, dtype=str)
    write_file(path, '--save_embeddings', lambda f: np.savez(f, **arrays))


def write_file(path, flag, write):
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        atomic_write(path, write)
    except OSError as exc:
        raise UserError(
            f'{flag} {path}: cannot write it ({exc.strerror or exc}); pass a writable path'
        ) from None


def main():
    opt = parse_option()
    rt = runtime.setup_runtime(opt)

    # build model first: a checkpoint that cannot be measured fails before the data are read
    encoder, head, about = set_model(opt, rt)

    # build data loader
    query_loader, gallery_loader, splits = set_loader(opt, rt)
    gallery_name = 'themselves, each left out' if gallery_loader is None else 'the train split'
    if runtime.is_main_process():
        if splits['note']:
            print(f'note: {splits["note"]}', flush=True)
        print(
            f'embedding {len(query_loader.dataset)} {opt.dataset} {splits["queries"]} images'
            f' (queries) against {gallery_name} with the {opt.features} features of {opt.ckpt}',
            flush=True,
        )

    # extract features (every rank's share, gathered on every rank)
    start = time.time()
    queries = extract_features(encoder, query_loader, rt, head=head, desc='queries')
    gallery = None
    if gallery_loader is not None:
        gallery = extract_features(encoder, gallery_loader, rt, head=head, desc='gallery')
    embed_s = time.time() - start
    if not runtime.is_main_process():
        return
    queries = (F.normalize(queries[0], dim=1), queries[1])
    if gallery is not None:
        gallery = (F.normalize(gallery[0], dim=1), gallery[1])

    start = time.time()
    result = retrieval_metrics(
        *queries, *(gallery or (None, None)), block_size=opt.block_size, device=rt.device
    )
    search_s = time.time() - start
    for name in METRICS:
        print(f'{name}: {result[name]:.4f}')
    if gallery is not None and not splits['multilabel']:
        num_classes = len(splits['class_names'])
        result['knn_acc'] = knn_accuracy(
            gallery[0].to(rt.device), gallery[1], queries[0].to(rt.device), queries[1],
            num_classes, KNN_K, KNN_TEMPERATURE,
        )  # fmt: skip
        print(f'knn_acc: {result["knn_acc"]:.2f}')
    elif gallery is not None:
        print('note: no knn_acc on multi-label data (the kNN monitor votes for one class an image)')
    else:
        print('note: no knn_acc with --gallery test (the kNN monitor votes with the train split)')
    print(
        f'  ({result["num_scored_queries"]} of {result["num_queries"]} queries scored against'
        f' {result["num_gallery"]} gallery images; embedding took {embed_s:.1f} s, the'
        f' search {search_s:.1f} s)',
        flush=True,
    )

    record = dict(
        ckpt=os.path.abspath(opt.ckpt), **about, features=opt.features,
        key_encoder=opt.key_encoder, dataset=opt.dataset, queries=splits['queries'],
        gallery=opt.gallery, val_split=opt.val_split, size=opt.size, **result,
        relevant='shares a label' if splits['multilabel'] else 'same class',
        unlabelled_queries_left_out=splits['unlabelled_queries_left_out'],
        unlabelled_gallery_left_out=splits['unlabelled_gallery_left_out'],
        knn_k=KNN_K, knn_temperature=KNN_TEMPERATURE, embed_s=embed_s, search_s=search_s,
    )  # fmt: skip
    text = json.dumps(record, indent=2) + '\n'
    write_file(opt.out, '--out', lambda f: f.write(text.encode()))
    print(f'wrote {opt.out}')
    logger = TBLogger(opt.tb_folder)
    for name in METRICS + (['knn_acc'] if 'knn_acc' in result else []):
        logger.log_value(name, result[name], about['epoch'] or 0)
    logger.close()
    if opt.save_embeddings is not None:
        save_embeddings(opt.save_embeddings, queries, gallery or queries, splits)
        print(f'wrote {opt.save_embeddings}')


if __name__ == '__main__':
    runtime.launch(main)
