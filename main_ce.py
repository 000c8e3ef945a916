"""Cross-entropy baseline: train the whole network with labels.

Same flags, defaults and output names as the reference ``main_ce.py`` (plus
``--dataset path`` and ``digits``); runs on CPU, GPUs and under torchrun.
"""

import argparse
import os
import time

import torch.nn as nn

from networks.encoders import build_encoder, check_model_name
from networks.resnet_big import SupCEResNet
from supcon import balanced, class_accuracy, data, engine, multilabel, options, runtime
from supcon.augment import add_augmentation_arguments
from supcon.optim import build_optimizer
from supcon.training_run import Run
from util import AverageMeter, UserError, adjust_learning_rate


def parse_option(argv=None):
    parser = argparse.ArgumentParser(
        prog='main_ce.py',
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description='Train the whole network with cross-entropy (the baseline); checkpoints go'
        ' to ./save/SupCon/<dataset>_models/SupCE_<run name>/.',
    )

    options.add_training_arguments(
        parser, epochs=500, learning_rate=0.2, lr_decay_epochs='350,400,450'
    )

    # model
    options.add_model_arguments(parser)

    # other setting
    options.add_schedule_arguments(parser)

    data.add_arguments(parser, test_folder=True, imbalance=True)
    balanced.add_arguments(parser)
    add_augmentation_arguments(parser, classifier=True)
    runtime.add_runtime_arguments(parser)
    opt = parser.parse_args(argv)

    options.check_common_options(opt)
    check_model_name(opt.model)
    if opt.num_workers_val < 0:
        raise UserError(f'--num_workers_val must be 0 or more, got {opt.num_workers_val}')
    if opt.dataset == 'path' and opt.data_folder is None:
        raise UserError(
            '--dataset path needs --data_folder and --test_folder (one sub-folder per class'
            ' each; or --val_split instead of --test_folder) and --mean/--std'
        )
    data.resolve_defaults(opt)
    data.check_test_folder(opt)
    balanced.resolve_options(opt)
    if opt.stem is None:
        opt.stem = 'imagenet' if opt.dataset == 'imagenet' else 'cifar'
    opt.model_path = './save/SupCon/{}_models'.format(opt.dataset)
    opt.tb_path = './save/SupCon/{}_tensorboard'.format(opt.dataset)
    opt.lr_decay_epochs = options.parse_decay_epochs(opt.lr_decay_epochs)

    opt.model_name = 'SupCE_{}_{}_lr_{}_decay_{}_bsz_{}_trial_{}'.format(
        opt.dataset, opt.model, opt.learning_rate, opt.weight_decay, opt.batch_size, opt.trial
    )
    # _cosine, warm-up for large-batch training (forced above 256, as the reference), our parts
    options.finish_run_name(opt, large_batch=256)

    opt.tb_folder = os.path.join(opt.tb_path, opt.model_name)
    opt.save_folder = os.path.join(opt.model_path, opt.model_name)
    return opt


def set_loader(opt, rt):
    """(train_loader, train_sampler, val_loader, num_classes, device_augment or None)."""
    loaders = data.classification_loaders(opt, rt, uint8_train=opt.gpu_aug)
    device_augment = None
    if opt.gpu_aug:
        from supcon.gpu_augment import DeviceAugment

        mean, std = data.resolve_mean_std(opt.dataset, opt.mean, opt.std)
        device_augment = DeviceAugment(opt.size, mean, std, kind='ce').to(rt.device)
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


def train(
    train_loader, model, criterion, optimizer, scaler, epoch, opt, rt, run, device_augment=None
):
    """One epoch of training; returns (loss, acc, stopped_at)."""
    model.train()
    return engine.train_classifier(
        train_loader,
        model,
        criterion,
        optimizer,
        scaler,
        epoch,
        opt,
        rt,
        run,
        device_augment=device_augment,
    )


def main():
    best_acc = 0
    opt = parse_option()
    rt = runtime.setup_runtime(opt)
    run = Run(opt, rt, meters={'loss': AverageMeter(), 'acc': AverageMeter()})
    options.print_options(run.options())

    # build data loader
    train_loader, train_sampler, val_loader, num_classes, device_augment = set_loader(opt, rt)

    # build model and criterion
    model, criterion = set_model(opt, rt, num_classes)
    # multi-label data: a sigmoid per label, measured by mean average precision (multilabel.py)
    multi_label = multilabel.is_multilabel(train_loader.dataset)
    # images per class of the training split (for the many / medium / few-shot groups)
    train_counts = (
        None if multi_label else class_accuracy.training_counts(train_loader.dataset, num_classes)
    )
    criterion = multilabel.classifier_criterion(train_loader.dataset, criterion)

    # build optimizer
    optimizer = build_optimizer(opt, model)
    scaler = runtime.make_scaler(rt)

    start_epoch = run.restore(model, optimizer, scaler)
    best_acc = run.extra.get('best_acc', best_acc)
    val_acc = run.extra.get('val_acc')
    val_f1 = run.extra.get('val_f1')
    class_counts = run.extra.get('class_counts')  # the last epoch's (correct, total) per class
    logger = run.logger
    # evaluate without the DDP wrapper: ranks hold unequal shares of the test set
    eval_model = runtime.unwrap(model) if rt.distributed else model

    # training routine
    for epoch in range(start_epoch, opt.epochs + 1):
        run.begin_epoch(epoch, train_sampler)
        adjust_learning_rate(opt, optimizer, epoch)

        # train for one epoch
        time1 = time.time()
        loss, train_acc, stopped_at = train(
            train_loader,
            model,
            criterion,
            optimizer,
            scaler,
            epoch,
            opt,
            rt,
            run,
            device_augment=device_augment,
        )
        if stopped_at is not None:
            run.interrupted(epoch, stopped_at)
        time2 = time.time()
        if runtime.is_main_process():
            print('epoch {}, total time {:.2f}'.format(epoch, time2 - time1), flush=True)

        # evaluation
        eval_model.eval()
        # multi-label: the mean average precision and F1@0.5 instead of top-1 and top-5
        val_loss, val_acc, top5_or_f1, class_counts = engine.validate(
            val_loader, eval_model, criterion, opt, rt, num_classes, per_class=True
        )
        val_f1 = top5_or_f1 if multi_label else None
        if val_acc > best_acc:
            best_acc = val_acc

        # tensorboard logger
        logger.log_value('train_loss', loss, epoch)
        logger.log_value('train_acc', train_acc, epoch)
        logger.log_value('val_loss', val_loss, epoch)
        logger.log_value('val_map' if multi_label else 'val_acc', val_acc, epoch)
        if multi_label:
            logger.log_value('val_f1', val_f1, epoch)
        logger.log_value('learning_rate', optimizer.param_groups[0]['lr'], epoch)
        if class_counts is not None:
            summary = class_accuracy.summarize(*class_counts, train_counts)
            class_accuracy.log_summary(logger, summary, epoch)
        logger.flush()

        run.extra = {
            'best_acc': best_acc,
            'val_acc': val_acc,
            'classes': list(train_loader.dataset.classes),  # for main_predict.py, main_export.py
        }
        if multi_label:
            run.extra['val_f1'] = val_f1
        else:
            run.extra['class_counts'] = list(class_counts)
        run.end_epoch(epoch)

    # the options and final metrics for TensorBoard's HPARAMS tab, once per run
    run.log_hparams(['train_loss', 'train_acc', 'val_loss', 'val_acc'])
    # save the last model
    run.save('last.pth', opt.epochs)
    run.close()
    multilabel.print_results(best_acc, val_acc, val_f1, multi_label)
    if runtime.is_main_process() and class_counts is not None:  # the last epoch's, as final
        classes = train_loader.dataset.classes
        class_accuracy.report(opt.save_folder, classes, train_counts, class_counts, opt.epochs)


if __name__ == '__main__':
    runtime.run_main(main)
