"""See where a network looks: attention maps, Grad-CAM and localisation scores.

Everything here works on any linen module tree and needs no change to the models:

* :func:`attention_maps` runs a model and returns every sown ``channel_map`` ``(B, C)`` and
  ``spatial_map`` ``(B, H, W)`` grouped by block name, e.g.
  ``{'layer1_0': {'channel_map': ..., 'spatial_map': ...}, ...}``.
* :func:`upsample` resizes maps to the input resolution (bilinear, half-pixel centres).
* :func:`grad_cam` computes Grad-CAM (Selvaraju et al., ICCV 2017; CBAM paper Fig. 4) on the
  output of any named module, by intercepting that module's ``__call__`` with
  :func:`flax.linen.intercept_methods` and adding a zero "probe" whose gradient is
  ``d score / d activation``.
* :func:`top_channels` lists the channels with the highest mean channel attention.
* :func:`attention_mass_in_box` and :func:`pointing_game` score maps against ground-truth
  boxes ``(y0, x0, y1, x1)`` in pixels.

Inference runs with ``train=False`` (BatchNorm on running statistics), so each example's
result depends on that example only.
"""

from __future__ import annotations

import inspect as _pyinspect  # the standard library module (absolute import)
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

Array = jax.Array

__all__ = [
    'MAP_NAMES', 'attention_maps', 'attention_mass_in_box', 'box_mask', 'flatten_intermediates',
    'grad_cam', 'module_output', 'normalize_maps', 'pointing_game', 'top_channels',
    'upsample',
]

# The names every attention module of this package sows its maps under.
MAP_NAMES = ('channel_map', 'spatial_map')
# Trailing path components dropped to name the block that owns a map: the branch modules of
# CBAM ('channel', 'spatial') and the models' per-block attention submodule ('attention').
DEFAULT_STRIP = ('attention', 'channel', 'spatial')


def _join(path: Iterable[Any]) -> str:
  return '/'.join(str(p) for p in path)


def _split(name: str | Iterable[str]) -> tuple[str, ...]:
  if isinstance(name, str):
    return tuple(p for p in name.split('/') if p)
  return tuple(name)


def flatten_intermediates(intermediates: Mapping[str, Any]) -> dict[str, Array]:
  """Flattens an ``'intermediates'`` collection to ``{'a/b/name': array}``.

  Sown values are tuples (one entry per call). A single call gives ``'a/b/name'``; a module
  called ``n > 1`` times gives ``'a/b/name[0]'`` ... ``'a/b/name[n-1]'``.

  Args:
    intermediates: the nested dict ``model.apply(..., mutable=['intermediates'])`` returns
      under ``'intermediates'``.

  Returns:
    A flat dict from ``/``-joined paths to arrays.
  """
  flat = {}
  for path, value in traverse_util.flatten_dict(dict(intermediates)).items():
    key = _join(path)
    if isinstance(value, (tuple, list)):
      if len(value) == 1:
        flat[key] = value[0]
      else:
        for i, v in enumerate(value):
          flat[f'{key}[{i}]'] = v
    else:
      flat[key] = value
  return flat


def _with_eval_mode(model: nn.Module, apply_kwargs: Mapping[str, Any]) -> dict[str, Any]:
  """``apply_kwargs`` plus ``train=False`` when ``model.__call__`` takes ``train``."""
  apply_kwargs = dict(apply_kwargs)
  if 'train' not in apply_kwargs:
    parameters: Mapping[str, Any]
    try:
      parameters = _pyinspect.signature(type(model).__call__).parameters
    except (TypeError, ValueError):
      parameters = {}
    if 'train' in parameters:
      apply_kwargs['train'] = False
  return apply_kwargs


def _group_maps(flat: Mapping[str, Array], map_names: tuple[str, ...],
                strip: tuple[str, ...]) -> dict[str, dict[str, Array]]:
  grouped: dict[str, dict[str, Array]] = {}
  for key, value in flat.items():
    *owner, leaf = key.split('/')
    name, bracket, index = leaf.partition('[')
    if name not in map_names:
      continue
    while owner and owner[-1] in strip:
      owner.pop()
    block = _join(owner) + (f'[{index}' if bracket else '')
    if name in grouped.setdefault(block, {}):
      raise ValueError(
          f'Two {name!r} maps both map to the block name {block!r} (one is {key!r}). Pass '
          'strip=() to name blocks by their full module paths.')
    grouped[block][name] = value
  return grouped


def attention_maps(
    model: nn.Module,
    variables: Mapping[str, Any],
    x: Array,
    *,
    map_names: Iterable[str] = MAP_NAMES,
    strip: Iterable[str] = DEFAULT_STRIP,
    return_output: bool = False,
    **apply_kwargs: Any,
) -> dict[str, dict[str, Array]] | tuple[Any, dict[str, dict[str, Array]]]:
  """Runs ``model`` and returns its sown attention maps by block name.

  The ``'intermediates'`` collection is walked generically: paths are joined with ``'/'``,
  the tuple ``sow`` wraps values in is removed, and trailing path components in ``strip``
  are dropped to name the owning block. In the ResNets
  ``layer1_0/attention/channel/channel_map`` becomes ``maps['layer1_0']['channel_map']``;
  a bare ``CBAM`` gives the block name ``''`` (the root module).

  Args:
    model: any linen module whose submodules sow maps (CBAM, its branches, SE, ResNets).
    variables: its variables (``params``, optionally ``batch_stats``); existing
      intermediates are ignored.
    x: input batch, e.g. ``(B, H, W, C)``.
    map_names: leaf names to collect.
    strip: trailing module names dropped from a map's path to name its block.
    return_output: also return the model's output.
    **apply_kwargs: forwarded to ``model.apply``; ``train`` defaults to ``False`` when
      ``model.__call__`` takes it.

  Returns:
    ``{block: {'channel_map': (B, C), 'spatial_map': (B, *spatial)}}`` (only the maps that
    block sows), or ``(output, maps)`` with ``return_output=True``.
  """
  apply_kwargs = _with_eval_mode(model, apply_kwargs)
  variables = {k: v for k, v in variables.items() if k != 'intermediates'}
  output, state = model.apply(variables, x, mutable=['intermediates'], **apply_kwargs)
  maps = _group_maps(flatten_intermediates(state.get('intermediates', {})),
                     tuple(map_names), tuple(strip))
  return (output, maps) if return_output else maps


def upsample(maps: Array, size: Sequence[int] | int, method: str = 'bilinear') -> Array:
  """Resizes ``(B, h, w)`` maps to ``(B, *size)`` with :func:`jax.image.resize`.

  ``jax.image.resize`` uses half-pixel centres: output pixel ``i`` samples the input at
  ``(i + 0.5) * h / H - 0.5``, i.e. PyTorch's ``interpolate(..., align_corners=False)``
  (and TF2 ``tf.image.resize``), not ``align_corners=True``. Out-of-range samples at the
  border are clamped by renormalising the kernel, so a constant map stays constant, and with
  an integer factor ``s = H / h`` the centre of cell ``i`` lands on the centre of the pixel
  block ``[s*i, s*(i+1))`` (for a stride-``s`` feature map, the block it summarises).

  Args:
    maps: ``(B, h, w)`` or ``(h, w)`` float maps.
    size: target ``(H, W)`` or one int for both.
    method: any :func:`jax.image.resize` method (``'bilinear'``, ``'nearest'``, ``'cubic'``).

  Returns:
    float32 maps of shape ``(B, H, W)`` (or ``(H, W)``).
  """
  maps = jnp.asarray(maps)
  if maps.ndim not in (2, 3):
    raise ValueError(f'upsample expects (B, h, w) or (h, w) maps, got shape {maps.shape}. '
                     'Channel maps (B, C) have no spatial extent; upsample spatial maps.')
  size = (size, size) if isinstance(size, int) else tuple(size)
  if len(size) != 2 or any(int(s) < 1 for s in size):
    raise ValueError(f'size must be a positive (H, W) pair or int, got {size!r}.')
  shape = maps.shape[:-2] + tuple(int(s) for s in size)
  return jax.image.resize(maps.astype(jnp.float32), shape, method=method)


def normalize_maps(maps: Array, kind: str = 'minmax', eps: float = 1e-12) -> Array:
  """Scales each map of ``(B, ...)`` to [0, 1].

  Args:
    maps: ``(B, ...)`` float maps.
    kind: ``'minmax'`` ``(m - min) / (max - min)`` (what the reference Grad-CAM code does) or
      ``'max'`` ``m / max`` (keeps zero at zero; for non-negative maps).
    eps: a map with ``max - min <= eps`` (``max <= eps`` for ``'max'``) becomes all zeros.

  Returns:
    float32 maps of the same shape.
  """
  if kind not in ('minmax', 'max'):
    raise ValueError(f"kind must be 'minmax' or 'max', got {kind!r}.")
  maps = jnp.asarray(maps, jnp.float32)
  axes = tuple(range(1, maps.ndim))
  hi = maps.max(axis=axes, keepdims=True)
  lo = maps.min(axis=axes, keepdims=True) if kind == 'minmax' else jnp.zeros_like(hi)
  span = hi - lo
  return jnp.where(span > eps, (maps - lo) / jnp.where(span > eps, span, 1.0), 0.0)


def _path_matcher(block: str | Iterable[str]):
  target = _split(block)

  def matches(context) -> bool:
    return context.method_name == '__call__' and tuple(context.module.path) == target

  return target, matches


def module_output(model: nn.Module, variables: Mapping[str, Any], x: Array,
                  block: str | Iterable[str], **apply_kwargs: Any) -> tuple[Any, Array]:
  """Runs ``model`` and returns ``(output, activation)`` of the module at path ``block``.

  Args:
    model, variables, x: as for :func:`attention_maps`.
    block: the module's path, ``'layer4_1'`` or ``'layer2_0/attention'`` (``/``-joined
      names as in the ``params`` tree).
    **apply_kwargs: forwarded to ``model.apply``; ``train`` defaults to ``False`` when
      ``model.__call__`` takes it.

  Returns:
    The model output and the block's ``__call__`` output.
  """
  output, activation, _ = _probed_apply(model, variables, x, block, None, apply_kwargs)
  return output, activation


def _probed_apply(model, variables, x, block, probe, apply_kwargs):
  """Applies ``model`` adding ``probe`` (if given) to the output of module ``block``."""
  apply_kwargs = _with_eval_mode(model, apply_kwargs)
  variables = {k: v for k, v in variables.items() if k != 'intermediates'}
  target, matches = _path_matcher(block)
  captured = []
  called = set()

  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.method_name == '__call__':
      called.add(tuple(context.module.path))
    if matches(context):
      if not hasattr(out, 'shape'):
        raise TypeError(f'Module {_join(target)!r} returns {type(out).__name__}; Grad-CAM '
                        'needs a module whose __call__ returns one array.')
      captured.append(out)
      if probe is not None:
        out = out + probe.astype(out.dtype)
    return out

  with nn.intercept_methods(interceptor):
    output = model.apply(variables, x, **apply_kwargs)
  if not captured:
    paths = sorted(_join(p) for p in called if p)
    shown = ', '.join(paths[:40]) + (f', ... ({len(paths) - 40} more)' if len(paths) > 40 else '')
    raise ValueError(f'No module at path {_join(target)!r} was called. Called modules: '
                     f'{shown or "none"}. Use a /-joined module path from this list.')
  if len(captured) > 1:
    raise ValueError(f'Module {_join(target)!r} was called {len(captured)} times; Grad-CAM '
                     'needs a module called once per forward pass.')
  return output, captured[0], target


def grad_cam(
    model: nn.Module,
    variables: Mapping[str, Any],
    x: Array,
    block: str | Iterable[str],
    target: Array | int | None = None,
    *,
    normalize: str | None = 'minmax',
    score_fn: Callable[[Array, Array], Array] | None = None,
    return_logits: bool = False,
    **apply_kwargs: Any,
) -> Array | tuple[Array, Array]:
  """Grad-CAM of the output ``A`` (``(B, H, W, C)``) of the module at path ``block``.

  ``w_c = mean_{h,w} d score / d A[h, w, c]``, ``cam = relu(sum_c w_c A[..., c])``, then
  each map is scaled to [0, 1] (see :func:`normalize_maps`). The score is the pre-softmax
  logit of ``target`` (the predicted class by default), as in the Grad-CAM paper.

  The gradient is taken with respect to a zero array added to the module's output through
  :func:`flax.linen.intercept_methods`, so no change to the model is needed and the
  forward pass is unchanged. Jittable with ``model`` and ``block`` static.

  Args:
    model: a linen classifier returning logits ``(B, num_classes)``.
    variables: its variables.
    x: ``(B, H_in, W_in, C_in)`` input batch.
    block: path of the module to explain, e.g. ``'layer4_1'`` (the last block: CBAM Fig. 4).
    target: class per example ``(B,)`` or one int for all; ``None`` = argmax of the logits.
    normalize: ``'minmax'``, ``'max'`` or ``None`` (raw ``relu(sum_c w_c A_c)``).
    score_fn: ``score_fn(logits, target) -> (B,)`` to explain something else than a logit.
    return_logits: also return the logits.
    **apply_kwargs: forwarded to ``model.apply``; ``train`` defaults to ``False`` when
      ``model.__call__`` takes it.

  Returns:
    float32 maps ``(B, H, W)`` at the block's resolution (use :func:`upsample`), and the
    logits with ``return_logits=True``.
  """
  if normalize not in (None, 'minmax', 'max'):
    raise ValueError(f"normalize must be 'minmax', 'max' or None, got {normalize!r}.")
  _, activation_shape = jax.eval_shape(
      lambda v, inp: module_output(model, v, inp, block, **apply_kwargs), variables, x)
  if len(activation_shape.shape) != 4:
    raise ValueError(f'Grad-CAM needs a (B, H, W, C) activation; {block!r} gives shape '
                     f'{activation_shape.shape}. Pick a 2-D convolutional block.')

  def scores(probe):
    logits, activation, _ = _probed_apply(model, variables, x, block, probe, apply_kwargs)
    if target is None:
      chosen = jnp.argmax(logits, axis=-1)
    else:
      chosen = jnp.broadcast_to(jnp.asarray(target, jnp.int32), logits.shape[:1])
    chosen = jax.lax.stop_gradient(chosen)
    if score_fn is None:
      per_example = jnp.take_along_axis(logits, chosen[:, None], axis=-1)[:, 0]
    else:
      per_example = score_fn(logits, chosen)
    # Examples are independent at inference, so d sum / d A_b = d score_b / d A_b.
    return per_example.astype(jnp.float32).sum(), (activation, logits)

  probe = jnp.zeros(activation_shape.shape, activation_shape.dtype)
  grads, (activation, logits) = jax.grad(scores, has_aux=True)(probe)
  weights = grads.astype(jnp.float32).mean(axis=(1, 2))  # (B, C)
  cam = jax.nn.relu(jnp.einsum('bhwc,bc->bhw', activation.astype(jnp.float32), weights))
  if normalize is not None:
    cam = normalize_maps(cam, normalize)
  return (cam, logits) if return_logits else cam


def top_channels(maps: Mapping[str, Mapping[str, Array]] | Array, k: int = 3
                 ) -> dict[str, tuple[Array, Array]] | tuple[Array, Array]:
  """The ``k`` channels with the highest batch-mean channel attention.

  Args:
    maps: the output of :func:`attention_maps` (blocks without ``channel_map`` are
      skipped), or one ``(B, C)`` channel map.
    k: how many channels; clipped to ``C``.

  Returns:
    ``{block: (indices (k,), mean values (k,))}`` sorted by decreasing value, or one pair.
  """
  if k < 1:
    raise ValueError(f'k must be >= 1, got {k}.')

  def one(channel_map):
    channel_map = jnp.asarray(channel_map)
    if channel_map.ndim != 2:
      raise ValueError(f'A channel map must be (B, C), got shape {channel_map.shape}.')
    values, indices = jax.lax.top_k(channel_map.astype(jnp.float32).mean(axis=0),
                                    min(k, channel_map.shape[1]))
    return indices, values

  if not isinstance(maps, Mapping):
    return one(maps)
  return {block: one(m['channel_map']) for block, m in maps.items() if 'channel_map' in m}


def _check_maps_boxes(maps, boxes) -> tuple[Array, Array]:
  maps = jnp.asarray(maps, jnp.float32)
  boxes = jnp.asarray(boxes, jnp.float32)
  if maps.ndim != 3:
    raise ValueError(f'maps must be (B, H, W), got shape {maps.shape}; upsample maps to the '
                     'image resolution the boxes are given in first.')
  if boxes.shape != (maps.shape[0], 4):
    raise ValueError(f'boxes must be (B, 4) = (y0, x0, y1, x1) pixels with B={maps.shape[0]}, '
                     f'got shape {boxes.shape}.')
  return maps, boxes


def _pixel_centres(size: int) -> Array:
  return jnp.arange(size, dtype=jnp.float32) + 0.5


def box_mask(boxes: Array, size: Sequence[int]) -> Array:
  """``(B, H, W)`` float mask of pixels whose centre ``(i + 0.5, j + 0.5)`` is in the box.

  Pixel ``i`` covers ``[i, i + 1)``; a box ``(y0, x0, y1, x1)`` covers ``[y0, y1] x [x0, x1]``,
  so integer boxes with exclusive ends ``y1, x1`` select rows ``y0..y1-1`` and columns
  ``x0..x1-1``.
  """
  boxes = jnp.asarray(boxes, jnp.float32)
  ys, xs = _pixel_centres(size[0]), _pixel_centres(size[1])
  in_y = (ys[None] >= boxes[:, 0:1]) & (ys[None] <= boxes[:, 2:3])
  in_x = (xs[None] >= boxes[:, 1:2]) & (xs[None] <= boxes[:, 3:4])
  return (in_y[:, :, None] & in_x[:, None, :]).astype(jnp.float32)


def attention_mass_in_box(maps: Array, boxes: Array, eps: float = 1e-12) -> Array:
  """Fraction of each map's mass inside its box: ``sum_{in box} m / sum m``.

  A uniform map scores the box's area fraction (the chance level); compare against
  ``box_mask(boxes, size).mean(axis=(1, 2))``.

  Args:
    maps: ``(B, H, W)`` non-negative maps at the boxes' resolution.
    boxes: ``(B, 4)`` ``(y0, x0, y1, x1)`` in pixels (see :func:`box_mask`).
    eps: a map with total mass ``<= eps`` scores 0.

  Returns:
    float32 ``(B,)`` in [0, 1].
  """
  maps, boxes = _check_maps_boxes(maps, boxes)
  maps = jnp.maximum(maps, 0.0)
  total = maps.sum(axis=(1, 2))
  inside = (maps * box_mask(boxes, maps.shape[1:])).sum(axis=(1, 2))
  return jnp.where(total > eps, inside / jnp.where(total > eps, total, 1.0), 0.0)


def pointing_game(maps: Array, boxes: Array, tolerance: float = 0.0) -> Array:
  """Pointing game (Zhang et al., 2016): is the map's maximum on the object?

  A hit when the centre of the argmax pixel (first one in row-major order on ties) lies
  within ``tolerance`` pixels (Euclidean) of the box ``[y0, y1] x [x0, x1]``; the original
  protocol uses 15.

  Args:
    maps: ``(B, H, W)`` maps at the boxes' resolution.
    boxes: ``(B, 4)`` ``(y0, x0, y1, x1)`` in pixels.
    tolerance: distance in pixels, >= 0.

  Returns:
    bool ``(B,)``; its mean is the hit rate.
  """
  if tolerance < 0:
    raise ValueError(f'tolerance must be >= 0 pixels, got {tolerance}.')
  maps, boxes = _check_maps_boxes(maps, boxes)
  width = maps.shape[2]
  flat_index = jnp.argmax(maps.reshape(maps.shape[0], -1), axis=-1)
  y = (flat_index // width).astype(jnp.float32) + 0.5
  x = (flat_index % width).astype(jnp.float32) + 0.5
  dy = jnp.maximum(jnp.maximum(boxes[:, 0] - y, y - boxes[:, 2]), 0.0)
  dx = jnp.maximum(jnp.maximum(boxes[:, 1] - x, x - boxes[:, 3]), 0.0)
  return dy * dy + dx * dx <= tolerance * tolerance
