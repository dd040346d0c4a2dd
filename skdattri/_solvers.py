"""The inverse-HVP solvers of :class:`~skdattri.InfluenceFunction`, one table.

Every curvature method is an entry of :data:`SOLVERS`: a function ``fit(context, params,
G) -> solver`` called once per checkpoint in ``fit``, whose result answers
``solver.solve(Q)`` -- ``(H + lambda I)^{-1} q`` for each row of a ``(m, p)`` block of
query gradients -- without changing itself and without touching the training data
again. ``context`` (:class:`_FitContext`) holds the attributor, the functional model and
the training set, and copies the training set to the device once per block size for
every checkpoint and solver that needs it. An entry may also restrict the parameters it
covers (EK-FAC covers the ``nn.Linear`` / convolution layers only). A new solver is one
function here (with its kernel in :mod:`skdattri.func`) and one line of the table.

kronfluence's ``"identity"`` strategy (no curvature) is Grad-Dot: ``TracIn`` on one
checkpoint, not a solver here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._utils import _torch_generator
from .func._layer_ggn import GGNFactory, LayerGGNOperator, layer_ggn_plan
from .func.datainf import DataInfIHVP
from .func.fisher import EmpiricalFisherOperator
from .func.hessian import DenseOperator, HessianOperator, LinearModelOperator
from .func.hooks import find_layers
from .func.ihvp import ArnoldiIHVP, ConjugateGradientIHVP, ExplicitIHVP, LissaIHVP
from .func.kfac import EKFACIHVP, fit_ekfac
from .func.sketch import DiagonalIHVP, NystromIHVP, gradient_square_mean
from .model._loss import _first

# rows per block of a linear model's Hessian products (memory: rows x outputs x queries)
_LINEAR_BLOCK = 4096

#: Closed-form curvatures (linear models, the empirical Fisher) of at most this many bytes
#: as a dense matrix are formed once (``n p^2`` flops) for the iterative solvers, whose
#: every product is then one ``(m, p) @ (p, p)`` GEMM: CG on the digits logistic
#: regression (650 parameters, 50 iterations, 200 queries) ran 25x faster than with the
#: per-sample closed-form products.
_DENSE_OPERATOR_BYTES = 2**25


class _FitContext:
    """What every solver's ``fit`` may use: settings, model, training data (copied to
    the device once per block size and shared by all checkpoints)."""

    def __init__(self, attributor, X, y):
        self.attributor = attributor
        self.model = attributor.model_
        self.names = attributor.param_names_
        self.X, self.y = X, y
        self._batches = {}

    @property
    def damping(self):
        reg = self.attributor.regularization
        return 0.0 if reg is None else float(reg)

    @property
    def affine(self):
        """The model's single affine layer when its curvature has a closed form."""
        return None if isinstance(self.X, dict) else self.model.affine

    def batches(self, *, stochastic=False):
        """The training set as device blocks: ``batch_size`` rows for stochastic
        solvers, large blocks for a linear model's closed-form products (same result)."""
        step = self.attributor.batch_size
        if self.affine is not None and not stochastic:
            step = max(step, _LINEAR_BLOCK)
        if step not in self._batches:
            self._batches[step] = self.attributor._device_batches(self.X, self.y, step)
        return self._batches[step]

    def operator(self, params, G, *, stochastic=False, dense_if_small=False):
        """Curvature of the full training objective at ``params`` (one checkpoint's, whose
        training gradients are ``G``), as ``hessian_`` says; with ``dense_if_small`` a
        closed-form curvature of at most :data:`_DENSE_OPERATOR_BYTES` comes formed."""
        op = self._operator(params, G, stochastic=stochastic)
        closed_form = isinstance(op, (LinearModelOperator, EmpiricalFisherOperator))
        if (dense_if_small and closed_form and not stochastic
                and op.p ** 2 * op.dtype.itemsize <= _DENSE_OPERATOR_BYTES):
            return DenseOperator(op.to_dense())
        return op

    def _operator(self, params, G, *, stochastic=False):
        model, names = self.model, self.names
        l2 = model.l2_vector(names)
        l2 = l2 if bool((l2 != 0).any()) else 0.0
        if self.attributor.hessian_ == "fisher":
            return EmpiricalFisherOperator(G, l2=l2, batch_size=(
                self.attributor.batch_size if stochastic else None))
        batches = self.batches(stochastic=stochastic)
        chosen = {k: params[k] for k in names}
        frozen = {k: v for k, v in params.items() if k not in chosen}
        layer = self.affine
        if layer is not None:
            return LinearModelOperator(
                model.loss_.loss, chosen, batches, weight=params[f"{layer}.weight"],
                bias=params.get(f"{layer}.bias"), weight_name=f"{layer}.weight",
                bias_name=f"{layer}.bias", l2=l2, output_hessian_fn=model.loss_.output_hessians)
        loss_fn, output_fn, output_loss_fn = model.curvature_functions(frozen)
        if self.attributor.hessian_ == "ggn":
            generic = GGNFactory(output_fn, output_loss_fn, chosen, batches, l2=l2)
            plan = layer_ggn_plan(model, names)
            if plan is None:
                return generic()
            return LayerGGNOperator(model, chosen, batches, plan, generic, frozen=frozen,
                                    l2=l2)
        return HessianOperator(loss_fn, chosen, batches, l2=l2)


# ----------------------------------------------------------------------------- solvers


def _explicit(ctx, params, G):
    return ExplicitIHVP(damping=ctx.damping, max_memory=ctx.attributor.max_memory).fit(
        ctx.operator(params, G))


def _cg(ctx, params, G):
    a = ctx.attributor
    return ConjugateGradientIHVP(damping=ctx.damping, tol=a.tol, max_iter=a.max_iter).fit(
        ctx.operator(params, G, dense_if_small=True))


def _lissa(ctx, params, G):
    a = ctx.attributor
    return LissaIHVP(damping=ctx.damping, scale=a.scale, depth=a.depth, n_samples=a.n_samples,
                     tol=a.tol, random_state=a.random_state).fit(
        ctx.operator(params, G, stochastic=True))


def _arnoldi(ctx, params, G):
    a = ctx.attributor
    return ArnoldiIHVP(damping=ctx.damping, n_components=a.n_components,
                       max_iter=max(a.max_iter, a.n_components),
                       random_state=a.random_state).fit(
                           ctx.operator(params, G, dense_if_small=True))


def _nystrom(ctx, params, G):
    a = ctx.attributor
    # not formed: k products of the operator cost less, and its L2 term stays known
    return NystromIHVP(damping=ctx.damping, n_components=a.n_components,
                       random_state=a.random_state).fit(ctx.operator(params, G))


def _sampled_square_mean(ctx, params):
    """Mean squared per-sample gradient at targets drawn from the model (one draw per
    training sample, all drawn at once, so the draws do not depend on batch_size): a
    Monte-Carlo estimate of the diagonal of the true Fisher (= Gauss-Newton matrix)."""
    a, model = ctx.attributor, ctx.model
    batches = ctx.batches(stochastic=True)
    with torch.no_grad():
        outputs = torch.cat([_first(model.forward(params, xb)) for xb, _ in batches])
    gen = _torch_generator(a.random_state, device=outputs.device)
    targets = model.loss_.sample_targets(outputs, gen)
    total, start = 0.0, 0
    for xb, yb in batches:
        stop = start + yb.shape[0]
        g = a._block_grads(params, xb, targets[start:stop], "loss")
        total, start = total + (g * g).sum(0), stop
    return total / start


def _diagonal(ctx, params, G):
    a, model = ctx.attributor, ctx.model
    if a.fisher == "true" and model.loss_.has_distribution:
        diagonal = _sampled_square_mean(ctx, params)
    else:
        diagonal = gradient_square_mean(G, batch_size=a.batch_size)
    diagonal = diagonal + model.l2_vector(ctx.names).to(diagonal)
    return DiagonalIHVP(damping=ctx.damping).fit(diagonal)


def _layer_sizes(model, names):
    """Sizes of the layer blocks (parameters grouped by their module), for DataInf."""
    named = dict(model.module.named_parameters())
    sizes, last = [], None
    for name in names:
        owner = name.rsplit(".", 1)[0] if "." in name else ""
        if owner == last:
            sizes[-1] += named[name].numel()
        else:
            sizes.append(named[name].numel())
            last = owner
    return sizes


def _datainf(ctx, params, G):
    return DataInfIHVP(damping=ctx.attributor.regularization,
                       layer_sizes=_layer_sizes(ctx.model, ctx.names)).fit(G)


class _CheckpointForward:
    """``forward(module, X)`` at a checkpoint's parameters, building a graph through the
    layers (their output gradients are what EK-FAC records)."""

    def __init__(self, model, params):
        self.model = model
        self.params = {k: v.detach().requires_grad_(True) for k, v in params.items()}

    def __call__(self, module, X):
        return self.model.forward(self.params, X)


def _kronecker(corrected):
    """EK-FAC (``corrected``) or K-FAC: the same factors, with or without the second
    pass that replaces the Kronecker eigenvalue products by per-sample second moments."""

    def fit(ctx, params, G):
        a, model = ctx.attributor, ctx.model
        fisher = a.fisher if model.loss_.has_distribution else "empirical"
        factors = fit_ekfac(model.module, ctx.batches(), loss=model.loss_,
                            fisher=fisher, layers=ctx.names, correct_eigenvalues=corrected,
                            forward=_CheckpointForward(model, params),
                            random_state=a.random_state)
        return EKFACIHVP(damping=a.regularization).fit(
            factors, {k: params[k].shape for k in ctx.names})

    fit.__name__ = "_ekfac" if corrected else "_kfac"
    return fit


def _ekfac_names(model, names):
    """The parameters of the layers EK-FAC covers (``nn.Linear`` and convolutions)."""
    covered = set()
    for layer, mod in find_layers(model.module, names):
        prefix = f"{layer}." if layer else ""
        covered.add(prefix + "weight")
        if mod.bias is not None:
            covered.add(prefix + "bias")
    return [n for n in names if n in covered]


@dataclass(frozen=True)
class _Solver:
    """An entry of the table: how to fit the solver, and which parameters it covers."""

    fit: object
    restrict: object = None

    def names(self, model, names):
        return list(names) if self.restrict is None else self.restrict(model, names)


#: ``{solver name: entry}``: the curvature methods of ``InfluenceFunction(solver=...)``.
SOLVERS = {
    "explicit": _Solver(_explicit),
    "cg": _Solver(_cg),
    "lissa": _Solver(_lissa),
    "arnoldi": _Solver(_arnoldi),
    "datainf": _Solver(_datainf),
    "ekfac": _Solver(_kronecker(True), restrict=_ekfac_names),
    "kfac": _Solver(_kronecker(False), restrict=_ekfac_names),
    "nystrom": _Solver(_nystrom),
    "diagonal": _Solver(_diagonal),
}

