"""Batches computed ahead on grain, in order: what every pipeline's iterators run on.

A pipeline describes step k's batch as a pure function `make_batch(k)`; grain maps it over
the steps and computes up to `buffer_size` batches ahead on `num_threads` threads (numpy
augmentation, JPEG decoding and array gathers release the GIL), overlapping input with the
training step. Because each batch depends only on its step, resuming at step k is starting
the range at k; no iterator state needs checkpointing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TypeVar

T = TypeVar('T')


def batches_ahead(make_batch: Callable[[int], T], start: int, stop: int, *, num_threads: int,
                  buffer_size: int, num_workers: int = 0) -> Iterator[T]:
  """make_batch(k) for k in [start, stop), in order.

  num_threads 0 computes them inline; num_workers > 0 computes them in that many grain
  worker processes instead (make_batch must pickle), each `buffer_size` batches ahead.
  """
  import grain

  if num_threads < 0 or num_workers < 0 or buffer_size < 1:
    raise ValueError(f'config.input_threads={num_threads} and config.input_workers='
                     f'{num_workers} must be >= 0, config.prefetch_batches={buffer_size} >= 1.')
  dataset = grain.MapDataset.range(start, stop).map(make_batch)
  # Explicit options everywhere: grain's defaults (16 threads, 500 elements ahead) would hold
  # hundreds of batches.
  inline = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
  if num_workers:
    from absl import flags

    if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; outside an absl app
      flags.FLAGS.mark_as_parsed()  # (tests, notebooks) their defaults are what we want
    return iter(dataset.to_iter_dataset(inline).mp_prefetch(grain.MultiprocessingOptions(
      num_workers=num_workers, per_worker_buffer_size=buffer_size)))
  if num_threads == 0:
    return iter(dataset.to_iter_dataset(inline))
  return iter(dataset.to_iter_dataset(
    grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=buffer_size)))
