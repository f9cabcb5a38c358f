"""Pure CBAM functions for ONE example, channels last.

Every function here takes a single example of shape ``(*spatial, C)`` with one, two or
three spatial dimensions (a signal ``(L, C)``, an image ``(H, W, C)`` or a volume
``(D, H, W, C)``). Batch them with :func:`jax.vmap`; the modules in
:mod:`cbam_jax.attention.cbam` do exactly that.

Reductions (pooling, the logits that enter the gate) are computed in float32 whatever
the input dtype, because bfloat16 sums over thousands of positions lose several digits.
The refined features come back in the input's dtype; attention maps are float32.

Parameters are plain dicts so that the math can be read and tested without Flax:

* channel attention: ``{'fc1_kernel': (C, hidden), 'fc1_bias': (hidden,),
  'fc2_kernel': (hidden, C), 'fc2_bias': (C,)}`` (biases optional);
* spatial attention: ``{'conv_kernel': (*k, 2, 1), 'conv_bias': (1,)}`` (bias optional).
  Input channel 0 of the kernel sees the channel mean and channel 1 the channel max, the
  paper's ``[AvgPool; MaxPool]`` order.

NaN and Inf in the input propagate to the output; nothing is masked. Through the channel
branch a NaN anywhere in an example reaches that example's whole output (every pool keeps
it, and the MLP mixes all channels); through the spatial branch alone it spreads only
``kernel_size // 2`` positions. Examples never mix, except through BatchNorm batch
statistics in training.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import chex
import jax
import jax.numpy as jnp
from flax.typing import Dtype, PrecisionLike

from cbam_jax import _validation
from cbam_jax._fast.spatial_conv import _spatial_conv, resolve_impl, spatial_conv

Array = jax.Array
Params = Mapping[str, Array]
Activation = Callable[[Array], Array]

POOL_TYPES = _validation.POOL_TYPES
ORDERS = ('channel_first', 'spatial_first', 'parallel')
HIDDEN_ROUNDINGS = ('floor', 'round')

__all__ = [
    'POOL_TYPES',
    'ORDERS',
    'HIDDEN_ROUNDINGS',
    'hidden_size',
    'global_pool',
    'channel_pool',
    'shared_mlp',
    'channel_logits',
    'channel_attention',
    'spatial_logits',
    'spatial_attention',
    'spatial_conv',
    'cbam',
    'gate_in_order',
    'apply_gate',
]


def hidden_size(channels: int, reduction_ratio: float = 16, hidden_features: int | None = None,
                hidden_rounding: str = 'floor', hidden_divisor: int = 1) -> int:
  """The bottleneck width of a ``C -> hidden -> C`` attention MLP.

  Args:
    channels: ``C``.
    reduction_ratio: ``r``.
    hidden_features: an explicit width (>= 1); overrides the rest.
    hidden_rounding: ``'floor'`` (the official code: ``max(1, C // r)``) or ``'round'``
      (timm's ``make_divisible(C / r, hidden_divisor)``: the nearest multiple, at least one).
    hidden_divisor: with ``'round'``, the width is a multiple of this.

  Returns:
    The hidden width, a positive int.
  """
  if hidden_features is not None:
    if hidden_features < 1:
      raise ValueError(f'hidden_features must be >= 1, got {hidden_features}.')
    return hidden_features
  if reduction_ratio <= 0:
    raise ValueError(f'reduction_ratio must be positive, got {reduction_ratio}.')
  _validation.check_choice('hidden_rounding', hidden_rounding, HIDDEN_ROUNDINGS)
  if isinstance(hidden_divisor, bool) or not isinstance(hidden_divisor, int) or hidden_divisor < 1:
    raise ValueError(f'hidden_divisor must be a positive int, got {hidden_divisor!r}.')
  if hidden_rounding == 'floor':  # Official code: C // r.
    if hidden_divisor != 1:
      raise ValueError(f'hidden_divisor={hidden_divisor} needs hidden_rounding=\'round\' '
                       '(timm\'s make_divisible); \'floor\' is the official C // r.')
    return max(1, int(channels // reduction_ratio))
  value = channels / reduction_ratio
  return max(hidden_divisor, int(value + hidden_divisor / 2) // hidden_divisor * hidden_divisor)


def global_pool(x: Array, kind: str) -> Array:
  """Pools every spatial position of one example into a channel descriptor.

  Args:
    x: ``(*spatial, C)`` features.
    kind: ``'avg'``, ``'max'``, ``'lp'`` (the official code's ``lp_pool2d`` with p=2 over
      the whole map: ``sqrt(sum(x**2))``, not normalised) or ``'lse'`` (a numerically
      stable log-sum-exp over all positions).

  Returns:
    ``(C,)`` float32 descriptor.
  """
  _validation.check_features(x, batched=False)
  _validation.check_choice('pool type', kind, POOL_TYPES)
  return _global_pool(x, kind)


# The unchecked cores (_global_pool, _channel_pool, _channel_logits, _spatial_logits,
# _gate_in_order) serve the checked public functions and the batched modules
# (cbam_jax.attention.cbam, cbam_jax._fast), whose inputs their own boundary has checked:
# every call validates its input once, and resolves the spatial conv's impl once.


def _global_pool(x: Array, kind: str) -> Array:
  flat = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
  if kind == 'avg':
    pooled = jnp.mean(flat, axis=0)
  elif kind == 'max':
    pooled = jnp.max(flat, axis=0)
  elif kind == 'lp':
    pooled = jnp.sqrt(jnp.sum(jnp.square(flat), axis=0))
  else:
    pooled = jax.nn.logsumexp(flat, axis=0)
  chex.assert_shape(pooled, (x.shape[-1],))
  return pooled


def channel_pool(x: Array) -> Array:
  """Per-position mean and max across channels, in that order (the paper's ``[avg; max]``).

  Args:
    x: ``(*spatial, C)`` features.

  Returns:
    ``(*spatial, 2)`` float32: ``[..., 0]`` is the channel mean, ``[..., 1]`` the max.
  """
  _validation.check_features(x, batched=False)
  return _channel_pool(x)


def _channel_pool(x: Array) -> Array:
  x32 = x.astype(jnp.float32)
  pooled = jnp.stack([jnp.mean(x32, axis=-1), jnp.max(x32, axis=-1)], axis=-1)
  chex.assert_shape(pooled, (*x.shape[:-1], 2))
  return pooled


def shared_mlp(
    params: Params,
    v: Array,
    *,
    activation: Activation = jax.nn.relu,
    dtype: Dtype | None = None,
    precision: PrecisionLike = None,
) -> Array:
  """The shared bottleneck MLP ``C -> hidden -> C`` of the channel branch.

  Args:
    params: ``fc1_kernel (C, hidden)``, ``fc2_kernel (hidden, C)`` and optional
      ``fc1_bias (hidden,)``, ``fc2_bias (C,)``.
    v: ``(..., C)`` pooled descriptor(s).
    activation: the hidden non-linearity (ReLU in the paper).
    dtype: compute dtype; ``None`` promotes ``v`` and the parameters together, as
      ``flax.linen.Dense`` does.
    precision: passed to :func:`jax.numpy.dot`.

  Returns:
    ``(..., C)`` float32 logits.
  """
  if dtype is None:
    dtype = jnp.result_type(v, *params.values())
  h = jnp.dot(v.astype(dtype), params['fc1_kernel'].astype(dtype), precision=precision)
  if 'fc1_bias' in params:
    h = h + params['fc1_bias'].astype(dtype)
  h = activation(h)
  out = jnp.dot(h, params['fc2_kernel'].astype(dtype), precision=precision)
  if 'fc2_bias' in params:
    out = out + params['fc2_bias'].astype(dtype)
  return out.astype(jnp.float32)


def channel_logits(
    params: Params,
    x: Array,
    *,
    pool_types: Sequence[str] = ('avg', 'max'),
    activation: Activation = jax.nn.relu,
    dtype: Dtype | None = None,
    precision: PrecisionLike = None,
) -> Array:
  """``sum_p MLP(pool_p(x))``: the pre-gate channel attention, ``(C,)`` float32."""
  _validation.check_features(x, batched=False)
  _validation.check_pool_types(pool_types)
  _validation.check_channels(x, params['fc1_kernel'].shape[0], 'channel attention')
  return _channel_logits(params, x, pool_types=pool_types, activation=activation, dtype=dtype,
                         precision=precision)


def _channel_logits(params: Params, x: Array, *, pool_types: Sequence[str],
                    activation: Activation, dtype: Dtype | None, precision: PrecisionLike) -> Array:
  # One MLP pass over the stacked descriptors: the same shared weights for every pool.
  pooled = jnp.stack([_global_pool(x, kind) for kind in pool_types])
  logits = shared_mlp(params, pooled, activation=activation, dtype=dtype,
                      precision=precision)
  return jnp.sum(logits, axis=0)


def apply_gate(x: Array, attention_map: Array) -> Array:
  """``x * map`` computed in float32, returned in ``x``'s dtype. Broadcasts the map."""
  return (x.astype(jnp.float32) * attention_map).astype(x.dtype)


def channel_attention(
    params: Params,
    x: Array,
    *,
    pool_types: Sequence[str] = ('avg', 'max'),
    activation: Activation = jax.nn.relu,
    gate: Activation = jax.nn.sigmoid,
    dtype: Dtype | None = None,
    precision: PrecisionLike = None,
    return_map: bool = False,
) -> Array | tuple[Array, Array]:
  """``Mc(x) * x`` with ``Mc = gate(sum_p MLP(pool_p(x)))``.

  Args:
    params: see :func:`shared_mlp`.
    x: ``(*spatial, C)``.
    return_map: also return the ``(C,)`` float32 channel map.

  Returns:
    ``(*spatial, C)`` refined features in ``x.dtype``, and the map when asked.
  """
  channel_map = gate(channel_logits(params, x, pool_types=pool_types,
                                    activation=activation, dtype=dtype,
                                    precision=precision))
  out = apply_gate(x, channel_map)
  return (out, channel_map) if return_map else out


def spatial_logits(
    params: Params,
    x: Array,
    *,
    dtype: Dtype | None = None,
    precision: PrecisionLike = None,
    impl: str = 'auto',
) -> Array:
  """``conv_k([AvgPool_c(x); MaxPool_c(x)])``: the pre-gate spatial map, ``(*spatial,)``.

  ``impl`` selects the convolution algorithm (see :func:`cbam_jax.functional.spatial_conv`);
  every choice gives the same numbers.
  """
  _validation.check_features(x, batched=False)
  _validation.check_spatial_kernel(params['conv_kernel'], x, batched=False)
  return _spatial_logits(params, x, dtype=dtype, precision=precision, impl=resolve_impl(impl))


def _spatial_logits(params: Params, x: Array, *, dtype: Dtype | None, precision: PrecisionLike,
                    impl: str) -> Array:
  """:func:`spatial_logits` unchecked, ``impl`` resolved (``'xla'`` or ``'shift'``)."""
  kernel = params['conv_kernel']
  pooled = _channel_pool(x)
  if dtype is None:
    dtype = jnp.result_type(pooled, kernel)
  logits = _spatial_conv(pooled.astype(dtype), kernel.astype(dtype), precision=precision,
                         impl=impl)
  if 'conv_bias' in params:
    logits = logits + params['conv_bias'].astype(dtype)[0]
  return logits.astype(jnp.float32)


def spatial_attention(
    params: Params,
    x: Array,
    *,
    normalize: Activation | None = None,
    gate: Activation = jax.nn.sigmoid,
    dtype: Dtype | None = None,
    precision: PrecisionLike = None,
    impl: str = 'auto',
    return_map: bool = False,
) -> Array | tuple[Array, Array]:
  """``Ms(x) * x`` with ``Ms = gate(normalize(conv_k([avg_c; max_c])))``.

  Args:
    params: see :func:`spatial_logits`.
    x: ``(*spatial, C)``.
    normalize: optional map applied to the logits before the gate, e.g. an inference-mode
      BatchNorm ``lambda z: (z - mean) / sqrt(var + eps) * scale + bias``.
    return_map: also return the ``(*spatial,)`` float32 spatial map.

  Returns:
    ``(*spatial, C)`` refined features in ``x.dtype``, and the map when asked.
  """
  logits = spatial_logits(params, x, dtype=dtype, precision=precision, impl=impl)
  if normalize is not None:
    logits = normalize(logits)
  spatial_map = gate(logits)
  out = apply_gate(x, spatial_map[..., None])
  return (out, spatial_map) if return_map else out


def cbam(
    channel_params: Params,
    spatial_params: Params,
    x: Array,
    *,
    order: str = 'channel_first',
    pool_types: Sequence[str] = ('avg', 'max'),
    activation: Activation = jax.nn.relu,
    gate: Activation = jax.nn.sigmoid,
    normalize: Activation | None = None,
    dtype: Dtype | None = None,
    precision: PrecisionLike = None,
    impl: str = 'auto',
    return_maps: bool = False,
) -> Array | tuple[Array, tuple[Array, Array]]:
  """The Convolutional Block Attention Module on one example.

  ``order='channel_first'`` (the paper): ``F' = Mc(F) * F``, ``F'' = Ms(F') * F'``.
  ``'spatial_first'`` swaps the two, ``'parallel'`` computes both maps from ``F`` and
  applies them together: ``F'' = Mc(F) * Ms(F) * F``.

  Returns:
    ``(*spatial, C)`` in ``x.dtype``; with ``return_maps`` also ``(channel_map (C,),
    spatial_map (*spatial,))`` in float32.
  """
  # Checked once here; the branches below run the unchecked cores (each gate sees ``x`` or
  # ``x`` refined by the other gate, of the same shape).
  _validation.check_choice('order', order, ORDERS)
  _validation.check_features(x, batched=False)
  _validation.check_pool_types(pool_types)
  _validation.check_channels(x, channel_params['fc1_kernel'].shape[0], 'channel attention')
  _validation.check_spatial_kernel(spatial_params['conv_kernel'], x, batched=False)
  impl = resolve_impl(impl)
  maps = {}

  def channel_gate(inp):
    maps['channel'] = gate(_channel_logits(channel_params, inp, pool_types=pool_types,
                                           activation=activation, dtype=dtype,
                                           precision=precision))
    return maps['channel']

  def spatial_gate(inp):
    logits = _spatial_logits(spatial_params, inp, dtype=dtype, precision=precision, impl=impl)
    if normalize is not None:
      logits = normalize(logits)
    maps['spatial'] = gate(logits)
    return maps['spatial'][..., None]

  out = _gate_in_order(x, channel_gate, spatial_gate, order)[0]
  return (out, (maps['channel'], maps['spatial'])) if return_maps else out


def gate_in_order(
    x: Array,
    channel_gate: Callable[[Array], Array] | None,
    spatial_gate: Callable[[Array], Array] | None,
    *,
    order: str = 'channel_first',
) -> tuple[Array, Array | None, Array | None]:
  """CBAM's composition of its two gates, for one example or a batch.

  Args:
    x: features.
    channel_gate, spatial_gate: ``inp -> map`` broadcastable against ``inp``; ``None``
      switches that branch off (then ``order`` does not matter); not both.
    order: see :func:`cbam`.

  Returns:
    The refined features in ``x.dtype`` and the two maps as the gates returned them
    (``None`` for a branch that is off).
  """
  _validation.check_choice('order', order, ORDERS)
  return _gate_in_order(x, channel_gate, spatial_gate, order)


def _gate_in_order(x: Array, channel_gate: Callable[[Array], Array] | None,
                   spatial_gate: Callable[[Array], Array] | None,
                   order: str) -> tuple[Array, Array | None, Array | None]:
  """:func:`gate_in_order` with ``order`` checked by the caller (its fields)."""
  if spatial_gate is None:
    if channel_gate is None:
      raise ValueError('gate_in_order got no gate (channel_gate and spatial_gate are both '
                       'None); pass at least one.')
    channel_map = channel_gate(x)
    return apply_gate(x, channel_map), channel_map, None
  if channel_gate is None:
    spatial_map = spatial_gate(x)
    return apply_gate(x, spatial_map), None, spatial_map
  if order == 'channel_first':
    channel_map = channel_gate(x)
    refined = apply_gate(x, channel_map)
    spatial_map = spatial_gate(refined)
    out = apply_gate(refined, spatial_map)
  elif order == 'spatial_first':
    spatial_map = spatial_gate(x)
    refined = apply_gate(x, spatial_map)
    channel_map = channel_gate(refined)
    out = apply_gate(refined, channel_map)
  else:
    channel_map = channel_gate(x)
    spatial_map = spatial_gate(x)
    out = apply_gate(x, channel_map * spatial_map)
  return out, channel_map, spatial_map
