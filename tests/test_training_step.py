"""supcon/objectives/step.py and docs/training-step.md: the step's parts compose into the loss and
gradient of a plain SupCon step, the docs' worked example adds its term's gradient and nothing
else, and the docs show main_supcon.train() as it is."""

import argparse
import inspect
import re
import types
from pathlib import Path

import torch
import torch.nn.functional as F

import main_supcon
from losses import SupConLoss
from networks.resnet_big import SupConResNet
from supcon.objectives.step import TrainingStep
from supcon.system import runtime
from util import AverageMeter

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / 'docs' / 'training-step.md'


class TinyEncoder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 6, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(6)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x))).mean((2, 3))


def tiny_step(cls=TrainingStep, method='SupCon'):
    torch.manual_seed(0)
    model = SupConResNet(encoder=(TinyEncoder(), 6), feat_dim=4)
    opt = argparse.Namespace(method=method)
    rt = runtime.Runtime(device=torch.device('cpu'))
    train_set = argparse.Namespace(classes=['a', 'b', 'c'], targets=[0, 1, 2])
    meters = {name: AverageMeter() for name in ('positives_per_anchor', 'anchors_without_positive')}
    return cls(opt, rt, model, SupConLoss(temperature=0.1), train_set, meters), model


def batch_of(step, seed=1):
    generator = torch.Generator().manual_seed(seed)
    views = [torch.randn(8, 3, 6, 6, generator=generator) for _ in range(2)]
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 0])
    loop = types.SimpleNamespace(epoch=1, step=0, steps=1, log_views=lambda *a, **k: None)
    return step.views(views, labels, loop), views, labels


def gradients_of_step(step, model):
    batch, _, _ = batch_of(step)
    model.zero_grad(set_to_none=True)
    out = step.forward(model, batch)
    loss = step.loss(out, batch)
    step.backward(loss, out)
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_the_steps_parts_give_the_plain_supcon_loss_and_gradient():
    step, model = tiny_step()
    loss, grads = gradients_of_step(step, model)
    _, views, labels = batch_of(step)
    model.zero_grad(set_to_none=True)
    features = model(torch.cat(views))  # the reference's step, written out
    f1, f2 = torch.split(features, [8, 8])
    expected = SupConLoss(temperature=0.1)(torch.stack([f1, f2], dim=1), labels)
    expected.backward()
    assert torch.allclose(loss, expected.detach(), atol=1e-6)
    for name, p in model.named_parameters():
        assert torch.allclose(grads[name], p.grad, atol=1e-6), name


def test_simclr_reads_no_labels():
    step, model = tiny_step(method='SimCLR')
    loss, _ = gradients_of_step(step, model)
    _, views, labels = batch_of(step)
    features = model(torch.cat(views))
    f1, f2 = torch.split(features, [8, 8])
    expected = SupConLoss(temperature=0.1)(torch.stack([f1, f2], dim=1))
    assert torch.allclose(loss, expected.detach(), atol=1e-6)


def documented(pattern):
    blocks = re.findall(r'```python\n(.*?)```', DOC.read_text(), re.S)
    return next(block for block in blocks if re.search(pattern, block))


def test_the_docs_worked_example_adds_its_terms_gradient():
    namespace = {}
    exec(documented(r'class WithFeatureNormPenalty'), namespace)  # the docs' own code
    cls = namespace['WithFeatureNormPenalty']
    step, model = tiny_step(cls)
    loss, grads = gradients_of_step(step, model)
    plain_step, plain_model = tiny_step()
    plain_loss, plain_grads = gradients_of_step(plain_step, plain_model)

    # the penalty's gradient, computed on its own from the same forward pass
    _, views, _ = batch_of(step)
    model.zero_grad(set_to_none=True)
    _, encoded = model(torch.cat(views), with_features=True)
    penalty = encoded.pow(2).sum(dim=1).mean()
    (cls.weight * penalty).backward()
    assert torch.allclose(loss, plain_loss + cls.weight * penalty.detach(), atol=1e-6)
    changed = 0
    for name, p in model.named_parameters():
        term = p.grad if p.grad is not None else torch.zeros_like(grads[name])
        assert torch.allclose(grads[name], plain_grads[name] + term, atol=1e-6), name
        changed += int(term.abs().max() > 0)
    assert changed > 0  # the term reaches the encoder


def test_the_docs_show_main_supcon_train_as_it_is():
    source = inspect.getsource(main_supcon.train)
    body = re.sub(r'    """.*?"""\n', '', source, count=1, flags=re.S)
    assert documented(r'def train\(').strip() == body.strip()


def test_train_takes_at_most_six_parameters():
    assert len(inspect.signature(main_supcon.train).parameters) <= 6
