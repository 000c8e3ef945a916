"""Pretrain an encoder with Supervised Contrastive Learning or SimCLR.

Same flags, defaults and output names as the reference ``main_supcon.py``; runs
on CPU, on one or several GPUs, and under torchrun (see README.md).
"""
import argparse
import os
import time

import torch

import data
from augment import supcon_transform
import options
import runtime
from checkpoint import Run
from losses import SupConLoss
from sampling import build_loader
from networks.resnet_big import MODEL_NAMES, STEMS, SupConResNet
from util import AverageMeter, UserError, adjust_learning_rate, set_optimizer, \
    warmup_learning_rate


def parse_option(argv=None):
    parser = argparse.ArgumentParser('argument for training')

    parser.add_argument('--print_freq', type=int, default=10, help='print frequency')
    parser.add_argument('--save_freq', type=int, default=50, help='save frequency')
    parser.add_argument('--batch_size', type=int, default=256,
                        help='global batch size (summed over GPUs and processes)')
    parser.add_argument('--num_workers', type=int, default=16,
                        help='data loading workers per process, capped at the CPUs present')
    parser.add_argument('--epochs', type=int, default=1000, help='number of training epochs')

    # optimization
    parser.add_argument('--learning_rate', type=float, default=0.05, help='learning rate')
    parser.add_argument('--lr_decay_epochs', type=str, default='700,800,900',
                        help='where to decay lr, can be a list')
    parser.add_argument('--lr_decay_rate', type=float, default=0.1, help='decay rate for learning rate')
    parser.add_argument('--weight_decay', type=float, default=1e-4, help='weight decay')
    parser.add_argument('--momentum', type=float, default=0.9, help='momentum')

    # model
    parser.add_argument('--model', type=str, default='resnet50', help=', '.join(MODEL_NAMES))
    parser.add_argument('--stem', type=str, default='cifar', help=', '.join(STEMS) +
                        ': imagenet (7x7 stride-2 conv + max-pool) makes large images far cheaper')

    # method
    parser.add_argument('--method', type=str, default='SupCon', help='SupCon or SimCLR')
    parser.add_argument('--temp', type=float, default=0.07, help='temperature for loss function')

    # other setting
    parser.add_argument('--cosine', action='store_true', help='using cosine annealing')
    parser.add_argument('--syncBN', action='store_true',
                        help='synchronise BatchNorm over processes (under torchrun)')
    parser.add_argument('--warm', action='store_true', help='warm-up for large batch training')
    parser.add_argument('--trial', type=str, default='0', help='id for recording multiple runs')
    parser.add_argument('--knn_every', type=int, default=0,
                        help='every N epochs, print and log a kNN top-1 accuracy of the test'
                             ' split (0 = off)')

    data.add_arguments(parser, test_folder=True)
    runtime.add_runtime_arguments(parser)
    opt = parser.parse_args(argv)

    options.check_choice(opt.model, MODEL_NAMES, '--model')
    options.check_choice(opt.stem, STEMS, '--stem')
    options.check_choice(opt.method, ('SupCon', 'SimCLR'), '--method')
    options.check_common_options(opt)
    if opt.temp <= 0:
        raise UserError(f'--temp must be positive, got {opt.temp}')
    if opt.knn_every < 0:
        raise UserError(f'--knn_every must be 0 (off) or more, got {opt.knn_every}')
    if opt.dataset == 'path' and opt.data_folder is None:
        raise UserError('--dataset path needs --data_folder (one sub-folder per class)'
                             ' and --mean/--std, e.g. --mean "(0.4914, 0.4822, 0.4465)"')
    if opt.data_folder is None:
        opt.data_folder = './datasets/'
    opt.model_path = './save/SupCon/{}_models'.format(opt.dataset)
    opt.tb_path = './save/SupCon/{}_tensorboard'.format(opt.dataset)
    opt.lr_decay_epochs = options.parse_decay_epochs(opt.lr_decay_epochs)

    opt.model_name = '{}_{}_{}_lr_{}_decay_{}_bsz_{}_temp_{}_trial_{}'.\
        format(opt.method, opt.dataset, opt.model, opt.learning_rate,
               opt.weight_decay, opt.batch_size, opt.temp, opt.trial)
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
    mean, std = data.resolve_mean_std(opt.dataset, opt.mean, opt.std)
    train_transform = supcon_transform(opt.size, mean, std)
    with runtime.main_process_first():
        train_dataset = data.build_dataset(opt.dataset, 'train', train_transform,
                                           data_folder=opt.data_folder)
    train_loader, train_sampler = build_loader(
        train_dataset, opt.local_batch_size, shuffle=True, seed=opt.seed, rank=opt.rank,
        world_size=opt.world_size, num_workers=opt.num_workers, pin_memory=opt.pin_memory)
    return train_loader, train_sampler


def set_model(opt):
    model = SupConResNet(name=opt.model, stem=opt.stem)
    criterion = SupConLoss(temperature=opt.temp)
    model = runtime.prepare_model(model, opt, parallel='encoder')
    return model, criterion


def train(train_loader, model, criterion, optimizer, scaler, epoch, opt, run):
    """One epoch of training; returns (loss, stopped_at)."""
    model.train()

    batch_time = AverageMeter()
    data_time = AverageMeter()
    losses = run.meters['loss']
    start = run.epoch_start_step(epoch)
    total_steps = start + len(train_loader)  # a resumed epoch's loader holds only the rest

    end = time.time()
    for i, (images, labels) in enumerate(train_loader):
        step = start + i
        data_time.update(time.time() - end)

        images = torch.cat([images[0], images[1]], dim=0)
        images = runtime.to_device(images, opt)
        labels = labels.to(opt.device, non_blocking=True)
        bsz = labels.shape[0]

        # warm-up learning rate
        warmup_learning_rate(opt, epoch, step, total_steps, optimizer)

        # compute loss (SupConLoss works in float32 whatever autocast does)
        with runtime.autocast(opt):
            features = model(images)
        f1, f2 = torch.split(features, [bsz, bsz], dim=0)
        features = torch.cat([f1.unsqueeze(1), f2.unsqueeze(1)], dim=1)
        if opt.method == 'SupCon':
            loss = criterion(features, labels)
        else:
            loss = criterion(features)

        # SGD
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

        # one host sync a step: loss over ranks, NaN check, a stop all ranks agree on
        loss_sum, n, stop = runtime.step_statistics(opt, loss.detach() * bsz, bsz,
                                                 run.stop.requested)
        runtime.check_finite(loss_sum, epoch, step + 1, opt)
        losses.update(loss_sum / n, n)

        # measure elapsed time
        batch_time.update(time.time() - end)
        end = time.time()

        # print info
        if (step + 1) % opt.print_freq == 0 and runtime.is_main_process():
            print('Train: [{0}][{1}/{2}]\t'
                  'BT {batch_time.val:.3f} ({batch_time.avg:.3f})\t'
                  'DT {data_time.val:.3f} ({data_time.avg:.3f})\t'
                  'loss {loss.val:.3f} ({loss.avg:.3f})'.format(
                      epoch, step + 1, total_steps, batch_time=batch_time,
                      data_time=data_time, loss=losses), flush=True)
        if stop:
            return losses.avg, step + 1
    return losses.avg, None


def main():
    opt = parse_option()
    runtime.setup_runtime(opt)
    run = Run(opt, meters={'loss': AverageMeter()})
    options.print_options(opt)

    # build data loader
    train_loader, train_sampler = set_loader(opt)

    # build model and criterion
    model, criterion = set_model(opt)

    # build optimizer
    optimizer = set_optimizer(opt, model)
    scaler = runtime.make_scaler(opt)

    # resume, checkpoints and tensorboard
    start_epoch = run.restore(model, optimizer, scaler)
    logger = run.logger
    knn_monitor = None
    if opt.knn_every:
        from features import KNNMonitor
        knn_monitor = KNNMonitor(opt)

    # training routine
    for epoch in range(start_epoch, opt.epochs + 1):
        run.begin_epoch(epoch, train_sampler)
        adjust_learning_rate(opt, optimizer, epoch)

        # train for one epoch
        time1 = time.time()
        loss, stopped_at = train(train_loader, model, criterion, optimizer, scaler, epoch,
                                 opt, run)
        if stopped_at is not None:
            run.interrupted(epoch, stopped_at)
        time2 = time.time()
        if runtime.is_main_process():
            print('epoch {}, total time {:.2f}'.format(epoch, time2 - time1), flush=True)

        # tensorboard logger
        logger.log_value('loss', loss, epoch)
        logger.log_value('learning_rate', optimizer.param_groups[0]['lr'], epoch)
        if knn_monitor is not None and epoch % opt.knn_every == 0:
            knn_acc = knn_monitor(runtime.unwrap(model).encoder, epoch)
            logger.log_value('knn_acc', knn_acc, epoch)
        logger.flush()

        run.end_epoch(epoch)

    # save the last model
    save_file = run.save('last.pth', opt.epochs)
    if runtime.is_main_process():
        print(f'saved {save_file}')
    run.close()


if __name__ == '__main__':
    runtime.run_main(main)
