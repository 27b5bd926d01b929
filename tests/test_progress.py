"""The steady-state ETA, driven by a fake clock: warm-up, evaluation pauses, resumed runs."""

from __future__ import annotations

import pytest

from dlm.train.progress import WARMUP_STEPS, EtaEstimator, steady_step_seconds


def drive(
    eta: EtaEstimator,
    durations: list[float],
    t0: float = 1000.0,
    first_step: int = 0,
    pauses: dict[int, float] | None = None,
) -> float:
    """Run fake steps of the given durations; `pauses[k]` seconds of evaluation after step k. Returns now."""
    now = t0
    eta.start(now, step=first_step)
    for i, d in enumerate(durations, start=first_step + 1):
        now += d
        eta.step(i, now, tokens=i * 1000)
        if pauses and i in pauses:
            eta.pause(now, now + pauses[i])
            now += pauses[i]
    return now


def test_slow_warmup_steady_eta_is_right_and_cumulative_average_is_not():
    # 100 steps: the first 3 take 8x the steady 1 s (allocation, first-touch). We stand at step 10.
    total, steady = 100, 1.0
    durations = [8 * steady] * 3 + [steady] * 7
    eta = EtaEstimator(total, warmup_steps=3)
    now = drive(eta, durations)
    true_remaining = (total - 10) * steady
    assert eta.eta(now) == pytest.approx(true_remaining, rel=0.10)
    # Why: elapsed / steps * remaining = 31 / 10 * 90 = 279 s, three times the truth.
    cumulative = eta.cumulative_eta(now)
    assert abs(cumulative - true_remaining) / true_remaining > 0.10
    assert cumulative == pytest.approx(31 / 10 * 90)


def test_eval_pause_does_not_inflate_eta():
    durations = [2.0] * 3 + [1.0] * 20
    plain, paused = EtaEstimator(100), EtaEstimator(100)
    now_plain = drive(plain, durations)
    now_paused = drive(paused, durations, pauses={12: 20.0})  # a 20 s evaluation after step 12
    assert paused.eta(now_paused) == pytest.approx(plain.eta(now_plain)) == pytest.approx(77.0)
    # Frequent evaluation (most intervals hold a pause): a median alone would not save the estimate.
    frequent = EtaEstimator(100)
    now = drive(frequent, durations, pauses={k: 20.0 for k in range(4, 23) if k % 3})
    assert frequent.eta(now) == pytest.approx(77.0)
    # The pause is also left out when it is reported only after the step that contains it.
    late = EtaEstimator(100)
    now = 0.0
    late.start(now)
    for i in range(1, 24):
        now += 1.0 + (20.0 if i == 13 else 0.0)
        late.step(i, now)
        if i == 13:
            late.pause(now - 21.0, now - 1.0)
    assert late.eta(now) == pytest.approx(77.0)


def test_exclude_seconds_of_the_step_under_way():
    eta = EtaEstimator(50, warmup_steps=0)
    now = drive(eta, [1.0] * 5)
    eta.exclude(30.0)  # a checkpoint save inside step 6
    eta.step(6, now + 31.0)
    assert eta.seconds_per_step() == pytest.approx(1.0)


def test_resumed_run_counts_from_its_own_first_step():
    eta = EtaEstimator(1000, warmup_steps=3)
    now = drive(eta, [10.0] * 3 + [2.0] * 10, first_step=500)
    assert eta.eta(now) == pytest.approx((1000 - 513) * 2.0)
    assert eta.rate() == pytest.approx(0.5)


def test_without_start_the_first_step_only_opens_the_clock():
    eta = EtaEstimator(100, warmup_steps=2)
    eta.step(41, 0.0)  # resumed at 40; step 41's duration is unknown
    eta.step(42, 9.0)  # still warm-up
    assert eta.eta(9.0) is None
    eta.step(43, 10.0)
    eta.step(44, 11.0)
    assert eta.seconds_per_step() == pytest.approx(1.0)


def test_no_eta_during_warmup_then_steady_median_resists_outliers():
    eta = EtaEstimator(100, warmup_steps=3)
    now = drive(eta, [5.0, 5.0, 5.0])
    assert eta.eta(now) is None and eta.rate() is None
    for i, d in enumerate([1.0, 1.1, 0.9, 9.0, 1.0], start=4):  # one slow step (a GC pause)
        now += d
        eta.step(i, now)
    assert eta.seconds_per_step() == pytest.approx(1.0)


def test_sparse_marks_are_split_per_step():
    eta = EtaEstimator(100, warmup_steps=0)
    eta.start(0.0)
    eta.step(10, 20.0)  # fed only on logging steps
    eta.step(20, 40.0)
    assert eta.seconds_per_step() == pytest.approx(2.0)
    assert eta.eta(40.0) == pytest.approx(160.0)


def test_eta_counts_down_within_a_step_and_ends_at_zero():
    eta = EtaEstimator(20, warmup_steps=0)
    now = drive(eta, [2.0] * 10)
    assert eta.eta(now) == pytest.approx(20.0)
    assert eta.eta(now + 1.0) == pytest.approx(19.0)
    assert eta.eta(now + 50.0) == pytest.approx(18.0)  # a stalled step never counts as more than one
    done = EtaEstimator(5, warmup_steps=0)
    assert done.eta(drive(done, [1.0] * 5)) == 0.0


def test_tokens_per_second_excludes_warmup_and_pauses():
    eta = EtaEstimator(100, warmup_steps=3)
    now = drive(eta, [4.0] * 3 + [0.5] * 10, pauses={8: 30.0})
    assert eta.tokens_per_second() == pytest.approx(1000 / 0.5)
    assert eta.eta(now) == pytest.approx(87 * 0.5)


def test_window_follows_a_rate_change():
    eta = EtaEstimator(1000, warmup_steps=0, window=10)
    now = drive(eta, [1.0] * 30 + [3.0] * 10)
    assert eta.seconds_per_step() == pytest.approx(3.0)
    assert eta.eta(now) == pytest.approx(960 * 3.0)


def test_out_of_order_steps_are_refused():
    eta = EtaEstimator(10)
    eta.start(0.0)
    eta.step(1, 1.0)
    with pytest.raises(ValueError):
        eta.step(1, 2.0)
    with pytest.raises(ValueError):
        eta.step(2, 0.5)


def test_uneven_steps_average_and_stalls_are_dropped():
    """Batches padded to their longest row make steps uneven: the rate is their mean, not the median."""
    eta = EtaEstimator(100, warmup_steps=0)
    now = drive(eta, [2.5, 2.5, 0.5] * 3)
    assert eta.seconds_per_step() == pytest.approx(5.5 / 3)
    now += 40.0  # a 40 s stall (another job took the CPU)
    eta.step(10, now)
    assert eta.seconds_per_step() == pytest.approx(5.5 / 3)


def test_steady_step_seconds_is_the_median_after_the_warmup_steps():
    """The one definition the run summary, the `step_time` event and the benchmark share."""
    assert WARMUP_STEPS == 2
    assert steady_step_seconds([]) is None
    assert steady_step_seconds([9.0, 9.0, 1.0, 2.0, 30.0]) == 2.0  # warm-up left out; the median ignores a stall
    assert steady_step_seconds([9.0, 1.0]) == 5.0  # no step after the warm-up yet: all of them
    assert steady_step_seconds([9.0, 1.0, 2.0], warmup=0) == 2.0
