"""Tests for networks/from_checkpoint.py: rebuilding encoders and heads from checkpoints."""

import argparse

import pytest
import torch

from networks import from_checkpoint
from networks.resnet_big import SupCEResNet, SupConResNet
from supcon.system import checkpoint
from util import UserError

# --------------------------------------------------------------------------- checkpoints


def test_checkpoint_helpers_read_reference_and_ce_checkpoints(tmp_path):
    torch.manual_seed(0)
    model = SupConResNet('resnet18', head='linear', feat_dim=8)
    # the reference's layout: a Namespace opt and DataParallel's "encoder.module." keys
    state = {k.replace('encoder.', 'encoder.module.'): v for k, v in model.state_dict().items()}
    path = str(tmp_path / 'ref.pth')
    torch.save(
        {'model': state, 'opt': argparse.Namespace(model='resnet18', method='SimCLR'), 'epoch': 7},
        path,
    )
    ckpt = checkpoint.load_checkpoint(path)
    encoder, name = from_checkpoint.encoder_from_checkpoint(ckpt, path)
    assert name == 'resnet18' and not encoder.training
    torch.testing.assert_close(encoder.conv1.weight, model.encoder.conv1.weight)
    head = from_checkpoint.head_from_checkpoint(ckpt, path, name, encoder.feature_dim)
    torch.testing.assert_close(head.weight, model.head.weight)
    assert from_checkpoint.checkpoint_method(ckpt) == 'SimCLR'
    with pytest.raises(UserError, match='pass --model resnet18'):
        from_checkpoint.encoder_from_checkpoint(ckpt, path, 'resnet50')

    ce = {'model': SupCEResNet('resnet18', num_classes=3).state_dict(), 'opt': {}, 'epoch': 1}
    assert from_checkpoint.checkpoint_method(ce) == 'SupCE'
    with pytest.raises(UserError, match='cross-entropy .* use --features encoder'):
        from_checkpoint.head_from_checkpoint(ce, 'ce.pth', 'resnet18', 512)
