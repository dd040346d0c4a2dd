"""Per-sample weight and bias gradients of one layer, written into their output rows.

The kernels of :func:`skdattri.func._grad.hook_grads`. A forward hook records what each
supported layer received (``x``, as it is: no unfolding) and returned; after one
backward pass to the recorded outputs, each call's per-sample gradient is written
straight into the layer's columns of the ``(n, p)`` result:

- ``nn.Linear`` on ``(n, d_in)``: the outer product ``g_i x_i^T`` computed into the
  rows (``torch.mul`` with ``out=``, no temporary); on sequences ``(n, ..., d_in)``
  one batched product ``sum_t g_it x_it^T``; the bias is ``g_i`` (summed over
  positions). Hugging Face ``Conv1D`` (weight stored ``(d_in, d_out)``) is the same
  with the factors swapped.
- ``nn.Conv1d`` / ``nn.Conv2d`` (any stride, padding, dilation, groups and padding
  mode): the weight-gradient convolution of the layer's backward pass, run with the
  batch folded into the groups (input ``(1, n C_in, ...)``, output gradient
  ``(1, n C_out, ...)``, ``n * groups`` groups), which keeps the per-sample sums apart
  and returns them in the parameter's own layout ``(n C_out, C_in / groups, *kernel)``.
  On one CPU thread, batches of 256, 3x3 kernels from 1 to 64 input channels, it
  was 1.7-2.6x faster than unfolded patches (``F.unfold`` then a batched product,
  the previous kernel) and, on all but one shape (64 -> 128 channels on 8x8, 1.2x
  slower), faster than patches copied by hand (channels-last or row-shifted windows)
  then one contiguous batched product: building the patch matrix costs more than
  the whole convolution. Splitting the
  batch into cache-sized chunks helped in isolation but not inside the engine. The
  bias is ``g_i`` summed over output positions, reduced into the rows.

A layer called several times adds the gradients of its calls.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RawCapture:
    """Record ``(input, output)`` of every call of ``layers`` during a forward pass.

    Parameters
    ----------
    layers : list of (str, torch.nn.Module)
    """

    def __init__(self, layers):
        self.layers, self.calls, self._handles = layers, {k: [] for k, _ in layers}, []

    def __enter__(self):
        for k, mod in self.layers:
            self._handles.append(mod.register_forward_hook(
                lambda m, args, out, k=k: self.calls[k].append((args[0].detach(), out))))
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles = []


def _conv_input(mod, x):
    """``(x, padding)``: the input padded by hand where the layer's own padding is not a
    symmetric zero padding (``padding_mode`` other than zeros, ``"same"`` with an odd
    total), as ``nn.Conv`` itself does."""
    dims = x.dim() - 2
    if mod.padding_mode == "zeros" and not isinstance(mod.padding, str):
        return x, list(mod.padding)
    if mod.padding == "valid":
        return x, [0] * dims
    mode = "constant" if mod.padding_mode == "zeros" else mod.padding_mode
    return F.pad(x, mod._reversed_padding_repeated_twice, mode=mode), [0] * dims


def per_sample_call(n, mod, x, g, weight, bias, transposed, first):
    """Add (``first``: write) one call's per-sample gradients into the row views.

    Parameters
    ----------
    n : int
        Samples.
    mod : supported layer
    x : Tensor
        What the layer received, first dimension = samples.
    g : Tensor
        Gradient of the summed values at what the layer returned.
    weight : Tensor of shape (n, *weight.shape) or None
        Row view of the weight's columns (capture layout ``(n, d_in, d_out)`` for a
        transposed ``Conv1D``).
    bias : Tensor of shape (n, d_out) or None
    transposed : bool
        Hugging Face ``Conv1D``.
    first : bool
        Write instead of add.
    """
    if isinstance(mod, (nn.Conv1d, nn.Conv2d)):
        _conv_call(n, mod, x, g, weight, bias, first)
        return
    d_in, d_out = x.shape[-1], g.shape[-1]
    if x.dim() == 2 or x[0].numel() == d_in:  # one position: an outer product
        x, g = x.reshape(n, d_in), g.reshape(n, d_out)
        if weight is not None:
            lhs, rhs = (x, g) if transposed else (g, x)
            if first:
                torch.mul(lhs[:, :, None], rhs[:, None, :], out=weight)
            else:
                weight.addcmul_(lhs[:, :, None], rhs[:, None, :])
        if bias is not None:
            bias.copy_(g) if first else bias.add_(g)
        return
    x, g = x.reshape(n, -1, d_in), g.reshape(n, -1, d_out)
    if weight is not None:
        lhs, rhs = (x, g) if transposed else (g, x)
        G = torch.bmm(lhs.transpose(1, 2), rhs)  # contiguous, then one copy (see below)
        weight.copy_(G) if first else weight.add_(G)
    if bias is not None:
        if first:
            torch.sum(g, 1, out=bias)
        else:
            bias.add_(g.sum(1))


def _conv_call(n, mod, x, g, weight, bias, first):
    if weight is not None:
        x, padding = _conv_input(mod, x)
        w = mod.weight
        G = torch.ops.aten.convolution_backward(
            g.reshape(1, n * g.shape[1], *g.shape[2:]),
            x.reshape(1, n * x.shape[1], *x.shape[2:]),
            w.new_empty((n * w.shape[0], *w.shape[1:])), None, list(mod.stride), padding,
            list(mod.dilation), False, [0] * len(mod.stride), n * mod.groups,
            [False, True, False])[1].view(weight.shape)
        weight.copy_(G) if first else weight.add_(G)
    if bias is not None:
        dims = tuple(range(2, g.dim()))
        if first:
            torch.sum(g, dims, out=bias)
        else:
            bias.add_(g.sum(dims))


def batched_call(n, mod, x):
    """Whether one call's input carries the batch (else the layer is left to vmap)."""
    if isinstance(mod, nn.Conv2d):
        return x.dim() == 4 and x.shape[0] == n
    if isinstance(mod, nn.Conv1d):
        return x.dim() == 3 and x.shape[0] == n
    return x.dim() >= 2 and x.shape[0] == n
