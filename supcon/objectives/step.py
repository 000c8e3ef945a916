"""One training step of SupCon / SimCLR, in the parts main_supcon.train() calls in turn::

    batch = step.views(images, labels, loop)   # every view on the device
    out = step.forward(model, batch)           # projections [bsz, V, D] and encoder features
    loss = step.loss(out, batch)               # SupCon / SimCLR, + the queue, + the heads' terms
    step.backward(loss, out)
    step.optimizer_step(optimizer, batch)      # + the probe's step, the key encoder's update

``TrainingStep`` owns what a step needs besides the model and the optimizer: the loss, the
key encoder and queue of --moco (``moco.py``), the online probe and the joint classifier
(``probe.py``), the device augmentation of --gpu_aug, the gradient scaler and the positives
counter. To add a loss term, subclass it and extend ``loss`` (docs/training-step.md has a
worked example); what must happen after the optimizer step goes into ``optimizer_step``.
"""

from dataclasses import dataclass

import torch

from supcon.data.labelling import is_multilabel
from supcon.data.sampling import mix_seed
from supcon.data.views import ViewLayout
from supcon.objectives.grad_cache import GradCache
from supcon.objectives.positives import PositiveCounter
from supcon.system import runtime


@dataclass
class Batch:
    """The views of one step on the device and where the step stands.

    ``images`` holds one tensor per view size, the full-size views first (then --small_views'),
    each view-major: [V_s * bsz, C, H_s, W_s] with rows v * bsz + i = view v of image i;
    ``labels`` [bsz] (or multi-hot [bsz, C]); ``n_views`` the views per image over all sizes
    (the sum of the V_s).
    """

    images: list
    labels: torch.Tensor
    n_views: int
    epoch: int
    step: int
    steps: int

    @property
    def size(self):
        return self.labels.shape[0]


@dataclass
class Output:
    """What ``forward`` computed: ``features`` [bsz, V, D] (the projections the loss reads) and
    ``encoded`` [V * bsz, dim] (the encoder's features, view-major, for the heads); ``cache``
    what --grad_cache's second pass needs (``grad_cache.Pass``), None without it."""

    features: torch.Tensor
    encoded: torch.Tensor
    cache: object = None


class TrainingStep:
    """The step of main_supcon.py; see the module. ``model`` is the (wrapped) SupConResNet,
    ``criterion`` a ``losses.SupConLoss``; ``moco`` (a ``MomentumContrast``), ``heads`` (the
    probe's ``ClassifierHeads``) and ``augment`` (``DeviceAugment``) are None when off.
    ``meters`` receive the positives per anchor."""

    def __init__(
        self, opt, rt, model, criterion, train_set, meters, moco=None, heads=None, augment=None
    ):
        self.rt, self.model, self.criterion = rt, model, criterion
        self.moco, self.heads, self.augment = moco, heads, augment
        self.seed = rt.seed
        # SimCLR reads no labels; multi-hot labels weigh positives by overlap, so no per-class
        # count describes them (0 and 1 are counted)
        self.labelled = opt.method != 'SimCLR'
        supervised = opt.method == 'SupCon' and not is_multilabel(train_set)
        # --n_views and --small_views (supcon/data/views.py); two full-size views by default
        self.layout = ViewLayout.of(opt)
        self.positives = PositiveCounter(
            len(train_set.classes), supervised, n_views=self.layout.total, meters=meters
        )
        self.scaler = runtime.make_scaler(rt)
        # --grad_cache: the batch forwarded and backpropagated in chunks (grad_cache.py)
        self.cache = GradCache.build(opt, rt)
        if self.cache is not None and moco is not None:
            moco.chunks = self.cache  # the keys per chunk too, in the same processes' order

    def views(self, images, labels, loop):
        """The loader's batch as views on the device, one view-major tensor per view size (the
        full-size views, then --small_views'). With --gpu_aug the views are made here, seeded by
        the step, so a resumed step draws the same crops; else the loader's workers made them
        (``util.TwoCropTransform``, ``augment.MultiCropTransform``), one tensor per view."""
        rt, layout = self.rt, self.layout
        if self.augment is not None:
            seed = mix_seed('gpu_aug', rt.seed, loop.epoch, loop.step, rt.rank)
            images = self.augment(images.to(rt.device, non_blocking=True), seed=seed)
            images = [images] if torch.is_tensor(images) else images  # a plain DeviceAugment
        else:
            images = layout.group(images)
        images = [runtime.to_device(x, rt) for x in images]
        labels = labels.to(rt.device, non_blocking=True)
        loop.log_views(images, views=layout.counts)
        return Batch(images, labels, layout.total, loop.epoch, loop.step, loop.steps)

    def forward(self, model, batch):
        """The projections and the encoder's features of every view, in one forward pass per
        view size (mixed precision under --amp; SupConLoss works in float32); under
        --grad_cache, one per view size and chunk, without autograd (``backward`` runs them
        again with it)."""
        cache = None
        if self.cache is not None:
            features, encoded, cache = self.cache.forward(model, batch.images, batch.size)
        else:
            features, encoded = [], []
            with runtime.autocast(self.rt):
                for images in batch.images:
                    projected, enc = model(images, with_features=True)
                    features.append(projected)
                    encoded.append(enc)
            features, encoded = torch.cat(features), torch.cat(encoded)
        # view-major rows -> [bsz, V, D]
        features = torch.stack(features.split(batch.size), dim=1)
        return Output(features, encoded, cache)

    def loss(self, out, batch):
        """The batch's loss: SupCon's (SimCLR's without labels) against the other views and,
        under --moco, against the key encoder's keys and the queue; plus the heads' terms (the
        joint classifier's weighted cross-entropy; the probe's loss is kept for its own step)."""
        loss_labels = batch.labels if self.labelled else None
        queue_labels = None
        if self.moco is not None:
            # the momentum encoder's keys of the same views and the queue of past keys
            shuffle_seed = mix_seed('shuffle', self.seed, batch.epoch, batch.step)
            loss = self.moco(
                self.criterion,
                batch.images[0],
                out.features,
                batch.labels,
                loss_labels,
                self.rt,
                shuffle_seed,
            )
            queue_labels = self.moco.queue.labels
        else:
            loss = self.criterion(out.features, loss_labels)
        if self.heads is not None:
            loss = loss + self.heads(out.encoded, batch.labels)
        # class counts of this batch (and of the queue the loss just saw), summed over ranks
        self.positives.count(batch.labels, queue_labels, self.rt.rank)
        return loss

    def backward(self, loss, out):
        """The loss's gradient, scaled (float16 --amp); under --grad_cache through the chunks'
        second pass."""
        if out.cache is not None:
            self.cache.backward(self.scaler.scale(loss), out.cache)
        else:
            self.scaler.scale(loss).backward()

    def optimizer_step(self, optimizer, batch):
        """The optimizer's step and what follows it: the probe's own SGD step (both classifiers'
        gradients averaged over ranks), the key encoder's moving average and the queue."""
        if self.heads is not None:
            self.heads.step(batch.epoch, batch.step, batch.steps)
        self.scaler.step(optimizer)
        self.scaler.update()
        if self.moco is not None:
            self.moco.step_done(runtime.unwrap(self.model))

    def trained_by_the_run_optimizer(self):
        """Modules besides the model whose parameters the run's optimizer trains."""
        return self.heads.trained_by_the_run_optimizer() if self.heads is not None else []

    def state_modules(self):
        """What checkpoints store next to the model: {'moco', 'probe', 'ce_classifier'}, those
        the run has."""
        heads = self.heads
        return dict(
            moco=self.moco,
            probe=getattr(heads, 'probe', None),
            ce_classifier=getattr(heads, 'joint', None),
        )
