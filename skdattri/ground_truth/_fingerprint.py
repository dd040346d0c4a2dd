"""Pickle-free fingerprints of what determines a retrain: the model recipe and the data.

The retrain cache (``memory=``) is keyed in the calling process, before anything is
shipped to a worker, by :func:`fingerprint`. It turns a value into a tree of plain
Python values and numpy arrays (:func:`_describe`) and hashes that tree with
:func:`joblib.hash`, so that

- classes and functions are described by their qualified name and, for installed
  libraries (scikit-learn, torch, skorch, the standard library, ...), the library's
  version; the user's own code (a script's ``__main__``, a project folder, an editable
  install) is described by the bytecode and plain attributes of its methods instead. Nothing is
  pickled by reference: a module class defined in a user's ``__main__`` hashes the
  same in every process, and two scripts defining different ``__main__.Net`` classes
  do not share cache entries. (Library code is not read: torch, for one, rewraps
  optimiser methods at run time);
- estimators (scikit-learn, skorch nets and callbacks) are described by their class
  and ``get_params(deep=False)``, recursively;
- torch modules and tensors are described by their values (torch's own pickles carry
  per-call serialization ids, so their bytes differ between two processes);
- anything else falls back to its class and attributes, and finally to its ``repr``.
  An unusual object may then hash differently in two processes (a cache miss: the fit
  is redone), never the same for two different recipes.
"""

from __future__ import annotations

import enum
import functools
import importlib.metadata
import inspect
import os
import re
import sys
import types
from pathlib import Path

import joblib
import numpy as np
import torch

__all__ = ["fingerprint"]

# How deep nested containers and objects are followed before falling back to repr.
_MAX_DEPTH = 50


@functools.cache
def _package_version(module_name):
    """``"name-version"`` of installed library code, ``""`` for the user's own code.

    Library code is the standard library and whatever lives in a ``site-packages`` (or
    ``dist-packages``) folder; a script's ``__main__``, a project folder on the path and
    an editable install are the user's, whose code may change without a new version.
    """
    root = (module_name or "").split(".")[0]
    if root == "builtins" or root in sys.stdlib_module_names:
        return "python-" + ".".join(map(str, sys.version_info[:2]))
    module = sys.modules.get(root)
    folders = Path(getattr(module, "__file__", None) or "").parts
    if "site-packages" not in folders and "dist-packages" not in folders:
        return ""
    version = getattr(module, "__version__", None)
    if version is None:
        try:
            version = importlib.metadata.version(root)
        except (importlib.metadata.PackageNotFoundError, ValueError):
            version = "installed"
    return f"{root}-{version}"


def _describe_code(code):
    """Bytecode, constants and names of a code object (no line numbers, no file)."""
    consts = tuple(
        _describe_code(c) if isinstance(c, types.CodeType) else _describe_leaf_const(c)
        for c in code.co_consts
    )
    return ("code", code.co_code, consts, code.co_names, code.co_varnames)


def _describe_leaf_const(value):
    # frozensets iterate in an order that depends on string hash randomisation
    if isinstance(value, frozenset):
        return ("frozenset", tuple(sorted(map(repr, value))))
    if isinstance(value, tuple):
        return tuple(_describe_leaf_const(v) for v in value)
    return value


def _function_body(func):
    """What a plain function computes: its bytecode and the values its closure holds."""
    func = getattr(func, "__func__", func)  # classmethod, staticmethod
    if isinstance(func, property):
        return tuple(_function_body(f) for f in (func.fget, func.fset) if f is not None)
    func = inspect.unwrap(func)  # a functools.wraps decorator, maybe added at run time
    code = getattr(func, "__code__", None)
    if code is None:
        return None
    return _describe_code(code), tuple(map(_closure_value, func.__closure__ or ()))


def _closure_value(cell):
    """A value a closure captured; classes (e.g. the ``__class__`` cell of ``super()``)
    by name only, which keeps the description finite."""
    try:
        value = cell.cell_contents
    except ValueError:  # an empty cell
        return None
    if isinstance(value, type) or callable(value):
        return ("ref", getattr(value, "__module__", None),
                getattr(value, "__qualname__", type(value).__qualname__))
    return _describe(value, _MAX_DEPTH - 5)


_PLAIN = (type(None), bool, int, float, str, bytes)


def _class_member(member):
    """A class attribute's part of the class description (None: left out)."""
    if isinstance(member, types.FunctionType | classmethod | staticmethod | property):
        return _function_body(member)
    if isinstance(member, _PLAIN) or (
        isinstance(member, tuple) and all(isinstance(m, _PLAIN) for m in member)
    ):
        return member
    return None


def _describe_class(cls):
    """Every class of the MRO by name and version, or (user code) by the bytecode of its
    methods and its plain attributes."""
    mro = []
    for klass in cls.__mro__:
        version = _package_version(klass.__module__)
        if version:
            mro.append((klass.__module__, klass.__qualname__, version))
            continue
        members = tuple(
            (name, described)
            for name, member in sorted(vars(klass).items())
            if name not in ("__doc__", "__module__", "__qualname__")
            and (described := _class_member(member)) is not None
        )
        mro.append((klass.__module__, klass.__qualname__, members))
    return ("class", tuple(mro))


def _describe_callable(func, depth):
    if isinstance(func, functools.partial):
        return ("partial", _describe(func.func, depth), _describe(func.args, depth),
                _describe(func.keywords, depth))
    if isinstance(func, types.MethodType):
        return ("method", _describe(func.__self__, depth), func.__func__.__qualname__)
    module = getattr(func, "__module__", None)
    name = getattr(func, "__qualname__", getattr(func, "__name__", repr(func)))
    version = _package_version(module)
    if version:
        return ("function", module, name, version)
    defaults = getattr(func, "__defaults__", None), getattr(func, "__kwdefaults__", None)
    return ("function", module, name, _function_body(func), _describe(defaults, depth))


def _describe_tensor(tensor):
    t = tensor.detach()
    if t.layout != torch.strided:
        t = t.to_dense()
    raw = t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
    return ("tensor", str(t.dtype), tuple(t.shape), raw)


def _describe_module(module, depth):
    state = tuple((name, _describe_tensor(value)) for name, value in module.state_dict().items())
    parts = tuple((name, _describe_class(type(sub))) for name, sub in module.named_modules())
    return ("module", parts, state, module.training)


def _describe(value, depth=0):
    """A tree of plain values and arrays that determines ``value`` (see the module doc)."""
    depth += 1
    if depth > _MAX_DEPTH:
        return ("repr", _stable_repr(value))
    if value is None or isinstance(value, bool | int | float | complex | str | bytes):
        return value
    if isinstance(value, np.ndarray):
        if value.dtype.hasobject:
            return ("object-array", value.shape, _describe(value.ravel().tolist(), depth))
        return value
    if isinstance(value, np.generic | np.dtype | torch.dtype | torch.device | os.PathLike):
        return (type(value).__name__, str(value) if not isinstance(value, np.generic) else value)
    if isinstance(value, enum.Enum):
        return ("enum", _describe_class(type(value)), value.name)
    if isinstance(value, torch.Tensor):
        return _describe_tensor(value)
    if isinstance(value, torch.nn.Module):
        return _describe_module(value, depth)
    if isinstance(value, type):
        return _describe_class(value)
    if isinstance(value, list | tuple):
        return (type(value).__name__, tuple(_describe(v, depth) for v in value))
    if isinstance(value, dict):
        items = [(_describe(k, depth), _describe(v, depth)) for k, v in value.items()]
        return ("dict", tuple(sorted(items, key=lambda kv: repr(kv[0]))))
    if isinstance(value, set | frozenset):
        return ("set", tuple(sorted((_describe(v, depth) for v in value), key=repr)))
    if isinstance(value, np.random.RandomState):
        return ("RandomState", _describe(value.get_state(), depth))
    if callable(value) and not hasattr(value, "get_params") and (
        isinstance(value, types.FunctionType | types.BuiltinFunctionType | types.MethodType
                   | functools.partial)
    ):
        return _describe_callable(value, depth)
    if hasattr(value, "get_params") and not isinstance(value, type):
        try:
            params = value.get_params(deep=False)
        except TypeError:  # get_params without a ``deep`` argument
            params = value.get_params()
        return ("estimator", _describe_class(type(value)), _describe(params, depth))
    attributes = getattr(value, "__dict__", None)
    if attributes is None:  # a slotted object: its slots are its attributes
        slots = [n for cls in type(value).__mro__ for n in _slot_names(cls)]
        attributes = {n: getattr(value, n) for n in slots if hasattr(value, n)} or None
    if attributes is not None:
        return ("object", _describe_class(type(value)), _describe(attributes, depth))
    return ("repr", _describe_class(type(value)), _stable_repr(value))


def _slot_names(cls):
    slots = cls.__dict__.get("__slots__", ())
    return (slots,) if isinstance(slots, str) else tuple(n for n in slots if n != "__weakref__")


def _stable_repr(value):
    """``repr`` without memory addresses (``<... at 0x7f...>``), which differ between
    processes."""
    return re.sub(r" at 0x[0-9a-fA-F]+", "", repr(value))


def fingerprint(*values):
    """Hex digest identifying ``values`` across processes (see the module docstring).

    Parameters
    ----------
    *values : object
        Estimators, data (arrays, tensors, dicts, Datasets) or plain values.

    Returns
    -------
    digest : str
        32 hexadecimal characters; equal for equal recipes in any process.

    Examples
    --------
    >>> from sklearn.linear_model import LogisticRegression
    >>> from skdattri.ground_truth._fingerprint import fingerprint
    >>> fingerprint(LogisticRegression(C=1.0)) == fingerprint(LogisticRegression(C=1.0))
    True
    >>> fingerprint(LogisticRegression(C=1.0)) == fingerprint(LogisticRegression(C=2.0))
    False
    """
    return joblib.hash(_describe(values))
