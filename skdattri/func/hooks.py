"""Layer capture: per-sample layer inputs and output gradients from one forward/backward.

For the layers that hold almost every parameter of real models -- ``nn.Linear`` (also
applied to sequences, as in transformers), ``nn.Conv1d`` and ``nn.Conv2d`` -- the
gradient of a per-sample loss with respect to the weight is a sum of outer products
of what the layer received and the gradient at what it returned. This module records
both, per sample, with forward hooks, for K-FAC / EK-FAC, representer points, LoGra and
hook-based per-sample gradients.

The contract (one layout for every supported layer):

- **inputs** ``a`` of shape ``(n, T, d_in)``: the layer input of every sample at its
  ``T`` positions -- ``T = 1`` for a ``Linear`` on ``(n, d_in)``, the sequence positions
  for a ``Linear`` on ``(n, ..., d_in)``, the output positions for a convolution whose
  input is unfolded into patches (``d_in = C_in * prod(kernel)``, the order of the
  flattened ``weight``). With ``bias_column=True`` (the default) a layer with a bias gets
  a trailing column of ones (``d_in + 1``), so that the bias is the last column of the
  weight.
- **output gradients** ``g`` of shape ``(n, T, d_out)``: the gradient of the summed
  per-sample values with respect to the layer output at each position (so, for
  per-sample values, sample ``i``'s own gradient).
- the per-sample gradient of the layer's ``(d_out, d_in[+1])`` weight-and-bias matrix
  is then ``G_i = sum_t g_it a_it^T`` (:func:`per_sample_layer_grads`).

Hugging Face's ``transformers.pytorch_utils.Conv1D`` (the linear layers of GPT-2,
recognised by duck typing -- class name ``Conv1D`` with an ``nf`` attribute -- so
``transformers`` stays optional) is a linear layer whose weight is stored transposed,
``(d_in, d_out)``: it is captured as a ``Linear``, ``G_i`` is in the same ``(d_out,
d_in)`` layout, and :func:`weight_layout` tells consumers that map it back to the
parameter (``G_i^T``).

A layer called several times in one forward pass (weight sharing) contributes one
``(a, g)`` pair per call, concatenated along ``T``. Layers must be in eval mode (no
batch-coupled layer in front of them mixing samples) and convolutions need
``groups=1`` and ``padding_mode="zeros"``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LayerCapture", "find_layers", "layer_inputs", "per_sample_layer_grads",
           "weight_layout"]

SUPPORTED_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d)


def _is_transposed_linear(mod):
    """A Hugging Face ``Conv1D``: ``y = x @ W + b`` with ``W`` of shape ``(d_in, d_out)``."""
    return (type(mod).__name__ == "Conv1D" and hasattr(mod, "nf")
            and getattr(mod, "weight", None) is not None and mod.weight.dim() == 2)


def is_supported_layer(mod):
    """Whether layer hooks capture ``mod`` (``nn.Linear``, ``nn.Conv1d/2d``, ``Conv1D``)."""
    return isinstance(mod, SUPPORTED_LAYERS) or _is_transposed_linear(mod)


def weight_layout(mod):
    """``(shape, transposed)``: the weight shape in the capture layout ``(d_out, ...)`` and
    whether the parameter stores its transpose (Hugging Face ``Conv1D``).

    Examples
    --------
    >>> from torch import nn
    >>> from skdattri.func.hooks import weight_layout
    >>> weight_layout(nn.Linear(3, 2))
    ((2, 3), False)
    """
    shape = tuple(mod.weight.shape)
    if _is_transposed_linear(mod):
        return shape[::-1], True
    return shape, False


def _matches(name, prefix):
    return (prefix == "" or name == prefix or name.startswith(prefix + ".")
            or prefix in (f"{name}.weight", f"{name}.bias"))


def find_layers(module, layers=None):
    """The supported layers of ``module``: ``[(name, layer), ...]`` in module order.

    Parameters
    ----------
    module : torch.nn.Module
    layers : str or list of str, default=None
        Module names or prefixes (or parameter names such as ``"fc.weight"``) of the
        layers to keep; ``None``: every ``nn.Linear``, ``nn.Conv1d`` and ``nn.Conv2d``
        (and Hugging Face ``Conv1D``).

    Returns
    -------
    found : list of (str, torch.nn.Module)

    Raises
    ------
    ValueError
        When nothing matches, or a matching convolution has ``groups > 1`` or a
        non-zero padding mode.

    Examples
    --------
    >>> from torch import nn
    >>> from skdattri.func.hooks import find_layers
    >>> net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    >>> [name for name, _ in find_layers(net)]
    ['0', '2']
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}.")
    prefixes = [layers] if isinstance(layers, str) else layers
    found = []
    for name, mod in module.named_modules():
        if not is_supported_layer(mod):
            continue
        if prefixes is not None and not any(_matches(name, p) for p in prefixes):
            continue
        if isinstance(mod, (nn.Conv1d, nn.Conv2d)):
            if mod.groups != 1:
                raise ValueError(f"Convolution {name!r} has groups={mod.groups}; only groups=1.")
            if mod.padding_mode != "zeros":
                raise ValueError(
                    f"Convolution {name!r} has padding_mode={mod.padding_mode!r}; only "
                    "'zeros'.")
        found.append((name, mod))
    if not found:
        where = "" if prefixes is None else f" matching layers={list(prefixes)!r}"
        raise ValueError(f"The module has no nn.Linear, nn.Conv1d or nn.Conv2d layer{where}.")
    return found


def _conv_pads(mod, dims):
    """``(left, right)`` zero padding per spatial dimension."""
    pads = []
    for d in range(dims):
        if mod.padding == "valid":
            pads.append((0, 0))
        elif mod.padding == "same":
            total = mod.dilation[d] * (mod.kernel_size[d] - 1)
            pads.append((total // 2, total - total // 2))
        else:
            pads.append((mod.padding[d], mod.padding[d]))
    return pads


def layer_inputs(mod, x, *, bias_column=True):
    """A layer's input ``x`` in the capture layout ``(n, T, d_in[+1])``.

    Parameters
    ----------
    mod : nn.Linear, nn.Conv1d, nn.Conv2d or Hugging Face Conv1D
    x : Tensor
        What the layer receives (batched).
    bias_column : bool, default=True
        Append a column of ones when the layer has a bias.

    Returns
    -------
    a : Tensor of shape (n, T, d_in[+1])
    """
    if isinstance(mod, nn.Conv2d):
        if x.dim() != 4:
            raise ValueError("Conv2d inputs must be batched, of shape (n, C, H, W).")
        (ph0, ph1), (pw0, pw1) = _conv_pads(mod, 2)
        x = F.pad(x, (pw0, pw1, ph0, ph1))
        a = F.unfold(x, mod.kernel_size, dilation=mod.dilation, stride=mod.stride)
        a = a.transpose(1, 2)
    elif isinstance(mod, nn.Conv1d):
        if x.dim() != 3:
            raise ValueError("Conv1d inputs must be batched, of shape (n, C, L).")
        ((p0, p1),) = _conv_pads(mod, 1)
        x = F.pad(x, (p0, p1))[:, :, None, :]
        a = F.unfold(x, (1, mod.kernel_size[0]), dilation=(1, mod.dilation[0]),
                     stride=(1, mod.stride[0])).transpose(1, 2)
    else:
        if x.dim() < 2:
            raise ValueError("Linear inputs must be batched, of shape (n, ..., in_features).")
        a = x.reshape(x.shape[0], -1, x.shape[-1])
    if bias_column and mod.bias is not None:
        a = torch.cat([a, a.new_ones(a.shape[:-1] + (1,))], dim=-1)
    return a


def _output_layout(mod, out):
    """A layer's output (or its gradient) as ``(n, T, d_out)``."""
    if isinstance(mod, (nn.Conv1d, nn.Conv2d)):
        return out.reshape(out.shape[0], out.shape[1], -1).transpose(1, 2)
    return out.reshape(out.shape[0], -1, out.shape[-1])


def _cat_positions(parts):
    """The calls of a layer along ``T`` (no copy for a layer called once)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


class LayerCapture:
    """Record layer inputs (and outputs, for their gradients) during forward passes.

    A context manager: inside it, every forward pass through the selected layers --
    a plain call or :func:`torch.func.functional_call` of the parent module -- appends
    the layer's input (in the capture layout, see the module docstring) and output.
    :meth:`collect` then returns ``{name: (a, g)}`` with ``g`` the gradients of a scalar
    (the sum of per-sample values) with respect to the recorded outputs, and
    :meth:`inputs` the inputs alone.

    Parameters
    ----------
    layers : list of (str, torch.nn.Module)
        From :func:`find_layers`.
    bias_column : bool, default=True
        Append a column of ones to the inputs of layers with a bias.

    Notes
    -----
    For the output gradients the forward pass must build an autograd graph through
    the layers (parameters or inputs requiring gradients, under ``torch.enable_grad``).
    Recorded tensors are released by :meth:`reset` and on exit.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from skdattri.func.hooks import LayerCapture, find_layers, per_sample_layer_grads
    >>> net = nn.Sequential(nn.Linear(3, 2)).double()
    >>> X = torch.randn(5, 3, dtype=torch.float64)
    >>> with LayerCapture(find_layers(net)) as capture:
    ...     losses = (net(X) ** 2).sum(1)
    ...     (a, g), = capture.collect(losses.sum()).values()
    >>> G = per_sample_layer_grads(a, g)            # (5, 2, 3 + 1): weight | bias
    >>> manual = torch.autograd.grad((net(X[:1]) ** 2).sum(), net[0].weight)[0]
    >>> bool(torch.allclose(G[0, :, :3], manual))
    True
    """

    def __init__(self, layers, *, bias_column=True):
        self.layers = list(layers)
        self.bias_column = bias_column
        self._handles = []
        self.reset()

    def __enter__(self):
        for name, mod in self.layers:
            self._handles.append(mod.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.reset()

    def _hook(self, name):
        def hook(mod, args, output):
            self._inputs.setdefault(name, []).append(
                layer_inputs(mod, args[0].detach(), bias_column=self.bias_column))
            self._outputs.setdefault(name, []).append(output)

        return hook

    def reset(self):
        """Forget what was recorded."""
        self._inputs, self._outputs = {}, {}

    def calls(self, name):
        """How many times layer ``name`` ran since the last reset."""
        return len(self._inputs.get(name, ()))

    def _check_called(self):
        missing = [name for name, _ in self.layers if name not in self._inputs]
        if missing:
            raise ValueError(f"Layers {missing} were not called in the forward pass.")

    def inputs(self):
        """``{name: a}``, inputs of shape ``(n, T, d_in[+1])`` (all calls along ``T``)."""
        self._check_called()
        return {name: _cat_positions(self._inputs[name]) for name, _ in self.layers}

    def outputs(self):
        """``{name: z}``, outputs of shape ``(n, T, d_out)`` (all calls along ``T``)."""
        self._check_called()
        return {name: _cat_positions([_output_layout(mod, o) for o in self._outputs[name]])
                for name, mod in self.layers}

    def collect(self, total):
        """``{name: (a, g)}`` with ``g`` the gradient of ``total`` at the layer outputs.

        Parameters
        ----------
        total : scalar Tensor
            Typically the sum of per-sample losses of the batch.

        Returns
        -------
        stats : dict of str to (Tensor (n, T, d_in[+1]), Tensor (n, T, d_out))
        """
        grads = self.output_grads([total])
        inputs = self.inputs()
        return {name: (inputs[name], grads[name][0]) for name, _ in self.layers}

    def output_grads(self, totals):
        """``{name: g}``: the gradients of several scalars at the layer outputs, stacked.

        Parameters
        ----------
        totals : list of scalar Tensor
            E.g. the sums over the batch of each model output (one backward pass each).

        Returns
        -------
        grads : dict of str to Tensor of shape (len(totals), n, T, d_out)
        """
        self._check_called()
        flat = [(name, mod, o) for name, mod in self.layers for o in self._outputs[name]]
        stacked = {name: [] for name, _ in self.layers}
        for i, total in enumerate(totals):
            grads = torch.autograd.grad(total, [o for _, _, o in flat], allow_unused=True,
                                        retain_graph=i + 1 < len(totals))
            parts = {}
            for (name, mod, out), g in zip(flat, grads, strict=True):
                g = torch.zeros_like(out) if g is None else g
                parts.setdefault(name, []).append(_output_layout(mod, g.detach()))
            for name, _ in self.layers:
                stacked[name].append(_cat_positions(parts[name]))
        return {name: parts[0][None] if len(parts) == 1 else torch.stack(parts)  # a view of one
                for name, parts in stacked.items()}


def per_sample_layer_grads(a, g):
    """Per-sample gradients ``G_i = sum_t g_it a_it^T`` of a layer, ``(n, d_out, d_in)``.

    Parameters
    ----------
    a : Tensor of shape (n, T, d_in)
    g : Tensor of shape (n, T, d_out)

    Returns
    -------
    G : Tensor of shape (n, d_out, d_in)
    """
    return torch.einsum("nto,nti->noi", g, a)
