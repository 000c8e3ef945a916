"""The test-split evaluation of a classifier (``main_ce.py``, ``main_linear.py``): ``validate``
over the whole split, and ``EpochEvaluation``, the block that ends each of their epochs (evaluate,
keep the best, log, remember for a resume) and their last lines. Multi-label data (multi-hot
targets) is measured by ``multilabel.py``; the training epoch is ``training/loop.py``'s.
"""

import time

import torch
import torch.nn as nn

from supcon.data.labelling import is_multilabel
from supcon.evaluation import class_accuracy, multilabel
from supcon.system.runtime import (
    Runtime,
    all_reduce_sum,
    autocast,
    is_main_process,
    to_device,
)
from util import AverageMeter, correct_counts


def validate(
    val_loader, model: nn.Module, criterion, opt, rt: Runtime, num_classes: int, per_class=False
):
    """Loss, top-1 and top-5 (None under 5 classes) over the whole test split.

    Under torchrun each rank evaluates its own share (no padding) and the sums
    are added up, so every test image counts exactly once. ``per_class=True`` adds a
    fourth value, ``(correct, total)``: top-1 hits and test images per class (lists of
    ``num_classes`` numbers), summed over ranks in the same collective. Multi-label data gets
    ``multilabel.validate``'s loss, mean average precision and F1@0.5 instead (and no
    per-class counts: None).
    """
    if is_multilabel(val_loader.dataset):
        result = multilabel.validate(val_loader, model, criterion, opt, rt)
        return (*result, None) if per_class else result
    topk = (1, 5) if num_classes >= 5 else (1,)
    totals = torch.zeros(2 + len(topk), dtype=torch.float64, device=rt.device)
    # per class: [0] top-1 hits, [1] test images
    class_totals = torch.zeros(2, num_classes, dtype=torch.float64, device=rt.device)
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
            counts = correct_counts(output, labels, topk)
            totals += torch.stack(
                [
                    loss * labels.shape[0],
                    torch.tensor(float(labels.shape[0]), device=rt.device),
                    *counts,
                ]
            ).double()
            # the first of the same topk as correct_counts': per-class hits add up to top-1's
            _, pred = output.topk(min(max(topk), output.shape[1]), 1, True, True)
            hits = (pred[:, 0] == labels).double()
            class_totals[0].index_add_(0, labels, hits)
            class_totals[1].index_add_(0, labels, torch.ones_like(hits))
            batch_time.update(time.time() - end)
            end = time.time()
            if idx % opt.print_freq == 0 and is_main_process():
                # the reference's line: this batch's value, then the running average
                bsz = labels.shape[0]
                loss_avg, n, correct1 = totals[0].item(), totals[1].item(), totals[2].item()
                print(
                    'Test: [{0}/{1}]\t'
                    'Time {batch_time.val:.3f} ({batch_time.avg:.3f})\t'
                    'Loss {2:.4f} ({3:.4f})\t'
                    'Acc@1 {4:.3f} ({5:.3f})'.format(
                        idx,
                        len(val_loader),
                        loss.item(),
                        loss_avg / n,
                        100.0 * counts[0].item() / bsz,
                        100.0 * correct1 / n,
                        batch_time=batch_time,
                    ),
                    flush=True,
                )
    summed = all_reduce_sum(torch.cat([totals, class_totals.reshape(-1)])).tolist()
    loss_sum, n, *correct = summed[: len(totals)]
    n = max(n, 1.0)
    accs = [100.0 * c / n for c in correct]
    top5 = accs[1] if len(accs) > 1 else None
    if is_main_process():
        print(' * Acc@1 {:.3f}'.format(accs[0]), flush=True)
        if top5 is not None:
            print(' * Acc@5 {:.3f}'.format(top5), flush=True)
    if per_class:
        per = summed[len(totals) :]
        return loss_sum / n, accs[0], top5, (per[:num_classes], per[num_classes:])
    return loss_sum / n, accs[0], top5


def print_results(best, final, final_f1, multilabel):
    """The end-of-run lines: the reference's best/final accuracy, or their multi-label twins."""
    if not is_main_process():
        return
    name = 'mean average precision' if multilabel else 'accuracy'
    print('best {}: {:.2f}'.format(name, best))
    if final is not None:  # the last epoch's: unlike the best, not chosen on the test split
        print('final {}: {:.2f}'.format(name, final))
        if multilabel and final_f1 is not None:
            print('final F1@0.5: {:.2f}'.format(final_f1))


class EpochEvaluation:
    """The end of every epoch of main_ce.py and main_linear.py, and of their runs.

    Each call (every ``--eval_freq`` epochs and the last; the other epochs log the training
    side only) evaluates ``model`` on the test split, keeps the best top-1 (multi-label: mean
    average precision), logs the epoch to TensorBoard (train and test loss and accuracy, the
    learning rate, per-class and many/medium/few-shot accuracy) and stores what a resumed run
    needs in ``book.extra``; ``finish`` prints the reference's last lines and writes the
    per-class report. ``train_set`` gives the classes and their training counts.
    """

    def __init__(self, val_loader, criterion, opt, rt, num_classes, train_set, book):
        self.val_loader, self.criterion, self.opt, self.rt = val_loader, criterion, opt, rt
        self.num_classes, self.classes, self.book = num_classes, train_set.classes, book
        # multi-label data: the mean average precision and F1@0.5 instead of top-1 and top-5
        self.multi_label = is_multilabel(train_set)
        # images per class of the training split (for the many / medium / few-shot groups)
        self.train_counts = (
            None if self.multi_label else class_accuracy.training_counts(train_set, num_classes)
        )
        extra = book.extra  # a resumed run's
        self.best_acc = extra.get('best_acc', 0)
        self.val_acc, self.val_f1 = extra.get('val_acc'), extra.get('val_f1')
        self.class_counts = extra.get('class_counts')  # the last epoch's (correct, total)
        # the class names, for main_predict.py and main_export.py: in every checkpoint, also
        # one written at an epoch --eval_freq does not score
        extra['classes'] = list(self.classes)

    def due(self, epoch):
        """Whether ``epoch`` scores the test split: every ``--eval_freq`` epochs and the last."""
        return epoch % self.opt.eval_freq == 0 or epoch == self.opt.epochs

    def __call__(self, model, epoch, train_loss, train_acc, lr):
        logger = self.book.logger
        logger.log_value('train_loss', train_loss, epoch)
        logger.log_value('train_acc', train_acc, epoch)
        logger.log_value('learning_rate', lr, epoch)
        if self.due(epoch):
            self.evaluate(model, epoch)
        logger.flush()

    def evaluate(self, model, epoch):
        """Score the test split, keep the best, log it and remember it for a resume."""
        model.eval()
        val_loss, self.val_acc, top5_or_f1, self.class_counts = validate(
            self.val_loader, model, self.criterion, self.opt, self.rt, self.num_classes, True
        )
        self.val_f1 = top5_or_f1 if self.multi_label else None
        self.best_acc = max(self.best_acc, self.val_acc)
        logger = self.book.logger
        logger.log_value('val_loss', val_loss, epoch)
        logger.log_value('val_map' if self.multi_label else 'val_acc', self.val_acc, epoch)
        if self.multi_label:
            logger.log_value('val_f1', self.val_f1, epoch)
        if self.class_counts is not None:
            summary = class_accuracy.summarize(*self.class_counts, self.train_counts)
            class_accuracy.log_summary(logger, summary, epoch)
        self.book.extra.update(best_acc=self.best_acc, val_acc=self.val_acc)
        if self.multi_label:
            self.book.extra['val_f1'] = self.val_f1
        else:
            self.book.extra['class_counts'] = list(self.class_counts)

    def tags(self):
        """The TensorBoard tags of the final metrics, for the HPARAMS tab."""
        return multilabel.hparam_metrics(self.multi_label)

    def finish(self):
        """The reference's ``best accuracy`` / ``final accuracy`` lines (or their multi-label
        twins) and the last epoch's per-class report next to the checkpoints."""
        print_results(self.best_acc, self.val_acc, self.val_f1, self.multi_label)
        if is_main_process() and self.class_counts is not None:
            class_accuracy.report(
                self.opt.save_folder,
                self.classes,
                self.train_counts,
                self.class_counts,
                self.opt.epochs,
            )
