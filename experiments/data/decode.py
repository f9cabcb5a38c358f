"""Image decoding and resizing in numpy, pixel-identical to the TensorFlow path it replaced.

JPEGs decode with libjpeg-turbo through simplejpeg with TensorFlow's `decode_jpeg` defaults
(the fast integer DCT and "fancy" chroma upsampling); Pillow's decoder uses the accurate DCT,
whose pixels differ from TensorFlow's by up to 5 on the CIFAR-10 JPEGs, so it only decodes the
other formats (PNG, lossless: identical). `resize_shorter_and_centre_crop` reproduces
`tf.image.resize(..., antialias=True)` (bilinear, triangle kernel, float32, rows then columns)
bit for bit. tests/experiments/test_input_pipeline.py checks both against TensorFlow.
"""

from __future__ import annotations

import functools
import io

import numpy as np

_JPEG_MAGIC = b'\xff\xd8'
# Pillow modes that convert to 8-bit RGB the way TensorFlow's decode_png(channels=3) does
# (grey replicated, palette expanded, alpha dropped without compositing).
_EIGHT_BIT_MODES = ('1', 'L', 'LA', 'P', 'PA', 'RGB', 'RGBA', 'RGBX')


def decode_image(path: str) -> np.ndarray:
  """The image file at `path` as uint8 (H, W, 3); ValueError naming the file if it is bad."""
  with open(path, 'rb') as f:
    return decode_bytes(f.read(), path)


def decode_bytes(data: bytes, name: str) -> np.ndarray:
  """Encoded image bytes as uint8 (H, W, 3); ValueError naming `name` if they are bad."""
  try:
    if data.startswith(_JPEG_MAGIC):
      import simplejpeg

      image = simplejpeg.decode_jpeg(data, colorspace='RGB', fastdct=True, fastupsample=False)
    else:
      from PIL import Image

      with Image.open(io.BytesIO(data)) as pil:
        if pil.mode not in _EIGHT_BIT_MODES:
          raise ValueError(f'unsupported image mode {pil.mode!r} (8-bit RGB, grey or palette '
                           'images only)')
        image = np.asarray(pil.convert('RGB'))
  except Exception as e:  # noqa: BLE001 - every decoder error becomes one clear message
    raise ValueError(
      f'Cannot decode image {name}: {type(e).__name__}: {e}. Remove or replace it '
      '(the folder loader reads every .jpg/.jpeg/.png under root/<split>/<class>/).'
    ) from None
  if image.ndim != 3 or image.shape[-1] != 3 or 0 in image.shape:
    raise ValueError(f'Cannot decode image {name}: got an array of shape {image.shape}.')
  return image


def image_size(path: str) -> tuple[int, int]:
  """(height, width) of an image file from its header (no full decode)."""
  from PIL import Image

  try:
    with Image.open(path) as pil:
      width, height = pil.size
  except Exception as e:  # noqa: BLE001
    raise ValueError(f'Cannot decode image {path}: {type(e).__name__}: {e}. Remove or replace '
                     'the file.') from None
  return height, width


@functools.lru_cache(maxsize=64)
def _triangle_weights(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
  """(starts (out,), weights (out, span)) of TF's scale_and_translate triangle kernel with
  antialiasing, computed in float32 in TF's order so the weights are the same bits."""
  f32 = np.float32
  scale = f32(out_size) / f32(in_size)
  inv_scale = f32(1.0 / float(scale))
  kernel_scale = max(inv_scale, f32(1.0))  # widen the kernel when downsampling (antialias)
  inv_kernel_scale = f32(1.0) / kernel_scale
  span = min(2 * int(np.ceil(kernel_scale)) + 1, in_size)
  starts = np.zeros(out_size, np.int64)
  weights = np.zeros((out_size, span), np.float32)
  for x in range(out_size):
    sample = f32(f32(x) + f32(0.5)) * inv_scale
    first = min(max(int(np.ceil(sample - kernel_scale - f32(0.5))), 0), in_size - 1)
    last = min(max(int(np.floor(sample + kernel_scale - f32(0.5))), 0), in_size - 1) + 1
    row, total = [], f32(0.0)
    for source in range(first, last):
      distance = abs((f32(f32(source) + f32(0.5)) - sample) * inv_kernel_scale)
      weight = f32(1.0) - distance if distance < 1 else f32(0.0)
      total = f32(total + weight)
      row.append(weight)
    weights[x, :len(row)] = np.asarray(row, np.float32) * (f32(1.0) / total)
    starts[x] = first
  return starts, weights


def _resample(image: np.ndarray, axis: int, out_size: int) -> np.ndarray:
  """float32 resampling of one axis, accumulating the taps in order as TF does."""
  starts, weights = _triangle_weights(image.shape[axis], out_size)
  moved = np.moveaxis(image, axis, 0)
  out = np.zeros((out_size,) + moved.shape[1:], np.float32)
  shape = (-1,) + (1,) * (moved.ndim - 1)
  for tap in range(weights.shape[1]):
    index = np.minimum(starts + tap, moved.shape[0] - 1)  # zero weight past the span
    out += weights[:, tap].reshape(shape) * moved[index].astype(np.float32)
  return np.moveaxis(out, 0, axis)


def resize_shorter_and_centre_crop(image: np.ndarray, size: int) -> np.ndarray:
  """uint8 (H, W, C) -> uint8 (size, size, C): shorter side to `size`, centre crop.

  Bilinear with antialiasing, rounded half to even, as the former tf.image path; a no-op for
  images that are already size x size.
  """
  h, w = image.shape[:2]
  if h == size and w == size:
    return image
  scale = np.float32(size) / np.float32(min(h, w))
  new_h = max(size, int(np.round(np.float32(h) * scale)))
  new_w = max(size, int(np.round(np.float32(w) * scale)))
  resized = _resample(_resample(image.astype(np.float32), 0, new_h), 1, new_w)
  resized = np.clip(np.round(resized), 0, 255).astype(np.uint8)
  top, left = (new_h - size) // 2, (new_w - size) // 2
  return resized[top:top + size, left:left + size]
