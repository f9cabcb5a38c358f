"""Types shared by the input pipelines."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Protocol

import numpy as np


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What a model and a training loop need to know about a dataset."""

  num_classes: int
  image_shape: tuple[int, int, int]  # (H, W, C) of the batches' images
  num_train: int
  num_eval: int
  class_names: tuple[str, ...]


class Input(Protocol):
  """The interface every pipeline implements (see experiments.input_pipeline)."""

  info: DatasetInfo
  mean: np.ndarray  # (C,) per-channel normalisation the batches carry, in [0, 1] units
  std: np.ndarray  # (C,)
  steps_per_epoch: int
  local_batch_size: int
  eval_steps: int

  def train_batches(self, epoch: int, start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
    ...

  def eval_batches(self) -> Iterator[dict[str, np.ndarray]]:
    ...


def batch_sizes(
  global_batch_size: int, eval_batch_size: int, process_index: int, process_count: int
) -> tuple[int, int]:
  """Validates batch sizes against the process layout; returns (local train, local eval)."""
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(
      f'process_index={process_index} must be in [0, process_count={process_count}).'
    )
  for name, size in (('global_batch_size', global_batch_size),
                     ('eval_batch_size', eval_batch_size)):
    if not isinstance(size, (int, np.integer)) or size < 1:
      raise ValueError(f'config.{name} must be a positive int, got {size!r}.')
    if size % process_count:
      raise ValueError(
        f'config.{name}={size} is not divisible by process_count={process_count}; set it to '
        f'a multiple of {process_count} (e.g. {process_count * max(1, size // process_count)}).'
      )
  return global_batch_size // process_count, eval_batch_size // process_count


def check_epoch_step(epoch: int, start_step: int, steps_per_epoch: int) -> None:
  if epoch < 0:
    raise ValueError(f'epoch must be >= 0, got {epoch}.')
  if not 0 <= start_step <= steps_per_epoch:
    raise ValueError(f'start_step must be in [0, steps_per_epoch={steps_per_epoch}], got '
                     f'{start_step}.')


def eval_split_field(config) -> str | None:
  """config.eval_split, where None is meaningful (carve a holdout); 'auto' when absent."""
  if hasattr(config, 'get'):
    return config.get('eval_split', 'auto')
  return getattr(config, 'eval_split', 'auto')
