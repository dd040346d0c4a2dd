"""DVEmb: data value embeddings of a recorded SGD run (Wang et al., 2024)."""

from __future__ import annotations

import copy
from numbers import Real

import torch
from sklearn.base import clone
from sklearn.utils._param_validation import Interval, StrOptions

from ._utils import _progress, _seed_from
from .base import BaseAttributor
from .callbacks import TrainingRecorder
from .func._grad import model_per_sample_grads
from .func.projection import DATA_FREE_PROJ_TYPES
from .model import fit_or_keep, is_fitted
from .model._torch import _is_skorch
from .store import make_store

__all__ = ["DVEmb"]

#: Name of the callback DVEmb adds to an unfitted skorch net it trains.
RECORDER_NAME = "skdattri_dvemb"


class DVEmb(BaseAttributor):
    """Data value embeddings: the influence of each training step, traced to the end.

    Wang et al. (2024) follow a sample through the SGD run that produced the model.
    The step ``t`` that used sample ``j`` in its batch ``B_t`` moved the weights by
    ``-lr_t / |B_t| * g_j(theta_t)``; that displacement is carried to the final
    weights by the Jacobians of the later steps, ``J_k = (1 - lr_k wd_k) I - lr_k /
    |B_k| * sum_{i in B_k} g_i g_i^T`` (the Hessian of each batch's mean loss
    approximated by its gradients' outer products, as in the paper and dattri). The
    sample's *data value embedding* sums these over every step that used it::

        e_j = sum_{t : j in B_t} J_{T-1} ... J_{t+1} (lr_t / |B_t|) g_j(theta_t)

    and ``S[i, j] = grad L(query_i; theta_T) . e_j``: positive when training on ``j``
    lowered the query's loss (skdattri's sign). ``fit`` computes the embeddings
    exactly by one backward pass over the recorded steps with ``K_t = J_{T-1} ...
    J_{t+1}`` updated as ``K_{t-1} = (1 - lr_t wd_t) K_t - sum_{j in B_t} e_{j,t}
    g_j^T``, in the projected space (a ``k x k`` matrix, ``2 |B_t| k^2`` operations
    per step); ``transform`` computes each query gradient once and does one matrix
    product per block.

    Parameters
    ----------
    estimator : object
        The trained model: a skorch net, or a ``torch.nn.Module`` (with ``loss``),
        whose run ``recorder`` recorded. An *unfitted* skorch net is cloned and trained
        in ``fit`` with a recorder attached (the natural way to put DVEmb in a
        ``Pipeline`` or a grid search).
    recorder : TrainingRecorder, default=None
        The recorded run (:class:`~skdattri.callbacks.TrainingRecorder` with
        ``keep="gradients"`` or ``"both"`` as a skorch callback, or fed by its
        :meth:`~skdattri.callbacks.TrainingRecorder.step` in a torch loop); required
        for a fitted estimator. With an unfitted net it is the template of the
        recorder attached to the training (``None``: one that projects to
        ``proj_dim``).
    proj_dim : int, default=None
        Project the recorded gradients (and the query gradients) further to this
        dimension at ``fit``; ``None`` uses them as recorded. When DVEmb trains the net
        itself without a ``recorder`` template, the recorder projects to ``proj_dim``
        during training instead (the same projection, without keeping full gradients).
    proj_type : {"gaussian", "rademacher", "sjlt", "random_mask", "grass"}, \
default="gaussian"
        Kind of random projection (:func:`skdattri.func.projection.make_projector`).
    weight_decay : float, default=None
        L2 weight decay of the SGD steps (``J_k`` above); ``None`` takes the recorded
        one (the optimiser's ``weight_decay``, 0 when not recorded).
    target : {"loss", "margin"} or callable, default="loss"
        What is explained for the queries (their loss, their margin, or a callable
        ``(outputs, y) -> (n,)`` treated like a loss).
    loss : {"cross_entropy", "mse"}, torch loss module or callable, default=None
        Per-sample loss; required for a plain ``nn.Module``.
    random_state : int, RandomState instance or None, default=None
        Seeds the projection and, for an unfitted net, its training.
    store : None, "memory", str or path-like, default=None
        Where the embeddings live (memory, or a file under this directory).
    store_dtype : {None, "float16", "bfloat16", "float32", "float64"}, default=None
        Precision of the stored embeddings (``None``: the model's dtype).
    batch_size : int, default=256
        Queries per block of gradients; results do not depend on it.
    device : str or torch.device, default="auto"
        Where the embeddings live and the work runs; "auto" = CUDA when available.
    n_jobs : int, default=None
        Number of torch threads during fit/transform.
    verbose : int, default=0
        Show progress bars.

    Attributes
    ----------
    estimator_ : object
        The trained model that is explained.
    recorder_ : TrainingRecorder
        The recorded run (``recorder``, or the one attached to the net trained in fit).
    model_ : skdattri.model.TorchModel
        Functional view of the model.
    param_names_ : list of str
        Parameters the gradients cover (the recorder's).
    n_train_ : int
        Number of training samples.
    n_steps_ : int
        Number of recorded SGD steps replayed.
    device_ : torch.device
        Device of the embeddings.
    embeddings_ : skdattri.store.BaseStore of shape (n_train, k)
        The data value embeddings ``e_j`` (zero rows for samples no step used).
    projector_ : object or None
        DVEmb's own projection of the recorded gradients (``proj_dim``).

    See Also
    --------
    TracIn : Gradient similarities summed over checkpoints (no propagation).
    skdattri.callbacks.TrainingRecorder : Records the steps DVEmb replays.

    Notes
    -----
    The model is evaluated in eval mode (no dropout), at the recorded weights for the
    training steps and at the estimator's final weights for the queries. The run is
    modelled as plain SGD on the batch mean loss: momentum, Adam and schedulers
    within a step are not, although their learning rates are recorded. Samples that
    appear in several steps (epochs) add up their contributions; rows of ``X`` that
    no recorded step used get a zero embedding. The recursion runs in the model's
    dtype. ``self_influence`` is ``grad L(x_j; theta_T) . e_j``, the diagonal of
    ``transform(X_train, y_train)``: high values flag samples the run leaned on most,
    the convention of every skdattri attributor.

    References
    ----------
    .. [1] J. T. Wang, D. Song, J. Zou, P. Mittal and R. Jia, "Capturing the Temporal
       Dependence of Training Data Influence", ICLR 2025 (arXiv:2412.09538).

    Examples
    --------
    >>> import numpy as np, torch
    >>> from sklearn.datasets import load_digits
    >>> from skdattri import DVEmb
    >>> from skdattri.callbacks import TrainingRecorder
    >>> X, y = load_digits(return_X_y=True)
    >>> X = torch.tensor(X[:300] / 16, dtype=torch.float32); y = torch.tensor(y[:300])
    >>> _ = torch.manual_seed(0)
    >>> module = torch.nn.Linear(64, 10)
    >>> optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    >>> recorder = TrainingRecorder(loss="cross_entropy")
    >>> for epoch in range(2):
    ...     for idx in torch.randperm(250).split(50):
    ...         recorder.step(module, X[idx], y[idx], idx, optimizer=optimizer)
    ...         optimizer.zero_grad()
    ...         torch.nn.functional.cross_entropy(module(X[idx]), y[idx]).backward()
    ...         optimizer.step()
    >>> attr = DVEmb(module, recorder=recorder, loss="cross_entropy").fit(X[:250], y[:250])
    >>> attr.n_steps_, attr.transform(X[250:], y[250:]).shape
    (10, (50, 250))
    """

    _parameter_constraints: dict = {
        **{k: v for k, v in BaseAttributor._parameter_constraints.items()
           if k not in ("layers", "checkpoints")},
        "recorder": [None, TrainingRecorder],
        "proj_type": [StrOptions(set(DATA_FREE_PROJ_TYPES))],
        "weight_decay": [None, Interval(Real, 0, None, closed="left")],
    }

    def __init__(self, estimator, *, recorder=None, proj_dim=None, proj_type="gaussian",
                 weight_decay=None, target="loss", loss=None, random_state=None, store=None,
                 store_dtype=None, batch_size=256, device="auto", n_jobs=None, verbose=0):
        self.estimator = estimator
        self.recorder = recorder
        self.proj_dim = proj_dim
        self.proj_type = proj_type
        self.weight_decay = weight_decay
        self.target = target
        self.loss = loss
        self.random_state = random_state
        self.store = store
        self.store_dtype = store_dtype
        self.batch_size = batch_size
        self.device = device
        self.n_jobs = n_jobs
        self.verbose = verbose

    _device_attributes = ("model_", "embeddings_", "projector_", "_recorder_projector_",
                          "_train_data_")

    def __sklearn_clone__(self):
        """Clone the parameters, keeping a fitted estimator and the recorded run."""
        new = super().__sklearn_clone__()
        new.recorder = self.recorder  # the recorded run itself, or the template
        return new

    # ------------------------------------------------------------------ fit
    def _fit_estimator(self, X, y):
        """The trained model and its recorder; an unfitted skorch net is trained here
        with a recorder attached."""
        if is_fitted(self.estimator):
            if self.recorder is None:
                raise ValueError(
                    "DVEmb explains a training run: pass the TrainingRecorder that recorded "
                    "it (recorder=), or an unfitted skorch net for DVEmb to train.")
            self.recorder_, self._own_projection_ = self.recorder, False
            return self.estimator
        if not _is_skorch(self.estimator):
            raise TypeError(
                "DVEmb needs an SGD run: a fitted model with the TrainingRecorder of its "
                "training, or an unfitted skorch net to train with one; got an unfitted "
                f"{type(self.estimator).__name__}.")
        if self.recorder is not None:
            template = clone(self.recorder)
        else:
            template = TrainingRecorder(proj_dim=self.proj_dim, proj_type=self.proj_type,
                                        random_state=_seed_from(self.random_state),
                                        store=self.store)
        if template.keep == "checkpoints":
            template.set_params(keep="gradients")
        net = clone(self.estimator)
        callbacks = net.callbacks if isinstance(net.callbacks, list | tuple) else []
        net.set_params(callbacks=[*callbacks, (RECORDER_NAME, template)])
        est = fit_or_keep(net, X, y, random_state=self.random_state)
        self.recorder_ = dict(est.callbacks_)[RECORDER_NAME]
        self._own_projection_ = self.recorder is None
        return est

    def _check_recorder(self):
        rec = self.recorder_
        if not rec.n_steps_:
            raise ValueError(
                "The recorder has recorded no optimisation steps: attach it to the training "
                "with keep='gradients' (skorch) or call recorder.step() before every "
                "optimizer.step() (torch loop).")
        known = set(self.model_.named_params())
        missing = [n for n in rec.param_names_ if n not in known]
        if missing:
            raise ValueError(f"The recorded gradients cover parameters {missing[:5]} that the "
                             "model does not have: record the run of this model.")
        if rec.n_rows_ is not None and rec.n_rows_ != self.n_train_:
            raise ValueError(f"The recorder saw a training set of {rec.n_rows_} rows, but fit "
                             f"got {self.n_train_}: pass the X the net was trained on.")
        top = max(int(i.max()) for i in rec.step_indices_ if i.numel())
        if min(int(i.min()) for i in rec.step_indices_ if i.numel()) < 0 or top >= self.n_train_:
            raise ValueError(f"The recorded steps use training rows up to {top}, but fit got "
                             f"{self.n_train_} rows.")

    def _fit(self, X, y):
        self._check_recorder()
        rec = self.recorder_
        self.param_names_ = list(rec.param_names_)
        self.n_steps_ = rec.n_steps_
        rec_proj = rec.projector_
        if rec_proj is not None:
            rec_proj = copy.deepcopy(rec_proj).to(device=self.device_)
            n_full = sum(self.model_.named_params()[n].numel() for n in self.param_names_)
            rec_proj(torch.zeros(1, n_full, dtype=self.model_.dtype))  # build its cache
        self._recorder_projector_ = rec_proj
        width = rec.step_gradients(0).shape[1]
        self.projector_ = None if self._own_projection_ else self._make_projector(width)
        k = width if self.projector_ is None else self.projector_.out_dim
        acc = self.model_.dtype
        K = torch.eye(k, dtype=acc, device=self.device_)
        E = torch.zeros((self.n_train_, k), dtype=acc, device=self.device_)
        steps = range(rec.n_steps_ - 1, -1, -1)
        with torch.no_grad():
            for t in _progress(steps, verbose=self.verbose, desc="DVEmb steps",
                               total=rec.n_steps_):
                G = rec.step_gradients(t).to(self.device_, self.model_.dtype)
                if self.projector_ is not None:
                    G = self.projector_(G)
                idx = rec.step_indices_[t].to(self.device_)
                lr = rec.step_learning_rates_[t]
                wd = (rec.step_weight_decays_[t] if self.weight_decay is None
                      else float(self.weight_decay))
                emb = torch.mm(G, K.T).mul_(lr / G.shape[0])
                E.index_add_(0, idx, emb)
                if wd:
                    K.mul_(1.0 - lr * wd)
                K.addmm_(emb.T, G, alpha=-1.0)
        if not torch.isfinite(E).all():
            raise ValueError("The data value embeddings are not finite: the recorded SGD "
                             "steps diverge (learning rate too large for the recursion).")
        store = make_store(self.n_train_, k, dtype=self.model_.dtype, store=self.store,
                           store_dtype=self.store_dtype, device=self.device_, name="dvemb")
        for start in range(0, self.n_train_, store.block_rows):
            rows = slice(start, min(start + store.block_rows, self.n_train_))
            store.write(rows, E[rows])
        self.embeddings_ = store.finalize()
        self._train_data_ = (X, y)

    # ------------------------------------------------------------------ scores
    def _query_grads(self, xb, yb, what):
        G = model_per_sample_grads(self.model_, self.model_.named_params(), xb, yb, what,
                                   names=self.param_names_)
        for projector in (self._recorder_projector_, self.projector_):
            if projector is not None:
                G = projector(G)
        return G

    def _query_features(self, X, y, what):
        for sl, xb, yb in self._batches(X, y, desc="query gradients"):
            yield sl, self._query_grads(xb, yb, what)

    def _score(self, features, rows):
        return features @ self.embeddings_[rows].T

    def _self_influence(self):
        X, y = self._train_data_
        out = torch.empty(self.n_train_, dtype=self.model_.dtype, device=self.device_)
        for sl, xb, yb in self._batches(X, y, desc="self-influence"):
            q = self._query_grads(xb, yb, self._query_value(True))
            out[sl] = (q * self.embeddings_[sl]).sum(1)
        return out
