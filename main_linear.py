"""Linear evaluation: train a linear classifier on a frozen pretrained encoder.

Same flags and defaults as the reference ``main_linear.py``; the encoder comes
from ``--ckpt`` (ours or the reference's), stays in eval mode and is checked to
be unchanged at the end. The classifier and its TensorBoard logs are saved under
``save/SupCon/{dataset}_linear_models/`` and ``..._linear_tensorboard/``. With
``--finetune`` the encoder trains with the classifier (supcon/finetune.py).
"""

import argparse
import os
import time

import torch
import torch.nn as nn

from networks.from_checkpoint import checkpoint_model, encoder_from_checkpoint
from networks.resnet_big import MODEL_NAMES, LinearClassifier
from networks.timm_backbone import is_timm_model
from supcon import (
    balanced,
    class_accuracy,
    data,
    engine,
    finetune,
    multilabel,
    options,
    partial_labels,
    runtime,
)
from supcon.augment import add_augmentation_arguments
from supcon.checkpoint import bare_state_dict, load_checkpoint
from supcon.training_run import Run
from util import AverageMeter, UserError, adjust_learning_rate


def parse_option(argv=None):
    parser = argparse.ArgumentParser(
        prog='main_linear.py',
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description='Train a linear classifier on the frozen encoder of --ckpt (linear'
        ' evaluation); results go to ./save/SupCon/<dataset>_linear_models/.',
    )

    options.add_training_arguments(
        parser,
        epochs=100,
        learning_rate=0.1,
        lr_decay_epochs='60,75,90',
        lr_decay_rate=0.2,
        weight_decay=0,
    )

    # model
    parser.add_argument(
        '--model',
        type=str,
        default=None,
        help='the encoder in --ckpt: ' + ', '.join(MODEL_NAMES) + ' or a timm'
        ' name; default: what the checkpoint records (resnet50 for one that'
        ' does not say); when given it must agree',
    )
    parser.add_argument(
        '--key_encoder',
        action='store_true',
        help='evaluate the momentum (key) encoder of a --moco checkpoint instead'
        ' of the trained (query) encoder',
    )

    # other setting
    options.add_schedule_arguments(parser, sync_bn=False, trial=False)
    parser.add_argument(
        '--ckpt', type=str, default='', help='(required) the pretraining checkpoint to evaluate'
    )

    partial_labels.add_arguments(parser, linear=True)
    data.add_arguments(parser, test_folder=True, imbalance='checkpoint')
    balanced.add_arguments(parser)
    add_augmentation_arguments(parser, classifier=True, gpu_aug=False)
    finetune.add_arguments(parser)
    runtime.add_runtime_arguments(parser)
    opt = parser.parse_args(argv)

    options.check_common_options(opt)
    if opt.num_workers_val < 0:
        raise UserError(f'--num_workers_val must be 0 or more, got {opt.num_workers_val}')
    if not opt.ckpt:
        raise UserError(
            '--ckpt is required: pass the pretraining checkpoint to evaluate,'
            ' e.g. ./save/SupCon/cifar10_models/<run>/last.pth'
        )
    if opt.dataset == 'path' and opt.data_folder is None:
        raise UserError(
            '--dataset path needs --data_folder and --test_folder (one sub-folder per class'
            ' each; or --val_split instead of --test_folder) and --mean/--std'
        )
    data.resolve_defaults(opt)
    data.check_test_folder(opt)
    balanced.resolve_options(opt)
    finetune.check_options(opt)
    opt.lr_decay_epochs = options.parse_decay_epochs(opt.lr_decay_epochs)

    # the checkpoint's options say which encoder it holds (read lazily: set_model loads
    # the weights); --model, when given, must agree
    saved = load_checkpoint(opt.ckpt, mmap=True)
    opt.model, opt.stem = checkpoint_model(saved, opt.ckpt, opt.model)
    # the labelled images of a --labelled_fraction checkpoint: its fraction, chosen by its seed
    opt.labelled_fraction, opt.labelled_seed, opt.linear_labels = (
        partial_labels.resolve_linear_options(opt, saved.get('opt') or {})
    )
    # the classifier trains on the images the encoder was pretrained on: the checkpoint's long
    # tail (its ratio unless --imbalance_ratio says otherwise, drawn with its run's seed)
    if opt.imbalance_ratio is None:
        opt.imbalance_ratio = float(saved['opt'].get('imbalance_ratio') or 1.0)
    opt.imbalance_seed = saved['opt'].get('seed')
    finetune.take_from_checkpoint(opt, saved['opt'])  # --finetune: the encoder's patch size
    del saved

    opt.model_name = '{}_{}_lr_{}_decay_{}_bsz_{}'.format(
        opt.dataset, opt.model, opt.learning_rate, opt.weight_decay, opt.batch_size
    )
    # _cosine; warm-up stays opt-in here, as in the reference's linear script; our parts
    options.finish_run_name(opt, large_batch=None, stem=False)
    opt.model_name = '_'.join([opt.model_name] + finetune.run_name(opt))  # _finetune

    # one folder per evaluated checkpoint, so evaluating several never mixes them
    ckpt_path = os.path.abspath(opt.ckpt)
    pretrain_run = os.path.basename(os.path.dirname(ckpt_path))
    ckpt_name = os.path.splitext(os.path.basename(ckpt_path))[0]
    run_dir = os.path.join(pretrain_run, ckpt_name, opt.model_name)
    opt.save_folder = os.path.join('./save/SupCon/{}_linear_models'.format(opt.dataset), run_dir)
    opt.tb_folder = os.path.join('./save/SupCon/{}_linear_tensorboard'.format(opt.dataset), run_dir)
    return opt


def set_loader(opt, rt):
    return data.classification_loaders(opt, rt)


class FrozenEncoderClassifier(nn.Module):
    """Logits of ``classifier`` on the features of ``encoder``, computed without gradient.

    The encoder gets no gradient and, kept in eval mode by ``train``, never updates its
    BatchNorm statistics: linear evaluation measures the pretrained features as they are.
    """

    def __init__(self, encoder, classifier):
        super().__init__()
        self.encoder, self.classifier = encoder, classifier

    def forward(self, images):
        with torch.no_grad():
            features = self.encoder(images)
        return self.classifier(features.detach())


def set_model(opt, rt, num_classes):
    ckpt = load_checkpoint(opt.ckpt)
    encoder, _ = encoder_from_checkpoint(ckpt, opt.ckpt, opt.model, key_encoder=opt.key_encoder)
    pretrained_size = ckpt['opt'].get('size')
    del ckpt
    if is_timm_model(opt.model) and pretrained_size is not None and pretrained_size != opt.size:
        raise UserError(
            f'--size {opt.size} differs from the {pretrained_size} the {opt.model}'
            f' encoder was built for; pass --size {pretrained_size}'
        )
    # the frozen encoder: no gradients, BatchNorm statistics never updated
    encoder.requires_grad_(False)

    classifier = LinearClassifier(
        name=opt.model, num_classes=num_classes, dim_in=encoder.feature_dim
    )
    criterion = nn.CrossEntropyLoss()
    if opt.finetune:  # the encoder trains with the classifier, as one network (finetune.py)
        encoder, classifier = finetune.trainable(encoder, classifier, opt)

    encoder = runtime.prepare_model(encoder, rt, parallel='')
    classifier = runtime.prepare_model(classifier, rt, parallel='encoder' if opt.finetune else None)
    return encoder, classifier, criterion


def train(train_loader, encoder, classifier, criterion, optimizer, scaler, epoch, opt, rt, run):
    """One epoch of the classifier on frozen features (--finetune: of the whole network, the
    frozen encoder being the identity); returns (loss, acc, stopped_at)."""
    encoder.eval()
    classifier.train()
    model = FrozenEncoderClassifier(encoder, classifier)
    return engine.train_classifier(
        train_loader, model, criterion, optimizer, scaler, epoch, opt, rt, run
    )


def check_encoder_unchanged(encoder, snapshot):
    """Linear evaluation is only meaningful if the encoder stayed exactly as loaded."""
    for key, value in bare_state_dict(encoder).items():
        if not torch.equal(value.cpu(), snapshot[key]):
            raise RuntimeError(f'the frozen encoder changed during linear evaluation ({key})')


def main():
    best_acc = 0
    opt = parse_option()
    rt = runtime.setup_runtime(opt)
    run = Run(opt, rt, meters={'loss': AverageMeter(), 'acc': AverageMeter()})
    options.print_options(run.options())

    # build data loader
    train_loader, train_sampler, val_loader, num_classes = set_loader(opt, rt)

    # build model and criterion
    encoder, classifier, criterion = set_model(opt, rt, num_classes)
    # multi-label data: a sigmoid per label, measured by mean average precision (multilabel.py)
    multi_label = multilabel.is_multilabel(train_loader.dataset)
    # images per class of the training split (for the many / medium / few-shot groups)
    train_counts = (
        None if multi_label else class_accuracy.training_counts(train_loader.dataset, num_classes)
    )
    criterion = multilabel.classifier_criterion(train_loader.dataset, criterion)
    encoder_snapshot = {k: v.detach().cpu().clone() for k, v in bare_state_dict(encoder).items()}

    # build optimizer: the classifier's weight and bias, nothing else (one group for sgd;
    # two for lars, which adapts the weight and leaves the bias plain); --finetune adds the
    # encoder's at --encoder_lr
    optimizer = finetune.build_optimizer(opt, classifier)
    optimised = {id(p) for group in optimizer.param_groups for p in group['params']}
    assert optimised == {id(p) for p in classifier.parameters()}
    scaler = runtime.make_scaler(rt)

    start_epoch = run.restore(classifier, optimizer, scaler)
    best_acc = run.extra.get('best_acc', best_acc)
    val_acc = run.extra.get('val_acc')
    val_f1 = run.extra.get('val_f1')
    class_counts = run.extra.get('class_counts')  # the last epoch's (correct, total) per class
    logger = run.logger

    # evaluate without the DDP wrapper: ranks hold unequal shares of the test set
    eval_model = FrozenEncoderClassifier(encoder, runtime.unwrap(classifier))

    # training routine
    for epoch in range(start_epoch, opt.epochs + 1):
        run.begin_epoch(epoch, train_sampler)
        adjust_learning_rate(opt, optimizer, epoch)

        # train for one epoch
        time1 = time.time()
        loss, acc, stopped_at = train(
            train_loader, encoder, classifier, criterion, optimizer, scaler, epoch, opt, rt, run
        )
        if stopped_at is not None:
            run.interrupted(epoch, stopped_at)
        time2 = time.time()
        if runtime.is_main_process():
            print(
                'Train epoch {}, total time {:.2f}, accuracy:{:.2f}'.format(
                    epoch, time2 - time1, acc
                ),
                flush=True,
            )

        # eval for one epoch
        eval_model.eval()
        # multi-label: the mean average precision and F1@0.5 instead of top-1 and top-5
        val_loss, val_acc, top5_or_f1, class_counts = engine.validate(
            val_loader, eval_model, criterion, opt, rt, num_classes, per_class=True
        )
        val_f1 = top5_or_f1 if multi_label else None
        if val_acc > best_acc:
            best_acc = val_acc

        logger.log_value('train_loss', loss, epoch)
        logger.log_value('train_acc', acc, epoch)
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
            'encoder_ckpt': os.path.abspath(opt.ckpt),
            'classes': list(train_loader.dataset.classes),  # for main_predict.py, main_export.py
        }
        if class_counts is not None:
            run.extra['class_counts'] = list(class_counts)
        if multi_label:
            run.extra['val_f1'] = val_f1
        run.end_epoch(epoch)

    # the options and final metrics for TensorBoard's HPARAMS tab, once per run
    run.log_hparams(['train_loss', 'train_acc', 'val_loss', 'val_acc'])
    run.save('last.pth', opt.epochs)
    run.close()
    check_encoder_unchanged(encoder, encoder_snapshot)
    multilabel.print_results(best_acc, val_acc, val_f1, multi_label)
    if runtime.is_main_process() and class_counts is not None:  # the last epoch's, as final
        classes = train_loader.dataset.classes
        class_accuracy.report(opt.save_folder, classes, train_counts, class_counts, opt.epochs)


if __name__ == '__main__':
    runtime.run_main(main)
