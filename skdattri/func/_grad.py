"""Per-sample gradients: ``torch.func`` ``vmap(grad)`` and closed forms for linear layers."""

from __future__ import annotations

import torch
from torch.func import grad, vmap


def flatten_tree(tree, n=None):
    """Concatenate a dict of per-sample tensors ``(n, *shape)`` into ``(n, p)``.

    Parameters
    ----------
    tree : dict of str to Tensor
        Tensors sharing their first dimension (or none when ``n`` is None).
    n : int, default=None
        Leading dimension; ``None`` flattens single (non-batched) tensors into ``(p,)``.

    Returns
    -------
    flat : Tensor of shape (n, p) or (p,)
    """
    if n is None:
        return torch.cat([t.reshape(-1) for t in tree.values()])
    return torch.cat([t.reshape(n, -1) for t in tree.values()], dim=1)


def unflatten_like(flat, like):
    """Split a flat ``(p,)`` or ``(m, p)`` tensor into a dict shaped as ``like``."""
    out = {}
    start = 0
    batched = flat.dim() == 2
    for name, ref in like.items():
        size = ref.numel()
        piece = flat[..., start:start + size]
        out[name] = piece.reshape((flat.shape[0], *ref.shape) if batched else ref.shape)
        start += size
    return out


def _unsqueeze0(x):
    if isinstance(x, dict):
        return {k: v.unsqueeze(0) for k, v in x.items()}
    return x.unsqueeze(0)


def per_sample_grad(func, params, X, y):
    """Gradient of ``func`` for every sample, by ``torch.func.vmap(grad(...))``.

    Parameters
    ----------
    func : callable
        ``func(params, X, y) -> Tensor of shape (n,)``: per-sample values of a batch
        (each value may depend only on its own sample: eval-mode networks).
    params : dict of str to Tensor
        Parameters to differentiate.
    X : Tensor or dict of Tensor
        Inputs, first dimension = samples.
    y : Tensor
        Targets, first dimension = samples.

    Returns
    -------
    grads : dict of str to Tensor
        ``grads[name]`` has shape ``(n, *params[name].shape)``.

    Examples
    --------
    >>> import torch
    >>> from skdattri.func import per_sample_grad
    >>> w = {"w": torch.tensor([1.0, -2.0])}
    >>> X = torch.tensor([[1.0, 0.0], [0.0, 3.0]])
    >>> f = lambda p, X, y: 0.5 * (X @ p["w"] - y) ** 2
    >>> per_sample_grad(f, w, X, torch.zeros(2))["w"]
    tensor([[ 1.,  0.],
            [ 0., 18.]])
    """

    def single(p, x, t):
        return func(p, _unsqueeze0(x), t.unsqueeze(0))[0]

    return vmap(grad(single), in_dims=(None, 0, 0))(params, X, y)


def linear_per_sample_grad(X, dz, *, bias=True):
    """Closed-form per-sample gradients of a linear layer ``z = X W^T + b``.

    With ``dz[i] = d loss_i / d z_i`` the gradient of sample ``i`` is
    ``dz[i] x[i]^T`` for the weight and ``dz[i]`` for the bias.

    Parameters
    ----------
    X : Tensor of shape (n, d)
    dz : Tensor of shape (n, k)
    bias : bool, default=True

    Returns
    -------
    grads : Tensor of shape (n, k * d + k * bias)
        Flattened in the order of ``nn.Linear`` parameters (weight row-major, bias).
    """
    n = X.shape[0]
    gw = (dz[:, :, None] * X[:, None, :]).reshape(n, -1)
    return torch.cat([gw, dz], dim=1) if bias else gw


def model_per_sample_grads(model, params, X, y, what="loss", names=None):
    """Flat per-sample gradients ``(n, p)`` of a :class:`~skdattri.model.TorchModel`.

    Parameters
    ----------
    model : TorchModel
    params : dict of str to Tensor
        Parameters at which the model is evaluated (e.g. one checkpoint's).
    X, y : Tensor
        A batch of inputs and targets.
    what : str or callable, default="loss"
        ``"loss"``, ``"margin"``, ``"neg_margin"``, ``"neg_output"`` or a callable
        ``(outputs, y) -> (n,)``.
    names : list of str, default=None
        Differentiate only these parameters (the others stay at their value in
        ``params``); ``None`` differentiates all of ``params``. The columns follow
        the order of ``names``.

    Returns
    -------
    grads : Tensor of shape (n, p)

    Notes
    -----
    Models that are one affine layer (``model.affine``: the scikit-learn linear
    adapters) use the closed form :func:`linear_per_sample_grad`; every other model
    uses ``vmap(grad)``.
    """
    names = list(params) if names is None else list(names)
    layer = getattr(model, "affine", None)
    weight, bias = f"{layer}.weight", f"{layer}.bias"
    if layer is not None and not isinstance(X, dict) and set(names) <= {weight, bias}:
        with torch.enable_grad():
            z = model.forward(params, X).detach().requires_grad_(True)
            (dz,) = torch.autograd.grad(model.value(z, y, what).sum(), z)
        Xf = X.reshape(X.shape[0], -1).to(dz.dtype)
        parts = [linear_per_sample_grad(Xf, dz, bias=False) if name == weight else dz
                 for name in names]
        return torch.cat(parts, dim=1)

    chosen = {n: params[n] for n in names}
    frozen = {n: v for n, v in params.items() if n not in chosen}

    def func(p, xb, yb):
        return model.value(model.forward({**frozen, **p}, xb), yb, what)

    g = per_sample_grad(func, chosen, X, y)
    return flatten_tree(g, n=y.shape[0])
