"""ResNet encoders and the heads SupContrast puts on them.

Module names and nesting follow the reference SupContrast `networks/resnet_big.py` exactly, so
state dicts written by the reference code load here without renaming (and vice versa).
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

STEMS = ('cifar', 'imagenet')


def shortcut(in_planes, out_planes, stride):
    """The residual branch's projection: a strided 1x1 conv + BN when the shape changes.

    An empty Sequential (rather than None or Identity) keeps the reference's module tree,
    and it contributes no state-dict keys when the shapes already match.
    """
    if stride == 1 and in_planes == out_planes:
        return nn.Sequential()
    return nn.Sequential(
        nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False),
        nn.BatchNorm2d(out_planes),
    )


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes, planes, stride=1, is_last=False):
        super().__init__()
        self.is_last = is_last
        self.conv1 = nn.Conv2d(
            in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False
        )
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)

        self.shortcut = shortcut(in_planes, self.expansion * planes, stride)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.shortcut(x)
        preact = out
        out = F.relu(out)
        # The reference lets a final block also expose its pre-activation; kept for parity.
        if self.is_last:
            return out, preact
        return out


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_planes, planes, stride=1, is_last=False):
        super().__init__()
        self.is_last = is_last
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, self.expansion * planes, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(self.expansion * planes)

        self.shortcut = shortcut(in_planes, self.expansion * planes, stride)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += self.shortcut(x)
        preact = out
        out = F.relu(out)
        if self.is_last:
            return out, preact
        return out


class ResNet(nn.Module):
    """ResNet trunk that returns flattened, globally pooled features (no classifier).

    stem='cifar' is the reference's: a 3x3 stride-1 conv and no max-pool, which keeps full
    resolution for 32x32 images. stem='imagenet' is torchvision's 7x7 stride-2 conv plus a stride-2
    max-pool, which cuts every later activation by 16x in area and is what large inputs (e.g.
    300x300) need.
    Both stems name their conv `conv1`, so state-dict keys are identical; only conv1's kernel
    differs.
    """

    def __init__(self, block, num_blocks, in_channel=3, zero_init_residual=False, stem='cifar'):
        super().__init__()
        if stem not in STEMS:
            raise ValueError(f"unknown stem {stem!r}; expected one of {', '.join(STEMS)}")
        self.stem = stem
        self.in_planes = 64

        if stem == 'cifar':
            self.conv1 = nn.Conv2d(in_channel, 64, kernel_size=3, stride=1, padding=1, bias=False)
            # Identity keeps forward() branch-free; it has no parameters, so no extra keys.
            self.maxpool = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(in_channel, 64, kernel_size=7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(64)
        self.layer1 = self._make_layer(block, 64, num_blocks[0], stride=1)
        self.layer2 = self._make_layer(block, 128, num_blocks[1], stride=2)
        self.layer3 = self._make_layer(block, 256, num_blocks[2], stride=2)
        self.layer4 = self._make_layer(block, 512, num_blocks[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

        # Zeroing each block's last BN makes every residual branch start as the identity,
        # which helps very deep nets early in training (Goyal et al., 2017).
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.constant_(m.bn3.weight, 0)
                elif isinstance(m, BasicBlock):
                    nn.init.constant_(m.bn2.weight, 0)

    def _make_layer(self, block, planes, num_blocks, stride):
        # Only the first block of a stage downsamples; the rest keep resolution.
        strides = [stride] + [1] * (num_blocks - 1)
        layers = []
        for block_stride in strides:
            layers.append(block(self.in_planes, planes, block_stride))
            self.in_planes = planes * block.expansion
        return nn.Sequential(*layers)

    def forward(self, x, layer=100):
        # ``layer`` is the reference's signature (its value is never used there either)
        out = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        out = self.layer1(out)
        out = self.layer2(out)
        out = self.layer3(out)
        out = self.layer4(out)
        out = self.avgpool(out)
        return torch.flatten(out, 1)


def resnet18(**kwargs):
    return ResNet(BasicBlock, [2, 2, 2, 2], **kwargs)


def resnet34(**kwargs):
    return ResNet(BasicBlock, [3, 4, 6, 3], **kwargs)


def resnet50(**kwargs):
    return ResNet(Bottleneck, [3, 4, 6, 3], **kwargs)


def resnet101(**kwargs):
    return ResNet(Bottleneck, [3, 4, 23, 3], **kwargs)


# name -> [constructor, pooled feature dimension], as in the reference.
model_dict = {
    'resnet18': [resnet18, 512],
    'resnet34': [resnet34, 512],
    'resnet50': [resnet50, 2048],
    'resnet101': [resnet101, 2048],
}

MODEL_NAMES = tuple(model_dict)


def _lookup(name):
    try:
        return model_dict[name]
    except KeyError:
        raise ValueError(
            f"unknown model {name!r}; expected one of {', '.join(MODEL_NAMES)}"
        ) from None


def feature_dim(name):
    """Width of the pooled features the encoder `name` returns."""
    return _lookup(name)[1]


def _encoder(name, stem, encoder):
    """The ResNet ``name`` and its width, or the given ``(module, width)`` of another backbone."""
    if encoder is not None:
        return encoder
    model_fun, dim_in = _lookup(name)
    return model_fun(stem=stem), dim_in


class SupConResNet(nn.Module):
    """Encoder plus projection head; returns unit-norm embeddings for the contrastive loss.

    ``encoder=(module, width)`` puts another backbone (a timm model, ``networks.encoders``)
    in place of the ResNet ``name``; the module names stay ``encoder`` and ``head``.
    """

    def __init__(self, name='resnet50', head='mlp', feat_dim=128, stem='cifar', encoder=None):
        super().__init__()
        self.encoder, dim_in = _encoder(name, stem, encoder)
        self.feat_dim = feat_dim  # the width of the L2-normalised projections
        if head == 'linear':
            self.head = nn.Linear(dim_in, feat_dim)
        elif head == 'mlp':
            self.head = nn.Sequential(
                nn.Linear(dim_in, dim_in),
                nn.ReLU(inplace=True),
                nn.Linear(dim_in, feat_dim),
            )
        else:
            raise ValueError(f"unknown head {head!r}; expected 'mlp' or 'linear'")

    def forward(self, x, with_features=False):
        feat = self.encoder(x)
        # Normalising here puts every embedding on the unit sphere, so the loss's dot
        # products are cosine similarities and the temperature alone sets their scale.
        out = F.normalize(self.head(feat), dim=1)
        # with_features: the encoder's output too, for classifiers on it
        # (supcon/objectives/probe.py),
        # so a training step needs no second forward pass
        return (out, feat) if with_features else out


class SupCEResNet(nn.Module):
    """Encoder plus a linear classifier, trained end to end with cross-entropy (the baseline)."""

    def __init__(self, name='resnet50', num_classes=10, stem='cifar', encoder=None):
        super().__init__()
        self.encoder, dim_in = _encoder(name, stem, encoder)
        self.fc = nn.Linear(dim_in, num_classes)

    def forward(self, x):
        return self.fc(self.encoder(x))


class LinearBatchNorm(nn.Module):
    """BatchNorm over a [N, dim] batch done by BatchNorm2d on [N, dim, 1, 1], as the reference
    has it (so that SyncBatchNorm's conversion, which handles 2-d BatchNorm, applies to it too)."""

    def __init__(self, dim, affine=True):
        super().__init__()
        self.dim = dim
        self.bn = nn.BatchNorm2d(dim, affine=affine)

    def forward(self, x):
        return self.bn(x.view(-1, self.dim, 1, 1)).view(-1, self.dim)


class LinearClassifier(nn.Module):
    """Linear probe trained on top of a frozen encoder's features."""

    def __init__(self, name='resnet50', num_classes=10, dim_in=None):
        super().__init__()
        # dim_in: the feature width of a backbone other than the ResNet ``name``
        feat_dim = dim_in if dim_in is not None else _lookup(name)[1]
        self.fc = nn.Linear(feat_dim, num_classes)

    def forward(self, features):
        return self.fc(features)
