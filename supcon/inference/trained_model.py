"""A trained model as a user runs it: a checkpoint's encoder and classifier, its class names,
and how it reads an image (the size, mean and std it was trained with).

main_predict.py and main_export.py read four kinds of checkpoint:

- ``linear``: main_linear.py's, a classifier (``fc.*``) on a frozen encoder that lives in the
  pretraining checkpoint it records (``extra['encoder_ckpt']``; ``--encoder`` points elsewhere);
- ``finetune``: main_linear.py --finetune's, encoder and classifier trained together, both saved
  (``encoder.*`` and ``fc.*``, the layout of main_ce.py's);
- ``ce``: main_ce.py's, ``encoder.*`` and ``fc.*``;
- ``encoder``: main_supcon.py's (or the reference's), ``encoder.*`` and no classifier.

Preprocessing is never the user's to repeat: the test transform (``Resize((size, size))``,
``ToTensor``, ``Normalize(mean, std)``) of the options the classifier (or the encoder) was
trained with.
"""

import os
from dataclasses import dataclass, field

import torch.nn as nn

from networks.from_checkpoint import encoder_from_checkpoint
from supcon.data.augment import test_transform
from supcon.data.normalization import resolve_mean_std
from supcon.errors import UserError
from supcon.system.checkpoint import load_checkpoint

KINDS = ('linear', 'finetune', 'ce', 'encoder')
# what each kind is, in the words of the error messages
WRITERS = {
    'linear': 'a main_linear.py classifier',
    'finetune': 'a main_linear.py --finetune classifier',
    'ce': 'a main_ce.py classifier',
    'encoder': 'an encoder checkpoint (main_supcon.py)',
}


@dataclass
class TrainedModel:
    """The networks of a checkpoint, in eval mode, and what they expect and return.

    ``encoder`` maps normalised images ``[N, 3, size, size]`` to features ``[N, D]``;
    ``classifier`` (None for an encoder checkpoint) maps features to logits ``[N, C]``, read
    through a softmax, or a sigmoid per class when ``multi_label``.
    """

    kind: str
    path: str
    encoder: nn.Module
    classifier: nn.Linear | None
    model: str
    stem: str
    size: int
    mean: tuple
    std: tuple
    classes: list | None
    multi_label: bool = False
    encoder_path: str = ''
    options: dict = field(default_factory=dict)  # the checkpoint's recorded options
    # the options of the checkpoint the encoder came from (its timm build: size, patch_size)
    encoder_options: dict = field(default_factory=dict)

    @property
    def feature_dim(self) -> int:
        return self.encoder.feature_dim

    def transform(self):
        """The evaluation transform of the checkpoint: resize, to [0, 1], normalise."""
        return test_transform(self.size, self.mean, self.std)

    def to(self, device):
        self.encoder.to(device)
        if self.classifier is not None:
            self.classifier.to(device)
        return self

    def logits(self, images):
        """Logits of normalised images (features when there is no classifier)."""
        features = self.encoder(images)
        return features if self.classifier is None else self.classifier(features)


def checkpoint_kind(ckpt) -> str | None:
    """One of KINDS, from the weights a checkpoint holds; None for none of them."""
    keys = ckpt['model']
    has_fc = any(k.startswith('fc.') for k in keys)
    has_encoder = any(k.startswith('encoder.') for k in keys)
    if has_fc and has_encoder:
        return 'finetune' if ckpt['opt'].get('finetune') else 'ce'
    if has_fc:
        return 'linear'
    return 'encoder' if has_encoder else None


def load_trained_model(
    path: str, encoder: str | None = None, need_classifier: bool = True
) -> TrainedModel:
    """The networks of the checkpoint ``path`` (--ckpt), and how they read images.

    ``encoder`` (--encoder) replaces the encoder checkpoint a ``linear`` one records.
    ``need_classifier``: refuse an encoder checkpoint (one line naming what to pass).
    """
    ckpt = load_checkpoint(path)
    kind = checkpoint_kind(ckpt)
    if kind is None:
        raise UserError(
            f'--ckpt {path} holds neither a classifier ("fc." weights) nor an encoder'
            f' ("encoder." weights); pass a checkpoint of main_linear.py, main_ce.py or'
            f' main_supcon.py'
        )
    if kind == 'encoder' and need_classifier:
        raise UserError(
            f'--ckpt {path} is {WRITERS[kind]}, with no classifier: add --knn to classify'
            f' by its nearest labelled neighbours, or pass the main_linear.py checkpoint'
            f' trained on it'
        )
    if encoder is not None and kind != 'linear':
        raise UserError(
            f'--encoder is for main_linear.py checkpoints, whose encoder is in another file;'
            f' --ckpt {path} is {WRITERS[kind]} and holds its own: drop --encoder'
        )
    options = ckpt['opt']
    if kind == 'linear':
        encoder_path, encoder_ckpt = _recorded_encoder(ckpt, path, encoder)
        try:
            net, model = encoder_from_checkpoint(
                encoder_ckpt,
                encoder_path,
                options.get('model'),
                key_encoder=bool(options.get('key_encoder')),
            )
        except UserError as exc:
            raise UserError(f'{exc} (the encoder of the classifier --ckpt {path})') from None
        encoder_options = encoder_ckpt['opt']
    else:
        encoder_path, encoder_options = path, options
        net, model = encoder_from_checkpoint(ckpt, path)
    classifier = None if kind == 'encoder' else _classifier(ckpt, path, net, encoder_path)
    extra = ckpt.get('extra') or {}
    # the options of the run that trained the classifier say how it read its images
    size = options.get('size') or encoder_options.get('size') or 32
    try:
        mean, std = resolve_mean_std(
            options.get('dataset') or 'cifar10', options.get('mean'), options.get('std')
        )
    except UserError:
        raise UserError(
            f'--ckpt {path} does not record the mean and std its images were normalised'
            f' with; pass a checkpoint written by these scripts'
        ) from None
    num_classes = None if classifier is None else classifier.out_features
    return TrainedModel(
        kind=kind,
        path=os.path.abspath(path),
        encoder=net.eval(),
        classifier=None if classifier is None else classifier.eval(),
        model=model,
        stem=encoder_options.get('stem') or options.get('stem') or 'cifar',
        size=int(size),
        mean=tuple(mean),
        std=tuple(std),
        classes=None if num_classes is None else class_names(ckpt, num_classes),
        # main_linear.py and main_ce.py record an F1 only for multi-label data
        multi_label='val_f1' in extra,
        encoder_path=os.path.abspath(encoder_path),
        options=dict(options),
        encoder_options=dict(encoder_options),
    )


def _recorded_encoder(ckpt, path, encoder):
    """(path, loaded checkpoint) of a linear classifier's encoder: --encoder, else recorded."""
    flag, encoder_path = '--encoder', encoder
    if encoder is None:
        recorded = (ckpt.get('extra') or {}).get('encoder_ckpt') or ckpt['opt'].get('ckpt')
        if not recorded or not os.path.isfile(recorded):
            where = f'recorded encoder {recorded}' if recorded else 'encoder'
            raise UserError(
                f'--ckpt {path} is {WRITERS["linear"]} whose {where} is not there; pass the'
                f' pretraining checkpoint it was trained on with --encoder PATH'
            )
        flag, encoder_path = 'the encoder', recorded
    encoder_ckpt = load_checkpoint(encoder_path, flag=flag)
    kind = checkpoint_kind(encoder_ckpt)
    if kind in ('linear', None):
        raise UserError(
            f'{flag} {encoder_path} is {WRITERS.get(kind, "not a checkpoint of these scripts")},'
            f' not an encoder; pass the main_supcon.py (or main_ce.py) checkpoint the'
            f' classifier --ckpt {path} was trained on'
        )
    return encoder_path, encoder_ckpt


def _classifier(ckpt, path, encoder, encoder_path):
    """The ``fc`` layer of a classifier checkpoint, checked against the encoder's width."""
    state = {k[len('fc.') :]: v for k, v in ckpt['model'].items() if k.startswith('fc.')}
    weight = state.get('weight')
    if weight is None or weight.dim() != 2 or set(state) - {'weight', 'bias'}:
        raise UserError(
            f'--ckpt {path}: its classifier ("fc." weights) is not one linear layer; pass a'
            f' checkpoint of main_linear.py or main_ce.py'
        )
    num_classes, width = weight.shape
    if width != encoder.feature_dim:
        raise UserError(
            f'--ckpt {path}: its classifier takes {width} features but the encoder of'
            f' {encoder_path} gives {encoder.feature_dim}; pass the encoder it was trained'
            f' on with --encoder'
        )
    classifier = nn.Linear(width, num_classes, bias='bias' in state)
    classifier.load_state_dict(state, strict=True)
    return classifier


def class_names(ckpt, num_classes: int) -> list:
    """The names of a classifier's classes: recorded in the checkpoint, else read from the
    data set it records, else the class numbers ("0", "1", ...)."""
    recorded = (ckpt.get('extra') or {}).get('classes')
    if isinstance(recorded, (list, tuple)) and len(recorded) == num_classes:
        return [str(name) for name in recorded]
    names = _data_set_classes(ckpt['opt'])
    if names is not None and len(names) == num_classes:
        return names
    return [str(i) for i in range(num_classes)]


def _data_set_classes(options):
    """The class names of the training data a checkpoint's options name, or None."""
    from supcon.data import datasets  # the data sets are read only for checkpoints without names

    name = options.get('dataset') or 'cifar10'
    if name == 'digits':
        return [str(d) for d in range(10)]
    try:
        dataset = datasets.build_dataset(
            name,
            'train',
            None,
            data_folder=options.get('data_folder') or './datasets/',
            test_folder=options.get('test_folder'),
            download=False,
        )
        return [str(c) for c in dataset.classes]
    except (UserError, OSError, ValueError):
        return None
