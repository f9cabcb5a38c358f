"""Types shared by the input pipelines."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any, Protocol

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
  """The interface every pipeline implements (see experiments.data.pipeline)."""

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


# Per-dataset defaults. mean/std in [0, 1] units; None = computed from the training images.
_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
DATASETS: dict[str, dict[str, Any]] = {
  'shapes': dict(image_size=32, augment='none', mean=None, std=None),
  'cifar10': dict(
    image_size=32, augment='cifar', mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616),
    train_split='train', eval_split='test', streaming=False,
  ),
  'cifar100': dict(
    image_size=32, augment='cifar', mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762),
    train_split='train', eval_split='test', streaming=False,
  ),
  'imagenet2012': dict(
    image_size=224, augment='imagenet', mean=_IMAGENET_MEAN, std=_IMAGENET_STD,
    train_split='train', eval_split='validation', streaming=True,
  ),
  'imagenette': dict(
    image_size=224, augment='imagenet', mean=_IMAGENET_MEAN, std=_IMAGENET_STD,
    train_split='train', eval_split='validation', streaming=True,
  ),
  # image_size None: the images' own (square) size, else 224; augment None: 'cifar' for images
  # up to 64 px, else 'imagenet'.
  'folder': dict(image_size=None, augment=None, mean=None, std=None),
}

