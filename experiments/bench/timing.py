"""The one timing harness of the benchmarks: warm-up, interleaved rounds, median and min.

Every benchmark script (:mod:`~experiments.bench.benchmark`,
:mod:`~experiments.bench.compare_attention`'s table, :mod:`~experiments.bench.xla_flags`)
times its implementations with :func:`interleaved_times`, so that they all measure the same
way: round ``i`` of every call runs before round ``i + 1`` of any, so a slow phase of a shared
machine (another tenant, memory compaction) slows every implementation alike instead of one
of them, and the ratios between them stay meaningful. Each timed call follows untimed calls
of itself (at least :data:`WARM_S` of them). Calls must block until their work is done
(``jax.block_until_ready``, ``torch.cuda.synchronize``). No JAX or torch here.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any

# Untimed calls of a call before each of its timed ones, seconds. After a parallel region
# PyTorch's OpenMP threads spin for milliseconds, which on a small machine steals the cores
# from whatever runs next; and the allocator and caches should be as this call leaves them
# (a training loop's steady state), not as the previous one did.
WARM_S = 0.025


def interleaved_times(calls: Mapping[str, Callable[[], Any]], rounds: int, *,
                      calls_per_round: int = 1) -> dict[str, list[float]]:
  """Seconds per call of every blocking ``call``, one value per round, timed round-robin.

  In each round every call is warmed (untimed calls for at least :data:`WARM_S`), then
  ``calls_per_round`` calls of it are timed together; the value is their mean.
  """
  if rounds < 1 or calls_per_round < 1:
    raise ValueError(f'rounds={rounds} and calls_per_round={calls_per_round} must be >= 1.')
  times: dict[str, list[float]] = {name: [] for name in calls}
  for _ in range(rounds):
    for name, call in calls.items():
      warm_until = time.perf_counter() + WARM_S
      call()
      while time.perf_counter() < warm_until:
        call()
      start = time.perf_counter()
      for _ in range(calls_per_round):
        call()
      times[name].append((time.perf_counter() - start) / calls_per_round)
  return times


def median_ms(times: Mapping[str, list[float]]) -> dict[str, float]:
  """Median of each call's per-round seconds, in milliseconds."""
  return {name: statistics.median(values) * 1e3 for name, values in times.items()}


def min_ms(times: Mapping[str, list[float]]) -> dict[str, float]:
  """Fastest round of each call, in milliseconds (the least disturbed by other load)."""
  return {name: min(values) * 1e3 for name, values in times.items()}


def interleaved_median_ms(calls: Mapping[str, Callable[[], Any]], rounds: int, *,
                          calls_per_round: int = 1) -> dict[str, float]:
  """Median milliseconds per call of every blocking ``call`` (:func:`interleaved_times`)."""
  return median_ms(interleaved_times(calls, rounds, calls_per_round=calls_per_round))


def ratios(values: Mapping[str, float], baseline: str) -> dict[str, float]:
  """Every value divided by ``values[baseline]``: the numbers to compare across a run."""
  return {name: value / values[baseline] for name, value in values.items()}
