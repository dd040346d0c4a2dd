"""The functional view of a model that every attribution method works with."""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call


# --------------------------------------------------------------------------------------
# per-sample losses and margins on model outputs
# --------------------------------------------------------------------------------------
def _first(outputs):
    """skorch convention: a module returning a tuple predicts with its first element."""
    if isinstance(outputs, (tuple, list)):
        return outputs[0]
    return outputs


def _logits_from(outputs, output_kind):
    """Logit-equivalent scores (any per-row shift is irrelevant) from model outputs."""
    if output_kind == "proba":
        eps = torch.finfo(outputs.dtype).eps
        return torch.log(outputs + eps)
    if output_kind == "log_proba":
        return outputs
    return outputs


def _multiclass_margin(logits, y):
    """``z_y - logsumexp_{k != y} z_k``: the log-odds of the correct class."""
    y = y.long()
    z_y = logits.gather(1, y[:, None])[:, 0]
    masked = logits.scatter(1, y[:, None], float("-inf"))
    return z_y - torch.logsumexp(masked, dim=1)


class _Loss:
    """A per-sample loss on model outputs, with the matching margin and prediction rule.

    It is a small picklable object (no closures), so a fitted attributor pickles.

    Parameters
    ----------
    kind : str
        ``"ce"`` (logits, integer labels), ``"nll_proba"`` (probabilities, as skorch's
        default ``NLLLoss`` on a softmax module), ``"bce"`` (one logit, labels in {0, 1}),
        ``"multilabel_bce"`` (one logit per label), ``"squared"`` (regression),
        ``"ovr_<name>"`` (sklearn ``SGDClassifier`` one-vs-rest margin losses),
        ``"criterion"`` (a torch loss module made per-sample), ``"callable"``.
    """

    def __init__(self, kind, *, task, output_kind="logits", criterion=None, func=None,
                 scale=1.0, reduce_outputs="sum"):
        self.kind = kind
        self.task = task  # "classification" | "regression" | "binary" | "multilabel"
        self.output_kind = output_kind  # "logits" | "proba" | "log_proba" | "values"
        self.criterion = criterion
        self.func = func
        self.scale = scale
        self.reduce_outputs = reduce_outputs
        if criterion is not None:
            self._crit_reduction = getattr(criterion, "reduction", "mean")
            crit = copy.copy(criterion)
            if hasattr(crit, "reduction"):
                crit.reduction = "none"
            self._crit_none = crit

    # ---- loss ------------------------------------------------------------------------
    def loss(self, outputs, y):
        """Per-sample loss, shape ``(n,)``."""
        out = _first(outputs)
        n = out.shape[0]
        kind = self.kind
        if kind == "ce":
            val = F.cross_entropy(out.reshape(n, -1), y.long(), reduction="none")
        elif kind == "nll_proba":
            eps = torch.finfo(out.dtype).eps
            val = F.nll_loss(torch.log(out + eps), y.long(), reduction="none")
        elif kind == "bce":
            val = F.binary_cross_entropy_with_logits(
                out.reshape(n), y.reshape(n).to(out.dtype), reduction="none"
            )
        elif kind == "multilabel_bce":
            val = F.binary_cross_entropy_with_logits(
                out.reshape(n, -1), y.reshape(n, -1).to(out.dtype), reduction="none"
            ).sum(1)
        elif kind == "squared":
            diff = (out.reshape(n, -1) - y.reshape(n, -1).to(out.dtype)) ** 2
            val = diff.sum(1) if self.reduce_outputs == "sum" else diff.mean(1)
        elif kind.startswith("ovr_"):
            z = out.reshape(n, -1)
            if z.shape[1] == 1:
                sign = (2.0 * y.reshape(n, 1).to(z.dtype) - 1.0)
            else:
                sign = 2.0 * F.one_hot(y.long(), z.shape[1]).to(z.dtype) - 1.0
            val = _ovr_loss(kind[4:], sign * z).sum(1)
        elif kind == "criterion":
            val = self._crit_none(out, y)
            if val.dim() == 0:  # a criterion without a 'reduction' switch
                raise ValueError(
                    "The criterion does not return per-sample values; give it a 'reduction' "
                    "attribute (torch loss modules have one) or pass a callable loss."
                )
            val = val.reshape(n, -1)
            val = val.mean(1) if self._crit_reduction == "mean" else val.sum(1)
        elif kind == "callable":
            val = self.func(out, y)
            if val.dim() != 1 or val.shape[0] != n:
                raise ValueError(
                    "A callable loss must return one value per sample, shape (n_samples,); "
                    f"got shape {tuple(val.shape)}."
                )
        else:  # pragma: no cover - constructed internally only
            raise ValueError(f"unknown loss kind {kind!r}")
        return val * self.scale if self.scale != 1.0 else val

    # ---- margin ----------------------------------------------------------------------
    def margin(self, outputs, y):
        """Per-sample margin (higher = more confident in ``y``), shape ``(n,)``.

        Classification: log-odds of the correct class, ``log p_y - log(1 - p_y)``.
        Regression: the prediction itself (summed over outputs).
        """
        out = _first(outputs)
        n = out.shape[0]
        if self.task == "regression":
            return out.reshape(n, -1).sum(1)
        if self.task == "multilabel":
            sign = 2.0 * y.reshape(n, -1).to(out.dtype) - 1.0
            return (sign * out.reshape(n, -1)).sum(1)
        logits = _logits_from(out, self.output_kind).reshape(n, -1)
        if logits.shape[1] == 1:
            if self.output_kind == "proba":  # one probability of the positive class
                p = out.reshape(n)
                eps = torch.finfo(out.dtype).eps
                z = torch.log(p + eps) - torch.log1p(-p + eps)
            else:
                z = logits[:, 0]
            return (2.0 * y.reshape(n).to(z.dtype) - 1.0) * z
        return _multiclass_margin(logits, y)

    # ---- predictions -----------------------------------------------------------------
    def predict(self, outputs):
        """Labels (classification) or values (regression) the model predicts."""
        out = _first(outputs)
        n = out.shape[0]
        if self.task == "regression":
            return out
        if self.task == "multilabel":
            return (out.reshape(n, -1) > 0).to(torch.int64)
        z = out.reshape(n, -1)
        if z.shape[1] == 1:
            thr = 0.5 if self.output_kind == "proba" else 0.0
            return (z[:, 0] > thr).to(torch.int64)
        return z.argmax(1)


def _ovr_loss(name, t):
    """sklearn SGD margin losses of ``t = y * z`` with ``y`` in {-1, +1}."""
    if name == "log_loss":
        return F.softplus(-t)
    if name == "hinge":
        return torch.relu(1.0 - t)
    if name == "squared_hinge":
        return torch.relu(1.0 - t) ** 2
    if name == "modified_huber":
        return torch.where(t >= -1.0, torch.relu(1.0 - t) ** 2, -4.0 * t)
    if name == "perceptron":
        return torch.relu(-t)
    raise ValueError(f"unsupported SGD loss {name!r}")


# --------------------------------------------------------------------------------------
# the functional model
# --------------------------------------------------------------------------------------
class TorchModel:
    """A model seen as a function of its parameters.

    This is what every attribution method consumes: a torch module evaluated with
    :func:`torch.func.functional_call`, its per-sample loss, margin and prediction
    rule, the L2 penalty its estimator minimises, and the input conversion that
    turns user data into tensors. It is built by :func:`skdattri.model.make_model`.

    Parameters
    ----------
    module : torch.nn.Module
        The network, in eval mode, on ``device``.
    loss : _Loss
        Per-sample loss / margin / prediction rule.
    l2 : dict of str to float or Tensor, default=None
        L2 penalty of the training objective written as
        ``mean_i loss_i + 0.5 * sum_name l2[name] * ||theta_name||^2``.
    preprocess : callable, default=None
        Applied to ``X`` before it becomes a tensor (earlier steps of a Pipeline).
    input_dtype : torch.dtype, default=None
        dtype floating inputs are cast to (the parameters' dtype when ``None``);
        integer inputs (token ids) are kept as they are unless ``cast_int_inputs``.
    classes : ndarray, default=None
        Class labels of an sklearn classifier; ``y`` is mapped to their indices.
    """

    def __init__(self, module, loss, *, l2=None, preprocess=None, input_dtype=None,
                 cast_int_inputs=False, classes=None, kind="torch"):
        self.module = module.eval()
        self.loss_ = loss
        self.l2 = dict(l2 or {})
        self.preprocess = preprocess
        params = [p for p in module.parameters()]
        self.dtype = params[0].dtype if params else torch.get_default_dtype()
        self.device = params[0].device if params else torch.device("cpu")
        self.input_dtype = input_dtype or self.dtype
        self.cast_int_inputs = cast_int_inputs
        self.classes = classes
        self.kind = kind

    # ---- parameters ------------------------------------------------------------------
    @property
    def task(self):
        return self.loss_.task

    def named_params(self):
        """All trainable parameters, ``{name: detached tensor}``, in module order."""
        return {n: p.detach() for n, p in self.module.named_parameters() if p.requires_grad}

    def select(self, layers=None):
        """Names of the trainable parameters whose name starts with one of ``layers``."""
        names = list(self.named_params())
        if layers is None:
            return names
        prefixes = [layers] if isinstance(layers, str) else list(layers)
        chosen = [n for n in names if any(n == p or n.startswith(p + ".") or
                                          (p.endswith(".") and n.startswith(p))
                                          for p in prefixes)]
        if not chosen:
            raise ValueError(
                f"layers={layers!r} matches no parameter of the model. "
                f"Parameter names are: {names}."
            )
        return chosen

    def params_from(self, checkpoint, names):
        """Parameters ``{name: tensor}`` (restricted to ``names``) of a checkpoint.

        A checkpoint is a state dict, a module of the same architecture, a fitted
        estimator of the same kind (converted with the same adapter), or ``None``
        for the model itself.
        """
        if checkpoint is None:
            full = self.named_params()
        elif isinstance(checkpoint, dict):
            full = checkpoint
        elif isinstance(checkpoint, torch.nn.Module):
            full = dict(checkpoint.named_parameters())
        else:
            from ._dispatch import make_model

            other = make_model(checkpoint, device=self.device)
            full = other.named_params()
        out = {}
        for n in names:
            if n not in full:
                raise ValueError(
                    f"Checkpoint has no parameter {n!r}; checkpoints must have the same "
                    f"architecture as the attributed model (it has {list(full)[:10]}...)."
                )
            t = torch.as_tensor(full[n])
            ref = dict(self.module.named_parameters())[n]
            if t.shape != ref.shape:
                raise ValueError(
                    f"Checkpoint parameter {n!r} has shape {tuple(t.shape)}, "
                    f"the model's has {tuple(ref.shape)}."
                )
            out[n] = t.detach().to(device=self.device, dtype=ref.dtype)
        return out

    def l2_vector(self, names):
        """The L2 coefficients as one flat vector over ``names`` (zeros where none)."""
        parts = []
        ref = dict(self.module.named_parameters())
        for n in names:
            c = self.l2.get(n, 0.0)
            parts.append(torch.broadcast_to(torch.as_tensor(c, dtype=self.dtype,
                                                            device=self.device),
                                            ref[n].shape).reshape(-1))
        return torch.cat(parts) if parts else torch.zeros(0, dtype=self.dtype)

    # ---- evaluation ------------------------------------------------------------------
    def forward(self, params, X):
        """Outputs of the module at ``params`` (other parameters as they are)."""
        if isinstance(X, dict):
            return functional_call(self.module, params, args=(), kwargs=X, strict=False)
        return functional_call(self.module, params, (X,), strict=False)

    def value(self, outputs, y, what):
        """Per-sample ``"loss"``, ``"margin"``, ``"neg_margin"`` or ``"output"`` values."""
        if what == "loss":
            return self.loss_.loss(outputs, y)
        if what == "margin":
            return self.loss_.margin(outputs, y)
        if what == "neg_margin":
            return -self.loss_.margin(outputs, y)
        if what == "neg_output":
            out = _first(outputs)
            return -out.reshape(out.shape[0], -1).sum(1)
        if callable(what):
            val = what(_first(outputs), y)
            if not isinstance(val, torch.Tensor) or val.dim() != 1:
                raise ValueError(
                    "A callable target must return a 1-d tensor of per-sample values, got "
                    f"{type(val).__name__} {getattr(val, 'shape', '')}."
                )
            return val
        raise ValueError(f"unknown value {what!r}")

    def predict(self, params, X):
        with torch.no_grad():
            return self.loss_.predict(self.forward(params, X))

    # ---- data conversion -------------------------------------------------------------
    def to_tensor_X(self, X):
        """Model inputs as a tensor (or dict of tensors) on the CPU, preprocessed."""
        if self.preprocess is not None:
            X = self.preprocess(X)
        return _as_tensor_tree(X, self.input_dtype, self.cast_int_inputs)

    def to_tensor_y(self, y):
        """Targets as a tensor on the CPU: class indices for classifiers."""
        if isinstance(y, torch.Tensor):
            y = y.detach().cpu().numpy()
        y = np.asarray(y)
        if self.classes is not None:
            idx = np.clip(np.searchsorted(self.classes, y), 0, len(self.classes) - 1)
            bad = self.classes[idx] != y
            if np.any(bad):
                raise ValueError(
                    "y contains labels the model was not trained on: "
                    f"{np.unique(y[bad])[:10].tolist()}; known classes are "
                    f"{self.classes.tolist()}."
                )
            return torch.as_tensor(idx, dtype=torch.int64)
        if self.task in ("regression", "multilabel"):
            return torch.as_tensor(np.asarray(y, dtype=np.float64)).to(self.dtype)
        if y.dtype.kind in "iub" or (y.dtype.kind == "f" and np.all(np.mod(y, 1) == 0)):
            return torch.as_tensor(y.astype(np.int64))
        raise ValueError(
            f"Could not turn y of dtype {y.dtype} into class indices for this model; "
            "pass integer class labels."
        )

    # ---- device / pickling -----------------------------------------------------------
    def _skdattri_to(self, device):
        new = copy.copy(self)
        new.module = copy.deepcopy(self.module).to(device)
        new.l2 = {k: (v.to(device) if isinstance(v, torch.Tensor) else v)
                  for k, v in self.l2.items()}
        new.device = torch.device(device)
        return new

    def __getstate__(self):
        state = self.__dict__.copy()
        if self.device.type != "cpu":
            state["module"] = copy.deepcopy(self.module).to("cpu")
            state["l2"] = {k: (v.cpu() if isinstance(v, torch.Tensor) else v)
                           for k, v in self.l2.items()}
        state["device"] = str(self.device)
        return state

    def __setstate__(self, state):
        dev = torch.device(state["device"])
        if dev.type == "cuda" and not torch.cuda.is_available():
            dev = torch.device("cpu")
        state["device"] = dev
        self.__dict__.update(state)
        if dev.type != "cpu":
            self.module.to(dev)
            self.l2 = {k: (v.to(dev) if isinstance(v, torch.Tensor) else v)
                       for k, v in self.l2.items()}


def _as_tensor_tree(X, dtype, cast_int):
    """numpy / torch / dict of arrays -> tensor tree on the CPU."""
    if isinstance(X, dict):
        return {k: _as_tensor_tree(v, dtype, cast_int) for k, v in X.items()}
    if isinstance(X, torch.Tensor):
        t = X.detach().cpu()
    else:
        arr = np.asarray(X)
        if arr.dtype == object:
            arr = arr.astype(np.float64)
        if not arr.flags.writeable or not arr.flags.c_contiguous:
            arr = np.array(arr, copy=True, order="C")
        t = torch.from_numpy(arr)
    if t.is_floating_point() or cast_int or t.dtype == torch.bool:
        t = t.to(dtype)
    return t


def _n_samples(X):
    """Number of rows of an array, tensor or dict of arrays."""
    if isinstance(X, dict):
        return len(next(iter(X.values())))
    return len(X)


def _take(X, idx):
    """Rows ``idx`` (a slice or index tensor) of a tensor or dict of tensors."""
    if isinstance(X, dict):
        return {k: v[idx] for k, v in X.items()}
    return X[idx]


def _tree_to(X, device):
    if isinstance(X, dict):
        return {k: v.to(device) for k, v in X.items()}
    return X.to(device)
