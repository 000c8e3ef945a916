"""--optimizer sgd|lars: the SGD path is the reference's, LARS is timm's with the usual
exclusions."""

import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

pytest.importorskip('timm')
from timm.optim import Lars  # noqa: E402

import util  # noqa: E402
from supcon.training.optim import LARS_EPS, LARS_TRUST_COEFF, build_optimizer, lars_param_groups  # noqa: E402

LR, MOMENTUM, WD = 0.1, 0.9, 1e-4


def _opt(optimizer='lars', weight_decay=WD):
    return SimpleNamespace(
        optimizer=optimizer, learning_rate=LR, momentum=MOMENTUM, weight_decay=weight_decay
    )


def _model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    )


def _backward(model, seed=1):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(6, 3, 8, 8, generator=generator)
    y = torch.randint(0, 3, (6,), generator=generator)
    model.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x), y).backward()


def _steps(model, optimizer, n=2):
    for i in range(n):
        _backward(model, seed=i + 1)
        optimizer.step()


def _is_weight(name):
    return name in ('0.weight', '5.weight')  # conv kernel and linear matrix


def test_lars_equals_timm_lars_built_by_hand():
    a, b = _model(), _model()
    ours = build_optimizer(_opt(), a)
    assert isinstance(ours, Lars)
    weights = [p for n, p in b.named_parameters() if _is_weight(n)]
    others = [p for n, p in b.named_parameters() if not _is_weight(n)]
    direct = Lars(
        [
            {'params': weights, 'weight_decay': WD, 'always_adapt': True},
            {'params': others, 'weight_decay': 0.0, 'always_adapt': False},
        ],
        lr=LR,
        momentum=MOMENTUM,
        trust_coeff=1e-3,
        eps=1e-8,
        trust_clip=False,
    )
    _steps(a, ours, n=3)
    _steps(b, direct, n=3)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), name


def test_lars_groups_and_hyper_parameters():
    model = _model()
    optimizer = build_optimizer(_opt(), model)
    adapted, plain = optimizer.param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[id(p)] for p in adapted['params']) == ['0.weight', '5.weight']
    assert sorted(names[id(p)] for p in plain['params']) == [
        '0.bias',
        '1.bias',
        '1.weight',
        '5.bias',
    ]
    assert adapted['weight_decay'] == WD and adapted['always_adapt']
    assert plain['weight_decay'] == 0 and not plain['always_adapt']
    for group in optimizer.param_groups:  # the schedule sets lr on every group
        assert group['lr'] == LR and group['momentum'] == MOMENTUM
        assert group['trust_coeff'] == LARS_TRUST_COEFF and group['eps'] == LARS_EPS
        assert not group['trust_clip'] and not group['nesterov'] and group['dampening'] == 0


def test_biases_and_norms_take_plain_momentum_steps_without_weight_decay():
    a, b = _model(), _model()
    lars = build_optimizer(_opt(), a)
    sgd = torch.optim.SGD(b.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=0.0)
    generator = torch.Generator().manual_seed(5)
    for _ in range(3):  # the same gradients in both, so momentum is exercised too
        for pa, pb in zip(a.parameters(), b.parameters()):
            pa.grad = torch.randn(pa.shape, generator=generator)
            pb.grad = pa.grad.clone()
        lars.step()
        sgd.step()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        if not _is_weight(name):
            assert torch.allclose(pa, pb, rtol=0, atol=1e-7), name


def test_weights_are_adapted_by_the_trust_ratio():
    a, b = _model(), _model()
    lars = build_optimizer(_opt(), a)
    sgd = torch.optim.SGD(b.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WD)
    before = {n: p.detach().clone() for n, p in a.named_parameters()}
    _backward(a)
    grads = {n: p.grad.detach().clone() for n, p in a.named_parameters()}
    lars.step()
    _backward(b)
    sgd.step()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        if not _is_weight(name):
            continue
        assert not torch.allclose(pa, pb), name
        w, g = before[name], grads[name]
        trust = LARS_TRUST_COEFF * w.norm() / (g.norm() + WD * w.norm() + LARS_EPS)
        expected = w - LR * trust * (g + WD * w)
        assert torch.allclose(pa, expected, rtol=1e-6, atol=1e-9), name


def test_weights_are_adapted_even_without_weight_decay():
    a, b = _model(), _model()
    lars = build_optimizer(_opt(weight_decay=0.0), a)
    sgd = torch.optim.SGD(b.parameters(), lr=LR, momentum=MOMENTUM)
    _steps(a, lars, n=1)
    _steps(b, sgd, n=1)
    assert not torch.allclose(a[0].weight, b[0].weight)
    assert torch.allclose(a[0].bias, b[0].bias, rtol=0, atol=1e-7)


def test_frozen_and_no_weight_decay_parameters():
    class WithPos(nn.Module):
        def __init__(self):
            super().__init__()
            self.pos_embed = nn.Parameter(torch.zeros(1, 4, 3))
            self.proj = nn.Linear(3, 3)

        def no_weight_decay(self):
            return {'pos_embed'}

    model = nn.Sequential(WithPos(), nn.Linear(3, 2))
    model[1].requires_grad_(False)
    adapted, plain = lars_param_groups(model, WD)
    names = {id(p): n for n, p in model.named_parameters()}
    assert [names[id(p)] for p in adapted['params']] == ['0.proj.weight']
    assert sorted(names[id(p)] for p in plain['params']) == ['0.pos_embed', '0.proj.bias']


@pytest.mark.parametrize(
    'opt', [_opt('sgd'), SimpleNamespace(learning_rate=LR, momentum=MOMENTUM, weight_decay=WD)]
)
def test_sgd_is_the_reference_optimizer(opt):
    model = _model()
    ours = build_optimizer(opt, model)
    reference = util.set_optimizer(opt, model)
    assert type(ours) is type(reference) is torch.optim.SGD
    assert len(ours.param_groups) == len(reference.param_groups) == 1
    for g1, g2 in zip(ours.param_groups, reference.param_groups):
        assert [id(p) for p in g1['params']] == [id(p) for p in g2['params']]
        assert {k: v for k, v in g1.items() if k != 'params'} == {
            k: v for k, v in g2.items() if k != 'params'
        }
    assert ours.defaults == reference.defaults


def test_sgd_steps_like_the_reference():
    a, b = _model(), copy.deepcopy(_model())
    _steps(a, build_optimizer(_opt('sgd'), a))
    _steps(b, util.set_optimizer(_opt('sgd'), b))
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_unknown_optimizer_is_a_user_error():
    with pytest.raises(util.UserError, match='adam'):
        build_optimizer(_opt('adam'), _model())
