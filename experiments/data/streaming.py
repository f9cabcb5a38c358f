"""Streaming tf.data pipeline for datasets too large to hold in memory (ImageNet, Imagenette).

Determinism and resume: examples are read in file order (no file shuffling), shuffled with a
seed derived from (seed, epoch) in a `shuffle_buffer`-sized window, grouped into GLOBAL batches
of still-encoded images, and only then sliced per host, skipped to `start_step`, decoded and
augmented. Each example's augmentation uses a stateless seed derived from
(seed, epoch, position in the epoch), so `train_batches(e, k)` equals the tail of
`train_batches(e)` and P hosts together see the single-host batch. Skipping reads but does not
decode the skipped records.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from experiments import extras
from experiments.data import augment, sources
from experiments.data.base import DATASETS, DatasetInfo, batch_sizes, check_epoch_step
from experiments.data.base import eval_split_field as _eval_split


def _get(config, name, default=None):
  value = config.get(name, default) if hasattr(config, 'get') else getattr(config, name, default)
  return default if value is None and default is not None else value


def _epoch_seed(seed: int, epoch: int, stream: int) -> int:
  return int(np.random.SeedSequence([int(seed), int(epoch), stream]).generate_state(1)[0])


class StreamingInput:
  """tfds dataset -> deterministic, host-sliced, prefetched tf.data batches (numpy out)."""

  def __init__(self, config, name: str, *, process_index: int = 0, process_count: int = 1):
    tf = extras.import_tensorflow(f'Streaming tfds dataset {name!r} through tf.data')
    self._tf = tf
    defaults = DATASETS[name]
    self._full_name = sources.tfds_name(name, _get(config, 'tfds_config'))
    self._data_dir = _get(config, 'data_dir')
    self._builder = sources.tfds_builder(
      self._full_name, self._data_dir, _get(config, 'manual_dir'),
      bool(_get(config, 'download', False)),
    )
    self.global_batch_size = _get(config, 'global_batch_size', 128)
    self.eval_batch_size = _get(config, 'eval_batch_size', self.global_batch_size)
    self.process_index, self.process_count = process_index, process_count
    self.local_batch_size, self.local_eval_batch_size = batch_sizes(
      self.global_batch_size, self.eval_batch_size, process_index, process_count
    )
    self._image_size = _get(config, 'image_size', defaults['image_size'])
    self._kind = augment.check_kind(_get(config, 'augment', defaults['augment']))
    self.mean = np.asarray(_get(config, 'mean', defaults['mean']), np.float32)
    self.std = np.asarray(_get(config, 'std', defaults['std']), np.float32)
    self._seed = int(_get(config, 'seed', 0))
    self._shuffle_buffer = int(_get(config, 'shuffle_buffer', 16_384))
    threads = _get(config, 'streaming_threads')
    self._parallel = tf.data.AUTOTUNE if threads is None else int(threads)

    train_split = _get(config, 'train_split', defaults['train_split'])
    eval_split = _eval_split(config)
    if eval_split == 'auto':
      eval_split = defaults['eval_split']
    if eval_split is None:
      # Carve the first examples in file order (tfds shuffles examples when it prepares a
      # dataset), by skip/take rather than split slicing so it also works on mocked data.
      fraction = _get(config, 'holdout_fraction', 0.1)
      total = self._count(train_split, 0, -1)
      num_holdout = int(round(fraction * total))
      if not 0 < num_holdout < total:
        raise ValueError(
          f'config.holdout_fraction={fraction} of {total} training examples leaves '
          f'{total - num_holdout} train and {num_holdout} eval examples; choose a fraction that '
          'leaves both non-empty (e.g. 0.1), or set config.eval_split to an existing split.'
        )
      # (split, first example, number of examples or -1 for the rest)
      self._train_part, self._eval_part = (train_split, num_holdout, -1), (train_split, 0,
                                                                           num_holdout)
    else:
      self._train_part, self._eval_part = (train_split, 0, -1), (eval_split, 0, -1)
    num_train, num_eval = self._count(*self._train_part), self._count(*self._eval_part)
    self.info = DatasetInfo(
      num_classes=self._builder.info.features['label'].num_classes,
      image_shape=(self._image_size, self._image_size, 3),
      num_train=num_train,
      num_eval=num_eval,
      class_names=tuple(self._builder.info.features['label'].names),
    )
    self.steps_per_epoch = num_train // self.global_batch_size
    if self.steps_per_epoch == 0:
      raise ValueError(
        f'config.global_batch_size={self.global_batch_size} exceeds the {num_train} training '
        'examples: lower the batch size or use more training data.'
      )
    self.eval_steps = -(-num_eval // self.eval_batch_size)

  # -- reading --------------------------------------------------------------------------------

  def _encoded(self, split: str, first: int = 0, count: int = -1):
    """(encoded image bytes, int32 label) in file order, decoding skipped; examples
    [first, first + count) of `split` (count -1: to the end)."""
    import tensorflow_datasets as tfds

    tf = self._tf
    read_config = tfds.ReadConfig(shuffle_seed=0, interleave_cycle_length=16)
    ds = sources.tfds_as_dataset(
      self._builder, split, name=self._full_name, data_dir=self._data_dir,
      shuffle_files=False, decoders={'image': tfds.decode.SkipDecoding()},
      read_config=read_config,
    )
    ds = ds.map(lambda ex: (ex['image'], tf.cast(ex['label'], tf.int32)))
    ds = ds.skip(first).take(count)
    options = tf.data.Options()
    options.deterministic = True
    return ds.with_options(options)

  def _count(self, split: str, first: int, count: int) -> int:
    n = int(self._encoded(split, first, count).cardinality())
    if n >= 0:
      return n
    total = int(self._builder.info.splits[split].num_examples)
    rest = max(0, total - first)
    return rest if count < 0 else min(count, rest)

  # -- per-example preprocessing --------------------------------------------------------------

  def _decode(self, encoded):
    tf = self._tf
    image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
    return tf.ensure_shape(image, (None, None, 3))

  def _resize_centre(self, image, size: int):
    return sources._resize_and_centre_crop(image, size)  # noqa: SLF001 - shared helper

  def _train_example(self, encoded, label, key):
    """Decodes and augments one example; key: int64 (2,) stateless seed."""
    tf = self._tf
    size = self._image_size
    image = self._decode(encoded)
    seeds = tf.random.experimental.stateless_split(key, 3)
    if self._kind == 'imagenet':
      begin, extent, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.shape(image), tf.zeros((1, 0, 4), tf.float32), seed=seeds[0],
        min_object_covered=0.0, aspect_ratio_range=(3 / 4, 4 / 3), area_range=(0.08, 1.0),
        max_attempts=10, use_image_if_no_bounding_boxes=True,
      )
      image = tf.slice(image, begin, extent)
      image = tf.image.resize(image, (size, size), method='bilinear')
      image = tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)
    else:
      image = self._resize_centre(image, size)
      if self._kind == 'cifar':
        padded = tf.pad(image, [[augment.CIFAR_PAD] * 2, [augment.CIFAR_PAD] * 2, [0, 0]])
        image = tf.image.stateless_random_crop(padded, (size, size, 3), seed=seeds[1])
    if self._kind != 'none':
      image = tf.image.stateless_random_flip_left_right(image, seed=seeds[2])
    return self._normalize(image), label

  def _eval_example(self, encoded, label, mask):
    size = self._image_size
    image = self._decode(encoded)
    if self._kind == 'imagenet':
      image = self._resize_centre(image, augment.resize_size(size))
      offset = (augment.resize_size(size) - size) // 2
      image = image[offset:offset + size, offset:offset + size]
    else:
      image = self._resize_centre(image, size)
    return self._normalize(image), label, mask

  def _normalize(self, image):
    tf = self._tf
    image = tf.cast(image, tf.float32) / 255.0
    return (image - self.mean) / self.std

  def _numpy(self, ds, keys):
    for values in ds.as_numpy_iterator():
      yield dict(zip(keys, values, strict=True))

  # -- batches --------------------------------------------------------------------------------

  def train_batches(self, epoch: int, start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """This host's slice of each global batch of `epoch`, from `start_step` on (see module)."""
    check_epoch_step(epoch, start_step, self.steps_per_epoch)
    tf = self._tf
    g, local = self.global_batch_size, self.local_batch_size
    first = self.process_index * local
    ds = self._encoded(*self._train_part)
    ds = ds.shuffle(
      self._shuffle_buffer, seed=_epoch_seed(self._seed, epoch, 0) % (2**31),
      reshuffle_each_iteration=False,
    )
    ds = ds.batch(g, drop_remainder=True).take(self.steps_per_epoch).enumerate()
    ds = ds.skip(start_step)
    epoch_key = _epoch_seed(self._seed, epoch, 1) % (2**31)

    def host_slice(step, batch):
      encoded, labels = batch
      position = step * g + first + tf.range(local, dtype=tf.int64)
      keys = tf.stack([tf.fill([local], tf.constant(epoch_key, tf.int64)), position], axis=1)
      return encoded[first:first + local], labels[first:first + local], keys

    ds = ds.map(host_slice).unbatch()
    ds = ds.map(self._train_example, num_parallel_calls=self._parallel, deterministic=True)
    ds = ds.batch(local, drop_remainder=True).prefetch(2)
    return self._numpy(ds, ('image', 'label'))

  def eval_batches(self) -> Iterator[dict[str, np.ndarray]]:
    """This host's slice of each global eval batch; the last is padded, 'mask' marks real."""
    tf = self._tf
    e, local = self.eval_batch_size, self.local_eval_batch_size
    first = self.process_index * local
    ds = self._encoded(*self._eval_part).map(lambda x, y: (x, y, tf.constant(1.0)))
    pad = self.eval_steps * e - self.info.num_eval
    if pad:  # copies of the first example, masked out, so every host gets full batches
      filler = ds.take(1).map(lambda x, y, m: (x, y, tf.constant(0.0))).repeat(pad)
      ds = ds.concatenate(filler)
    ds = ds.batch(e, drop_remainder=True)
    ds = ds.map(lambda x, y, m: (x[first:first + local], y[first:first + local],
                                 m[first:first + local])).unbatch()
    ds = ds.map(self._eval_example, num_parallel_calls=self._parallel, deterministic=True)
    ds = ds.batch(local, drop_remainder=True).prefetch(2)
    return self._numpy(ds, ('image', 'label', 'mask'))
