"""main_linear.py --finetune: two learning rates through the schedule, one SGD step against the
plain formula, an end-to-end run whose checkpoint every reader takes, and its refusals. Kill and
resume: tests/test_resume.py's ``main_linear+finetune`` variant."""

import argparse
import copy
import json
import re

import pytest
import torch
import torch.nn as nn
from helpers import folder_args, write_image_folder
from inprocess import assert_one_line_error, call, save_folder

import util
from networks.resnet_big import LinearClassifier, resnet18
from supcon.system import checkpoint
from supcon.training import finetune


def options(**changes):
    values = dict(
        finetune=True, learning_rate=0.1, encoder_lr=0.02, model='resnet18', optimizer='sgd',
        momentum=0.9, weight_decay=0.0, cosine=True, lr_decay_rate=0.2, epochs=10,
        lr_decay_epochs=[6, 8], warm=False,
    )  # fmt: skip
    values.update(changes)
    return argparse.Namespace(**values)


def network(opt, seed=0):
    torch.manual_seed(seed)
    encoder = resnet18()
    encoder.feature_dim = 512
    _, net = finetune.trainable(encoder, LinearClassifier('resnet18', num_classes=3), opt)
    return net


@pytest.mark.parametrize('optimizer', ['sgd', 'lars'])
def test_the_encoder_follows_the_schedule_at_its_own_rate(optimizer):
    opt = options(optimizer=optimizer)
    net = network(opt)
    sgd = finetune.build_optimizer(opt, net)
    encoder = {id(p) for p in net.encoder.parameters()}
    fc = {id(p) for p in net.fc.parameters()}
    groups = [({id(p) for p in g['params']}, g) for g in sgd.param_groups]
    # the classifier first (the logged rate), then the encoder, everything exactly once
    assert set().union(*(ids for ids, _ in groups)) == encoder | fc
    assert sum(len(ids) for ids, _ in groups) == len(encoder | fc)
    first_encoder = next(i for i, (ids, _) in enumerate(groups) if ids <= encoder)
    assert all(ids <= fc for ids, _ in groups[:first_encoder])
    assert all(ids <= encoder for ids, _ in groups[first_encoder:])
    for epoch in (1, 4, 10):
        util.adjust_learning_rate(opt, sgd, epoch)
        lr = (
            0.1 * 0.2**3
            + (0.1 - 0.1 * 0.2**3) * (1 + torch.cos(torch.tensor(epoch / 10 * torch.pi))) / 2
        )
        for ids, group in groups:
            want = lr.item() * (0.2 if ids <= encoder else 1.0)
            assert group['lr'] == pytest.approx(want, rel=1e-6)
    warm = options(optimizer=optimizer, warm=True, warmup_from=0.01, warmup_to=0.05, warm_epochs=2)
    util.warmup_learning_rate(warm, 1, 3, 10, sgd)  # 3 of the 20 warm-up steps done
    for ids, group in groups:
        want = (0.01 + 0.15 * 0.04) * (0.2 if ids <= encoder else 1.0)
        assert group['lr'] == pytest.approx(want, rel=1e-9)


def test_one_step_moves_each_part_by_its_rate_times_its_gradient():
    """Momentum SGD's first step is w - lr * g (no weight decay): lr 0.1 for the classifier,
    0.02 for the encoder, BatchNorm in training mode."""
    opt = options(cosine=False)
    net = network(opt).train()
    before = copy.deepcopy(net)
    initial_mean = net.encoder.bn1.running_mean.clone()
    images, labels = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 1])
    loss = nn.functional.cross_entropy(before(images), labels)
    grads = dict(
        zip(
            [n for n, _ in before.named_parameters()],
            torch.autograd.grad(loss, list(before.parameters())),
        )
    )
    sgd = finetune.build_optimizer(opt, net)
    util.adjust_learning_rate(opt, sgd, 1)
    sgd.zero_grad()
    nn.functional.cross_entropy(net(images), labels).backward()
    sgd.step()
    old = dict(before.named_parameters())
    for name, param in net.named_parameters():
        lr = 0.1 if name.startswith('fc.') else 0.02
        torch.testing.assert_close(param.detach(), old[name].detach() - lr * grads[name])
    # training mode: the BatchNorm statistics moved towards the batch's
    assert not torch.equal(net.encoder.bn1.running_mean, initial_mean)


@pytest.fixture(scope='module')
def finetuned(tmp_path_factory, digits_checkpoints):
    """One --finetune epoch on a 2-class image folder, from the shared encoder checkpoint."""
    root = tmp_path_factory.mktemp('finetune')
    write_image_folder(root / 'train', {'cat': 8, 'dog': 8}, size=8, seed=0)
    write_image_folder(root / 'test', {'cat': 3, 'dog': 4}, size=8, seed=1)
    encoder = digits_checkpoints['encoder']
    args = folder_args(root, ckpt=encoder, finetune=True, encoder_lr=0.02, learning_rate=0.05)
    result = call('main_linear', args, root)
    assert result.code == 0, result.err
    final = re.findall(r'^final accuracy: ([\d.]+)$', result.out, re.M)
    return root, args, save_folder('main_linear', args, root) / 'last.pth', encoder, final[0]


def test_the_checkpoint_holds_the_trained_encoder_in_main_ces_layout(finetuned):
    root, args, last, encoder, _ = finetuned
    assert last.parent.name.endswith('_bsz_4_finetune_elr0.02')
    saved = checkpoint.load_checkpoint(str(last))
    pretrained = checkpoint.load_checkpoint(str(encoder))['model']
    keys = {k for k in saved['model'] if not k.startswith('fc.')}
    assert keys == {k for k in pretrained if k.startswith('encoder.')}
    assert sorted(k for k in saved['model'] if k.startswith('fc.')) == ['fc.bias', 'fc.weight']
    assert not torch.equal(
        saved['model']['encoder.conv1.weight'], pretrained['encoder.conv1.weight']
    )
    # BatchNorm trained in training mode: its running statistics moved
    assert not torch.equal(
        saved['model']['encoder.bn1.running_mean'], pretrained['encoder.bn1.running_mean']
    )
    assert saved['opt']['finetune'] is True and saved['extra']['classes'] == ['cat', 'dog']
    assert [g['lr'] for g in saved['optimizer']['param_groups']][:2] == pytest.approx([0.05, 0.02])


@pytest.mark.slow
def test_every_reader_takes_a_finetuned_checkpoint(finetuned, tmp_path):
    root, _, last, _, final = finetuned
    result = call('main_predict', ['--ckpt', last, '--split', 'test', '--out', 'p.csv'], tmp_path)
    assert result.code == 0, result.err
    assert f'accuracy: {final} (' in result.out and '(finetune)' in result.out
    result = call(
        'main_export', ['--ckpt', last, '--format', 'torchscript', '--out', 'm.pt'], tmp_path
    )
    assert result.code == 0, result.err
    data = ['--dataset', 'path', '--data_folder', root / 'train', '--test_folder', root / 'test']
    data += ['--mean', '(0.5,0.5,0.5)', '--std', '(0.25,0.25,0.25)', '--size', '8']
    result = call(
        'main_retrieval', ['--ckpt', last, '--num_workers', '0', '--out', 'r.json', *data], tmp_path
    )
    assert result.code == 0, result.err
    assert 'precision_at_1:' in result.out
    assert json.loads((tmp_path / 'r.json').read_text())['method'] == 'finetune'
    result = call('main_tsne', ['--ckpt', last, '--num_workers', '0', '--out', 't.png'], tmp_path)
    assert result.code == 0, result.err
    assert (tmp_path / 't.png').stat().st_size > 0


def test_refusals_are_one_line(finetuned, tmp_path):
    root, args, last, encoder, _ = finetuned
    plain = folder_args(root, ckpt=encoder, learning_rate=0.05)
    assert_one_line_error(
        call('main_linear', plain + ['--encoder_lr', '0.1'], tmp_path), 'add --finetune'
    )
    assert_one_line_error(
        call('main_linear', args + ['--encoder_lr', '0'], tmp_path), '--encoder_lr must be'
    )
    changed = args + ['--encoder_lr', '0.03', '--resume', last]
    assert_one_line_error(
        call('main_linear', changed, tmp_path), '--encoder_lr 0.03 differs', '0.02'
    )
    without = folder_args(root, ckpt=encoder, learning_rate=0.05) + ['--resume', last]
    assert_one_line_error(call('main_linear', without, tmp_path), 'trained with --finetune')
    assert not list(tmp_path.rglob('*.pth'))


@pytest.mark.slow
def test_a_vit_with_its_own_patch_size_is_fine_tuned_and_read_back(finetuned, tmp_path):
    """The encoder's --patch_size is the run's (its name says so), so the fine-tuned
    checkpoint rebuilds the same ViT wherever it is read."""
    from networks.encoders import build_encoder
    from networks.resnet_big import SupConResNet

    root = finetuned[0]
    torch.manual_seed(0)
    name = 'vit_tiny_patch16_224'
    net = SupConResNet(name, encoder=build_encoder(name, size=8, patch_size=4))
    encoder = tmp_path / 'vit' / 'last.pth'
    encoder.parent.mkdir()
    opt = {'model': name, 'size': 8, 'patch_size': 4, 'dataset': 'path', 'method': 'SupCon'}
    torch.save({'model': net.state_dict(), 'opt': opt, 'epoch': 1}, encoder)
    args = folder_args(root, ckpt=encoder, finetune=True)
    result = call('main_linear', args, tmp_path)
    assert result.code == 0, result.err
    last = save_folder('main_linear', args, tmp_path) / 'last.pth'
    assert last.parent.name.endswith('_bsz_4_patch_4_finetune')
    final = re.findall(r'^final accuracy: ([\d.]+)$', result.out, re.M)[0]
    result = call('main_predict', ['--ckpt', last, '--split', 'test', '--out', 'v.csv'], tmp_path)
    assert result.code == 0, result.err
    assert f'accuracy: {final} (' in result.out
