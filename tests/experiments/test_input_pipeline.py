"""Tests for experiments/data/pipeline.py and experiments/data/ (no network)."""

import dataclasses
import os
import re
import tarfile
import time

import numpy as np
import pytest

from experiments.data import augment, sources
from experiments.data import pipeline as ip

SHARED_TARBALL = os.path.join(
  os.path.dirname(__file__), '..', '..', '..', 'shared', 'data', 'cifar10-jpeg-train.tar.gz'
)


def shapes_config(**overrides):
  config = ip.default_data_config()
  config.shapes.num_train = 96
  config.shapes.num_eval = 40
  config.image_size = 16
  config.global_batch_size = 16
  config.eval_batch_size = 16
  config.seed = 3
  config.update(overrides)
  return config


@pytest.fixture(scope='module')
def shapes_input():
  return ip.create_input(shapes_config())


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b, strict=True):
    assert x.keys() == y.keys()
    for key in x:
      np.testing.assert_array_equal(x[key], y[key], err_msg=key)


# -- shapes through create_input ----------------------------------------------------------------


def test_shapes_batches(shapes_input):
  data = shapes_input
  assert data.info.num_train == 96 and data.info.num_eval == 40
  assert data.info.image_shape == (16, 16, 3)
  assert data.info.class_names == ip.shapes_lib.CLASS_NAMES
  assert data.steps_per_epoch == 6 and data.local_batch_size == 16 and data.eval_steps == 3
  batches = list(data.train_batches(0))
  assert len(batches) == 6
  batch = batches[0]
  assert batch['image'].shape == (16, 16, 16, 3) and batch['image'].dtype == np.float32
  assert batch['label'].shape == (16,) and batch['label'].dtype == np.int32
  assert batch['box'].shape == (16, 4) and batch['box'].dtype == np.float32
  # Normalised with statistics of the training images.
  images = np.concatenate([b['image'] for b in batches])
  assert abs(images.mean()) < 0.2 and 0.8 < images.std() < 1.2
  # An epoch visits every training example once (labels are a permutation of train labels).
  labels = np.concatenate([b['label'] for b in batches])
  assert np.bincount(labels, minlength=6).sum() == 96


def test_shapes_eval_batches_padding_and_mask(shapes_input):
  batches = list(shapes_input.eval_batches())
  assert len(batches) == 3
  masks = np.concatenate([b['mask'] for b in batches])
  np.testing.assert_array_equal(masks, (np.arange(48) < 40).astype(np.float32))
  assert all(b['image'].shape == (16, 16, 16, 3) for b in batches)
  assert batches[0]['mask'].dtype == np.float32 and 'box' in batches[0]


def test_shapes_eval_matches_generator():
  config = shapes_config()
  data = ip.create_input(config)
  raw = ip.shapes_lib.generate(136, seed=config.shapes.seed, image_size=16)
  eval_labels = np.concatenate([b['label'] for b in data.eval_batches()])[:40]
  np.testing.assert_array_equal(eval_labels, raw['label'][96:])
  boxes = np.concatenate([b['box'] for b in data.eval_batches()])[:40]
  np.testing.assert_array_equal(boxes, raw['box'][96:])


# -- determinism, resume, multi-host ------------------------------------------------------------


def test_same_seed_same_batches_and_epochs_differ(shapes_input):
  other = ip.create_input(shapes_config())
  assert_batches_equal(list(shapes_input.train_batches(2)), list(other.train_batches(2)))
  a = next(shapes_input.train_batches(0))['label']
  b = next(shapes_input.train_batches(1))['label']
  c = next(ip.create_input(shapes_config(seed=4)).train_batches(0))['label']
  assert not np.array_equal(a, b) and not np.array_equal(a, c)


@pytest.mark.parametrize('augment_kind', ['none', 'cifar', 'imagenet'])
def test_resume_equals_tail(augment_kind):
  data = ip.create_input(shapes_config(augment=augment_kind))
  full = list(data.train_batches(1))
  assert_batches_equal(list(data.train_batches(1, start_step=4)), full[4:])
  assert list(data.train_batches(1, start_step=data.steps_per_epoch)) == []


@pytest.mark.parametrize('augment_kind', ['none', 'cifar'])
def test_process_slices_concatenate_to_global_batch(augment_kind):
  config = shapes_config(augment=augment_kind)
  single = ip.create_input(config)
  hosts = [ip.create_input(config, process_index=p, process_count=2) for p in range(2)]
  assert hosts[0].local_batch_size == 8 and hosts[0].steps_per_epoch == single.steps_per_epoch
  for method, args in (('train_batches', (1,)), ('eval_batches', ())):
    whole = list(getattr(single, method)(*args))
    parts = [list(getattr(h, method)(*args)) for h in hosts]
    joined = [
      {k: np.concatenate([p0[k], p1[k]]) for k in p0}
      for p0, p1 in zip(*parts, strict=True)
    ]
    assert_batches_equal(joined, whole)


def test_eval_is_deterministic_and_unaugmented():
  config = shapes_config(augment='cifar', mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
  data = ip.create_input(config)
  first, second = list(data.eval_batches()), list(data.eval_batches())
  assert_batches_equal(first, second)
  raw = ip.shapes_lib.generate(136, seed=config.shapes.seed, image_size=16)
  images = np.concatenate([b['image'] for b in first])[:40]
  np.testing.assert_allclose(images * 255.0, raw['image'][96:], atol=1e-3)


def test_mean_and_std_are_the_normalisation_of_the_batches():
  # Computed from the training images (shapes has no fixed statistics); visualisation
  # un-normalises with these, so they must be what the batches were normalised with.
  config = shapes_config(augment='cifar')
  data = ip.create_input(config)
  assert data.mean.shape == data.std.shape == (3,)
  assert data.mean.dtype == data.std.dtype == np.float32
  raw = ip.shapes_lib.generate(136, seed=config.shapes.seed, image_size=16)
  images = np.concatenate([b['image'] for b in data.eval_batches()])[:40]
  np.testing.assert_allclose(images * data.std + data.mean, raw['image'][96:] / 255.0,
                             atol=1e-5)
  assert not np.allclose(data.mean, 0.0)


# -- augmentations ------------------------------------------------------------------------------


def test_flip_mirrors_and_identity_crop():
  images = np.random.default_rng(0).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
  params = augment.eval_params(4, 'none', 8, 8)
  np.testing.assert_array_equal(augment.apply(images, params, 8), images)
  params['flip'][:] = [True, False, True, False]
  out = augment.apply(images, params, 8)
  np.testing.assert_array_equal(out[0], images[0, :, ::-1])
  np.testing.assert_array_equal(out[1], images[1])


def test_cifar_pad_crop_keeps_size_and_shifts():
  images = np.random.default_rng(1).integers(1, 256, (64, 32, 32, 3), dtype=np.uint8)
  params = augment.sample_train_params(np.random.default_rng(2), 64, 'cifar', 32, 32)
  out = augment.apply(images, params, 32)
  assert out.shape == images.shape and out.dtype == np.uint8
  offsets = params['crop'][:, :2].astype(int)
  assert offsets.min() == -4 and offsets.max() == 4  # all offsets in [-4, 4], extremes seen
  assert 10 < params['flip'].sum() < 54
  for img, res, (dy, dx), flip in zip(images, out, offsets, params['flip'], strict=True):
    res = res[:, ::-1] if flip else res
    # Pixel (y, x) of the output is source pixel (y + dy, x + dx), zero outside.
    ys, xs = slice(max(0, -dy), min(32, 32 - dy)), slice(max(0, -dx), min(32, 32 - dx))
    np.testing.assert_array_equal(
      res[ys, xs], img[ys.start + dy:ys.stop + dy, xs.start + dx:xs.stop + dx]
    )
    assert (res == 0).all(axis=-1).sum() == 32 * 32 - (ys.stop - ys.start) * (xs.stop - xs.start)


def test_random_resized_crop_boxes():
  params = augment.sample_train_params(np.random.default_rng(3), 500, 'imagenet', 40, 32)
  y0, x0, h, w = params['crop'].T
  assert (y0 >= 0).all() and (x0 >= 0).all() and (y0 + h <= 40).all() and (x0 + w <= 40).all()
  area = h * w / 40**2
  assert area.min() >= 0.07 and area.max() <= 1.0 and area.std() > 0.1
  images = np.random.default_rng(4).integers(0, 256, (5, 40, 40, 3), dtype=np.uint8)
  out = augment.apply(images, {k: v[:5] for k, v in params.items()}, 32)
  assert out.shape == (5, 32, 32, 3) and out.dtype == np.uint8


@pytest.mark.parametrize('kind', ['flip', 'cifar', 'imagenet'])
def test_boxes_follow_images(kind):
  # A bright rectangle on black: its bounding box after augmentation matches transform_boxes.
  n, src, size = 32, 40 if kind == 'imagenet' else 32, 32
  rng = np.random.default_rng(5)
  images = np.zeros((n, src, src, 3), np.uint8)
  boxes = np.zeros((n, 4), np.float32)
  for i in range(n):
    y0, x0 = rng.integers(6, 16, 2)
    y1, x1 = y0 + rng.integers(8, 16), x0 + rng.integers(8, 16)
    images[i, y0:y1, x0:x1] = 255
    boxes[i] = (y0, x0, y1, x1)
  params = augment.sample_train_params(rng, n, kind, src, size)
  out = augment.apply(images, params, size)
  moved = augment.transform_boxes(boxes, params, size)
  checked = 0
  for img, (y0, x0, y1, x1) in zip(out, moved, strict=True):
    on = img[..., 0] > 127
    if (y1 - y0) < 2 or (x1 - x0) < 2 or not on.any():
      continue
    rows, cols = np.flatnonzero(on.any(1)), np.flatnonzero(on.any(0))
    np.testing.assert_allclose([rows[0], cols[0], rows[-1] + 1, cols[-1] + 1],
                               [y0, x0, y1, x1], atol=1.01)
    checked += 1
  assert checked > n // 2


def test_normalize():
  images = np.full((2, 2, 2, 3), 255, np.uint8)
  out = augment.normalize(images, np.array([0.5, 0.5, 0.5]), np.array([0.5, 0.25, 1.0]))
  np.testing.assert_allclose(out[0, 0, 0], [1.0, 2.0, 0.5], rtol=1e-6)
  assert out.dtype == np.float32


# -- image folders ------------------------------------------------------------------------------


def write_folder(root, splits, classes=('ant', 'bee', 'cat'), per_class=10, size=8, fmt='png'):
  """Writes root/split/class/i.png images with a unique flat grey value per image."""
  from PIL import Image

  value = 0
  for split in splits:
    for cls in classes:
      os.makedirs(os.path.join(root, split, cls), exist_ok=True)
      for i in range(per_class):
        value += 1
        pixels = np.full((size, size, 3), value, np.uint8)
        Image.fromarray(pixels).save(os.path.join(root, split, cls, f'{i:03d}.{fmt}'))
  return value


def folder_config(folder, **overrides):
  """Config for an image folder at tmp_path/NAME; caches go to tmp_path/cache, not ~/.cache."""
  config = ip.default_data_config()
  config.dataset = 'folder'
  config.folder = str(folder)
  config.cache_dir = os.path.join(os.path.dirname(str(folder)), 'cache')
  config.augment = 'none'
  config.mean, config.std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
  config.global_batch_size = 4
  config.eval_batch_size = 4
  config.update(overrides)
  return config


def example_ids(batches):
  ids = []
  for b in batches:
    mask = b.get('mask', np.ones(len(b['label'])))
    pixel = np.round(b['image'][:, 0, 0, 0] * 255).astype(int)
    ids.extend(pixel[mask > 0].tolist())
  return ids


def test_folder_holdout_split(tmp_path):
  write_folder(tmp_path / 'imgs', ['train'])
  config = folder_config(tmp_path / 'imgs', holdout_fraction=0.2, split_seed=1)
  data = ip.create_input(config)
  assert data.info.class_names == ('ant', 'bee', 'cat') and data.info.num_classes == 3
  assert data.info.image_shape == (8, 8, 3)
  assert data.info.num_train == 24 and data.info.num_eval == 6  # 2 per class held out
  eval_ids = example_ids(data.eval_batches())
  eval_labels = np.concatenate([b['label'] for b in data.eval_batches()])[:6]
  np.testing.assert_array_equal(np.bincount(eval_labels), [2, 2, 2])
  assert data.steps_per_epoch == 6
  train_ids = example_ids(data.train_batches(0))
  assert len(train_ids) == 24 and len(set(train_ids)) == 24
  assert set(train_ids).isdisjoint(eval_ids)
  assert set(train_ids) | set(eval_ids) == set(range(1, 31))
  # Labels agree with the folder each image came from (values 1-10 ant, 11-20 bee, ...).
  batch = next(data.train_batches(0))
  np.testing.assert_array_equal(batch['label'], (example_ids([batch]) - np.int64(1)) // 10)
  # Same split seed, same split; another seed, another split.
  assert example_ids(ip.create_input(config).eval_batches()) == eval_ids
  other = ip.create_input(folder_config(tmp_path / 'imgs', holdout_fraction=0.2, split_seed=2))
  assert example_ids(other.eval_batches()) != eval_ids


def test_folder_array_cache(tmp_path):
  write_folder(tmp_path / 'imgs', ['train'], per_class=4)
  config = folder_config(tmp_path / 'imgs', holdout_fraction=0.25)
  first = ip.create_input(config)
  cached = os.listdir(tmp_path / 'cache' / 'arrays')
  assert len(cached) == 1 and cached[0].endswith('.npz')
  second = ip.create_input(config)  # served from the cache
  assert_batches_equal(list(second.train_batches(0)), list(first.train_batches(0)))
  assert second.info == first.info
  # A changed folder gets a new cache entry.
  write_folder(tmp_path / 'imgs', ['train'], classes=('dog',), per_class=4)
  third = ip.create_input(config)
  assert third.info.num_classes == 4 and len(os.listdir(tmp_path / 'cache' / 'arrays')) == 2


def test_folder_uses_test_split_and_tar_gz(tmp_path):
  write_folder(tmp_path / 'src' / 'data', ['test', 'train'], per_class=4, size=12, fmt='jpg')
  archive = tmp_path / 'data.tar.gz'
  with tarfile.open(archive, 'w:gz') as tar:
    tar.add(tmp_path / 'src' / 'data', arcname='data')  # wrapper folder inside the archive
  cache = tmp_path / 'cache'
  config = folder_config(archive, augment=None)
  data = ip.create_input(config)
  assert data.info.num_train == 12 and data.info.num_eval == 12
  assert data.info.image_shape == (12, 12, 3)
  extractions = [d for d in os.listdir(cache) if d != 'arrays']
  assert len(extractions) == 1
  extracted = os.path.join(cache, extractions[0])
  stamp = os.stat(extracted).st_mtime_ns
  ip.create_input(config)  # second use reuses the extraction
  assert [d for d in os.listdir(cache) if d != 'arrays'] == extractions
  assert os.stat(extracted).st_mtime_ns == stamp
  assert sources.archive_image_counts(str(archive)) == {
    'test': {'ant': 4, 'bee': 4, 'cat': 4}, 'train': {'ant': 4, 'bee': 4, 'cat': 4}
  }
  batch = next(data.train_batches(0))
  assert batch['image'].shape == (4, 12, 12, 3)


def tensorflow_folder_arrays(root, split, size):
  """The former decoding path, kept here as the reference: tfds ImageFolder's order and
  tf.image decoding, shorter side resized (antialiased bilinear) and centre-cropped."""
  tf = pytest.importorskip('tensorflow')
  tfds = pytest.importorskip('tensorflow_datasets')
  builder = tfds.folder_dataset.ImageFolder(root)

  def resize_and_crop(image):
    h, w = tf.shape(image)[0], tf.shape(image)[1]
    scale = tf.cast(size, tf.float32) / tf.cast(tf.minimum(h, w), tf.float32)
    new_h = tf.maximum(size, tf.cast(tf.round(tf.cast(h, tf.float32) * scale), tf.int32))
    new_w = tf.maximum(size, tf.cast(tf.round(tf.cast(w, tf.float32) * scale), tf.int32))
    resized = tf.image.resize(image, (new_h, new_w), antialias=True)
    resized = tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), tf.uint8)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    same = tf.logical_and(tf.equal(h, size), tf.equal(w, size))
    return tf.cond(same, lambda: image, lambda: resized[top:top + size, left:left + size])

  ds = builder.as_dataset(split=split, shuffle_files=False)
  ds = ds.map(lambda ex: (resize_and_crop(ex['image']), tf.cast(ex['label'], tf.int32)))
  images, labels = zip(*ds.as_numpy_iterator(), strict=True)
  return np.stack(images), np.array(labels), tuple(builder.info.features['label'].names)


def write_mixed_folder(root):
  """JPEGs (colour 4:2:0 and 4:4:4, grey, odd sizes) and PNGs (RGB, RGBA, grey, palette)."""
  from PIL import Image

  rng = np.random.default_rng(7)
  for split, count in (('train', 6), ('test', 3)):
    for cls in ('cat', 'ant', 'bee'):  # not in sorted order on purpose
      os.makedirs(os.path.join(root, split, cls))
      for i in range(count):
        h, w = (int(v) for v in rng.integers(9, 41, 2))
        smooth = np.cumsum(rng.integers(-20, 21, (h, w, 3)), axis=1)
        pixels = np.clip(smooth + rng.integers(0, 256, 3), 0, 255).astype(np.uint8)
        image = Image.fromarray(pixels)
        name = os.path.join(root, split, cls, f'{i:02d}')
        kind = i % 5
        if kind == 0:
          image.save(name + '.jpg', quality=85)
        elif kind == 1:
          image.convert('L').save(name + '.JPEG', quality=70)
        elif kind == 2:
          image.save(name + '.jpeg', quality=95, subsampling=0)
        elif kind == 3:
          image.convert('RGBA').save(name + '.png')
        else:
          image.convert('P').save(name + '.png')


@pytest.mark.slow  # Imports TensorFlow (~10 s).
@pytest.mark.parametrize('augment_kind, image_size', [('none', 16), ('imagenet', 16),
                                                      ('none', None)])
def test_folder_decoding_equals_tensorflow(tmp_path, augment_kind, image_size):
  # Same order, labels and pixels as the tfds ImageFolder + tf.image path, including
  # resizing (upsampling and antialiased downsampling) and centre crops.
  root = str(tmp_path / 'imgs')
  write_mixed_folder(root)
  config = folder_config(root, augment=augment_kind, image_size=image_size, cache_arrays=False)
  layout = sources.scan_folder(root)
  arrays = ip._decode_folder(ip.DataSettings.from_config(config), layout, ['train', 'test'])
  size = int(arrays['image_size'])
  stored = augment.stored_size(augment_kind, size)
  for split in ('train', 'test'):
    images, labels, names = tensorflow_folder_arrays(root, split, stored)
    assert tuple(arrays['class_names']) == names == ('ant', 'bee', 'cat')
    np.testing.assert_array_equal(arrays[f'{split}/label'], labels)
    np.testing.assert_array_equal(arrays[f'{split}/image'], images)


@pytest.mark.slow  # Imports TensorFlow (~10 s).
def test_resize_equals_tensorflow():
  tf = pytest.importorskip('tensorflow')
  from experiments.data import decode

  rng = np.random.default_rng(0)
  for _ in range(20):
    h, w = (int(v) for v in rng.integers(5, 90, 2))
    out_h, out_w = (int(v) for v in rng.integers(4, 70, 2))
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8).astype(np.float32)
    ours = decode._resample(decode._resample(image, 0, out_h), 1, out_w)
    np.testing.assert_array_equal(ours, tf.image.resize(image, (out_h, out_w),
                                                        antialias=True).numpy())


def test_corrupt_image_names_the_file(tmp_path):
  write_folder(tmp_path / 'imgs', ['train'], per_class=3, fmt='jpg')
  bad = tmp_path / 'imgs' / 'train' / 'bee' / '001.jpg'
  data = bad.read_bytes()
  bad.write_bytes(data[:len(data) // 2])  # truncated JPEG
  with pytest.raises(ValueError, match=re.escape(f'Cannot decode image {bad}')):
    ip.create_input(folder_config(tmp_path / 'imgs'))
  bad.write_bytes(b'not an image at all')
  with pytest.raises(ValueError, match=re.escape(f'Cannot decode image {bad}')):
    ip.create_input(folder_config(tmp_path / 'imgs'))


def test_empty_class_directory_names_it(tmp_path):
  write_folder(tmp_path / 'imgs', ['train'], per_class=3)
  (tmp_path / 'imgs' / 'train' / 'dog').mkdir()
  (tmp_path / 'imgs' / 'train' / 'dog' / 'notes.txt').write_text('no images here')
  with pytest.raises(ValueError, match=f'Class directory {tmp_path / "imgs" / "train" / "dog"}'
                                       ' has no images'):
    ip.create_input(folder_config(tmp_path / 'imgs'))


def test_non_image_files_are_skipped_and_counted(tmp_path, capsys):
  write_folder(tmp_path / 'imgs', ['train'], per_class=4)
  (tmp_path / 'imgs' / 'train' / 'ant' / 'notes.txt').write_text('a note')
  (tmp_path / 'imgs' / 'train' / 'bee' / 'labels.csv').write_text('x')
  (tmp_path / 'imgs' / 'train' / 'bee' / '.DS_Store').write_bytes(b'\0')  # hidden: ignored
  data = ip.create_input(folder_config(tmp_path / 'imgs', holdout_fraction=0.25))
  assert data.info.num_train + data.info.num_eval == 12
  assert 'skipped 2 file(s) without an image suffix' in capsys.readouterr().out


@pytest.mark.slow  # Lists the members of a 170 MB archive.
@pytest.mark.skipif(not os.path.exists(SHARED_TARBALL), reason='shared CIFAR-10 tarball missing')
def test_shared_cifar10_tarball():
  # Reads the archive's member list (a few seconds) rather than extracting 50k files: the
  # extraction and ImageFolder path is covered on a small archive above.
  from experiments.data import sources

  counts = sources.archive_image_counts(SHARED_TARBALL)
  assert list(counts) == ['train']
  assert list(counts['train']) == [
    'airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck',
  ]
  assert set(counts['train'].values()) == {5000}
  assert sum(counts['train'].values()) == 50_000


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(SHARED_TARBALL), reason='shared CIFAR-10 tarball missing')
def test_shared_cifar10_tarball_decodes_as_tensorflow(tmp_path):
  # The arrays (and so every batch) of runs made on the TensorFlow path, e.g. the multi-seed
  # CIFAR-10 study, are what this pipeline gives. By default every 10th JPEG of each class
  # (5,000 real images, ~10x faster); CBAM_JAX_FULL_DATA_TESTS=1 compares all 50,000.
  config = folder_config(SHARED_TARBALL, cache_dir=str(tmp_path / 'cache'), augment=None,
                         mean=None, std=None, cache_arrays=False)
  root = sources.resolve_folder(SHARED_TARBALL, config.cache_dir)
  if os.environ.get('CBAM_JAX_FULL_DATA_TESTS') != '1':
    sample = tmp_path / 'sample'
    for class_dir in sorted(os.scandir(os.path.join(root, 'train')), key=lambda e: e.name):
      os.makedirs(sample / 'train' / class_dir.name)
      for name in sorted(os.listdir(class_dir.path))[::10]:
        os.link(os.path.join(class_dir.path, name), sample / 'train' / class_dir.name / name)
    root = str(sample)
  arrays = ip._decode_folder(ip.DataSettings.from_config(config), sources.scan_folder(root),
                            ['train'])
  images, labels, names = tensorflow_folder_arrays(root, 'train', 32)
  assert tuple(arrays['class_names']) == names and int(arrays['image_size']) == 32
  np.testing.assert_array_equal(arrays['train/label'], labels)
  np.testing.assert_array_equal(arrays['train/image'], images)


# -- tfds (mocked) ------------------------------------------------------------------------------


@pytest.mark.slow  # tfds.testing.mock_data imports TensorFlow (~10 s).
def test_tfds_cifar10_in_memory(tmp_path):
  tfds = pytest.importorskip('tensorflow_datasets')
  config = ip.default_data_config()
  config.update(dataset='cifar10', data_dir=str(tmp_path), global_batch_size=8,
                eval_batch_size=8)
  with tfds.testing.mock_data(num_examples=20):
    data = ip.create_input(config)
  assert data.info.num_classes == 10 and data.info.image_shape == (32, 32, 3)
  assert data.info.num_train == 20 and data.info.num_eval == 20 and data.steps_per_epoch == 2
  batch = next(data.train_batches(0))
  assert batch['image'].shape == (8, 32, 32, 3) and batch['image'].dtype == np.float32
  assert batch['label'].shape == (8,) and batch['label'].dtype == np.int32
  assert set(batch) == {'image', 'label'}
  masks = [b['mask'] for b in data.eval_batches()]
  assert [m.sum() for m in masks] == [8, 8, 4]


def streaming_config(tmp_path, **overrides):
  config = ip.default_data_config()
  config.update(dataset='imagenette', data_dir=str(tmp_path), image_size=24,
                global_batch_size=4, eval_batch_size=4)
  config.update(overrides)
  return config


@pytest.mark.slow  # tfds.testing.mock_data imports TensorFlow (~10 s).
def test_tfds_streaming_imagenette(tmp_path):
  tfds = pytest.importorskip('tensorflow_datasets')
  config = streaming_config(tmp_path)
  with tfds.testing.mock_data(num_examples=20):
    data = ip.create_input(config)
    hosts = [ip.create_input(config, process_index=p, process_count=2) for p in range(2)]
    full = list(data.train_batches(0))
    tail = list(data.train_batches(0, start_step=2))  # a second, independent pipeline
    evals = list(data.eval_batches())
    host_train = [list(h.train_batches(0)) for h in hosts]
    other_epoch = next(data.train_batches(1))
  assert data.info.num_train == 20 and data.info.num_eval == 20  # mock: 20 per split
  assert data.info.num_classes == 10 and data.info.image_shape == (24, 24, 3)
  assert len(full) == data.steps_per_epoch == 5
  assert full[0]['image'].shape == (4, 24, 24, 3) and full[0]['image'].dtype == np.float32
  assert full[0]['label'].dtype == np.int32 and set(full[0]) == {'image', 'label'}
  assert_batches_equal(tail, full[2:])
  joined = [{k: np.concatenate([a[k], b[k]]) for k in a} for a, b in zip(*host_train, strict=True)]
  assert_batches_equal(joined, full)
  assert not np.array_equal(other_epoch['image'], full[0]['image'])
  assert [b['mask'].sum() for b in evals] == [4] * 5


@pytest.mark.slow  # tfds.testing.mock_data imports TensorFlow (~10 s).
def test_tfds_streaming_holdout(tmp_path):
  tfds = pytest.importorskip('tensorflow_datasets')
  config = streaming_config(tmp_path, eval_split=None, holdout_fraction=0.3)
  with tfds.testing.mock_data(num_examples=18):
    data = ip.create_input(config)
    masks = np.concatenate([b['mask'] for b in data.eval_batches()])
  assert data.info.num_train == 13 and data.info.num_eval == 5 and data.steps_per_epoch == 3
  np.testing.assert_array_equal(masks, [1, 1, 1, 1, 1, 0, 0, 0])


@pytest.mark.slow
def test_streaming_from_array_record_files_in_worker_processes(tmp_path, monkeypatch):
  # A real ArrayRecord tfds dataset (not mocked): grain worker processes read and decode it
  # to the same batches as inline reading; resume, host slices and pixels as TensorFlow's.
  tfds = pytest.importorskip('tensorflow_datasets')
  tf = pytest.importorskip('tensorflow')
  from experiments.data import base

  class TinyJpegs(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version('1.0.0')

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        'image': tfds.features.Image(shape=(None, None, 3), encoding_format='jpeg'),
        'label': tfds.features.ClassLabel(names=['a', 'b', 'c'])}))

    def _split_generators(self, dl_manager):
      return {'train': self._generate_examples(24, 0),
              'validation': self._generate_examples(10, 1)}

    def _generate_examples(self, n, seed):
      rng = np.random.default_rng(seed)
      for i in range(n):
        h, w = (int(v) for v in rng.integers(20, 50, 2))
        yield i, {'image': rng.integers(0, 256, (h, w, 3), dtype=np.uint8), 'label': i % 3}

  TinyJpegs(data_dir=str(tmp_path), file_format='array_record').download_and_prepare()
  monkeypatch.setitem(base.DATASETS, 'tiny_jpegs', dict(
    image_size=16, augment='imagenet', mean=(0.5,) * 3, std=(0.25,) * 3,
    train_split='train', eval_split='validation', streaming=True))
  config = ip.default_data_config()
  config.update(dataset='tiny_jpegs', data_dir=str(tmp_path), global_batch_size=8,
                eval_batch_size=8, input_threads=0)
  inline = ip.create_input(config)
  assert inline.info.num_train == 24 and inline.info.num_eval == 10
  assert inline.info.class_names == ('a', 'b', 'c') and inline.steps_per_epoch == 3
  full = list(inline.train_batches(1))
  assert full[0]['image'].shape == (8, 16, 16, 3) and full[0]['label'].dtype == np.int32
  config.input_workers = 2
  workers = ip.create_input(config)
  assert_batches_equal(list(workers.train_batches(1)), full)
  assert_batches_equal(list(workers.eval_batches()), list(inline.eval_batches()))
  assert_batches_equal(list(inline.train_batches(1, start_step=1)), full[1:])
  config.input_workers = 0
  hosts = [list(ip.create_input(config, process_index=p, process_count=2).train_batches(1))
           for p in range(2)]
  joined = [{k: np.concatenate([a[k], b[k]]) for k in a} for a, b in zip(*hosts, strict=True)]
  assert_batches_equal(joined, full)
  assert [b['mask'].sum() for b in inline.eval_batches()] == [8, 2]
  # Stored (pre-augmentation) pixels: as tf.image decodes and resizes them.
  builder = tfds.builder('tiny_jpegs', data_dir=str(tmp_path))
  records = builder.as_data_source(split='validation',
                                   decoders={'image': tfds.decode.SkipDecoding()})
  ours = sources.RecordSource(records, 0, 10, 18, 'v').take(np.arange(10))
  for i in range(10):
    example = records[i]
    image = tf.image.decode_image(example['image'], channels=3, expand_animations=False)
    h, w = int(image.shape[0]), int(image.shape[1])
    scale = np.float32(18) / np.float32(min(h, w))
    new_h, new_w = (max(18, int(np.round(np.float32(v) * scale))) for v in (h, w))
    resized = tf.image.resize(image, (new_h, new_w), antialias=True).numpy()
    resized = np.clip(np.round(resized), 0, 255).astype(np.uint8)
    top, left = (new_h - 18) // 2, (new_w - 18) // 2
    np.testing.assert_array_equal(ours['image'][i], resized[top:top + 18, left:left + 18])
    assert ours['label'][i] == int(example['label'])


def test_tfds_missing_dataset_names_fix(tmp_path):
  config = ip.default_data_config()
  config.update(dataset='cifar10', data_dir=str(tmp_path))
  with pytest.raises(FileNotFoundError, match='download=True'):
    ip.create_input(config)


# -- errors -------------------------------------------------------------------------------------


def test_unknown_dataset():
  with pytest.raises(ValueError, match="Unknown dataset 'mnist'.*config.dataset"):
    ip.create_input(shapes_config(dataset='mnist'))
  with pytest.raises(ValueError, match=r"Unknown dataset 'cifar1O'. Did you mean 'cifar10'\?"):
    ip.create_input(shapes_config(dataset='cifar1O'))


def test_unknown_augment():
  with pytest.raises(ValueError, match='config.augment'):
    ip.create_input(shapes_config(augment='autoaugment'))


def test_missing_folder(tmp_path):
  with pytest.raises(FileNotFoundError, match='does not exist'):
    ip.create_input(folder_config(tmp_path / 'nope'))
  with pytest.raises(ValueError, match='needs config.folder'):
    ip.create_input(folder_config(''))
  (tmp_path / 'empty' / 'a').mkdir(parents=True)
  (tmp_path / 'empty' / 'b').mkdir(parents=True)
  with pytest.raises(FileNotFoundError, match='not an image folder'):
    ip.create_input(folder_config(tmp_path / 'empty'))


def test_missing_split(tmp_path):
  write_folder(tmp_path / 'imgs', ['train'], per_class=2)
  with pytest.raises(ValueError, match="no split 'validation'"):
    ip.create_input(folder_config(tmp_path / 'imgs', eval_split='validation'))


@pytest.mark.parametrize('batch, count, match', [
  (15, 2, 'not divisible by process_count=2'),
  (0, 1, 'positive int'),
  (128, 1, 'exceeds the 96 training examples'),
])
def test_bad_batch_sizes(batch, count, match):
  with pytest.raises(ValueError, match=match):
    ip.create_input(shapes_config(global_batch_size=batch), process_count=count)


def test_bad_eval_batch_size():
  with pytest.raises(ValueError, match='eval_batch_size=9 is not divisible'):
    ip.create_input(shapes_config(eval_batch_size=9), process_count=2)


@pytest.mark.parametrize('fraction', [0.0, 1.0, 0.01])
def test_holdout_leaving_nothing(tmp_path, fraction):
  write_folder(tmp_path / 'imgs', ['train'], per_class=4)
  with pytest.raises(ValueError, match='holdout_fraction'):
    ip.create_input(folder_config(tmp_path / 'imgs', holdout_fraction=fraction))


def test_bad_epoch_or_step(shapes_input):
  with pytest.raises(ValueError, match='start_step'):
    next(shapes_input.train_batches(0, start_step=99))
  with pytest.raises(ValueError, match='epoch'):
    next(shapes_input.train_batches(-1))


def test_shapes_holdout_carved():
  data = ip.create_input(shapes_config(eval_split=None, holdout_fraction=0.25))
  assert data.info.num_train + data.info.num_eval == 96 and data.info.num_eval == 24


# -- batches computed ahead on grain ------------------------------------------------------------


@pytest.mark.parametrize('num_threads', [0, 2])
def test_batches_ahead_in_order_and_errors_propagate(num_threads):
  from experiments.data import loader

  ahead = loader.batches_ahead(lambda k: k * k, 3, 9, num_threads=num_threads, buffer_size=2)
  assert list(ahead) == [k * k for k in range(3, 9)]

  def broken(k):
    if k == 2:
      raise RuntimeError('boom at step 2')
    return k

  ahead = loader.batches_ahead(broken, 0, 5, num_threads=num_threads, buffer_size=2)
  assert next(ahead) == 0
  with pytest.raises(RuntimeError, match='boom at step 2'):
    list(ahead)
  with pytest.raises(ValueError, match='prefetch_batches'):
    loader.batches_ahead(broken, 0, 5, num_threads=1, buffer_size=0)


def test_batches_ahead_run_ahead_boundedly():
  from experiments.data import loader

  made = []

  def make(k):
    made.append(k)
    return k

  ahead = loader.batches_ahead(make, 0, 1000, num_threads=2, buffer_size=2)
  assert next(ahead) == 0
  deadline = time.time() + 5
  while len(made) < 3 and time.time() < deadline:
    time.sleep(0.01)
  time.sleep(0.2)
  assert 3 <= len(made) <= 10  # ran ahead of the consumer, bounded by the buffer


@pytest.mark.parametrize('ahead', [
  dict(input_threads=2),
  pytest.param(dict(input_workers=2), marks=pytest.mark.slow),  # spawns 2 processes
])
def test_threads_and_workers_do_not_change_batches(ahead):
  inline = ip.create_input(shapes_config(augment='cifar', input_threads=0))
  other = ip.create_input(shapes_config(augment='cifar', **ahead))
  assert_batches_equal(list(inline.train_batches(1, 2)), list(other.train_batches(1, 2)))
  assert_batches_equal(list(inline.eval_batches()), list(other.eval_batches()))


@pytest.mark.slow
def test_benchmark_cli(capsys):
  ip.main(['--bench', '3', '--batch_size', '16', '--set', 'shapes.num_train=64',
           '--set', 'shapes.num_eval=16', '--set', 'image_size=16'])
  out = capsys.readouterr().out
  assert 'images_per_s' in out and 'wait_fraction' in out


@pytest.mark.parametrize('argv, message', [
    (['--set', 'augment'], r"--set 'augment': write KEY=VALUE"),
    (['--set', 'shapes.nope.x=1'], r"'shapes.nope.x' is not a config field"),
    (['--batch-size', '16'], r"Unknown command line flag 'batch-size'. Did you mean: batch_size"),
    (['--bench', '0'], r'--bench=0: 0 is not a positive integer'),
])
def test_benchmark_cli_rejects_bad_values_in_one_line(argv, message):
  with pytest.raises(SystemExit, match=message) as error:
    ip.main(argv)
  assert str(error.value).startswith('python -m experiments.data.pipeline: ')


def test_tensorflow_paths_name_the_extra(monkeypatch):
  import sys

  monkeypatch.setitem(sys.modules, 'tensorflow', None)  # `import tensorflow` fails
  with pytest.raises(ImportError, match=re.escape("needs TensorFlow, which is not installed: "
                                                  "pip install -e '.[tf]'")):
    sources.dataset_to_arrays(None, 8)


# -- the config, parsed once into DataSettings ------------------------------------------------


def test_settings_defaults_are_the_configs():
  # The dataclass is the one source of truth: default_data_config() is built from it.
  config = ip.default_data_config()
  fields = {f.name: f for f in dataclasses.fields(ip.DataSettings)}
  assert sorted(config) == sorted(fields)
  for name, field in fields.items():
    if name != 'shapes':
      assert config[name] == field.default, name
  assert config.shapes.to_dict() == dataclasses.asdict(ip.DataSettings().shapes)
  settings = ip.DataSettings.from_config(config)
  # None = the dataset's default, filled in once.
  assert (settings.dataset, settings.image_size, settings.augment) == ('shapes', 32, 'none')
  assert settings.eval_batch_size == settings.global_batch_size == 128
  assert settings.eval_split == 'auto' and settings.mean is None and settings.train_split is None


def test_settings_fill_in_the_datasets_defaults():
  config = ip.default_data_config()
  config.update(dataset='cifar10', global_batch_size=64)
  settings = ip.DataSettings.from_config(config)
  assert (settings.image_size, settings.augment, settings.train_split, settings.eval_split,
          settings.eval_batch_size) == (32, 'cifar', 'train', 'test', 64)
  assert settings.mean == ip.DATASETS['cifar10']['mean']
  config.update(dataset='imagenette', eval_split=None, image_size=96, augment='flip')
  settings = ip.DataSettings.from_config(config)
  assert (settings.image_size, settings.augment, settings.eval_split) == (96, 'flip', None)


def test_settings_from_a_saved_config_and_unset_placeholders():
  # A config read back from config.json: lists for tuples, fields added since missing.
  saved = ip.default_data_config().to_dict()
  del saved['input_workers'], saved['shapes']['noise_std']
  saved.update(mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25])
  settings = ip.DataSettings.from_config(saved)
  assert settings.input_workers == 0 and settings.shapes.noise_std == 0.06
  assert settings.mean == (0.5, 0.5, 0.5) and settings.shapes.scale_range == (0.12, 0.25)
  # None where the field's type has no None (an unset placeholder) is the default; where it
  # has, None is a value (eval_split None: carve a holdout).
  config = shapes_config(seed=None, eval_split=None)
  settings = ip.DataSettings.from_config(config)
  assert settings.seed == 0 and settings.eval_split is None


@pytest.mark.filterwarnings('ignore:the load_module:DeprecationWarning')
def test_settings_from_command_line_overrides():
  from absl import flags
  from ml_collections import config_flags

  repo = os.path.join(os.path.dirname(__file__), '..', '..')
  argv = ['prog', f'--config={repo}/experiments/configs/smoke.py', '--config.image_size=24',
          '--config.augment=flip', '--config.shapes.num_train=50', '--config.seed=5']
  values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', flag_values=values, sys_argv=argv)
  values(argv)
  settings = ip.DataSettings.from_config(values.config)
  assert (settings.image_size, settings.augment, settings.shapes.num_train, settings.seed,
          settings.eval_batch_size) == (24, 'flip', 50, 5, 32)


@pytest.mark.parametrize('name', ['default', 'cifar10', 'imagenet', 'smoke'])
def test_every_training_config_parses(name):
  # A training config holds other fields too; none of them may look like a misspelt data field.
  import importlib

  config = importlib.import_module(f'experiments.configs.{name}').get_config()
  assert ip.DataSettings.from_config(config).dataset == config.dataset


@pytest.mark.parametrize('key, message', [
  ('global_batch_sise', r'config.global_batch_sise is not a data field; did you mean '
                        r'config.global_batch_size\?'),
  ('imagesize', r'did you mean config.image_size\?'),
  ('shapes.num_trian', r'config.shapes.num_trian is not a field of config.shapes; did you '
                       r'mean config.shapes.num_train\?'),
  ('shapes.colour', r'config.shapes.colour is not a field of config.shapes; the fields are '
                    r'num_train, num_eval, '),
])
def test_misspelt_data_fields_are_errors(key, message):
  config = shapes_config()
  *parent, leaf = key.split('.')
  (config[parent[0]] if parent else config)[leaf] = 64
  with pytest.raises(ValueError, match=message):
    ip.create_input(config)


def test_settings_are_frozen():
  settings = ip.DataSettings.from_config(shapes_config())
  with pytest.raises(dataclasses.FrozenInstanceError):
    settings.seed = 1
  with pytest.raises(dataclasses.FrozenInstanceError):
    settings.shapes.num_train = 1
  assert hash(settings) == hash(ip.DataSettings.from_config(shapes_config()))
