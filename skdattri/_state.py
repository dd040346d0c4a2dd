"""Moving fitted state between devices: one mover that reaches tensors inside objects.

An attributor declares which of its fitted attributes live on ``device_``
(``BaseAttributor._device_attributes``, as skorch's ``cuda_dependent_attributes_``);
:func:`_map_state` rebuilds each of them with every tensor passed through a function
(``t.to(device)``) and every :class:`torch.device` replaced, recursing into dicts,
lists, tuples, ``torch.nn.Module``\\ s (parameters and buffers), and the ``__dict__``
of skdattri's own objects and the methods bound to them (solvers, operators,
projectors, K-FAC factors, the functional model); an object with a
``_map_device(fn, device, memo)`` method moves itself (a disk store stays on disk).
Tensors shared between attributes stay shared (one memo per move), and the objects
being moved are never modified: a GPU-fitted attributor pickles from the GPU and loads
on a CPU-only machine.
"""

from __future__ import annotations

import copy
import types

import torch


def _is_own(obj):
    """Objects of skdattri's classes (whose ``__dict__`` the mover walks)."""
    return type(obj).__module__.split(".")[0] == "skdattri" and hasattr(obj, "__dict__")


def _map_module(module, fn, memo):
    """A copy of ``module`` whose parameters and buffers are ``fn`` of the originals."""
    pre = {}
    for tensor in list(module.parameters()) + list(module.buffers()):
        if id(tensor) in memo:
            pre[id(tensor)] = memo[id(tensor)]
            continue
        moved = fn(tensor.detach())
        if isinstance(tensor, torch.nn.Parameter):
            moved = torch.nn.Parameter(moved, requires_grad=tensor.requires_grad)
        memo[id(tensor)] = pre[id(tensor)] = moved
    return copy.deepcopy(module, pre)


def _map_state(obj, fn, device, memo=None):
    """``obj`` rebuilt with ``fn(tensor)`` for every tensor and ``device`` for every device.

    Parameters
    ----------
    obj : object
        A fitted attribute (tensor, container, module, skdattri object, anything else).
    fn : callable
        ``fn(tensor) -> tensor``, e.g. ``lambda t: t.to("cpu")``.
    device : torch.device
        Replaces every ``torch.device`` found (the devices objects remember).
    memo : dict, default=None
        ``id -> result``: shared tensors and objects are moved once.

    Returns
    -------
    moved : object
    """
    memo = {} if memo is None else memo
    key = id(obj)
    if key in memo:
        return memo[key]
    if isinstance(obj, torch.Tensor):
        out = fn(obj)
    elif isinstance(obj, torch.device):
        return torch.device(device)
    elif isinstance(obj, torch.nn.Module):
        out = _map_module(obj, fn, memo)
    elif isinstance(obj, dict):
        out = type(obj)((k, _map_state(v, fn, device, memo)) for k, v in obj.items())
    elif isinstance(obj, (list, tuple)) and type(obj) in (list, tuple):
        out = type(obj)(_map_state(v, fn, device, memo) for v in obj)
    elif isinstance(obj, types.MethodType) and _is_own(obj.__self__):
        out = types.MethodType(obj.__func__, _map_state(obj.__self__, fn, device, memo))
    elif hasattr(obj, "_map_device"):
        # objects that know how to move themselves (a disk store keeps its file)
        out = obj._map_device(fn, device, memo)
    elif _is_own(obj):
        out = object.__new__(type(obj))
        memo[key] = out
        out.__dict__.update({k: _map_state(v, fn, device, memo) for k, v in vars(obj).items()})
        return out
    else:
        return obj
    memo[key] = out
    return out
