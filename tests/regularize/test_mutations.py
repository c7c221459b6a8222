"""The oracle tests bite: each known-wrong variant of the code makes the matching check fail."""

from __future__ import annotations

import pytest

from drpt_ray.regularize import kernels as K
from drpt_ray.regularize import regularizer as R
from tests.regularize import test_oracles as T


@pytest.fixture(scope="module")
def case():
    return T.Case("llama")


def test_sign_flip_in_scores_is_caught(case, monkeypatch):
    ghost = K.ghost_scores
    monkeypatch.setattr(K, "ghost_scores", lambda dy, x, t: -ghost(dy, x, t))
    with pytest.raises(AssertionError):
        T.test_kernels_equal_brute_force_scores(case, "ghost")
    with pytest.raises(AssertionError):
        T.test_layerwise_equals_brute_force(case, "topk", 0.5)


def test_dropping_the_token_rescale_is_caught(case, monkeypatch):
    monkeypatch.setattr(R, "example_weights", lambda pi, units, normaliser: pi)
    with pytest.raises(AssertionError):
        T.test_curated_gradient_is_token_mean_gradient_of_subset(case)
    with pytest.raises(AssertionError):
        T.test_global_equals_brute_force(case, "topk", 0.5)


def test_dropping_the_merged_correction_is_caught(case, monkeypatch):
    new_pass = R.Regularizer._new_pass

    def no_correction(self, units, n_target):
        p = new_pass(self, units, n_target)
        p.score_scale = 1.0
        return p

    monkeypatch.setattr(R.Regularizer, "_new_pass", no_correction)
    with pytest.raises(AssertionError):
        T.test_merged_equals_separate(case, "layerwise_subset")


def test_curating_grad_input_is_caught(case, monkeypatch):
    """If selection leaked into upstream flow (grad_input from kept rows only), invariant 13 fails."""
    from drpt_ray.regularize import hooks

    backward = hooks._HookedLinear.backward

    def leaky(ctx, dy):
        gx, *rest = backward(ctx, dy)
        return (gx * 0.5 if gx is not None else None, *rest)

    monkeypatch.setattr(hooks._HookedLinear, "backward", staticmethod(leaky))
    with pytest.raises(AssertionError):
        T.test_grad_input_of_every_hooked_layer_is_unchanged(case)
