"""The closed form equals the paper's FTRL loop; bad hyperparameters are refused."""

import math

import numpy as np
import pytest

from costeer import SteeringParams, UserError, fuse_closed_form, fuse_ftrl_loop, local_delta, steering_coefficient
from costeer.fusion import log_softmax

QWEN_VOCAB = 151_936

PARAM_SETS = [
    SteeringParams(20, 2.0, 1.0, 2.0, 10.0),  # the paper's default
    SteeringParams(1, 2.0, 1.0, 2.0, 10.0),  # LightCoSteer
    SteeringParams(50, 1.0, 1.0, 2.0, 10.0),
    SteeringParams(5, 0.5, 3.0, 1.0, 0.3),
    SteeringParams(7, 0.0, 0.5, 0.25, 1.0),
]


def realistic_inputs(seed: int, vocab: int = QWEN_VOCAB) -> tuple[np.ndarray, np.ndarray]:
    """Peaked LLM logits and an SLM pair whose difference is concentrated on a few tokens."""
    rng = np.random.default_rng(seed)
    llm = rng.standard_normal(vocab).astype(np.float32) * 3
    llm[rng.integers(vocab, size=5)] += 15
    slm_without = rng.standard_normal(vocab).astype(np.float32) * 3
    slm_with = slm_without + rng.standard_normal(vocab).astype(np.float32) * 0.5
    slm_with[rng.integers(vocab, size=20)] += 8
    return log_softmax(llm), local_delta(slm_with, slm_without)


@pytest.mark.parametrize("params", PARAM_SETS, ids=lambda p: f"T{p.iterations}-a{p.alpha}-b{p.beta}-l{p.lam}-e{p.eta}")
def test_closed_form_equals_ftrl_loop_on_full_qwen_vocabulary(params):
    for seed in range(2):
        base, delta = realistic_inputs(seed)
        loop = fuse_ftrl_loop(base, delta, params)
        closed = fuse_closed_form(base, delta, params.coefficient)
        assert np.max(np.abs(loop - closed)) <= 1e-5
        assert int(np.argmax(loop)) == int(np.argmax(closed))
        assert np.isclose(np.logaddexp.reduce(closed), 0.0, atol=1e-9)  # a distribution


def test_coefficients_match_reference_table():
    assert steering_coefficient(SteeringParams(20, 2, 1, 2, 10)) == pytest.approx(1.783257, abs=1e-6)
    assert steering_coefficient(SteeringParams(1, 2, 1, 2, 10)) == pytest.approx(0.476190, abs=1e-6)
    assert steering_coefficient(SteeringParams(50, 1, 1, 2, 10)) == pytest.approx(0.918918, abs=1e-6)
    assert steering_coefficient(SteeringParams(5, 0.5, 3, 1, 0.3)) == pytest.approx(3.502684, abs=1e-6)


def test_one_iteration_by_hand():
    # c_2 = (alpha*0 + beta) / (lambda + 1/eta)
    assert steering_coefficient(SteeringParams(1, 2, 1, 2, 10)) == pytest.approx(1 / 2.1)


def test_zero_delta_leaves_the_cloud_distribution_unchanged():
    base, _ = realistic_inputs(3, vocab=1000)
    out = fuse_ftrl_loop(base, np.zeros_like(base), SteeringParams())
    assert np.allclose(out, base, atol=1e-12)


def test_fusion_moves_mass_toward_what_the_context_favours():
    base = log_softmax(np.array([2.0, 1.0, 0.0]))
    delta = np.array([0.0, 0.0, 3.0])
    fused = fuse_closed_form(base, delta, SteeringParams().coefficient)
    assert int(np.argmax(fused)) == 2
    assert np.exp(fused[2]) > np.exp(base[2])


def test_local_delta_is_a_log_ratio_invariant_to_logit_shifts():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal(50), rng.standard_normal(50)
    assert np.allclose(local_delta(a + 7.0, b - 3.0), local_delta(a, b))
    assert np.allclose(local_delta(a, a), 0.0)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(iterations=0), "iterations"),
        (dict(iterations=-3), "iterations"),
        (dict(iterations=2.5), "integer"),
        (dict(lam=0.0), "lambda"),
        (dict(lam=-1.0), "lambda"),
        (dict(eta=0.0), "eta"),
        (dict(alpha=math.nan), "alpha"),
        (dict(beta=math.inf), "beta"),
        (dict(eta=math.inf), "eta"),
    ],
)
def test_invalid_hyperparameters_are_rejected_with_a_clear_message(kwargs, message):
    with pytest.raises(UserError, match=message):
        SteeringParams(**kwargs)
