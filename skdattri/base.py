"""Base class of every attributor: parameters, fit/transform skeleton, self-influence."""

from __future__ import annotations

import os
import warnings
from numbers import Integral

import numpy as np
import torch
from joblib import Parallel, delayed, effective_n_jobs
from scipy import sparse
from sklearn.base import BaseEstimator, MetaEstimatorMixin, TransformerMixin, _fit_context, clone
from sklearn.utils import Bunch, check_array, check_consistent_length
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted, validate_data

from ._features import _GradientFeatures
from ._state import _map_state
from ._utils import (
    _n_rows,
    _progress,
    _resolve_device,
    _seed_from,
    _take_rows,
    _thread_limit,
    _tree_to,
)
from .callbacks import TrainingRecorder
from .func.projection import PROJ_TYPES
from .model import checkpoint_state, fit_or_keep, is_fitted, make_model
from .store import STORE_DTYPES, BaseStore, make_store

__all__ = ["BaseAttributor"]


def _is_dict(X):
    """A dict of arrays (skorch style) -- not a scipy ``dok`` sparse matrix."""
    return isinstance(X, dict) and not sparse.issparse(X)


def _shard_features(features, params, X, y, what, batch_size):
    """The features of one shard of training rows (a joblib task on the CPU, one torch
    thread), batch by batch as a serial fit computes them."""
    with _thread_limit(1), torch.no_grad():
        out = [features(params, _take_rows(X, slice(s, s + batch_size)), y[s:s + batch_size],
                        what) for s in range(0, y.shape[0], batch_size)]
        return torch.cat(out)


def _merge_top(best, block, index, k):
    """The top ``k`` of ``best`` (``(scores, indices)`` or None) and a new block of
    scores with their training indices; ties go to the lower index."""
    if best is not None:
        block = torch.cat([best[0], block], dim=1)
        index = torch.cat([best[1], index.expand(best[1].shape[0], -1)], dim=1)
    else:
        index = index.expand(block.shape[0], -1)
    by_index = torch.argsort(index, dim=1, stable=True)
    block, index = block.gather(1, by_index), index.gather(1, by_index)
    order = torch.argsort(-block, dim=1, stable=True)[:, :k]
    return block.gather(1, order), index.gather(1, order)


def _sample_shape(X):
    """Shape of one sample: ``X.shape[1:]``, per key for a dict of tensors."""
    if isinstance(X, dict):
        return {k: tuple(v.shape[1:]) for k, v in X.items()}
    return tuple(X.shape[1:])


def _is_torch_dataset(X):
    return isinstance(X, torch.utils.data.Dataset) and not isinstance(X, torch.Tensor)


class BaseAttributor(MetaEstimatorMixin, TransformerMixin, BaseEstimator):
    """Base class for data attribution estimators.

    An attributor explains a model: ``fit(X_train, y_train)`` caches what the method
    needs about the training set (per-sample gradients, projections, curvature), and
    ``transform(X_query, y_query)`` returns a score matrix of shape
    ``(n_query, n_train)``. ``S[i, j] > 0`` means that training sample ``j`` helps
    query ``i``: including it lowers the query's loss (``target="loss"``) or raises
    its margin (``target="margin"``).

    Subclasses implement ``_fit(X, y)``, ``_transform_block(X, y)`` (scores of one
    block of queries as a tensor) and optionally ``_self_influence()``; the base
    class handles parameter validation, the model adapter, batching, devices, cloning
    and pickling.

    Notes
    -----
    A fitted ``estimator`` is attributed as it is and never retrained, and
    :func:`sklearn.base.clone` keeps it (so ``GridSearchCV`` attributes the user's
    model). An unfitted one is cloned and trained in ``fit`` (torch models under a
    seed drawn from ``random_state``).
    """

    _required_parameters = ["estimator"]

    _parameter_constraints: dict = {
        "estimator": "no_validation",
        "target": [StrOptions({"loss", "margin"}), callable],
        "loss": [None, StrOptions({"cross_entropy", "mse"}), callable],
        "layers": [None, str, list, tuple],
        "checkpoints": [None, list, tuple, TrainingRecorder],
        "proj_dim": [None, Interval(Integral, 1, None, closed="left")],
        "proj_type": [StrOptions(set(PROJ_TYPES))],
        "store": [None, str, os.PathLike],
        "store_dtype": [None, StrOptions(set(STORE_DTYPES)), torch.dtype],
        "random_state": ["random_state"],
        "batch_size": [Interval(Integral, 1, None, closed="left")],
        "device": [str, torch.device],
        "n_jobs": [None, Integral],
        "verbose": ["verbose"],
    }

    # ------------------------------------------------------------------ sklearn plumbing
    def __sklearn_clone__(self):
        """Clone the parameters but keep a fitted ``estimator`` and fitted checkpoints.

        A fitted model is the thing being explained, so cloning an attributor (as
        ``GridSearchCV`` does) must not turn it into an unfitted copy.
        """
        params = self.get_params(deep=False)
        new = {}
        for name, value in params.items():
            if name == "estimator" and is_fitted(value):
                new[name] = value
            elif name == "checkpoints" and isinstance(value, (list, tuple)):
                new[name] = list(value)
            elif name == "checkpoints" and value is not None:
                new[name] = value  # a TrainingRecorder: the recorded run itself
            else:
                new[name] = clone(value, safe=False)
        return type(self)(**new)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.required = True
        tags.input_tags.allow_nan = False
        tags.transformer_tags.preserves_dtype = []
        return tags

    #: Fitted attributes that live on ``device_`` (tensors, or objects holding tensors:
    #: the functional model, solvers, projectors). Pickling moves exactly these to the
    #: CPU and back (:func:`skdattri._state._map_state` reaches tensors inside objects);
    #: every other fitted attribute must hold no tensor. Subclasses extend the tuple.
    _device_attributes = ("model_",)

    def _moved_state(self, state, fn, device):
        """``state`` with the device-bound attributes rebuilt by ``fn`` on ``device``."""
        memo = {}
        return {k: (_map_state(v, fn, device, memo) if k in self._device_attributes else v)
                for k, v in state.items()}

    def __getstate__(self):
        state = super().__getstate__()
        device = state.get("device_")
        if device is not None and device.type != "cpu":
            state = self._moved_state(state, lambda t: t.to("cpu"), "cpu")
        return state

    def __setstate__(self, state):
        device = state.get("device_")
        if device is not None and device.type != "cpu":
            if device.type == "cuda" and torch.cuda.is_available():
                state = self._moved_state(state, lambda t: t.to(device), device)
            else:
                warnings.warn(
                    f"This attributor was fitted on {device} but CUDA is not available; "
                    "its caches are loaded on the CPU.", stacklevel=2)
                state["device_"] = torch.device("cpu")
        super().__setstate__(state)

    # ------------------------------------------------------------------ input handling
    def _validate_X(self, X, *, reset):
        """sklearn validation for tabular X (sets / checks ``n_features_in_``); tensors
        are checked for NaN / inf; dicts of arrays go to the model as they are."""
        if _is_dict(X):
            return X
        if isinstance(X, torch.Tensor):
            if X.is_floating_point() and not torch.isfinite(X).all():
                raise ValueError("Input X contains NaN or infinity.")
            return X
        return validate_data(self, X, reset=reset, allow_nd=True, dtype="numeric",
                             accept_sparse=False)

    @staticmethod
    def _validate_y(y, n):
        if not isinstance(y, torch.Tensor):
            y = check_array(y, ensure_2d=False, dtype=None, input_name="y")
        check_consistent_length(np.empty(n), y)
        return y

    def _check_train(self, X, y):
        """Validate training data; returns ``(X, y, n_train)`` for the estimator."""
        if _is_torch_dataset(X):
            if y is not None:
                raise ValueError("Pass y inside the torch Dataset, not separately.")
            return X, None, len(X)
        if y is None:
            raise ValueError(
                f"{type(self).__name__} requires y to be passed, but the target y is None."
            )
        X = self._validate_X(X, reset=True)
        n = _n_rows(X)
        return X, self._validate_y(y, n), n

    def _check_query(self, X, y):
        if _is_torch_dataset(X):
            if y is not None:
                raise ValueError("Pass y inside the torch Dataset, not separately.")
            return X, None
        X = self._validate_X(X, reset=False)
        return X, (None if y is None else self._validate_y(y, _n_rows(X)))

    def _to_tensors(self, X, y):
        """Raw data -> ``(X, y)`` tensors on the CPU (y may be None)."""
        model = self.model_
        if _is_torch_dataset(X):
            loader = torch.utils.data.DataLoader(X, batch_size=self.batch_size, shuffle=False)
            xs, ys = [], []
            for xb, yb in loader:
                xs.append(xb)
                ys.append(yb)
            if isinstance(xs[0], dict):
                Xt = {k: torch.cat([b[k] for b in xs]) for k in xs[0]}
            else:
                Xt = torch.cat(xs)
            return model.to_tensor_X(Xt), model.to_tensor_y(torch.cat(ys))
        Xt = model.to_tensor_X(X)
        yt = None if y is None else model.to_tensor_y(y)
        return Xt, yt

    def _batches(self, X, y, *, desc):
        """Yield ``(slice, X_block, y_block)`` on ``device_`` in blocks of ``batch_size``."""
        n = _n_rows(X)
        starts = range(0, n, self.batch_size)
        for start in _progress(starts, verbose=self.verbose, desc=desc, total=len(starts)):
            sl = slice(start, min(start + self.batch_size, n))
            xb = _tree_to(_take_rows(X, sl), self.device_)
            yb = None if y is None else y[sl].to(self.device_)
            yield sl, xb, yb

    def _check_model_inputs(self, X, y):
        """Evaluate the model on the first rows before any expensive work: inputs it
        cannot consume and labels it does not know become ``ValueError``\\ s."""
        xb = _tree_to(_take_rows(X, slice(0, 2)), self.device_)
        try:
            with torch.no_grad():
                outputs = self.model_.forward(self.model_.named_params(), xb)
        except (RuntimeError, IndexError, TypeError) as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ValueError(
                f"The model cannot be evaluated on X (samples of shape {_sample_shape(X)}): "
                f"{first}. Check that X has the features (and dtype) the model was built "
                "for.") from exc
        if y is not None:
            self.model_.loss_.check_targets(outputs, y)

    def _predict_labels(self, X):
        """The model's own predictions, used as labels when ``transform`` gets no y."""
        params = self.model_.named_params()
        preds = [self.model_.predict(params, xb).cpu()
                 for _, xb, _ in self._batches(X, None, desc="predict")]
        return torch.cat(preds)

    # ------------------------------------------------------------------ model state
    def _query_value(self, y_given):
        """Which per-sample value the query side differentiates (see the sign convention)."""
        return self.model_.query_value(self.target, y_given)

    def _checkpoint_params(self):
        """All trainable parameters of each checkpoint, on ``device_``.

        Gradients are taken with respect to ``param_names_`` only; the other
        parameters keep each checkpoint's own values in the forward pass.
        """
        names = list(self.model_.named_params())
        checkpoints = self._checkpoint_list() or [None]
        return [self.model_.params_from(checkpoint_state(c, device=self.device_), names)
                for c in checkpoints]

    def _checkpoint_list(self):
        """The checkpoints given (a list, or a recorder's ``checkpoints_``); ``[]`` if none."""
        if isinstance(self.checkpoints, TrainingRecorder):
            if not getattr(self.checkpoints, "checkpoints_", None):
                raise ValueError(
                    "checkpoints is a TrainingRecorder that has recorded nothing yet; attach "
                    "it to the training (a skorch callback, or record() in a torch loop) first.")
            return list(self.checkpoints.checkpoints_)
        return list(self.checkpoints or [])

    def _device_batches(self, X, y, step):
        """The training set as a list of ``(X, y)`` blocks of ``step`` rows on ``device_``.

        The one place where training data is copied to the device for curvature work
        (done once per ``fit``; ``transform`` never calls it).
        """
        n = y.shape[0]
        return [(_tree_to(_take_rows(X, slice(s, min(s + step, n))), self.device_),
                 y[s:s + step].to(self.device_)) for s in range(0, n, step)]

    def _make_projector(self, n_features):
        if self.proj_dim is None:
            return None
        if self.proj_dim >= n_features:
            warnings.warn(
                f"proj_dim={self.proj_dim} is not below the {n_features} gradient coordinates "
                "of the model: the gradients are used unprojected (exact inner products, "
                "which a random projection only approximates).", UserWarning, stacklevel=3)
            return None
        from .func.projection import make_projector

        return make_projector(
            n_features, self.proj_dim, proj_type=self.proj_type,
            random_state=_seed_from(self.random_state), device=self.device_,
            dtype=self.model_.dtype,
        )

    def _grads(self, params, X, y, what, *, desc, projector=None):
        """Yield ``(slice, per-sample gradients)`` blocks, projected when asked."""
        for sl, xb, yb in self._batches(X, y, desc=desc):
            yield sl, self._block_grads(params, xb, yb, what, projector)

    def _block_grads(self, params, xb, yb, what, projector=None, out=None):
        """Per-sample gradients of one block over ``param_names_``, projected if asked
        (written into ``out`` when given)."""
        return self._feature_map(projector)(params, xb, yb, what, out=out)

    def _feature_map(self, projector):
        """The picklable function ``(params, X, y, what, out=None) -> (n, width)`` of
        per-sample training features: gradients, projected when asked. Methods with
        other features (LoGra's projected layer factors) return their own."""
        return _GradientFeatures(self.model_, self.param_names_, projector)

    def _train_matrix(self, params, X, y, what, *, desc, projector=None, postprocess=None,
                      features=None):
        """The training set's per-sample features (``features``, else
        :meth:`_feature_map`) in a store of ``(n_train, width)`` rows -- in memory or on
        disk (``store=``), in ``store_dtype`` -- each block computed straight into its
        rows (``postprocess`` is applied to a block before it is stored)."""
        features = features or self._feature_map(projector)
        G = make_store(self.n_train_, features.width(params), dtype=self.model_.dtype,
                       store=getattr(self, "store", None),
                       store_dtype=getattr(self, "store_dtype", None), device=self.device_,
                       name=type(self).__name__.lower())
        post = postprocess or (lambda block: block)
        if features.requires_fit:  # a data-dependent projection selects its coordinates
            for _, xb, yb in self._batches(X, y, desc=f"{desc}: projection"):
                features.partial_fit(params, xb, yb, what)
            features.finalize()
        shards = self._shards()
        if len(shards) > 1:
            jobs = (delayed(_shard_features)(features, params, _take_rows(X, sl), y[sl],
                                             what, self.batch_size) for sl in shards)
            results = Parallel(n_jobs=self.n_jobs, verbose=self.verbose)(jobs)
            for sl, block in zip(shards, results):
                for start in range(0, block.shape[0], self.batch_size):
                    rows = slice(sl.start + start, min(sl.start + start + self.batch_size,
                                                       sl.stop))
                    part = block[start:start + self.batch_size].to(self.device_)
                    G.write(rows, post(part))
            return G.finalize()
        for sl, xb, yb in self._batches(X, y, desc=desc):
            G.write(sl, post(features(params, xb, yb, what, out=G.buffer(sl))))
        return G.finalize()

    def _shards(self):
        """Row ranges of the training set for ``n_jobs`` joblib workers (one when
        ``n_jobs`` is None or 1), cut at multiples of ``batch_size`` so every worker
        computes exactly the batches of a serial fit."""
        workers = effective_n_jobs(self.n_jobs) if self.n_jobs is not None else 1
        if self.device_.type != "cpu":
            workers = 1  # one device: its own parallelism, no process shards
        n_batches = -(-self.n_train_ // self.batch_size)
        if workers <= 1 or n_batches <= 1:
            return [slice(0, self.n_train_)]
        per = -(-n_batches // (2 * workers))  # a few shards per worker: balance
        step = per * self.batch_size
        return [slice(s, min(s + step, self.n_train_)) for s in range(0, self.n_train_, step)]

    # ------------------------------------------------------------------ public API
    @_fit_context(prefer_skip_nested_validation=False)
    def fit(self, X, y=None):
        """Fit the attributor on the training set (train the model first if unfitted).

        Parameters
        ----------
        X : array-like of shape (n_train, ...), Tensor, dict of arrays or Dataset
            Training inputs, exactly as the model consumes them.
        y : array-like of shape (n_train,) or (n_train, n_outputs)
            Training targets (inside the Dataset when ``X`` is a torch Dataset).

        Returns
        -------
        self : object
            The fitted attributor.
        """
        X, y, n = self._check_train(X, y)
        self.device_ = _resolve_device(self.device)
        with _thread_limit(self.n_jobs):
            self.estimator_ = self._fit_estimator(X, y)
            self.model_ = make_model(self.estimator_, loss=self.loss, n_train=n,
                                     device=self.device_)
            self.param_names_ = self._select_params()
            self.n_train_ = n
            Xt, yt = self._to_tensors(X, y)
            self._input_shape_ = _sample_shape(Xt)
            self._check_model_inputs(Xt, yt)
            self._fit(Xt, yt)
        return self

    def transform(self, X, y=None):
        """Attribution scores of the training samples for each query.

        Parameters
        ----------
        X : array-like of shape (n_query, ...), Tensor, dict of arrays or Dataset
            Query inputs.
        y : array-like of shape (n_query,), default=None
            Query targets; without it the model's own predictions are used ("why did
            the model predict this?").

        Returns
        -------
        scores : ndarray of shape (n_query, n_train)
            ``scores[i, j] > 0`` means training sample ``j`` helps query ``i``.
        """
        check_is_fitted(self)
        with _thread_limit(self.n_jobs), torch.no_grad():
            Xt, yt, what = self._queries(X, y)
            out = np.empty((_n_rows(Xt), self.n_train_),
                           dtype=torch.empty(0, dtype=self.model_.dtype).numpy().dtype)
            for sl, block in self._transform_blocks(Xt, yt, what):
                out[sl] = block.detach().cpu().numpy()
        return out

    def top_k(self, X, y=None, k=10, *, harmful=False, train_block_size=None):
        """The ``k`` most helpful (and most harmful) training samples of every query.

        Streams over blocks of training rows, keeping a running top ``k``: memory is
        ``O(n_query * k + block)`` rather than the full ``(n_query, n_train)`` matrix.
        Equals ``argsort`` of :meth:`transform` (ties broken by the lower index).

        Parameters
        ----------
        X : array-like of shape (n_query, ...), Tensor, dict of arrays or Dataset
            Query inputs.
        y : array-like of shape (n_query,), default=None
            Query targets (the model's predictions when ``None``).
        k : int, default=10
            Number of training samples per query, ``1 <= k <= n_train``.
        harmful : bool, default=False
            Also return the ``k`` most harmful (most negative) ones.
        train_block_size : int, default=None
            Training rows scored at a time (default: ``max(batch_size, 4096)``).

        Returns
        -------
        result : sklearn.utils.Bunch
            ``indices`` and ``scores`` of shape ``(n_query, k)``, most helpful first;
            with ``harmful``, ``harmful_indices`` and ``harmful_scores``, most harmful
            first.
        """
        check_is_fitted(self)
        if not isinstance(k, Integral) or not 1 <= k <= self.n_train_:
            raise ValueError(f"k must be an integer in [1, n_train={self.n_train_}], got {k!r}.")
        step = train_block_size or self._train_block()
        with _thread_limit(self.n_jobs), torch.no_grad():
            Xt, yt, what = self._queries(X, y)
            parts = {"": [], "harmful_": []}
            for _, features in self._query_features(Xt, yt, what):
                best = {"": None, "harmful_": None}
                for start in range(0, self.n_train_, step):
                    rows = slice(start, min(start + step, self.n_train_))
                    block = self._score(features, rows)
                    index = torch.arange(rows.start, rows.stop, device=block.device)
                    best[""] = _merge_top(best[""], block, index, k)
                    if harmful:
                        best["harmful_"] = _merge_top(best["harmful_"], -block, index, k)
                for key in parts:
                    if best[key] is not None:
                        parts[key].append(best[key])
        result = Bunch()
        for key, blocks in parts.items():
            if blocks:
                sign = -1 if key else 1
                result[key + "indices"] = torch.cat([b[1] for b in blocks]).cpu().numpy()
                result[key + "scores"] = sign * torch.cat([b[0] for b in blocks]).cpu().numpy()
        return result

    def _queries(self, X, y):
        """Validated query tensors, labels (predicted when not given) and query value."""
        X, y = self._check_query(X, y)
        Xt, yt = self._to_tensors(X, y)
        shape = _sample_shape(Xt)
        if shape != self._input_shape_:
            raise ValueError(
                f"X has samples of shape {shape}, but {type(self).__name__} was fitted on "
                f"samples of shape {self._input_shape_}.")
        self._check_model_inputs(Xt, yt)
        given = yt is not None
        if not given:
            yt = self._predict_labels(Xt)
        return Xt, yt, self._query_value(given)

    def fit_transform(self, X, y=None):
        """Fit, then score the training set against itself (with its true labels).

        Equivalent to ``fit(X, y).transform(X, y)``.
        """
        return self.fit(X, y).transform(X, y)

    def self_influence(self):
        """Score of each training sample on itself.

        Returns
        -------
        scores : ndarray of shape (n_train,)
            Equals the diagonal of ``transform(X_train, y_train)``, computed without the
            full matrix. High self-influence flags atypical or mislabelled samples.
        """
        check_is_fitted(self)
        with _thread_limit(self.n_jobs), torch.no_grad():
            return self._self_influence().detach().cpu().numpy()

    # ------------------------------------------------------------------ subclass hooks
    def _fit_estimator(self, X, y):
        """The model to explain: ``estimator`` if fitted, else a clone trained on X, y."""
        return fit_or_keep(self.estimator, X, y, random_state=self.random_state)

    def _select_params(self):
        """Names of the parameters the gradients cover (``layers`` prefixes)."""
        return self.model_.select(getattr(self, "layers", None))

    def _fit(self, X, y):  # pragma: no cover - abstract
        raise NotImplementedError

    def _transform_blocks(self, X, y, what):
        """``(query slice, scores against every training row)`` blocks, each filled one
        block of training rows at a time (a disk store is never read whole)."""
        step = self._train_block()
        for sl, features in self._query_features(X, y, what):
            if self.n_train_ <= step:
                yield sl, self._score(features, slice(0, self.n_train_))
                continue
            block = None
            for start in range(0, self.n_train_, step):
                rows = slice(start, min(start + step, self.n_train_))
                part = self._score(features, rows)
                if block is None:
                    block = part.new_empty((part.shape[0], self.n_train_))
                block[:, rows] = part
            yield sl, block

    def _train_block(self):
        """Training rows scored at a time: as many as the stores' row blocks hold (a
        block of :data:`~skdattri._utils.BLOCK_ELEMENTS` entries), at least
        ``batch_size``."""
        held = [getattr(self, key, None) for key in self._device_attributes]
        stores = [v for item in held for v in (item if isinstance(item, list) else [item])
                  if isinstance(v, BaseStore)]
        rows = min((st.block_rows for st in stores), default=4096)
        return max(self.batch_size, min(rows, 4096))

    def _query_features(self, X, y, what):  # pragma: no cover - abstract
        """Yield ``(query slice, features)``: what scoring a block of queries needs."""
        raise NotImplementedError

    def _score(self, features, rows):  # pragma: no cover - abstract
        """Scores ``(m, len(rows))`` of a query block against the training ``rows``."""
        raise NotImplementedError

    def _self_influence(self):  # pragma: no cover - abstract
        raise NotImplementedError
