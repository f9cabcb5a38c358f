"""Tests for the procedural 'shapes' dataset (experiments/data/shapes.py)."""

import numpy as np
import pytest

from experiments.data import shapes

SIZE = 24


@pytest.fixture(scope='module')
def data():
  return shapes.generate(300, seed=7, image_size=SIZE, return_mask=True)


def test_shapes_and_dtypes(data):
  assert data['image'].shape == (300, SIZE, SIZE, 3) and data['image'].dtype == np.uint8
  assert data['label'].shape == (300,) and data['label'].dtype == np.int32
  assert data['box'].shape == (300, 4) and data['box'].dtype == np.float32
  assert data['mask'].shape == (300, SIZE, SIZE) and data['mask'].dtype == np.float32
  assert set(np.unique(data['label'])) == set(range(len(shapes.CLASS_NAMES)))


def test_same_seed_identical_and_prefix_stable(data):
  again = shapes.generate(300, seed=7, image_size=SIZE)
  for key in ('image', 'label', 'box'):
    np.testing.assert_array_equal(again[key], data[key])
  # Example i depends only on (seed, i): a shorter request is a prefix.
  short = shapes.generate(37, seed=7, image_size=SIZE)
  np.testing.assert_array_equal(short['image'], data['image'][:37])
  np.testing.assert_array_equal(short['box'], data['box'][:37])


def test_different_seeds_differ(data):
  other = shapes.generate(300, seed=8, image_size=SIZE)
  assert not np.array_equal(other['image'], data['image'])
  assert not np.array_equal(other['label'], data['label'])
  assert np.mean(other['box'] != data['box']) > 0.5


def test_box_is_tight_around_object_pixels(data):
  mask, box = data['mask'] > 0, data['box'].astype(int)
  rows, cols = np.arange(SIZE)[:, None], np.arange(SIZE)[None, :]
  for m, (y0, x0, y1, x1) in zip(mask, box, strict=True):
    assert 0 <= y0 < y1 <= SIZE and 0 <= x0 < x1 <= SIZE
    inside = (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)
    assert not (m & ~inside).any()  # every object pixel is in the box
    assert m[y0].any() and m[y1 - 1].any() and m[:, x0].any() and m[:, x1 - 1].any()  # tight


def test_object_is_drawn_in_its_colour_inside_box(data):
  # Fully covered object pixels differ from the image's median colour much more than the
  # clutter does on average: the object is visible, not hidden in noise.
  img = data['image'].astype(np.float32)
  full = data['mask'] > 0.99
  centre = np.median(img.reshape(len(img), -1, 3), axis=1)[:, None, None]
  diff = np.abs(img - centre).sum(-1)
  assert diff[full].mean() > 2 * diff[~(data['mask'] > 0)].mean()


def test_objects_are_small_and_spread_out(data):
  box = data['box']
  area = (box[:, 2] - box[:, 0]) * (box[:, 3] - box[:, 1]) / SIZE**2
  assert 0.03 < np.median(area) < 0.4
  centre_x = (box[:, 1] + box[:, 3]) / 2
  assert centre_x.std() > SIZE / 10  # positions vary: attention has to find the object


def test_labels_balanced():
  labels = shapes.generate(600, seed=1, image_size=16)['label']
  counts = np.bincount(labels, minlength=len(shapes.CLASS_NAMES))
  assert counts.min() >= 0.8 * 600 / len(counts), counts


def test_num_classes_subset():
  out = shapes.generate(50, seed=0, image_size=16, num_classes=3)
  assert out['label'].max() <= 2 and 'mask' not in out


def test_zero_examples():
  out = shapes.generate(0, seed=0, image_size=16)
  assert out['image'].shape == (0, 16, 16, 3) and out['label'].shape == (0,)


@pytest.mark.parametrize(
  'kwargs, match',
  [
    (dict(num_examples=-1), 'num_examples'),
    (dict(seed=-3), 'seed'),
    (dict(image_size=8), 'image_size'),
    (dict(num_classes=1), 'num_classes'),
    (dict(num_classes=len(shapes.CLASS_NAMES) + 1), 'num_classes'),
    (dict(scale_range=(0.3, 0.2)), 'scale_range'),
  ],
)
def test_errors(kwargs, match):
  args = dict(num_examples=4, seed=0, image_size=16) | kwargs
  n = args.pop('num_examples')
  with pytest.raises(ValueError, match=match):
    shapes.generate(n, **args)
