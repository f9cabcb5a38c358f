"""Where examples come from: shapes, image folders (or .tar.gz of one) and tfds datasets.

Each loader returns uint8 arrays for the in-memory pipeline; `resolve_folder` and
`tfds_builder` are shared with the streaming pipeline.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import random
import shutil
import subprocess
import tarfile
import tempfile
from typing import Any

import numpy as np

from experiments import extras
from experiments.data import augment, decode
from experiments.data.settings import DataSettings

_ARCHIVE_SUFFIXES = ('.tar.gz', '.tgz', '.tar')
_IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png')
DEFAULT_CACHE_DIR = os.path.join('~', '.cache', 'cbam_jax')
EVAL_SPLIT_CANDIDATES = ('test', 'validation', 'val')


def default_cache_dir() -> str:
  return os.path.expanduser(os.environ.get('CBAM_JAX_CACHE', DEFAULT_CACHE_DIR))


# ---------------------------------------------------------------------------------------------
# Image folders


def _has_images(directory: str) -> bool:
  with os.scandir(directory) as entries:
    return any(e.is_file() and e.name.lower().endswith(_IMAGE_SUFFIXES) for e in entries)


def _subdirs(directory: str) -> list[str]:
  with os.scandir(directory) as entries:
    return sorted(e.path for e in entries if e.is_dir() and not e.name.startswith('.'))


def _is_image_folder_root(directory: str) -> bool:
  """True if directory/split/class/ holds images for some split and class."""
  return any(_has_images(c) for s in _subdirs(directory) for c in _subdirs(s))


def _find_root(directory: str) -> str:
  """Descends through single-child wrapper directories (e.g. an archive's top folder)."""
  current = directory
  while not _is_image_folder_root(current):
    children = _subdirs(current)
    if len(children) != 1:
      raise FileNotFoundError(
        f'{directory} is not an image folder: expected the layout root/<split>/<class>/*.jpg '
        '(e.g. root/train/cat/0001.jpg). Point config.folder at such a root or a .tar.gz of it.'
      )
    current = children[0]
  return current


def _extract(archive: str, directory: str) -> None:
  """Extracts with the system `tar` when there is one (about 3x faster than tarfile on 50k
  small files), else with tarfile's 'data' filter (no absolute paths, links out, devices)."""
  tar_binary = shutil.which('tar')
  if tar_binary:
    result = subprocess.run(
      [tar_binary, '-xf', archive, '-C', directory, '--no-same-owner', '--no-same-permissions'],
      capture_output=True, text=True, check=False,
    )
    if result.returncode == 0:
      return
    raise OSError(f'Could not extract {archive}: {result.stderr.strip()[-500:]}')
  with tarfile.open(archive) as tar:
    tar.extractall(directory, filter='data')


def extract_archive(archive: str, cache_dir: str | None = None) -> str:
  """Extracts `archive` once into the cache and returns the extracted directory.

  The target name hashes the archive's absolute path, size and mtime, so a changed archive is
  extracted afresh. Extraction goes to a temporary sibling that is renamed into place, so
  concurrent processes never see a half-extracted tree.
  """
  archive = os.path.abspath(os.path.expanduser(archive))
  stat = os.stat(archive)
  key = hashlib.sha256(f'{archive}|{stat.st_size}|{stat.st_mtime_ns}'.encode()).hexdigest()[:12]
  name = os.path.basename(archive)
  for suffix in _ARCHIVE_SUFFIXES:
    if name.endswith(suffix):
      name = name[: -len(suffix)]
      break
  cache_dir = os.path.expanduser(cache_dir) if cache_dir else default_cache_dir()
  target = os.path.join(cache_dir, f'{name}-{key}')
  if os.path.isdir(target):
    return target
  os.makedirs(cache_dir, exist_ok=True)
  staging = tempfile.mkdtemp(prefix=f'.{name}-', dir=cache_dir)
  try:
    _extract(archive, staging)
    try:
      os.rename(staging, target)
    except OSError:  # another process won the race: use its copy
      if not os.path.isdir(target):
        raise
  finally:
    if os.path.isdir(staging):
      shutil.rmtree(staging, ignore_errors=True)
  return target


def archive_image_counts(archive: str) -> dict[str, dict[str, int]]:
  """{split: {class: number of images}} of an archived image folder, without extracting.

  Members are expected at [wrapper/]split/class/file; wrapper folders are skipped.
  """
  counts: dict[str, dict[str, int]] = {}
  with tarfile.open(os.path.expanduser(archive)) as tar:
    paths = [m.name for m in tar if m.isfile() and m.name.lower().endswith(_IMAGE_SUFFIXES)]
  if not paths:
    return counts
  parts = [p.strip('/').split('/') for p in paths]
  depth = min(len(p) for p in parts)
  for p in parts:
    split, cls = p[depth - 3], p[depth - 2]
    counts.setdefault(split, {}).setdefault(cls, 0)
    counts[split][cls] += 1
  return {s: dict(sorted(c.items())) for s, c in sorted(counts.items())}


def resolve_folder(path: str | None, cache_dir: str | None = None) -> str:
  """Returns the root (root/split/class/*.jpg) of an image folder or a .tar.gz of one."""
  if not path:
    raise ValueError(
      "config.dataset='folder' needs config.folder: the root of an image folder laid out "
      'root/<split>/<class>/*.jpg, or a .tar.gz of one.'
    )
  expanded = os.path.expanduser(path)
  if not os.path.exists(expanded):
    raise FileNotFoundError(
      f'config.folder={path!r} does not exist: point it at an image folder root '
      '(root/<split>/<class>/*.jpg) or a .tar.gz of one (e.g. '
      '../shared/data/cifar10-jpeg-train.tar.gz).'
    )
  if os.path.isfile(expanded):
    if not expanded.endswith(_ARCHIVE_SUFFIXES):
      raise ValueError(
        f'config.folder={path!r} is a file but not an archive ({", ".join(_ARCHIVE_SUFFIXES)}).'
      )
    expanded = extract_archive(expanded, cache_dir)
  return _find_root(expanded)


def scan_folder(root: str) -> dict[str, dict[str, list[os.DirEntry]]]:
  """{split: {class: image entries sorted by name}} of an image folder root.

  Hidden (dot) directories and files are ignored. Raises ValueError naming a class directory
  without images; files without an image suffix are skipped, counted and reported once.
  """
  layout: dict[str, dict[str, list[os.DirEntry]]] = {}
  skipped: list[str] = []
  for split_dir in _subdirs(root):
    classes = {}
    for class_dir in _subdirs(split_dir):
      with os.scandir(class_dir) as entries:
        visible = [e for e in entries if e.is_file() and not e.name.startswith('.')]
      files = [e for e in visible if e.name.lower().endswith(_IMAGE_SUFFIXES)]
      skipped.extend(e.path for e in visible if not e.name.lower().endswith(_IMAGE_SUFFIXES))
      if not files:
        raise ValueError(
          f'Class directory {class_dir} has no images ({", ".join(_IMAGE_SUFFIXES)}): add '
          'images or remove the directory (an empty class would be a label no example has).'
        )
      classes[os.path.basename(class_dir)] = sorted(files, key=lambda e: e.name)
    if classes:
      layout[os.path.basename(split_dir)] = classes
  if skipped:
    print(f'Image folder {root}: skipped {len(skipped)} file(s) without an image suffix '
          f'({", ".join(_IMAGE_SUFFIXES)}), e.g. {skipped[0]}.', flush=True)
  return layout


def folder_class_names(layout: dict[str, dict[str, list[os.DirEntry]]]) -> tuple[str, ...]:
  """Sorted class names over all splits (label i = the i-th), as tfds ImageFolder has them."""
  return tuple(sorted({cls for classes in layout.values() for cls in classes}))


def folder_examples(
  layout: dict[str, dict[str, list[os.DirEntry]]], split: str
) -> tuple[list[str], np.ndarray]:
  """(paths, int32 labels) of a split in tfds ImageFolder's order.

  ImageFolder lists classes and files sorted, then shuffles the list with
  `random.Random(split)`; keeping that order keeps every batch of runs made on the former
  TensorFlow path.
  """
  index = {cls: i for i, cls in enumerate(folder_class_names(layout))}
  examples = [(entry.path, index[cls]) for cls, entries in sorted(layout[split].items())
              for entry in entries]
  random.Random(split).shuffle(examples)
  return [p for p, _ in examples], np.array([label for _, label in examples], np.int32)


def decode_folder_split(paths: list[str], size: int, num_threads: int | None = None) -> np.ndarray:
  """Decodes and resizes (shorter side + centre crop) images into uint8 (N, size, size, 3).

  Decoding runs on grain's thread pool (simplejpeg and numpy release the GIL); the order is
  the order of `paths`.
  """
  import grain

  def load(path: str) -> np.ndarray:
    return decode.resize_shorter_and_centre_crop(decode.decode_image(path), size)

  out = np.zeros((len(paths), size, size, 3), np.uint8)
  if not paths:
    return out
  threads = num_threads or min(16, max(2, os.cpu_count() or 1))
  dataset = grain.MapDataset.source(paths).map(load).to_iter_dataset(
    grain.ReadOptions(num_threads=threads, prefetch_buffer_size=4 * threads)
  )
  for i, image in enumerate(dataset):
    out[i] = image
  return out


def native_size(paths: list[str]) -> int | None:
  """The common side of the first 8 images if they are square, else None."""
  sizes = {decode.image_size(p) for p in paths[:8]}
  if len(sizes) == 1:
    (h, w), = sizes
    if h == w:
      return int(h)
  return None


_ARRAY_CACHE_VERSION = 1


def array_cache_path(
  root: str,
  layout: dict[str, dict[str, list[os.DirEntry]]],
  splits: list[str],
  image_size: int | None,
  augment_kind: str | None,
  cache_dir: str | None,
) -> str:
  """Cache file for a folder's decoded arrays; the name changes when any file does."""
  digest = hashlib.sha256()
  digest.update(repr((_ARRAY_CACHE_VERSION, os.path.abspath(root), splits, image_size,
                      augment_kind, sorted({c for s in layout.values() for c in s}))).encode())
  for split in splits:
    for cls, entries in sorted(layout[split].items()):
      for entry in entries:
        stat = entry.stat()
        digest.update(f'{split}/{cls}/{entry.name}|{stat.st_size}|{stat.st_mtime_ns}\n'.encode())
  cache_dir = os.path.expanduser(cache_dir) if cache_dir else default_cache_dir()
  return os.path.join(cache_dir, 'arrays', f'folder-{digest.hexdigest()[:16]}.npz')


def load_array_cache(path: str) -> dict[str, np.ndarray] | None:
  if not os.path.exists(path):
    return None
  try:
    with np.load(path, allow_pickle=False) as data:
      return {k: data[k] for k in data.files}
  except (OSError, ValueError):  # truncated or foreign file: decode again
    return None


def save_array_cache(path: str, arrays: dict[str, np.ndarray]) -> None:
  """Writes atomically (temporary file + rename); a failure only costs the cache."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  handle, staging = tempfile.mkstemp(suffix='.npz', dir=os.path.dirname(path))
  try:
    with os.fdopen(handle, 'wb') as f:
      np.savez(f, **arrays)
    os.replace(staging, path)
  except OSError:
    if os.path.exists(staging):
      os.remove(staging)


def pick_splits(
  available: list[str], train_split: str | None, eval_split: str | None, where: str
) -> tuple[str, str | None]:
  """Chooses (train split, eval split or None to carve a holdout).

  eval_split: a split name, 'auto' (the first of test/validation/val that exists, else
  carve) or None (always carve from train).
  """
  if train_split is None:
    train_split = 'train' if 'train' in available or len(available) != 1 else available[0]
  if train_split not in available:
    raise ValueError(
      f'{where} has no split {train_split!r} (it has {sorted(available)}); set '
      'config.train_split to one of them.'
    )
  if eval_split == 'auto':
    eval_split = next((s for s in EVAL_SPLIT_CANDIDATES if s in available), None)
  elif eval_split is not None and eval_split not in available:
    raise ValueError(
      f'{where} has no split {eval_split!r} (it has {sorted(available)}); set '
      'config.eval_split to one of them, or to None to hold out part of the train split.'
    )
  return train_split, eval_split


def _resize_and_centre_crop(image, size: int):
  """tf: resize the shorter side to `size` and centre-crop size x size (no-op if already)."""
  tf = extras.import_tensorflow('Reading a tfds dataset through tf.data')

  shape = tf.shape(image)
  h, w = shape[0], shape[1]

  def resize():
    scale = tf.cast(size, tf.float32) / tf.cast(tf.minimum(h, w), tf.float32)
    new_h = tf.maximum(size, tf.cast(tf.round(tf.cast(h, tf.float32) * scale), tf.int32))
    new_w = tf.maximum(size, tf.cast(tf.round(tf.cast(w, tf.float32) * scale), tf.int32))
    resized = tf.image.resize(image, (new_h, new_w), antialias=True)
    resized = tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), tf.uint8)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return resized[top:top + size, left:left + size]

  same = tf.logical_and(tf.equal(h, size), tf.equal(w, size))
  out = tf.cond(same, lambda: image, resize)
  return tf.ensure_shape(out, (size, size, 3))


def dataset_to_arrays(ds, size: int) -> dict[str, np.ndarray]:
  """Decodes a tf.data dataset of {'image', 'label'} into uint8 (N, size, size, 3) arrays."""
  tf = extras.import_tensorflow('Reading a tfds dataset through tf.data')

  ds = ds.map(
    lambda ex: (_resize_and_centre_crop(ex['image'], size), tf.cast(ex['label'], tf.int32)),
    num_parallel_calls=tf.data.AUTOTUNE,
    deterministic=True,
  )
  images, labels = [], []
  for image, label in ds.batch(2048).prefetch(2).as_numpy_iterator():
    images.append(image)
    labels.append(label)
  if not images:
    return {'image': np.zeros((0, size, size, 3), np.uint8), 'label': np.zeros(0, np.int32)}
  return {'image': np.concatenate(images), 'label': np.concatenate(labels)}


# ---------------------------------------------------------------------------------------------
# tfds datasets


def tfds_name(dataset: str, tfds_config: str | None) -> str:
  return f'{dataset}/{tfds_config}' if tfds_config else dataset


def tfds_builder(name: str, data_dir: str | None, manual_dir: str | None, download: bool):
  """A prepared tfds builder, or a FileNotFoundError that says how to get the data."""
  import tensorflow_datasets as tfds

  builder = tfds.builder(name, data_dir=data_dir)
  if download:
    download_config = tfds.download.DownloadConfig(manual_dir=manual_dir) if manual_dir else None
    builder.download_and_prepare(download_config=download_config)
  return builder


def tfds_as_dataset(builder, split: str, *, name: str, data_dir: str | None, **kwargs):
  """builder.as_dataset with a clear error when the dataset has not been prepared."""
  try:
    return builder.as_dataset(split=split, **kwargs)
  except (AssertionError, FileNotFoundError) as e:
    manual = (
      ' ImageNet needs a manual download: put ILSVRC2012_img_{train,val}.tar in '
      'config.manual_dir (default <data_dir>/downloads/manual).'
      if name.startswith('imagenet2012') else ''
    )
    raise FileNotFoundError(
      f'tfds dataset {name!r} is not prepared in data_dir={data_dir or "~/tensorflow_datasets"}.'
      f' Set config.download=True (or run `tfds build {name.split("/")[0]}`), or point '
      f'config.data_dir at a directory that has it.{manual}'
    ) from e
  except ValueError as e:
    if 'split' in str(e).lower():
      raise ValueError(
        f'tfds dataset {name!r} has no split {split!r}; set config.train_split / '
        'config.eval_split to one of its splits.'
      ) from e
    raise


class RecordSource:
  """Examples [first, first + count) of a random-access tfds split, decoded on demand.

  Implements what ArrayInput reads from its data: len(), `side` (stored image side),
  `has_box` and `take(index)` -> {'image' uint8 (B, side, side, 3), 'label' int32 (B,)}.
  Pickles with its data source, so grain worker processes can read it.
  """

  has_box = False

  def __init__(self, data_source, first: int, count: int, side: int, name: str):
    self._source, self._first, self._count = data_source, first, count
    self.side, self._name = side, name

  def __len__(self) -> int:
    return self._count

  def take(self, index: np.ndarray) -> dict[str, np.ndarray]:
    images = np.zeros((len(index), self.side, self.side, 3), np.uint8)
    labels = np.zeros(len(index), np.int32)
    for row, i in enumerate(index):
      record = self._source[self._first + int(i)]
      image = decode.decode_bytes(record['image'], f'{self._name}[{self._first + int(i)}]')
      images[row] = decode.resize_shorter_and_centre_crop(image, self.side)
      labels[row] = int(record['label'])
    return {'image': images, 'label': labels}


def tfds_data_source(builder, split: str, *, name: str, data_dir: str | None):
  """builder.as_data_source with the images left encoded; None if the dataset is stored as
  TFRecord only (no random access); FileNotFoundError if it is not prepared."""
  import tensorflow_datasets as tfds

  try:
    return builder.as_data_source(split=split, decoders={'image': tfds.decode.SkipDecoding()})
  except NotImplementedError:
    return None
  except (AssertionError, FileNotFoundError, ValueError, KeyError) as e:
    raise FileNotFoundError(
      f'tfds dataset {name!r} is not prepared in data_dir={data_dir or "~/tensorflow_datasets"}'
      f' ({type(e).__name__}: {e}). Set config.download=True (or run `tfds build '
      f'{name.split("/")[0]} --file_format=array_record`), or point config.data_dir at a '
      'directory that has it.'
    ) from e


def tfds_splits(builder) -> list[str]:
  return list(builder.info.splits.keys())


@dataclasses.dataclass(frozen=True)
class TfdsSettings:
  """A tfds dataset's builder, and the side its examples are stored at (in-memory and
  streaming)."""
  builder: Any
  full_name: str
  data_dir: str | None
  stored_size: int  # the side examples are stored at before augmentation


def tfds_settings(settings: DataSettings) -> TfdsSettings:
  """The builder and stored size of the tfds dataset ``settings`` asks for."""
  full_name = tfds_name(settings.dataset, settings.tfds_config)
  builder = tfds_builder(full_name, settings.data_dir, settings.manual_dir, settings.download)
  return TfdsSettings(
      builder=builder, full_name=full_name, data_dir=settings.data_dir,
      stored_size=augment.stored_size(settings.augment, settings.image_size))
