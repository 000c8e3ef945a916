"""Multi-label data in the scripts: telling it apart, its classifier loss, its evaluation.

A data set is multi-label when its targets are multi-hot rows (``--dataset csv`` with several
labels on some row). main_ce.py and main_linear.py then train a sigmoid classifier with binary
cross-entropy and report, where single-label runs report top-1, the mean average precision
(macro over the labels that have a positive in the test split, in percent) and F1@0.5 (macro F1
of the decisions sigmoid(logit) >= 0.5 over the same labels). The training line's ``Acc@1`` is
then the share of images whose highest-scoring label is one of theirs (precision@1).
"""

import math
import time

import torch
import torch.distributed as dist
import torch.nn as nn

from supcon.data.labelling import is_multilabel
from supcon.system.distributed import (
    all_gather_rows,
    all_reduce_sum,
    is_distributed,
    is_main_process,
)
from supcon.system.runtime import autocast, to_device
from util import AverageMeter


def classifier_criterion(dataset, criterion: nn.Module) -> nn.Module:
    """``criterion`` (cross-entropy) for single-label data, binary cross-entropy on the logits
    (a sigmoid per label) for multi-label data."""
    return nn.BCEWithLogitsLoss() if is_multilabel(dataset) else criterion


def top1_hits(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Number of samples whose highest-scoring label is one of their labels (multi-hot target)."""
    top = output.argmax(dim=1, keepdim=True)
    return target.gather(1, top).gt(0).float().sum()


def average_precision(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Average precision of each label (column): NaN for a label without a positive.

    AP = sum over score thresholds of (recall gained) x (precision there), with tied scores
    forming one threshold, as scikit-learn's ``average_precision_score`` computes it.
    """
    scores, targets = scores.double().cpu(), targets.double().cpu()
    n, n_labels = scores.shape
    result = torch.full((n_labels,), math.nan, dtype=torch.float64)
    ranks = torch.arange(1, n + 1, dtype=torch.float64)
    for c in range(n_labels):
        positives = targets[:, c].sum()
        if positives == 0:
            continue
        ordered, order = scores[:, c].sort(descending=True, stable=True)
        hits = targets[order, c].cumsum(0)
        ends = torch.ones(n, dtype=torch.bool)  # the last row of each run of equal scores
        ends[:-1] = ordered[:-1] != ordered[1:]
        tp, seen = hits[ends], ranks[ends]
        gained = torch.diff(tp, prepend=tp.new_zeros(1)) / positives
        result[c] = (gained * tp / seen).sum()
    return result


def f1_scores(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """F1 of each label for the decisions sigmoid(score) >= 0.5 (score >= 0); NaN without a
    positive, where F1 is undefined when nothing is predicted either."""
    predicted = scores.cpu() >= 0
    actual = targets.cpu() > 0
    tp = (predicted & actual).sum(0).double()
    fp = (predicted & ~actual).sum(0).double()
    fn = (~predicted & actual).sum(0).double()
    f1 = 2 * tp / (2 * tp + fp + fn)
    return torch.where(actual.any(0), f1, torch.full_like(f1, math.nan))


def summary(scores: torch.Tensor, targets: torch.Tensor) -> tuple[float, float, int]:
    """(mean average precision, F1@0.5, labels left out): percent, macro over the labels that
    have a positive; the left-out ones have none."""
    ap = average_precision(scores, targets)
    f1 = f1_scores(scores, targets)
    present = ~torch.isnan(ap)
    if not present.any():
        return math.nan, math.nan, len(ap)
    return (
        100.0 * ap[present].mean().item(),
        100.0 * f1[present].mean().item(),
        int((~present).sum()),
    )


def _gather(tensor, device):
    """Every rank's rows in rank order (gloo gathers CPU tensors, nccl device ones)."""
    if is_distributed() and dist.get_backend() != 'nccl':
        device = torch.device('cpu')
    return all_gather_rows(tensor.to(device)).cpu()


def validate(val_loader, model: nn.Module, criterion, opt, rt):
    """Loss, mean average precision and F1@0.5 (percent) over the whole test split.

    Under torchrun each rank scores its own share (no padding) and the scores are gathered,
    so every test image counts exactly once.
    """
    scores, targets = [], []
    loss_sum = torch.zeros((), dtype=torch.float64, device=rt.device)
    count = 0
    batch_time = AverageMeter()
    with torch.no_grad():
        end = time.time()
        for idx, (images, labels) in enumerate(val_loader):
            images = to_device(images, rt)
            labels = labels.to(rt.device, non_blocking=True)
            with autocast(rt):
                output = model(images)
            output = output.float()
            loss = criterion(output, labels)
            scores.append(output)
            targets.append(labels)
            loss_sum += loss.detach().double() * labels.shape[0]  # no host sync a batch
            count += labels.shape[0]
            batch_time.update(time.time() - end)
            end = time.time()
            if idx % opt.print_freq == 0 and is_main_process():
                print(
                    'Test: [{0}/{1}]\t'
                    'Time {batch_time.val:.3f} ({batch_time.avg:.3f})\t'
                    'Loss {2:.4f} ({3:.4f})'.format(
                        idx,
                        len(val_loader),
                        loss.item(),
                        loss_sum.item() / count,
                        batch_time=batch_time,
                    ),
                    flush=True,
                )
    if scores:
        scores, targets = torch.cat(scores), torch.cat(targets)
    else:  # a rank with no test images still sends rows of the right width
        scores = targets = torch.zeros(0, _width(model), device=rt.device)
    totals = all_reduce_sum(torch.stack([loss_sum, loss_sum.new_tensor(float(count))]))
    scores, targets = _gather(scores, rt.device), _gather(targets, rt.device)
    mean_ap, f1, left_out = summary(scores, targets)
    if is_main_process():
        if left_out:
            print(
                f'note: {left_out} of the {scores.shape[1]} labels have no positive in the'
                f' test split and are left out of both means',
                flush=True,
            )
        print(' * mean average precision: {:.2f}'.format(mean_ap), flush=True)
        print(' * F1@0.5: {:.2f}'.format(f1), flush=True)
    return totals[0].item() / max(totals[1].item(), 1.0), mean_ap, f1


def _width(model):
    """Outputs of the classifier (its last linear layer), for an empty share of the test set."""
    linear = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linear[-1].out_features if linear else 0


def hparam_metrics(multilabel: bool) -> list:
    """The final-metric tags of main_ce.py's and main_linear.py's HPARAMS record: the ones
    they log (val_map and val_f1 in place of val_acc on multi-label data)."""
    return ['train_loss', 'train_acc', 'val_loss'] + (
        ['val_map', 'val_f1'] if multilabel else ['val_acc']
    )
