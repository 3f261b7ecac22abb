"""Retry delays: the documented range, the cap, and that backoff's generators produce them."""

from __future__ import annotations

import itertools
import statistics
from typing import Any

import backoff
import pytest

from stroma import retry
from stroma.failures import FailurePolicy
from stroma.retry import max_delay, retry_delays

DRAWS = 2_000
RETRIES = 10


def _bound(policy: FailurePolicy, k: int) -> float:
    """The documented upper bound of retry k's delay."""
    return min(policy.max_backoff_seconds, policy.backoff_seconds * 2 ** (k - 1))


@pytest.mark.parametrize(
    ("base", "cap"),
    [(1.0, 30.0), (0.5, 4.0), (0.01, 0.05), (2.0, 2.0)],
)
def test_every_delay_is_within_the_documented_range(base: float, cap: float) -> None:
    policy = FailurePolicy(max_retries=RETRIES, backoff_seconds=base, max_backoff_seconds=cap)
    samples: dict[int, list[float]] = {k: [] for k in range(1, RETRIES + 1)}
    for _ in range(DRAWS):
        for k, delay in zip(range(1, RETRIES + 1), policy.delays()):
            samples[k].append(delay)
    for k, values in samples.items():
        bound = _bound(policy, k)
        assert all(0.0 <= value <= bound for value in values), (k, bound, max(values))
        # Full jitter: the draws spread over the whole window, not bunched at one end.
        assert max(values) > 0.9 * bound
        assert min(values) < 0.1 * bound
        assert statistics.fmean(values) == pytest.approx(bound / 2, rel=0.15)


def test_the_cap_holds_for_late_retries() -> None:
    policy = FailurePolicy(max_retries=100, backoff_seconds=1.0, max_backoff_seconds=5.0)
    late = list(itertools.islice(policy.delays(), 100))
    assert max(late) <= 5.0
    bounds = list(itertools.islice(retry_delays(policy, jitter=False), 100))
    assert bounds[:4] == [1.0, 2.0, 4.0, 5.0]
    assert set(bounds[3:]) == {5.0}


def test_unjittered_sequence_is_the_bounds() -> None:
    policy = FailurePolicy(backoff_seconds=0.5, max_backoff_seconds=4.0)
    assert list(itertools.islice(retry_delays(policy, jitter=False), 6)) == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert [max_delay(policy, k) for k in range(1, 7)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]


def test_max_delay_rejects_retry_zero() -> None:
    with pytest.raises(ValueError, match="retry_number"):
        max_delay(FailurePolicy(), 0)


def test_zero_backoff_never_sleeps_and_never_overflows() -> None:
    policy = FailurePolicy(max_retries=5, backoff_seconds=0.0)
    assert set(itertools.islice(policy.delays(), 5_000)) == {0.0}


def test_subnormal_backoff_reaches_the_cap_without_overflow() -> None:
    policy = FailurePolicy(backoff_seconds=5e-324, max_backoff_seconds=1.0)
    bounds = list(itertools.islice(retry_delays(policy, jitter=False), 1_200))
    assert bounds[-1] == 1.0
    assert all(0.0 <= value <= 1.0 for value in bounds)


def test_each_call_starts_a_fresh_sequence() -> None:
    policy = FailurePolicy(backoff_seconds=1.0, max_backoff_seconds=8.0)
    first = retry_delays(policy, jitter=False)
    assert [next(first), next(first), next(first)] == [1.0, 2.0, 4.0]
    assert next(retry_delays(policy, jitter=False)) == 1.0


def test_delays_come_from_backoffs_generators(monkeypatch: pytest.MonkeyPatch) -> None:
    expo_calls: list[dict[str, Any]] = []
    jitter_inputs: list[float] = []
    real_expo = backoff.expo

    def spy_expo(**kwargs: Any) -> Any:
        expo_calls.append(kwargs)
        return real_expo(**kwargs)

    def fake_jitter(value: float) -> float:
        jitter_inputs.append(value)
        return value / 4

    monkeypatch.setattr(retry.backoff, "expo", spy_expo)
    monkeypatch.setattr(retry.backoff, "full_jitter", fake_jitter)
    policy = FailurePolicy(backoff_seconds=0.25, max_backoff_seconds=1.0)
    delays = list(itertools.islice(policy.delays(), 4))
    assert expo_calls == [{"base": 2, "factor": 0.25, "max_value": 1.0}]
    assert jitter_inputs == [0.25, 0.5, 1.0, 1.0]
    assert delays == [0.0625, 0.125, 0.25, 0.25]
