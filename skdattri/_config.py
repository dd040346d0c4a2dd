"""Global configuration of skdattri, as :func:`sklearn.set_config` / ``config_context``.

Settings that choose *how* a result is computed, never *what* is computed (scores are
the same whichever path runs, within float tolerance): the per-sample-gradient engine
and the use of ghost inner products. They are process-global (thread-local overrides
through :func:`config_context`) so that no attributor needs an extra parameter.
"""

from __future__ import annotations

import contextlib
import threading

__all__ = ["config_context", "get_config", "set_config"]

_DEFAULTS = {"grad_engine": "auto", "ghost": "auto"}
_CHOICES = {"grad_engine": ("auto", "hooks", "vmap"), "ghost": ("auto", True, False)}
_global = dict(_DEFAULTS)
_local = threading.local()


def _current():
    if not hasattr(_local, "config"):
        _local.config = dict(_global)
    return _local.config


def get_config():
    """The current configuration, as a new dict.

    Returns
    -------
    config : dict
        ``{"grad_engine": ..., "ghost": ...}``, see :func:`set_config`.

    Examples
    --------
    >>> from skdattri import get_config
    >>> get_config()["grad_engine"]
    'auto'
    """
    return dict(_current())


def _check(name, value):
    if name not in _CHOICES:
        raise TypeError(f"Unknown skdattri config {name!r}; known: {sorted(_CHOICES)}.")
    if not any(value is c if isinstance(c, bool) else value == c for c in _CHOICES[name]):
        raise ValueError(f"{name} must be one of {_CHOICES[name]}, got {value!r}.")


def set_config(grad_engine=None, ghost=None):
    """Set the global configuration (arguments left at ``None`` are unchanged).

    Parameters
    ----------
    grad_engine : {"auto", "hooks", "vmap"}, default=None
        How per-sample gradients are computed
        (:func:`skdattri.func.model_per_sample_grads` with ``engine="auto"``):
        ``"hooks"`` takes the gradients of ``nn.Linear`` / ``nn.Conv1d`` / ``nn.Conv2d``
        parameters from layer hooks of one batched forward and backward pass (outer
        products) and the others from ``torch.func.vmap(grad)``; ``"vmap"`` uses
        ``vmap(grad)`` for every parameter; ``"auto"`` (default) hooks where a
        supported layer is differentiated.
    ghost : {"auto", True, False}, default=None
        Ghost inner products in :class:`~skdattri.TracIn` without projection: train and
        query gradients are kept as their layer factors and scored by
        ``(a_i . a_j)(g_i . g_j)`` (:mod:`skdattri.func.ghost`). ``"auto"`` (default):
        for the layers where that is cheaper than the materialised gradient, when the
        factors are smaller than the gradient and ``grad_engine`` is not ``"vmap"``;
        ``True``: for every hooked layer; ``False``: never.

    Examples
    --------
    >>> from skdattri import get_config, set_config
    >>> set_config(ghost=False)
    >>> get_config()["ghost"]
    False
    >>> set_config(ghost="auto")
    """
    for name, value in (("grad_engine", grad_engine), ("ghost", ghost)):
        if value is not None:
            _check(name, value)
            _global[name] = value
            _current()[name] = value


@contextlib.contextmanager
def config_context(**new_config):
    """Temporarily change the configuration inside a ``with`` block.

    Parameters
    ----------
    **new_config
        ``grad_engine`` and / or ``ghost``, as in :func:`set_config`.

    Examples
    --------
    >>> from skdattri import config_context, get_config
    >>> with config_context(grad_engine="vmap", ghost=False):
    ...     get_config()
    {'grad_engine': 'vmap', 'ghost': False}
    >>> get_config()["grad_engine"]
    'auto'
    """
    for name, value in new_config.items():
        _check(name, value)
    config = _current()
    old = dict(config)
    config.update(new_config)
    try:
        yield
    finally:
        config.clear()
        config.update(old)
