"""Streaming pipeline for datasets too large to hold in memory (ImageNet, Imagenette).

Examples are read by index from the dataset's tfds ArrayRecord files (`as_data_source`, no
TensorFlow), decoded (experiments.data.decode), resized to the stored size and augmented by
the same batch code as the in-memory pipeline (experiments.data.in_memory.ArrayInput): batch
k of an epoch is a pure function of (seed, epoch, k), host p reads and decodes only its rows,
and grain worker processes (config.input_workers) compute batches ahead. Resume is starting
at step k; nothing else is skipped or read.
"""

from __future__ import annotations

import numpy as np

from experiments.data import sources
from experiments.data.in_memory import ArrayInput
from experiments.data.settings import DataSettings


def _data_source(builder, split: str, *, name: str, data_dir: str | None):
  data = sources.tfds_data_source(builder, split, name=name, data_dir=data_dir)
  if data is None:
    raise FileNotFoundError(
      f'tfds dataset {name!r} in data_dir={data_dir or "~/tensorflow_datasets"} is stored as '
      'TFRecord only; streaming reads ArrayRecord files. Prepare it with '
      f'`tfds build {name.split("/")[0]} --file_format=array_record` (building needs '
      "TensorFlow: pip install -e '.[tf]')."
    )
  return data


def create_streaming_input(settings: DataSettings, *, process_index: int = 0,
                           process_count: int = 1) -> ArrayInput:
  """A tfds dataset as an ArrayInput whose examples are read and decoded per batch."""
  tfds = sources.tfds_settings(settings)
  builder, full_name, data_dir, side = (tfds.builder, tfds.full_name, tfds.data_dir,
                                        tfds.stored_size)
  train_split, eval_split = settings.train_split, settings.eval_split

  def source(split, first=0, count=None):
    data = _data_source(builder, split, name=full_name, data_dir=data_dir)
    count = len(data) - first if count is None else count
    return sources.RecordSource(data, first, count, side, f'{full_name}/{split}')

  if eval_split is None:
    # Carve the first examples in file order (tfds shuffles examples when it prepares a
    # dataset), so no pass over the labels is needed.
    fraction = settings.holdout_fraction
    total = len(_data_source(builder, train_split, name=full_name, data_dir=data_dir))
    num_holdout = int(round(fraction * total))
    if not 0 < num_holdout < total:
      raise ValueError(
        f'config.holdout_fraction={fraction} of {total} training examples leaves '
        f'{total - num_holdout} train and {num_holdout} eval examples; choose a fraction that '
        'leaves both non-empty (e.g. 0.1), or set config.eval_split to an existing split.'
      )
    train = source(train_split, num_holdout)
    evaluation = source(train_split, 0, num_holdout)
  else:
    train, evaluation = source(train_split), source(eval_split)
  return ArrayInput(
    train=train,
    eval=evaluation,
    class_names=tuple(builder.info.features['label'].names),
    image_size=settings.image_size,
    augment_kind=settings.augment,
    mean=np.asarray(settings.mean, np.float32),
    std=np.asarray(settings.std, np.float32),
    global_batch_size=settings.global_batch_size,
    eval_batch_size=settings.eval_batch_size,
    seed=settings.seed,
    process_index=process_index,
    process_count=process_count,
    num_threads=settings.input_threads,
    prefetch=settings.prefetch_batches,
    num_workers=settings.input_workers,
  )
