"""The lean autograd behind ``losses.SupConLoss``: positives stored per row, logits in blocks.

The loss's formulas, and why nothing N x N is kept for backward, are in the docstring of
``losses.py``; this module holds the pieces that implement them (``PositivePairs`` for single
labels, ``LabelSetPairs`` for multi-hot ones, ``SameClassExclusion``, ``auto_chunk_size``,
``LeanSupConFunction``).
"""

import torch
from torch.autograd.function import once_differentiable

CONTRAST_MODES = ('all', 'one')
MULTILABEL_RULES = ('jaccard', 'any')
# The label that marks a sample (or a queue row) as unlabelled.
UNLABELLED = -1
# Largest block of logits (bytes) computed at once when no chunk_size is given.
MEMORY_BUDGET = 256 * 2**20


class PositivePairs:
    """Which contrast rows are positives of which anchor, stored per row instead of per pair.

    Anchor a and contrast row j belong to groups anchor_group[a] and contrast_group[j]; the positive
    weight is m_aj = weight[anchor_group[a], contrast_group[j]] (or 1 when the groups are equal if
    weight is None), except m = 0 at j = self_column[a], the anchor's own row.
    """

    def __init__(self, anchor_group, contrast_group, self_column, num_groups=None, weight=None):
        self.anchor_group = anchor_group
        self.contrast_group = contrast_group
        self.self_column = self_column
        self.weight = weight
        self.num_anchor_groups = num_groups if weight is None else weight.shape[0]
        self.num_contrast_groups = num_groups if weight is None else weight.shape[1]
        own_group = contrast_group[self_column]
        self.self_weight = (
            (anchor_group == own_group) if weight is None else weight[anchor_group, own_group]
        )

    def count(self, dtype):
        """S_a = sum_j m_aj for every anchor."""
        rows_per_group = torch.zeros(
            self.num_contrast_groups, dtype=dtype, device=self.contrast_group.device
        )
        # index_add_ rather than bincount, which waits for the GPU to learn the output size.
        rows_per_group.index_add_(
            0, self.contrast_group, torch.ones_like(self.contrast_group, dtype=dtype)
        )
        if self.weight is not None:
            rows_per_group = self.weight.to(dtype) @ rows_per_group
        return rows_per_group[self.anchor_group] - self.self_weight.to(dtype)

    def sum_over_positives(self, contrast):
        """sum_j m_aj * contrast[j] for every anchor a."""
        group_sums = contrast.new_zeros(self.num_contrast_groups, contrast.shape[1])
        group_sums.index_add_(0, self.contrast_group, contrast)
        if self.weight is not None:
            group_sums = self.weight.to(contrast.dtype) @ group_sums
        own_row = self.self_weight.to(contrast.dtype)[:, None] * contrast[self.self_column]
        return group_sums[self.anchor_group] - own_row

    def sum_over_anchors(self, per_anchor):
        """sum_a m_aj * per_anchor[a] for every contrast row j."""
        group_sums = per_anchor.new_zeros(self.num_anchor_groups, per_anchor.shape[1])
        group_sums.index_add_(0, self.anchor_group, per_anchor)
        if self.weight is not None:
            group_sums = self.weight.to(per_anchor.dtype).t() @ group_sums
        own_row = self.self_weight.to(per_anchor.dtype)[:, None] * per_anchor
        return group_sums[self.contrast_group].index_add_(0, self.self_column, own_row, alpha=-1)


def _label_groups(labels):
    """Group id of every label, in [0, len(labels)): equal labels share an id, except that every
    UNLABELLED entry gets an id of its own; unused ids stay empty.

    torch.unique would do, but it makes the host wait for the GPU to learn how many labels there
    are.
    """
    sorted_labels, order = torch.sort(labels, stable=True)
    position = torch.arange(labels.numel(), device=labels.device)
    starts_a_run = torch.ones_like(sorted_labels, dtype=torch.bool)
    starts_a_run[1:] = sorted_labels[1:] != sorted_labels[:-1]
    # A run of r unlabelled entries leaves the r - 1 ids after its start unused: each entry takes
    # its own position instead, so no two unlabelled entries share a group. Unsigned labels cannot
    # hold -1 (uint8 255 == -1 is True in torch, and 255 is a class).
    if labels.dtype.is_signed:
        starts_a_run |= sorted_labels == UNLABELLED
    run_start = torch.where(starts_a_run, position, 0).cummax(0).values
    return torch.empty_like(position).index_put_((order,), run_start)


def read_labels(labels, bsz, queue_labels=None, n_queue=None):
    """(labels, queue_labels, multi_hot) as the loss uses them; ValueError names what is wrong.

    One label per sample ([bsz], or any shape of bsz entries such as the reference's [bsz, 1])
    comes back flat, queue_labels as [K]. [bsz, C] with C >= 2 is multi-hot: checked to hold only
    0 and 1 (which waits for the device once), queue_labels then [K, C]. queue_labels are passed
    through untouched when labels is None (SimCLR does not use them).
    """
    if labels is None:
        rows = queue_labels.shape[0] if queue_labels is not None and queue_labels.dim() else 1
        if queue_labels is not None and n_queue not in (queue_labels.numel(), rows):
            raise ValueError(f"got {rows} queue_labels for a queue of {n_queue} rows")
        return None, queue_labels, False
    multi_hot = labels.dim() == 2 and labels.shape[0] == bsz and labels.shape[1] >= 2
    if multi_hot:
        _check_zero_one(labels, 'labels')
    elif labels.numel() != bsz:
        if labels.dim() == 1:
            raise ValueError(f"got {labels.numel()} labels for a batch of {bsz} samples")
        raise ValueError(
            f"labels must be [bsz] = [{bsz}] (one label each, -1: unlabelled) or multi-hot "
            f"[bsz, C] = [{bsz}, C] with C >= 2, got shape {tuple(labels.shape)}"
        )
    else:
        labels = labels.reshape(-1)
    if queue_labels is None:
        return labels, None, multi_hot
    if multi_hot:
        if tuple(queue_labels.shape) != (n_queue, labels.shape[1]):
            raise ValueError(
                f"with multi-hot labels, queue_labels must be multi-hot [K, C] = "
                f"[{n_queue}, {labels.shape[1]}], got shape {tuple(queue_labels.shape)}"
            )
        _check_zero_one(queue_labels, 'queue_labels')
    elif queue_labels.numel() != n_queue:
        raise ValueError(
            f"got {queue_labels.numel()} queue_labels for a queue of {n_queue} rows (one label "
            f"per row, as the batch's labels)"
        )
    return labels, queue_labels if multi_hot else queue_labels.reshape(-1), multi_hot


def _check_zero_one(labels, name):
    if labels.dtype == torch.bool:
        return
    wrong = (labels != 0) & (labels != 1)
    if bool(wrong.any()):
        raise ValueError(
            f"multi-hot {name} must hold only 0 and 1 (one column per class), got "
            f"{labels[wrong][0].item()!r}; for one label per sample pass a 1-dim tensor"
        )


class SameClassExclusion:
    """hybrid's left-out rows: contrast rows of the anchor's class that are not its positives.

    anchor_class [A] and contrast_class [C] are label group ids; a row is a positive when its
    positive group (pairs.contrast_group) equals the anchor's (pairs.anchor_group), so pairs must be
    unweighted.
    """

    def __init__(self, anchor_class, contrast_class, pairs):
        if pairs.weight is not None:
            raise ValueError("SameClassExclusion needs unweighted PositivePairs")
        self.anchor_class = anchor_class
        self.contrast_class = contrast_class
        self.pairs = pairs

    def fill_(self, logits, rows):
        """Set the left-out entries of the block of logits of anchors `rows` to -inf, in place."""
        left_out = self.anchor_class[rows, None] == self.contrast_class[None, :]
        left_out &= self.pairs.anchor_group[rows, None] != self.pairs.contrast_group[None, :]
        return logits.masked_fill_(left_out, float('-inf'))


class LabelSetPairs:
    """Multi-hot positives, weighted: m_aj = w(y_a, y_j), made a block of anchors at a time.

    w is |y_a AND y_j| / |y_a OR y_j| for rule 'jaccard' and [y_a AND y_j nonempty] for 'any'
    (0 whenever either row is all zero, i.e. unlabelled), except that m_aj = 1 on the rows of the
    anchor's own sample and 0 on its self row. Unlike PositivePairs the weights depend on both label
    sets, so they sum over no group: LeanSupConFunction asks for one block [rows, M] at a time, a
    temporary of the size of a block of logits, and never keeps one.

    anchor_labels [A, L] and contrast_labels [M, L] are 0/1 in the loss's dtype (M: every contrast
    row, queue included); own_columns [A, V] are the contrast rows of each anchor's own sample;
    self_column [A] is its self row.
    """

    def __init__(self, anchor_labels, contrast_labels, own_columns, self_column, rule='jaccard'):
        if rule not in MULTILABEL_RULES:
            raise ValueError(f'multilabel must be one of {MULTILABEL_RULES}, got {rule!r}')
        self.anchor_labels = anchor_labels
        self.contrast_labels = contrast_labels
        self.own_columns = own_columns
        self.self_column = self_column
        self.rule = rule
        self.anchor_size = anchor_labels.sum(1)
        self.contrast_size = contrast_labels.sum(1)

    def weights(self, rows):
        """m_aj for the anchors `rows` against every contrast row: a new [len(rows), M] tensor.

        'jaccard' holds a second block of the same size while it divides.
        """
        shared = self.anchor_labels[rows] @ self.contrast_labels.t()
        if self.rule == 'any':
            weight = shared.gt_(0)
        else:
            union = self.anchor_size[rows, None] + self.contrast_size[None, :]
            # Two unlabelled rows share nothing and have an empty union: 0 / 1 gives them weight 0.
            weight = shared.div_(union.sub_(shared).clamp_(min=1))
            del union
        weight.scatter_(1, self.own_columns[rows], 1.0)
        return weight.scatter_(1, self.self_column[rows, None], 0.0)


def _logits(anchor_block, contrast, temperature):
    return (anchor_block / temperature) @ contrast.t()


def _leave_out_(logits, self_column_block, excluded=None, rows=None):
    """Set the self column and the left-out rows of a block of logits to -inf, in place."""
    # -inf makes the anchor's own column vanish from both the max and the softmax.
    logits.scatter_(1, self_column_block[:, None], float('-inf'))
    return logits if excluded is None else excluded.fill_(logits, rows)


def _row_blocks(n_rows, chunk_size):
    step = chunk_size or max(n_rows, 1)
    return [slice(start, min(start + step, n_rows)) for start in range(0, n_rows, step)]


def auto_chunk_size(n_anchors, n_contrast, element_size, memory_budget=MEMORY_BUDGET):
    """Anchor rows per block so that a block of logits (rows x n_contrast) fits in memory_budget
    bytes.

    None (one block) when all n_anchors rows fit; at least 1 row however small the budget.
    """
    row_bytes = max(n_contrast, 1) * element_size
    if n_anchors * row_bytes <= memory_budget:
        return None
    return max(1, int(memory_budget // row_bytes))


class LeanSupConFunction(torch.autograd.Function):
    """Mean SupCon loss over anchors that saves no N x N tensor (see the module docstring).

    apply(anchor [A, D], contrast [N, D], pairs: PositivePairs or LabelSetPairs, temperature,
          base_temperature, chunk_size, queue=None [K, D], excluded=None)
    The contrast set is contrast followed by queue (a constant: it gets no gradient); pairs'
    contrast groups (or label rows) and self columns index that set. LabelSetPairs' weights are
    made block by block, in forward and again in backward, beside the block of logits. excluded
    (SameClassExclusion or None) leaves rows out of the denominators. The gradient of contrast is
    only computed when contrast requires one.
    """

    @staticmethod
    def forward(
        ctx,
        anchor,
        contrast,
        pairs,
        temperature,
        base_temperature,
        chunk_size,
        queue=None,
        excluded=None,
    ):
        with torch.autocast(anchor.device.type, enabled=False):
            every_row = contrast if queue is None else torch.cat([contrast, queue])
            log_sum_exp = anchor.new_empty(anchor.shape[0])
            weighted = isinstance(pairs, LabelSetPairs)
            if weighted:
                positive_count = anchor.new_empty(anchor.shape[0])
                positive_logit_sum = anchor.new_empty(anchor.shape[0])
            for rows in _row_blocks(anchor.shape[0], chunk_size):
                if weighted:
                    # the weights before the logits, so that at most two blocks are alive at once
                    weight = pairs.weights(rows)
                    positive_count[rows] = weight.sum(1)
                logits = _logits(anchor[rows], every_row, temperature)
                if weighted:
                    # taken before the self column turns -inf: its weight is 0, its logit finite
                    positive_logit_sum[rows] = weight.mul_(logits).sum(1)
                    del weight
                _leave_out_(logits, pairs.self_column[rows], excluded, rows)
                # The row max keeps exp from overflowing; it cancels out of the log-softmax exactly.
                # A row with nothing left in its denominator has max -inf: 0 keeps its exp at 0
                # instead of NaN.
                row_max = logits.amax(1, keepdim=True)
                row_max.masked_fill_(row_max == float('-inf'), 0.0)
                logits.sub_(row_max).exp_()
                log_sum_exp[rows] = logits.sum(1).log_().add_(row_max.squeeze(1))
                del logits
            # An empty denominator (log 0 = -inf) goes with no positive; 0 keeps 0 * -inf from
            # making NaN.
            log_sum_exp.masked_fill_(log_sum_exp == float('-inf'), 0.0)

            if not weighted:
                positive_count = pairs.count(anchor.dtype)
            safe_count = torch.where(
                positive_count < 1e-6, torch.ones_like(positive_count), positive_count
            )
            if not weighted:
                positives = pairs.sum_over_positives(every_row)
                positive_logit_sum = ((anchor / temperature) * positives).sum(1)
            mean_log_prob_pos = (positive_logit_sum - positive_count * log_sum_exp) / safe_count
            loss = -(temperature / base_temperature) * mean_log_prob_pos.mean()
            del every_row

        ctx.save_for_backward(anchor, contrast, queue, log_sum_exp, positive_count, safe_count)
        ctx.pairs, ctx.temperature, ctx.base_temperature, ctx.chunk_size, ctx.excluded = (
            pairs,
            temperature,
            base_temperature,
            chunk_size,
            excluded,
        )
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        anchor, contrast, queue, log_sum_exp, positive_count, safe_count = ctx.saved_tensors
        pairs, temperature, excluded = ctx.pairs, ctx.temperature, ctx.excluded
        want_contrast = ctx.needs_input_grad[1]
        n_contrast = contrast.shape[0]
        with torch.autocast(anchor.device.type, enabled=False):
            every_row = contrast if queue is None else torch.cat([contrast, queue])
            # coef_a * (m_aj - S_a p_aj) is d loss / d l_aj; l = anchor . contrast / T gives the 1/T
            # below.
            coef = (
                grad_loss
                * -(ctx.temperature / ctx.base_temperature)
                / (anchor.shape[0] * safe_count)
            )
            softmax_coef = (coef * positive_count)[:, None]
            coef = coef[:, None]

            weighted = isinstance(pairs, LabelSetPairs)
            if weighted:
                grad_anchor = torch.empty_like(anchor)
                grad_contrast = torch.zeros_like(contrast) if want_contrast else None
            else:
                grad_anchor = coef * pairs.sum_over_positives(every_row)
                grad_contrast = (
                    pairs.sum_over_anchors(coef * anchor)[:n_contrast] if want_contrast else None
                )
            for rows in _row_blocks(anchor.shape[0], ctx.chunk_size):
                weight = pairs.weights(rows).mul_(coef[rows]) if weighted else None
                probs = _leave_out_(
                    _logits(anchor[rows], every_row, temperature),
                    pairs.self_column[rows],
                    excluded,
                    rows,
                )
                probs.sub_(log_sum_exp[rows, None]).exp_()
                if weighted:
                    # coef_a * (m_aj - S_a p_aj) = d loss / d l_aj for the whole block; the
                    # weights feed no group sums here, so both gradients come from it alone
                    grad_logits = weight.sub_(probs.mul_(softmax_coef[rows]))
                    del probs, weight
                    grad_anchor[rows] = grad_logits @ every_row
                    if want_contrast:
                        grad_contrast.addmm_(grad_logits[:, :n_contrast].t(), anchor[rows])
                    del grad_logits
                    continue
                grad_anchor[rows] -= softmax_coef[rows] * (probs @ every_row)
                if want_contrast:
                    # the queue's columns get no gradient: only the first n_contrast
                    # columns are used
                    grad_contrast.addmm_(
                        probs[:, :n_contrast].t(), softmax_coef[rows] * anchor[rows], alpha=-1
                    )
                del probs
            grad_anchor /= temperature
            if want_contrast:
                grad_contrast /= temperature
        return grad_anchor, grad_contrast, None, None, None, None, None, None
