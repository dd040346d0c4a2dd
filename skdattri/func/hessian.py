"""Hessian-vector products, Gauss-Newton products and dense Hessians.

Conventions shared by every curvature kernel of :mod:`skdattri.func`:

* **Parameters** are a dict ``name -> Tensor``, as for
  :func:`torch.func.functional_call`.
* The **flat space** of dimension ``p`` is the concatenation of the dict's
  tensors, each flattened row-major, in dict order.
* A **block of vectors** is a tensor of shape ``(m, p)``: one row per vector
  (one row per query, like per-sample gradients). A single vector of shape
  ``(p,)`` is accepted too and gives a result of shape ``(p,)``.
* **Batches** are a re-iterable (a list, a ``DataLoader``, or a callable that
  returns a fresh iterator) of plain batches or of ``(batch, weight)`` pairs.
  The loss of a batch is a **mean** over its samples. The curvature of the
  training set is the weighted mean of the per-batch curvatures, the weight of
  a plain batch being its number of samples (the first dimension of its first
  tensor). Results therefore do not depend on how the data are batched.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterator

import torch
from torch.func import grad, jvp, vjp, vmap

from ._grad import flatten_tree, unflatten_like
from ._linear_dense import _linear_model_dense, _NativeRows

__all__ = [
    "LinearOperator",
    "DenseOperator",
    "HessianOperator",
    "GGNOperator",
    "LinearModelOperator",
    "hvp",
    "ggn_vp",
    "hessian",
    "ggn",
]


# --------------------------------------------------------------------------- helpers


def _detach_params(params):
    if not isinstance(params, dict) or not params:
        raise TypeError(
            "params must be a non-empty dict mapping parameter names to tensors, "
            f"got {type(params).__name__}."
        )
    out = {}
    for name, value in params.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"params[{name!r}] must be a torch.Tensor, got {type(value).__name__}.")
        out[name] = value.detach()
    return out


def _n_params(params):
    return sum(t.numel() for t in params.values())


def _batch_size(batch):
    """Number of samples of a plain batch: first dimension of its first array leaf."""
    stack = [batch]
    while stack:
        item = stack.pop(0)
        if isinstance(item, torch.Tensor) or hasattr(item, "shape"):
            shape = tuple(item.shape)
            if len(shape) >= 1:
                return shape[0]
        elif isinstance(item, dict):
            stack = list(item.values()) + stack
        elif isinstance(item, (list, tuple)):
            stack = list(item) + stack
    raise ValueError(
        "Cannot infer the number of samples of a batch (no array with a first dimension "
        "found); pass (batch, weight) pairs instead."
    )


def _is_weight(x):
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _split_weight(item):
    """Return ``(batch, weight)`` for a plain batch or a ``(batch, weight)`` pair."""
    if isinstance(item, (tuple, list)) and len(item) == 2 and _is_weight(item[1]):
        weight = float(item[1])
        if not weight >= 0:
            raise ValueError(f"Batch weights must be non-negative, got {weight}.")
        return item[0], weight
    return item, float(_batch_size(item))


def _iter_batches(batches):
    """Yield ``(batch, weight)`` pairs from a re-iterable or a callable."""
    source = batches() if callable(batches) else batches
    for item in source:
        yield _split_weight(item)


def _check_reiterable(batches):
    if isinstance(batches, Iterator):
        raise TypeError(
            "batches must be re-iterable (a list, a DataLoader, or a callable returning a "
            "fresh iterator); got a one-shot iterator or generator, which would be exhausted "
            "after the first pass over the data."
        )
    if not callable(batches) and not hasattr(batches, "__iter__"):
        raise TypeError(
            f"batches must be an iterable of batches or a callable, got {type(batches).__name__}."
        )
    return batches


def _single_pass(batches):
    """Make a one-shot iterator usable where a re-iterable is expected, for one pass."""
    if isinstance(batches, Iterator):
        return lambda: batches
    return batches


def _weighted_mean(fn, batches):
    """``sum_b w_b fn(batch_b) / sum_b w_b`` over the batches."""
    total = None
    weight_sum = 0.0
    for batch, weight in _iter_batches(batches):
        if weight == 0:
            continue
        value = fn(batch)
        total = value * weight if total is None else total + value * weight
        weight_sum += weight
    if total is None:
        raise ValueError("batches is empty (or all its weights are zero).")
    return total / weight_sum


def _add_l2_(out, l2, block):
    """``out + diag(l2) block`` in ``out``'s memory (``l2``: None, a number or ``(p,)``)."""
    if isinstance(l2, torch.Tensor):
        return out.addcmul_(l2, block)
    return out.add_(block, alpha=float(l2)) if l2 else out


def _l2_vector(l2, params):
    """Normalise ``l2`` to ``None``, a float, or a ``(p,)`` tensor of coefficients."""
    ref = next(iter(params.values()))
    p = _n_params(params)
    if l2 is None:
        return None
    if isinstance(l2, dict):
        unknown = set(l2) - set(params)
        if unknown:
            raise ValueError(f"l2 names unknown parameters: {sorted(unknown)}.")
        pieces = []
        for name, value in params.items():
            coef = torch.as_tensor(l2.get(name, 0.0), dtype=ref.dtype, device=ref.device)
            pieces.append(torch.broadcast_to(coef, value.shape).reshape(-1))
        vec = torch.cat(pieces)
    elif isinstance(l2, torch.Tensor) and l2.dim() > 0:
        if l2.shape != (p,):
            raise ValueError(f"A tensor l2 must have shape ({p},), got {tuple(l2.shape)}.")
        vec = l2.detach().to(dtype=ref.dtype, device=ref.device)
    elif _is_weight(l2) or (isinstance(l2, torch.Tensor) and l2.dim() == 0):
        value = float(l2)
        if value < 0:
            raise ValueError(f"l2 must be non-negative, got {value}.")
        return value if value > 0 else None
    else:
        raise TypeError(
            "l2 must be a float, a dict of per-parameter coefficients, or a tensor of shape "
            f"(p,), got {type(l2).__name__}."
        )
    if bool((vec < 0).any()):
        raise ValueError("l2 coefficients must be non-negative.")
    return vec


def _as_block(V, p, dtype, device):
    """Return ``(V as (m, p), was_1d)``."""
    if not isinstance(V, torch.Tensor):
        raise TypeError(f"V must be a torch.Tensor, got {type(V).__name__}.")
    was_1d = V.dim() == 1
    block = V.unsqueeze(0) if was_1d else V
    if block.dim() != 2 or block.shape[1] != p:
        raise ValueError(
            f"V must have shape (m, {p}) (one vector per row) or ({p},), got {tuple(V.shape)}."
        )
    return block.to(dtype=dtype, device=device), was_1d


# --------------------------------------------------------------------------- operators


class LinearOperator:
    """A symmetric linear map on the flat parameter space, applied to row blocks.

    Subclasses implement :meth:`matvec`. The solvers of :mod:`skdattri.func.ihvp`
    accept any ``LinearOperator``. Stochastic solvers (LiSSA) also use
    :meth:`iter_batches` and :meth:`batch_matvec`, whose weighted mean over the
    batches must equal :meth:`matvec`; the defaults describe an operator made of a
    single "batch", so any subclass works with every solver.

    Parameters
    ----------
    p : int
        Dimension of the flat space.
    dtype : torch.dtype
        Floating dtype of the vectors.
    device : torch.device
        Device of the vectors.

    Attributes
    ----------
    p : int
        Dimension of the flat space.
    dtype : torch.dtype
    device : torch.device

    Examples
    --------
    >>> import torch
    >>> from skdattri.func.hessian import LinearOperator
    >>> class Scale(LinearOperator):
    ...     def matvec(self, V):
    ...         return 2.0 * V
    >>> Scale(3, torch.float64, torch.device("cpu")).to_dense()
    tensor([[2., 0., 0.],
            [0., 2., 0.],
            [0., 0., 2.]], dtype=torch.float64)
    """

    def __init__(self, p, dtype, device):
        self.p = int(p)
        self.dtype = dtype
        self.device = torch.device(device)

    @property
    def shape(self):
        """``(p, p)``."""
        return (self.p, self.p)

    def matvec(self, V):
        """Apply the operator to each row of ``V``.

        Parameters
        ----------
        V : Tensor of shape (m, p) or (p,)

        Returns
        -------
        AV : Tensor of the shape of ``V``
        """
        raise NotImplementedError

    def __call__(self, V):
        return self.matvec(V)

    def iter_batches(self):
        """Yield ``(batch, weight)`` pairs whose components average to the operator."""
        yield None, 1.0

    def batch_matvec(self, batch, V):
        """Apply the component of one batch (default: the whole operator)."""
        return self.matvec(V)

    def to_dense(self, chunk_size=256):
        """Materialise the operator as a ``(p, p)`` tensor (small ``p`` only).

        Parameters
        ----------
        chunk_size : int, default=256
            Number of basis vectors pushed through :meth:`matvec` at a time.

        Returns
        -------
        A : Tensor of shape (p, p)
        """
        dense = torch.empty((self.p, self.p), dtype=self.dtype, device=self.device)
        for start in range(0, self.p, chunk_size):
            stop = min(start + chunk_size, self.p)
            basis = torch.zeros((stop - start, self.p), dtype=self.dtype, device=self.device)
            basis[:, start:stop].fill_diagonal_(1.0)
            dense[start:stop] = self.matvec(basis)
        return _symmetrize_(dense, chunk_size)


def _symmetrize_(dense, chunk_size=1024):
    """``(A + A^T) / 2`` in place, block by block (no second ``(p, p)`` matrix)."""
    p = dense.shape[0]
    for i in range(0, p, chunk_size):
        rows = slice(i, min(i + chunk_size, p))
        for j in range(i, p, chunk_size):
            cols = slice(j, min(j + chunk_size, p))
            mean = 0.5 * (dense[rows, cols] + dense[cols, rows].T)
            dense[rows, cols] = mean
            dense[cols, rows] = mean.T
    return dense


class DenseOperator(LinearOperator):
    """A :class:`LinearOperator` backed by an explicit symmetric ``(p, p)`` matrix.

    Parameters
    ----------
    matrix : Tensor of shape (p, p)
        Symmetric matrix.

    Examples
    --------
    >>> import torch
    >>> from skdattri.func.hessian import DenseOperator
    >>> op = DenseOperator(torch.tensor([[2.0, 1.0], [1.0, 3.0]]))
    >>> op.matvec(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    tensor([[2., 1.],
            [1., 3.]])
    """

    def __init__(self, matrix):
        if not isinstance(matrix, torch.Tensor) or matrix.dim() != 2:
            raise TypeError("matrix must be a 2-D torch.Tensor.")
        if matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"matrix must be square, got shape {tuple(matrix.shape)}.")
        super().__init__(matrix.shape[0], matrix.dtype, matrix.device)
        self.matrix = matrix

    def matvec(self, V):
        block, was_1d = _as_block(V, self.p, self.dtype, self.device)
        out = block @ self.matrix.T
        return out[0] if was_1d else out

    def to_dense(self, chunk_size=256):
        return 0.5 * (self.matrix + self.matrix.T)


class _BatchedOperator(LinearOperator):
    """Weighted mean over batches of per-batch curvature products, plus an L2 term."""

    def __init__(self, params, batches, l2, chunk_size, vectorize):
        self.params = _detach_params(params)
        self.batches = _check_reiterable(batches)
        ref = next(iter(self.params.values()))
        super().__init__(_n_params(self.params), ref.dtype, ref.device)
        self.l2 = _l2_vector(l2, self.params)
        self.chunk_size = chunk_size
        self.vectorize = vectorize

    def _curvature(self, batch, block):  # (m, p) -> (m, p), without l2
        raise NotImplementedError

    def _apply(self, one, block):
        if self.vectorize:
            return vmap(one, chunk_size=self.chunk_size)(block)
        return torch.stack([one(row) for row in block])

    def _add_l2(self, out, block):  # out: a fresh product, updated in place
        return _add_l2_(out, self.l2, block)

    def iter_batches(self):
        return _iter_batches(self.batches)

    def batch_matvec(self, batch, V):
        block, was_1d = _as_block(V, self.p, self.dtype, self.device)
        out = self._add_l2(self._curvature(batch, block), block)
        return out[0] if was_1d else out

    def data_matvec(self, V):
        """The product without the L2 term: ``(A - diag(l2)) v`` for each row."""
        block, was_1d = _as_block(V, self.p, self.dtype, self.device)
        out = _weighted_mean(lambda batch: self._curvature(batch, block), self.batches)
        return out[0] if was_1d else out

    def matvec(self, V):
        block, was_1d = _as_block(V, self.p, self.dtype, self.device)
        out = self._add_l2(self.data_matvec(block), block)
        return out[0] if was_1d else out


class HessianOperator(_BatchedOperator):
    """Hessian of the mean training loss as a :class:`LinearOperator`.

    ``H = sum_b w_b * Hess(loss_fn(params, batch_b)) / sum_b w_b + diag(l2)``, the
    Hessian-vector products computed forward-over-reverse (``torch.func.jvp`` of
    ``torch.func.grad``), vectorised over the rows of a block with ``vmap``.

    Parameters
    ----------
    loss_fn : callable
        ``loss_fn(params, batch) -> scalar Tensor``: the mean loss over ``batch``.
    params : dict of str to Tensor
        Point at which the Hessian is taken (detached).
    batches : re-iterable or callable
        Batches, or ``(batch, weight)`` pairs (see the module docstring).
    l2 : float, dict or Tensor of shape (p,), default=0.0
        Coefficients of an L2 penalty ``0.5 * sum_k l2_k * theta_k**2`` added to the
        loss, i.e. ``diag(l2)`` added to the Hessian. A dict maps parameter names to
        coefficients (scalars or tensors broadcastable to the parameter); absent names
        are unpenalised (e.g. an intercept).
    chunk_size : int, default=None
        Passed to :func:`torch.vmap`: how many vectors of a block go through one
        vectorised call (``None``: all at once). Bounds memory for wide blocks.
    vectorize : bool, default=True
        If False, loop over the rows of a block instead of ``vmap`` (for models with
        operations that ``vmap`` does not support).

    Attributes
    ----------
    params : dict of str to Tensor
    p : int
    l2 : None, float or Tensor of shape (p,)

    See Also
    --------
    hvp : One-shot Hessian-vector product.
    GGNOperator : Gauss-Newton curvature, positive semi-definite.

    Examples
    --------
    >>> import torch
    >>> from skdattri.func.hessian import HessianOperator
    >>> X = torch.tensor([[1.0, 2.0], [3.0, -1.0]], dtype=torch.float64)
    >>> loss = lambda p, b: 0.5 * ((b @ p["w"]) ** 2).mean()
    >>> op = HessianOperator(loss, {"w": torch.zeros(2, dtype=torch.float64)}, [X])
    >>> op.matvec(torch.eye(2, dtype=torch.float64))  # X^T X / n
    tensor([[ 5.0000, -0.5000],
            [-0.5000,  2.5000]], dtype=torch.float64)
    """

    def __init__(self, loss_fn, params, batches, *, l2=0.0, chunk_size=None, vectorize=True):
        if not callable(loss_fn):
            raise TypeError("loss_fn must be callable: loss_fn(params, batch) -> scalar.")
        self.loss_fn = loss_fn
        super().__init__(params, batches, l2, chunk_size, vectorize)

    def _curvature(self, batch, block):
        params = self.params
        grad_fn = grad(lambda q: self.loss_fn(q, batch))

        def one(row):
            _, tangent_out = jvp(grad_fn, (params,), (unflatten_like(row, params),))
            return flatten_tree(tangent_out)

        return self._apply(one, block)


class GGNOperator(_BatchedOperator):
    """Generalised Gauss-Newton (Fisher) curvature as a :class:`LinearOperator`.

    ``G = sum_b w_b J_b^T H_b J_b / sum_b w_b + diag(l2)`` with ``J_b`` the Jacobian
    of ``output_fn(params, batch_b)`` with respect to the parameters and ``H_b`` the
    Hessian of ``output_loss_fn(outputs, batch_b)`` with respect to the outputs. For a
    convex output loss (cross-entropy, squared error) ``G`` is positive
    semi-definite even where the Hessian of the loss is indefinite; for the
    canonical losses it equals the (true) Fisher information.

    Parameters
    ----------
    output_fn : callable
        ``output_fn(params, batch) -> Tensor``: model outputs (e.g. logits) of a batch.
    output_loss_fn : callable
        ``output_loss_fn(outputs, batch) -> scalar Tensor``: the mean loss of the batch
        given its outputs.
    params : dict of str to Tensor
    batches : re-iterable or callable
    l2 : float, dict or Tensor of shape (p,), default=0.0
        As in :class:`HessianOperator`.
    chunk_size : int, default=None
    vectorize : bool, default=True

    See Also
    --------
    ggn_vp : One-shot Gauss-Newton-vector product.

    Examples
    --------
    >>> import torch
    >>> from skdattri.func.hessian import GGNOperator
    >>> X = torch.tensor([[1.0, 2.0], [3.0, -1.0]], dtype=torch.float64)
    >>> out = lambda p, b: b @ p["w"]
    >>> loss = lambda o, b: 0.5 * (o ** 2).mean()
    >>> op = GGNOperator(out, loss, {"w": torch.zeros(2, dtype=torch.float64)}, [X])
    >>> op.matvec(torch.tensor([1.0, 0.0], dtype=torch.float64))
    tensor([ 5.0000, -0.5000], dtype=torch.float64)
    """

    def __init__(
        self, output_fn, output_loss_fn, params, batches, *, l2=0.0, chunk_size=None,
        vectorize=True,
    ):
        if not callable(output_fn) or not callable(output_loss_fn):
            raise TypeError("output_fn and output_loss_fn must be callable.")
        self.output_fn = output_fn
        self.output_loss_fn = output_loss_fn
        super().__init__(params, batches, l2, chunk_size, vectorize)

    def _curvature(self, batch, block):
        params = self.params

        def forward(q):
            return self.output_fn(q, batch)

        outputs, vjp_fn = vjp(forward, params)
        grad_out = grad(lambda o: self.output_loss_fn(o, batch))

        def one(row):
            _, jv = jvp(forward, (params,), (unflatten_like(row, params),))
            _, hjv = jvp(grad_out, (outputs,), (jv,))
            return flatten_tree(vjp_fn(hjv)[0])

        return self._apply(one, block)


# --------------------------------------------------------------------------- functions


def hvp(loss_fn, params, batches, V, *, l2=0.0, chunk_size=None, vectorize=True):
    """Hessian-vector products of the mean training loss for a block of vectors.

    Parameters
    ----------
    loss_fn : callable
        ``loss_fn(params, batch) -> scalar Tensor``: the mean loss over ``batch``.
    params : dict of str to Tensor
        Point at which the Hessian is taken.
    batches : iterable or callable
        Batches or ``(batch, weight)`` pairs; ``H`` is the weighted mean of the
        per-batch Hessians (a plain batch weighs its number of samples).
    V : Tensor of shape (m, p) or (p,)
        Vectors in the flat parameter space, one per row.
    l2 : float, dict or Tensor of shape (p,), default=0.0
        L2 coefficients added to the diagonal of ``H`` (see :class:`HessianOperator`).
    chunk_size : int, default=None
        ``vmap`` chunk size over the rows of ``V``.
    vectorize : bool, default=True
        Use ``vmap`` over the rows of ``V`` (else a loop).

    Returns
    -------
    HV : Tensor of the shape of ``V``
        ``(H + diag(l2)) v`` for each row ``v`` of ``V``.

    See Also
    --------
    HessianOperator : The same product as a reusable operator.

    Examples
    --------
    >>> import torch
    >>> from skdattri.func.hessian import hvp
    >>> params = {"w": torch.tensor([1.0, 2.0], dtype=torch.float64)}
    >>> loss = lambda p, b: (b * p["w"] ** 3).sum(1).mean()   # Hessian diag(6 b w)
    >>> batches = [torch.ones(3, 2, dtype=torch.float64)]
    >>> hvp(loss, params, batches, torch.eye(2, dtype=torch.float64), l2=1.0)
    tensor([[ 7.,  0.],
            [ 0., 13.]], dtype=torch.float64)
    """
    op = HessianOperator(
        loss_fn, params, _single_pass(batches), l2=l2,
        chunk_size=chunk_size, vectorize=vectorize,
    )
    return op.matvec(V)


def ggn_vp(
    output_fn, output_loss_fn, params, batches, V, *, l2=0.0, chunk_size=None, vectorize=True
):
    """Generalised Gauss-Newton (Fisher) vector products ``J^T H_out J v``.

    Parameters
    ----------
    output_fn : callable
        ``output_fn(params, batch) -> Tensor`` (e.g. logits).
    output_loss_fn : callable
        ``output_loss_fn(outputs, batch) -> scalar Tensor``: mean loss of the batch.
    params : dict of str to Tensor
    batches : iterable or callable
        Batches or ``(batch, weight)`` pairs.
    V : Tensor of shape (m, p) or (p,)
    l2 : float, dict or Tensor of shape (p,), default=0.0
    chunk_size : int, default=None
    vectorize : bool, default=True

    Returns
    -------
    GV : Tensor of the shape of ``V``

    See Also
    --------
    GGNOperator : The same product as a reusable operator.

    Examples
    --------
    >>> import torch
    >>> import torch.nn.functional as F
    >>> from skdattri.func.hessian import ggn_vp
    >>> X = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    >>> y = torch.tensor([1.0, 0.0], dtype=torch.float64)
    >>> out = lambda p, b: b[0] @ p["w"]
    >>> loss = lambda o, b: F.binary_cross_entropy_with_logits(o, b[1])
    >>> w = {"w": torch.zeros(2, dtype=torch.float64)}
    >>> ggn_vp(out, loss, w, [(X, y)], torch.eye(2, dtype=torch.float64))  # X^T X / 4n
    tensor([[0.1250, 0.0000],
            [0.0000, 0.5000]], dtype=torch.float64)
    """
    op = GGNOperator(
        output_fn, output_loss_fn, params, _single_pass(batches),
        l2=l2, chunk_size=chunk_size, vectorize=vectorize,
    )
    return op.matvec(V)


def hessian(loss_fn, params, batches, *, l2=0.0):
    """Dense Hessian of the mean training loss (small models only).

    Each batch's Hessian is computed with :func:`torch.func.hessian`
    (forward-over-reverse) with respect to the flat parameter vector; the result
    is the weighted mean over batches, symmetrised, plus ``diag(l2)``.

    Parameters
    ----------
    loss_fn : callable
        ``loss_fn(params, batch) -> scalar Tensor``: the mean loss over ``batch``.
    params : dict of str to Tensor
    batches : iterable or callable
        Batches or ``(batch, weight)`` pairs.
    l2 : float, dict or Tensor of shape (p,), default=0.0

    Returns
    -------
    H : Tensor of shape (p, p)
        Memory is ``p**2`` floats: use :class:`HessianOperator` for large models.

    Examples
    --------
    >>> import torch
    >>> from skdattri.func.hessian import hessian
    >>> X = torch.tensor([[1.0, 2.0], [3.0, -1.0]], dtype=torch.float64)
    >>> loss = lambda p, b: 0.5 * ((b @ p["w"]) ** 2).mean()
    >>> batches = [X[:1], X[1:]]                   # two batches of one sample
    >>> hessian(loss, {"w": torch.zeros(2, dtype=torch.float64)}, batches, l2=1.0)
    tensor([[ 6.0000, -0.5000],
            [-0.5000,  3.5000]], dtype=torch.float64)
    """
    params = _detach_params(params)
    flat0 = flatten_tree(params)

    def batch_hessian(batch):
        return torch.func.hessian(lambda flat: loss_fn(unflatten_like(flat, params), batch))(flat0)

    dense = _weighted_mean(batch_hessian, batches)
    dense = 0.5 * (dense + dense.T)
    l2 = _l2_vector(l2, params)
    if l2 is None:
        return dense
    if isinstance(l2, float):
        return dense + l2 * torch.eye(dense.shape[0], dtype=dense.dtype, device=dense.device)
    return dense + torch.diag(l2)


def ggn(output_fn, output_loss_fn, params, batches, *, l2=0.0, chunk_size=256):
    """Dense generalised Gauss-Newton matrix (small models only).

    Parameters
    ----------
    output_fn : callable
        ``output_fn(params, batch) -> Tensor``.
    output_loss_fn : callable
        ``output_loss_fn(outputs, batch) -> scalar Tensor``: mean loss of the batch.
    params : dict of str to Tensor
    batches : iterable or callable
    l2 : float, dict or Tensor of shape (p,), default=0.0
    chunk_size : int, default=256
        Number of basis vectors per pass over the data.

    Returns
    -------
    G : Tensor of shape (p, p)

    Examples
    --------
    >>> import torch
    >>> from skdattri.func.hessian import ggn
    >>> X = torch.tensor([[1.0, 2.0], [3.0, -1.0]], dtype=torch.float64)
    >>> out = lambda p, b: torch.tanh(b @ p["w"])     # non-linear outputs
    >>> loss = lambda o, b: 0.5 * (o ** 2).mean()
    >>> ggn(out, loss, {"w": torch.zeros(2, dtype=torch.float64)}, [X])
    tensor([[ 5.0000, -0.5000],
            [-0.5000,  2.5000]], dtype=torch.float64)
    """
    op = GGNOperator(
        output_fn, output_loss_fn, params, _single_pass(batches), l2=l2
    )
    return LinearOperator.to_dense(op, chunk_size=chunk_size)


# largest number of outputs for which LinearModelOperator keeps the (n, k, k) output
# Hessians in memory instead of recomputing products through torch.func
_CACHE_MAX_OUTPUTS = 64


class LinearModelOperator(_BatchedOperator):
    """Exact Hessian of a linear model's mean loss, in closed form.

    For ``z_i = W x_i + b`` and a per-sample loss ``l(z_i, y_i)`` the Hessian is
    ``H = mean_i J_i^T A_i J_i + diag(l2)`` with ``A_i`` the Hessian of ``l`` with
    respect to ``z_i``: the Gauss-Newton matrix is exact because ``z`` is linear in the
    parameters. Products cost a few matrix multiplications per batch (no
    forward-over-reverse pass through a network), and :meth:`to_dense` builds the
    matrix from the ``A_i`` directly.

    Parameters
    ----------
    output_loss_fn : callable
        ``output_loss_fn(Z, y) -> Tensor of shape (n,)``: per-sample losses of the
        outputs ``Z`` of shape ``(n, k)``.
    params : dict of str to Tensor
        The differentiated parameters: ``weight_name`` (shape ``(k, d)``) and/or
        ``bias_name`` (shape ``(k,)``), in the flat order of the dict.
    batches : re-iterable
        ``(X, y)`` batches with ``X`` of shape ``(n_b, d)`` (or ``(batch, weight)``
        pairs); the Hessian is the sample-weighted mean over batches.
    weight : Tensor of shape (k, d)
        The layer's weight (also when only the bias is differentiated).
    bias : Tensor of shape (k,) or None
        The layer's bias.
    weight_name, bias_name : str
        Names of the weight and bias in ``params``.
    l2 : float, dict or Tensor of shape (p,), default=0.0
        As in :class:`HessianOperator`.

    Examples
    --------
    >>> import torch
    >>> import torch.nn.functional as F
    >>> from skdattri.func.hessian import LinearModelOperator, hessian
    >>> X = torch.tensor([[1.0, 2.0], [3.0, -1.0], [0.5, 0.5]], dtype=torch.float64)
    >>> y = torch.tensor([0, 1, 1])
    >>> W, b = torch.zeros(2, 2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
    >>> ce = lambda Z, t: F.cross_entropy(Z, t, reduction="none")
    >>> op = LinearModelOperator(ce, {"w": W, "b": b}, [(X, y)], weight=W, bias=b,
    ...                          weight_name="w", bias_name="b")
    >>> full = hessian(lambda p, bt: ce(bt[0] @ p["w"].T + p["b"], bt[1]).mean(),
    ...                {"w": W, "b": b}, [(X, y)])
    >>> bool(torch.allclose(op.to_dense(), full))
    True
    """

    def __init__(self, output_loss_fn, params, batches, *, weight, bias=None,
                 weight_name="weight", bias_name="bias", l2=0.0, output_hessian_fn=None):
        if not callable(output_loss_fn):
            raise TypeError("output_loss_fn must be callable: (Z, y) -> per-sample losses.")
        names = list(params)
        if any(n not in (weight_name, bias_name) for n in names):
            raise ValueError(
                f"params may only hold {weight_name!r} and {bias_name!r}, got {names}."
            )
        self.output_loss_fn = output_loss_fn
        self.weight = weight.detach()
        self.bias = None if bias is None else bias.detach()
        self.weight_name, self.bias_name = weight_name, bias_name
        self.output_hessian_fn = output_hessian_fn
        super().__init__(params, list(_iter_batches(_check_reiterable(batches))), l2, None,
                         True)
        # k x k output Hessians of every sample, computed once here and reused by every
        # product (the operator is then read-only)
        self._hessians = ([self._output_hessians(b[0], b[1]) for b, _ in self.batches]
                          if self.weight.shape[0] <= _CACHE_MAX_OUTPUTS else None)

    def _split(self, block):
        """Tangent weight ``(m, k, d)`` and bias ``(m, k)`` of flat rows (``None`` if absent)."""
        m = block.shape[0]
        k, d = self.weight.shape
        tw = tb = None
        start = 0
        for name, ref in self.params.items():
            piece = block[:, start:start + ref.numel()]
            if name == self.weight_name:
                tw = piece.reshape(m, k, d)
            else:
                tb = piece.reshape(m, k)
            start += ref.numel()
        return tw, tb

    def _outputs(self, X):
        Z = X @ self.weight.T
        return Z if self.bias is None else Z + self.bias

    def _output_hessians(self, X, y):
        """Per-sample Hessians of the loss w.r.t. the outputs, ``(n, k, k)``."""
        Z = self._outputs(X.reshape(X.shape[0], -1).to(self.dtype))
        if self.output_hessian_fn is not None:
            return self.output_hessian_fn(Z, y)

        def per_sample(z, t):
            return self.output_loss_fn(z[None], t[None])[0]

        return vmap(torch.func.hessian(per_sample))(Z, y)

    def _batch_hessians(self, batch):
        """The cached output Hessians of one of the operator's batches (else computed)."""
        if self._hessians is not None:
            for (b, _), H in zip(self.batches, self._hessians):
                if b is batch:
                    return H
        return self._output_hessians(batch[0], batch[1])

    def _curvature(self, batch, block):
        X0 = batch[0]
        X = X0.reshape(X0.shape[0], -1).to(block.dtype)
        n, m = X.shape[0], block.shape[0]
        k, d = self.weight.shape
        tw, tb = self._split(block)
        # U[i, r, c] = tw_r[c] . x_i + tb_r[c]: one GEMM, samples first (then batched
        # products over the samples need no permuted copy)
        if tw is None:
            U = tb[None].expand(n, m, k).contiguous()
        else:
            U = (X @ tw.reshape(m * k, d).T).view(n, m, k)
            if tb is not None:
                U += tb
        HU = self._output_products(batch, X, U)
        # the mean's 1 / n is applied as each part is written into its rows
        out = torch.empty_like(block)
        start = 0
        for name, ref in self.params.items():
            rows = out[:, start:start + ref.numel()]
            if name == self.weight_name:
                torch.mul((HU.view(n, m * k).T @ X).view(m, k, d), 1.0 / n,
                          out=rows.view(m, k, d))
            else:
                torch.mul(HU.sum(0), 1.0 / n, out=rows)
            start += ref.numel()
        return out

    def _output_products(self, batch, X, U):
        """``A_i u`` for every sample ``i`` of ``batch`` (inputs ``X``) and tangent
        ``u = U[i, r]`` of the outputs: ``(n, m, k)``."""
        if self.weight.shape[0] <= _CACHE_MAX_OUTPUTS:
            return torch.bmm(U, self._batch_hessians(batch))  # A_i symmetric
        Z = self._outputs(X)
        grad_z = grad(lambda z: self.output_loss_fn(z, batch[1]).sum())

        def hess_out(u):
            return jvp(grad_z, (Z,), (u,))[1]

        return vmap(hess_out, in_dims=1, out_dims=1)(U)

    def native_rows(self):
        """The rows' own layout (:class:`~skdattri.func._linear_dense._NativeRows`) when
        the weight is differentiated, else ``None``."""
        return _NativeRows(self) if self.weight_name in self.params else None

    def to_dense(self, chunk_size=256):
        return _linear_model_dense(self)
