"""The benchmarks' one timing harness (experiments/bench/timing.py)."""

from __future__ import annotations

import pytest

from experiments.bench import timing


def _fake_clock(monkeypatch, warm_s: float):
  clock, log = [0.0], []
  monkeypatch.setattr(timing.time, 'perf_counter', lambda: clock[0])
  monkeypatch.setattr(timing, 'WARM_S', warm_s)

  def fake_call(name, seconds):
    def call():
      log.append(name)
      clock[0] += seconds.pop(0)
    return call

  return fake_call, log


def test_interleaved_timing_is_round_robin_with_medians(monkeypatch):
  fake_call, log = _fake_clock(monkeypatch, warm_s=0.02)
  # Untimed calls run until WARM_S has passed: one of 30 ms, or two of 15 ms. Then the
  # timed call: a takes 1, 5 and 2 ms; b 3 ms each time.
  calls = {'a': fake_call('a', [0.03, 1e-3, 0.015, 0.015, 5e-3, 0.03, 2e-3]),
           'b': fake_call('b', [0.03, 3e-3] * 3)}
  times = timing.interleaved_times(calls, rounds=3)
  # Round i of every call before round i + 1 of any.
  assert log == ['a', 'a', 'b', 'b', 'a', 'a', 'a', 'b', 'b', 'a', 'a', 'b', 'b']
  assert timing.median_ms(times) == pytest.approx({'a': 2.0, 'b': 3.0})
  assert timing.min_ms(times) == pytest.approx({'a': 1.0, 'b': 3.0})
  assert timing.ratios(timing.median_ms(times), 'b') == pytest.approx({'a': 2 / 3, 'b': 1.0})


def test_calls_per_round_are_timed_together_and_averaged(monkeypatch):
  fake_call, log = _fake_clock(monkeypatch, warm_s=0.0)
  # One untimed call, then two timed ones (1 + 3 ms, then 2 + 2 ms): 2 ms per call.
  calls = {'a': fake_call('a', [0.05, 1e-3, 3e-3, 0.05, 2e-3, 2e-3])}
  medians = timing.interleaved_median_ms(calls, rounds=2, calls_per_round=2)
  assert log == ['a'] * 6
  assert medians == pytest.approx({'a': 2.0})


@pytest.mark.parametrize('rounds, calls_per_round', [(0, 1), (1, 0)])
def test_no_rounds_is_an_error(rounds, calls_per_round):
  with pytest.raises(ValueError, match='must be >= 1'):
    timing.interleaved_times({'a': lambda: None}, rounds, calls_per_round=calls_per_round)
