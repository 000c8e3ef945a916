"""Supervised contrastive loss (SupCon, Khosla et al. 2020), with SimCLR's loss as its label-free case.

The formula
-----------
The n_views views of bsz samples are stacked view-major into a contrast set of N = bsz * n_views rows
(row v * bsz + i is view v of sample i). An anchor a (every row for contrast_mode='all', the view-0 rows
for 'one') has logits l_aj = z_a . z_j / T against every row j except its own, and

    loss_a = -(T / T_base) / P'_a * sum_j m_aj * (l_aj - log sum_{k != a} exp(l_ak))

where m_aj is the weight of row j as a positive of anchor a (same label, the given mask, or another view of
the same sample for SimCLR), S_a = sum_j m_aj and P'_a = S_a, replaced by 1 when S_a < 1e-6 so that an
anchor without positives adds 0 (not NaN) yet still counts in the mean. The loss is the mean of loss_a over
anchors: the value of HobbitLong/SupContrast's SupConLoss after its Dec 2023 fix, on every input.

The memory trick
----------------
Written out directly the formula keeps about eight N x N matrices alive for autograd. Here only the logits
are ever N x N (or chunk_size x N), and they are never saved:
  * the positive term needs no pair mask: sum_j m_aj l_aj = z_a . (sum_j m_aj z_j) / T, and since m only
    depends on which sample (or label) a row belongs to, sum_j m_aj z_j is a sum of per-group feature sums
    minus the anchor's own row;
  * forward keeps only each anchor's log-sum-exp; backward recomputes the logits and turns them into the
    softmax p in place, using  d loss / d l_aj = -(T / T_base) / (n_anchors * P'_a) * (m_aj - S_a * p_aj),
    whose m part again reduces to per-group sums and whose p part is two matrix products.

Distributed
-----------
Under torch.distributed with more than one rank, each rank contrasts its own anchors with every rank's
samples (gathered with gradient) and returns the mean over its own anchors; DDP's gradient averaging then
gives the single-process gradient of the whole batch when ranks hold equal batches.
"""
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.autograd.function import once_differentiable

CONTRAST_MODES = ('all', 'one')


def _is_distributed():
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _gather_sizes(n_rows, device):
    size = torch.tensor([n_rows], dtype=torch.long, device=device)
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)
    return [int(s) for s in sizes]


def _all_gather_rows(tensor, sizes):
    """Concatenate every rank's `tensor` along dim 0; ranks may hold different numbers of rows."""
    # all_gather needs equal shapes, so shorter ranks pad and the padding is dropped afterwards.
    padded = tensor.new_zeros((max(sizes),) + tuple(tensor.shape[1:]))
    padded[:tensor.shape[0]] = tensor
    pieces = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(pieces, padded)
    return torch.cat([piece[:n] for piece, n in zip(pieces, sizes)])


class _GatherWithGrad(torch.autograd.Function):

    @staticmethod
    def forward(ctx, tensor, sizes):
        rank = dist.get_rank()
        ctx.rows = slice(sum(sizes[:rank]), sum(sizes[:rank + 1]))
        return _all_gather_rows(tensor, sizes)

    @staticmethod
    def backward(ctx, grad):
        # Every rank's loss depends on our rows; summing all ranks' gradients gives the gradient of the sum
        # of the ranks' losses. gloo has no reduce_scatter, so all-reduce everything and keep our slice.
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rows], None


def gather_with_grad(tensor, sizes=None):
    """all_gather along dim 0 whose backward sends each rank the summed gradient of its own rows.

    `sizes` (rows per rank) is gathered when not given; ranks may hold different numbers of rows.
    """
    if sizes is None:
        sizes = _gather_sizes(tensor.shape[0], tensor.device)
    return _GatherWithGrad.apply(tensor, sizes)


class PositivePairs:
    """Which contrast rows are positives of which anchor, stored per row instead of per pair.

    Anchor a and contrast row j belong to groups anchor_group[a] and contrast_group[j]; the positive weight is
    m_aj = weight[anchor_group[a], contrast_group[j]] (or 1 when the groups are equal if weight is None),
    except m = 0 at j = self_column[a], the anchor's own row.
    """

    def __init__(self, anchor_group, contrast_group, self_column, num_groups=None, weight=None):
        self.anchor_group = anchor_group
        self.contrast_group = contrast_group
        self.self_column = self_column
        self.weight = weight
        self.num_anchor_groups = num_groups if weight is None else weight.shape[0]
        self.num_contrast_groups = num_groups if weight is None else weight.shape[1]
        own_group = contrast_group[self_column]
        self.self_weight = ((anchor_group == own_group) if weight is None else weight[anchor_group, own_group])

    def count(self, dtype):
        """S_a = sum_j m_aj for every anchor."""
        rows_per_group = torch.zeros(self.num_contrast_groups, dtype=dtype, device=self.contrast_group.device)
        # index_add_ rather than bincount, which waits for the GPU to learn the output size.
        rows_per_group.index_add_(0, self.contrast_group, torch.ones_like(self.contrast_group, dtype=dtype))
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
    """Group id of every label, in [0, len(labels)): equal labels share an id, unused ids stay empty.

    torch.unique would do, but it makes the host wait for the GPU to learn how many labels there are.
    """
    sorted_labels, order = torch.sort(labels, stable=True)
    position = torch.arange(labels.numel(), device=labels.device)
    starts_a_run = torch.ones_like(sorted_labels, dtype=torch.bool)
    starts_a_run[1:] = sorted_labels[1:] != sorted_labels[:-1]
    run_start = torch.where(starts_a_run, position, 0).cummax(0).values
    return torch.empty_like(position).index_put_((order,), run_start)


def _logits_without_self(anchor_block, contrast, self_column_block, temperature):
    logits = (anchor_block / temperature) @ contrast.t()
    # -inf makes the anchor's own column vanish from both the max and the softmax.
    return logits.scatter_(1, self_column_block[:, None], float('-inf'))


def _row_blocks(n_rows, chunk_size):
    step = chunk_size or max(n_rows, 1)
    return [slice(start, min(start + step, n_rows)) for start in range(0, n_rows, step)]


class LeanSupConFunction(torch.autograd.Function):
    """Mean SupCon loss over anchors that saves no N x N tensor (see the module docstring).

    apply(anchor [A, D], contrast [N, D], pairs: PositivePairs, temperature, base_temperature, chunk_size)
    """

    @staticmethod
    def forward(ctx, anchor, contrast, pairs, temperature, base_temperature, chunk_size):
        with torch.autocast(anchor.device.type, enabled=False):
            log_sum_exp = anchor.new_empty(anchor.shape[0])
            for rows in _row_blocks(anchor.shape[0], chunk_size):
                logits = _logits_without_self(anchor[rows], contrast, pairs.self_column[rows], temperature)
                # The row max keeps exp from overflowing; it cancels out of the log-softmax exactly.
                row_max = logits.amax(1, keepdim=True)
                logits.sub_(row_max).exp_()
                log_sum_exp[rows] = logits.sum(1).log_().add_(row_max.squeeze(1))
                del logits

            positive_count = pairs.count(anchor.dtype)
            safe_count = torch.where(positive_count < 1e-6, torch.ones_like(positive_count), positive_count)
            positive_logit_sum = ((anchor / temperature) * pairs.sum_over_positives(contrast)).sum(1)
            mean_log_prob_pos = (positive_logit_sum - positive_count * log_sum_exp) / safe_count
            loss = -(temperature / base_temperature) * mean_log_prob_pos.mean()

        ctx.save_for_backward(anchor, contrast, log_sum_exp, positive_count, safe_count)
        ctx.pairs, ctx.temperature, ctx.base_temperature, ctx.chunk_size = (
            pairs, temperature, base_temperature, chunk_size)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        anchor, contrast, log_sum_exp, positive_count, safe_count = ctx.saved_tensors
        pairs, temperature = ctx.pairs, ctx.temperature
        with torch.autocast(anchor.device.type, enabled=False):
            # coef_a * (m_aj - S_a p_aj) is d loss / d l_aj; l = anchor . contrast / T gives the 1/T below.
            coef = grad_loss * -(ctx.temperature / ctx.base_temperature) / (anchor.shape[0] * safe_count)
            softmax_coef = (coef * positive_count)[:, None]
            coef = coef[:, None]

            grad_anchor = coef * pairs.sum_over_positives(contrast)
            grad_contrast = pairs.sum_over_anchors(coef * anchor)
            for rows in _row_blocks(anchor.shape[0], ctx.chunk_size):
                probs = _logits_without_self(anchor[rows], contrast, pairs.self_column[rows], temperature)
                probs.sub_(log_sum_exp[rows, None]).exp_()
                grad_anchor[rows] -= softmax_coef[rows] * (probs @ contrast)
                grad_contrast.addmm_(probs.t(), softmax_coef[rows] * anchor[rows], alpha=-1)
                del probs
            grad_anchor /= temperature
            grad_contrast /= temperature
        return grad_anchor, grad_contrast, None, None, None, None


class SupConLoss(nn.Module):
    """SupCon loss; SimCLR's when neither labels nor mask is given.

    features: [bsz, n_views, ...], L2-normalised; labels: [bsz]; mask: [bsz, bsz] float with mask[i, j] the
    weight of sample j as a positive of anchor sample i. chunk_size (anchor rows per block) caps the largest
    temporary at chunk_size x N. Computed in float32 (float64 for float64 input), also under autocast.
    Under torch.distributed (world size > 1) local anchors contrast with all ranks' samples; see the module
    docstring. Returns a 0-dim tensor.
    """

    def __init__(self, temperature=0.07, contrast_mode='all', base_temperature=0.07, chunk_size=None):
        super().__init__()
        if contrast_mode not in CONTRAST_MODES:
            raise ValueError(f"contrast_mode must be one of {CONTRAST_MODES}, got {contrast_mode!r}")
        if chunk_size is not None and (int(chunk_size) != chunk_size or chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
        self.temperature = temperature
        self.contrast_mode = contrast_mode
        self.base_temperature = base_temperature
        self.chunk_size = None if chunk_size is None else int(chunk_size)

    def forward(self, features, labels=None, mask=None):
        if features.dim() < 3:
            raise ValueError(f"features must be [bsz, n_views, ...] with at least 3 dims, "
                             f"got shape {tuple(features.shape)}; add a views dim, e.g. features[:, None]")
        if labels is not None and mask is not None:
            raise ValueError("give labels or mask, not both")
        distributed = _is_distributed()
        if distributed and mask is not None:
            raise ValueError("a mask only describes the local batch and cannot be used with several "
                             "distributed ranks; pass labels instead")
        bsz, n_views = features.shape[:2]
        device = features.device
        if labels is not None:
            labels = labels.reshape(-1).to(device)
            if labels.numel() != bsz:
                raise ValueError(f"got {labels.numel()} labels for a batch of {bsz} samples")
        if mask is not None and tuple(mask.shape) != (bsz, bsz):
            raise ValueError(f"mask must be [bsz, bsz] = [{bsz}, {bsz}], got {tuple(mask.shape)}")

        with torch.autocast(device.type, enabled=False):
            if features.dtype != torch.float64:
                features = features.float()
            features = features.reshape(bsz, n_views, -1)

            if distributed:
                sizes = _gather_sizes(bsz, device)
                offset, total = sum(sizes[:dist.get_rank()]), sum(sizes)
                contrast = torch.cat(torch.unbind(gather_with_grad(features, sizes), 1))
                if labels is not None:
                    labels = _all_gather_rows(labels, sizes)
            else:
                offset, total = 0, bsz
                contrast = torch.cat(torch.unbind(features, 1))

            if self.contrast_mode == 'one':
                anchor, anchor_views = features[:, 0], 1
            else:
                anchor = torch.cat(torch.unbind(features, 1)) if distributed else contrast
                anchor_views = n_views

            # Anchor row v * bsz + i is local sample i's view v, at global row v * total + offset + i.
            local_sample = offset + torch.arange(bsz, device=device)
            view = torch.arange(anchor_views, device=device)
            self_column = (view[:, None] * total + local_sample[None, :]).reshape(-1)
            anchor_sample = local_sample.repeat(anchor_views)
            contrast_sample = torch.arange(total, device=device).repeat(n_views)

            if mask is not None:
                pairs = PositivePairs(anchor_sample, contrast_sample, self_column,
                                      weight=mask.to(device=device, dtype=features.dtype))
            elif labels is not None:
                label_group = _label_groups(labels)
                pairs = PositivePairs(label_group[anchor_sample], label_group[contrast_sample], self_column,
                                      num_groups=total)
            else:
                pairs = PositivePairs(anchor_sample, contrast_sample, self_column, num_groups=total)

            return LeanSupConFunction.apply(anchor, contrast, pairs, self.temperature, self.base_temperature,
                                            self.chunk_size)
