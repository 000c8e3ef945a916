"""Cross-entropy baseline: train the whole network with labels.

Same flags, defaults and output names as the reference ``main_ce.py`` (plus
``--dataset path`` and ``digits``); runs on CPU, GPUs and under torchrun.
"""

import argparse
import os
import time

import torch.nn as nn

from networks import encoders
from networks.encoders import build_encoder
from networks.resnet_big import SupCEResNet
from supcon import capabilities, options
from supcon.data import balanced, datasets
from supcon.data.augment import add_augmentation_arguments
from supcon.evaluation import multilabel
from supcon.evaluation.classify import EpochEvaluation
from supcon.system import cli, runtime
from supcon.training.bookkeeping import Bookkeeper
from supcon.training.loop import EpochLoop, train_classifier
from supcon.training.optim import build_optimizer
from util import AverageMeter, UserError, adjust_learning_rate


def parse_option(argv=None):
    parser = cli.ArgumentParser(
        prog='main_ce.py',
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description='Train the whole network with cross-entropy (the baseline); checkpoints go'
        ' to ./save/SupCon/<dataset>_models/SupCE_<run name>/.',
    )

    options.add_training_arguments(
        parser, epochs=500, learning_rate=0.2, lr_decay_epochs='350,400,450'
    )

    # model
    encoders.add_arguments(parser)

    # other setting
    options.add_schedule_arguments(parser)

    datasets.add_arguments(parser, test_folder=True, imbalance=True)
    balanced.add_arguments(parser)
    add_augmentation_arguments(parser, classifier=True)
    runtime.add_runtime_arguments(parser)
    opt = parser.parse_args(argv)

    options.check_common_options(opt)
    if opt.num_workers_val < 0:
        raise UserError(f'--num_workers_val must be 0 or more, got {opt.num_workers_val}')
    if opt.dataset == 'path' and opt.data_folder is None:
        raise UserError(
            '--dataset path needs --data_folder and --test_folder (one sub-folder per class'
            ' each; or --val_split instead of --test_folder) and --mean/--std'
        )
    datasets.resolve_defaults(opt)
    datasets.check_test_folder(opt)
    capabilities.check_options(opt, 'ce')
    opt.model_path = './save/SupCon/{}_models'.format(opt.dataset)
    opt.tb_path = './save/SupCon/{}_tensorboard'.format(opt.dataset)
    opt.lr_decay_epochs = options.parse_decay_epochs(opt.lr_decay_epochs)

    opt.model_name = 'SupCE_{}_{}_lr_{}_decay_{}_bsz_{}_trial_{}'.format(
        opt.dataset, opt.model, opt.learning_rate, opt.weight_decay, opt.batch_size, opt.trial
    )
    # _cosine, warm-up for large-batch training (forced above 256, as the reference), our parts
    options.finish_run_name(opt, 'ce', large_batch=256)

    opt.tb_folder = os.path.join(opt.tb_path, opt.model_name)
    opt.save_folder = os.path.join(opt.model_path, opt.model_name)
    return opt


def set_loader(opt, rt):
    """(train_loader, train_sampler, val_loader, num_classes, device_augment or None)."""
    loaders = datasets.classification_loaders(opt, rt, uint8_train=opt.gpu_aug)
    device_augment = None
    if opt.gpu_aug:
        from supcon.data.augment import crop_scales
        from supcon.data.gpu_augment import DeviceAugment

        mean, std = datasets.resolve_mean_std(opt.dataset, opt.mean, opt.std)
        scale = crop_scales(opt.crop_scale)[0]
        device_augment = DeviceAugment(opt.size, mean, std, kind='ce', scale=scale).to(rt.device)
    return (*loaders, device_augment)


def set_model(opt, rt, num_classes):
    encoder = build_encoder(
        opt.model,
        stem=opt.stem,
        size=opt.size,
        patch_size=opt.patch_size,
        pretrained_file=opt.pretrained,
    )
    model = SupCEResNet(name=opt.model, num_classes=num_classes, stem=opt.stem, encoder=encoder)
    criterion = nn.CrossEntropyLoss()
    model = runtime.prepare_model(model, rt, parallel='encoder')
    return model, criterion


def train(train_loader, model, criterion, optimizer, epoch, loop, device_augment=None):
    """One epoch of training; returns (loss, acc)."""
    model.train()
    return train_classifier(
        train_loader, model, criterion, optimizer, epoch, loop, augment=device_augment
    )


def main():
    opt = parse_option()
    rt = runtime.setup_runtime(opt)
    book = Bookkeeper(
        opt, rt, meters={'loss': AverageMeter(), 'acc': AverageMeter()}, fixed=capabilities.FIXED
    )
    options.print_options(book.options())

    # build data loader
    train_loader, train_sampler, val_loader, num_classes, device_augment = set_loader(opt, rt)

    # build model and criterion (multi-label data: a sigmoid per label, multilabel.py)
    model, criterion = set_model(opt, rt, num_classes)
    criterion = multilabel.classifier_criterion(train_loader.dataset, criterion)

    # build optimizer
    optimizer = build_optimizer(opt, model)
    scaler = runtime.make_scaler(rt)

    start_epoch = book.restore(model, optimizer, scaler)
    loop = EpochLoop(opt, rt, book, optimizer, scaler)
    # evaluate without the DDP wrapper: ranks hold unequal shares of the test set
    eval_model = runtime.unwrap(model) if rt.distributed else model
    evaluation = EpochEvaluation(
        val_loader, criterion, opt, rt, num_classes, train_loader.dataset, book
    )

    # training routine
    for epoch in range(start_epoch, opt.epochs + 1):
        book.begin_epoch(epoch, train_sampler)
        adjust_learning_rate(opt, optimizer, epoch)

        # train for one epoch
        time1 = time.time()
        loss, train_acc = train(
            train_loader, model, criterion, optimizer, epoch, loop, device_augment
        )
        time2 = time.time()
        if runtime.is_main_process():
            print('epoch {}, total time {:.2f}'.format(epoch, time2 - time1), flush=True)

        # evaluation, tensorboard logger
        evaluation(eval_model, epoch, loss, train_acc, optimizer.param_groups[0]['lr'])
        book.end_epoch(epoch)

    # the options and final metrics for TensorBoard's HPARAMS tab, once per run
    book.log_hparams(evaluation.tags())
    # save the last model
    book.save('last.pth', opt.epochs)
    book.close()
    evaluation.finish()


if __name__ == '__main__':
    runtime.launch(main)
