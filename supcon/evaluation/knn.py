"""A weighted kNN classifier on frozen features and the kNN monitor of pretraining (--knn_every).

The kNN accuracy is the cheap label-free-training probe of InstDisc and MoCo:
no classifier is trained, so it can run every few epochs of pretraining. As a capability
(``supcon/capabilities.py``) it declares main_supcon.py's ``--knn_every``.
"""

import time

import torch
import torch.nn.functional as F

from supcon.data import datasets
from supcon.data.augment import test_transform
from supcon.data.labelling import has_label, is_multilabel, multilabel_refusal
from supcon.data.sampling import build_loader
from supcon.errors import UserError
from supcon.evaluation.extract import eval_mode, extract_features
from supcon.system.distributed import note
from supcon.system.runtime import is_main_process, main_process_first


def knn_votes(
    train_features,
    train_labels,
    test_features,
    num_classes,
    k=200,
    temperature=0.07,
    chunk_size=None,
):
    """Each test row's summed vote per class [N, num_classes] of the weighted kNN (InstDisc,
    Wu et al., 2018, as the MoCo monitor uses it).

    Cosine similarity to the k nearest training features (k capped at their
    number), each neighbour voting exp(similarity / temperature) for its class.
    Test rows go in chunks so the similarity matrix never exceeds about 16M entries.
    """
    train = F.normalize(train_features.float(), dim=1)
    test = F.normalize(test_features.float().to(train.device), dim=1)
    train_labels = train_labels.to(train.device, torch.int64)
    k = max(1, min(int(k), train.shape[0]))
    if chunk_size is None:
        chunk_size = max(1, min(1024, (1 << 24) // max(1, train.shape[0])))
    votes = []
    for start in range(0, test.shape[0], chunk_size):
        sim = test[start : start + chunk_size] @ train.t()
        weights, neighbours = sim.topk(k, dim=1)
        chunk = torch.zeros(sim.shape[0], num_classes, device=sim.device)
        chunk.scatter_add_(1, train_labels[neighbours], (weights / temperature).exp())
        votes.append(chunk)
    if not votes:
        return torch.zeros(0, num_classes, device=train.device)
    return torch.cat(votes)


def knn_predict(
    train_features,
    train_labels,
    test_features,
    num_classes,
    k=200,
    temperature=0.07,
    chunk_size=None,
):
    """The class with the largest summed vote of ``knn_votes``, per test row (on the CPU)."""
    votes = knn_votes(
        train_features, train_labels, test_features, num_classes, k, temperature, chunk_size
    )
    return votes.argmax(dim=1).cpu()


def knn_accuracy(
    train_features, train_labels, test_features, test_labels, num_classes, k=200, temperature=0.07
):
    """Top-1 accuracy in percent of ``knn_predict`` on the test features."""
    pred = knn_predict(train_features, train_labels, test_features, num_classes, k, temperature)
    if pred.numel() == 0:
        return 0.0
    return 100.0 * (pred == test_labels.cpu()).double().mean().item()


class KNNMonitor:
    """kNN top-1 of the test split against the un-augmented training split (--knn_every).

    With ``--val_split`` the held-out training images take the test split's place (and
    the memory bank is the rest of the training images), so the test split stays unread.
    Both loaders are built once; every call re-extracts both sets with the
    current encoder, since the memory bank changes as the encoder trains.
    """

    def __init__(self, opt, rt, k=200, temperature=0.07):
        if opt.dataset == 'path' and opt.test_folder is None and not opt.val_split:
            raise UserError(
                '--knn_every needs --test_folder with --dataset path (the kNN'
                ' accuracy is measured on the test images); add --test_folder'
                ' or drop --knn_every'
            )
        self.rt, self.k, self.temperature = rt, k, temperature
        mean, std = datasets.resolve_mean_std(opt.dataset, opt.mean, opt.std)
        transform = test_transform(opt.size, mean, std)
        self.held_out = 'held-out' if opt.val_split else 'test'
        with main_process_first():
            # the memory bank is the run's own (long-tailed) training split
            train_set = datasets.build_split(opt, 'train', transform, rt.seed)
            test_set = datasets.build_split(opt, 'test', transform)
        # the labels are class indices: they mean the same only if both splits have the
        # same classes (main_ce.py and main_linear.py check the same)
        datasets.check_same_classes(train_set, test_set)
        # training reads the training images in its first epoch; the test images are first
        # read at epoch --knn_every, so a broken one is found now rather than then
        datasets.check_images(test_set, max(1, rt.num_workers))
        self.num_classes = len(train_set.classes)
        self.train_loader, self.test_loader = [
            build_loader(
                dataset,
                rt.local_batch_size_val,
                shuffle=False,
                pad=False,
                **rt.loader_options(),
            )[0]
            for dataset in (train_set, test_set)
        ]

    def __call__(self, encoder, epoch):
        start = time.time()
        with eval_mode(encoder):
            train_x, train_y = extract_features(
                encoder, self.train_loader, self.rt, desc=f'knn epoch {epoch}: train split'
            )
            test_x, test_y = extract_features(
                encoder,
                self.test_loader,
                self.rt,
                desc=f'knn epoch {epoch}: {self.held_out} split',
            )
        device = self.rt.device
        acc = knn_accuracy(
            train_x.to(device),
            train_y,
            test_x.to(device),
            test_y,
            self.num_classes,
            self.k,
            self.temperature,
        )
        if is_main_process():
            print(f'knn_acc epoch {epoch}: {acc:.2f}', flush=True)
            print(
                f'  (kNN over {len(test_y)} {self.held_out} and {len(train_y)} train images took'
                f' {time.time() - start:.1f} s)',
                flush=True,
            )
        return acc


def add_arguments(parser):
    parser.add_argument(
        '--knn_every',
        type=int,
        default=0,
        help='every N epochs, print and log a kNN top-1 accuracy of the test'
        ' split (of the held-out images with --val_split; 0 = off)',
    )


def check_options(opt, script):
    if script != 'supcon':
        return
    if opt.knn_every < 0:
        raise UserError(f'--knn_every must be 0 (off) or more, got {opt.knn_every}')
    if opt.knn_every > opt.epochs:
        note(
            f'--knn_every {opt.knn_every} is more than --epochs {opt.epochs}, so the kNN'
            f' accuracy is never measured; use --knn_every {opt.epochs} or less'
        )


#: The flags that make pretraining score the test split (the --test_folder note names them).
TEST_SPLIT_FLAGS = ('--knn_every',)


def reads_test_split(opt):
    return getattr(opt, 'knn_every', 0) > 0


def check_data(opt, dataset):
    """The vote counts one class per image, and needs every training image's label."""
    if not getattr(opt, 'knn_every', 0):
        return
    if is_multilabel(dataset):
        raise multilabel_refusal(
            opt,
            '--knn_every\'s kNN vote counts one class per image',
            'drop --knn_every: main_linear.py (mean average precision) or main_retrieval.py'
            ' (a shared label counts as relevant) evaluates the checkpoint',
        )
    if not has_label(dataset.targets).all():
        # the monitor's memory bank votes with the training labels (partial labels'
        # hidden ones included: it measures the features, training never sees them)
        raise UserError(
            f'--knn_every votes with the labels of every training image, but some rows of'
            f' {opt.data_folder} have none; drop --knn_every or label those rows'
        )


def build(opt, rt):
    """The run's ``KNNMonitor``, or None without --knn_every."""
    return KNNMonitor(opt, rt) if getattr(opt, 'knn_every', 0) else None
