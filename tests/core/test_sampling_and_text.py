import numpy as np
import pytest

from costeer import SamplingConfig, UserError
from costeer.decoding import TextAssembler
from costeer.fusion import log_softmax
from costeer.sampling import TokenPicker


def test_greedy_is_argmax():
    lp = log_softmax(np.array([0.1, 3.0, 2.9, -1.0]))
    assert TokenPicker(SamplingConfig()).pick(lp) == 1


def test_sampling_is_reproducible_for_a_seed_and_varies_across_seeds():
    lp = log_softmax(np.random.default_rng(0).standard_normal(500))
    def draw(seed):
        picker = TokenPicker(SamplingConfig(1.0, seed=seed))
        return [picker.pick(lp) for _ in range(30)]

    assert draw(7) == draw(7)
    assert draw(7) != draw(8)


def test_top_k_and_top_p_restrict_candidates():
    lp = log_softmax(np.array([5.0, 4.0, 3.0, 0.0, -2.0]))
    top2 = TokenPicker(SamplingConfig(1.0, top_k=2, seed=0))
    assert {top2.pick(lp) for _ in range(200)} == {0, 1}
    # probs ~ [0.66, 0.24, 0.09, ...]: top-p 0.8 keeps the first two
    nucleus = TokenPicker(SamplingConfig(1.0, top_p=0.8, seed=0))
    assert {nucleus.pick(lp) for _ in range(300)} == {0, 1}


def test_low_temperature_concentrates_on_the_mode():
    lp = log_softmax(np.array([1.0, 0.9, 0.8]))
    cold = TokenPicker(SamplingConfig(0.01, seed=1))
    assert {cold.pick(lp) for _ in range(100)} == {0}


@pytest.mark.parametrize("temperature", [5e-324, 1e-300, 9e-6])
def test_a_vanishing_temperature_is_greedy_not_a_crash(temperature):
    # found by fuzzing `costeer proxy`: 5e-324 divided the logits to inf, and inf - inf is NaN
    lp = log_softmax(np.array([1.0, 3.0, 2.9, -1.0]))
    assert SamplingConfig(temperature).greedy and TokenPicker(SamplingConfig(temperature, seed=1)).pick(lp) == 1


@pytest.mark.parametrize("kwargs", [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(top_k=-1)])
def test_bad_sampling_values_are_user_errors(kwargs):
    with pytest.raises(UserError):
        SamplingConfig(**kwargs)


def test_text_assembler_joins_split_utf8_and_holds_back_stop_prefixes():
    t = TextAssembler(stop=["END"])
    emoji = "ü".encode()
    shown = t.add(b"Gr") + t.add(emoji[:1]) + t.add(emoji[1:]) + t.add(b"n E")
    assert "E" not in shown  # could be the start of END
    shown += t.add(b"ND tail")
    assert t.stopped and t.text == "Grün "
    shown += t.finish()
    assert shown == "Grün "


def test_text_assembler_without_stops_streams_everything():
    t = TextAssembler()
    assert t.add(b"ab") == "ab"
    assert t.add(b"c") == "c"
    assert t.finish() == "" and t.text == "abc"
