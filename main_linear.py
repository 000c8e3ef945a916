"""Linear evaluation: train a linear classifier on a frozen pretrained encoder.

Same flags and defaults as the reference ``main_linear.py``; the encoder comes
from ``--ckpt`` (ours or the reference's), stays in eval mode and is checked to
be unchanged at the end. The classifier and its TensorBoard logs are saved under
``save/SupCon/{dataset}_linear_models/`` and ``..._linear_tensorboard/``. With
``--finetune`` the encoder trains with the classifier (supcon/training/finetune.py).
"""

import argparse
import os
import time

import torch
import torch.nn as nn

from networks import from_checkpoint
from networks.from_checkpoint import checkpoint_model, encoder_from_checkpoint
from networks.resnet_big import LinearClassifier
from networks.timm_backbone import is_timm_model
from supcon import capabilities, options
from supcon.data import balanced, datasets, labelling
from supcon.data.augment import add_augmentation_arguments
from supcon.evaluation import multilabel
from supcon.evaluation.classify import EpochEvaluation
from supcon.system import cli, runtime
from supcon.system.checkpoint import bare_state_dict, load_checkpoint
from supcon.training import finetune
from supcon.training.bookkeeping import Bookkeeper
from supcon.training.loop import EpochLoop, train_classifier
from util import AverageMeter, UserError, adjust_learning_rate


def parse_option(argv=None):
    parser = cli.ArgumentParser(
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
    from_checkpoint.add_checkpoint_arguments(parser, 'linear', ckpt=False)

    # other setting
    options.add_schedule_arguments(parser, sync_bn=False, trial=False)
    from_checkpoint.add_ckpt_argument(parser, 'linear')

    labelling.add_arguments(parser, linear=True)
    datasets.add_arguments(parser, test_folder=True, imbalance='checkpoint')
    balanced.add_arguments(parser)
    add_augmentation_arguments(parser, classifier=True, gpu_aug=False)
    finetune.add_arguments(parser)
    runtime.add_runtime_arguments(parser)
    opt = parser.parse_args(argv)

    options.check_common_options(opt)
    if opt.num_workers_val < 0:
        raise UserError(f'--num_workers_val must be 0 or more, got {opt.num_workers_val}')
    from_checkpoint.check_checkpoint_arguments(opt, 'linear')
    if opt.dataset == 'path' and opt.data_folder is None:
        raise UserError(
            '--dataset path needs --data_folder and --test_folder (one sub-folder per class'
            ' each; or --val_split instead of --test_folder) and --mean/--std'
        )
    datasets.resolve_defaults(opt)
    datasets.check_test_folder(opt)
    capabilities.check_options(opt, 'linear')
    opt.lr_decay_epochs = options.parse_decay_epochs(opt.lr_decay_epochs)

    # the checkpoint's options say which encoder it holds (read lazily: set_model loads
    # the weights); --model, when given, must agree
    saved = load_checkpoint(opt.ckpt, mmap=True)
    opt.model, opt.stem = checkpoint_model(saved, opt.ckpt, opt.model)
    # what the encoder was pretrained on: its labelled images, its long tail
    capabilities.take_from_checkpoint(opt, saved.get('opt') or {})
    del saved

    opt.model_name = '{}_{}_lr_{}_decay_{}_bsz_{}'.format(
        opt.dataset, opt.model, opt.learning_rate, opt.weight_decay, opt.batch_size
    )
    # _cosine; warm-up stays opt-in here, as in the reference's linear script; our parts
    options.finish_run_name(opt, 'linear', large_batch=None)

    # one folder per evaluated checkpoint, so evaluating several never mixes them
    ckpt_path = os.path.abspath(opt.ckpt)
    pretrain_run = os.path.basename(os.path.dirname(ckpt_path))
    ckpt_name = os.path.splitext(os.path.basename(ckpt_path))[0]
    run_dir = os.path.join(pretrain_run, ckpt_name, opt.model_name)
    opt.save_folder = os.path.join('./save/SupCon/{}_linear_models'.format(opt.dataset), run_dir)
    opt.tb_folder = os.path.join('./save/SupCon/{}_linear_tensorboard'.format(opt.dataset), run_dir)
    return opt


def set_loader(opt, rt):
    return datasets.classification_loaders(opt, rt)


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


def train(train_loader, encoder, classifier, criterion, optimizer, epoch, loop):
    """One epoch of the classifier on frozen features (--finetune: of the whole network, the
    frozen encoder being the identity); returns (loss, acc)."""
    encoder.eval()
    classifier.train()
    model = FrozenEncoderClassifier(encoder, classifier)
    return train_classifier(train_loader, model, criterion, optimizer, epoch, loop)


def check_encoder_unchanged(encoder, snapshot):
    """Linear evaluation is only meaningful if the encoder stayed exactly as loaded."""
    for key, value in bare_state_dict(encoder).items():
        if not torch.equal(value.cpu(), snapshot[key]):
            raise RuntimeError(f'the frozen encoder changed during linear evaluation ({key})')


def main():
    opt = parse_option()
    rt = runtime.setup_runtime(opt)
    book = Bookkeeper(
        opt, rt, meters={'loss': AverageMeter(), 'acc': AverageMeter()}, fixed=capabilities.FIXED
    )
    options.print_options(book.options())

    # build data loader
    train_loader, train_sampler, val_loader, num_classes = set_loader(opt, rt)

    # build model and criterion (multi-label data: a sigmoid per label, multilabel.py)
    encoder, classifier, criterion = set_model(opt, rt, num_classes)
    criterion = multilabel.classifier_criterion(train_loader.dataset, criterion)
    encoder_snapshot = {k: v.detach().cpu().clone() for k, v in bare_state_dict(encoder).items()}

    # build optimizer: the classifier's weight and bias, nothing else (one group for sgd;
    # two for lars, which adapts the weight and leaves the bias plain); --finetune adds the
    # encoder's at --encoder_lr
    optimizer = finetune.build_optimizer(opt, classifier)
    optimised = {id(p) for group in optimizer.param_groups for p in group['params']}
    assert optimised == {id(p) for p in classifier.parameters()}
    scaler = runtime.make_scaler(rt)

    start_epoch = book.restore(classifier, optimizer, scaler)
    book.extra['encoder_ckpt'] = os.path.abspath(opt.ckpt)
    loop = EpochLoop(opt, rt, book, optimizer, scaler)
    # evaluate without the DDP wrapper: ranks hold unequal shares of the test set
    eval_model = FrozenEncoderClassifier(encoder, runtime.unwrap(classifier))
    evaluation = EpochEvaluation(
        val_loader, criterion, opt, rt, num_classes, train_loader.dataset, book
    )

    # training routine
    for epoch in range(start_epoch, opt.epochs + 1):
        book.begin_epoch(epoch, train_sampler)
        adjust_learning_rate(opt, optimizer, epoch)

        # train for one epoch
        time1 = time.time()
        loss, acc = train(train_loader, encoder, classifier, criterion, optimizer, epoch, loop)
        time2 = time.time()
        if runtime.is_main_process():
            print(
                'Train epoch {}, total time {:.2f}, accuracy:{:.2f}'.format(
                    epoch, time2 - time1, acc
                ),
                flush=True,
            )

        # eval for one epoch, tensorboard logger
        evaluation(eval_model, epoch, loss, acc, optimizer.param_groups[0]['lr'])
        book.end_epoch(epoch)

    # the options and final metrics for TensorBoard's HPARAMS tab, once per run
    book.log_hparams(evaluation.tags())
    book.save('last.pth', opt.epochs)
    book.close()
    check_encoder_unchanged(encoder, encoder_snapshot)
    evaluation.finish()


if __name__ == '__main__':
    runtime.launch(main)
