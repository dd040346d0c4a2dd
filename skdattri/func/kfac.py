"""K-FAC and EK-FAC curvature for ``nn.Linear`` and ``nn.Conv2d`` layers.

K-FAC (Martens and Grosse, 2015; Grosse and Martens, 2016 for convolutions)
approximates the Fisher block of a layer with weight ``W`` of shape
``(out, in)`` (bias as an extra input column fed with 1) by a Kronecker product
``A (x) S`` of the second moments of the layer inputs ``a`` and of the gradients
``g`` of the loss with respect to the layer outputs. EK-FAC (George et al., 2018;
Grosse et al., 2023) keeps the Kronecker eigenbasis ``Q_S, Q_A`` and replaces
the eigenvalues by the exact second moments of the per-sample gradients in that
basis, ``Lambda = E[(Q_S^T G Q_A)**2]``.

Per-layer layout: a gradient (or query vector) of a layer is a tensor of shape
``(out, in[+1])`` -- the weight flattened to ``(out, in)`` (for a convolution
``in = in_channels * kh * kw``, the ``nn.Conv2d`` weight order) with the bias as
the last column. A block of ``m`` of them has shape ``(m, out, in[+1])``.
:func:`layer_grads_from_flat` and :func:`layer_grads_to_flat` convert to and from
the flat ``(m, p)`` layout of a parameter dict (see :mod:`skdattri.func.hessian`).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

from .._utils import BLOCK_ELEMENTS, _rows_per_block, _torch_generator
from ..model._loss import _first, make_loss
from .hessian import _check_reiterable, _iter_batches
from .hooks import LayerCapture, find_layers, per_sample_layer_grads, weight_layout

__all__ = [
    "EKFACIHVP",
    "KFACFactors",
    "fit_ekfac",
    "ekfac_ihvp",
    "layer_grads_from_flat",
    "layer_grads_to_flat",
]



@dataclass(repr=False)
class KFACFactors:
    """Kronecker-factored curvature of a set of layers (tensors and names only).

    Every dict is keyed by the layer's module name (as in ``named_modules``).
    The object pickles and moves between devices with :meth:`to`.

    Attributes
    ----------
    layers : list of str
        Module names, in module order.
    weight_names, bias_names : dict of str to str (or None)
        Parameter names (as in ``named_parameters``) of each layer's weight and bias.
    weight_shapes : dict of str to tuple
        Shape of each layer's weight in the per-layer layout ``(out, ...)``.
    transposed : dict of str to bool
        Layers whose weight parameter stores the transpose ``(in, out)`` of that layout
        (Hugging Face ``Conv1D``); missing layers are not transposed.
    activation_eigenvalues : dict of str to Tensor of shape (in[+1],)
        Eigenvalues of ``A``, ascending.
    activation_eigenvectors : dict of str to Tensor of shape (in[+1], in[+1])
        ``Q_A``, eigenvectors in columns.
    gradient_eigenvalues : dict of str to Tensor of shape (out,)
    gradient_eigenvectors : dict of str to Tensor of shape (out, out)
        ``Q_S``, eigenvectors in columns.
    eigenvalues : dict of str to Tensor of shape (out, in[+1])
        Eigenvalues of the layer's curvature in the Kronecker eigenbasis:
        ``E[(Q_S^T G Q_A)**2]`` (EK-FAC) if ``corrected`` else the K-FAC products
        ``s_o * a_i``.
    corrected : bool
        Whether the EK-FAC eigenvalue correction was applied.
    fisher : str
        ``"true"`` or ``"empirical"``.
    total_weight : float
        Total sample weight the factors were averaged over.
    """

    layers: list
    weight_names: dict
    bias_names: dict
    weight_shapes: dict
    activation_eigenvalues: dict
    activation_eigenvectors: dict
    gradient_eigenvalues: dict
    gradient_eigenvectors: dict
    eigenvalues: dict
    corrected: bool = True
    fisher: str = "true"
    total_weight: float = 0.0
    transposed: dict = None

    _TENSOR_FIELDS = (
        "activation_eigenvalues", "activation_eigenvectors", "gradient_eigenvalues",
        "gradient_eigenvectors", "eigenvalues",
    )

    def to(self, device=None, dtype=None):
        """Return a copy with every tensor moved to ``device`` / cast to ``dtype``."""
        kwargs = {name: getattr(self, name) for name in (
            "layers", "weight_names", "bias_names", "weight_shapes", "corrected", "fisher",
            "total_weight", "transposed",
        )}
        for name in self._TENSOR_FIELDS:
            tensors = getattr(self, name)
            kwargs[name] = {k: v.to(device=device, dtype=dtype) for k, v in tensors.items()}
        return KFACFactors(**kwargs)

    def __repr__(self):
        kind = "EK-FAC" if self.corrected else "K-FAC"
        shapes = ", ".join(f"{k!r}: {tuple(v.shape)}" for k, v in self.eigenvalues.items())
        return f"KFACFactors({kind}, fisher={self.fisher!r}, layers={{{shapes}}})"


# --------------------------------------------------------------------------- batches


def _unpack(batch):
    if isinstance(batch, (tuple, list)):
        if len(batch) == 2:
            return batch[0], batch[1]
        if len(batch) == 1:
            return batch[0], None
    return batch, None


def _default_forward(module, X):
    return module(**X) if isinstance(X, dict) else module(X)


def _batch_statistics(module, capture, batch, *, forward, loss, fisher, sample_targets, gen):
    """Layer inputs ``a (n, T, in1)`` and output grads ``g (n, T, out)`` for one batch."""
    X, y = _unpack(batch)
    capture.reset()
    with torch.enable_grad():
        outputs = forward(module, X)
        if fisher == "true":
            targets = (sample_targets(_first(outputs).detach(), gen)
                       if sample_targets is not None else loss.sample_targets(outputs, gen, y))
        elif y is None:
            raise ValueError("fisher='empirical' needs (X, y) batches with the true targets.")
        else:
            targets = y
        losses = loss.loss(outputs, targets)
        stats = capture.collect(losses.sum())
    capture.reset()
    return stats, losses.shape[0]


def _chunks(n, per_sample):
    size = _rows_per_block(per_sample, BLOCK_ELEMENTS)
    return [(s, min(s + size, n)) for s in range(0, n, size)]


# --------------------------------------------------------------------------- fit


def fit_ekfac(
    module, batches, *, loss="cross_entropy", fisher="true", layers=None, forward=None,
    sample_targets=None, correct_eigenvalues=True, random_state=None,
):
    """Fit K-FAC / EK-FAC factors of the ``nn.Linear`` and ``nn.Conv2d`` layers.

    Two passes over ``batches``. The first accumulates, for every selected layer,
    ``A = E[(1/T) sum_t a_t a_t^T]`` and ``S = E[sum_t g_t g_t^T]`` over samples,
    where ``t`` runs over the ``T`` positions at which the layer is applied
    (1 for a plain ``Linear``; sequence positions for a ``Linear`` on
    ``(n, ..., in)`` inputs; output pixels for a ``Conv2d``, whose inputs are
    unfolded into patches) and ``g`` is the gradient of the *per-sample* loss with
    respect to the layer output: the KFC convention (Grosse and Martens, 2016),
    so that ``A (x) S`` approximates ``E[vec(G) vec(G)^T]`` for the per-sample
    weight gradient ``G = sum_t g_t a_t^T``. Both are eigendecomposed. The second
    pass (``correct_eigenvalues=True``) computes the EK-FAC eigenvalues
    ``E[(Q_S^T G Q_A)**2]`` from per-sample gradients obtained from the same hooks
    (no ``vmap``). Expectations are sample-weighted means over all batches.

    Parameters
    ----------
    module : torch.nn.Module
        The model, used in eval mode during the fit (its mode and the
        ``requires_grad`` flags of its parameters are restored afterwards).
        Parameters are not modified and no ``.grad`` is accumulated.
    batches : re-iterable or callable
        Batches ``(X, y)`` (or ``(X,)`` with ``fisher="true"``), or
        ``((X, y), weight)`` pairs; a plain batch weighs its number of samples.
    loss : {"cross_entropy", "binary_cross_entropy", "mse"} or callable, \
default="cross_entropy"
        Per-sample loss of the outputs: cross-entropy on ``(n, n_classes)`` logits,
        binary cross-entropy on ``(n,)`` or ``(n, 1)`` logits, or squared error
        averaged over the output dimensions of a sample (``nn.MSELoss``). A callable
        ``loss(outputs, targets) -> (n,)`` gives per-sample losses.
    fisher : {"true", "empirical"}, default="true"
        ``"true"``: targets sampled from the model's predictive distribution (for
        these losses, the expected Fisher equals the Gauss-Newton matrix);
        ``"empirical"``: the batch's own targets.
    layers : list of str, default=None
        Module names or prefixes (or parameter names such as ``"fc.weight"``) of
        the layers to include; ``None``: every ``nn.Linear`` and ``nn.Conv2d``.
        Other layer types are skipped.
    forward : callable, default=None
        ``forward(module, X) -> outputs``; default ``module(X)`` (``module(**X)`` for
        a dict).
    sample_targets : callable, default=None
        ``sample_targets(outputs, generator) -> targets`` for ``fisher="true"``;
        required with a callable ``loss``.
    correct_eigenvalues : bool, default=True
        EK-FAC (True) or plain K-FAC eigenvalues (False, a single pass).
    random_state : int, RandomState instance, torch.Generator or None, default=None
        Sampling of the targets for ``fisher="true"``.

    Returns
    -------
    factors : KFACFactors

    See Also
    --------
    ekfac_ihvp : Inverse curvature-vector products with the factors.

    Notes
    -----
    For one layer applied at one position, with ``fisher="empirical"``, the
    EK-FAC eigenvalues are exactly the diagonal of the empirical Fisher block in
    the Kronecker eigenbasis. Layers with ``groups > 1`` or non-zero padding modes
    are not supported. Use eval-mode models: batch-coupled layers (batch norm in
    training mode) would mix the per-sample gradients.

    References
    ----------
    Martens and Grosse, "Optimizing neural networks with Kronecker-factored
    approximate curvature", ICML 2015. Grosse and Martens, "A Kronecker-factored
    approximate Fisher matrix for convolution layers", ICML 2016. George et al.,
    "Fast approximate natural gradient descent in a Kronecker-factored
    eigenbasis", NeurIPS 2018. Grosse et al., "Studying large language model
    generalization with influence functions", 2023.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from skdattri.func.kfac import fit_ekfac, ekfac_ihvp
    >>> _ = torch.manual_seed(0)
    >>> net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    >>> X = torch.randn(20, 3, dtype=torch.float64)
    >>> y = torch.randint(0, 2, (20,))
    >>> factors = fit_ekfac(net, [(X[:10], y[:10]), (X[10:], y[10:])], random_state=0)
    >>> factors
    KFACFactors(EK-FAC, fisher='true', layers={'0': (4, 4), '2': (2, 5)})
    >>> V = {"2": torch.ones(1, 2, 5, dtype=torch.float64)}
    >>> ekfac_ihvp(factors, V, damping=0.1)["2"].shape
    torch.Size([1, 2, 5])
    """
    if fisher not in ("true", "empirical"):
        raise ValueError(f"fisher must be 'true' or 'empirical', got {fisher!r}.")
    loss = make_loss(loss)
    if fisher == "true" and sample_targets is None and not loss.has_distribution:
        raise ValueError(
            "fisher='true' with a loss that defines no predictive distribution (a callable, "
            "a hinge loss, a custom criterion) needs sample_targets(outputs, generator) to "
            "draw targets from the model; or use fisher='empirical'."
        )
    batches = _check_reiterable(batches)
    selected = find_layers(module, layers)
    forward = _default_forward if forward is None else forward
    ref = selected[0][1].weight
    gen = _torch_generator(random_state, device=ref.device)
    kwargs = dict(forward=forward, loss=loss, fisher=fisher, sample_targets=sample_targets,
                  gen=gen)

    was_training = module.training
    flags = {id(mod.weight): mod.weight.requires_grad for _, mod in selected}
    try:
        module.eval()
        for _, mod in selected:
            mod.weight.requires_grad_(True)
        with LayerCapture(selected) as capture:
            # pass 1: Kronecker factors
            A = {name: 0.0 for name, _ in selected}
            S = {name: 0.0 for name, _ in selected}
            total = 0.0
            for batch, weight in _iter_batches(batches):
                if weight == 0:
                    continue
                stats, n = _batch_statistics(module, capture, batch, **kwargs)
                per_sample = weight / n
                for name, (a, g) in stats.items():
                    T = a.shape[1]
                    a2 = a.reshape(-1, a.shape[-1])
                    g2 = g.reshape(-1, g.shape[-1])
                    A[name] = A[name] + (per_sample / T) * (a2.T @ a2)
                    S[name] = S[name] + per_sample * (g2.T @ g2)
                total += weight
            if total == 0:
                raise ValueError("batches is empty (or all its weights are zero).")
            eig_a, vec_a, eig_s, vec_s = {}, {}, {}, {}
            for name, _ in selected:
                a_cov = A[name] / total
                s_cov = S[name] / total
                eig_a[name], vec_a[name] = torch.linalg.eigh(0.5 * (a_cov + a_cov.T))
                eig_s[name], vec_s[name] = torch.linalg.eigh(0.5 * (s_cov + s_cov.T))

            # pass 2: eigenvalue correction
            if correct_eigenvalues:
                lam = {name: 0.0 for name, _ in selected}
                for batch, weight in _iter_batches(batches):
                    if weight == 0:
                        continue
                    stats, n = _batch_statistics(module, capture, batch, **kwargs)
                    per_sample = weight / n
                    for name, (a, g) in stats.items():
                        a_rot = a @ vec_a[name]
                        g_rot = g @ vec_s[name]
                        per = a.shape[1] * (a.shape[2] + g.shape[2]) + a.shape[2] * g.shape[2]
                        for start, stop in _chunks(a.shape[0], per):
                            G = per_sample_layer_grads(a_rot[start:stop], g_rot[start:stop])
                            lam[name] = lam[name] + per_sample * (G * G).sum(0)
                eigenvalues = {name: lam[name] / total for name, _ in selected}
            else:
                eigenvalues = {
                    name: torch.outer(eig_s[name], eig_a[name]).clamp_min(0.0)
                    for name, _ in selected
                }
    finally:
        for _, mod in selected:
            mod.weight.requires_grad_(flags[id(mod.weight)])
        module.train(was_training)

    prefix = {name: (f"{name}." if name else "") for name, _ in selected}
    return KFACFactors(
        layers=[name for name, _ in selected],
        weight_names={name: prefix[name] + "weight" for name, _ in selected},
        bias_names={
            name: (prefix[name] + "bias" if mod.bias is not None else None)
            for name, mod in selected
        },
        weight_shapes={name: weight_layout(mod)[0] for name, mod in selected},
        transposed={name: weight_layout(mod)[1] for name, mod in selected},
        activation_eigenvalues=eig_a,
        activation_eigenvectors=vec_a,
        gradient_eigenvalues=eig_s,
        gradient_eigenvectors=vec_s,
        eigenvalues=eigenvalues,
        corrected=bool(correct_eigenvalues),
        fisher=fisher,
        total_weight=float(total),
    )


# --------------------------------------------------------------------------- solve


def _layer_damping(damping, name, eigenvalues):
    if damping is None:
        return 0.1 * float(eigenvalues.mean())
    if isinstance(damping, dict):
        if name not in damping:
            raise ValueError(f"damping has no entry for layer {name!r}.")
        damping = damping[name]
    if not isinstance(damping, numbers.Real) or isinstance(damping, bool) or damping < 0:
        raise ValueError(f"damping must be a non-negative float, got {damping!r}.")
    return float(damping)


def ekfac_ihvp(factors, layer_grads, damping=None):
    """Inverse (EK-)FAC curvature-vector products, layer by layer.

    For each layer: ``X = Q_S [(Q_S^T V Q_A) / (Lambda + damping)] Q_A^T``.

    Parameters
    ----------
    factors : KFACFactors
        From :func:`fit_ekfac`.
    layer_grads : dict of str to Tensor of shape (m, out, in[+1]) or (out, in[+1])
        Query vectors per layer, in the per-layer layout (see the module docstring
        and :func:`layer_grads_from_flat`).
    damping : float, dict of str to float, or None, default=None
        Added to the eigenvalues. ``None``: per layer ``0.1 * mean(Lambda)``, the
        heuristic of Grosse et al. (2023).

    Returns
    -------
    ihvp : dict of str to Tensor
        Same keys and shapes as ``layer_grads``.

    Raises
    ------
    ValueError
        If a layer is unknown, a shape does not match, or an eigenvalue plus
        damping is not positive.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from skdattri.func.kfac import fit_ekfac, ekfac_ihvp
    >>> layer = nn.Linear(2, 1, bias=False).double()
    >>> X = torch.tensor([[1.0, 2.0]], dtype=torch.float64)
    >>> y = torch.tensor([[3.0]], dtype=torch.float64)
    >>> f = fit_ekfac(layer, [(X, y)], loss="mse", fisher="empirical")
    >>> g = 2 * (layer(X) - y).detach()[:, :, None] * X[:, None, :]   # the sample's gradient
    >>> x = ekfac_ihvp(f, {"": g}, damping=1.0)[""]
    >>> torch.allclose(x, g / (g.pow(2).sum() + 1.0))   # one sample: (g g^T + I)^{-1} g
    True
    """
    out = {}
    for name, V in layer_grads.items():
        if name not in factors.eigenvalues:
            raise ValueError(f"Layer {name!r} is not in the factors (layers: {factors.layers}).")
        lam = factors.eigenvalues[name]
        q_a = factors.activation_eigenvectors[name]
        q_s = factors.gradient_eigenvectors[name]
        single = V.dim() == 2
        block = V.unsqueeze(0) if single else V
        if block.dim() != 3 or tuple(block.shape[1:]) != tuple(lam.shape):
            raise ValueError(
                f"layer_grads[{name!r}] must have shape (m, {lam.shape[0]}, {lam.shape[1]}), "
                f"got {tuple(V.shape)}."
            )
        d = _layer_damping(damping, name, lam)
        denom = lam + d
        if bool((denom < 0).any()):
            raise ValueError(f"Layer {name!r} has a negative eigenvalue plus damping {d}.")
        block = block.to(dtype=lam.dtype, device=lam.device)
        rotated = q_s.T @ block @ q_a
        # zero curvature without damping (e.g. a dead ReLU layer): pseudo-inverse, i.e. 0
        scaled = torch.where(denom > 0, rotated / denom.clamp_min(torch.finfo(denom.dtype).tiny),
                             torch.zeros_like(rotated))
        result = q_s @ scaled @ q_a.T
        out[name] = result[0] if single else result
    return out


# --------------------------------------------------------------------------- layouts


def _offsets(params):
    offsets = {}
    start = 0
    for name, value in params.items():
        shape = value.shape if isinstance(value, torch.Tensor) else tuple(value)
        size = math.prod(shape)
        offsets[name] = (start, start + size, tuple(shape))
        start += size
    return offsets, start


def _param_slice(offsets, name, expected):
    if name not in offsets:
        raise ValueError(f"Parameter {name!r} of the factors is not in params.")
    start, stop, shape = offsets[name]
    if math.prod(shape) != math.prod(expected):
        raise ValueError(f"Parameter {name!r} has shape {shape} in params, expected {expected}.")
    return start, stop


def _transposed(factors, name):
    return bool((factors.transposed or {}).get(name, False))


def layer_grads_from_flat(factors, V, params):
    """Split flat vectors ``(m, p)`` into per-layer blocks ``(m, out, in[+1])``.

    Parameters
    ----------
    factors : KFACFactors
    V : Tensor of shape (m, p)
        Flat vectors in the layout of ``params``.
    params : dict of str to Tensor (or shape)
        The parameter dict defining the flat layout; it must contain the weights
        (and biases) of the factors' layers under their ``named_parameters`` names.

    Returns
    -------
    layer_grads : dict of str to Tensor of shape (m, out, in[+1])

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from skdattri.func.kfac import fit_ekfac, layer_grads_from_flat
    >>> layer = nn.Linear(2, 3).double()
    >>> f = fit_ekfac(layer, [torch.ones(4, 2, dtype=torch.float64)], random_state=0)
    >>> params = dict(layer.named_parameters())                   # weight (3, 2), bias (3,)
    >>> V = torch.arange(9.0, dtype=torch.float64)[None]
    >>> layer_grads_from_flat(f, V, params)[""]
    tensor([[[0., 1., 6.],
             [2., 3., 7.],
             [4., 5., 8.]]], dtype=torch.float64)
    """
    offsets, p = _offsets(params)
    if V.dim() != 2 or V.shape[1] != p:
        raise ValueError(f"V must have shape (m, {p}), got {tuple(V.shape)}.")
    m = V.shape[0]
    out = {}
    for name in factors.layers:
        shape = factors.weight_shapes[name]
        start, stop = _param_slice(offsets, factors.weight_names[name], shape)
        if _transposed(factors, name):  # stored (in, out)
            parts = [V[:, start:stop].reshape(m, -1, shape[0]).transpose(1, 2)]
        else:
            parts = [V[:, start:stop].reshape(m, shape[0], -1)]
        bias = factors.bias_names[name]
        if bias is not None:
            start, stop = _param_slice(offsets, bias, (shape[0],))
            parts.append(V[:, start:stop].reshape(m, shape[0], 1))
        out[name] = torch.cat(parts, dim=2)
    return out


def layer_grads_to_flat(factors, layer_grads, params):
    """Assemble per-layer blocks ``(m, out, in[+1])`` into flat vectors ``(m, p)``.

    Coordinates of parameters that belong to no layer of ``layer_grads`` are zero.

    Parameters
    ----------
    factors : KFACFactors
    layer_grads : dict of str to Tensor of shape (m, out, in[+1])
    params : dict of str to Tensor (or shape)
        The parameter dict defining the flat layout.

    Returns
    -------
    V : Tensor of shape (m, p)

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from skdattri.func.kfac import fit_ekfac, layer_grads_from_flat, layer_grads_to_flat
    >>> layer = nn.Linear(2, 3).double()
    >>> f = fit_ekfac(layer, [torch.ones(4, 2, dtype=torch.float64)], random_state=0)
    >>> params = dict(layer.named_parameters())
    >>> V = torch.randn(5, 9, dtype=torch.float64)
    >>> torch.equal(layer_grads_to_flat(f, layer_grads_from_flat(f, V, params), params), V)
    True
    """
    offsets, p = _offsets(params)
    ref = next(iter(layer_grads.values()))
    m = ref.shape[0]
    V = ref.new_zeros(m, p)
    for name, block in layer_grads.items():
        if name not in factors.weight_shapes:
            raise ValueError(f"Layer {name!r} is not in the factors (layers: {factors.layers}).")
        shape = factors.weight_shapes[name]
        n_in = math.prod(shape[1:])
        start, stop = _param_slice(offsets, factors.weight_names[name], shape)
        weight = block[:, :, :n_in]
        if _transposed(factors, name):  # stored (in, out)
            weight = weight.transpose(1, 2)
        V[:, start:stop] = weight.reshape(m, -1)
        bias = factors.bias_names[name]
        if bias is not None:
            start, stop = _param_slice(offsets, bias, (shape[0],))
            V[:, start:stop] = block[:, :, n_in]
    return V


#: Entries of the query rows solved at once by :meth:`EKFACIHVP.solve` (4 MB in float32).
_SOLVE_ELEMENTS = 2**20


class EKFACIHVP:
    """(EK-)FAC inverse on flat vectors: a fitted solver answering ``solve(Q)``.

    Parameters
    ----------
    damping : float, dict of str to float, or None, default=None
        As in :func:`ekfac_ihvp`; resolved per layer once in ``fit``.

    Attributes
    ----------
    factors_ : KFACFactors
    layout_ : dict of str to tuple
        Parameter name -> shape, defining the flat layout of the vectors.
    damping_ : dict of str to float
        Damping of every layer.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from skdattri.func.kfac import EKFACIHVP, fit_ekfac
    >>> layer = nn.Linear(2, 1).double()
    >>> X, y = torch.ones(4, 2, dtype=torch.float64), torch.zeros(4, 1, dtype=torch.float64)
    >>> f = fit_ekfac(layer, [(X, y)], loss="mse", fisher="empirical")
    >>> solver = EKFACIHVP(damping=1.0).fit(f, dict(layer.named_parameters()))
    >>> solver.solve(torch.zeros(3, 3, dtype=torch.float64)).shape
    torch.Size([3, 3])
    """

    def __init__(self, damping=None):
        self.damping = damping

    def fit(self, factors, layout):
        """Keep the factors and resolve the damping of every layer.

        Parameters
        ----------
        factors : KFACFactors
        layout : dict of str to Tensor or shape
            The parameters (or their shapes) in the flat order of the vectors.

        Returns
        -------
        self : EKFACIHVP
        """
        self.factors_ = factors
        self.layout_ = {k: tuple(v.shape) if isinstance(v, torch.Tensor) else tuple(v)
                        for k, v in layout.items()}
        self.damping_ = {name: _layer_damping(self.damping, name, factors.eigenvalues[name])
                         for name in factors.layers}
        return self

    def solve(self, Q, *, out=None):
        """``(F + damping I)^{-1} q`` for each row of ``Q`` of shape ``(m, p)``.

        Rows are solved a few at a time (:data:`_SOLVE_ELEMENTS` entries of ``Q`` at
        once): each row's solve is independent, and the layer blocks, rotations and
        flat result of a part are temporaries of a few MB, not of ``(m, p)`` each.
        ``out`` (of ``Q``'s shape; ``Q`` itself is allowed) receives the result."""
        if Q.dim() == 1:
            return self.solve(Q[None], out=None if out is None else out[None])[0]
        step = max(1, _SOLVE_ELEMENTS // max(1, Q.shape[1]))
        if Q.shape[0] <= step and out is None:
            return self._solve_part(Q)
        out = torch.empty_like(Q) if out is None else out
        for s in range(0, Q.shape[0], step):
            out[s:s + step] = self._solve_part(Q[s:s + step])  # read before written
        return out

    def _solve_part(self, Q):
        blocks = layer_grads_from_flat(self.factors_, Q, self.layout_)
        out = ekfac_ihvp(self.factors_, blocks, damping=self.damping_)
        return layer_grads_to_flat(self.factors_, out, self.layout_).to(Q.dtype)
