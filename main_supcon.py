"""Pretrain an encoder with Supervised Contrastive Learning or SimCLR.

Same flags, defaults and output names as the reference ``main_supcon.py``; runs
on CPU, on one or several GPUs, and under torchrun (see README.md).
"""

import argparse
import os
import time

import torch

from losses import SupConLoss
from networks.encoders import build_encoder, check_model_name
from networks.resnet_big import SupConResNet
from supcon import balanced, cli, data, multilabel, options, partial_labels, probe, runtime
from supcon.augment import add_augmentation_arguments, supcon_transform
from supcon.distributed import note
from supcon.moco import MomentumContrast, moco_options, note_queue_length
from supcon.optim import build_optimizer
from supcon.positives import TAGS as POSITIVES_TAGS
from supcon.positives import PositiveCounter
from supcon.sampling import mix_seed
from supcon.training_run import Run, check_finite
from util import AverageMeter, UserError, adjust_learning_rate, warmup_learning_rate

METHODS = ('SupCon', 'SimCLR', 'SupCon_hybrid')


def parse_option(argv=None):
    parser = cli.ArgumentParser(
        prog='main_supcon.py',
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description='Pretrain an encoder with SupCon, SimCLR or the hybrid loss; checkpoints go'
        ' to ./save/SupCon/<dataset>_models/<run name>/.',
    )

    options.add_training_arguments(
        parser,
        epochs=1000,
        learning_rate=0.05,
        lr_decay_epochs='700,800,900',
        num_workers_val=False,
    )

    # model
    options.add_model_arguments(parser)

    # method
    parser.add_argument('--method', type=str, default='SupCon', help=', '.join(METHODS))
    parser.add_argument('--temp', type=float, default=0.07, help='temperature for loss function')
    parser.add_argument(
        '--multilabel',
        type=str,
        default='jaccard',
        choices=('jaccard', 'any'),
        help='multi-label data (--dataset csv): a pair\'s positive weight is the Jaccard'
        ' overlap of its label sets, or 1 when they share any label (docs/labels.md)',
    )
    partial_labels.add_arguments(parser)
    parser.add_argument(
        '--moco',
        action='store_true',
        help='momentum key encoder and a labelled queue of past keys (for small'
        ' batches; docs/small-batches.md)',
    )
    parser.add_argument(
        '--moco_k', type=int, default=None, help='--moco: queue length (4096 when not given)'
    )
    parser.add_argument(
        '--moco_m',
        type=float,
        default=None,
        help='--moco: momentum of the key encoder\'s moving average (0.999 when not given)',
    )

    # other setting
    options.add_schedule_arguments(parser)
    parser.add_argument(
        '--knn_every',
        type=int,
        default=0,
        help='every N epochs, print and log a kNN top-1 accuracy of the test'
        ' split (of the held-out images with --val_split; 0 = off)',
    )

    probe.add_arguments(parser)
    data.add_arguments(parser, test_folder=True, knn_only=True, imbalance=True)
    balanced.add_arguments(parser)
    add_augmentation_arguments(parser)
    runtime.add_runtime_arguments(parser)
    opt = parser.parse_args(argv)

    options.check_choice(opt.method, METHODS + ('SupConHybrid',), '--method')
    if opt.method == 'SupConHybrid':  # the fork's later name for the same loss
        opt.method = 'SupCon_hybrid'
    options.check_common_options(opt)
    check_model_name(opt.model)
    partial_labels.check_pretraining_options(opt)
    if opt.dataset == 'path' and opt.data_folder is None:
        raise UserError(
            '--dataset path needs --data_folder (one sub-folder per class)'
            ' and --mean/--std, e.g. --mean "(0.4914, 0.4822, 0.4465)"'
        )
    data.resolve_defaults(opt)
    balanced.resolve_options(opt)
    if opt.stem is None:
        opt.stem = 'imagenet' if opt.dataset == 'imagenet' else 'cifar'
    if opt.knn_every < 0:
        raise UserError(f'--knn_every must be 0 (off) or more, got {opt.knn_every}')
    if opt.knn_every > opt.epochs:
        note(
            f'--knn_every {opt.knn_every} is more than --epochs {opt.epochs}, so the kNN'
            f' accuracy is never measured; use --knn_every {opt.epochs} or less'
        )
    moco_options(opt)
    probe.check_options(opt)
    # the kNN monitor, the online probe and the joint classifier score the test split
    data.check_test_folder(
        opt, reads_test=opt.knn_every > 0 or opt.online_probe or opt.ce_weight > 0
    )
    opt.model_path = './save/SupCon/{}_models'.format(opt.dataset)
    opt.tb_path = './save/SupCon/{}_tensorboard'.format(opt.dataset)
    opt.lr_decay_epochs = options.parse_decay_epochs(opt.lr_decay_epochs)

    # the reference's run name, character for character
    opt.model_name = '{}_{}_{}_lr_{}_decay_{}_bsz_{}_temp_{}_trial_{}'.format(
        opt.method, opt.dataset, opt.model, opt.learning_rate, opt.weight_decay,
        opt.batch_size, opt.temp, opt.trial,
    )  # fmt: skip
    # _cosine, warm-up for large-batch training (forced above 256, as the reference), our parts
    options.finish_run_name(opt, large_batch=256)

    opt.tb_folder = os.path.join(opt.tb_path, opt.model_name)
    opt.save_folder = os.path.join(opt.model_path, opt.model_name)
    return opt


def set_loader(opt, rt):
    """(train_loader, train_sampler, device_augment or None) of two-view training batches.

    With --gpu_aug the loader hands over uint8 images and ``device_augment`` makes the two
    views on the training device; otherwise the loader's workers make them (the reference).
    """
    mean, std = data.resolve_mean_std(opt.dataset, opt.mean, opt.std)
    if opt.gpu_aug:
        from supcon.gpu_augment import DeviceAugment, to_uint8_tensor

        train_transform = to_uint8_tensor(data.fixed_size(opt.dataset, opt.size))
        device_augment = DeviceAugment(opt.size, mean, std, kind='supcon').to(rt.device)
    else:
        train_transform = supcon_transform(opt.size, mean, std, aug=opt.aug)
        device_augment = None
    with runtime.main_process_first():
        train_dataset = data.build_dataset(
            opt.dataset,
            'train',
            train_transform,
            data_folder=opt.data_folder,
            val_split=opt.val_split,
            imbalance_ratio=opt.imbalance_ratio,
            imbalance_seed=rt.seed,
        )
    if opt.num_classes is not None and opt.num_classes != len(train_dataset.classes):
        raise UserError(
            f'--num_classes {opt.num_classes} does not match the'
            f' {len(train_dataset.classes)} classes of the training data; drop'
            f' --num_classes (pretraining reads them from the data) or fix it'
        )
    multilabel.check_pretraining(opt, train_dataset)
    # unlabelled images carry the label -1 (SupConLoss gives them SimCLR's positives)
    train_dataset = partial_labels.pretraining_set(train_dataset, opt, rt.seed)
    train_loader, train_sampler = balanced.train_loader(train_dataset, opt, rt)
    return train_loader, train_sampler, device_augment


def set_model(opt, rt):
    """(model, criterion, moco or None); ``moco`` holds the key encoder and the queue."""
    encoder = build_encoder(
        opt.model,
        stem=opt.stem,
        size=opt.size,
        patch_size=opt.patch_size,
        pretrained_file=opt.pretrained,
    )
    model = SupConResNet(name=opt.model, stem=opt.stem, encoder=encoder)
    criterion = SupConLoss(
        temperature=opt.temp, hybrid=opt.method == 'SupCon_hybrid', multilabel=opt.multilabel
    )
    model = runtime.prepare_model(model, rt, parallel='encoder')
    moco = None
    if opt.moco:
        # after prepare_model: the key encoder copies the model as it runs (device, SyncBN)
        moco = MomentumContrast(runtime.unwrap(model), opt.moco_k, opt.moco_m).to(rt.device)
    return model, criterion, moco


def train(
    train_loader,
    model,
    criterion,
    optimizer,
    scaler,
    epoch,
    opt,
    rt,
    run,
    moco=None,
    device_augment=None,
    heads=None,
):
    """One epoch of training; returns (loss, stopped_at).

    With ``moco`` the key encoder follows the model after every step and the step's keys
    go into the queue; with ``device_augment`` the two views are made on the device;
    ``heads`` (supcon/probe.py) trains the online probe and adds --ce_weight's term.
    Updates ``run``'s meters: the loss and the positives per anchor (``supcon.positives``).
    """
    model.train()

    batch_time = AverageMeter()
    data_time = AverageMeter()
    losses = run.meters['loss']
    start = run.epoch_start_step(epoch)
    total_steps = start + len(train_loader)  # a resumed epoch's loader holds only the rest
    # multi-hot labels weigh positives by overlap: no per-class count describes them (0 and 1)
    supervised = opt.method == 'SupCon' and not multilabel.is_multilabel(train_loader.dataset)
    positives = PositiveCounter(len(train_loader.dataset.classes), supervised)

    end = time.time()
    for i, (images, labels) in enumerate(train_loader):
        step = start + i
        data_time.update(time.time() - end)

        if device_augment is not None:
            # both views at once, on the device; the seed makes a resumed step draw the same crops
            images = device_augment(
                images.to(rt.device, non_blocking=True),
                seed=mix_seed('gpu_aug', rt.seed, epoch, step, rt.rank),
            )
        else:
            images = torch.cat([images[0], images[1]], dim=0)
        images = runtime.to_device(images, rt)
        labels = labels.to(rt.device, non_blocking=True)
        bsz = labels.shape[0]
        if i == 0:
            run.log_views(images, epoch, views=2)

        # warm-up learning rate
        warmup_learning_rate(opt, epoch, step, total_steps, optimizer)

        # compute loss (SupConLoss works in float32 whatever autocast does)
        with runtime.autocast(rt):
            # the encoder's features come out of the same forward pass, for the heads
            features, encoded = model(images, with_features=True)
        f1, f2 = torch.split(features, [bsz, bsz], dim=0)
        features = torch.cat([f1.unsqueeze(1), f2.unsqueeze(1)], dim=1)
        loss_labels = None if opt.method == 'SimCLR' else labels
        if moco is not None:
            # against the momentum encoder's keys of the same views and the queue of past keys
            shuffle_seed = mix_seed('shuffle', rt.seed, epoch, step)
            loss = moco(criterion, images, features, labels, loss_labels, rt, shuffle_seed)
        else:
            loss = criterion(features, loss_labels)
        if heads is not None:
            # --ce_weight's cross-entropy (else zero); the probe's loss, on detached features
            loss = loss + heads(encoded, labels)
        # class counts of this batch (and of the queue the loss just saw), summed over ranks below
        counts = positives.step_counts(
            labels, moco.queue.labels if moco is not None else None, rt.rank
        )

        # SGD
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if heads is not None:
            # the probe's own SGD step; both classifiers' gradients averaged over ranks
            heads.step(epoch, step, total_steps)
        scaler.step(optimizer)
        scaler.update()
        if moco is not None:
            moco.step_done(runtime.unwrap(model))

        # one host sync a step: loss and class counts over ranks, NaN check, an agreed stop
        loss_sum, n, *class_counts, stop = runtime.step_statistics(
            rt, loss.detach() * bsz, bsz, counts, run.stop.requested
        )
        check_finite(loss_sum, epoch, step + 1, opt)
        losses.update(loss_sum / n, n)
        positives.update(class_counts, n, run.meters)

        # measure elapsed time
        batch_time.update(time.time() - end)
        end = time.time()

        # print info
        if (step + 1) % opt.print_freq == 0 and runtime.is_main_process():
            print(
                'Train: [{0}][{1}/{2}]\t'
                'BT {batch_time.val:.3f} ({batch_time.avg:.3f})\t'
                'DT {data_time.val:.3f} ({data_time.avg:.3f})\t'
                'loss {loss.val:.3f} ({loss.avg:.3f})'.format(
                    epoch,
                    step + 1,
                    total_steps,
                    batch_time=batch_time,
                    data_time=data_time,
                    loss=losses,
                ),
                flush=True,
            )
            run.log_step('loss_step', losses.val, epoch, step, total_steps)
        if stop:
            return losses.avg, step + 1
    return losses.avg, None


def main():
    opt = parse_option()
    rt = runtime.setup_runtime(opt)
    meters = {name: AverageMeter() for name in ('loss',) + POSITIVES_TAGS}
    run = Run(opt, rt, meters=meters)
    options.print_options(run.options())

    # build data loader
    train_loader, train_sampler, device_augment = set_loader(opt, rt)
    note_queue_length(opt, len(train_loader.dataset))

    # build model and criterion
    model, criterion, moco = set_model(opt, rt)

    # the online probe and the --ce_weight classifier, on the encoder's features
    heads = probe.build_heads(opt, rt, runtime.unwrap(model), train_loader.dataset)

    # build optimizer
    optimizer = build_optimizer(opt, model)
    if heads is not None:
        heads.add_to_optimizer(optimizer, opt)
    scaler = runtime.make_scaler(rt)

    # resume, checkpoints and tensorboard
    start_epoch = run.restore(
        model,
        optimizer,
        scaler,
        moco=moco,
        probe=getattr(heads, 'probe', None),
        ce_classifier=getattr(heads, 'joint', None),
    )
    logger = run.logger
    knn_monitor = None
    if opt.knn_every:
        from supcon.features import KNNMonitor

        knn_monitor = KNNMonitor(opt, rt)

    # training routine
    for epoch in range(start_epoch, opt.epochs + 1):
        run.begin_epoch(epoch, train_sampler)
        adjust_learning_rate(opt, optimizer, epoch)

        # train for one epoch
        time1 = time.time()
        loss, stopped_at = train(
            train_loader,
            model,
            criterion,
            optimizer,
            scaler,
            epoch,
            opt,
            rt,
            run,
            moco=moco,
            device_augment=device_augment,
            heads=heads,
        )
        if stopped_at is not None:
            run.interrupted(epoch, stopped_at)
        time2 = time.time()
        positives = [run.meters[tag].avg for tag in POSITIVES_TAGS]
        if runtime.is_main_process():
            print(
                'epoch {}, total time {:.2f}, positives_per_anchor {:.2f},'
                ' anchors_without_positive {:.3f}'.format(epoch, time2 - time1, *positives),
                flush=True,
            )

        # tensorboard logger
        logger.log_value('loss', loss, epoch)
        for tag, value in zip(POSITIVES_TAGS, positives):
            logger.log_value(tag, value, epoch)
        logger.log_value('learning_rate', optimizer.param_groups[0]['lr'], epoch)
        if knn_monitor is not None and epoch % opt.knn_every == 0:
            knn_acc = knn_monitor(runtime.unwrap(model).encoder, epoch)
            logger.log_value('knn_acc', knn_acc, epoch)
        if heads is not None and (epoch % opt.probe_every == 0 or epoch == opt.epochs):
            for tag, value in heads.evaluate(runtime.unwrap(model).encoder, epoch).items():
                logger.log_value(tag, value, epoch)
        logger.flush()

        run.end_epoch(epoch)

    # the options and final metrics for TensorBoard's HPARAMS tab, once per run
    metrics = ['loss'] + (['knn_acc'] if opt.knn_every else [])
    run.log_hparams(metrics + (heads.tags() if heads is not None else []))

    # save the last model
    save_file = run.save('last.pth', opt.epochs)
    if runtime.is_main_process():
        print(f'saved {save_file}')
    run.close()


if __name__ == '__main__':
    runtime.run_main(main)
