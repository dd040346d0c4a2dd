"""Benchmark runner: every attribution method on one setting, judged by retraining.

``python -m skdattri benchmark SETTING`` (see :mod:`skdattri.cli`) calls
:func:`run_benchmark`, which

1. loads the setting (:func:`skdattri.datasets.load_setting`) and trains its model once,
   keeping training checkpoints for TracIn (state dicts saved at evenly spaced epochs by a
   skorch callback; for scikit-learn models, refits with increasing ``max_iter``);
2. computes -- or loads from ``cache_dir`` -- the ground truth: LDS from models retrained
   on random halves of the training set, and leave-one-out changes where retraining is
   deterministic and cheap (scikit-learn models);
3. runs every method of the registry :data:`METHODS` that applies to the setting, timing
   ``fit`` and ``transform`` separately and recording their peak memory;
4. scores the attributions (LDS, LOO) and, on the ``-noisy`` variant of the setting, the
   mislabel-detection AUC of each method's self-influence.

Each method is one :class:`Method` entry: a name, a factory
``(setting, fitted_model, checkpoints) -> unfitted attributor`` and a test of whether it
applies to a setting.  Factories import their attributor lazily, so a method whose module
is not there yet is listed as unavailable and skipped; any other error propagates.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import sys
import threading
import time
import tracemalloc
import warnings
from dataclasses import dataclass
from pathlib import Path

import joblib
import numpy as np
import torch
from sklearn.base import clone
from sklearn.exceptions import ConvergenceWarning
from skorch import NeuralNet
from skorch.callbacks import Callback

from ._utils import _progress, _resolve_device

__all__ = [
    "METHODS",
    "Checkpoints",
    "Method",
    "default_cache_dir",
    "format_table",
    "get_method",
    "compute_ground_truth",
    "list_methods",
    "plot_results",
    "run_benchmark",
    "train_with_checkpoints",
    "write_json",
]

#: Keys of every result record (``--output`` writes a list of such records).
RECORD_KEYS = (
    "method",
    "params",
    "lds",
    "loo",
    "auc",
    "fit_seconds",
    "transform_seconds",
    "peak_memory_mb",
)


# ----------------------------------------------------------------------------------------
# the method registry


@dataclass(frozen=True)
class Checkpoints:
    """Training checkpoints of the attributed model.

    Attributes
    ----------
    states : list
        State dicts (skorch nets) or fitted estimators (scikit-learn models) along the
        training run, the last one being the final model.
    learning_rates : list of float
        Learning rate in effect at each checkpoint (1.0 where the optimiser has none).
    """

    states: list
    learning_rates: list


def _always(setting):
    return True


@dataclass(frozen=True)
class Method:
    """One entry of the benchmark registry.

    Parameters
    ----------
    name : str
        Name used on the command line and in the results.
    factory : callable
        ``factory(setting, fitted_model, checkpoints)`` returns an unfitted attributor
        (``fit(X_train, y_train)``, ``transform(X_test, y_test)``). It imports the
        attributor's module itself, so the registry does not import it.
    module : str
        Module the factory imports; the method is unavailable while it cannot be found.
    applicable : callable, default=always
        ``applicable(setting) -> bool``.
    description : str
        One line for ``--list``.
    suspicion : callable or None
        ``suspicion(fitted_attributor, setting) -> (n_train,)`` scores ranking training
        samples from most to least likely mislabelled; ``None`` uses
        ``attributor.self_influence()``.
    """

    name: str
    factory: object
    module: str
    applicable: object = _always
    description: str = ""
    suspicion: object = None

    def available(self):
        """Whether the attributor's module can be imported (it exists)."""
        try:
            return importlib.util.find_spec(self.module) is not None
        except ModuleNotFoundError:
            return False


def _is_torch(setting):
    return isinstance(setting.estimator, NeuralNet)


def _is_classification(setting):
    return setting.task == "classification"


def _grad_dot(setting, model, checkpoints):
    from .tracin import TracIn

    return TracIn(model)


def _grad_cos(setting, model, checkpoints):
    from .tracin import TracIn

    return TracIn(model, normalize=True)


def _tracin(setting, model, checkpoints):
    from .tracin import TracIn

    return TracIn(model, checkpoints=list(checkpoints.states),
                  learning_rates=list(checkpoints.learning_rates))


# Damping of the influence solvers.  scikit-learn models bring their own L2 penalty into
# the Hessian; the tiny damping only removes the null direction of a multinomial model's
# intercepts (adding a constant to every class), which no gradient has a component along.
# Neural nets have indefinite Hessians: the damping (relative to a mean-loss Hessian)
# keeps the solvers well posed.
_SK_DAMPING = 1e-6
_NET_DAMPING = 1e-2


def _influence(solver, **kwargs):
    def factory(setting, model, checkpoints):
        from .influence import InfluenceFunction

        damping = _NET_DAMPING if _is_torch(setting) else _SK_DAMPING
        params = {"regularization": damping, **kwargs}
        if solver in ("datainf", "ekfac"):
            params["regularization"] = kwargs.get("regularization")  # the papers' heuristics
        if solver in ("cg", "lissa", "arnoldi") and _is_torch(setting):
            params.setdefault("hessian", "ggn")
        return InfluenceFunction(model, solver=solver, **params)

    factory.__name__ = f"_influence_{solver}"
    return factory


def _trak(n_models):
    def factory(setting, model, checkpoints):
        from .trak import TRAK

        # the kernel Phi^T Phi is singular unless proj_dim <= n_train
        proj_dim = min(512, len(setting.y_train) // 2)
        if n_models == 1:
            return TRAK(model, proj_dim=proj_dim)
        # an unfitted estimator: TRAK trains its own ensemble in fit (timed with it)
        return TRAK(clone(setting.estimator), n_models=n_models, proj_dim=proj_dim)

    factory.__name__ = f"_trak_{n_models}"
    return factory


def _representer(setting, model, checkpoints):
    from .representer import RepresenterPoints

    return RepresenterPoints(model)


def _flatten(X):
    """Rows of ``X`` as flat feature vectors (KNN-Shapley on images)."""
    X = np.asarray(X)
    return X.reshape(len(X), -1)


def _knn_shapley(setting, model, checkpoints):
    from .shapley import KNNShapley

    embedding = _flatten if np.asarray(setting.X_train).ndim > 2 else None
    return KNNShapley(n_neighbors=5, embedding=embedding)


def _rps_suspicion(attributor, setting):
    """Minus the self-influence: the representer value of a sample for its own label is
    negative when the label disagrees with the model (the refit targets are the model's
    predictions, not the labels), so the most negative come first."""
    return -attributor.self_influence()


def _knn_suspicion(attributor, setting):
    """Minus the summed KNN-Shapley value of each sample for the *other* training rows."""
    values = attributor.fit_transform(setting.X_train, setting.y_train)
    return -(values.sum(axis=0) - np.diag(values))


METHODS = [
    Method("grad-dot", _grad_dot, "skdattri.tracin",
           description="TracIn on the final model only (gradient dot product)"),
    Method("grad-cos", _grad_cos, "skdattri.tracin",
           description="gradient cosine on the final model"),
    Method("tracin", _tracin, "skdattri.tracin",
           description="TracInCP over the training checkpoints, weighted by learning rate"),
    Method("if-explicit", _influence("explicit"), "skdattri.influence",
           applicable=lambda s: not _is_torch(s),
           description="influence function, dense Hessian (scikit-learn models only)"),
    Method("if-cg", _influence("cg", max_iter=20), "skdattri.influence",
           description="influence function, conjugate gradient"),
    Method("if-lissa", _influence("lissa", depth=100, scale=50.0, batch_size=64),
           "skdattri.influence",
           description="influence function, LiSSA recursion"),
    Method("if-arnoldi", _influence("arnoldi", n_components=50, max_iter=100),
           "skdattri.influence", description="influence function, top Arnoldi eigenpairs"),
    Method("if-datainf", _influence("datainf"), "skdattri.influence",
           description="DataInf layer-wise closed form"),
    Method("if-ekfac", _influence("ekfac"), "skdattri.influence",
           description="influence function, EK-FAC curvature"),
    Method("trak", _trak(1), "skdattri.trak",
           description="TRAK on the final model (projection to 512)"),
    Method("trak-5", _trak(5), "skdattri.trak", applicable=_is_torch,
           description="TRAK over 5 independently trained models (trained inside fit)"),
    Method("trak-10", _trak(10), "skdattri.trak", applicable=_is_torch,
           description="TRAK over 10 independently trained models (trained inside fit)"),
    Method("rps", _representer, "skdattri.representer", suspicion=_rps_suspicion,
           description="representer points (L2-refit last layer)"),
    Method("knn-shapley", _knn_shapley, "skdattri.shapley",
           applicable=_is_classification, suspicion=_knn_suspicion,
           description="exact KNN-Shapley on the input features (k=5)"),
]


def get_method(name):
    """The registry entry called ``name``.

    Raises
    ------
    ValueError
        For an unknown name (the message lists the known ones).
    """
    for method in METHODS:
        if method.name == name:
            return method
    raise ValueError(
        f"Unknown method {name!r}; available: {', '.join(m.name for m in METHODS)}."
    )


def list_methods():
    """Names of the registered methods and whether each can run now.

    Returns
    -------
    methods : list of (str, bool, str)
        ``(name, available, description)``; unavailable methods need a module that is
        not installed yet.

    Examples
    --------
    >>> from skdattri.benchmark import list_methods
    >>> name, available, description = list_methods()[0]
    >>> name, available
    ('grad-dot', True)
    """
    return [(m.name, m.available(), m.description) for m in METHODS]


# ----------------------------------------------------------------------------------------
# training with checkpoints


class _Snapshots(Callback):
    """skorch callback keeping a CPU copy of the module's state after chosen epochs."""

    def __init__(self, epochs=()):
        self.epochs = epochs

    def initialize(self):
        self.states_ = []
        self.lrs_ = []
        return self

    def on_epoch_end(self, net, **kwargs):
        epoch = len(net.history)
        if epoch in set(self.epochs):
            self.states_.append({k: v.detach().cpu().clone()
                                 for k, v in net.module_.state_dict().items()})
            lrs = [group["lr"] for group in net.optimizer_.param_groups]
            self.lrs_.append(float(np.mean(lrs)))


def _checkpoint_steps(total, n_checkpoints):
    """``n_checkpoints`` evenly spaced steps in ``1..total`` ending at ``total``."""
    steps = np.unique(np.round(np.linspace(total / n_checkpoints, total, n_checkpoints)))
    return [int(s) for s in steps if s >= 1]


def train_with_checkpoints(setting, *, n_checkpoints=5, random_state=0):
    """Fit a setting's model once, keeping checkpoints along the way (for TracIn).

    Parameters
    ----------
    setting : Bunch
        From :func:`skdattri.datasets.load_setting`.
    n_checkpoints : int, default=5
        Number of checkpoints, evenly spaced over training, the last being the final
        model. skorch nets: state dicts (on the CPU) saved by a callback at the end of
        the chosen epochs, with the optimiser's learning rate at that epoch. Estimators
        with ``max_iter`` (e.g. ``LogisticRegression``): clones refit with increasing
        ``max_iter`` (the iterates of the solver), learning rate 1. Others: the final
        model only.
    random_state : int, default=0
        Torch seed of the training of a skorch net (its initial weights are seeded by
        the setting itself).

    Returns
    -------
    model : estimator
        The fitted clone of ``setting.estimator``.
    checkpoints : Checkpoints
        ``states`` and ``learning_rates``.
    """
    seed = random_state
    est = clone(setting.estimator)
    if isinstance(est, NeuralNet):
        epochs = _checkpoint_steps(int(est.max_epochs), n_checkpoints)
        callbacks = list(est.callbacks or []) + [("skdattri_snapshots", _Snapshots(epochs))]
        est.set_params(callbacks=callbacks)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            est.fit(setting.X_train, setting.y_train)
        snaps = dict(est.callbacks_)["skdattri_snapshots"]
        return est, Checkpoints(list(snaps.states_), list(snaps.lrs_))

    est.fit(setting.X_train, setting.y_train)
    n_iter = int(np.max(getattr(est, "n_iter_", 0)))
    if "max_iter" not in est.get_params() or n_iter < 2:
        return est, Checkpoints([est], [1.0])
    states = []
    for steps in _checkpoint_steps(n_iter, n_checkpoints)[:-1]:
        partial = clone(est).set_params(max_iter=steps)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            partial.fit(setting.X_train, setting.y_train)
        states.append(partial)
    states.append(est)
    return est, Checkpoints(states, [1.0] * len(states))


# ----------------------------------------------------------------------------------------
# ground truth, cached on disk


def default_cache_dir():
    """``$SKDATTRI_CACHE`` if set, else ``~/.cache/skdattri``."""
    env = os.environ.get("SKDATTRI_CACHE")
    if env:
        return Path(env)
    return Path.home() / ".cache" / "skdattri"


def _setting_key(setting, random_state):
    """Hash of everything the ground truth depends on: data and model recipe."""
    return joblib.hash((setting.name, setting.X_train, setting.y_train, setting.X_test,
                        setting.y_test, repr(setting.estimator), random_state))[:16]


def _chunks(n, size):
    return [(start, min(start + size, n)) for start in range(0, n, size)]


def _lds_ground_truth(setting, *, n_subsets, subset_fraction, random_state, n_jobs,
                      cache_dir, verbose):
    from .ground_truth import LDSGroundTruth, lds_ground_truth

    key = _setting_key(setting, random_state)
    path = cache_dir / f"{setting.name}-lds-{n_subsets}x{subset_fraction:g}-{key}.npz"
    if path.exists():
        return LDSGroundTruth.load(path), True
    memory = joblib.Memory(cache_dir / "retrains", verbose=0)
    # The first m subsets do not depend on n_subsets, so growing n_subsets in steps over
    # the cached retrains gives a progress bar at the cost of reloading finished fits.
    step = 4 * joblib.effective_n_jobs(n_jobs)
    chunks = _chunks(n_subsets, step)
    gt = None
    for _, stop in _progress(chunks, verbose=verbose, desc=f"LDS ground truth ({n_subsets} "
                             f"retrains, {step} per tick)"):
        gt = lds_ground_truth(
            setting.estimator, setting.X_train, setting.y_train, setting.X_test,
            setting.y_test, n_subsets=max(stop, 2), subset_fraction=subset_fraction,
            n_jobs=n_jobs, random_state=random_state, memory=memory,
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    gt.save(path)
    return gt, False


def _loo_ground_truth(setting, *, n_loo, random_state, n_jobs, cache_dir, verbose):
    from .ground_truth import LOOGroundTruth, loo_ground_truth

    n_train = len(setting.y_train)
    n_loo = min(int(n_loo), n_train)
    key = _setting_key(setting, random_state)
    path = cache_dir / f"{setting.name}-loo-{n_loo}-{key}.npz"
    if path.exists():
        return LOOGroundTruth.load(path), True
    indices = np.sort(np.random.RandomState(random_state).choice(n_train, n_loo,
                                                                 replace=False))
    memory = joblib.Memory(cache_dir / "retrains", verbose=0)
    step = 8 * joblib.effective_n_jobs(n_jobs)
    values = []
    for start, stop in _progress(_chunks(n_loo, step), verbose=verbose,
                                 desc=f"LOO ground truth ({n_loo} retrains, {step} per tick)"):
        part = loo_ground_truth(
            setting.estimator, setting.X_train, setting.y_train, setting.X_test,
            setting.y_test, indices=indices[start:stop], n_jobs=n_jobs,
            random_state=random_state, memory=memory,
        )
        values.append(part.values)
    gt = LOOGroundTruth(indices, np.concatenate(values), target="loss", n_train=n_train)
    path.parent.mkdir(parents=True, exist_ok=True)
    gt.save(path)
    return gt, False


def compute_ground_truth(setting, *, n_subsets=50, subset_fraction=0.5, n_loo="auto",
                         cache_dir=None, n_jobs=-1, random_state=0, verbose=0):
    """LDS (and LOO) ground truth of a setting, computed once and cached on disk.

    Parameters
    ----------
    setting : Bunch
        From :func:`skdattri.datasets.load_setting`.
    n_subsets, subset_fraction : int, float
        Passed to :func:`skdattri.ground_truth.lds_ground_truth`.
    n_loo : int or "auto", default="auto"
        Removed training samples of the LOO ground truth (drawn by ``random_state``);
        ``"auto"``: 100 for scikit-learn models, 0 (no LOO) for neural nets.
    cache_dir : str or path-like, default=None
        ``None``: :func:`default_cache_dir`. The ground truth is saved as ``.npz`` files
        named after the setting, the sizes and a hash of the data and the model recipe,
        and every retrain is cached by :class:`joblib.Memory` under ``retrains/`` (an
        interrupted run resumes).
    n_jobs : int, default=-1
        Parallel retraining jobs.
    random_state : int, default=0
        Seeds the subsets, the removed indices and the retraining.
    verbose : int, default=0
        Progress bars and messages on standard error.

    Returns
    -------
    lds : LDSGroundTruth
    loo : LOOGroundTruth or None
    """
    cache_dir = Path(default_cache_dir() if cache_dir is None else cache_dir).expanduser()
    t0 = time.perf_counter()
    lds_gt, cached = _lds_ground_truth(setting, n_subsets=n_subsets,
                                       subset_fraction=subset_fraction,
                                       random_state=random_state, n_jobs=n_jobs,
                                       cache_dir=cache_dir, verbose=verbose)
    _say(verbose, f"LDS ground truth ({n_subsets} subsets) "
                  + ("loaded from cache" if cached else
                     f"computed in {time.perf_counter() - t0:.1f}s"))
    if n_loo == "auto":
        n_loo = 0 if _is_torch(setting) else 100
    loo_gt = None
    if n_loo and int(n_loo) >= 2:
        t0 = time.perf_counter()
        loo_gt, cached = _loo_ground_truth(setting, n_loo=n_loo, random_state=random_state,
                                           n_jobs=n_jobs, cache_dir=cache_dir,
                                           verbose=verbose)
        _say(verbose, f"LOO ground truth ({loo_gt.n_removed} removals) "
                      + ("loaded from cache" if cached else
                         f"computed in {time.perf_counter() - t0:.1f}s"))
    return lds_gt, loo_gt


# ----------------------------------------------------------------------------------------
# measurement


def _release_free_memory():
    """Give memory that is free inside the process back to the OS before a measurement.

    glibc keeps freed blocks for reuse, so a step could run in memory freed by an earlier
    one without the resident set size growing. ``gc.collect()`` followed by
    ``malloc_trim(0)`` returns those free pages (the allocator's behaviour during the
    step is unchanged). Does nothing where glibc is not the allocator.
    """
    import gc

    gc.collect()
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):
        return False


def _rss_bytes():
    """Anonymous resident memory of this process from /proc (Linux), or None.

    ``resident - shared`` of ``/proc/self/statm``: pages of data the process wrote,
    without the file-backed pages of libraries that a first call maps in.
    """
    try:
        with open("/proc/self/statm") as f:
            fields = f.read().split()
        return (int(fields[1]) - int(fields[2])) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class _PeakMemory:
    """Peak memory used by a block, in bytes, above what was in use when it started.

    - CUDA (``device`` on a GPU): ``torch.cuda.max_memory_allocated`` after a reset of the
      peak statistics, minus the memory allocated at the start.
    - CPU on Linux: the process's anonymous resident memory (``resident - shared`` of
      ``/proc/self/statm``), read by a background thread every millisecond and once more
      at the end, minus its value at the start. This counts everything the step writes
      (torch tensors, NumPy arrays, Python objects), not library code it maps in;
      allocations living less than a millisecond can be missed. Free memory the process still
      holds from earlier steps is first returned to the OS (:func:`_release_free_memory`),
      so that reusing it inside the block shows up in the RSS.
    - CPU elsewhere: ``tracemalloc``'s peak (Python and NumPy allocations only; torch
      tensors are not seen).
    """

    def __init__(self, device=None):  # a torch.device or None (CPU)
        self.device = device
        self.peak = 0

    def __enter__(self):
        self._cuda = self.device is not None and self.device.type == "cuda"
        if self._cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            return self
        _release_free_memory()
        self._start = _rss_bytes()
        if self._start is None:
            tracemalloc.start()
            return self
        self._sampled = self._start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.001):
            rss = _rss_bytes()
            if rss is not None and rss > self._sampled:
                self._sampled = rss

    def __exit__(self, *exc):
        if self._cuda:
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._start
            return False
        if self._start is None:
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            self.peak = peak
            return False
        self._stop.set()
        self._thread.join()
        peak = max(self._sampled, _rss_bytes() or 0)
        self.peak = max(0, peak - self._start)
        return False


# ----------------------------------------------------------------------------------------
# running


def _jsonable(value):
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, np.generic):
        return _jsonable(value.item())
    if isinstance(value, list | tuple):
        if len(value) > 8:
            return f"<{len(value)} items>"
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if callable(value) and hasattr(value, "__name__"):
        return value.__name__
    return type(value).__name__


def _attributor_params(attributor):
    params = attributor.get_params(deep=False)
    params.pop("estimator", None)
    if params.get("checkpoints") is not None:
        params["checkpoints"] = f"<{len(params['checkpoints'])} checkpoints>"
    return {k: _jsonable(v) for k, v in sorted(params.items())}


def _configure(attributor, *, device, random_state):
    own = attributor.get_params(deep=False)
    updates = {}
    if device is not None and "device" in own:
        updates["device"] = device
    if "random_state" in own and own["random_state"] is None:
        updates["random_state"] = random_state
    if updates:
        attributor.set_params(**updates)
    return attributor


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _auc_of(method, attributor, setting):
    from .metrics import mislabel_auc_score

    attributor.fit(setting.X_train, setting.y_train)
    if method.suspicion is not None:
        scores = method.suspicion(attributor, setting)
    elif hasattr(attributor, "self_influence"):
        scores = attributor.self_influence()
    else:
        return None
    return mislabel_auc_score(setting.is_noisy, scores)


def _select_methods(methods, setting):
    if methods is None:
        chosen = [m for m in METHODS if m.applicable(setting)]
    else:
        chosen = [get_method(name) for name in methods]
        for m in chosen:
            if not m.applicable(setting):
                raise ValueError(f"Method {m.name!r} does not apply to setting "
                                 f"{setting.name!r}: {m.description}.")
    available = [m for m in chosen if m.available()]
    skipped = [m.name for m in chosen if not m.available()]
    return available, skipped


@contextlib.contextmanager
def _limit_threads(n_threads):
    """Run a block with ``n_threads`` torch and BLAS/OpenMP threads (None: unchanged)."""
    if not n_threads:
        yield
        return
    from threadpoolctl import threadpool_limits

    old = torch.get_num_threads()
    torch.set_num_threads(int(n_threads))
    try:
        with threadpool_limits(limits=int(n_threads)):
            yield
    finally:
        torch.set_num_threads(old)


def _warm_up(setting, model):
    """Pay torch's one-time set-up costs before timing anything.

    One small untimed per-sample-gradient pass (thread pools, ``torch.func``) and one
    forward-over-reverse product of the model's mean loss: the first ``jvp`` of a
    process loads and scripts torch's forward-AD decompositions (one to two seconds),
    which would otherwise be charged to whichever method happens to use it first.
    """
    from .model import make_model
    from .tracin import TracIn

    n = min(8, len(setting.y_train))
    X, y = setting.X_train[:n], setting.y_train[:n]
    TracIn(model).fit(X, y).transform(setting.X_test[:2], setting.y_test[:2])
    tm = make_model(model, n_train=len(setting.y_train), device="cpu")
    Xt, yt = tm.to_tensor_X(X), tm.to_tensor_y(y)
    params = tm.named_params()

    def mean_loss(p):
        return tm.value(tm.forward(p, Xt), yt, "loss").mean()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.func.jvp(torch.func.grad(mean_loss), (params,), (params,))


def _report_warnings(verbose, name, caught):
    seen = set()
    for w in caught:
        if issubclass(w.category, DeprecationWarning | PendingDeprecationWarning):
            continue  # library internals (e.g. torch), not the method's business
        first = str(w.message).splitlines()[0] if str(w.message) else ""
        key = (w.category.__name__, first[:60])
        if key not in seen:
            seen.add(key)
            _say(verbose, f"{name}: {w.category.__name__}: {first}")


def _say(verbose, message):
    if verbose:
        print(message, file=sys.stderr, flush=True)


def _run_methods(chosen, data, model, checkpoints, noisy, noisy_model, noisy_checkpoints,
                 lds_gt, loo_gt, *, device, random_state, verbose):
    from .metrics import lds_score, loo_score

    _warm_up(data, model)
    records = []
    for method in _progress(chosen, verbose=verbose, desc="methods"):
        attributor = _configure(method.factory(data, model, checkpoints), device=device,
                                random_state=random_state)
        own = attributor.get_params(deep=False)
        attr_device = _resolve_device(own.get("device", "cpu"))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with _PeakMemory(attr_device) as mem:
                t0 = time.perf_counter()
                attributor.fit(data.X_train, data.y_train)
                _sync(attr_device)
                fit_seconds = time.perf_counter() - t0
                t0 = time.perf_counter()
                scores = attributor.transform(data.X_test, data.y_test)
                _sync(attr_device)
                transform_seconds = time.perf_counter() - t0
        _report_warnings(verbose, method.name, caught)
        scores = np.asarray(scores, dtype=np.float64)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # constant rows are reported as NaN / None
            lds = lds_score(lds_gt, scores)
            loo = None if loo_gt is None else loo_score(loo_gt, scores)
        auc_value = None
        if noisy is not None:
            noisy_attr = _configure(method.factory(noisy, noisy_model, noisy_checkpoints),
                                    device=device, random_state=random_state)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                auc_value = _auc_of(method, noisy_attr, noisy)
            _report_warnings(verbose, method.name + " (noisy)", caught)
        record = {
            "method": method.name,
            "params": _attributor_params(attributor),
            "lds": _jsonable(float(lds)),
            "loo": None if loo is None else _jsonable(float(loo)),
            "auc": None if auc_value is None else _jsonable(float(auc_value)),
            "fit_seconds": fit_seconds,
            "transform_seconds": transform_seconds,
            "peak_memory_mb": mem.peak / 2**20,
            "setting": data.name,
        }
        records.append(record)
        _say(verbose > 1, format_table([record]))
    return records


def run_benchmark(setting, *, methods=None, n_subsets=50, subset_fraction=0.5, n_loo="auto",
                  auc=True, n_train=None, n_test=None, n_checkpoints=5, cache_dir=None,
                  n_jobs=-1, n_threads=1, random_state=0, device=None, verbose=1):
    """Run attribution methods on a benchmark setting and score them against retraining.

    Parameters
    ----------
    setting : str
        A name from :func:`skdattri.datasets.list_settings` (classification settings).
    methods : list of str, default=None
        Method names (see :func:`list_methods`); ``None`` runs every available method that
        applies to the setting.
    n_subsets : int, default=50
        Retrained models of the LDS ground truth.
    subset_fraction : float, default=0.5
        Fraction of the training set in each LDS subset.
    n_loo : int or "auto", default="auto"
        Training samples removed one at a time for the LOO ground truth. ``"auto"``: 100
        for scikit-learn models (deterministic, cheap retraining), 0 for neural nets (a
        single removal is below their seed-to-seed noise); 0 skips LOO.
    auc : bool, default=True
        Also measure mislabel-detection AUC on the ``-noisy`` variant (the model is
        retrained on the noisy labels and every method fitted again).
    n_train, n_test : int, default=None
        Sizes passed to :func:`~skdattri.datasets.load_setting` (None: the setting's own).
    n_checkpoints : int, default=5
        Training checkpoints kept for TracIn.
    cache_dir : str or path-like, default=None
        Where ground truth is cached (``None``: :func:`default_cache_dir`).
    n_jobs : int, default=-1
        Parallel retraining jobs for the ground truth (joblib).
    n_threads : int or None, default=1
        Torch and BLAS threads while the methods run (``None``: leave them as they are).
        One thread gives stable timings, comparable with ``benchmarks/compare_dattri.py``;
        on a busy machine, multithreaded LAPACK calls can stall for seconds waiting for
        a descheduled thread.
    random_state : int, default=0
        Seeds the setting, the training, the ground truth and the attributors.
    device : str, default=None
        Device passed to the attributors (``None``: their default, CUDA when available).
    verbose : int, default=1
        Progress messages and bars on standard error.

    Returns
    -------
    records : list of dict
        One per method, with keys ``method``, ``params``, ``lds``, ``loo``, ``auc``,
        ``fit_seconds``, ``transform_seconds``, ``peak_memory_mb`` (``None`` where a
        metric does not apply) and ``setting``.

    See Also
    --------
    format_table, write_json, plot_results : Present the records.
    compute_ground_truth, train_with_checkpoints : The steps, usable on their own.

    Examples
    --------
    >>> import tempfile
    >>> from skdattri.benchmark import format_table, run_benchmark
    >>> records = run_benchmark("digits-lr", methods=["grad-dot", "knn-shapley"],
    ...                         n_train=100, n_test=10, n_subsets=3, n_loo=0, auc=False,
    ...                         n_jobs=1, cache_dir=tempfile.mkdtemp(), verbose=0)
    >>> [(r["method"], r["loo"], r["auc"]) for r in records]
    [('grad-dot', None, None), ('knn-shapley', None, None)]
    >>> print(format_table(records).splitlines()[0])
    method         LDS  LOO  AUC  fit s  transform s  peak MB
    """
    from .datasets import load_setting

    cache_dir = Path(default_cache_dir() if cache_dir is None else cache_dir).expanduser()
    data = load_setting(setting, random_state=random_state, n_train=n_train, n_test=n_test)
    if data.task != "classification":
        raise ValueError(
            f"The benchmark runner needs a classification setting; {setting!r} is a "
            f"{data.task} setting."
        )
    chosen, skipped = _select_methods(methods, data)
    if skipped:
        _say(verbose, "skipped (module not available yet): " + ", ".join(skipped))
    if not chosen:
        raise ValueError("No method to run.")

    t0 = time.perf_counter()
    model, checkpoints = train_with_checkpoints(data, n_checkpoints=n_checkpoints,
                                                random_state=random_state)
    _say(verbose, f"{data.name}: {len(data.y_train)} train / {len(data.y_test)} test, "
                  f"model trained in {time.perf_counter() - t0:.1f}s "
                  f"({len(checkpoints.states)} checkpoints)")

    lds_gt, loo_gt = compute_ground_truth(
        data, n_subsets=n_subsets, subset_fraction=subset_fraction, n_loo=n_loo,
        cache_dir=cache_dir, n_jobs=n_jobs, random_state=random_state, verbose=verbose)

    noisy = noisy_model = noisy_checkpoints = None
    if auc:
        base = data.name.removesuffix("-noisy")
        noisy = load_setting(base + "-noisy", random_state=random_state, n_train=n_train,
                             n_test=n_test)
        noisy_model, noisy_checkpoints = train_with_checkpoints(
            noisy, n_checkpoints=n_checkpoints, random_state=random_state)

    with _limit_threads(n_threads):
        records = _run_methods(
            chosen, data, model, checkpoints, noisy, noisy_model, noisy_checkpoints,
            lds_gt, loo_gt, device=device, random_state=random_state, verbose=verbose)
    return records


# ----------------------------------------------------------------------------------------
# output


def _fmt(value, digits=3):
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.{digits}f}"


def format_table(records):
    """The results as a fixed-width text table (one row per method).

    Parameters
    ----------
    records : list of dict
        As returned by :func:`run_benchmark`.

    Returns
    -------
    table : str
    """
    header = ("method", "LDS", "LOO", "AUC", "fit s", "transform s", "peak MB")
    rows = [
        (r["method"], _fmt(r["lds"]), _fmt(r["loo"]), _fmt(r["auc"]),
         _fmt(r["fit_seconds"], 2), _fmt(r["transform_seconds"], 2),
         _fmt(r["peak_memory_mb"], 1))
        for r in records
    ]
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    def line(row):
        cells = [str(row[0]).ljust(widths[0])]
        cells += [str(c).rjust(w) for c, w in zip(row[1:], widths[1:])]
        return "  ".join(cells)
    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), sep, *(line(r) for r in rows)])


def write_json(records, path):
    """Write the records to ``path`` as a JSON list (NaN written as null)."""
    clean = [{k: _jsonable(v) for k, v in r.items()} for r in records]
    Path(path).write_text(json.dumps(clean, indent=2) + "\n")


_PLOTTED = (
    ("lds", "LDS (higher is better)"),
    ("loo", "LOO correlation"),
    ("auc", "mislabel AUC"),
    ("fit_seconds", "fit (s)"),
    ("transform_seconds", "transform (s)"),
    ("peak_memory_mb", "peak memory (MB)"),
)


def plot_results(records, path, *, title=None):
    """Bar chart per metric, one bar per method, saved as an image (matplotlib, Agg).

    Parameters
    ----------
    records : list of dict
        As returned by :func:`run_benchmark`.
    path : str or path-like
        Output image (the format follows the extension, e.g. ``.png``).
    title : str, default=None
        Figure title.

    Raises
    ------
    ImportError
        When matplotlib is not installed.
    """
    try:
        import matplotlib
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "--plot needs matplotlib: pip install matplotlib (or pip install "
            "'skdattri[bench]')."
        ) from exc
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    panels = [(k, label) for k, label in _PLOTTED
              if any(r.get(k) is not None for r in records)]
    names = [r["method"] for r in records]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 0.35 * len(names)
                                                        + 1.6), squeeze=False)
    for ax, (key, label) in zip(axes[0], panels):
        values = [np.nan if r.get(key) is None else r[key] for r in records]
        ypos = np.arange(len(names))
        ax.barh(ypos, values, color="tab:blue" if key in ("lds", "loo", "auc") else "tab:gray")
        ax.set_yticks(ypos, names if ax is axes[0][0] else [""] * len(names))
        ax.invert_yaxis()
        ax.set_title(label, fontsize=10)
        if key in ("fit_seconds", "transform_seconds") and np.nanmax(values) > 0:
            positive = [v for v in values if v > 0]
            if positive and max(positive) / min(positive) > 100:
                ax.set_xscale("log")
        ax.grid(axis="x", alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
