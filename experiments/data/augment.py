"""Batch augmentations in numpy for in-memory datasets.

Random parameters are sampled for the whole GLOBAL batch from a generator keyed by
(seed, epoch, step) and then sliced per host, so P hosts together reproduce the single-host
batch exactly. Every transform is a crop box (in source pixels) plus an optional mirror, which
lets the same code move images and ground-truth boxes.

Kinds:
  'none':     identity.
  'flip':     random horizontal flip.
  'cifar':    pad 4 (zeros), random 32x32 crop, random horizontal flip.
  'imagenet': random resized crop (area in [0.08, 1], aspect in [3/4, 4/3]) + flip; images are
              stored at `resize_size(image_size)` and evaluation centre-crops `image_size`.
"""

from __future__ import annotations

import numpy as np

AUGMENT_KINDS = ('none', 'flip', 'cifar', 'imagenet')
CIFAR_PAD = 4
# Eval for ImageNet-style models: resize to image_size / 0.875, centre-crop image_size.
CENTRE_CROP_FRACTION = 0.875


def resize_size(image_size: int) -> int:
  """Side of the stored (pre-crop) image for 'imagenet' augmentation: 224 -> 256."""
  return int(round(image_size / CENTRE_CROP_FRACTION))


def stored_size(kind: str, image_size: int) -> int:
  """Side length at which an in-memory dataset should store its images for `kind`."""
  return resize_size(image_size) if kind == 'imagenet' else image_size


def check_kind(kind: str) -> str:
  if kind not in AUGMENT_KINDS:
    raise ValueError(
      f'Unknown augment {kind!r}; set config.augment to one of {AUGMENT_KINDS}.'
    )
  return kind


def sample_train_params(
  rng: np.random.Generator, n: int, kind: str, source_size: int, image_size: int
) -> dict[str, np.ndarray]:
  """Samples random crop boxes and flips for `n` examples.

  Returns:
    'crop' float32 (n, 4) = (y0, x0, h, w) in source pixels (may reach into the zero padding
    for 'cifar'), 'flip' bool (n,).
  """
  check_kind(kind)
  flip = rng.random(n) < 0.5
  if kind == 'none':
    flip[:] = False
  if kind in ('none', 'flip'):
    crop = np.tile(np.float32([0, 0, source_size, source_size]), (n, 1))
  elif kind == 'cifar':
    offset = rng.integers(0, 2 * CIFAR_PAD + 1, (n, 2)) - CIFAR_PAD
    size = np.full((n, 2), image_size)
    crop = np.concatenate([offset, size], axis=1).astype(np.float32)
  else:  # imagenet: Inception-style random resized crop, 10 tries, then centre crop.
    tries = 10
    area = source_size * source_size
    target = area * rng.uniform(0.08, 1.0, (n, tries))
    aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3), (n, tries)))
    w = np.round(np.sqrt(target * aspect))
    h = np.round(np.sqrt(target / aspect))
    ok = (w <= source_size) & (h <= source_size) & (w > 0) & (h > 0)
    first = np.argmax(ok, axis=1)
    found = ok[np.arange(n), first]
    h = np.where(found, h[np.arange(n), first], source_size)
    w = np.where(found, w[np.arange(n), first], source_size)
    y0 = np.floor(rng.random(n) * (source_size - h + 1))
    x0 = np.floor(rng.random(n) * (source_size - w + 1))
    crop = np.stack([y0, x0, h, w], axis=1).astype(np.float32)
  return {'crop': crop, 'flip': flip}


def eval_params(n: int, kind: str, source_size: int, image_size: int) -> dict[str, np.ndarray]:
  """Deterministic eval transform: centre crop of `image_size` (identity unless 'imagenet')."""
  check_kind(kind)
  offset = (source_size - image_size) // 2 if kind == 'imagenet' else 0
  side = image_size if kind == 'imagenet' else source_size
  crop = np.tile(np.float32([offset, offset, side, side]), (n, 1))
  return {'crop': crop, 'flip': np.zeros(n, bool)}


def apply(images: np.ndarray, params: dict[str, np.ndarray], image_size: int) -> np.ndarray:
  """Crops, resizes (bilinear, only when a crop is not already `image_size`) and mirrors.

  Args:
    images: uint8 (B, S, S, C).
    params: from `sample_train_params` / `eval_params`, sliced to B.
    image_size: output side.
  Returns:
    uint8 (B, image_size, image_size, C). Pixels outside the source are zero.
  """
  crop, flip = params['crop'], params['flip']
  b, size = images.shape[0], image_size
  if b == 0:
    return np.zeros((0, size, size, images.shape[-1]), images.dtype)
  if np.all(crop[:, 2:] == size):  # integer crops (pad-crop, centre crop, identity): gather
    y0 = crop[:, 0].astype(np.int64)
    x0 = crop[:, 1].astype(np.int64)
    ar = np.arange(size)
    rows = y0[:, None] + ar  # (B, size)
    cols = np.where(flip[:, None], x0[:, None] + size - 1 - ar, x0[:, None] + ar)
    src = images.shape[1]
    if rows.min() >= 0 and rows.max() < src and cols.min() >= 0 and cols.max() < src:
      return images[np.arange(b)[:, None, None], rows[:, :, None], cols[:, None, :]]
    pad = max(-rows.min(), -cols.min(), rows.max() - src + 1, cols.max() - src + 1, 0)
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    return padded[np.arange(b)[:, None, None], rows[:, :, None] + pad, cols[:, None, :] + pad]
  return _crop_resize_bilinear(images, crop, flip, size)


def _crop_resize_bilinear(
  images: np.ndarray, crop: np.ndarray, flip: np.ndarray, size: int
) -> np.ndarray:
  b, src = images.shape[0], images.shape[1]
  centres = (np.arange(size, dtype=np.float32) + 0.5) / size  # (size,)
  ys = crop[:, 0, None] + centres * crop[:, 2, None] - 0.5  # (B, size) source coordinates
  xs = crop[:, 1, None] + centres * crop[:, 3, None] - 0.5
  xs = np.where(flip[:, None], xs[:, ::-1], xs)
  ys, xs = np.clip(ys, 0, src - 1), np.clip(xs, 0, src - 1)
  y_lo, x_lo = np.floor(ys).astype(np.int64), np.floor(xs).astype(np.int64)
  y_hi, x_hi = np.minimum(y_lo + 1, src - 1), np.minimum(x_lo + 1, src - 1)
  wy = (ys - y_lo)[:, :, None, None]
  wx = (xs - x_lo)[:, None, :, None]
  bi = np.arange(b)[:, None, None]

  def at(yi, xi):
    return images[bi, yi[:, :, None], xi[:, None, :]].astype(np.float32)

  top = at(y_lo, x_lo) * (1 - wx) + at(y_lo, x_hi) * wx
  bottom = at(y_hi, x_lo) * (1 - wx) + at(y_hi, x_hi) * wx
  out = top * (1 - wy) + bottom * wy
  return np.clip(np.round(out), 0, 255).astype(np.uint8)


def transform_boxes(
  boxes: np.ndarray, params: dict[str, np.ndarray], image_size: int
) -> np.ndarray:
  """Moves (y0, x0, y1, x1) pixel boxes through the same crop/resize/flip as `apply`.

  Boxes are clipped to the output image; a box cropped away entirely collapses to zero area.
  """
  crop, flip = params['crop'], params['flip']
  scale_y = image_size / crop[:, 2]
  scale_x = image_size / crop[:, 3]
  y0 = (boxes[:, 0] - crop[:, 0]) * scale_y
  y1 = (boxes[:, 2] - crop[:, 0]) * scale_y
  x0 = (boxes[:, 1] - crop[:, 1]) * scale_x
  x1 = (boxes[:, 3] - crop[:, 1]) * scale_x
  x0, x1 = np.where(flip, image_size - x1, x0), np.where(flip, image_size - x0, x1)
  out = np.stack([y0, x0, y1, x1], axis=1)
  return np.clip(out, 0, image_size).astype(np.float32)


def normalize(images: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
  """uint8 (..., C) -> float32 (x / 255 - mean) / std, with mean/std (C,) in [0, 1] units."""
  scale = np.float32(1.0 / 255.0) / np.asarray(std, np.float32)
  shift = np.asarray(mean, np.float32) / np.asarray(std, np.float32)
  out = images.astype(np.float32)
  out *= scale
  out -= shift
  return out
