"""Supervised contrastive loss (SupCon, Khosla et al. 2020), with SimCLR's loss as its label-free
case.

The formula
-----------
The n_views views of bsz samples are stacked view-major into a contrast set of N = bsz * n_views
rows (row v * bsz + i is view v of sample i). An anchor a (every row for contrast_mode='all', the
view-0 rows for 'one') has logits l_aj = z_a . z_j / T against every row j except its own, and

    loss_a = -(T / T_base) / P'_a * sum_j m_aj * (l_aj - log sum_{k != a} exp(l_ak))

where m_aj is the weight of row j as a positive of anchor a (same label, the given mask, or another
view of the same sample for SimCLR), S_a = sum_j m_aj and P'_a = S_a, replaced by 1 when S_a < 1e-6
so that an anchor without positives adds 0 (not NaN) yet still counts in the mean. The loss is the
mean of loss_a over anchors: the value of HobbitLong/SupContrast's SupConLoss after its Dec 2023 fix
wherever that value is finite. Two deliberate differences: the logits and softmax are computed in
float32 (float64 for float64 input), so float16/bfloat16 features from autocast are promoted first;
and the anchor's own column is dropped before the row maximum is taken, so features that are not
L2-normalised and have a large norm give a finite loss where the reference's (whose maximum is then
the self-similarity, leaving every other exp at 0 and log 0 = -inf) is NaN.

The general formula: keys, a queue, hybrid
------------------------------------------
Write y_i for sample i's label and q_a = anchor a's feature (view v of sample i, from `features`;
the anchors never change). The contrast set C is a batch part followed by a queue part:
  * batch part: N = bsz * n_views rows, view-major as above, taken from `keys` when keys are given
    (a momentum encoder's features of the same images, treated as constants) and from `features`
    otherwise; row (v', i') belongs to sample i' and has label y_i';
  * queue part: the K rows of `queue` (constants), with labels `queue_labels`; they belong to no
    sample.
The anchor's "self" row s(a) is row (v, i) of the batch part: its own feature, or its own key of the
same view. With l_aj = q_a . c_j / T for every j in C, each anchor splits C - {s(a)} into
    positives    m_aj = 1 (or mask[i, i'] with a mask, which allows neither keys nor a queue);
    negatives    m_aj = 0, but in the denominator;
    left out     in neither sum (the logit is set to -inf),
and the loss is unchanged in form:

    loss_a = -(T / T_base) / P'_a * sum_{j in C} m_aj * (l_aj - log sum_{k in D_a} exp(l_ak)),
    loss   = mean of loss_a over the anchors,

with D_a = C minus s(a) minus the left-out rows, S_a = sum_j m_aj, and P'_a = S_a, or 1 when S_a <
1e-6, as before. Which rows are which:
    SupCon (labels):   positives = rows of label y_i (batch rows other than s(a), and queue rows);
                       negatives = all other rows; nothing else left out.
    SimCLR (no labels): positives = the other batch rows of sample i (its other views'
                       features or keys);
                       negatives = every other row, every queue row included (queue_labels unused).
    hybrid (labels):   positives = the other batch rows of sample i, as SimCLR;
                       negatives = rows whose label differs from y_i (batch and queue);
                       left out  = rows of label y_i that are not positives: other samples of the
                       same class in the batch, and queue rows of class y_i.
Positives always lie in D_a. An anchor whose D_a is empty adds 0 (it has no positive either).

hybrid follows Thomas-Gottwald/SupContrastShape (branch mdcomp, `hybrid=True`, its `--method
SupConHybrid`): anchor's own row excluded, mean over the positives, the T / T_base factor and the
mean over anchors are the fork's, and on every input where the fork's value is finite (n_views >= 2)
the values agree.
Where they differ: with n_views = 1 no anchor has a positive and the fork returns NaN (0 / 0) where
this returns 0; the fork silently falls back to SimCLR / the mask when hybrid is asked for without
labels, where this raises ValueError; the fork has neither keys nor a queue, so hybrid's treatment
of queue rows (those of the anchor's class left out, the others negatives) is this module's own
extension of the same rule.

Unlabelled samples and multi-hot labels
---------------------------------------
A label of -1 (supcon.objectives.contrastive.UNLABELLED) marks a sample, or a queue row, as
unlabelled; any
other value, negative ones included, is a class. An unlabelled sample is a class of its own: as an
anchor its positives are the other batch rows of its own sample (SimCLR's: its other views'
features, or its keys but the self row), and it is nobody else's positive; every other row,
however labelled, is a negative of it, and it is a negative of every other anchor. An unlabelled
queue row is a negative of every anchor. Under hybrid an unlabelled anchor has nothing left out (no
other row is of its class), and an unlabelled row is never left out of another anchor's
denominator. With every label -1 the loss is SimCLR's exactly; with none, it is unchanged.

Multi-hot labels, one 0/1 (or bool) column per class, [bsz, n_classes] with n_classes >= 2, make
the positives weighted. With y_i and y_j the sets of classes of anchor a's sample i and of row j:
    m_aj = 1                                  for the batch rows of sample i other than s(a),
    m_aj = |y_i AND y_j| / |y_i OR y_j|       for every other row, multilabel='jaccard' (default),
    m_aj = 1 if y_i AND y_j is nonempty, else 0                   multilabel='any',
queue rows included (queue_labels are then [K, n_classes]); nothing is left out (D_a = C - {s(a)}),
and the loss keeps its form with S_a = sum_j m_aj: loss_a = -(T / T_base) / P'_a * sum_j m_aj *
(l_aj - log sum_{k in D_a} exp(l_ak)). An all-zero row shares nothing (0 / 0 is taken as 0), so it
is an unlabelled sample exactly as above. Multi-hot labels take neither hybrid nor a mask. With
one-hot rows both rules give the single-label loss, up to rounding (another code path computes it).

The memory trick
----------------
Written out directly the formula keeps about eight N x N matrices alive for autograd. Here only the
logits are ever N x N (or chunk_size x N, and with a queue chunk_size x (N + K)), and they are never
saved:
  * the positive term needs no pair mask: sum_j m_aj l_aj = z_a . (sum_j m_aj z_j) / T, and since m
    only depends on which sample (or label) a row belongs to, sum_j m_aj z_j is a sum of per-group
    feature sums minus the anchor's own row;
  * forward keeps only each anchor's log-sum-exp; backward recomputes the logits and turns them into
    the softmax p in place, using  d loss / d l_aj = -(T / T_base) / (n_anchors * P'_a) * (m_aj -
    S_a * p_aj), whose m part again reduces to per-group sums and whose p part is two matrix
    products;
  * the self row and hybrid's left-out rows are set to -inf inside each block of logits, in forward
    and again in backward (p_aj = 0 there, and m_aj = 0), so no exclusion mask is saved either
    (hybrid builds a boolean block of the same shape as the logits, 1 byte an entry, while it fills
    one).
  * multi-hot weights depend on both label sets and reduce to no per-group sum: each block of
    weights (chunk_size x |C|, from a [chunk, n_classes] x [n_classes, |C|] product) is made
    beside its block of logits, in forward and again in backward, and dropped with it; the block
    of d loss / d l, coef_a (m_aj - S_a p_aj), then gives both gradients by two matrix products.
When no chunk_size is given and one block of logits, n_anchors x |C| x (4 bytes for float32, 8 for
float64), would exceed the memory budget (MEMORY_BUDGET, 256 MiB, or SupConLoss's memory_budget),
the anchors are cut into blocks of as many rows as fit in it; with multi-hot labels two blocks
(logits and weights) must fit.

Distributed
-----------
Under torch.distributed with more than one rank, each rank contrasts its own anchors with every
rank's samples (gathered with gradient; keys are gathered without) and returns the mean over its own
anchors; DDP's gradient averaging then gives the single-process gradient of the whole batch when
ranks hold equal batches. Labels (multi-hot ones too) are gathered along; the queue and its labels
are the same on every rank and are not.
"""

import torch
import torch.nn as nn

from supcon.objectives.contrastive import (
    CONTRAST_MODES,
    MEMORY_BUDGET,
    MULTILABEL_RULES,
    LabelSetPairs,
    LeanSupConFunction,
    PositivePairs,
    SameClassExclusion,
    _label_groups,
    auto_chunk_size,
    read_labels,
)
from supcon.system.distributed import (
    all_gather_rows,
    gather_sizes,
    gather_with_grad,
    get_rank,
    is_distributed,
)


class SupConLoss(nn.Module):
    """SupCon loss; SimCLR's when neither labels nor mask is given; SupContrastShape's hybrid with
    hybrid=True.

    __init__(temperature=0.07, contrast_mode='all', base_temperature=0.07, chunk_size=None,
             hybrid=False, memory_budget=None, multilabel='jaccard')
    forward(features, labels=None, mask=None, keys=None, queue=None, queue_labels=None)
    -> 0-dim tensor

    features: [bsz, n_views, ...], L2-normalised, the anchors (queries); labels: [bsz] (or [bsz,
    1]), -1 marking an unlabelled sample, whose positives are only its own other views (SimCLR's)
    and which is nobody else's positive; or multi-hot [bsz, C] (C >= 2, 0/1), whose positives are
    weighted by multilabel: 'jaccard' (|shared labels| / |labels of either|) or 'any' (1 when a
    label is shared); an all-zero row is unlabelled (multi-hot values are checked to be 0/1, which
    waits for the device once a call). mask: [bsz, bsz] float with mask[i, j] the weight of sample
    j as a positive of anchor sample i.
    keys: [bsz, n_views, ...] like features, e.g. from a momentum encoder; detached. When given, the
    anchors contrast with the keys instead of with the features, and an anchor's own key of its own
    view is its "self" row (left out).
    queue: [K, D] L2-normalised constant rows (detached, not gathered across ranks) appended to the
    contrast set; queue_labels [K] (-1: unlabelled), or [K, C] with multi-hot labels, required with
    labels (and with hybrid), optional and unused without.
    hybrid: positives are the other views of the anchor's own sample (as SimCLR); batch and queue
    rows of the anchor's class that are not positives leave the denominator; needs single labels.
    The exact formula for every case is in the module docstring.

    chunk_size (anchor rows per block) caps the largest temporary at chunk_size x (rows of the
    contrast set), two of them with multi-hot labels; without it, blocks are cut automatically when
    one would exceed memory_budget bytes (default MEMORY_BUDGET). Computed in float32 (float64 for
    float64 input), also under autocast. Under torch.distributed (world size > 1) local anchors
    contrast with all ranks' samples (or keys); see the module docstring.
    """

    def __init__(
        self,
        temperature=0.07,
        contrast_mode='all',
        base_temperature=0.07,
        chunk_size=None,
        hybrid=False,
        memory_budget=None,
        multilabel='jaccard',
    ):
        super().__init__()
        if multilabel not in MULTILABEL_RULES:
            raise ValueError(
                f"multilabel must be one of {MULTILABEL_RULES} (how multi-hot labels weigh a "
                f"pair), got {multilabel!r}"
            )
        if contrast_mode not in CONTRAST_MODES:
            raise ValueError(
                f"contrast_mode must be one of {CONTRAST_MODES}, got {contrast_mode!r}"
            )
        if chunk_size is not None and (int(chunk_size) != chunk_size or chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
        if memory_budget is not None and not memory_budget > 0:
            raise ValueError(
                f"memory_budget must be a positive number of bytes or None, got {memory_budget!r}"
            )
        self.temperature = temperature
        self.contrast_mode = contrast_mode
        self.base_temperature = base_temperature
        self.chunk_size = None if chunk_size is None else int(chunk_size)
        self.hybrid = bool(hybrid)
        self.memory_budget = MEMORY_BUDGET if memory_budget is None else memory_budget
        self.multilabel = multilabel

    def _check_arguments(self, features, labels, mask, keys, queue, queue_labels):
        if features.dim() < 3:
            raise ValueError(
                f"features must be [bsz, n_views, ...] with at least 3 dims, "
                f"got shape {tuple(features.shape)}; add a views dim, e.g. features[:, None]"
            )
        if labels is not None and mask is not None:
            raise ValueError("give labels or mask, not both")
        if self.hybrid and mask is not None:
            raise ValueError("hybrid=True takes labels, not a mask")
        if self.hybrid and labels is None:
            raise ValueError(
                "hybrid=True needs labels: its negatives are the samples of other classes"
            )
        if mask is not None and (keys is not None or queue is not None):
            raise ValueError(
                "a mask only describes the batch's own samples; it cannot be used with keys or "
                "a queue, pass labels instead"
            )
        if keys is not None and tuple(keys.shape) != tuple(features.shape):
            raise ValueError(
                f"keys must have the shape of features, {tuple(features.shape)}, "
                f"got {tuple(keys.shape)}"
            )
        if queue is None:
            if queue_labels is not None:
                raise ValueError("queue_labels given without a queue")
            return
        dim = features[0, 0].numel()
        if queue.dim() != 2 or queue.shape[1] != dim:
            raise ValueError(
                f"queue must be [K, D] with D = {dim} (the features' size per view), "
                f"got shape {tuple(queue.shape)}"
            )
        if labels is not None and queue_labels is None:
            raise ValueError(
                "queue_labels are needed with labels and a queue (positives among the queue rows "
                "are the rows of the anchor's label)"
                if not self.hybrid
                else "queue_labels are needed with hybrid=True and a queue (queue rows of the "
                "anchor's "
                "class leave the denominator)"
            )

    def forward(self, features, labels=None, mask=None, keys=None, queue=None, queue_labels=None):
        self._check_arguments(features, labels, mask, keys, queue, queue_labels)
        distributed = is_distributed()
        if distributed and mask is not None:
            raise ValueError(
                "a mask only describes the local batch and cannot be used with several "
                "distributed ranks; pass labels instead"
            )
        bsz, n_views = features.shape[:2]
        device = features.device
        labels, queue_labels, multi_hot = read_labels(
            labels, bsz, queue_labels, None if queue is None else queue.shape[0]
        )
        if multi_hot and self.hybrid:
            raise ValueError(
                "hybrid=True needs one label per sample ([bsz]), not multi-hot [bsz, C] labels: "
                "its left-out rows are those of the anchor's class"
            )
        if mask is not None and tuple(mask.shape) != (bsz, bsz):
            raise ValueError(f"mask must be [bsz, bsz] = [{bsz}, {bsz}], got {tuple(mask.shape)}")

        with torch.autocast(device.type, enabled=False):
            if features.dtype != torch.float64:
                features = features.float()
            features = features.reshape(bsz, n_views, -1)
            if labels is not None:
                # multi-hot rows in the loss's dtype: bool cannot be gathered on every backend
                labels = labels.to(device, features.dtype if multi_hot else None)
            if keys is not None:
                keys = (
                    keys.detach().to(device=device, dtype=features.dtype).reshape(bsz, n_views, -1)
                )
            n_queue = 0
            if queue is not None:
                queue = queue.detach().to(device=device, dtype=features.dtype)
                n_queue = queue.shape[0]
                # SimCLR ignores queue_labels: every queue row is a negative there.
                if labels is None:
                    queue_labels = None
                else:
                    queue_labels = queue_labels.to(device, features.dtype if multi_hot else None)

            if distributed:
                sizes = gather_sizes(bsz, device)
                offset, total = sum(sizes[: get_rank()]), sum(sizes)
                if keys is None:
                    contrast = torch.cat(torch.unbind(gather_with_grad(features, sizes), 1))
                else:
                    contrast = torch.cat(torch.unbind(all_gather_rows(keys, sizes), 1))
                if labels is not None:
                    labels = all_gather_rows(labels, sizes)
            else:
                offset, total = 0, bsz
                contrast = torch.cat(torch.unbind(features if keys is None else keys, 1))

            if self.contrast_mode == 'one':
                anchor, anchor_views = features[:, 0], 1
            else:
                anchor = (
                    contrast
                    if keys is None and not distributed
                    else torch.cat(torch.unbind(features, 1))
                )
                anchor_views = n_views

            # Anchor row v * bsz + i is local sample i's view v, at global row v * total + offset +
            # i of the batch part of the contrast set (features or keys); queue rows follow at N +
            # k.
            local_sample = offset + torch.arange(bsz, device=device)
            view = torch.arange(anchor_views, device=device)
            self_column = (view[:, None] * total + local_sample[None, :]).reshape(-1)
            anchor_sample = local_sample.repeat(anchor_views)
            contrast_sample = torch.arange(total, device=device).repeat(n_views)
            if n_queue:
                # queue rows belong to no sample: group `total`, which no anchor has
                contrast_sample = torch.cat(
                    [contrast_sample, contrast_sample.new_full((n_queue,), total)]
                )
            n_sample_groups = total + (1 if n_queue else 0)

            excluded = None
            if multi_hot:
                contrast_labels = labels.repeat(n_views, 1)
                if n_queue:
                    contrast_labels = torch.cat([contrast_labels, queue_labels])
                # the batch rows of the anchor's own sample: one per view, the self row among them
                own_columns = torch.arange(n_views, device=device) * total + anchor_sample[:, None]
                pairs = LabelSetPairs(
                    labels[anchor_sample],
                    contrast_labels,
                    own_columns,
                    self_column,
                    self.multilabel,
                )
            elif mask is not None:
                pairs = PositivePairs(
                    anchor_sample,
                    contrast_sample,
                    self_column,
                    weight=mask.to(device=device, dtype=features.dtype),
                )
            elif labels is not None:
                every_label = labels if queue_labels is None else torch.cat([labels, queue_labels])
                label_group = _label_groups(every_label)
                contrast_label_group = label_group[contrast_sample[: contrast.shape[0]]]
                if n_queue:
                    contrast_label_group = torch.cat([contrast_label_group, label_group[total:]])
                if self.hybrid:
                    pairs = PositivePairs(
                        anchor_sample, contrast_sample, self_column, num_groups=n_sample_groups
                    )
                    excluded = SameClassExclusion(
                        label_group[anchor_sample], contrast_label_group, pairs
                    )
                else:
                    pairs = PositivePairs(
                        label_group[anchor_sample],
                        contrast_label_group,
                        self_column,
                        num_groups=every_label.numel(),
                    )
            else:
                pairs = PositivePairs(
                    anchor_sample, contrast_sample, self_column, num_groups=n_sample_groups
                )

            chunk_size = self.chunk_size
            if chunk_size is None:
                chunk_size = auto_chunk_size(
                    anchor.shape[0],
                    contrast.shape[0] + n_queue,
                    # multi-hot labels hold a block of weights beside each block of logits
                    features.element_size() * (2 if multi_hot else 1),
                    self.memory_budget,
                )
            return LeanSupConFunction.apply(
                anchor,
                contrast,
                pairs,
                self.temperature,
                self.base_temperature,
                chunk_size,
                queue,
                excluded,
            )
