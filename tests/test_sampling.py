import numpy as np
import pytest

from llava_rt.runtime.sampling import Sampler, SamplingParams


def draws(params, logits, n=4000):
    sampler = Sampler(params)
    return np.bincount([sampler(logits) for _ in range(n)], minlength=len(logits)) / n


def test_greedy_is_argmax():
    logits = np.random.default_rng(0).normal(size=100).astype(np.float32)
    assert Sampler(SamplingParams())(logits) == int(np.argmax(logits))


def test_temperature_matches_softmax():
    logits = np.array([1.0, 2.0, 0.5, -1.0])
    freq = draws(SamplingParams(temperature=0.7, seed=0), logits)
    expected = np.exp(logits / 0.7) / np.exp(logits / 0.7).sum()
    np.testing.assert_allclose(freq, expected, atol=0.03)


def test_top_k_and_top_p_cut_the_tail():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    assert set(np.nonzero(draws(SamplingParams(temperature=1.0, top_k=2, seed=1), logits))[0]) == {0, 1}
    # mass 0.5 + 0.3 covers top_p=0.75: two tokens kept, renormalised to 5/8 and 3/8
    freq = draws(SamplingParams(temperature=1.0, top_p=0.75, seed=2), logits)
    np.testing.assert_allclose(freq, [0.625, 0.375, 0, 0], atol=0.03)
    # a top_p below the first token's mass still keeps it
    assert draws(SamplingParams(temperature=1.0, top_p=0.1, seed=3), logits, n=50)[0] == 1.0


def test_seed_reproduces():
    logits = np.random.default_rng(1).normal(size=50)
    s1, s2 = Sampler(SamplingParams(temperature=1.0, seed=5)), Sampler(SamplingParams(temperature=1.0, seed=5))
    assert [s1(logits) for _ in range(20)] == [s2(logits) for _ in range(20)]


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0.0), dict(top_k=-2), dict(max_new_tokens=0)])
def test_bad_params_rejected(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)
