"""Chains of projectors: ``P = P_m o ... o P_1`` (GraSS is a mask followed by an SJLT)."""

# Authors: The skdattri developers
# SPDX-License-Identifier: BSD-3-Clause

from ._base import _ProjectorGroup


class ComposedProjector(_ProjectorGroup):
    """Apply projectors one after the other: ``P(G) = P_m(... P_2(P_1(G)))``.

    Each stage's ``n_features`` must be the previous stage's ``out_dim``. GraSS
    [1]_ is ``ComposedProjector(mask, SJLTProjector(...))``: a sparsifier to an
    intermediate dimension, then a sparse JL projection; ``make_projector(...,
    proj_type="grass")`` builds it. Only the first stage may depend on data
    (a :class:`SelectiveMaskProjector`): :meth:`partial_fit` feeds it the rows.
    The product of unbiased independent stages is unbiased.

    Parameters
    ----------
    *projectors : projectors
        At least two, on one device and with one dtype.

    Attributes
    ----------
    projectors_ : list of projectors
        The stages.
    seed_ : int
        The first stage's seed.

    References
    ----------
    .. [1] Hu, P. et al. "GraSS: Scalable Influence Function with Sparse
       Gradient Compression", 2025.

    Examples
    --------
    >>> import torch
    >>> from skdattri.func.projection import (
    ...     ComposedProjector, RandomMaskProjector, SJLTProjector)
    >>> mask = RandomMaskProjector(1000, 64, random_state=0)
    >>> P = ComposedProjector(mask, SJLTProjector(64, 16, random_state=0))
    >>> G = torch.randn(3, 1000)
    >>> torch.equal(P(G), P.projectors_[1](mask(G)))
    True
    """

    def __init__(self, *projectors):
        if len(projectors) < 2:
            raise ValueError("ComposedProjector needs at least two projectors.")
        for prev, nxt in zip(projectors[:-1], projectors[1:]):
            if nxt.n_features != prev.out_dim:
                raise ValueError(
                    f"Cannot chain a projector with out_dim={prev.out_dim} into one with "
                    f"n_features={nxt.n_features}."
                )
        if any(p.requires_fit for p in projectors[1:]):
            raise ValueError("Only the first stage of a ComposedProjector may depend on data.")
        self._adopt(projectors)
        self.n_features = projectors[0].n_features
        self.proj_dim = projectors[-1].out_dim
        self.proj_type = "+".join(p.proj_type for p in projectors)
        self.seed_ = projectors[0].seed_

    def partial_fit(self, G):
        """Feed training rows to the first stage (when it depends on data). Returns self."""
        self.projectors_[0].partial_fit(self._check_input(G))
        return self

    def __call__(self, G):
        """Project the rows of ``G``: (n, n_features) -> (n, out_dim)."""
        G = self._check_input(G)
        for p in self.projectors_:
            G = p(G)
        return G
