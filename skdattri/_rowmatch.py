"""Which training rows a batch holds: exact row keys and a vectorised lookup.

A skorch net hands its callbacks the batch a ``DataLoader`` drew (shuffled or not) but
not the positions of its rows in ``X``. :class:`RowMatcher` recovers them from the
content: every row ``(X_i, y_i)`` gets a 64-bit key, a hash of its exact bytes (the
SplitMix64 finaliser of each word and its column, summed with int64 wrap-around), so
the same row gives the same key whatever batch it is in, and distinct rows collide
with probability about ``n**2 / 2**64``. A batch's keys are looked up in the sorted
table of the training rows' keys (``searchsorted``, no Python loop over rows).

Identical rows (same inputs, same target) share a key; their occurrences are given
to the copies in turn (round-robin), so an epoch that draws every row once draws
every copy once. Copies give the same training run whichever is drawn, so any such
assignment is as right as another.
"""

from __future__ import annotations

import torch

from .func.projection._random import _hash_

_WORD = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}
_SALT = 0x2545F4914F6CDD1D


def _leaves(batch):
    """The tensors of a batch (a tensor, a dict of tensors, or a tuple / list of these)."""
    if isinstance(batch, torch.Tensor):
        return [batch]
    if isinstance(batch, dict):
        return [t for k in sorted(batch) for t in _leaves(batch[k])]
    if isinstance(batch, (list, tuple)):
        return [t for part in batch for t in _leaves(part)]
    if batch is None:
        return []
    raise TypeError(
        f"Rows of type {type(batch).__name__} cannot be matched to training rows; the "
        "batches must be tensors or dicts of tensors (skorch's default datasets).")


def _leaf_keys(t, n):
    """``(n,)`` int64 keys of the rows of one tensor, from their exact bytes."""
    t = t.detach().to("cpu").contiguous()
    if t.dtype == torch.bool:
        t = t.to(torch.uint8)
    if t.is_complex():
        t = torch.view_as_real(t)
    words = t.reshape(n, -1).view(_WORD[t.element_size()]).to(torch.int64)
    cols = torch.arange(words.shape[1], dtype=torch.int64).mul_(0x632BE59BD9B4E019)
    return _hash_(words + cols, _SALT).sum(1)


def row_keys(batch):
    """One int64 key per row of ``batch`` (tensors sharing their first dimension)."""
    leaves = _leaves(batch)
    n = leaves[0].shape[0]
    key = torch.zeros(n, dtype=torch.int64)
    for i, t in enumerate(leaves):
        if t.dim() == 0 or t.shape[0] != n:
            raise ValueError("The tensors of a batch must share their first dimension.")
        key = _hash_(key.bitwise_xor_(_leaf_keys(t, n)), _SALT + i + 1)
    return key


class RowMatcher:
    """Positions in the training set of the rows of batches, found by their keys.

    Parameters
    ----------
    keys : Tensor of shape (n_rows,)
        :func:`row_keys` of the training rows, in their order.
    """

    def __init__(self, keys):
        self.n_rows = int(keys.shape[0])
        self.sorted_, self.order_ = torch.sort(keys, stable=True)
        right = torch.searchsorted(self.sorted_, self.sorted_, right=True)
        left = torch.searchsorted(self.sorted_, self.sorted_)
        self.copies_ = right - left
        self.unique_ = bool((self.copies_ == 1).all())
        self.uses_ = torch.zeros(self.n_rows, dtype=torch.int64)

    def same_rows(self, other):
        """Whether ``other`` matches the same training rows."""
        return self.n_rows == other.n_rows and torch.equal(self.sorted_, other.sorted_)

    def __call__(self, batch):
        """The training-row indices ``(n,)`` of the rows of ``batch``.

        Raises
        ------
        ValueError
            When a row of the batch is no training row (data augmentation or a
            transformed dataset).
        """
        keys = row_keys(batch)
        pos = torch.searchsorted(self.sorted_, keys).clamp_(max=self.n_rows - 1)
        if not bool((self.sorted_[pos] == keys).all()):
            missing = int((self.sorted_[pos] != keys).sum())
            raise ValueError(
                f"{missing} rows of a training batch are not rows of the X the net was "
                "fitted on, so their training indices are unknown. The recorder needs "
                "batches made of the rows themselves (no augmentation or random "
                "transform in the dataset); record from a torch loop with step() instead.")
        if self.unique_:
            return self.order_[pos]
        # identical rows: the k-th draw of a row with c copies goes to copy k mod c
        n = pos.shape[0]
        ranked, perm = torch.sort(pos, stable=True)
        arange = torch.arange(n)
        first = torch.ones(n, dtype=torch.bool)
        first[1:] = ranked[1:] != ranked[:-1]
        rank = torch.empty_like(pos)
        rank[perm] = arange - torch.cummax(torch.where(first, arange, 0), 0).values
        offset = (self.uses_[pos] + rank) % self.copies_[pos]
        self.uses_.index_add_(0, pos, torch.ones_like(pos))
        return self.order_[pos + offset]
