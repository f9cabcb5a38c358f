"""'shapes': a procedural image-classification dataset where attention matters.

Each image shows ONE object of one of `CLASS_NAMES` (disc, square, triangle, cross, ring,
diamond) at a random position, scale, small rotation and colour, on a cluttered background: a
smooth two-colour gradient, distractor strokes (thick line segments), elongated blobs
(ellipses) and faint decoy shapes of OTHER classes, all in colours of a different hue and drawn
semi-transparent, plus pixel noise. No distractor has a class silhouette at full contrast, so
the label is decided by the one opaque object, and the object's ground-truth box
`(y0, x0, y1, x1)` is kept per example so attention maps can be scored against it.

Everything is vectorised numpy (signed-distance fields on coordinate grids, anti-aliased), so
10k 32x32 images take about a second, and it is deterministic: example `i` depends only on
`(seed, i)` (examples are drawn in fixed chunks of `_CHUNK`), so
`generate(n, seed=s)` is a prefix of `generate(m, seed=s)` for `n <= m`.

Usage:
  data = generate(10_000, seed=0, image_size=32)
  data['image']  # uint8 (N, H, W, 3)
  data['label']  # int32 (N,), index into CLASS_NAMES
  data['box']    # float32 (N, 4) = (y0, x0, y1, x1) in pixels, y1/x1 exclusive
"""

from __future__ import annotations

import numpy as np

CLASS_NAMES: tuple[str, ...] = ('disc', 'square', 'triangle', 'cross', 'ring', 'diamond')

# Examples are drawn in chunks of this many, each chunk from its own generator keyed by
# (seed, chunk index): arrays do not depend on how many examples are requested.
_CHUNK = 256
# Rotation stays small so that 'square' (0 deg) and 'diamond' (45 deg) never meet.
_MAX_ROTATION_DEG = 10.0
# Half-extent of the largest shape (rotated square corner) relative to its radius.
_EXTENT = 1.25


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
  """Vectorised HSV -> RGB. Inputs `(...)` in [0, 1]; output `(..., 3)` in [0, 1]."""
  k = np.stack([5.0, 3.0, 1.0])  # (3,)
  k = (k + h[..., None] * 6.0) % 6.0
  return v[..., None] - v[..., None] * s[..., None] * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)


def _coverage(distance: np.ndarray) -> np.ndarray:
  """Anti-aliased coverage in [0, 1] from a signed distance in pixels (negative inside)."""
  return np.clip(0.5 - distance, 0.0, 1.0)


def _shape_distance(
  label: int, u: np.ndarray, v: np.ndarray, radius: np.ndarray
) -> np.ndarray:
  """Signed distance (pixels, approx.) to class `label` in object coordinates.

  Args:
    label: class index into CLASS_NAMES.
    u: (B, H, W) horizontal offsets from the object centre, rotated into object frame.
    v: (B, H, W) vertical offsets (image y, pointing down).
    radius: (B, 1, 1) size of the object in pixels.
  Returns:
    (B, H, W) signed distance, negative inside.
  """
  name = CLASS_NAMES[label]
  r = radius
  if name == 'disc':
    return np.hypot(u, v) - r
  if name == 'square':
    return np.maximum(np.abs(u), np.abs(v)) - 0.85 * r
  if name == 'diamond':
    return (np.abs(u) + np.abs(v) - 1.15 * r) / np.sqrt(2.0)
  if name == 'triangle':
    # Equilateral, pointing up, inradius 0.55 r (so circumradius 1.1 r). `up` is measured from
    # the centroid, which sits 0.275 r below the object centre so the box is centred on it.
    up = -v + 0.275 * r
    d_bottom = -up
    d_right = u * np.cos(np.radians(30.0)) + up * np.sin(np.radians(30.0))
    d_left = u * np.cos(np.radians(150.0)) + up * np.sin(np.radians(150.0))
    return np.maximum(np.maximum(d_bottom, d_left), d_right) - 0.55 * r
  if name == 'cross':
    half_width = 0.33 * r
    bar_h = np.maximum(np.abs(u) - r, np.abs(v) - half_width)
    bar_v = np.maximum(np.abs(u) - half_width, np.abs(v) - r)
    return np.minimum(bar_h, bar_v)
  if name == 'ring':
    return np.abs(np.hypot(u, v) - 0.72 * r) - 0.28 * r
  raise AssertionError(name)


def _segment_distance(
  px: np.ndarray, py: np.ndarray, a: np.ndarray, b: np.ndarray, half_width: np.ndarray
) -> np.ndarray:
  """Distance from pixel centres to thick segments a-b. a, b: (B, 2) as (x, y)."""
  ax, ay = a[:, 0, None, None], a[:, 1, None, None]
  dx, dy = (b - a)[:, 0, None, None], (b - a)[:, 1, None, None]
  t = np.clip(((px - ax) * dx + (py - ay) * dy) / (dx * dx + dy * dy + 1e-6), 0.0, 1.0)
  return np.hypot(px - ax - t * dx, py - ay - t * dy) - half_width[:, None, None]


def _generate_chunk(
  chunk_index: int,
  *,
  seed: int,
  image_size: int,
  num_classes: int,
  scale_range: tuple[float, float],
  num_strokes: int,
  num_blobs: int,
  num_decoys: int,
  noise_std: float,
) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(np.random.SeedSequence([seed, chunk_index]))
  n, size = _CHUNK, image_size

  def uniform(low, high, shape=None) -> np.ndarray:
    # float32 throughout: halves the memory traffic of every (n, H, W) array.
    return rng.uniform(low, high, shape).astype(np.float32)

  # Balanced labels: global index i has label i % K before the in-chunk shuffle.
  label = rng.permutation((chunk_index * _CHUNK + np.arange(n)) % num_classes).astype(np.int32)

  coords = np.arange(size, dtype=np.float32) + 0.5  # pixel centres
  py = np.broadcast_to(coords[None, :, None], (n, size, size))
  px = np.broadcast_to(coords[None, None, :], (n, size, size))

  # Background: smooth gradient between two dull colours along a random direction.
  bg_hue = uniform(0, 1, (n, 2))
  bg_rgb = _hsv_to_rgb(bg_hue, uniform(0.0, 0.5, (n, 2)), uniform(0.1, 0.5, (n, 2)))
  direction = uniform(0, 2 * np.pi, n)
  ramp = (np.cos(direction)[:, None, None] * (px - size / 2) + np.sin(direction)[:, None, None]
          * (py - size / 2)) / size + 0.5
  ramp = np.clip(ramp, 0.0, 1.0)[..., None]
  image = bg_rgb[:, None, None, 0] * (1 - ramp) + bg_rgb[:, None, None, 1] * ramp

  # Object colour: saturated and bright; distractors get a hue at least 0.2 away.
  obj_hue = uniform(0, 1, n)
  obj_rgb = _hsv_to_rgb(obj_hue, uniform(0.45, 1.0, n), uniform(0.6, 1.0, n))

  def distractor_colour() -> np.ndarray:
    hue = (obj_hue + uniform(0.2, 0.8, n)) % 1.0
    return _hsv_to_rgb(hue, uniform(0.3, 1.0, n), uniform(0.3, 1.0, n))

  def paint(cover: np.ndarray, rgb: np.ndarray) -> None:
    # Alpha compositing in place: image <- image + cover * (rgb - image).
    nonlocal image
    delta = rgb[:, None, None, :] - image
    delta *= cover[..., None]
    image += delta

  for _ in range(num_strokes):
    a = uniform(0, size, (n, 2))
    length = uniform(0.3, 0.8, n) * size
    angle = uniform(0, 2 * np.pi, n)
    b = a + length[:, None] * np.stack([np.cos(angle), np.sin(angle)], axis=1)
    half_width = uniform(0.5, 1.25, n) * size / 32
    alpha = uniform(0.35, 0.85, n) * (uniform(0, 1, n) < 0.8)  # some strokes absent
    cover = _coverage(_segment_distance(px, py, a, b, half_width)) * alpha[:, None, None]
    paint(cover, distractor_colour())

  for _ in range(num_blobs):
    centre = uniform(0, size, (n, 2))
    semi_major = uniform(0.08, 0.22, n) * size
    # Aspect >= 2.5: a blob never looks like a disc.
    semi_minor = semi_major / uniform(2.5, 4.0, n)
    angle = uniform(0, np.pi, n)
    cos, sin = np.cos(angle)[:, None, None], np.sin(angle)[:, None, None]
    dx, dy = px - centre[:, 0, None, None], py - centre[:, 1, None, None]
    u, v = cos * dx + sin * dy, -sin * dx + cos * dy
    a_, b_ = semi_major[:, None, None], semi_minor[:, None, None]
    distance = (np.hypot(u / a_, v / b_) - 1.0) * b_
    alpha = uniform(0.35, 0.85, n) * (uniform(0, 1, n) < 0.8)
    paint(_coverage(distance) * alpha[:, None, None], distractor_colour())

  def shape_coverage(classes, radius, cx, cy, theta) -> np.ndarray:
    """Anti-aliased coverage (n, H, W) of shapes of the given classes and placements."""
    cos, sin = np.cos(theta)[:, None, None], np.sin(theta)[:, None, None]
    dx, dy = px - cx[:, None, None], py - cy[:, None, None]
    u, v = cos * dx + sin * dy, -sin * dx + cos * dy
    distance = np.empty((n, size, size), np.float32)
    for k in range(num_classes):
      members = classes == k
      if members.any():
        distance[members] = _shape_distance(
          k, u[members], v[members], radius[members, None, None]
        )
    return _coverage(distance)

  def rotation() -> np.ndarray:
    return np.radians(uniform(-_MAX_ROTATION_DEG, _MAX_ROTATION_DEG, n))

  # Decoys: faint (alpha <= 0.35) shapes of OTHER classes, so that "which shape is anywhere in
  # the image" is not enough: the model has to find the one drawn at full contrast.
  for _ in range(num_decoys):
    decoy_class = (label + rng.integers(1, num_classes, n)) % num_classes
    alpha = uniform(0.15, 0.35, n) * (uniform(0, 1, n) < 0.8)
    cover = shape_coverage(
      decoy_class, uniform(*scale_range, n) * size, uniform(0, size, n), uniform(0, size, n),
      rotation(),
    )
    paint(cover * alpha[:, None, None], distractor_colour())

  # The object, drawn last and opaque.
  radius = uniform(*scale_range, n) * size
  margin = _EXTENT * radius + 0.5
  cx = uniform(margin, size - margin)
  cy = uniform(margin, size - margin)
  mask = shape_coverage(label, radius, cx, cy, rotation())
  paint(mask, obj_rgb)

  image = image + np.float32(noise_std) * rng.standard_normal(image.shape, dtype=np.float32)
  image = np.clip(np.round(image * 255.0), 0, 255).astype(np.uint8)

  # Tight box around every pixel the object touches (coverage > 0), in pixel-edge coordinates.
  rows, cols = mask.any(axis=2), mask.any(axis=1)  # (n, H), (n, W)
  idx = np.arange(size)
  box = np.stack(
    [
      np.where(rows, idx, size).min(axis=1),
      np.where(cols, idx, size).min(axis=1),
      np.where(rows, idx, -1).max(axis=1) + 1,
      np.where(cols, idx, -1).max(axis=1) + 1,
    ],
    axis=1,
  ).astype(np.float32)
  return {'image': image, 'label': label, 'box': box, 'mask': mask.astype(np.float32)}


def generate(
  num_examples: int,
  *,
  seed: int,
  image_size: int = 32,
  num_classes: int = len(CLASS_NAMES),
  scale_range: tuple[float, float] = (0.12, 0.25),
  num_strokes: int = 3,
  num_blobs: int = 3,
  num_decoys: int = 2,
  noise_std: float = 0.06,
  return_mask: bool = False,
) -> dict[str, np.ndarray]:
  """Generates the 'shapes' dataset.

  Args:
    num_examples: N, number of images.
    seed: non-negative int; the same seed (and arguments) give identical arrays, and example i
      depends only on (seed, i).
    image_size: H = W in pixels (>= 16).
    num_classes: use the first `num_classes` entries of CLASS_NAMES (2..6).
    scale_range: object radius range as a fraction of image_size; (0, 0.4].
    num_strokes: distractor line segments per image (each present with probability 0.8).
    num_blobs: distractor elongated ellipses per image (each present with probability 0.8).
    num_decoys: faint (alpha 0.15-0.35) shapes of other classes per image (each present with
      probability 0.8), anywhere in the image, drawn under the object.
    noise_std: std of the additive Gaussian pixel noise, in [0, 1] intensity units.
    return_mask: also return the object's anti-aliased coverage mask.

  Returns:
    dict with 'image' uint8 (N, H, W, 3), 'label' int32 (N,), 'box' float32 (N, 4) as
    (y0, x0, y1, x1) in pixels with y1, x1 exclusive (the tight box of every pixel the object
    covers), and with return_mask, 'mask' float32 (N, H, W) in [0, 1].
  """
  if not isinstance(num_examples, (int, np.integer)) or num_examples < 0:
    raise ValueError(f'num_examples must be a non-negative int, got {num_examples!r}.')
  if not isinstance(seed, (int, np.integer)) or seed < 0:
    raise ValueError(f'seed must be a non-negative int, got {seed!r}.')
  if image_size < 16:
    raise ValueError(f'image_size must be >= 16 for the shapes to be legible, got {image_size}.')
  if not 2 <= num_classes <= len(CLASS_NAMES):
    raise ValueError(f'num_classes must be in [2, {len(CLASS_NAMES)}], got {num_classes}.')
  lo, hi = scale_range
  if not 0 < lo <= hi <= 0.4:
    raise ValueError(f'scale_range must satisfy 0 < lo <= hi <= 0.4, got {scale_range}.')
  chunks = [
    _generate_chunk(
      c,
      seed=int(seed),
      image_size=image_size,
      num_classes=num_classes,
      scale_range=(lo, hi),
      num_strokes=num_strokes,
      num_blobs=num_blobs,
      num_decoys=num_decoys,
      noise_std=noise_std,
    )
    for c in range(-(-num_examples // _CHUNK))
  ]
  keys = ['image', 'label', 'box'] + (['mask'] if return_mask else [])
  if not chunks:
    empty = _generate_chunk(0, seed=0, image_size=image_size, num_classes=num_classes,
                            scale_range=(lo, hi), num_strokes=0, num_blobs=0, num_decoys=0,
                            noise_std=0.0)
    return {k: empty[k][:0] for k in keys}
  return {k: np.concatenate([c[k] for c in chunks])[:num_examples] for k in keys}
