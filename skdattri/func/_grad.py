"""Per-sample gradients: layer hooks (outer products) where they apply, ``vmap(grad)`` else."""

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
    tensor([[  1.,   0.],
            [  0., -18.]])
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


def _shared_params(module):
    """Ids of the parameters owned by more than one module (tied weights, e.g. an
    embedding and the output layer): their gradient sums every use, so no single
    layer's hooks give it."""
    seen, shared = set(), set()
    for mod in module.modules():
        for p in mod._parameters.values():
            if p is not None:
                (shared if id(p) in seen else seen).add(id(p))
    return shared


def _hook_layers(model, names, *, any_conv=False, shared=None):
    """``{layer name: (layer, weight name or None, bias name or None)}`` of the supported
    layers (``nn.Linear``, ``nn.Conv1d``, ``nn.Conv2d``, Hugging Face ``Conv1D``) whose
    parameters are in ``names`` (and not tied to another module's). Convolutions need
    ``groups=1`` and zero padding (the layout of :class:`~skdattri.func.hooks.LayerCapture`)
    unless ``any_conv`` (the kernels of :func:`hook_grads` take any)."""
    from .hooks import is_supported_layer

    wanted = set(names)
    shared = _shared_params(model.module) if shared is None else shared
    out = {}
    for layer, mod in model.module.named_modules():
        if not is_supported_layer(mod) or any(
                id(p) in shared for p in mod._parameters.values() if p is not None):
            continue
        if isinstance(mod, (torch.nn.Conv1d, torch.nn.Conv2d)) and not any_conv and (
                mod.groups != 1 or mod.padding_mode != "zeros"):
            continue
        prefix = f"{layer}." if layer else ""
        weight, bias = prefix + "weight", prefix + "bias"
        entry = (mod, weight if weight in wanted else None,
                 bias if mod.bias is not None and bias in wanted else None)
        if entry[1] or entry[2]:
            out[layer] = entry
    return out


def _embedding_layers(model, names, *, shared=None):
    """``{layer name: (nn.Embedding, weight name)}`` of the embeddings whose weight is in
    ``names`` (without ``max_norm``, which rewrites the weight in the forward pass, and
    ``scale_grad_by_freq``, which couples the samples of a batch, and tied weights)."""
    wanted = set(names)
    shared = _shared_params(model.module) if shared is None else shared
    out = {}
    for layer, mod in model.module.named_modules():
        weight = f"{layer}.weight" if layer else "weight"
        if (isinstance(mod, torch.nn.Embedding) and weight in wanted and mod.max_norm is None
                and not mod.scale_grad_by_freq and id(mod.weight) not in shared):
            out[layer] = (mod, weight)
    return out


class _EmbeddingCapture:
    """Record the token ids and outputs of embeddings during a forward pass."""

    def __init__(self, layers):
        self.layers, self.calls, self._handles = layers, {k: [] for k in layers}, []

    def __enter__(self):
        for k, (mod, _) in self.layers.items():
            self._handles.append(mod.register_forward_hook(
                lambda m, args, out, k=k: self.calls[k].append((args[0], out))))
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()

    def targets(self, n):
        """``(flat, shared)``: the ``(layer, ids, output)`` of every call to take
        per-sample gradients from, and the layers left out: those called on ids
        without the batch dimension (e.g. positions shared by the batch), whose
        gradients are not per sample."""
        shared = {k for k, calls in self.calls.items()
                  if not calls or any(ids.dim() < 2 or ids.shape[0] != n for ids, _ in calls)}
        return [(k, ids, o) for k, calls in self.calls.items() if k not in shared
                for ids, o in calls], shared

    def scatter_grads(self, flat, grads, blocks):
        """Per-sample weight gradients written into ``blocks[k]`` of shape ``(n, V, D)``
        (the layers of ``flat`` only): the output gradients ``grads`` (one per entry
        of ``flat``) at every position added to the row of its token."""
        for k in {k for k, _, _ in flat}:
            blocks[k].zero_()
        for (k, ids, _), g in zip(flat, grads, strict=True):
            if g is None:
                continue
            mod, block = self.layers[k][0], blocks[k]
            n, D = block.shape[0], block.shape[2]
            ids = ids.reshape(n, -1)
            g = g.reshape(n, -1, D)
            if mod.padding_idx is not None:
                g = g.masked_fill((ids == mod.padding_idx)[..., None], 0)
            sample = torch.arange(n, device=ids.device)[:, None].expand_as(ids)
            block.index_put_((sample, ids), g.to(block.dtype), accumulate=True)

    def scatter(self, total, blocks, retain_graph):
        """:meth:`scatter_grads` with the gradients of ``total``; returns the layers
        left out (see :meth:`targets`)."""
        n = next(iter(blocks.values())).shape[0]
        flat, shared = self.targets(n)
        if flat:
            grads = torch.autograd.grad(total, [o for _, _, o in flat],
                                        retain_graph=retain_graph, allow_unused=True)
            self.scatter_grads(flat, grads, {k: blocks[k] for k, _, _ in flat})
        return shared


def hook_grads(model, params, X, y, what="loss", names=None, out=None, *, _plan=None):
    """Per-sample gradients from layer hooks: one batched forward and backward pass.

    For every ``nn.Linear`` / ``nn.Conv1d`` / ``nn.Conv2d`` (any groups and padding
    mode) / Hugging Face ``Conv1D`` parameter in ``names`` the per-sample gradient is
    computed from the layer's input and output gradient straight into its columns
    (:mod:`skdattri.func._hook_kernels`: outer products for linear layers, the
    weight-gradient convolution with the batch folded into the groups for
    convolutions); for an ``nn.Embedding`` weight it is the output gradient of every
    position added to the row of its token. The other parameters (norm layers, custom
    modules, layers called on inputs without the batch dimension, such as position
    embeddings) are differentiated with ``vmap(grad)``. One backward pass to the
    recorded layer outputs serves every hooked layer (the parameters' own gradients
    are never formed); each column block is written once into the ``(n, p)`` result.

    Parameters
    ----------
    model : TorchModel
    params : dict of str to Tensor
    X, y : Tensor
    what : str or callable, default="loss"
    names : list of str, default=None
    out : Tensor of shape (n, p), default=None
        Where to write the gradients (e.g. rows of a preallocated cache): each block
        is computed straight into its columns, nothing is concatenated or copied again.

    Returns
    -------
    grads : Tensor of shape (n, p)
        Columns in the order of ``names``, each parameter flattened row-major
        (``out`` when given).
    """
    names = list(params) if names is None else list(names)
    layers, embeddings = _plan if _plan is not None else _hook_plan(model, names)
    n = y.shape[0]
    offsets, p = {}, 0
    for k in names:
        offsets[k], p = p, p + params[k].numel()
    if out is None:
        out = torch.empty((n, p), dtype=next(iter(params.values())).dtype, device=y.device)
    hooked = {w for w in (e[i] for e in layers.values() for i in (1, 2)) if w}
    hooked |= {w for _, w in embeddings.values()}
    if hooked:
        hooked -= _direct_pass(model, params, X, y, what, hooked, layers, embeddings, out,
                               offsets)
    rest = [k for k in names if k not in hooked]
    if rest:
        _vmap_grads(model, params, X, y, what, rest, out=out, offsets=offsets)
    return out


def _hook_plan(model, names):
    """``(layers, embeddings)`` that :func:`hook_grads` takes from hooks."""
    shared = _shared_params(model.module)
    return (_hook_layers(model, names, any_conv=True, shared=shared),
            _embedding_layers(model, names, shared=shared))


def _direct_pass(model, params, X, y, what, wanted, layers, embeddings, out, offsets):
    """One forward pass recording the hooked layers' inputs and outputs, one backward
    pass to those outputs, and every hooked gradient written into its columns of
    ``out``. Returns the parameter names left to ``vmap(grad)`` (layers called on
    inputs without the batch dimension)."""
    from ._hook_kernels import RawCapture, batched_call, per_sample_call
    from .hooks import weight_layout

    n = y.shape[0]

    def rows(name):  # the columns of a parameter, as (n, *shape)
        return None if name is None else out[:, offsets[name]:offsets[name] + params[
            name].numel()].view(n, *params[name].shape)

    live = {k: (v.detach().requires_grad_(True) if k in wanted else v.detach())
            for k, v in params.items()}
    with torch.enable_grad(), RawCapture(list((k, e[0]) for k, e in layers.items())) as cap, \
            _EmbeddingCapture(embeddings) as tokens:
        total = model.value(model.forward(live, X), y, what).sum()
    left = {k for k, calls in cap.calls.items()
            if not all(batched_call(n, layers[k][0], x) for x, _ in calls)}
    flat = [o for k, calls in cap.calls.items() if k not in left for _, o in calls]
    emb, shared = tokens.targets(n)
    grads = torch.autograd.grad(total, flat + [o for _, _, o in emb], allow_unused=True) \
        if flat or emb else ()
    i = 0
    for k, (mod, weight, bias) in layers.items():
        if k in left:
            continue
        transposed = weight_layout(mod)[1]
        wrows, brows = rows(weight), rows(bias)
        for block in (wrows, brows) if not cap.calls[k] else ():  # never called: zero
            if block is not None:
                block.zero_()
        for j, (x, o) in enumerate(cap.calls[k]):
            g = grads[i] if grads[i] is not None else torch.zeros_like(o)
            per_sample_call(n, mod, x, g, wrows, brows, transposed, first=j == 0)
            i += 1
    if embeddings:
        tokens.scatter_grads(emb, grads[i:], {
            k: rows(w) for k, (_, w) in embeddings.items() if k not in shared})
    left_names = {w for k in left for w in layers[k][1:3] if w}
    return left_names | {w for k, (_, w) in embeddings.items() if k in shared}


def _capture_pass(model, params, X, y, what, wanted, layers, embeddings, out, offsets):
    """One batched forward and backward pass with layer hooks.

    Returns ``(stats, scattered)``: the per-sample ``(a, g)`` of ``layers`` (a list of
    ``(name, module)``) and the weight names of the ``embeddings`` whose per-sample
    gradients were written into their columns of ``out`` (from ``offsets``); the
    parameters in ``wanted`` are differentiated.
    """
    from .hooks import LayerCapture

    n = y.shape[0]
    live = {k: (v.detach().requires_grad_(True) if k in wanted else v.detach())
            for k, v in params.items()}
    blocks = {k: out[:, offsets[w]:offsets[w] + params[w].numel()].view(n, *params[w].shape)
              for k, (_, w) in embeddings.items()}
    with torch.enable_grad(), LayerCapture(layers, bias_column=False) as capture, \
            _EmbeddingCapture(embeddings) as tokens:
        total = model.value(model.forward(live, X), y, what).sum()
        left = tokens.scatter(total, blocks, retain_graph=bool(layers)) if embeddings else ()
        stats = capture.collect(total) if layers else {}
    return stats, {w for k, (_, w) in embeddings.items() if k not in left}


def _vmap_grads(model, params, X, y, what, names, out=None, offsets=None):
    """``vmap(grad)`` of the parameters ``names``: flat ``(n, p)``, or, with ``out``,
    each parameter's gradients copied into its columns (at ``offsets[name]``, or side
    by side in the order of ``names``) without concatenating them first."""
    chosen = {n: params[n] for n in names}
    frozen = {n: v for n, v in params.items() if n not in chosen}

    def func(p, xb, yb):
        return model.value(model.forward({**frozen, **p}, xb), yb, what)

    grads, n = per_sample_grad(func, chosen, X, y), y.shape[0]
    if out is None:
        return flatten_tree(grads, n=n)
    start = 0
    for k, g in grads.items():
        start = start if offsets is None else offsets[k]
        out[:, start:start + g[0].numel()].view(g.shape).copy_(g)
        start += g[0].numel()
    return out


def model_per_sample_grads(model, params, X, y, what="loss", names=None, engine="auto",
                           out=None):
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
    engine : {"auto", "hooks", "vmap"}, default="auto"
        ``"hooks"``: :func:`hook_grads` (outer products of layer inputs and output
        gradients from one batched backward pass; ``vmap(grad)`` for the parameters of
        other layers); ``"vmap"``: ``torch.func.vmap(grad)`` for every parameter.
        ``"auto"``: the ``grad_engine`` of :func:`skdattri.set_config` (whose own
        ``"auto"`` means hooks when some parameter belongs to a supported layer).
    out : Tensor of shape (n, p), default=None
        Write the gradients there (rows of a cache), see :func:`hook_grads`.

    Returns
    -------
    grads : Tensor of shape (n, p)
    """
    from .._config import get_config

    names = list(params) if names is None else list(names)
    if engine == "auto":
        engine = get_config()["grad_engine"]
    plan = None if engine == "vmap" else _hook_plan(model, names)
    if engine == "vmap" or (engine == "auto" and not any(plan)):
        return _vmap_grads(model, params, X, y, what, names, out=out)
    return hook_grads(model, params, X, y, what, names, out=out, _plan=plan)
