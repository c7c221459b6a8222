"""Invariant 5: the factorised random sketch is unbiased, exact at identity, adjoint-consistent."""

from __future__ import annotations

import pytest
import torch

from drpt_ray.config import RegularizerSpec, SketchSpec
from drpt_ray.lm_losses import token_mean_loss
from drpt_ray.regularize import Regularizer
from drpt_ray.regularize import kernels as K
from tests.regularize import oracle as O


def _dy_x(seed=0, n=5, T=7, O_=12, I=10):  # noqa: E741 (the layer's input width, as in the paper)
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, T, O_, generator=g, dtype=torch.float64),
            torch.randn(n, T, I, generator=g, dtype=torch.float64))


@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
def test_adjoint_and_vec_trick(kind):
    p1 = K.sketch_factor(12, 4, kind, seed=1, dtype=torch.float64, device="cpu")
    p2 = K.sketch_factor(10, 3, kind, seed=2, dtype=torch.float64, device="cpu")
    g = torch.Generator().manual_seed(9)
    x, y = torch.randn(12, generator=g, dtype=torch.float64), torch.randn(4, generator=g, dtype=torch.float64)
    # <P^T x, y> = <x, P y>
    assert torch.allclose((p1.T @ x) @ y, x @ (p1 @ y))
    # sketch of (dY, X) via the factors == (P1 (x) P2)^T vec(G) with G = dY^T X
    dy, xx = _dy_x(seed=3, n=1)
    f = K.SketchFactors(p1, p2)
    via_factors = K.sketch_target(dy, xx, f, has_bias=False).sketch
    G = dy[0].T @ xx[0]
    via_vec = (torch.kron(p1, p2).T @ G.reshape(-1)).reshape(4, 3)
    assert torch.allclose(via_factors, via_vec, atol=1e-12)


def test_identity_fallback_is_exact():
    assert K.sketch_factor(10, 10, "gaussian", 0, torch.float64, "cpu") is None
    dy, x = _dy_x()
    tgt = K.linear_target(*_dy_x(seed=5, n=2), has_bias=True)
    f = K.SketchFactors.for_block(12, 10, True, index=0, spec=SketchSpec(dim=64), dtype=torch.float64, device="cpu")
    assert f.p_out is None and f.p_in is None
    st = K.Target(sketch=f.project_grad(tgt.weight, tgt.bias))
    assert torch.allclose(K.sketch_scores(dy, x, st, f, True), K.ghost_scores(dy, x, tgt), atol=1e-10)


@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
def test_sketch_scores_are_unbiased_and_variance_shrinks(kind):
    dy, x = _dy_x(O_=40, I=30)
    tgt = K.linear_target(*_dy_x(seed=5, n=2, O_=40, I=30), has_bias=False)
    exact = K.ghost_scores(dy, x, tgt)
    spread = {}
    for k in (4, 16):
        est = []
        for seed in range(600):
            f = K.SketchFactors.for_block(40, 30, False, index=seed, spec=SketchSpec(kind=kind, dim=k),
                                          dtype=torch.float64, device="cpu")
            est.append(K.sketch_scores(dy, x, K.Target(sketch=f.project_grad(tgt.weight, None)), f, False))
        est = torch.stack(est)
        se = est.std(0) / len(est) ** 0.5
        # the mean is within 4 standard errors of the exact score, for every example
        assert ((est.mean(0) - exact).abs() < 4 * se).all(), (k, est.mean(0), exact)
        spread[k] = float(((est - exact) ** 2).mean())
    # a 4x larger k per factor cuts the error variance several-fold (~1/k per factor)
    assert spread[16] < spread[4] / 3


def test_regularizer_sketch_kernel_on_a_model():
    """kernel=sketch with k >= every dim equals ghost exactly; with small k it correlates with it."""
    model = O.TinyMLP(0)
    batch, target = O.make_batch(8, 1), O.make_batch(2, 2)
    units = O.units_of(batch)

    def scores(**kw):
        reg = Regularizer(model, RegularizerSpec(feasible_set="layerwise_subset", **kw))
        reg.capture_target(token_mean_loss(model, target))
        st = reg.backward(lambda rows: token_mean_loss(model, batch, rows), units)
        model.zero_grad(set_to_none=True)
        reg.remove()
        return st

    ghost = scores(kernel="ghost")
    wide = scores(kernel="sketch", sketch=SketchSpec(dim=256))
    for name in ghost.scores:
        assert O.rel_err(wide.scores[name], ghost.scores[name]) < 1e-10
    narrow = scores(kernel="sketch", sketch=SketchSpec(dim=16))
    corr = [torch.corrcoef(torch.stack([narrow.scores[n], ghost.scores[n]]))[0, 1] for n in ghost.scores]
    assert sum(corr) / len(corr) > 0.5
    # the cosine is reported in the sketched space: exact once the sketch is lossless, close below
    assert wide.cos_overall == pytest.approx(ghost.cos_overall, rel=1e-9)
    assert narrow.cos_overall != pytest.approx(ghost.cos_overall, rel=1e-6)
    assert abs(narrow.cos_overall - ghost.cos_overall) < 0.1
