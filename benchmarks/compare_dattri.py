"""skdattri and dattri side by side: same trained models, same data, same ground truth.

Run from the repository root (needs ``pip install -e '.[bench]'``, which installs dattri)::

    python benchmarks/compare_dattri.py            # full run, digits-lr and digits-mlp
    python benchmarks/compare_dattri.py --quick    # smoke run on small subsets

For each setting the model is trained once (with TracIn checkpoints), the LDS ground
truth is computed once (or loaded from the skdattri cache), and every method is run by
both libraries on the very same torch parameters: the scikit-learn ``LogisticRegression``
is converted with ``skdattri.model.make_model(...).module`` (the module skdattri itself
attributes), the MLP is the skorch net's ``module_``. Hyperparameters are matched where
both libraries have them (damping, iterations, eigenpairs, projection size, ...); the
README next to this file lists them.

Conventions: dattri returns ``(n_train, n_test)`` and is transposed. Its scores are
"positive = helps" like skdattri's (an inner product of the training gradient with the
(inverse-curvature-weighted) query gradient of the loss, or of the margin for TRAK, or
the excitation of the query's class for RPS), so no sign flip is needed; the ``agree``
column (mean per-query Pearson correlation of the two score matrices) checks it.

Timings: ``torch.set_num_threads(1)`` for both libraries; the minimum over up to 3
runs (no new run after 3 s); skdattri = ``fit`` + ``transform``; dattri = ``cache`` +
``attribute`` (constructing the attributor is not timed), fed whole-set dataloaders (one train
batch, one test batch: dattri's fastest and, for its influence functions, only correct
configuration, since it sums per-batch inverse-Hessian products). The floor is one plain
per-sample-gradient pass (``torch.func.vmap(grad)``) over the training set.

This script is not part of the package and is not run by the test suite.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import platform
import sys
import time
import warnings

os.environ.setdefault("TQDM_DISABLE", "1")  # dattri draws progress bars everywhere

import numpy as np  # noqa: E402
import torch  # noqa: E402
from _common import agreement  # noqa: E402
from sklearn.base import clone  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

torch.set_num_threads(1)


# ----------------------------------------------------------------------------------------
# helpers


def machine():
    """CPU model name and core count (lscpu), plus library versions."""
    from _common import cpu_name

    name = cpu_name()
    import dattri
    import sklearn

    import skdattri

    version = getattr(dattri, "__version__", None)
    if version is None:
        from importlib.metadata import version as _v

        version = _v("dattri")
    return (f"{name}, {os.cpu_count()} cores; Python {platform.python_version()}, "
            f"torch {torch.__version__}, scikit-learn {sklearn.__version__}, "
            f"skdattri {skdattri.__version__}, dattri {version}")


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def best_of(fn, setup=lambda: None, budget=3.0, repeats=3):
    """Minimum wall time of ``fn(setup())`` over up to ``repeats`` runs (fewer when a run
    is long: no new run starts after ``budget`` seconds). The minimum filters out the
    noise of other processes on a shared machine; ``setup`` is not timed."""
    best, out, spent = np.inf, None, 0.0
    for _ in range(repeats):
        state = setup()
        out, t = timed(lambda state=state: fn(state))
        best, spent = min(best, t), spent + t
        if spent > budget:
            break
    return out, best


class Problem:
    """One trained model of a setting, in the forms both libraries consume."""

    def __init__(self, name, quick, cache_dir):
        from skdattri.benchmark import compute_ground_truth, train_with_checkpoints
        from skdattri.datasets import load_setting
        from skdattri.model import make_model

        sizes = {"n_train": 300, "n_test": 40} if quick else {}
        self.name = name
        self.data = d = load_setting(name, random_state=0, **sizes)
        self.n_train = len(d.y_train)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.model, self.ckpts = train_with_checkpoints(d, n_checkpoints=5)
        self.lds_gt, _ = compute_ground_truth(
            d, n_subsets=20 if quick else 50, n_loo=0, cache_dir=cache_dir, verbose=1)
        self.is_net = hasattr(self.model, "module_")
        if self.is_net:
            self.module = copy.deepcopy(self.model.module_).eval()
            self.states = [dict(s) for s in self.ckpts.states]
            self.final_layer = [n for n, m in self.module.named_modules()
                                if isinstance(m, torch.nn.Linear)][-1]
            dtype = torch.float32
            self.l2 = 0.0
        else:
            self.module = make_model(self.model, n_train=self.n_train).module
            self.states = [make_model(c, n_train=self.n_train).module.state_dict()
                           for c in self.ckpts.states]
            self.final_layer = "linear"
            dtype = torch.float64
            # LogisticRegression's own L2 penalty, in the mean-loss form skdattri uses:
            # ||W||^2 / (2 C n) -> Hessian term 1 / (C n) on the weights
            self.l2 = 1.0 / (float(self.model.C) * self.n_train)
        self.Xtr = torch.as_tensor(np.asarray(d.X_train), dtype=dtype)
        self.ytr = torch.as_tensor(np.asarray(d.y_train), dtype=torch.long)
        self.Xte = torch.as_tensor(np.asarray(d.X_test), dtype=dtype)
        self.yte = torch.as_tensor(np.asarray(d.y_test), dtype=torch.long)
        self.n_params = sum(p.numel() for p in self.module.parameters())

    # dataloaders: one batch each (see the module docstring)
    def train_loader(self):
        return DataLoader(TensorDataset(self.Xtr, self.ytr), batch_size=self.n_train,
                          shuffle=False)

    def test_loader(self, batch_size=None):
        return DataLoader(TensorDataset(self.Xte, self.yte),
                          batch_size=batch_size or len(self.yte), shuffle=False)

    # dattri tasks
    def task(self, kind="loss", states=None, batch_single_inputs=False):
        """An AttributionTask on a fresh copy of the module (dattri loads checkpoints into
        it and hooks it), with the loss (``"loss"``), the margin (``"margin"``, dattri's
        TRAK examples) or a callable of the pre-activations (RPS)."""
        from dattri.task import AttributionTask

        model = copy.deepcopy(self.module)
        if batch_single_inputs:
            # dattri's LoGra / FactGraSS set up their compressors by running the model on
            # one sample without its batch dimension (``sample_inputs[0]``), which a
            # plain MLP cannot take: give it the batch dimension back
            model.register_forward_pre_hook(
                lambda module, args: (args[0][None],) if args[0].dim() == 1 else None)

        def loss(params, data):
            x, y = data
            out = torch.func.functional_call(model, params, x)
            return torch.nn.functional.cross_entropy(out, y.long())  # LiSSA casts y

        def margin(params, data):
            x, y = data
            out = torch.func.functional_call(model, params, x)
            logp = -torch.nn.functional.cross_entropy(out, y.long())
            return logp - torch.log(1 - torch.exp(logp))

        def module_loss(module, batch, device):
            # dattri's block-projected attributors (LoGra, FactGraSS) call the loss on the
            # hooked module itself; summed, so the hooks see true per-sample gradients
            x, y = (t.to(device) for t in batch)
            return torch.nn.functional.cross_entropy(module(x), y.long(), reduction="sum")

        func = {"loss": loss, "margin": margin, "module_loss": module_loss}.get(kind, kind)
        states = [self.module.state_dict()] if states is None else states
        return AttributionTask(loss_func=func, model=model,
                               checkpoints=states if len(states) > 1 else states[0])

    def float32(self):
        """A float32 copy (dattri's LiSSA casts every input to float32)."""
        if next(self.module.parameters()).dtype == torch.float32:
            return self
        other = copy.copy(self)
        other.module = copy.deepcopy(self.module).float()
        other.Xtr, other.Xte = self.Xtr.float(), self.Xte.float()
        return other

    def floor_seconds(self):
        """Best of 5: one vmap(grad) pass of the per-sample loss over the training set."""
        params = {k: v.detach() for k, v in self.module.named_parameters()}

        def one(p, x, y):
            out = torch.func.functional_call(self.module, p, (x.unsqueeze(0),))
            return torch.nn.functional.cross_entropy(out, y.unsqueeze(0))

        per_sample = torch.func.vmap(torch.func.grad(one), in_dims=(None, 0, 0))
        per_sample(params, self.Xtr[:2], self.ytr[:2])  # warm-up
        _, best = best_of(lambda _: per_sample(params, self.Xtr, self.ytr), repeats=5)
        return best


# ----------------------------------------------------------------------------------------
# the pairs: (skdattri attributor, dattri attributor) with matched settings


def _sk_run(attr, p):
    """Time skdattri's ``fit`` + ``transform`` (best of a few runs)."""
    def run(_):
        attr.fit(p.data.X_train, p.data.y_train)
        return attr.transform(p.data.X_test, p.data.y_test)

    scores, t = best_of(run)
    return np.asarray(scores, dtype=np.float64), t


def _dattri_run(make, p, cache=True, test_batch=None):
    """Time dattri's ``cache`` + ``attribute`` (best of a few runs; construction untimed)."""
    def run(attributor):
        if cache:
            attributor.cache(p.train_loader())
        if type(attributor).__name__ == "TRAKAttributor":  # (test, train=None) after cache
            return attributor.attribute(p.test_loader(test_batch))
        return attributor.attribute(p.train_loader(), p.test_loader(test_batch))

    scores, t = best_of(run, setup=lambda: make(p))
    return np.asarray(scores.detach().cpu(), dtype=np.float64).T, t


def run_pair(p, sk, make_dattri, note, cache=True, dattri_float32=False, test_batch=None):
    """Run both sides. dattri parts that only work in float32 get a float32 copy.

    skdattri refuses an exact Hessian that is not positive definite after damping (dattri
    goes on regardless); it then uses the Gauss-Newton curvature, and the note says so.
    """
    try:
        result_sk = _sk_run(sk, p)
    except ValueError as exc:
        if "positive definite" not in str(exc) or sk.get_params().get("hessian") != "exact":
            raise
        sk.set_params(hessian="ggn")
        result_sk = _sk_run(sk, p)
        note += " (skdattri: Hessian + damping indefinite, used hessian='ggn')"
    if make_dattri is None:  # dattri cannot run this configuration: say so in the row
        nan = np.full((len(p.yte), p.n_train), np.nan)
        return result_sk, (nan, float("nan")), note
    q = p.float32() if dattri_float32 else p
    if q is not p:
        note += "; dattri in float32 (its only dtype here)"
    if test_batch:
        note += f"; dattri gets test batches of {test_batch} (memory)"
    return result_sk, _dattri_run(make_dattri, q, cache=cache, test_batch=test_batch), note


def _identity_proj(p):
    # dattri's TracIn always projects (default 512 Gaussian); "identity" keeps the
    # full gradients as skdattri does without proj_dim
    return {"proj_type": "identity", "proj_dim": p.n_params, "proj_max_batch_size": 32,
            "proj_seed": 0, "device": "cpu"}


def pair_tracin(p, name):
    from dattri.algorithm.tracin import TracInAttributor

    from skdattri import TracIn

    if name == "tracin":
        sk = TracIn(p.model, checkpoints=list(p.ckpts.states),
                    learning_rates=list(p.ckpts.learning_rates))
        weights = torch.tensor(p.ckpts.learning_rates)
    else:
        sk = TracIn(p.model, normalize=name == "grad-cos")
        weights = torch.ones(1)

    def make(q):
        task = q.task(states=q.states if name == "tracin" else None)
        return TracInAttributor(task, weight_list=weights, normalized_grad=name == "grad-cos",
                                projector_kwargs=_identity_proj(q))

    note = "full gradients (dattri: identity projection)"
    if name == "tracin":
        note += f", {len(p.states)} checkpoints"
    return run_pair(p, sk, make, note, cache=False)


def pair_if(p, solver, defaults=False):
    from dattri.algorithm import influence_function as dif

    from skdattri.influence import InfluenceFunction

    # Damping added to the Hessian. skdattri adds it on top of the model's own L2 term
    # (LogisticRegression's C); dattri gets that L2 term folded into its damping (applied
    # to every parameter, intercepts included).
    damp = 0.1 if p.is_net and solver in ("explicit", "cg") else 1e-2 if p.is_net else 1e-6
    dt_damp = damp + p.l2
    float32 = False
    test_batch = None
    if solver == "explicit":
        sk = InfluenceFunction(p.model, solver="explicit", regularization=damp,
                               hessian="exact")
        make = lambda q: dif.IFAttributorExplicit(q.task(), regularization=dt_damp)  # noqa: E731
        note = f"damping {damp:g}"
    elif solver == "cg":
        sk = InfluenceFunction(p.model, solver="cg", max_iter=20, tol=1e-6,
                               regularization=damp, hessian="exact")
        make = lambda q: dif.IFAttributorCG(q.task(), max_iter=20,  # noqa: E731
                                            regularization=dt_damp)
        note = f"exact Hessian, damping {damp:g}, at most 20 iterations"
        if not p.is_net:
            note += (f" (skdattri: the {p.n_params} x {p.n_params} curvature formed once, "
                     "CG preconditioned by its Cholesky factor)")
    elif solver == "lissa":
        depth, scale, batch = 200, 50.0, 64
        sk = InfluenceFunction(p.model, solver="lissa", depth=depth, scale=scale,
                               n_samples=1, batch_size=batch, regularization=damp,
                               hessian="exact", random_state=0)
        # dattri's LiSSA damping d solves (H + d * scale I): pass d = lambda / scale
        make = lambda q: dif.IFAttributorLiSSA(  # noqa: E731
            q.task(), batch_size=batch, num_repeat=1, recursion_depth=depth,
            damping=dt_damp / scale, scaling=scale)
        note = f"exact Hessian, depth {depth}, scale {scale:g}, batch {batch}, damping {damp:g}"
        float32 = True
        # dattri vmaps the recursion over every test vector at once: with 200 queries
        # on the MLP that exceeds 20 GB of RAM (2.3 GB for 20), so it gets them by 20
        test_batch = 20 if p.is_net else None
    elif solver == "arnoldi":
        sk = InfluenceFunction(p.model, solver="arnoldi", n_components=50, max_iter=100,
                               regularization=damp, hessian="exact", random_state=0)
        make = lambda q: dif.IFAttributorArnoldi(q.task(), proj_dim=50,  # noqa: E731
                                                 max_iter=100, regularization=dt_damp)
        note = f"exact Hessian, 50 eigenpairs from 100 iterations, damping {damp:g}"
        float32 = True
    elif solver == "datainf":
        sk = InfluenceFunction(p.model, solver="datainf", regularization=0.1)
        make = lambda q: dif.IFAttributorDataInf(q.task(), regularization=0.1)  # noqa: E731
        note = "layer damping 0.1"
        float32 = True
    elif solver == "ekfac":
        sk = InfluenceFunction(p.model, solver="ekfac", regularization=1e-3,
                               fisher="empirical")
        make = lambda q: dif.IFAttributorEKFAC(q.task(), damping=1e-3)  # noqa: E731
        note = "empirical Fisher, damping 1e-3"
        float32 = True
    else:  # pragma: no cover
        raise ValueError(solver)
    if defaults and solver == "explicit" and p.is_net:
        # dattri's explicit solver builds the dense Hessian with torch.func.hessian over
        # the whole batch: for the 17k-parameter MLP the process was killed (out of
        # memory) on this 24 GiB machine
        make = None
        note = "dattri not run (dense Hessian by torch.func.hessian: out of memory)"
    if defaults:
        # skdattri on its defaults: only the damping (hessian='auto': exact for the
        # linear model, Gauss-Newton for the MLP; CG's tol / max_iter, LiSSA's automatic
        # scale and depth 1000); dattri as in the matched row
        sk = InfluenceFunction(p.model, solver=solver, regularization=damp, random_state=0)
        note = f"skdattri defaults (damping {damp:g}); dattri: {note}"
    return run_pair(p, sk, make, note, dattri_float32=float32, test_batch=test_batch)


def _dattri_trak(task, proj):
    """dattri's TRAK on ``task`` (margin outputs, Q from the probability of the label)."""
    from dattri.algorithm.trak import TRAKAttributor

    def correct_probability(params, data):
        x, y = data
        out = torch.func.functional_call(task.get_model(), params, x.unsqueeze(0))
        return torch.exp(-torch.nn.functional.cross_entropy(out, y.unsqueeze(0)))

    return TRAKAttributor(task, correct_probability_func=correct_probability,
                          projector_kwargs=dict(proj), regularization=0.0)


def pair_trak(p, n_models, defaults=False):
    from skdattri.trak import TRAK

    proj_dim = min(512, p.n_train // 2)  # the kernel is singular when proj_dim > n_train
    proj = {"proj_dim": proj_dim, "proj_max_batch_size": 32, "proj_seed": 0, "device": "cpu",
            "proj_type": "rademacher"}
    # matched: dattri's regularization 0 on both sides; defaults: skdattri's own
    # (proj_dim="auto", regularization="auto") against the same dattri run
    matched = {} if defaults else {"proj_dim": proj_dim, "regularization": 0.0}
    if n_models == 1:
        states = None
        sk = TRAK(p.model, proj_type="rademacher", random_state=0, **matched)
    else:
        # n_models independently seeded nets, trained here (not timed), given to both
        states = []
        for k in range(n_models):
            net = clone(p.data.estimator).set_params(module__random_state=k + 1)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(k + 1)
                net.fit(p.data.X_train, p.data.y_train)
            states.append({n: v.detach().clone() for n, v in net.module_.state_dict().items()})
        sk = TRAK(p.model, checkpoints=states, proj_type="rademacher", random_state=0,
                  **matched)

    def make(q):
        task = q.task("margin", states=states)

        return _dattri_trak(task, proj)

    note = f"{n_models} model(s), {proj_dim} Rademacher projections, no regularization"
    if defaults:
        note = (f"{n_models} model(s); skdattri defaults (proj_dim='auto', regularization="
                f"'auto'), dattri {proj_dim} projections, no regularization")
    return run_pair(p, sk, make, note, dattri_float32=True)


def pair_logra(p, kind, matched=False):
    """LoGra / FactGraSS: skdattri on its defaults against dattri on its defaults (both
    4096 coordinates per layer, damped empirical Fisher of the projected gradients); the
    ``matched`` rows give dattri skdattri's damping (1 x the mean eigenvalue of each
    layer's block: dattri's ``damping`` is relative to that mean too)."""
    from dattri.algorithm.factgrass import FactGraSSAttributor
    from dattri.algorithm.logra import LoGraAttributor

    from skdattri.logra import LoGra

    kw = {"damping": 1.0} if matched else {}
    if kind == "logra":
        sk = LoGra(p.model, random_state=0)
        make = lambda q: LoGraAttributor(  # noqa: E731
            q.task("module_loss", batch_single_inputs=True), offload="none", **kw)
    else:
        sk = LoGra(p.model, proj_type="grass", random_state=0)
        make = lambda q: FactGraSSAttributor(  # noqa: E731
            q.task("module_loss", batch_single_inputs=True), offload="none", **kw)
    note = ("defaults on both sides: proj_dim 4096 per layer, eFIM; skdattri "
            "regularization='auto' (mean eigenvalue), dattri damping 1e-5 x mean eigenvalue")
    if matched:
        note = ("proj_dim 4096 per layer, eFIM, damping 1 x mean eigenvalue per layer on both "
                "sides (skdattri: its default regularization='auto')")
    return run_pair(p, sk, make, note, dattri_float32=True)


def pair_rps(p, defaults=False):
    from dattri.algorithm.rps import RPSAttributor

    from skdattri.representer import RepresenterPoints

    def soft_ce(pre_activation, soft_labels):
        return torch.nn.functional.cross_entropy(pre_activation, soft_labels)

    # matched: dattri's recipe (refit to the model's outputs, L2 3e-3); defaults:
    # skdattri's own (refit to the labels, regularization="auto") against the same dattri run
    if defaults:
        sk = RepresenterPoints(p.model)
        note = "skdattri defaults (labels, regularization='auto'), dattri L2 3e-3"
    else:
        sk = RepresenterPoints(p.model, targets="model", regularization=3e-3)
        note = "model outputs as targets, L2 3e-3"

    def make(q):
        return RPSAttributor(q.task(soft_ce), final_linear_layer_name=q.final_layer,
                             l2_strength=3e-3, epoch=3000)

    return run_pair(p, sk, make, note + "; dattri refits by up to 3000 gradient steps",
                    dattri_float32=True)


def pair_knn(p):
    from dattri.algorithm.data_shapley import KNNShapleyAttributor

    from skdattri import KNNShapley

    result_sk = _sk_run(KNNShapley(n_neighbors=5), p)
    scores, t = best_of(lambda dt: dt.attribute(p.train_loader(), p.test_loader()),
                        setup=lambda: KNNShapleyAttributor(k_neighbors=5))
    scores = np.asarray(scores, dtype=np.float64)
    if scores.shape != (len(p.yte), p.n_train):  # it is documented as (n_train, n_test)
        scores = scores.T
    return result_sk, (scores, t), "k=5 on the raw features"


def pair_trak_dropout(p, defaults=False):
    """TRAK over 10 dropout members of the final net (a setting whose module has
    ``nn.Dropout``). dattri (``activate_dropout``): its ten "checkpoints" are the same
    state with dropout layers in training mode, so every per-sample gradient sees a fresh
    mask (``vmap(randomness="different")``); skdattri: ten fixed masks, one sub-network per
    member, the same for every sample (see ``TRAK``'s Notes)."""
    from dattri.model_util.dropout import activate_dropout

    from skdattri.trak import TRAK

    proj_dim = min(512, p.n_train // 2)
    proj = {"proj_dim": proj_dim, "proj_max_batch_size": 32, "proj_seed": 0, "device": "cpu",
            "proj_type": "rademacher"}
    matched = {} if defaults else {"proj_dim": proj_dim, "regularization": 0.0,
                                   "proj_type": "rademacher"}
    sk = TRAK(p.model, dropout=True, n_models=10, random_state=0, **matched)
    rate = next(m.p for m in p.module.modules() if isinstance(m, torch.nn.Dropout))

    def make(q):
        task = q.task("margin", states=[q.states[-1]] * 10)
        activate_dropout(task.get_model(), dropout_prob=rate)

        return _dattri_trak(task, proj)

    note = (f"10 dropout members (p={rate:g}), {proj_dim} Rademacher projections, no "
            "regularization")
    if defaults:
        note = (f"10 dropout members (p={rate:g}); skdattri defaults (proj_dim='auto', "
                f"regularization='auto'), dattri {proj_dim} projections, no regularization")
    return run_pair(p, sk, make, note, dattri_float32=True)


def pair_dvemb(p):
    """DVEmb on one recorded SGD run, fed to both libraries step by step.

    digits-mlp: the setting's own skorch net (SGD, momentum 0.9, 50 epochs of 64) with
    skdattri's TrainingRecorder and a callback feeding dattri's ``cache_gradients`` the
    same batch, row indices and learning rate; both project to 512 Gaussian coordinates.
    digits-lr: the setting's model is an L-BFGS fit, so the same linear model is trained
    here from zeros by plain SGD (lr 0.5, batch 64, 30 epochs, weight decay = the
    L2 term of C=1) in a torch loop calling ``recorder.step`` and ``cache_gradients``;
    full gradients (650) on both sides, the weight decay left out of the recursion
    on both (dattri has no such term; ``DVEmb(weight_decay=None)`` would model it).
    Time = gradient recording during training (the training itself is not timed) +
    skdattri fit/transform or dattri cache/attribute.
    """
    from dattri.algorithm.dvemb import DVEmbAttributor
    from dattri.task import AttributionTask
    from skorch.callbacks import Callback

    from skdattri import DVEmb
    from skdattri.callbacks import TrainingRecorder

    spent = {"sk": 0.0, "dt": 0.0}

    def timing(key, fn):
        def run(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[key] += time.perf_counter() - t0
        return run

    def dattri_for(module, proj_dim):
        def loss(params, data):
            x, y = data
            out = torch.func.functional_call(module, params, x)
            return torch.nn.functional.cross_entropy(out, y.long())
        task = AttributionTask(loss_func=loss, model=module, checkpoints=module.state_dict())
        return DVEmbAttributor(task, proj_dim=proj_dim, proj_seed=0)

    if p.is_net:
        proj_dim = 512
        recorder = TrainingRecorder(keep="gradients", proj_dim=proj_dim, random_state=0)
        for hook in ("on_train_begin", "on_batch_begin"):
            setattr(recorder, hook, timing("sk", getattr(recorder, hook)))
        holder = {}

        class _FeedDattri(Callback):
            def on_batch_begin(self, net, batch=None, training=False, **kwargs):
                if not training:
                    return
                if "attr" not in holder:
                    holder["attr"] = dattri_for(net.module_, proj_dim)
                feed = timing("dt", holder["attr"].cache_gradients)
                feed(len(net.history) - 1, (batch[0], batch[1]),
                     recorder.step_indices_[-1], float(net.optimizer_.param_groups[0]["lr"]))

        net = clone(p.data.estimator)
        net.set_params(callbacks=[*(net.callbacks or []), ("rec", recorder),
                                  ("dattri", _FeedDattri())])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            net.fit(p.data.X_train, p.data.y_train)
        sk = DVEmb(net, recorder=recorder)
        dt_attr, module = holder["attr"], net.module_
        note = (f"{len(recorder.step_indices_)} steps of the setting's net (momentum 0.9 "
                f"not modelled by either), {proj_dim} Gaussian projections")
    else:
        proj_dim, lr, epochs = None, 0.5, 30
        module = copy.deepcopy(p.module)
        with torch.no_grad():
            for w in module.parameters():
                w.zero_()
        opt = torch.optim.SGD(module.parameters(), lr=lr, weight_decay=p.l2)
        recorder = TrainingRecorder(loss="cross_entropy")
        step = timing("sk", recorder.step)
        dt_attr = dattri_for(module, proj_dim)
        feed = timing("dt", dt_attr.cache_gradients)
        gen = torch.Generator().manual_seed(0)
        for epoch in range(epochs):
            for idx in torch.randperm(p.n_train, generator=gen).split(64):
                xb, yb = p.Xtr[idx], p.ytr[idx]
                step(module, xb, yb, idx, optimizer=opt)
                feed(epoch, (xb, yb), idx, lr)
                opt.zero_grad()
                torch.nn.functional.cross_entropy(module(xb), yb).backward()
                opt.step()
        # dattri's recursion has no weight-decay term: weight_decay=0 matches it
        # (skdattri's default takes the recorded one into the step Jacobians)
        sk = DVEmb(module, recorder=recorder, loss="cross_entropy", weight_decay=0.0)
        note = (f"{len(recorder.step_indices_)} plain SGD steps (lr {lr:g}, batch 64, "
                f"weight decay {p.l2:g}, not modelled on either side) of the linear model "
                "from zeros, full gradients")
    s_sk, t_sk = _sk_run(sk, p)

    def run_dattri(attributor):
        attributor.cache(memory_saving=False)
        return attributor.attribute(p.test_loader())

    s_dt, t_dt = best_of(run_dattri, setup=lambda: dt_attr)
    s_dt = np.asarray(s_dt.detach().cpu(), dtype=np.float64).T
    note += f"; recording {spent['sk']:.2f} s (skdattri) / {spent['dt']:.2f} s (dattri)"
    return (s_sk, t_sk + spent["sk"]), (s_dt, t_dt + spent["dt"]), note


def pairs_for(p):
    pairs = [("grad-dot", lambda: pair_tracin(p, "grad-dot")),
             ("grad-cos", lambda: pair_tracin(p, "grad-cos")),
             ("tracin", lambda: pair_tracin(p, "tracin"))]
    if not p.is_net:
        pairs.append(("if-explicit", lambda: pair_if(p, "explicit")))
    pairs.append(("if-explicit-default", lambda: pair_if(p, "explicit", defaults=True)))
    for solver in ("cg", "lissa", "arnoldi", "datainf", "ekfac"):
        pairs.append((f"if-{solver}", lambda s=solver: pair_if(p, s)))
        if solver in ("cg", "lissa"):
            pairs.append((f"if-{solver}-default",
                          lambda s=solver: pair_if(p, s, defaults=True)))
    pairs.append(("trak", lambda: pair_trak(p, 1)))
    pairs.append(("trak-default", lambda: pair_trak(p, 1, defaults=True)))
    if p.is_net:
        pairs.append(("trak-5", lambda: pair_trak(p, 5)))
        pairs.append(("trak-10", lambda: pair_trak(p, 10)))
    pairs += [("logra", lambda: pair_logra(p, "logra")),
              ("logra-matched", lambda: pair_logra(p, "logra", matched=True)),
              ("factgrass", lambda: pair_logra(p, "factgrass")),
              ("factgrass-matched", lambda: pair_logra(p, "factgrass", matched=True))]
    pairs += [("rps", lambda: pair_rps(p)), ("rps-default", lambda: pair_rps(p, True)),
              ("knn-shapley", lambda: pair_knn(p))]
    pairs.append(("dvemb", lambda: pair_dvemb(p)))
    if p.is_net and any(isinstance(m, torch.nn.Dropout) for m in p.module.modules()):
        pairs.append(("trak-dropout", lambda: pair_trak_dropout(p)))
        pairs.append(("trak-dropout-default", lambda: pair_trak_dropout(p, True)))
    return pairs


# ----------------------------------------------------------------------------------------


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 300 train / 40 test, 20 LDS subsets")
    parser.add_argument("--settings", nargs="+", default=["digits-lr", "digits-mlp"])
    parser.add_argument("--methods", nargs="+", default=None, help="subset of methods")
    parser.add_argument("--cache-dir", default=None, help="ground-truth cache")
    args = parser.parse_args(argv)

    from skdattri.metrics import lds_score

    print(f"# {datetime.date.today().isoformat()} | {machine()}")
    print(f"# command: python benchmarks/compare_dattri.py {' '.join(argv or sys.argv[1:])}")
    rows = []
    for name in args.settings:
        p = Problem(name, args.quick, args.cache_dir)
        floor = p.floor_seconds()
        print(f"\n## {name}: {p.n_train} train / {len(p.yte)} test, {p.n_params} parameters,"
              f" LDS ground truth {p.lds_gt.n_subsets} subsets; per-sample-gradient floor "
              f"{floor * 1e3:.1f} ms", flush=True)
        header = (f"| {'method':<12} | LDS skdattri | LDS dattri | agree | skdattri s | "
                  f"dattri s | dattri/skdattri | skdattri/floor | settings |")
        print(header)
        print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
        for method, run in pairs_for(p):
            if args.methods and method not in args.methods:
                continue
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                (s_sk, t_sk), (s_dt, t_dt), note = run()
                lds_sk = lds_score(p.lds_gt, s_sk)
                finite = np.all(np.isfinite(s_dt))
                lds_dt = lds_score(p.lds_gt, s_dt) if finite else float("nan")
            agree = agreement(s_sk, s_dt) if finite else float("nan")
            row = (name, method, lds_sk, lds_dt, agree, t_sk, t_dt, t_dt / t_sk,
                   t_sk / floor, note)
            rows.append(row)
            print(f"| {method:<12} | {lds_sk:12.3f} | {lds_dt:10.3f} | {agree:5.2f} | "
                  f"{t_sk:10.3f} | {t_dt:8.3f} | {t_dt / t_sk:15.1f} | {t_sk / floor:14.1f} |"
                  f" {note} |", flush=True)
    return rows


if __name__ == "__main__":
    main()
