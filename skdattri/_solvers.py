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
"""

from __future__ import annotations

from dataclasses import dataclass

from .func.datainf import DataInfIHVP
from .func.fisher import EmpiricalFisherOperator
from .func.hessian import GGNOperator, HessianOperator, LinearModelOperator
from .func.hooks import find_layers
from .func.ihvp import ArnoldiIHVP, ConjugateGradientIHVP, ExplicitIHVP, LissaIHVP
from .func.kfac import EKFACIHVP, fit_ekfac

# rows per block of a linear model's Hessian products (memory: rows x outputs x queries)
_LINEAR_BLOCK = 4096


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

    def operator(self, params, G, *, stochastic=False):
        """Curvature of the full training objective at ``params`` (one checkpoint's, whose
        training gradients are ``G``), as ``hessian_`` says."""
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
            return GGNOperator(output_fn, output_loss_fn, chosen, batches, l2=l2)
        return HessianOperator(loss_fn, chosen, batches, l2=l2)


# ----------------------------------------------------------------------------- solvers


def _explicit(ctx, params, G):
    return ExplicitIHVP(damping=ctx.damping, max_memory=ctx.attributor.max_memory).fit(
        ctx.operator(params, G))


def _cg(ctx, params, G):
    a = ctx.attributor
    return ConjugateGradientIHVP(damping=ctx.damping, tol=a.tol, max_iter=a.max_iter).fit(
        ctx.operator(params, G))


def _lissa(ctx, params, G):
    a = ctx.attributor
    return LissaIHVP(damping=ctx.damping, scale=a.scale, depth=a.depth, n_samples=a.n_samples,
                     tol=a.tol, random_state=a.random_state).fit(
        ctx.operator(params, G, stochastic=True))


def _arnoldi(ctx, params, G):
    a = ctx.attributor
    return ArnoldiIHVP(damping=ctx.damping, n_components=a.n_components,
                       max_iter=max(a.max_iter, a.n_components),
                       random_state=a.random_state).fit(ctx.operator(params, G))


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


def _ekfac(ctx, params, G):
    a, model = ctx.attributor, ctx.model
    fisher = a.fisher if model.loss_.has_distribution else "empirical"
    factors = fit_ekfac(model.module, ctx.batches(), loss=model.loss_,
                        fisher=fisher, layers=ctx.names,
                        forward=_CheckpointForward(model, params), random_state=a.random_state)
    return EKFACIHVP(damping=a.regularization).fit(
        factors, {k: params[k].shape for k in ctx.names})


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
    "ekfac": _Solver(_ekfac, restrict=_ekfac_names),
}

