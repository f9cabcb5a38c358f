"""Batches keyed by (seed, epoch, step): numpy batch augmentation over in-memory uint8 arrays
(or over records decoded on demand, experiments.data.streaming).

Fits datasets up to a few GB (shapes, CIFAR, small image folders). Resume at any step is exact
and O(1): the epoch permutation and each step's augmentation depend only on
(seed, epoch, step), never on what was iterated before.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from experiments.data import augment, loader
from experiments.data.base import DatasetInfo, batch_sizes, check_epoch_step

# Distinct streams for the permutation and the augmentations of a step.
_PERMUTATION_STREAM = 0
_AUGMENT_STREAM = 1


def _rng(*key: int) -> np.random.Generator:
  return np.random.default_rng(np.random.SeedSequence([int(k) for k in key]))


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
  """The order in which epoch `epoch` visits the n training examples."""
  return _rng(seed, epoch, _PERMUTATION_STREAM).permutation(n)


class ArraySource:
  """In-memory examples: what ArrayInput reads (len, side, has_box, take); see also
  experiments.data.streaming.RecordSource, which decodes examples on demand."""

  def __init__(self, arrays: dict[str, np.ndarray]):
    self._arrays = arrays
    self.side = arrays['image'].shape[1]
    self.has_box = 'box' in arrays

  def __len__(self) -> int:
    return len(self._arrays['label'])

  def take(self, index: np.ndarray) -> dict[str, np.ndarray]:
    return {k: v[index] for k, v in self._arrays.items()}


class ArrayInput:
  """Training and eval batches from in-memory arrays.

  Args:
    train, eval: dicts with 'image' uint8 (N, S, S, C), 'label' int (N,) and optionally
      'box' float32 (N, 4) = (y0, x0, y1, x1) in stored-image pixels; or sources like
      ArraySource that give such rows by index.
    class_names: names of the classes, index = label.
    image_size: side of the output images (S for 'none'/'flip'/'cifar', cropped for
      'imagenet').
    augment_kind: one of experiments.data.augment.AUGMENT_KINDS (train only; eval is
      deterministic).
    mean, std: (C,) normalisation in [0, 1] units.
    num_threads, prefetch: grain threads computing batches ahead (0: inline) and how many
      batches they may run ahead (experiments.data.loader).
    num_workers: grain worker processes instead of threads (0: threads).
  """

  def __init__(
    self,
    *,
    train: dict[str, np.ndarray],
    eval: dict[str, np.ndarray],  # noqa: A002 (mirrors the split name)
    class_names: tuple[str, ...],
    image_size: int,
    augment_kind: str,
    mean: np.ndarray,
    std: np.ndarray,
    global_batch_size: int,
    eval_batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    num_threads: int = 2,
    prefetch: int = 2,
    num_workers: int = 0,
  ):
    self._ahead = dict(num_threads=int(num_threads), buffer_size=int(prefetch),
                       num_workers=int(num_workers))
    train = ArraySource(train) if isinstance(train, dict) else train
    eval = ArraySource(eval) if isinstance(eval, dict) else eval  # noqa: A001
    self._kind = augment.check_kind(augment_kind)
    self._train, self._eval = train, eval
    self._image_size = image_size
    self.mean = np.asarray(mean, np.float32)
    self.std = np.asarray(std, np.float32)
    self._seed = int(seed)
    self.global_batch_size = global_batch_size
    self.eval_batch_size = eval_batch_size
    self.process_index, self.process_count = process_index, process_count
    self.local_batch_size, self.local_eval_batch_size = batch_sizes(
      global_batch_size, eval_batch_size, process_index, process_count
    )
    num_train, num_eval = len(train), len(eval)
    channels = 3
    self.info = DatasetInfo(
      num_classes=len(class_names),
      image_shape=(image_size, image_size, channels),
      num_train=num_train,
      num_eval=num_eval,
      class_names=tuple(class_names),
    )
    self.steps_per_epoch = num_train // global_batch_size
    if self.steps_per_epoch == 0:
      raise ValueError(
        f'config.global_batch_size={global_batch_size} exceeds the {num_train} training '
        'examples: lower the batch size or use more training data.'
      )
    self.eval_steps = -(-num_eval // eval_batch_size)
    self._has_box = train.has_box

  def _local(self, local_size: int) -> slice:
    """This host's rows of a global batch."""
    start = self.process_index * local_size
    return slice(start, start + local_size)

  def _make_batch(
    self, data: ArraySource, index: np.ndarray, params: dict[str, np.ndarray]
  ) -> dict[str, np.ndarray]:
    rows = data.take(index)
    images = augment.apply(rows['image'], params, self._image_size)
    batch = {
      'image': augment.normalize(images, self.mean, self.std),
      'label': rows['label'].astype(np.int32),
    }
    if self._has_box:
      batch['box'] = augment.transform_boxes(rows['box'], params, self._image_size)
    return batch

  def train_batches(self, epoch: int, start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """Yields this host's slice of each global batch of epoch `epoch`, from `start_step` on.

    Batches: 'image' float32 (local_batch, H, W, C) normalised, 'label' int32 (local_batch,),
    and 'box' float32 (local_batch, 4) when the dataset has boxes.
    """
    check_epoch_step(epoch, start_step, self.steps_per_epoch)
    num_train, g = self.info.num_train, self.global_batch_size
    source_size = self._train.side
    local = self._local(self.local_batch_size)

    order = epoch_permutation(self._seed, epoch, num_train)

    def make_batch(step: int) -> dict[str, np.ndarray]:
      index = order[step * g:(step + 1) * g]
      # Parameters for the whole global batch, then this host's slice: P hosts together
      # see exactly the single-host batch.
      params = augment.sample_train_params(
        _rng(self._seed, epoch, step, _AUGMENT_STREAM), g, self._kind, source_size,
        self._image_size,
      )
      local_params = {k: v[local] for k, v in params.items()}
      return self._make_batch(self._train, index[local], local_params)

    return loader.batches_ahead(make_batch, start_step, self.steps_per_epoch, **self._ahead)

  def eval_batches(self) -> Iterator[dict[str, np.ndarray]]:
    """Yields this host's slice of each global eval batch, in dataset order.

    The last global batch is padded (with copies of example 0) to eval_batch_size; 'mask'
    float32 (local_batch,) is 1 for real examples and 0 for padding.
    """
    num_eval, e = self.info.num_eval, self.eval_batch_size
    source_size = self._eval.side
    local = self._local(self.local_eval_batch_size)

    def make_batch(step: int) -> dict[str, np.ndarray]:
      index = np.arange(step * e, (step + 1) * e)
      mask = (index < num_eval).astype(np.float32)
      index = np.where(index < num_eval, index, 0)[local]
      params = augment.eval_params(len(index), self._kind, source_size, self._image_size)
      batch = self._make_batch(self._eval, index, params)
      batch['mask'] = mask[local]
      return batch

    return loader.batches_ahead(make_batch, 0, self.eval_steps, **self._ahead)
