"""Linear classifiers on the encoder's features while SupCon/SimCLR trains.

``--online_probe``: a linear classifier trained at every step on the step's encoder features,
detached, so no gradient of it reaches the encoder (the online evaluation of SimCLR and BYOL). It
has its own SGD optimizer and cosine schedule; its accuracy on the evaluation split tells how
linearly separable the representation is while it trains, without a second stage.

``--ce_weight W``: one-stage training with loss = contrastive + W * cross-entropy of a linear
classifier whose gradient does reach the encoder. It is not the paper's recipe (SupCon trains the
encoder first and the classifier after, on frozen features: main_linear.py), and it changes what the
encoder learns; it is off by default.

``ClassifierHeads`` owns both, so a training step is::

    loss = criterion(...) + heads(encoded, labels)   # + W * CE with --ce_weight, else + 0
    scaler.scale(loss).backward()
    heads.step(epoch, step, steps_per_epoch)         # the probe's SGD step; gradients averaged

and ``heads.evaluate(encoder, epoch)`` at the end of an epoch. Both classifiers start at zero, so
building them draws nothing from the random generators: a run with the probe trains the same encoder
as one without.
"""

import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from supcon.data import datasets
from supcon.data.augment import test_transform
from supcon.data.labelling import (
    has_label,
    is_multilabel,
    labelled_part,
    multilabel_refusal,
    note_left_out,
)
from supcon.data.sampling import build_loader
from supcon.errors import UserError
from supcon.evaluation.extract import extract_features
from supcon.system.distributed import all_reduce_sum, get_world_size, is_main_process
from supcon.system.runtime import main_process_first

#: --probe_lr's default, chosen on the digits validation split (benchmarks/README.md, "Online
#: probe and joint cross-entropy"): 0.01, 0.1 and 0.3 tied at the last epoch (0.03 and 1 one image
#: lower), ties going to the smaller rate; 0.01 also led the mean over the run's epochs
PROBE_LR = 0.01
PROBE_MOMENTUM = 0.9


def add_arguments(parser):
    group = parser.add_argument_group(
        'monitoring classifiers (not in the reference; docs/monitoring.md)'
    )
    group.add_argument(
        '--online_probe',
        action='store_true',
        help='train a linear classifier on the detached encoder features at every step (no'
        ' gradient reaches the encoder) and print its accuracy on the test split (the held-out'
        ' images with --val_split) every --probe_every epochs',
    )
    group.add_argument(
        '--probe_lr',
        type=float,
        default=None,
        help=f'--online_probe: the probe\'s SGD learning rate, cosine over the run'
        f' ({PROBE_LR} when not given)',
    )
    group.add_argument(
        '--probe_every',
        type=int,
        default=None,
        help='--online_probe/--ce_weight: evaluate the classifiers every N epochs and at the'
        ' last one (1 when not given)',
    )
    group.add_argument(
        '--ce_weight',
        type=float,
        default=0.0,
        help='one-stage training: loss = contrastive + W * cross-entropy of a linear classifier'
        ' on the encoder features, with gradient into the encoder (not the paper\'s two-stage'
        ' protocol); 0 = off',
    )
    return group


#: Options a resume may not change.
FIXED = ('online_probe', 'probe_lr', 'ce_weight')


def run_name(opt, script):
    return [f'ce{opt.ce_weight}'] if getattr(opt, 'ce_weight', 0) else []


#: The flags that make pretraining score the test split (the --test_folder note names them).
TEST_SPLIT_FLAGS = ('--online_probe', '--ce_weight')


def reads_test_split(opt):
    return bool(getattr(opt, 'online_probe', False) or getattr(opt, 'ce_weight', 0))


def check_data(opt, dataset):
    """Both classifiers are softmax classifiers: one class per image."""
    if not (getattr(opt, 'online_probe', False) or getattr(opt, 'ce_weight', 0)):
        return
    if is_multilabel(dataset):
        flag = '--online_probe' if opt.online_probe else '--ce_weight'
        raise multilabel_refusal(
            opt,
            f'{flag} trains a softmax classifier, one class per image',
            f'drop {flag}: main_linear.py evaluates the checkpoint by mean average precision',
        )


def check_options(opt, script):
    """Refuse values that cannot work and flags that would do nothing; fill the defaults."""
    if script != 'supcon':
        return
    if not math.isfinite(opt.ce_weight) or opt.ce_weight < 0:
        raise UserError(f'--ce_weight must be a finite number >= 0 (0 = off), got {opt.ce_weight}')
    if not opt.online_probe and opt.probe_lr is not None:
        raise UserError('--probe_lr only acts with --online_probe; add --online_probe or drop it')
    if not (opt.online_probe or opt.ce_weight) and opt.probe_every is not None:
        raise UserError(
            '--probe_every only acts with --online_probe or --ce_weight; add one or drop it'
        )
    if opt.online_probe:
        opt.probe_lr = PROBE_LR if opt.probe_lr is None else opt.probe_lr
        if not math.isfinite(opt.probe_lr) or opt.probe_lr <= 0:
            raise UserError(f'--probe_lr must be a finite number > 0, got {opt.probe_lr}')
    if opt.online_probe or opt.ce_weight:
        opt.probe_every = 1 if opt.probe_every is None else opt.probe_every
        if opt.probe_every < 1:
            raise UserError(
                f'--probe_every must be a positive number of epochs, got {opt.probe_every}'
            )
    if (opt.online_probe or opt.ce_weight) and opt.dataset == 'path' and not opt.val_split:
        if opt.test_folder is None:
            flag = '--online_probe' if opt.online_probe else '--ce_weight'
            raise UserError(
                f'{flag} is evaluated on the test images: --dataset path needs --test_folder'
                f' (or --val_split to hold out training images instead)'
            )


def build_heads(opt, rt, model, train_set):
    """The run's ``ClassifierHeads`` (on the device, the evaluation split loaded), or None
    without --online_probe and --ce_weight. ``model`` is the bare SupConResNet."""
    if not (opt.online_probe or opt.ce_weight):
        return None
    evaluation = EvaluationSplit(opt, rt, train_set)
    partial = not has_label(train_set.targets).all()
    return ClassifierHeads(
        opt, rt, feature_width(model), len(train_set.classes), evaluation, partial=partial
    )


def labelled_share(labels):
    """The step's labelled rows (label >= 0) summed over ranks, divided by the world size: what
    each rank divides its sum of losses by, so that the gradient averaging over ranks gives the
    mean over every labelled row of the step, as one process would (at least 1: a step without
    labels then adds zero). One collective, no host sync."""
    count = all_reduce_sum((labels >= 0).sum().to(torch.float32))
    return count.clamp(min=1) / get_world_size()


def labelled_cross_entropy(logits, labels, share=None):
    """Mean cross-entropy of ``logits`` against ``labels``. With ``share`` (partial labels, see
    ``labelled_share``): the sum over the rows with a label (>= 0; -1 = unlabelled, no gradient)
    divided by ``share``, without indexing (no host sync)."""
    if share is None:
        return F.cross_entropy(logits, labels)
    keep = labels >= 0
    losses = F.cross_entropy(logits, labels.clamp(min=0), reduction='none')
    return torch.where(keep, losses, torch.zeros_like(losses)).sum() / share


def feature_width(model):
    """The width of the encoder features of a (bare) SupConResNet: its head's input."""
    head = model.head
    first = head[0] if isinstance(head, nn.Sequential) else head
    return first.in_features


def cosine_lr(base_lr, done, total):
    """``base_lr`` at step ``done`` of ``total`` on a half cosine down to 0 (SGDR, no restart)."""
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * min(done, total) / max(total, 1)))


def average_gradients(parameters):
    """Average the gradients of ``parameters`` over the ranks in one collective (these
    classifiers are outside DDP); nothing to do in one process. Parameters without a gradient
    are left alone (every rank has the same ones)."""
    world = get_world_size()
    grads = [p.grad for p in parameters if p.grad is not None]
    if world == 1 or not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    all_reduce_sum(flat).div_(world)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def zero_linear(dim, num_classes):
    """A linear classifier at zero: no random draw, and the probe's softmax starts uniform."""
    classifier = nn.Linear(dim, num_classes)
    nn.init.zeros_(classifier.weight)
    nn.init.zeros_(classifier.bias)
    return classifier


class OnlineProbe(nn.Module):
    """The probe's classifier and its own SGD optimizer (momentum, no weight decay).

    ``state_dict()`` holds both (``classifier.*`` and ``optimizer``), what checkpoints store under
    ``'probe'``, so a resumed run continues the probe exactly.
    """

    def __init__(self, dim, num_classes, lr, epochs, device='cpu'):
        super().__init__()
        self.classifier = zero_linear(dim, num_classes).to(device)
        self.base_lr, self.epochs = float(lr), int(epochs)
        self.optimizer = torch.optim.SGD(
            self.classifier.parameters(), lr=lr, momentum=PROBE_MOMENTUM
        )

    def loss(self, encoded, labels, share=None):
        """Mean cross-entropy on ``encoded`` [n, dim], detached: the encoder gets no gradient
        (``share``: see ``labelled_cross_entropy``)."""
        return labelled_cross_entropy(self.classifier(encoded.detach().float()), labels, share)

    def set_lr(self, epoch, step, steps_per_epoch):
        lr = cosine_lr(
            self.base_lr, (epoch - 1) * steps_per_epoch + step, self.epochs * steps_per_epoch
        )
        for group in self.optimizer.param_groups:
            group['lr'] = lr

    def state_dict(self, *args, **kwargs):
        return {
            'classifier': self.classifier.state_dict(),
            'optimizer': self.optimizer.state_dict(),
        }

    def load_state_dict(self, state, strict=True):
        self.classifier.load_state_dict(state['classifier'])
        self.optimizer.load_state_dict(state['optimizer'])


class ClassifierHeads(nn.Module):
    """The online probe and the --ce_weight classifier of one run, either of them optional.

    ``probe`` (an ``OnlineProbe``) and ``joint`` (an ``nn.Linear``) are what checkpoints store
    under ``'probe'`` and ``'ce_classifier'``; the joint classifier's parameters belong to the
    run's optimizer (``trained_by_the_run_optimizer``), which gives it the encoder's schedule.
    """

    def __init__(self, opt, rt, dim, num_classes, evaluation=None, partial=False):
        super().__init__()
        self.rt = rt
        # some training images are unlabelled (-1): both classifiers learn from the others only
        self.partial = partial
        self.probe = None
        if opt.online_probe:
            self.probe = OnlineProbe(dim, num_classes, opt.probe_lr, opt.epochs, rt.device)
        self.joint = zero_linear(dim, num_classes).to(rt.device) if opt.ce_weight else None
        self.ce_weight = float(opt.ce_weight)
        self._probe_loss = None
        self.evaluation = evaluation  # an EvaluationSplit, for ``evaluate``

    def trained_by_the_run_optimizer(self):
        """The modules whose parameters join the run's optimizer (the joint classifier: it
        steps with the encoder, on its schedule); the probe has its own optimizer."""
        return [self.joint] if self.joint is not None else []

    def forward(self, encoded, labels):
        """The term to add to the step's loss: W * cross-entropy of the joint classifier on
        ``encoded`` [V * bsz, dim] (every view, view-major), or a zero without --ce_weight.
        Also computes the probe's loss for ``step``. ``labels`` are the batch's [bsz]."""
        labels = labels.repeat(len(encoded) // len(labels))  # every view of every image
        share = labelled_share(labels) if self.partial else None
        if self.probe is not None:
            self._probe_loss = self.probe.loss(encoded, labels, share)
        if self.joint is None:
            return encoded.new_zeros((), dtype=torch.float32)
        return self.ce_weight * labelled_cross_entropy(self.joint(encoded.float()), labels, share)

    def step(self, epoch, step, steps_per_epoch):
        """After the training loss's backward pass: the probe's backward pass (its own graph),
        both classifiers' gradients averaged over ranks, then the probe's SGD step at its
        cosine learning rate. The joint classifier steps with the run's optimizer."""
        params = list(self.joint.parameters()) if self.joint is not None else []
        if self.probe is not None:
            self.probe.optimizer.zero_grad(set_to_none=True)
            self._probe_loss.backward()
            params += list(self.probe.classifier.parameters())
        average_gradients(params)
        if self.probe is not None:
            self.probe.set_lr(epoch, step, steps_per_epoch)
            self.probe.optimizer.step()
            self._probe_loss = None

    def classifiers(self):
        """{tag prefix: classifier} of the heads this run has."""
        found = {}
        if self.probe is not None:
            found['probe'] = self.probe.classifier
        if self.joint is not None:
            found['ce'] = self.joint
        return found

    def tags(self):
        """The TensorBoard tags ``evaluate``'s results are logged under."""
        return [f'{name}_{what}' for name in self.classifiers() for what in ('acc', 'loss')]

    @torch.no_grad()
    def evaluate(self, encoder, epoch):
        """{'probe_acc', 'probe_loss', 'ce_acc', 'ce_loss'} (those of the heads present) on the
        evaluation split; prints ``probe accuracy: X.XX`` (and ``ce accuracy``) on the main
        process. The features are extracted once, in eval mode, and gathered from all ranks."""
        start = time.time()
        features, labels = self.evaluation.features(encoder, epoch)
        features, labels = features.to(self.rt.device), labels.to(self.rt.device)
        results = {}
        for name, classifier in self.classifiers().items():
            acc, loss = accuracy_and_loss(classifier, features, labels)
            results[f'{name}_acc'], results[f'{name}_loss'] = acc, loss
            if is_main_process():
                print(f'{name} accuracy: {acc:.2f}', flush=True)
        if is_main_process():
            print(
                f'  (classifiers on {len(labels)} {self.evaluation.name} images took'
                f' {time.time() - start:.1f} s)',
                flush=True,
            )
        return results


def accuracy_and_loss(classifier, features, labels, chunk=4096):
    """Top-1 accuracy in percent and mean cross-entropy of ``classifier`` on the features."""
    correct, loss_sum = 0, 0.0
    for start in range(0, len(labels), chunk):
        logits = classifier(features[start : start + chunk].float())
        target = labels[start : start + chunk]
        correct += int((logits.argmax(dim=1) == target).sum())
        loss_sum += float(F.cross_entropy(logits, target, reduction='sum'))
    n = max(len(labels), 1)
    return 100.0 * correct / n, loss_sum / n


class EvaluationSplit:
    """The evaluation images of a pretraining run: the test split, or the held-out training
    images under --val_split (the test split is then never read). Built once; every call
    extracts the features with the encoder as it is now."""

    def __init__(self, opt, rt, train_set):
        self.rt = rt
        self.name = 'held-out' if opt.val_split else 'test'
        mean, std = datasets.resolve_mean_std(opt.dataset, opt.mean, opt.std)
        with main_process_first():
            dataset = datasets.build_split(opt, 'test', test_transform(opt.size, mean, std))
        datasets.check_same_classes(train_set, dataset)  # the labels must mean the same
        dataset, unlabelled = labelled_part(dataset)  # nothing to score them against
        note_left_out(unlabelled, 'the classifiers\' evaluation')
        # not padded: under torchrun every image is evaluated exactly once
        self.loader, _ = build_loader(
            dataset, rt.local_batch_size_val, shuffle=False, pad=False, **rt.loader_options()
        )

    def features(self, encoder, epoch):
        return extract_features(
            encoder, self.loader, self.rt, desc=f'epoch {epoch}: {self.name} split', progress=False
        )
