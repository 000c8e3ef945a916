"""Retrieval metrics of frozen embeddings as metric learning measures them, over exact nearest
neighbours searched in blocks.

Precision@1, R-Precision and MAP@R are pytorch-metric-learning's ``AccuracyCalculator``
definitions with ``k='max_bin_count'`` (Musgrave et al., "A Metric Learning Reality Check",
2020); Recall@K is the deep metric learning literature's (Song et al., 2016): a query counts
when any of its K nearest neighbours shares its label. tests/test_retrieval.py checks them
against AccuracyCalculator; docs/retrieval.md states them in full. Labels are class indices
(-1: no label) or multi-hot rows (all zeros: no label); with multi-hot rows a gallery item is
relevant to a query when they share a label. An item without a label is relevant to no query.

Similarity is the dot product of L2-normalised rows (cosine). Neighbours are ordered by
similarity, highest first, and equal similarities by gallery index, lowest first, exactly for
the float32 similarities as computed (another BLAS code path may round a product differently
by about 1e-7: docs/retrieval.md). No queries x gallery matrix is ever held whole: each block
of query rows is searched, scored and dropped.
"""

import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from supcon.errors import UserError

RECALL_KS = (1, 5, 10)
# similarities held at once per block: 8 MiB of float32, but at least 64 query rows (64 to
# 1024 rows measured equally fast on the CPU for galleries of 10k to 100k; fewer rows pay
# Python's overhead per block, more only hold more memory)
BLOCK_ENTRIES, MIN_BLOCK_ROWS = 1 << 21, 64
# neighbour lists scored at once: about 256k (2 MiB for each float64 temporary of the scoring)
SCORE_ENTRIES = 1 << 18


def default_block_size(num_gallery: int, entries: int = BLOCK_ENTRIES) -> int:
    """Query rows per block: about ``entries`` similarities, 64 rows at least."""
    return max(MIN_BLOCK_ROWS, min(4096, entries // max(1, num_gallery)))


def _largest(sim: torch.Tensor, m: int, sorted: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, columns) [B, m] of each row's m largest similarities (values descending if
    ``sorted``).

    The values are exact; among equal values any columns may come back. When m is small
    next to the row, ``topk`` runs on fewer numbers: the row's columns are dealt into
    groups of c (group j: columns j, j + g, j + 2g, ... for g groups), and the m groups
    with the largest maxima hold every value above the row's m-th largest and enough
    values equal to it (their maxima), so those m x c candidates, with the columns left
    over after the last whole group, have the same m largest values as the row. The m
    largest maxima are found the same way, on the maxima.
    """
    rows, n = sim.shape
    # about half of sqrt(n / m): topk over n / size maxima, then over m * size candidates,
    # measured fastest on the CPU (gathering the candidates costs more than the maxima)
    size = int(round(math.sqrt(n / m) / 2))
    if size < 2 or 2 * m * size > n:
        return sim.topk(m, dim=1, sorted=sorted)
    groups = n // size
    # strided groups: the maximum runs over whole rows of the view, which vectorises
    maxima = sim[:, : groups * size].view(rows, size, groups).amax(dim=1)  # [B, groups]
    _, best = _largest(maxima, m, sorted=False)  # [B, m] group numbers, any order
    steps = torch.arange(size, device=sim.device) * groups
    columns = (best[:, :, None] + steps).flatten(1)  # [B, m * size]
    if groups * size < n:
        rest = torch.arange(groups * size, n, device=sim.device).expand(rows, -1)
        columns = torch.cat([columns, rest], dim=1)
    values, position = sim.gather(1, columns).topk(m, dim=1, sorted=sorted)
    return values, columns.gather(1, position)


def _top_k_in_index_order(sim: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices, similarities) [B, k] of each row's k largest, ties to the lowest index.

    ``topk`` finds the k largest values exactly but picks among equal values as it
    likes; asking for k + 1 shows whether the k-th value continues past the cut. Only
    rows where it does (ties at the boundary, rare outside duplicated images) are
    re-selected by index; then the rows that hold equal values are put in
    (-similarity, index) order (the others already are: the values come sorted).
    """
    rows, n = sim.shape
    if k == 0:
        return sim.new_zeros(rows, 0, dtype=torch.int64), sim.new_zeros(rows, 0)
    values, indices = _largest(sim, min(k + 1, n))
    if k < n:
        boundary = values[:, k - 1]
        tied = (values[:, k] == boundary).nonzero().flatten()
        indices, values = indices[:, :k], values[:, :k]
        if tied.numel():
            part, kth = sim[tied], boundary[tied, None]
            equal = part == kth
            # of the items equal to the k-th value, the lowest indices fill the free places
            free = k - (part > kth).sum(dim=1, keepdim=True)
            chosen = (part > kth) | (equal & (equal.cumsum(dim=1) <= free))
            picked = chosen.nonzero()[:, 1].view(-1, k)  # in index order
            # a stable sort keeps equal similarities in that order
            picked_values, order = part.gather(1, picked).sort(dim=1, descending=True, stable=True)
            indices, values = indices.clone(), values.clone()
            indices[tied], values[tied] = picked.gather(1, order), picked_values
    equal_next = values[:, 1:] == values[:, :-1]
    runs = equal_next.any(dim=1).nonzero().flatten()
    if runs.numel():
        # within each run of equal values, the lowest index first: sort by (run, index)
        run = torch.cat([values.new_zeros(runs.numel(), 1, dtype=torch.int64),
                         (~equal_next[runs]).cumsum(dim=1)], dim=1)  # fmt: skip
        order = (run * n + indices[runs]).argsort(dim=1)
        indices = indices.clone()
        indices[runs] = indices[runs].gather(1, order)  # equal values swap: values stay
    return indices, values


def sorted_neighbours(
    queries: torch.Tensor,
    gallery: torch.Tensor,
    k: int,
    *,
    leave_one_out: bool = False,
    block_size: int | None = None,
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """Yield ``(start, indices [B, k], similarities [B, k])`` for each block of query rows.

    Exact: every query is compared with every gallery row (dot products; pass L2-normalised
    rows for cosine similarity). ``leave_one_out`` means the gallery is the queries
    themselves and each query's own row is left out. Memory: one block of
    ``block_size x len(gallery)`` similarities (``default_block_size``) and a copy of the
    gallery, transposed.
    """
    available = gallery.shape[0] - int(leave_one_out)
    if not 0 <= k <= available:
        raise ValueError(f'k must be in [0, {available}], got {k}')
    if leave_one_out and queries.shape[0] != gallery.shape[0]:
        raise ValueError('leave_one_out needs the queries as the gallery')
    block = block_size or default_block_size(gallery.shape[0])
    # the gallery stored [D, N] and one block's buffer written over and over: measured 1.5x
    # faster products than gallery.T into a fresh matrix per block (whose pages are faulted in)
    gallery_t = gallery.T.contiguous()
    buffer = queries.new_empty(min(block, queries.shape[0]), gallery.shape[0])
    for start in range(0, queries.shape[0], block):
        part = queries[start : start + block]
        sim = torch.mm(part, gallery_t, out=buffer[: part.shape[0]])  # [B, N]
        if leave_one_out:
            rows = torch.arange(sim.shape[0], device=sim.device)
            sim[rows, rows + start] = float('-inf')
        indices, values = _top_k_in_index_order(sim, k)
        yield start, indices, values


def _as_labels(labels, device=None) -> torch.Tensor:
    """Class indices as int64 [N], multi-hot rows as float32 [N, C] (exact 0/1 products)."""
    if isinstance(labels, (list, tuple)):  # a data set's targets: ints or multi-hot arrays
        labels = np.asarray(labels)
    labels = torch.as_tensor(labels, device=device)
    return labels.to(torch.float32) if labels.ndim == 2 else labels.to(torch.int64)


def _labelled(labels: torch.Tensor) -> torch.Tensor:
    return labels.gt(0).any(dim=1) if labels.ndim == 2 else labels.ge(0)


def _overlap_blocks(
    query_rows: torch.Tensor, gallery: torch.Tensor
) -> Iterator[tuple[int, torch.Tensor]]:
    """(start, [rows, G] "shares a label") for blocks of multi-hot query rows: label products
    of about BLOCK_ENTRIES at a time, so memory stays at one block whatever the sizes."""
    rows = max(1, BLOCK_ENTRIES // max(1, gallery.shape[0]))
    gallery_t = gallery.T
    for start in range(0, query_rows.shape[0], rows):
        yield start, query_rows[start : start + rows] @ gallery_t > 0


def shares_label(
    query_rows: torch.Tensor, gallery: torch.Tensor, indices: torch.Tensor
) -> torch.Tensor:
    """Multi-hot rows: [B, k] of "query i shares a label with gallery item indices[i, j]"."""
    parts = [
        overlap.gather(1, indices[start : start + overlap.shape[0]])
        for start, overlap in _overlap_blocks(query_rows, gallery)
    ]
    return torch.cat(parts) if parts else indices.new_zeros(indices.shape, dtype=torch.bool)


def relevant_counts(
    query_labels: torch.Tensor, gallery_labels: torch.Tensor, leave_one_out: bool = False
) -> torch.Tensor:
    """R of each query: the gallery items of its class (multi-hot rows: that share a label with
    it), itself not counted under leave-one-out; 0 for a query without a label."""
    query_labels = _as_labels(query_labels)
    gallery_labels = _as_labels(gallery_labels, device=query_labels.device)
    labelled = _labelled(query_labels)
    if gallery_labels.shape[0] == 0 or query_labels.shape[0] == 0:
        return torch.zeros(query_labels.shape[0], dtype=torch.int64, device=query_labels.device)
    if query_labels.ndim == 2:
        blocks = _overlap_blocks(query_labels, gallery_labels)
        counts = torch.cat([overlap.sum(dim=1) for _, overlap in blocks])
    else:
        known = gallery_labels[gallery_labels >= 0]
        size = int(max(query_labels.max(), known.max() if known.numel() else 0)) + 1
        per_class = torch.bincount(known, minlength=size)
        counts = per_class[query_labels.clamp(min=0)]
    # a query shares its label with itself, so leave-one-out takes it away (when it has one)
    counts = counts - (labelled.to(torch.int64) if leave_one_out else 0)
    return torch.where(labelled, counts, torch.zeros_like(counts))


def check_scorable(query_labels, gallery_labels, leave_one_out: bool, what: str = '') -> None:
    """Refuse, in one line, queries of which none has a relevant item in the gallery."""
    if len(query_labels) == 0 or len(gallery_labels) == 0:
        side = 'queries' if len(query_labels) == 0 else 'gallery'
        raise UserError(f'the {side}{what} hold no images; nothing can be retrieved')
    if not (relevant_counts(query_labels, gallery_labels, leave_one_out) > 0).any():
        raise UserError(
            f'no query{what} has another image of its class (or sharing a label) in the'
            f' gallery, so no retrieval metric is defined; use a gallery that shares classes'
            f' with the queries'
        )


def _check_finite(features: torch.Tensor, name: str) -> None:
    if not torch.isfinite(features).all():
        raise UserError(
            f'the {name} features hold NaN or infinite values; the checkpoint\'s weights'
            f' are likely broken (check it with main_linear.py or retrain)'
        )


def retrieval_metrics(
    query_features: torch.Tensor,
    query_labels: torch.Tensor,
    gallery_features: torch.Tensor | None = None,
    gallery_labels: torch.Tensor | None = None,
    *,
    recall_ks: Sequence[int] = RECALL_KS,
    block_size: int | None = None,
    device: torch.device | str | None = None,
) -> dict:
    """Precision@1, R-Precision, MAP@R and Recall@K of the queries against the gallery.

    Without a gallery the queries are searched among themselves, each leaving itself out
    (AccuracyCalculator's ``reference=None``). Features are L2-normalised here; labels are
    class indices (-1: none) or multi-hot rows [N, C], where a gallery item is relevant to a
    query that shares one of its labels. As in AccuracyCalculator, a query with no relevant
    item in the gallery (R = 0, and every query without a label) is left out of every average;
    ``num_scored_queries`` says how many count. Returns floats (fractions in [0, 1]) and the
    counts behind them.
    """
    leave_one_out = gallery_features is None
    if leave_one_out != (gallery_labels is None):
        raise ValueError('pass gallery_features and gallery_labels together')
    device = torch.device(device) if device is not None else query_features.device
    queries = F.normalize(query_features.to(device, torch.float32), dim=1)
    q_labels = _as_labels(query_labels, device)
    if leave_one_out:
        gallery, g_labels = queries, q_labels
    else:
        gallery = F.normalize(gallery_features.to(device, torch.float32), dim=1)
        g_labels = _as_labels(gallery_labels, device)
    if q_labels.ndim != g_labels.ndim or q_labels.shape[1:] != g_labels.shape[1:]:
        raise ValueError('query and gallery labels must be of one kind (indices or multi-hot)')
    if queries.shape[0] != q_labels.shape[0] or gallery.shape[0] != g_labels.shape[0]:
        raise ValueError('features and labels must have the same number of rows')
    check_scorable(q_labels, g_labels, leave_one_out)
    _check_finite(queries, 'query')
    _check_finite(gallery, 'gallery')

    relevant = relevant_counts(q_labels, g_labels, leave_one_out)
    scored = relevant > 0
    max_r = int(relevant.max())  # AccuracyCalculator's k='max_bin_count'
    available = gallery.shape[0] - int(leave_one_out)
    k = min(max([max_r, *recall_ks]), available)

    names = ['precision_at_1', 'r_precision', 'mean_average_precision_at_r']
    names += [f'recall_at_{cut}' for cut in recall_ks]
    totals = torch.zeros(len(names), dtype=torch.float64, device=device)
    ranks = torch.arange(1, k + 1, device=device, dtype=torch.float64)

    def score(start: int, indices: torch.Tensor) -> None:
        rows = slice(start, start + indices.shape[0])
        keep = scored[rows]
        if q_labels.ndim == 2:  # multi-hot: relevant when a label is shared
            same = shares_label(q_labels[rows][keep], g_labels, indices[keep])  # [B', k]
        else:
            same = (g_labels[indices] == q_labels[rows, None])[keep]  # [B', k]
        r = relevant[rows][keep].to(torch.float64)
        # the first R neighbours are the ones R-Precision and MAP@R look at
        hits = same & (ranks[None, :] <= r[:, None])
        precision_at_rank = hits.cumsum(dim=1).to(torch.float64) / ranks
        parts = [same[:, 0], hits.sum(dim=1) / r, (precision_at_rank * hits).sum(dim=1) / r]
        parts += [same[:, : min(cut, k)].any(dim=1) for cut in recall_ks]
        totals.add_(torch.stack([part.sum(dtype=torch.float64) for part in parts]))

    # neighbours are scored SCORE_ENTRIES // k queries at a time: the search's blocks are small
    # on a large gallery, and each scoring step costs a dozen small operations
    score_rows, pending, first = max(1, SCORE_ENTRIES // max(1, k)), [], 0
    for start, indices, _ in sorted_neighbours(
        queries, gallery, k, leave_one_out=leave_one_out, block_size=block_size
    ):
        pending.append(indices)
        if start + indices.shape[0] - first >= score_rows:
            score(first, torch.cat(pending))
            pending, first = [], start + indices.shape[0]
    if pending:
        score(first, torch.cat(pending))
    sums = dict(zip(names, totals.tolist()))
    num_scored = int(scored.sum())
    metrics = {name: float(total) / num_scored for name, total in sums.items()}
    metrics.update(
        num_queries=int(queries.shape[0]),
        num_gallery=int(gallery.shape[0]),
        num_scored_queries=num_scored,
        leave_one_out=leave_one_out,
        neighbours_searched=k,
    )
    return metrics
