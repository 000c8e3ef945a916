"""Tests for util.py: the reference API (schedule, warm-up steps, meters, accuracy)."""

import argparse

import pytest
import torch
import torch.nn as nn

import util
from supcon import options


def schedule(**overrides):
    opt = dict(
        learning_rate=0.5,
        cosine=True,
        lr_decay_rate=0.1,
        epochs=10,
        lr_decay_epochs=[3, 6],
        batch_size=32,
        warm=False,
        model_name='run',
    )
    opt.update(overrides)
    return argparse.Namespace(**opt)


def sgd(lr=0.777, groups=1):
    params = [nn.Parameter(torch.zeros(1)) for _ in range(groups)]
    return torch.optim.SGD([{'params': [p]} for p in params], lr=lr)


# --------------------------------------------------------------------------- schedule


def test_cosine_schedule_goes_from_lr_to_lr_times_rate_cubed():
    opt = schedule()
    assert util.learning_rate_at(opt, 0) == pytest.approx(0.5)
    # eta_min = 0.5 * 0.1 ** 3 = 5e-4; 5e-4 + (0.5 - 5e-4) * (1 + cos(pi * 3 / 10)) / 2
    assert util.learning_rate_at(opt, 3) == pytest.approx(0.39704936676004515)
    # 5e-4 + (0.5 - 5e-4) * (1 + cos(pi / 2)) / 2 = 5e-4 + 0.4995 / 2
    assert util.learning_rate_at(opt, 5) == pytest.approx(0.25025)
    # the last epoch reaches eta_min = 0.5 * 0.1 ** 3
    assert util.learning_rate_at(opt, 10) == pytest.approx(5e-4)


def test_step_schedule_decays_after_each_listed_epoch():
    opt = schedule(cosine=False, learning_rate=0.1)
    # epoch > 3 decays once (0.1 * 0.1), epoch > 6 twice (0.1 * 0.1 ** 2)
    expected = {1: 0.1, 3: 0.1, 4: 0.01, 6: 0.01, 7: 0.001, 100: 0.001}
    for epoch, lr in expected.items():
        assert util.learning_rate_at(opt, epoch) == pytest.approx(lr), epoch


def test_adjust_learning_rate_sets_every_param_group():
    optimizer = sgd(groups=2)
    util.adjust_learning_rate(schedule(cosine=False, learning_rate=0.1), optimizer, 4)
    assert [g['lr'] for g in optimizer.param_groups] == pytest.approx([0.01, 0.01])


def test_warmup_learning_rate_is_linear_over_warm_epochs():
    opt = schedule(batch_size=512, epochs=20)
    options.configure_warmup(opt)
    # cosine with 20 epochs: 5e-4 + (0.5 - 5e-4) * (1 + cos(pi * 10 / 20)) / 2
    assert opt.warmup_to == pytest.approx(0.25025)
    optimizer = sgd()
    cases = [
        (1, 0, 0.01),  # p = 0 / (10 * 4)
        (1, 2, 0.01 + 2 / 40 * (0.25025 - 0.01)),  # p = (2 + 0 * 4) / (10 * 4)
        (3, 1, 0.01 + 9 / 40 * (0.25025 - 0.01)),  # p = (1 + 2 * 4) / (10 * 4)
        (10, 3, 0.01 + 39 / 40 * (0.25025 - 0.01)),  # last warm-up step
    ]
    for epoch, batch, lr in cases:
        util.warmup_learning_rate(opt, epoch, batch, 4, optimizer)
        assert optimizer.param_groups[0]['lr'] == pytest.approx(lr), (epoch, batch)
    util.set_lr(optimizer, 0.777)
    util.warmup_learning_rate(opt, 11, 0, 4, optimizer)  # past the warm-up: untouched
    assert optimizer.param_groups[0]['lr'] == 0.777


def test_warmup_learning_rate_does_nothing_without_warm():
    optimizer = sgd()
    util.warmup_learning_rate(schedule(), 1, 0, 4, optimizer)
    assert optimizer.param_groups[0]['lr'] == 0.777


# --------------------------------------------------------------------------- meters


def test_average_meter_weights_by_count_and_round_trips():
    meter = util.AverageMeter()
    meter.update(2.0, n=3)
    meter.update(4.0)
    # (2 * 3 + 4 * 1) / 4
    assert (meter.val, meter.sum, meter.count, meter.avg) == (4.0, 10.0, 4, 2.5)
    other = util.AverageMeter()
    other.load_state_dict(meter.state_dict())
    assert (other.sum, other.count, other.avg) == (10.0, 4, 2.5)
    meter.reset()
    assert (meter.val, meter.sum, meter.count, meter.avg) == (0.0, 0.0, 0, 0.0)


def test_correct_counts_and_accuracy():
    output = torch.tensor(
        [
            [0.1, 0.9, 0.0, 0.2, 0.3, 0.4],  # order: 1, 5, 4, 3, 0, 2
            [0.8, 0.1, 0.0, 0.0, 0.0, 0.05],  # order: 0, 1, 5, then 2-4
            [0.0, 0.1, 0.2, 0.3, 0.4, 0.5],  # order: 5, 4, 3, 2, 1, 0
            [0.5, 0.4, 0.3, 0.2, 0.1, 0.0],
        ]
    )  # order: 0, 1, 2, 3, 4, 5
    target = torch.tensor([1, 5, 0, 5])
    # top-1 hits: sample 0 only; top-5 hits: sample 0 and sample 1 (class 5 ranks 3rd);
    # samples 2 and 3 have their class ranked 6th of 6, a miss either way
    top1, top5 = util.correct_counts(output, target, topk=(1, 5))
    assert (top1.item(), top5.item()) == (1.0, 2.0)
    acc1, acc5 = util.accuracy(output, target, topk=(1, 5))
    assert (acc1.item(), acc5.item()) == (25.0, 50.0)  # 100 * 1 / 4, 100 * 2 / 4


def test_top_k_above_the_class_count_counts_every_sample():
    output = torch.tensor([[0.2, 0.5, 0.3], [0.9, 0.0, 0.1]])
    top1, top5 = util.correct_counts(output, torch.tensor([2, 0]), topk=(1, 5))
    assert (top1.item(), top5.item()) == (1.0, 2.0)  # with 3 classes top-5 holds all of them


def test_save_model_writes_the_references_format(tmp_path, capsys):
    """Users' scripts call util.save_model as the reference's: opt kept as a Namespace, loadable
    with weights_only=True once Namespace is allowed, and '==> Saving...' printed."""
    model = nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt = argparse.Namespace(model='resnet18', learning_rate=0.1)
    path = tmp_path / 'ckpt_epoch_5.pth'
    util.save_model(model, optimizer, opt, 5, str(path))
    assert capsys.readouterr().out == '==> Saving...\n'
    with torch.serialization.safe_globals([argparse.Namespace]):
        saved = torch.load(path, weights_only=True)
    assert set(saved) == {'opt', 'model', 'optimizer', 'epoch'} and saved['epoch'] == 5
    assert isinstance(saved['opt'], argparse.Namespace) and saved['opt'].model == 'resnet18'
    assert torch.equal(saved['model']['weight'], model.weight)
    assert saved['optimizer']['param_groups'][0]['momentum'] == 0.9
    assert [p.name for p in tmp_path.iterdir()] == ['ckpt_epoch_5.pth']  # no temporary left


def test_two_crop_transform_makes_two_independent_views():
    transform = util.TwoCropTransform(lambda x: x + torch.rand(1))
    first, second = transform(torch.zeros(1))
    assert first.shape == second.shape == (1,) and not torch.equal(first, second)
