"""Input pipelines: the built-in 'shapes' dataset, CIFAR, ImageNet, Imagenette, image folders.

Contract (what training code relies on):

  config = default_data_config()        # ml_collections.ConfigDict: settings.DataSettings' fields
  data = create_input(config, process_index=jax.process_index(),
                      process_count=jax.process_count())
  data.info             # DatasetInfo(num_classes, image_shape, num_train, num_eval, class_names)
  data.steps_per_epoch  # num_train // global_batch_size (remainder dropped)
  data.local_batch_size # global_batch_size // process_count
  data.eval_steps       # ceil(num_eval / eval_batch_size)
  for batch in data.train_batches(epoch, start_step=0):
    batch['image']      # float32 (local_batch, H, W, C), normalised with per-dataset mean/std
    batch['label']      # int32 (local_batch,)
    batch['box']        # 'shapes' only: float32 (local_batch, 4) = (y0, x0, y1, x1) in pixels
  for batch in data.eval_batches():
    batch['mask']       # float32 (local_batch,): 1 real example, 0 padding of the last batch

Training batches are a pure function of (config.seed, epoch, step): `train_batches(e, k)` yields
exactly the tail of `train_batches(e)` (bit-exact resume), and host p of P gets rows
[p * local, (p + 1) * local) of each global batch, so P hosts see the single-host batch.

Small datasets (shapes, CIFAR, image folders) are held in memory as uint8 and augmented per
batch in numpy (experiments.data.in_memory); ImageNet-scale datasets are read by index from
tfds ArrayRecord files and decoded per batch (experiments.data.streaming) by the same batch
code. Batches are computed ahead of the training step on grain threads or worker processes
(experiments.data.loader; config.input_threads, input_workers, prefetch_batches). Measure with

  python -m experiments.data.pipeline --dataset folder \
      --folder ../shared/data/cifar10-jpeg-train.tar.gz --bench 50
"""

from __future__ import annotations

import collections
import importlib.util
import time
from typing import Any

import ml_collections
import numpy as np
from absl import flags

from experiments import cli
from experiments.data import augment, sources
from experiments.data import shapes as shapes_lib
from experiments.data.base import DATASETS, DatasetInfo, Input, batch_sizes
from experiments.data.in_memory import ArrayInput
from experiments.data.settings import DataSettings, default_data_config

__all__ = [
  'DATASETS',
  'DataSettings',
  'DatasetInfo',
  'Input',
  'create_input',
  'default_data_config',
  'split_holdout',
]

def split_holdout(
  labels: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
  """Stratified, deterministic split of indices into (train, holdout), both sorted.

  Each class contributes round(fraction * its count) examples to the holdout.
  """
  if not 0.0 < fraction < 1.0:
    raise ValueError(
      f'config.holdout_fraction={fraction} must be in (0, 1) to carve a validation split from '
      'train; or set config.eval_split to an existing split.'
    )
  rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x401D]))
  holdout = []
  for cls in np.unique(labels):
    members = np.flatnonzero(labels == cls)
    take = int(round(fraction * len(members)))
    holdout.append(rng.permutation(members)[:take])
  holdout = np.sort(np.concatenate(holdout)) if holdout else np.zeros(0, np.int64)
  train = np.setdiff1d(np.arange(len(labels)), holdout)
  if len(holdout) == 0 or len(train) == 0:
    raise ValueError(
      f'config.holdout_fraction={fraction} of {len(labels)} training examples leaves '
      f'{len(train)} train and {len(holdout)} eval examples; choose a fraction that leaves both '
      'non-empty (e.g. 0.1), or set config.eval_split to an existing split.'
    )
  return train, holdout


def _take(data: dict[str, np.ndarray], index: np.ndarray) -> dict[str, np.ndarray]:
  return {k: v[index] for k, v in data.items()}


def _channel_stats(images: np.ndarray, max_images: int = 10_000) -> tuple[np.ndarray, np.ndarray]:
  """Per-channel mean/std in [0, 1] units from (the first max_images of) uint8 images."""
  sample = images[:max_images].reshape(-1, images.shape[-1]).astype(np.float64) / 255.0
  return sample.mean(axis=0), np.maximum(sample.std(axis=0), 1e-3)


def _load_shapes(settings: DataSettings) -> tuple[dict, dict, tuple[str, ...], int]:
  opt, eval_split = settings.shapes, settings.eval_split
  if eval_split not in ('auto', None, 'test', 'validation'):
    raise ValueError(
      f"'shapes' has no split {eval_split!r}: set config.eval_split to 'auto' (generate "
      'config.shapes.num_eval separate examples) or None (carve config.holdout_fraction).'
    )
  carve = eval_split is None
  num_total = opt.num_train + (0 if carve else opt.num_eval)
  data = shapes_lib.generate(
    num_total,
    seed=opt.seed,
    image_size=settings.image_size,
    num_classes=opt.num_classes,
    scale_range=opt.scale_range,
    num_strokes=opt.num_strokes,
    num_blobs=opt.num_blobs,
    num_decoys=opt.num_decoys,
    noise_std=opt.noise_std,
  )
  if carve:
    train_index, eval_index = split_holdout(
      data['label'], settings.holdout_fraction, settings.split_seed
    )
  else:
    train_index = np.arange(opt.num_train)
    eval_index = np.arange(opt.num_train, num_total)
  class_names = shapes_lib.CLASS_NAMES[: opt.num_classes]
  return _take(data, train_index), _take(data, eval_index), class_names, settings.image_size


def _load_folder(settings: DataSettings) -> tuple[dict, dict, tuple[str, ...], int, str]:
  root = sources.resolve_folder(settings.folder, settings.cache_dir)
  layout = sources.scan_folder(root)
  train_split, eval_split = sources.pick_splits(
    list(layout), settings.train_split, settings.eval_split, where=f'image folder {root}',
  )
  splits = [train_split] + ([eval_split] if eval_split else [])
  cache_file = None
  if settings.cache_arrays:
    cache_file = sources.array_cache_path(
      root, layout, splits, settings.image_size, settings.augment, settings.cache_dir,
    )
  cached = sources.load_array_cache(cache_file) if cache_file else None
  if cached is None:
    cached = _decode_folder(settings, layout, splits)
    if cache_file:
      sources.save_array_cache(cache_file, cached)
  class_names = tuple(str(name) for name in cached['class_names'])
  image_size, kind = int(cached['image_size']), str(cached['kind'])
  train = {'image': cached[f'{train_split}/image'], 'label': cached[f'{train_split}/label']}
  if eval_split is None:
    train_index, eval_index = split_holdout(
      train['label'], settings.holdout_fraction, settings.split_seed
    )
    train, evaluation = _take(train, train_index), _take(train, eval_index)
  else:
    evaluation = {'image': cached[f'{eval_split}/image'], 'label': cached[f'{eval_split}/label']}
  return train, evaluation, class_names, image_size, kind


def _decode_folder(settings: DataSettings, layout, splits: list[str]) -> dict[str, Any]:
  """Decodes the folder's splits into uint8 arrays (+ metadata), in tfds ImageFolder's order
  and with its pixels (experiments.data.decode), without TensorFlow."""
  examples = {split: sources.folder_examples(layout, split) for split in splits}
  image_size = settings.image_size
  if image_size is None:
    image_size = sources.native_size(examples[splits[0]][0]) or 224
  kind = settings.augment or ('cifar' if image_size <= 64 else 'imagenet')
  size = augment.stored_size(augment.check_kind(kind), image_size)
  out: dict[str, Any] = {
    'class_names': np.array(sources.folder_class_names(layout)),
    'image_size': np.int64(image_size),
    'kind': np.array(kind),
  }
  for split, (paths, labels) in examples.items():
    out[f'{split}/image'] = sources.decode_folder_split(paths, size)
    out[f'{split}/label'] = labels
  return out


def _load_tfds_in_memory(settings: DataSettings) -> tuple[dict, dict, tuple[str, ...], int, str]:
  tfds = sources.tfds_settings(settings)
  builder, full_name, data_dir, size = (tfds.builder, tfds.full_name, tfds.data_dir,
                                        tfds.stored_size)
  train_split, eval_split = settings.train_split, settings.eval_split

  def load(split):
    data = sources.tfds_data_source(builder, split, name=full_name, data_dir=data_dir)
    if data is None:  # TFRecord only: read through tf.data (the [tf] extra)
      ds = sources.tfds_as_dataset(
        builder, split, name=full_name, data_dir=data_dir, shuffle_files=False
      )
      return sources.dataset_to_arrays(ds, size)
    return sources.RecordSource(data, 0, len(data), size, f'{full_name}/{split}').take(
      np.arange(len(data)))

  train = load(train_split)
  if eval_split is None:
    train_index, eval_index = split_holdout(
      train['label'], settings.holdout_fraction, settings.split_seed
    )
    train, evaluation = _take(train, train_index), _take(train, eval_index)
  else:
    evaluation = load(eval_split)
  class_names = tuple(builder.info.features['label'].names)
  return train, evaluation, class_names, settings.image_size, settings.augment


def create_input(config, *, process_index: int = 0, process_count: int = 1) -> Input:
  """Builds the input pipeline described by `config` (see `DataSettings`).

  `config` (an ml_collections config or a mapping) is parsed once, here, into the
  `DataSettings` the data code reads.

  Raises:
    ValueError: unknown dataset or augment, a misspelt data field, batch sizes that do not
      divide process_count or exceed the data, a holdout that leaves nothing.
    FileNotFoundError: a missing folder/archive or an unprepared tfds dataset.
  """
  settings = DataSettings.from_config(config)
  # Fail on batch sizes before loading anything.
  batch_sizes(settings.global_batch_size, settings.eval_batch_size, process_index,
              process_count)
  if DATASETS[settings.dataset].get('streaming'):
    from experiments.data import streaming

    return streaming.create_streaming_input(
      settings, process_index=process_index, process_count=process_count
    )
  if settings.dataset == 'shapes':
    train, evaluation, class_names, image_size = _load_shapes(settings)
    kind = settings.augment
  elif settings.dataset == 'folder':
    train, evaluation, class_names, image_size, kind = _load_folder(settings)
  else:
    train, evaluation, class_names, image_size, kind = _load_tfds_in_memory(settings)
  mean, std = settings.mean, settings.std
  if mean is None or std is None:
    computed_mean, computed_std = _channel_stats(train['image'])
    mean = computed_mean if mean is None else mean
    std = computed_std if std is None else std
  return ArrayInput(
    train=train,
    eval=evaluation,
    class_names=class_names,
    image_size=image_size,
    augment_kind=kind,
    mean=np.asarray(mean, np.float32),
    std=np.asarray(std, np.float32),
    global_batch_size=settings.global_batch_size,
    eval_batch_size=settings.eval_batch_size,
    seed=settings.seed,
    process_index=process_index,
    process_count=process_count,
    num_threads=settings.input_threads,
    prefetch=settings.prefetch_batches,
    num_workers=settings.input_workers,
  )


# ---------------------------------------------------------------------------------------------
# Benchmark entry point


PROG = 'python -m experiments.data.pipeline'


def _load_config_file(path: str) -> ml_collections.ConfigDict:
  spec = importlib.util.spec_from_file_location('_bench_config', path)
  if spec is None or spec.loader is None:
    raise FileNotFoundError(f'--config {path!r}: not a Python file with get_config().')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _parse_value(text: str) -> Any:
  for cast in (int, float):
    try:
      return cast(text)
    except ValueError:
      pass
  return {'none': None, 'true': True, 'false': False}.get(text.lower(), text)


def benchmark(data: Input, num_batches: int, *, step_seconds: float = 0.0) -> dict[str, float]:
  """Times `num_batches` training batches as the training loop takes them.

  step_seconds simulates a training step (sleep) to show how much of the input time the
  pipeline's threads hide.
  """
  results = collections.OrderedDict()
  num_batches = min(num_batches, data.steps_per_epoch)
  iterator = data.train_batches(0)
  start = time.perf_counter()
  waited = 0.0
  for _ in range(num_batches):
    t = time.perf_counter()
    next(iterator)
    waited += time.perf_counter() - t
    if step_seconds:
      time.sleep(step_seconds)
  elapsed = time.perf_counter() - start
  results['batches_per_s'] = num_batches / elapsed
  results['images_per_s'] = num_batches * data.local_batch_size / elapsed
  results['wait_fraction'] = waited / elapsed
  return results


def define_flags(values: flags.FlagValues) -> None:
  flags.DEFINE_string('config', None, 'Python file with get_config() (default: the data '
                      'defaults).', flag_values=values)
  flags.DEFINE_string('dataset', None, 'config.dataset.', flag_values=values)
  flags.DEFINE_string('folder', None, 'config.folder.', flag_values=values)
  flags.DEFINE_integer('batch_size', None, 'config.global_batch_size.', lower_bound=1,
                       flag_values=values)
  flags.DEFINE_multi_string('set', [], 'KEY=VALUE: override a config field, e.g. '
                            '--set augment=none --set shapes.num_train=64.', flag_values=values)
  flags.DEFINE_integer('bench', 50, 'Number of batches to time.', lower_bound=1,
                       flag_values=values)
  flags.DEFINE_float('step_ms', 0.0, 'Simulated training step per batch (ms).', lower_bound=0.0,
                     flag_values=values)


def _override(config: ml_collections.ConfigDict, item: str) -> None:
  """Applies one ``--set KEY=VALUE`` (KEY may be dotted) to ``config``."""
  key, sep, value = item.partition('=')
  if not sep or not key:
    raise cli.UserError(f'--set {item!r}: write KEY=VALUE, e.g. --set augment=none.')
  cli.set_field(config, key, _parse_value(value), f'--set {item!r}')


@cli.command(PROG)
def main(argv: list[str] | None = None) -> None:
  """The ``--bench`` command line (``argv`` without the program name; default
  ``sys.argv[1:]``): times the training batches of a data config."""
  values, _ = cli.parse(argv, define_flags, prog=PROG, usage=__doc__)
  config = _load_config_file(values.config) if values.config else default_data_config()
  if values.dataset:
    config.dataset = values.dataset
  if values.folder:
    config.folder = values.folder
  if values.batch_size:
    config.global_batch_size = values.batch_size
  for item in values.set:
    _override(config, item)
  start = time.perf_counter()
  data = create_input(config)
  setup = time.perf_counter() - start
  print(f'dataset={config.dataset} info={data.info}')
  print(f'setup {setup:.2f} s; steps_per_epoch={data.steps_per_epoch} '
        f'batch={data.local_batch_size}')
  results = benchmark(data, values.bench, step_seconds=values.step_ms / 1000)
  for key, value in results.items():
    print(f'{key}: {value:.3f}' if 'fraction' in key else f'{key}: {value:.1f}')


if __name__ == '__main__':
  main()
