"""Snapshots of fitted state and their comparison (for ``check_transform_keeps_fitted_state``).

:func:`_snapshot` records an object graph by value -- tensors, arrays, containers,
modules (parameters, buffers, mode, hooks), skorch nets and objects' ``__dict__`` --
without going through ``__getstate__`` (which may drop caches); :func:`_difference`
names the first place where two snapshots differ.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Mapping

import numpy as np
import torch

from .model._torch import _is_skorch

_SCALARS = (type(None), bool, int, float, complex, str, bytes, np.generic, torch.dtype,
            torch.device, np.dtype, slice, range, type(Ellipsis))
_BY_IDENTITY = (type, types.FunctionType, types.BuiltinFunctionType, types.ModuleType,
                types.BuiltinMethodType)


class _Node:
    """One object of a snapshot: what it is (``kind``, ``cls``) and its state."""

    __slots__ = ("kind", "cls", "value")

    def __init__(self, kind, cls, value):
        self.kind, self.cls, self.value = kind, cls, value


class _Ref:
    """An object already met in the snapshot (shared or cyclic references)."""

    __slots__ = ("index",)

    def __init__(self, index):
        self.index = index


def _module_state(module):
    """What a torch module computes with: parameters (and their gradients), buffers,
    train / eval modes and the number of hooks registered on each submodule."""
    state = {}
    for name, p in module.named_parameters():
        state[f"param {name}"] = (p.detach(), p.requires_grad, p.grad)
    for name, b in module.named_buffers():
        state[f"buffer {name}"] = b
    for name, sub in module.named_modules():
        hooks = {k: len(v) for k, v in vars(sub).items() if k.endswith("hooks")
                 and isinstance(v, Mapping)}
        state[f"module {name or '<root>'}"] = (sub.training, hooks)
    return state


def _payload(obj):
    """``(kind, state)`` of a container or object, as the snapshot records it."""
    if isinstance(obj, torch.nn.Module):
        return "module", _module_state(obj)
    if isinstance(obj, torch.optim.Optimizer):
        return "optimizer", obj.state_dict()
    if _is_skorch(obj):  # the model being explained: its modules
        return "skorch", {k: getattr(obj, k) for k in ("initialized_", "module_", "criterion_")
                          if hasattr(obj, k)}
    if isinstance(obj, (np.random.RandomState, torch.Generator)):
        return "rng", obj.get_state()
    if isinstance(obj, np.random.Generator):
        return "rng", obj.bit_generator.state
    if isinstance(obj, Mapping):
        if all(isinstance(k, _SCALARS) for k in obj):
            return "mapping", dict(obj)
        return "pairs", list(obj.items())  # e.g. tensors as keys: compared in order
    if isinstance(obj, (list, tuple)):
        return "sequence", list(obj)
    if isinstance(obj, (set, frozenset)):
        return "set", obj
    if isinstance(obj, types.MethodType):
        return "method", (obj.__func__, obj.__self__)
    if isinstance(obj, functools.partial):
        return "partial", (obj.func, obj.args, obj.keywords)
    state = dict(vars(obj)) if hasattr(obj, "__dict__") else {}
    for cls in type(obj).__mro__:
        for slot in getattr(cls, "__slots__", ()):
            if slot not in ("__dict__", "__weakref__") and hasattr(obj, slot):
                state[slot] = getattr(obj, slot)
    if state or hasattr(obj, "__dict__"):
        return "object", state
    return "opaque", obj


def _snapshot(obj, memo):
    """A detached copy of the state of ``obj`` that later changes of ``obj`` cannot
    reach (``__getstate__`` / ``__deepcopy__`` are not used: they may drop caches)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, np.ndarray):
        return obj.copy()
    if isinstance(obj, _SCALARS) or isinstance(obj, _BY_IDENTITY):
        return obj
    if id(obj) in memo:
        return _Ref(memo[id(obj)][0])
    memo[id(obj)] = (len(memo), obj)  # holding obj keeps its id from being reused
    kind, state = _payload(obj)
    if kind in ("mapping", "object", "module", "optimizer", "skorch", "rng"):
        if isinstance(state, Mapping):
            value = {k: _snapshot(v, memo) for k, v in state.items()}
        else:
            value = _snapshot(state, memo)
    elif kind in ("sequence", "pairs", "method", "partial"):
        value = [_snapshot(v, memo) for v in state]
    elif kind == "set":
        value = frozenset(state)
    else:  # opaque objects (no __dict__ or slots): compared as they are
        value = state
    return _Node(kind, type(obj), value)


def _difference(a, b, path):
    """Where snapshot ``b`` differs from snapshot ``a``, or None."""
    where = path or "<state>"
    if type(a) is not type(b):
        return f"{where}: {type(a).__name__} became {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        if (a.dtype, a.device, a.shape) != (b.dtype, b.device, b.shape):
            return (f"{where}: tensor {a.dtype} {a.device} {tuple(a.shape)} became "
                    f"{b.dtype} {b.device} {tuple(b.shape)}")
        nan = a.is_floating_point() and bool(a.isnan().any())
        same = (torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(0.0),
                b.nan_to_num(0.0))) if nan else torch.equal(a, b)
        return None if same else f"{where}: tensor values changed"
    if isinstance(a, np.ndarray):
        if (a.dtype, a.shape) != (b.dtype, b.shape):
            return f"{where}: array {a.dtype} {a.shape} became {b.dtype} {b.shape}"
        same = np.array_equal(a, b, equal_nan=a.dtype.kind in "fc")
        return None if same else f"{where}: array values changed"
    if isinstance(a, _Ref):
        return None if a.index == b.index else f"{where}: a shared reference changed"
    if isinstance(a, _Node):
        if a.cls is not b.cls or a.kind != b.kind:
            return f"{where}: {a.cls.__name__} became {b.cls.__name__}"
        return _difference_of(a, b, path)
    if isinstance(a, _BY_IDENTITY):
        return None if a is b else f"{where}: {a!r} became {b!r}"
    if isinstance(a, (float, np.floating)) and np.isnan(a) and np.isnan(b):
        return None
    try:
        same = a is b or bool(a == b)
    except Exception:  # noqa: BLE001 - not comparable: only identity counts
        same = False
    return None if same else f"{where}: {a!r} became {b!r}"


def _difference_of(a, b, path):
    """Differences inside two snapshot nodes of the same kind."""
    if isinstance(a.value, dict):
        added = [k for k in b.value if k not in a.value]
        removed = [k for k in a.value if k not in b.value]
        if added or removed:
            return f"{path or '<state>'}: added {added}, removed {removed}"
        attrs = a.kind in ("object", "skorch")
        for k, v in a.value.items():
            sub = (f"{path}.{k}" if path else str(k)) if attrs else f"{path}[{k!r}]"
            diff = _difference(v, b.value[k], sub)
            if diff:
                return diff
        return None
    if isinstance(a.value, list):
        if len(a.value) != len(b.value):
            return f"{path or '<state>'}: length {len(a.value)} became {len(b.value)}"
        for i, (u, v) in enumerate(zip(a.value, b.value)):
            diff = _difference(u, v, f"{path}[{i}]")
            if diff:
                return diff
        return None
    return _difference(a.value, b.value, path)


