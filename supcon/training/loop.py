"""The epoch loop the training scripts share."""

import time

import torch.nn as nn

from supcon.data.labelling import is_multilabel  # noqa: F401
from supcon.data.sampling import mix_seed
from supcon.evaluation import multilabel
from supcon.system.runtime import autocast, is_main_process, step_statistics, to_device
from supcon.training.bookkeeping import check_finite
from util import AverageMeter, correct_counts, warmup_learning_rate


def train_classifier(
    train_loader, model, criterion, optimizer, scaler, epoch, opt, rt, run, device_augment=None
):
    """One epoch of cross-entropy training (main_ce.py and main_linear.py).

    ``model(images)`` returns logits; the caller sets train/eval modes (main_linear.py
    keeps its frozen encoder in eval mode). Updates ``run``'s loss/acc meters. Returns
    ``(loss, top-1, stopped_at)``; ``stopped_at`` is the step a signal stopped the epoch
    at (the caller saves and exits), else None. ``device_augment`` (--gpu_aug) turns the
    loader's uint8 images into augmented, normalised ones on the device.
    """
    batch_time, data_time = AverageMeter(), AverageMeter()
    losses, top1 = run.meters['loss'], run.meters['acc']
    start = run.epoch_start_step(epoch)
    total_steps = start + len(train_loader)  # a resumed epoch's loader holds only the rest
    batch_norm_trains = any(
        isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training for m in model.modules()
    )
    end = time.time()
    for i, (images, labels) in enumerate(train_loader):
        step = start + i
        # measure data loading time
        data_time.update(time.time() - end)
        if batch_norm_trains and len(labels) == 1:
            # BatchNorm in training mode cannot normalise one value per channel. Every rank
            # holds an equal (padded) share, so all ranks skip this same step; it still
            # counts as a step, so step numbers and a mid-epoch resume are unchanged
            run.note_once(
                'one-sample batch',
                f'epoch {epoch}, step {step + 1}: a training batch'
                f' of one image is skipped (BatchNorm cannot normalise a single'
                f' sample); a --batch_size that does not leave one image over at the'
                f' end of an epoch uses them all',
            )
            end = time.time()
            continue
        if device_augment is not None:
            # the seed makes a resumed step draw the same crops; each rank draws its own
            images = device_augment(
                images.to(rt.device, non_blocking=True),
                seed=mix_seed('gpu_aug', rt.seed, epoch, step, rt.rank),
            )
        images = to_device(images, rt)
        labels = labels.to(rt.device, non_blocking=True)
        bsz = labels.shape[0]
        if i == 0:
            run.log_views(images, epoch)

        warmup_learning_rate(opt, epoch, step, total_steps, optimizer)

        # compute loss; logits go to float32 so the softmax is never in half precision
        with autocast(rt):
            output = model(images)
        loss = criterion(output.float(), labels)

        # compute gradient and do SGD step
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

        # one host sync a step: statistics summed over ranks, NaN check, agreed stop
        if labels.dim() == 2:  # multi-hot: the top label is one of the image's (precision@1)
            correct = multilabel.top1_hits(output.detach(), labels)
        else:
            (correct,) = correct_counts(output.detach(), labels)
        loss_sum, correct, n, stop = step_statistics(
            rt, loss.detach() * bsz, correct, bsz, run.stop.requested
        )
        check_finite(loss_sum, epoch, step + 1, opt)
        losses.update(loss_sum / n, n)
        top1.update(100.0 * correct / n, n)
        batch_time.update(time.time() - end)
        end = time.time()

        if (step + 1) % opt.print_freq == 0 and is_main_process():
            print(
                'Train: [{0}][{1}/{2}]\t'
                'BT {batch_time.val:.3f} ({batch_time.avg:.3f})\t'
                'DT {data_time.val:.3f} ({data_time.avg:.3f})\t'
                'loss {loss.val:.3f} ({loss.avg:.3f})\t'
                'Acc@1 {top1.val:.3f} ({top1.avg:.3f})'.format(
                    epoch,
                    step + 1,
                    total_steps,
                    batch_time=batch_time,
                    data_time=data_time,
                    loss=losses,
                    top1=top1,
                ),
                flush=True,
            )
            run.log_step('loss_step', losses.val, epoch, step, total_steps)
        if stop:
            return losses.avg, top1.avg, step + 1
    return losses.avg, top1.avg, None
