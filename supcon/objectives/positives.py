"""How many positives SupCon's anchors get (``positives_per_anchor``, ``anchors_without_positive``).

Every view of every image is an anchor (``contrast_mode='all'``). Its positives besides its own
image's other views are the views of the other images of its class in the global batch and, under
``--moco``, the queue rows of its class. For an anchor of class c, with n_c images of class c in the
global batch, q_c queue rows of class c and V views per image, that is V * (n_c - 1) + q_c:

- ``positives_per_anchor``: its mean over the anchors;
- ``anchors_without_positive``: the fraction of anchors for which it is 0 (n_c = 1, q_c = 0), whose
  only positives are their own views; SupCon's loss then degenerates to SimCLR's for them.

Both come from per-class counts (a bincount of the batch's labels, and of the queue's), never from
an N x N mask. SimCLR and the hybrid loss have no positives besides an anchor's own views (the
hybrid loss leaves other images of the class out of the contrast): 0 and 1 by definition.
"""

import torch

TAGS = ('positives_per_anchor', 'anchors_without_positive')


def class_counts(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Images per class of ``labels`` as float64 [num_classes], on their device.

    ``index_add_`` rather than ``torch.bincount``: bincount reads the largest label back to the
    host to size its output, a device sync every step on CUDA.
    """
    counts = torch.zeros(num_classes, dtype=torch.float64, device=labels.device)
    return counts.index_add_(0, labels.long(), torch.ones_like(labels, dtype=torch.float64))


def positive_statistics(batch_counts, queue_counts=None, n_views=2):
    """(positives_per_anchor, anchors_without_positive, anchors) of one global batch.

    ``batch_counts[c]``: images of class c in the global batch; ``queue_counts[c]``: queue rows
    of class c (None: no queue). Numbers or sequences of numbers; anchors = n_views x images.
    """
    batch = [float(n) for n in batch_counts]
    queue = [0.0] * len(batch) if queue_counts is None else [float(q) for q in queue_counts]
    anchors = n_views * sum(batch)
    if anchors == 0:
        return 0.0, 0.0, 0
    positives = sum(n_views * n * (n_views * (n - 1) + q) for n, q in zip(batch, queue))
    lonely = sum(n_views * n for n, q in zip(batch, queue) if n == 1 and q == 0)
    return positives / anchors, lonely / anchors, int(anchors)


class PositiveCounter:
    """Per-step class counts for ``runtime.step_statistics`` and the epoch's two means.

    ``supervised=False`` (SimCLR, the hybrid loss): nothing is counted and every anchor has 0
    positives besides its own views. A step: ``count`` the batch (and the queue the loss saw),
    ``step_counts`` hands the counts to sum over ranks (this rank's batch counts, then the
    queue's counts on rank 0 only: the queue is the same on every rank, so the sum over ranks is
    the queue's own count), ``record`` folds the sums into ``meters[TAGS[0]]`` and
    ``meters[TAGS[1]]``, weighted by the step's anchors.
    """

    def __init__(self, num_classes, supervised, n_views=2, meters=None):
        self.num_classes, self.supervised, self.n_views = num_classes, supervised, n_views
        self.meters = meters
        self._counts = None

    def count(self, labels, queue_labels=None, rank=0):
        """This step's counts, for ``step_counts``."""
        self._counts = self.counts_of(labels, queue_labels, rank)

    def step_counts(self):
        return self._counts

    def record(self, summed_counts, images):
        self.update(summed_counts, images, self.meters)

    def counts_of(self, labels, queue_labels=None, rank=0):
        """A float64 vector for step_statistics: [] unsupervised, else batch (+ queue) counts."""
        if not self.supervised:
            return torch.zeros(0, dtype=torch.float64, device=labels.device)
        # unlabelled images (label -1, partial labels) are shifted into bin 0 of their own
        counts = [class_counts(labels + 1, self.num_classes + 1)]
        if queue_labels is not None:
            # unfilled queue rows hold label -1: shifted into a bin of their own, then dropped
            queue = class_counts(queue_labels + 1, self.num_classes + 1)[1:]
            counts.append(queue if rank == 0 else torch.zeros_like(queue))
        return torch.cat(counts)

    def update(self, summed_counts, images, meters):
        """Fold one step in: ``summed_counts`` as ``counts_of`` gave them, summed over ranks;
        ``images`` the global batch's number of images."""
        if not self.supervised:
            mean, lonely, anchors = 0.0, 1.0, self.n_views * int(images)
        else:
            c = self.num_classes
            unlabelled, batch = summed_counts[0], summed_counts[1 : c + 1]
            queue = summed_counts[c + 1 : 2 * c + 1] if len(summed_counts) > c + 1 else None
            mean, lonely, anchors = positive_statistics(batch, queue, self.n_views)
            # an unlabelled anchor's only positives are its own views (SupConLoss's label -1)
            extra = self.n_views * int(unlabelled)
            if extra:
                total = anchors + extra
                mean, lonely = mean * anchors / total, (lonely * anchors + extra) / total
                anchors = total
        meters[TAGS[0]].update(mean, anchors)
        meters[TAGS[1]].update(lonely, anchors)
