"""Input pipelines: the built-in 'shapes' dataset, CIFAR, ImageNet, Imagenette, image folders.

Contract (what training code relies on):

  config = default_data_config()        # ml_collections.ConfigDict, fields documented below
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
from experiments.data.base import DATASETS, DatasetInfo, Input, config_get
from experiments.data.base import eval_split_field as _eval_split
from experiments.data.in_memory import ArrayInput

__all__ = [
  'DATASETS',
  'DatasetInfo',
  'Input',
  'create_input',
  'default_data_config',
  'split_holdout',
]

def default_data_config() -> ml_collections.ConfigDict:
  """Data fields with their defaults; training configs build on this.

  Fields:
    dataset: 'shapes' | 'cifar10' | 'cifar100' | 'imagenet2012' | 'imagenette' | 'folder'.
    data_dir: tfds data dir (None: tfds default, ~/tensorflow_datasets).
    manual_dir: tfds manual download dir for imagenet2012 (None: <data_dir>/downloads/manual).
    download: let tfds download and prepare missing datasets (off: fail with instructions).
    tfds_config: tfds builder config, e.g. 'full-size-v2' for imagenette (None: default).
    folder: image folder root (root/<split>/<class>/*.jpg) or a .tar.gz of one.
    cache_dir: where archives are extracted (None: $CBAM_JAX_CACHE or ~/.cache/cbam_jax).
    cache_arrays: keep a folder's decoded uint8 arrays in cache_dir (a .npy per split, keyed
      by the folder's file list, sizes and mtimes), so later runs skip JPEG decoding and TF.
    train_split: None = the dataset's 'train'.
    eval_split: 'auto' = the dataset's test/validation split if it has one, else a holdout;
      a split name; or None = always carve `holdout_fraction` of train (stratified,
      deterministic from `split_seed`, disjoint from the remaining train examples).
    holdout_fraction, split_seed: the carved holdout.
    image_size: None = the dataset's default (shapes/CIFAR 32, ImageNet 224).
    augment: None = dataset default; 'none' | 'flip' | 'cifar' | 'imagenet'.
    mean, std: per-channel normalisation in [0, 1] units (None = dataset default / computed).
    global_batch_size, eval_batch_size (None = global_batch_size), seed (order + augment).
    input_threads: grain threads computing batches ahead of the training step (0 = inline,
      in the training loop's thread).
    input_workers: grain worker processes computing batches instead of threads (0 = threads);
      for streaming datasets, where decoding dominates (in-memory arrays are copied to
      each worker).
    prefetch_batches: how many batches the threads (each worker) may compute ahead.
    shapes: the procedural dataset (see experiments.data.shapes.generate): num_train, num_eval,
      seed, num_classes, scale_range, num_strokes, num_blobs, num_decoys, noise_std.
  """
  # Unset fields are typed placeholders (None), so the command line can set them.
  placeholder = ml_collections.config_dict.placeholder
  config = ml_collections.ConfigDict()
  config.dataset = 'shapes'
  config.data_dir = placeholder(str)
  config.manual_dir = placeholder(str)
  config.download = False
  config.tfds_config = placeholder(str)
  config.folder = placeholder(str)
  config.cache_dir = placeholder(str)
  config.cache_arrays = True
  config.train_split = placeholder(str)
  config.eval_split = 'auto'
  config.holdout_fraction = 0.1
  config.split_seed = 0
  config.image_size = placeholder(int)
  config.augment = placeholder(str)
  config.mean = placeholder(tuple)
  config.std = placeholder(tuple)
  config.global_batch_size = 128
  config.eval_batch_size = placeholder(int)
  config.seed = 0
  config.input_threads = 2
  config.input_workers = 0
  config.prefetch_batches = 2
  config.shapes = ml_collections.ConfigDict(
    dict(
      num_train=10_000,
      num_eval=2_000,
      seed=0,
      num_classes=len(shapes_lib.CLASS_NAMES),
      scale_range=(0.12, 0.25),
      num_strokes=3,
      num_blobs=3,
      num_decoys=2,
      noise_std=0.06,
    )
  )
  return config


_get = config_get


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


def _load_shapes(config) -> tuple[dict, dict, tuple[str, ...], int]:
  sc = _get(config, 'shapes', ml_collections.ConfigDict())
  defaults = default_data_config().shapes
  opt = {k: _get(sc, k, defaults[k]) for k in defaults}
  image_size = _get(config, 'image_size', DATASETS['shapes']['image_size'])
  eval_split = _eval_split(config)
  if eval_split not in ('auto', None, 'test', 'validation'):
    raise ValueError(
      f"'shapes' has no split {eval_split!r}: set config.eval_split to 'auto' (generate "
      'config.shapes.num_eval separate examples) or None (carve config.holdout_fraction).'
    )
  carve = eval_split is None
  num_total = opt['num_train'] + (0 if carve else opt['num_eval'])
  data = shapes_lib.generate(
    num_total,
    seed=opt['seed'],
    image_size=image_size,
    num_classes=opt['num_classes'],
    scale_range=tuple(opt['scale_range']),
    num_strokes=opt['num_strokes'],
    num_blobs=opt['num_blobs'],
    num_decoys=opt['num_decoys'],
    noise_std=opt['noise_std'],
  )
  if carve:
    train_index, eval_index = split_holdout(
      data['label'], _get(config, 'holdout_fraction', 0.1), _get(config, 'split_seed', 0)
    )
  else:
    train_index = np.arange(opt['num_train'])
    eval_index = np.arange(opt['num_train'], num_total)
  class_names = shapes_lib.CLASS_NAMES[: opt['num_classes']]
  return _take(data, train_index), _take(data, eval_index), class_names, image_size


def _load_folder(config) -> tuple[dict, dict, tuple[str, ...], int, str]:
  root = sources.resolve_folder(_get(config, 'folder'), _get(config, 'cache_dir'))
  layout = sources.scan_folder(root)
  train_split, eval_split = sources.pick_splits(
    list(layout), _get(config, 'train_split'), _eval_split(config),
    where=f'image folder {root}',
  )
  splits = [train_split] + ([eval_split] if eval_split else [])
  cache_file = None
  if _get(config, 'cache_arrays', True):
    cache_file = sources.array_cache_path(
      root, layout, splits, _get(config, 'image_size'), _get(config, 'augment'),
      _get(config, 'cache_dir'),
    )
  cached = sources.load_array_cache(cache_file) if cache_file else None
  if cached is None:
    cached = _decode_folder(config, layout, splits)
    if cache_file:
      sources.save_array_cache(cache_file, cached)
  class_names = tuple(str(name) for name in cached['class_names'])
  image_size, kind = int(cached['image_size']), str(cached['kind'])
  train = {'image': cached[f'{train_split}/image'], 'label': cached[f'{train_split}/label']}
  if eval_split is None:
    train_index, eval_index = split_holdout(
      train['label'], _get(config, 'holdout_fraction', 0.1), _get(config, 'split_seed', 0)
    )
    train, evaluation = _take(train, train_index), _take(train, eval_index)
  else:
    evaluation = {'image': cached[f'{eval_split}/image'], 'label': cached[f'{eval_split}/label']}
  return train, evaluation, class_names, image_size, kind


def _decode_folder(config, layout, splits: list[str]) -> dict[str, Any]:
  """Decodes the folder's splits into uint8 arrays (+ metadata), in tfds ImageFolder's order
  and with its pixels (experiments.data.decode), without TensorFlow."""
  examples = {split: sources.folder_examples(layout, split) for split in splits}
  image_size = _get(config, 'image_size')
  if image_size is None:
    image_size = sources.native_size(examples[splits[0]][0]) or 224
  kind = _get(config, 'augment') or ('cifar' if image_size <= 64 else 'imagenet')
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


def _load_tfds_in_memory(config, name: str) -> tuple[dict, dict, tuple[str, ...], int, str]:
  tfds = sources.tfds_settings(config, name)
  builder, full_name, data_dir, size = (tfds.builder, tfds.full_name, tfds.data_dir,
                                        tfds.stored_size)
  image_size, kind = tfds.image_size, tfds.kind
  train_split, eval_split = tfds.train_split, tfds.eval_split

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
      train['label'], _get(config, 'holdout_fraction', 0.1), _get(config, 'split_seed', 0)
    )
    train, evaluation = _take(train, train_index), _take(train, eval_index)
  else:
    evaluation = load(eval_split)
  class_names = tuple(builder.info.features['label'].names)
  return train, evaluation, class_names, image_size, kind


def create_input(config, *, process_index: int = 0, process_count: int = 1) -> Input:
  """Builds the input pipeline described by `config` (see `default_data_config`).

  Raises:
    ValueError: unknown dataset or augment, batch sizes that do not divide process_count or
      exceed the data, a holdout that leaves nothing.
    FileNotFoundError: a missing folder/archive or an unprepared tfds dataset.
  """
  name = _get(config, 'dataset', 'shapes')
  if name not in DATASETS:
    raise ValueError(
      f'Unknown dataset {name!r}; set config.dataset to one of {sorted(DATASETS)} '
      "(an image folder or .tar.gz of one: dataset='folder', folder=PATH)."
    )
  global_batch_size = _get(config, 'global_batch_size', 128)
  eval_batch_size = _get(config, 'eval_batch_size', global_batch_size)
  # Fail on batch sizes before loading anything.
  from experiments.data.base import batch_sizes

  batch_sizes(global_batch_size, eval_batch_size, process_index, process_count)
  defaults = DATASETS[name]
  if defaults.get('streaming'):
    from experiments.data import streaming

    return streaming.create_streaming_input(
      config, name, process_index=process_index, process_count=process_count
    )
  if name == 'shapes':
    train, evaluation, class_names, image_size = _load_shapes(config)
    kind = augment.check_kind(_get(config, 'augment', defaults['augment']))
  elif name == 'folder':
    train, evaluation, class_names, image_size, kind = _load_folder(config)
  else:
    train, evaluation, class_names, image_size, kind = _load_tfds_in_memory(config, name)
  mean, std = _get(config, 'mean', defaults['mean']), _get(config, 'std', defaults['std'])
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
    global_batch_size=global_batch_size,
    eval_batch_size=eval_batch_size,
    seed=_get(config, 'seed', 0),
    process_index=process_index,
    process_count=process_count,
    num_threads=_get(config, 'input_threads', 2),
    prefetch=_get(config, 'prefetch_batches', 2),
    num_workers=_get(config, 'input_workers', 0),
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
