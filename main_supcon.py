"""Pretrain an encoder with Supervised Contrastive Learning or SimCLR.

Same flags, defaults and output names as the reference ``main_supcon.py``; runs
on CPU, on one or several GPUs, and under torchrun (see README.md).
"""

import argparse
import os
import time

from losses import SupConLoss
from networks import encoders
from networks.encoders import build_encoder
from networks.resnet_big import SupConResNet
from supcon import capabilities, options
from supcon.data import balanced, datasets, labelling, views
from supcon.data.augment import add_augmentation_arguments
from supcon.data.views import ViewLayout
from supcon.evaluation import knn
from supcon.objectives import grad_cache, moco, probe
from supcon.objectives.moco import MomentumContrast
from supcon.objectives.positives import TAGS as POSITIVES_TAGS
from supcon.objectives.step import TrainingStep
from supcon.system import cli, runtime
from supcon.training.bookkeeping import Bookkeeper
from supcon.training.loop import EpochLoop
from supcon.training.optim import build_optimizer
from util import AverageMeter, UserError, adjust_learning_rate

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
    encoders.add_arguments(parser)

    # method
    parser.add_argument('--method', type=str, default='SupCon', help=', '.join(METHODS))
    parser.add_argument('--temp', type=float, default=0.07, help='temperature for loss function')
    labelling.add_arguments(parser)
    moco.add_arguments(parser)
    grad_cache.add_arguments(parser)

    # other setting
    options.add_schedule_arguments(parser)
    knn.add_arguments(parser)

    probe.add_arguments(parser)
    datasets.add_arguments(
        parser, test_folder=True, imbalance=True, test_split_flags=capabilities.test_split_flags()
    )
    balanced.add_arguments(parser)
    add_augmentation_arguments(parser)
    views.add_arguments(parser)
    runtime.add_runtime_arguments(parser)
    opt = parser.parse_args(argv)

    options.check_choice(opt.method, METHODS + ('SupConHybrid',), '--method')
    if opt.method == 'SupConHybrid':  # the fork's later name for the same loss
        opt.method = 'SupCon_hybrid'
    options.check_common_options(opt)
    if opt.dataset == 'path' and opt.data_folder is None:
        raise UserError(
            '--dataset path needs --data_folder (one sub-folder per class)'
            ' and --mean/--std, e.g. --mean "(0.4914, 0.4822, 0.4465)"'
        )
    datasets.resolve_defaults(opt)
    capabilities.check_options(opt, 'supcon')
    # the kNN monitor, the online probe and the joint classifier score the test split
    datasets.check_test_folder(
        opt, capabilities.reads_test_split(opt), capabilities.test_split_flags()
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
    options.finish_run_name(opt, 'supcon', large_batch=256)

    opt.tb_folder = os.path.join(opt.tb_path, opt.model_name)
    opt.save_folder = os.path.join(opt.model_path, opt.model_name)
    return opt


def set_loader(opt, rt):
    """(train_loader, train_sampler, device_augment or None) of multi-view training batches
    (two views of each image by default; --n_views, --small_views: supcon/data/views.py).

    With --gpu_aug the loader hands over uint8 images and ``device_augment`` makes the
    views on the training device; otherwise the loader's workers make them (the reference).
    """
    mean, std = datasets.resolve_mean_std(opt.dataset, opt.mean, opt.std)
    layout = ViewLayout.of(opt)
    if opt.gpu_aug:
        from supcon.data.gpu_augment import to_uint8_tensor

        train_transform = to_uint8_tensor(datasets.fixed_size(opt.dataset, opt.size))
        device_augment = layout.device_augment(opt.size, mean, std, opt.crop_scale).to(rt.device)
    else:
        train_transform = layout.loader_transform(opt.size, mean, std, opt.aug, opt.crop_scale)
        device_augment = None
    with runtime.main_process_first():
        train_dataset = datasets.build_split(opt, 'train', train_transform, rt.seed)
    if opt.num_classes is not None and opt.num_classes != len(train_dataset.classes):
        raise UserError(
            f'--num_classes {opt.num_classes} does not match the'
            f' {len(train_dataset.classes)} classes of the training data; drop'
            f' --num_classes (pretraining reads them from the data) or fix it'
        )
    capabilities.check_data(opt, train_dataset)
    # unlabelled images carry the label -1 (SupConLoss gives them SimCLR's positives)
    train_dataset = labelling.pretraining_set(train_dataset, opt, rt.seed)
    train_loader, train_sampler = datasets.training_loader(train_dataset, opt, rt)
    return train_loader, train_sampler, device_augment


def set_model(opt, rt):
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
    return model, criterion


def set_step(opt, rt, model, criterion, train_set, meters, device_augment=None):
    """The training step (supcon/objectives/step.py) with the capabilities it carries: the key
    encoder and queue of --moco, the online probe and the joint classifier."""
    moco = MomentumContrast.build(opt, rt, runtime.unwrap(model))
    heads = probe.build_heads(opt, rt, runtime.unwrap(model), train_set)
    return TrainingStep(opt, rt, model, criterion, train_set, meters, moco, heads, device_augment)


def train(train_loader, model, step, optimizer, epoch, loop):
    """One epoch of training; returns the mean loss."""
    model.train()
    for images, labels in loop.batches(train_loader, epoch):
        batch = step.views(images, labels, loop)  # every view on the device, [V * bsz, ...]
        out = step.forward(model, batch)  # projections [bsz, V, D], encoder features
        loss = step.loss(out, batch)  # SupCon / SimCLR (+ --moco's queue, + the heads)

        # SGD
        optimizer.zero_grad(set_to_none=True)
        step.backward(loss, out)
        step.optimizer_step(optimizer, batch)  # (+ the probe's step, the key encoder's update)

        loop.update(loss, batch.size, counter=step.positives)
    return loop.book.meters['loss'].avg


def main():
    opt = parse_option()
    rt = runtime.setup_runtime(opt)
    meters = {name: AverageMeter() for name in ('loss',) + POSITIVES_TAGS}
    book = Bookkeeper(opt, rt, meters=meters, fixed=capabilities.FIXED)
    options.print_options(book.options())

    # build data loader
    train_loader, train_sampler, device_augment = set_loader(opt, rt)

    # build model, criterion and the training step
    model, criterion = set_model(opt, rt)
    step = set_step(opt, rt, model, criterion, train_loader.dataset, meters, device_augment)

    # build optimizer
    optimizer = build_optimizer(opt, model, extra=step.trained_by_the_run_optimizer())

    # resume, checkpoints and tensorboard
    start_epoch = book.restore(model, optimizer, step.scaler, **step.state_modules())
    logger = book.logger
    loop = EpochLoop(opt, rt, book, optimizer, step.scaler)
    knn_monitor = knn.build(opt, rt)

    # training routine
    for epoch in range(start_epoch, opt.epochs + 1):
        book.begin_epoch(epoch, train_sampler)
        adjust_learning_rate(opt, optimizer, epoch)

        # train for one epoch
        time1 = time.time()
        loss = train(train_loader, model, step, optimizer, epoch, loop)
        time2 = time.time()
        positives = [meters[tag].avg for tag in POSITIVES_TAGS]
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
        heads = step.heads
        if heads is not None and (epoch % opt.probe_every == 0 or epoch == opt.epochs):
            for tag, value in heads.evaluate(runtime.unwrap(model).encoder, epoch).items():
                logger.log_value(tag, value, epoch)
        logger.flush()

        book.end_epoch(epoch)

    # the options and final metrics for TensorBoard's HPARAMS tab, once per run
    metrics = ['loss'] + (['knn_acc'] if knn_monitor is not None else [])
    book.log_hparams(metrics + (step.heads.tags() if step.heads is not None else []))

    # save the last model
    save_file = book.save('last.pth', opt.epochs)
    if runtime.is_main_process():
        print(f'saved {save_file}')
    book.close()


if __name__ == '__main__':
    runtime.launch(main)
