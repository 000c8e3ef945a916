"""Cross-entropy baseline: train the whole network with labels.

Same flags, defaults and output names as the reference ``main_ce.py`` (plus
``--dataset path`` and ``digits``); runs on CPU, GPUs and under torchrun.
"""
import argparse
import os
import time

import torch.nn as nn

import data
import engine
import options
import runtime
from checkpoint import Run
from networks.resnet_big import MODEL_NAMES, STEMS, SupCEResNet
from util import AverageMeter, UserError, adjust_learning_rate, set_optimizer


def parse_option(argv=None):
    parser = argparse.ArgumentParser('argument for training')

    parser.add_argument('--print_freq', type=int, default=10, help='print frequency')
    parser.add_argument('--save_freq', type=int, default=50, help='save frequency')
    parser.add_argument('--batch_size', type=int, default=256,
                        help='global batch size (summed over GPUs and processes)')
    parser.add_argument('--num_workers', type=int, default=16,
                        help='data loading workers per process, capped at the CPUs present')
    parser.add_argument('--epochs', type=int, default=500, help='number of training epochs')

    # optimization
    parser.add_argument('--learning_rate', type=float, default=0.2, help='learning rate')
    parser.add_argument('--lr_decay_epochs', type=str, default='350,400,450',
                        help='where to decay lr, can be a list')
    parser.add_argument('--lr_decay_rate', type=float, default=0.1, help='decay rate for learning rate')
    parser.add_argument('--weight_decay', type=float, default=1e-4, help='weight decay')
    parser.add_argument('--momentum', type=float, default=0.9, help='momentum')

    # model
    parser.add_argument('--model', type=str, default='resnet50', help=', '.join(MODEL_NAMES))
    parser.add_argument('--stem', type=str, default='cifar', help=', '.join(STEMS) +
                        ': imagenet (7x7 stride-2 conv + max-pool) makes large images far cheaper')

    # other setting
    parser.add_argument('--cosine', action='store_true', help='using cosine annealing')
    parser.add_argument('--syncBN', action='store_true',
                        help='synchronise BatchNorm over processes (under torchrun)')
    parser.add_argument('--warm', action='store_true', help='warm-up for large batch training')
    parser.add_argument('--trial', type=str, default='0', help='id for recording multiple runs')

    data.add_arguments(parser, test_folder=True)
    runtime.add_runtime_arguments(parser)
    opt = parser.parse_args(argv)

    options.check_choice(opt.model, MODEL_NAMES, '--model')
    options.check_choice(opt.stem, STEMS, '--stem')
    options.check_common_options(opt)
    if opt.dataset == 'path' and (opt.data_folder is None or opt.test_folder is None):
        raise UserError('--dataset path needs --data_folder and --test_folder (one'
                             ' sub-folder per class each) and --mean/--std')
    if opt.data_folder is None:
        opt.data_folder = './datasets/'
    opt.model_path = './save/SupCon/{}_models'.format(opt.dataset)
    opt.tb_path = './save/SupCon/{}_tensorboard'.format(opt.dataset)
    opt.lr_decay_epochs = options.parse_decay_epochs(opt.lr_decay_epochs)

    opt.model_name = 'SupCE_{}_{}_lr_{}_decay_{}_bsz_{}_trial_{}'.\
        format(opt.dataset, opt.model, opt.learning_rate, opt.weight_decay,
               opt.batch_size, opt.trial)
    if opt.cosine:
        opt.model_name = '{}_cosine'.format(opt.model_name)
    # warm-up for large-batch training (forced above 256, as the reference)
    options.configure_warmup(opt, large_batch=256)
    if opt.stem != 'cifar':  # the reference's names stay unchanged for its own stem
        opt.model_name = '{}_stem_{}'.format(opt.model_name, opt.stem)

    opt.tb_folder = os.path.join(opt.tb_path, opt.model_name)
    opt.save_folder = os.path.join(opt.model_path, opt.model_name)
    return opt


def set_loader(opt):
    return data.classification_loaders(opt)


def set_model(opt, num_classes):
    model = SupCEResNet(name=opt.model, num_classes=num_classes, stem=opt.stem)
    criterion = nn.CrossEntropyLoss()
    model = runtime.prepare_model(model, opt, parallel='encoder')
    return model, criterion


def train(train_loader, model, criterion, optimizer, scaler, epoch, opt, run):
    """One epoch of training; returns (loss, acc, stopped_at)."""
    model.train()
    return engine.train_classifier(train_loader, model, criterion, optimizer, scaler, epoch,
                                   opt, run)


def main():
    best_acc = 0
    opt = parse_option()
    runtime.setup_runtime(opt)
    run = Run(opt, meters={'loss': AverageMeter(), 'acc': AverageMeter()})
    options.print_options(opt)

    # build data loader
    train_loader, train_sampler, val_loader, num_classes = set_loader(opt)

    # build model and criterion
    model, criterion = set_model(opt, num_classes)

    # build optimizer
    optimizer = set_optimizer(opt, model)
    scaler = runtime.make_scaler(opt)

    start_epoch = run.restore(model, optimizer, scaler)
    best_acc = run.extra.get('best_acc', best_acc)
    logger = run.logger
    # evaluate without the DDP wrapper: ranks hold unequal shares of the test set
    eval_model = runtime.unwrap(model) if opt.distributed else model

    # training routine
    for epoch in range(start_epoch, opt.epochs + 1):
        run.begin_epoch(epoch, train_sampler)
        adjust_learning_rate(opt, optimizer, epoch)

        # train for one epoch
        time1 = time.time()
        loss, train_acc, stopped_at = train(train_loader, model, criterion, optimizer, scaler,
                                            epoch, opt, run)
        if stopped_at is not None:
            run.interrupted(epoch, stopped_at)
        time2 = time.time()
        if runtime.is_main_process():
            print('epoch {}, total time {:.2f}'.format(epoch, time2 - time1), flush=True)

        # evaluation
        eval_model.eval()
        val_loss, val_acc, _ = engine.validate(val_loader, eval_model, criterion, opt,
                                                num_classes)
        if val_acc > best_acc:
            best_acc = val_acc

        # tensorboard logger
        logger.log_value('train_loss', loss, epoch)
        logger.log_value('train_acc', train_acc, epoch)
        logger.log_value('val_loss', val_loss, epoch)
        logger.log_value('val_acc', val_acc, epoch)
        logger.log_value('learning_rate', optimizer.param_groups[0]['lr'], epoch)
        logger.flush()

        run.extra = {'best_acc': best_acc, 'val_acc': val_acc}
        run.end_epoch(epoch)

    # save the last model
    run.save('last.pth', opt.epochs)
    run.close()
    if runtime.is_main_process():
        print('best accuracy: {:.2f}'.format(best_acc))


if __name__ == '__main__':
    runtime.run_main(main)
