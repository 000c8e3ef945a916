"""Classify images with a trained model and write the predictions to a CSV.

The model: a main_linear.py classifier (with the encoder checkpoint it records, or
``--encoder``), a main_linear.py --finetune or main_ce.py checkpoint, or an encoder checkpoint
with ``--knn``, which votes among the nearest images of a labelled gallery (the data set's
training split; k and the vote of the kNN monitor, supcon/features.py). The images:
``--images`` (a folder, searched recursively; a CSV with a ``path`` column; one image) or a
data set's split (``--split test``). Each image gets the checkpoint's evaluation transform
(resize to its size, its mean and std). ``--out`` gets one row per image, in sorted order:
the predicted class, its probability, the top-k classes and theirs (multi-label checkpoints:
every class at or above ``--threshold``); an unreadable image gets a row with the reason. On a
labelled split the accuracy (multi-label: mean average precision) is printed too; under
torchrun each rank classifies its share and rank 0 writes the one CSV.
"""

import argparse
import os
import sys
import time

import torch

from supcon.data import datasets
from supcon.data.sampling import build_loader
from supcon.errors import UserError
from supcon.evaluation import multilabel
from supcon.evaluation.extract import extract_features
from supcon.evaluation.knn import knn_votes
from supcon.inference import predictions
from supcon.inference.trained_model import load_trained_model
from supcon.system import runtime
from supcon.system.atomic import atomic_write
from supcon.system.checkpoint import file_write_problem
from supcon.system.distributed import all_gather_objects

# the kNN monitor's settings (supcon.evaluation.knn.KNNMonitor, main_retrieval.py's knn_acc)
KNN_K, KNN_TEMPERATURE = 200, 0.07
SPLITS = ('test', 'train')


def parse_option(argv=None):
    parser = argparse.ArgumentParser(
        prog='main_predict.py',
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description='Classify images with a trained model: a CSV of the predicted classes and'
        ' their probabilities.',
    )
    parser.add_argument(
        '--ckpt',
        type=str,
        default='',
        help='(required) a main_linear.py or main_ce.py checkpoint; with --knn any checkpoint'
        ' with an encoder (main_supcon.py\'s)',
    )
    parser.add_argument(
        '--encoder',
        type=str,
        default=None,
        help='main_linear.py checkpoints: the encoder checkpoint; default: the one it records',
    )
    parser.add_argument(
        '--knn',
        action='store_true',
        help=f'classify by the {KNN_K} nearest images of the data set\'s training split (cosine'
        f' similarity, votes weighted exp(similarity / {KNN_TEMPERATURE}), as the kNN monitor)',
    )
    parser.add_argument(
        '--images',
        type=str,
        default=None,
        help='a folder of images (searched recursively), a CSV with a "path" column (relative'
        ' to the CSV\'s folder), or one image file',
    )
    parser.add_argument(
        '--split',
        type=str,
        default=None,
        choices=SPLITS,
        help='classify this split of --dataset instead of --images, and print the accuracy',
    )
    parser.add_argument('--out', type=str, default='predictions.csv', help='the CSV to write')
    parser.add_argument('--topk', type=int, default=5, help='classes listed per image, best first')
    parser.add_argument(
        '--threshold',
        type=float,
        default=None,
        help='multi-label checkpoints: list every class with a probability at least this'
        ' (default 0.5, the decision of F1@0.5)',
    )
    group = parser.add_argument_group(
        'data set (for --split and --knn\'s gallery; default: the checkpoint\'s)'
    )
    group.add_argument('--dataset', type=str, default=None, choices=datasets.DATASET_NAMES)
    group.add_argument('--data_folder', type=str, default=None, help='as the training scripts')
    group.add_argument('--test_folder', type=str, default=None, help='as the training scripts')
    group.add_argument('--data_csv', type=str, default=None, help='--dataset csv: training CSV')
    group.add_argument('--test_csv', type=str, default=None, help='--dataset csv: test CSV')
    parser.add_argument('--batch_size_val', type=int, default=256, help='images per batch')
    parser.add_argument(
        '--num_workers', type=int, default=16, help='data loading workers, capped at the CPUs'
    )
    runtime.add_runtime_arguments(parser, training=False)
    opt = parser.parse_args(argv)

    if not opt.ckpt:
        raise UserError(
            '--ckpt is required: pass a classifier checkpoint, e.g.'
            ' ./save/SupCon/digits_linear_models/<run>/last.pth'
        )
    if (opt.images is None) == (opt.split is None):
        raise UserError(
            '--images FOLDER (or a CSV of paths, or an image) or --split test (a data set\'s'
            ' split): pass one of them'
        )
    if opt.split is None and not opt.knn and (opt.dataset or opt.data_folder or opt.data_csv):
        raise UserError(
            '--dataset and its folders are read by --split and --knn only; add one, or drop them'
        )
    for name in ('topk', 'batch_size_val'):
        if getattr(opt, name) < 1:
            raise UserError(f'--{name} must be a positive integer, got {getattr(opt, name)}')
    if opt.num_workers < 0:
        raise UserError(f'--num_workers must be 0 or more, got {opt.num_workers}')
    if opt.threshold is not None and not 0 <= opt.threshold <= 1:
        raise UserError(f'--threshold must be a probability in [0, 1], got {opt.threshold}')
    problem = None if opt.out.endswith('.csv') else 'the name does not end in .csv'
    problem = problem or file_write_problem(opt.out)
    if problem:
        raise UserError(f'--out {opt.out}: cannot write there ({problem}); pass a writable .csv')
    return opt


def resolve_data_options(opt, recorded):
    """--dataset and its folders: the checkpoint's, for what is not given (same data set)."""
    if opt.dataset is None:
        opt.dataset = recorded.get('dataset')
        if opt.dataset not in datasets.DATASET_NAMES:
            opt.dataset = 'cifar10'  # the reference's, for a checkpoint that does not say
    same = opt.dataset == recorded.get('dataset')
    if opt.dataset == 'csv':  # the training scripts record the CSVs as data_folder/test_folder
        opt.data_folder = opt.data_csv or (recorded.get('data_folder') if same else None)
        opt.test_folder = opt.test_csv or (recorded.get('test_folder') if same else None)
        return
    if opt.data_csv or opt.test_csv:
        raise UserError(f'--data_csv/--test_csv are for --dataset csv, not {opt.dataset}')
    if same:
        opt.data_folder = opt.data_folder or recorded.get('data_folder')
        opt.test_folder = opt.test_folder or recorded.get('test_folder')
    opt.data_folder = opt.data_folder or './datasets/'


def set_model(opt, rt):
    """The checkpoint's networks on the device, in eval mode, and what the images need."""
    tm = load_trained_model(opt.ckpt, encoder=opt.encoder, need_classifier=not opt.knn)
    if opt.threshold is not None and not tm.multi_label:
        raise UserError(
            f'--threshold is for multi-label checkpoints; --ckpt {opt.ckpt} is single-label'
            f' (one class per image): drop --threshold'
        )
    if opt.threshold is None:
        opt.threshold = 0.5
    tm.encoder.requires_grad_(False)
    tm.encoder = runtime.prepare_model(tm.encoder, rt, parallel=None)
    return tm.to(rt.device)


def build_split(opt, split, transform):
    splits = dict(data_folder=opt.data_folder, test_folder=opt.test_folder)
    with runtime.main_process_first():  # CIFAR: rank 0 may download
        return datasets.build_dataset(opt.dataset, split, transform, **splits)


def set_loader(opt, rt, tm):
    """(loader, item names, class names, labelled) of the images to classify, and the kNN
    gallery's (features, labels) or None."""
    transform = tm.transform()
    if opt.split is not None or opt.knn:
        resolve_data_options(opt, tm.options)
    classes, gallery = tm.classes, None
    if opt.knn:
        gallery_set = build_split(opt, 'train', transform)
        if multilabel.is_multilabel(gallery_set):
            raise UserError(
                f'--knn votes one class per image, but the --dataset {opt.dataset} training'
                f' split has images with several labels; use a main_linear.py classifier'
            )
        datasets.check_images(gallery_set, max(1, rt.num_workers))
        loader, _ = build_loader(
            gallery_set, rt.local_batch_size_val, shuffle=False, pad=False, **rt.loader_options()
        )
        features, labels = extract_features(tm.encoder, loader, rt, desc='gallery')
        gallery = (features.to(rt.device), labels.to(rt.device))
        classes = list(gallery_set.classes)
    if opt.split is not None:
        dataset = build_split(opt, opt.split, transform)
        if list(dataset.classes) != classes:
            raise UserError(
                f'--dataset {opt.dataset} has the classes {", ".join(dataset.classes[:8])}'
                f'{", ..." if len(dataset.classes) > 8 else ""}, not the {len(classes)} of'
                f' --ckpt {opt.ckpt}; pass the data set it was trained on'
            )
        items = predictions.DataSetItems(dataset, tm.size)
        names = predictions.item_names(dataset, opt.dataset, opt.split)
    else:
        names = predictions.list_images(opt.images)
        items = predictions.ImageFiles(names, transform, tm.size)
    loader, _ = build_loader(
        items, rt.local_batch_size_val, shuffle=False, pad=False, **rt.loader_options()
    )
    return loader, names, classes, opt.split is not None, gallery


def predict(loader, tm, rt, opt, num_classes, multi_label, gallery=None):
    """This rank's ``predictions.Prediction`` of each of its images."""
    results = []
    topk = min(opt.topk, num_classes)
    show = runtime.is_main_process() and sys.stderr.isatty()
    with torch.no_grad():
        for step, (images, indices, errors, targets) in enumerate(loader):
            images = runtime.to_device(images, rt)
            with runtime.autocast(rt):
                features = tm.encoder(images)
                logits = None if gallery is not None else tm.classifier(features).float()
            if gallery is not None:
                votes = knn_votes(*gallery, features.float(), num_classes, KNN_K, KNN_TEMPERATURE)
                probs = votes / votes.sum(dim=1, keepdim=True)
            elif multi_label:
                probs = torch.sigmoid(logits)
            else:
                probs = torch.softmax(logits, dim=1)
            probs = probs.cpu()
            top_p, top_i = probs.topk(topk, dim=1)
            for row, (index, error) in enumerate(zip(indices.tolist(), errors)):
                target = targets[row].tolist()
                if error:
                    results.append(predictions.Prediction(index, error, [], [], target))
                    continue
                top = list(zip(top_i[row].tolist(), top_p[row].tolist()))
                chosen, scores = [], None
                if multi_label:
                    chosen = [
                        (c, p) for c, p in enumerate(probs[row].tolist()) if p >= opt.threshold
                    ]
                    chosen.sort(key=lambda cp: -cp[1])
                    scores = logits[row].tolist() if opt.split else None
                results.append(predictions.Prediction(index, '', top, chosen, target, scores))
            if show:
                print(f'\r  predicting: {step + 1}/{len(loader)} batches', end='', file=sys.stderr)
    if show:
        print(file=sys.stderr, flush=True)
    return results


def csv_rows(results, names, classes, multi_label, labelled):
    def names_and_probabilities(pairs):
        return [
            predictions.joined(classes[c] for c, _ in pairs),
            predictions.joined(predictions.probability(p) for _, p in pairs),
        ]

    rows = []
    for r in results:
        row = [names[r.index]]
        if labelled and multi_label:
            row.append(predictions.joined(classes[c] for c, t in enumerate(r.target) if t > 0))
        elif labelled:
            row.append(classes[r.target] if r.target >= 0 else '')
        if r.error:
            rows.append(row + ['', '', '', '', r.error])
            continue
        first = (
            names_and_probabilities(r.chosen) if multi_label else names_and_probabilities(r.top[:1])
        )
        rows.append(row + first + names_and_probabilities(r.top) + [''])
    return rows


def report(results, classes, multi_label, labelled, opt):
    """The printed line after the CSV: the accuracy (or mean average precision) of a split."""
    readable = [r for r in results if not r.error]
    if not labelled or not readable:
        return
    if multi_label:
        scores = torch.tensor([r.logits for r in readable])
        targets = torch.tensor([r.target for r in readable])
        mean_ap, _, _ = multilabel.summary(scores, targets)
        print(f'mean average precision: {mean_ap:.2f} ({len(readable)} images)')
        return
    scored = [r for r in readable if r.target >= 0]
    correct = sum(r.top[0][0] == r.target for r in scored)
    print(
        'accuracy: {:.2f} ({} of {} {} images)'.format(
            100.0 * correct / max(1, len(scored)), correct, len(scored), opt.split
        )
    )


def main():
    start = time.time()
    opt = parse_option()
    rt = runtime.setup_runtime(opt)

    # build model
    tm = set_model(opt, rt)

    # build data loader (and the --knn gallery)
    loader, names, classes, labelled, gallery = set_loader(opt, rt, tm)
    if runtime.is_main_process():
        what = f'{opt.dataset} {opt.split} split' if opt.split else opt.images
        how = f'kNN over {len(gallery[1])} images' if gallery is not None else tm.kind
        print(f'classifying {len(names)} images of {what} with --ckpt {opt.ckpt} ({how})')

    # predict: each rank its share, every image once
    multi_label = tm.multi_label and gallery is None
    results = predict(loader, tm, rt, opt, len(classes), multi_label, gallery)
    results = sorted(r for share in all_gather_objects(results) for r in share)
    if not runtime.is_main_process():
        return
    assert [r.index for r in results] == list(range(len(names)))

    header = predictions.columns(multi_label, labelled)
    text = predictions.csv_text(header, csv_rows(results, names, classes, multi_label, labelled))
    try:
        os.makedirs(os.path.dirname(os.path.abspath(opt.out)), exist_ok=True)
        atomic_write(opt.out, lambda f: f.write(text))
    except OSError as exc:
        raise UserError(
            f'--out {opt.out}: cannot write it ({exc.strerror or exc}); pass a writable path'
        ) from None

    unreadable = sum(1 for r in results if r.error)
    if multi_label:
        predicted = {c for r in results for c, _ in r.chosen}
    else:
        predicted = {r.top[0][0] for r in results if not r.error}
    print(
        f'predicted {len(results) - unreadable} of {len(results)} images'
        f' ({unreadable} unreadable), {len(predicted)} of {len(classes)} classes predicted,'
        f' in {time.time() - start:.1f} s; wrote {opt.out}',
        flush=True,
    )
    report(results, classes, multi_label, labelled, opt)


if __name__ == '__main__':
    runtime.launch(main)
