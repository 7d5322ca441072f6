"""The methods added for the evaluation: CoS and fixed-weight logit arithmetic (mix:w)."""

import numpy as np
import pytest

from costeer import SteeringParams, UserError
from costeer.fusion import fuse_closed_form, local_delta, log_softmax
from costeer.methods import DEFAULT_COS_LAMBDA, make_policy

VOCAB = 5000


def logits(seed: int, n: int = 3) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(VOCAB).astype(np.float32) * 3 for _ in range(n)]


def normalized(policy, z) -> np.ndarray:
    return log_softmax(policy.next_logprobs(z))  # policies may return scores up to a constant


def test_mix_is_cloud_plus_weight_times_local_delta():
    z = logits(0)
    for w in (0.0, 0.5, 1.0, 2.0, -1.0):
        policy = make_policy(f"mix:{w}")
        assert policy.coefficient == w and [(s.role, s.prompt) for s in policy.streams] == [
            ("llm", "public"), ("slm", "private"), ("slm", "public")]
        expected = fuse_closed_form(log_softmax(z[0]), local_delta(z[1], z[2]), w)
        np.testing.assert_allclose(normalized(policy, z), expected, atol=1e-9)


def test_mix_at_costeers_coefficient_is_costeer_and_mix_0_is_the_cloud_model():
    z = logits(1)
    c = SteeringParams().coefficient
    np.testing.assert_allclose(normalized(make_policy(f"mix:{c!r}"), z), normalized(make_policy("costeer"), z), atol=1e-9)
    np.testing.assert_allclose(normalized(make_policy("mix:0"), z), normalized(make_policy("llm"), z[:1]), atol=1e-9)


def test_cos_amplifies_the_device_models_likelihood_gap():
    with_ctx, without = logits(2, 2)
    for name, lam in (("cos", DEFAULT_COS_LAMBDA), ("cos:2.5", 2.5), ("cos:0", 0.0)):
        policy = make_policy(name)
        assert policy.roles == {"slm"} and [s.prompt for s in policy.streams] == ["private", "public"]
        gap = log_softmax(with_ctx) - log_softmax(without)
        np.testing.assert_allclose(normalized(policy, [with_ctx, without]),
                                   log_softmax(log_softmax(with_ctx) + lam * gap), atol=1e-9)
    # lambda 0 is the device model with the context, alone
    np.testing.assert_allclose(normalized(make_policy("cos:0"), [with_ctx, without]),
                               normalized(make_policy("slm-context"), [with_ctx]), atol=1e-9)


def test_method_names_are_canonical():
    assert make_policy("mix:1.0").name == "mix:1"
    assert make_policy("mix:0.50").name == "mix:0.5"
    assert make_policy("mix:1.7832568430850784").name == "mix:1.78325684309"
    assert make_policy("cos").name == "cos" and make_policy("cos:2").name == "cos:2"


@pytest.mark.parametrize("name, message", [
    ("mix", "unknown method 'mix'"),
    ("mix:", "expected a finite number"),
    ("mix:abc", "expected a finite number"),
    ("mix:nan", "expected a finite number"),
    ("cos:inf", "expected a finite number"),
    ("magic:1", "unknown method 'magic:1'"),
])
def test_bad_method_names_are_user_errors(name, message):
    with pytest.raises(UserError, match=message):
        make_policy(name)
