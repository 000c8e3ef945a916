"""The epoch loop every training script shares, written once.

``EpochLoop.batches`` is the skeleton around a step: the resume offset, the warm-up learning rate,
the data and batch times, printing and ``log_step``, and the stop every rank agrees on. The step
itself stays in the script's ``train()``, which reads as the reference's::

    for images, labels in loop.batches(train_loader, epoch):
        ...forward, loss, backward, optimizer step...
        loop.update(loss, bsz)       # one host sync: statistics over ranks, the NaN check, the stop

A signal (SIGTERM, SIGUSR1, Ctrl-C) stops every rank after the same step: the loop saves the
position there and exits (``Bookkeeper.interrupted``). ``train_classifier`` is the step of
main_ce.py and main_linear.py.
"""

import time

import torch.nn as nn

from supcon.data.sampling import mix_seed
from supcon.evaluation import multilabel
from supcon.system.runtime import autocast, is_main_process, step_statistics, to_device
from supcon.training.bookkeeping import check_finite
from util import AverageMeter, correct_counts, warmup_learning_rate


class EpochLoop:
    """The skeleton of a training epoch around the step a script writes (see the module).

    ``book`` (a ``Bookkeeper``) holds the run's meters: ``'loss'``, and ``'acc'`` for the
    classifiers, whose value the printed line shows too. The position of the step being run is
    ``epoch``, ``step`` (0-based, counting the steps a resumed epoch did before) and ``steps``.
    """

    def __init__(self, opt, rt, book, optimizer, scaler):
        self.opt, self.rt, self.book, self.optimizer = opt, rt, book, optimizer
        self.scaler = scaler  # the run's gradient scaler (``runtime.make_scaler``)
        self.epoch = self.step = self.steps = 0
        self.first = False  # the first batch this process runs of the epoch
        self._stop = False

    def batches(self, loader, epoch, skip_single=False):
        """Yield ``(images, labels)`` of ``epoch``: a resumed epoch from where it stopped, each
        at its warm-up learning rate. After each batch (and its ``update``): the batch time, the
        printed line every --print_freq steps; a stop agreed by every rank saves the position
        and exits. ``skip_single``: skip a batch of one image (BatchNorm in training mode cannot
        normalise it; every rank holds an equal padded share, so all skip the same step, which
        still counts, so step numbers and a resume are unchanged)."""
        self.epoch = epoch
        start = self.book.epoch_start_step(epoch)
        self.steps = start + len(loader)  # a resumed epoch's loader holds only the rest
        self.batch_time, self.data_time = AverageMeter(), AverageMeter()
        end = time.time()
        for i, (images, labels) in enumerate(loader):
            self.step, self.first = start + i, i == 0
            self.data_time.update(time.time() - end)
            if skip_single and len(labels) == 1:
                self.book.note_once(
                    'one-sample batch',
                    f'epoch {epoch}, step {self.step + 1}: a training batch of one image is'
                    f' skipped (BatchNorm cannot normalise a single sample); a --batch_size'
                    f' that does not leave one image over at the end of an epoch uses them all',
                )
                end = time.time()
                continue
            warmup_learning_rate(self.opt, epoch, self.step, self.steps, self.optimizer)
            self._stop = False
            yield images, labels
            self.batch_time.update(time.time() - end)
            end = time.time()
            if (self.step + 1) % self.opt.print_freq == 0:
                self._print()
            if self._stop:
                self.book.interrupted(epoch, self.step + 1)  # saves, then exits

    def update(self, loss, n, correct=None, counter=None):
        """After the optimizer step, one host sync: the loss (a mean over the ``n`` images of
        this rank), ``correct`` top-1 hits and ``counter``'s step counts (``counter``:
        ``step_counts()`` and ``record(summed, images)``, e.g. the positives per anchor) summed
        over ranks with the stop flag; a NaN or infinite loss stops the run (nothing is saved
        from it)."""
        counts = () if counter is None else (counter.step_counts(),)
        hits = () if correct is None else (correct,)
        loss_sum, total, *summed, stop = step_statistics(
            self.rt, loss.detach() * n, n, *hits, *counts, self.book.stop.requested
        )
        check_finite(loss_sum, self.epoch, self.step + 1, self.opt)
        meters = self.book.meters
        meters['loss'].update(loss_sum / total, total)
        if correct is not None:
            meters['acc'].update(100.0 * summed.pop(0) / total, total)
        if counter is not None:
            counter.record(summed, total)
        self._stop = bool(stop)

    def _print(self):
        if not is_main_process():
            return
        meters = self.book.meters
        line = (
            'Train: [{0}][{1}/{2}]\t'
            'BT {batch_time.val:.3f} ({batch_time.avg:.3f})\t'
            'DT {data_time.val:.3f} ({data_time.avg:.3f})\t'
            'loss {loss.val:.3f} ({loss.avg:.3f})'.format(
                self.epoch,
                self.step + 1,
                self.steps,
                batch_time=self.batch_time,
                data_time=self.data_time,
                loss=meters['loss'],
            )
        )
        if 'acc' in meters:
            line += '\tAcc@1 {top1.val:.3f} ({top1.avg:.3f})'.format(top1=meters['acc'])
        print(line, flush=True)
        self.book.log_step('loss_step', meters['loss'].val, self.epoch, self.step, self.steps)

    def log_views(self, images, views=1):
        """TensorBoard's grid of the run's first training batch (``Bookkeeper.log_views``)."""
        if self.first:
            self.book.log_views(images, self.epoch, views=views)


def train_classifier(loader, model, criterion, optimizer, epoch, loop, augment=None):
    """One epoch of cross-entropy training (main_ce.py and main_linear.py); returns (loss, top-1).

    ``model(images)`` returns logits; the caller sets train/eval modes (main_linear.py keeps
    its frozen encoder in eval mode). ``augment`` (--gpu_aug) turns the loader's uint8 images
    into augmented, normalised ones on the device.
    """
    rt, scaler = loop.rt, loop.scaler
    batch_norm_trains = any(
        isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training for m in model.modules()
    )
    for images, labels in loop.batches(loader, epoch, skip_single=batch_norm_trains):
        if augment is not None:
            # the seed makes a resumed step draw the same crops; each rank draws its own
            seed = mix_seed('gpu_aug', rt.seed, epoch, loop.step, rt.rank)
            images = augment(images.to(rt.device, non_blocking=True), seed=seed)
        images = to_device(images, rt)
        labels = labels.to(rt.device, non_blocking=True)
        loop.log_views(images)

        # compute loss; logits go to float32 so the softmax is never in half precision
        with autocast(rt):
            output = model(images)
        loss = criterion(output.float(), labels)

        # compute gradient and do SGD step
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

        if labels.dim() == 2:  # multi-hot: the top label is one of the image's (precision@1)
            correct = multilabel.top1_hits(output.detach(), labels)
        else:
            (correct,) = correct_counts(output.detach(), labels)
        loop.update(loss, labels.shape[0], correct=correct)
    meters = loop.book.meters
    return meters['loss'].avg, meters['acc'].avg
