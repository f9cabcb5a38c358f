"""The pure single-example CBAM functions against the lecture's numbers and NumPy references."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.signal
from jax.test_util import check_grads

from cbam_jax import functional as F

# The lecture's example: C = H = W = 2, laid out channels last as (H, W, C).
LECTURE_CHANNEL_0 = np.array([[1., 2.], [3., 4.]], np.float32)
LECTURE_CHANNEL_1 = np.array([[5., 6.], [7., 8.]], np.float32)
LECTURE_X = np.stack([LECTURE_CHANNEL_0, LECTURE_CHANNEL_1], axis=-1)


def channel_params(key, channels: int, hidden: int, bias: bool = True,
                   dtype=jnp.float32) -> dict[str, jax.Array]:
  keys = jax.random.split(key, 4)
  params = {
      'fc1_kernel': jax.random.normal(keys[0], (channels, hidden), dtype),
      'fc2_kernel': jax.random.normal(keys[1], (hidden, channels), dtype),
  }
  if bias:
    params['fc1_bias'] = jax.random.normal(keys[2], (hidden,), dtype)
    params['fc2_bias'] = jax.random.normal(keys[3], (channels,), dtype)
  return params


def spatial_params(key, kernel_size: tuple[int, ...], bias: bool = True,
                   dtype=jnp.float32) -> dict[str, jax.Array]:
  keys = jax.random.split(key, 2)
  # Small weights keep the logits away from saturation, so the maps carry information.
  params = {'conv_kernel': 0.3 * jax.random.normal(keys[0], (*kernel_size, 2, 1), dtype)}
  if bias:
    params['conv_bias'] = jax.random.normal(keys[1], (1,), dtype)
  return params


def np_sigmoid(z):
  return 1 / (1 + np.exp(-z))


def np_global_pool(x, kind):
  flat = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
  if kind == 'avg':
    return flat.mean(0)
  if kind == 'max':
    return flat.max(0)
  if kind == 'lp':
    return np.sqrt((flat ** 2).sum(0))
  return np.logaddexp.reduce(flat, axis=0)


def np_mlp(params, v):
  p = {k: np.asarray(a, np.float64) for k, a in params.items()}
  h = v @ p['fc1_kernel'] + p.get('fc1_bias', 0.)
  return np.maximum(h, 0.) @ p['fc2_kernel'] + p.get('fc2_bias', 0.)


def np_channel_map(params, x, pool_types=('avg', 'max')):
  return np_sigmoid(sum(np_mlp(params, np_global_pool(x, kind)) for kind in pool_types))


def np_spatial_map(params, x):
  x = np.asarray(x, np.float64)
  kernel = np.asarray(params['conv_kernel'], np.float64)
  # Paper order: kernel input channel 0 sees the channel mean, channel 1 the channel max.
  # Same-padded cross-correlation, as lax.conv (and torch's Conv2d) compute.
  logits = (scipy.signal.correlate(x.mean(-1), kernel[..., 0, 0], mode='same')
            + scipy.signal.correlate(x.max(-1), kernel[..., 1, 0], mode='same'))
  if 'conv_bias' in params:
    logits = logits + float(params['conv_bias'][0])
  return np_sigmoid(logits)


def random_features(key, shape, dtype=jnp.float32):
  return jax.random.normal(key, shape, dtype)


# The worked example: X with channel 0 = [[1,2],[3,4]] and channel 1 = [[5,6],[7,8]].


def test_channel_pool(variant):
  pooled = variant(F.channel_pool)(LECTURE_X)
  np.testing.assert_array_equal(pooled[..., 0], [[3., 4.], [5., 6.]])  # Channel-wise mean.
  np.testing.assert_array_equal(pooled[..., 1], [[5., 6.], [7., 8.]])  # Channel-wise max.
  assert pooled.dtype == jnp.float32


def test_global_pool_avg_and_max(variant):
  # The slide prints 6.25 for channel 1's average, but (5 + 6 + 7 + 8) / 4 = 6.5.
  avg = variant(functools.partial(F.global_pool, kind='avg'))(LECTURE_X)
  np.testing.assert_array_equal(avg, [2.5, 6.5])
  peak = variant(functools.partial(F.global_pool, kind='max'))(LECTURE_X)
  np.testing.assert_array_equal(peak, [4., 8.])


def test_global_pool_lp_and_lse(variant):
  # 'lp' is the official lp_pool2d with p=2 over the whole map: sqrt(sum x^2), unnormalised.
  lp = variant(functools.partial(F.global_pool, kind='lp'))(LECTURE_X)
  np.testing.assert_allclose(lp, [np.sqrt(1 + 4 + 9 + 16), np.sqrt(25 + 36 + 49 + 64)],
                             rtol=1e-6)
  lse = variant(functools.partial(F.global_pool, kind='lse'))(LECTURE_X)
  expected = [np.log(np.exp([1., 2., 3., 4.]).sum()), np.log(np.exp([5., 6., 7., 8.]).sum())]
  np.testing.assert_allclose(lse, expected, rtol=1e-6)


def test_lse_is_stable_for_large_values(variant):
  # exp(1000) overflows float32 (and float64); a stable log-sum-exp does not.
  x = LECTURE_X + np.array([1000., -1000.], np.float32)
  lse = variant(functools.partial(F.global_pool, kind='lse'))(x)
  chex.assert_tree_all_finite(lse)
  expected = np_global_pool(np.asarray(x, np.float64), 'lse')
  np.testing.assert_allclose(lse, expected, rtol=1e-6)
  np.testing.assert_allclose(lse[0], 1004. + np.log(np.exp([-3., -2., -1., 0.]).sum()),
                             rtol=1e-6)


@pytest.mark.parametrize('shape', [(6, 3), (4, 5, 3), (2, 3, 4, 3)])
def test_global_pool_matches_numpy(variant, shape):
  x = random_features(jax.random.key(0), shape)
  for kind in F.POOL_TYPES:
    pooled = variant(functools.partial(F.global_pool, kind=kind))(x)
    chex.assert_shape(pooled, (shape[-1],))
    np.testing.assert_allclose(pooled, np_global_pool(x, kind), rtol=1e-5, atol=1e-6,
                               err_msg=kind)


@pytest.mark.parametrize('shape', [(6, 3), (4, 5, 3), (2, 3, 4, 3)])
def test_channel_pool_matches_numpy(variant, shape):
  x = random_features(jax.random.key(0), shape)
  pooled = variant(F.channel_pool)(x)
  chex.assert_shape(pooled, (*shape[:-1], 2))
  np.testing.assert_allclose(pooled[..., 0], np.mean(x, -1), rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(pooled[..., 1], np.max(x, -1))


@pytest.mark.parametrize('bias', [True, False])
def test_shared_mlp_matches_numpy(variant, bias):
  params = channel_params(jax.random.key(0), 6, 3, bias=bias)
  v = random_features(jax.random.key(1), (2, 6))
  out = variant(F.shared_mlp)(params, v)
  np.testing.assert_allclose(out, np_mlp(params, np.asarray(v, np.float64)), rtol=1e-5,
                             atol=1e-5)


def test_channel_attention_matches_numpy(variant):
  params = channel_params(jax.random.key(0), 4, 2)
  x = random_features(jax.random.key(1), (5, 6, 4))
  for pool_types in [('avg', 'max'), ('avg',), ('max',), ('avg', 'max', 'lp', 'lse')]:
    fn = functools.partial(F.channel_attention, pool_types=pool_types, return_map=True)
    out, channel_map = variant(fn)(params, x)
    expected_map = np_channel_map(params, x, pool_types)
    np.testing.assert_allclose(channel_map, expected_map, rtol=1e-5, atol=1e-6,
                               err_msg=str(pool_types))
    np.testing.assert_allclose(out, np.asarray(x) * expected_map, rtol=1e-5, atol=1e-6)
    assert channel_map.dtype == jnp.float32


@pytest.mark.parametrize('shape, kernel_size, bias', [
    ((9, 3), (5,), True), ((6, 7, 3), (3, 5), False), ((4, 5, 6, 3), (3, 3, 3), True)])
def test_spatial_attention_matches_numpy(variant, shape, kernel_size, bias):
  params = spatial_params(jax.random.key(2), kernel_size, bias=bias)
  x = random_features(jax.random.key(3), shape)
  fn = functools.partial(F.spatial_attention, return_map=True)
  out, spatial_map = variant(fn)(params, x)
  expected_map = np_spatial_map(params, x)
  chex.assert_shape(spatial_map, shape[:-1])
  np.testing.assert_allclose(spatial_map, expected_map, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out, np.asarray(x) * expected_map[..., None], rtol=1e-5,
                             atol=1e-6)


def test_spatial_attention_normalize_runs_before_gate():
  params = spatial_params(jax.random.key(2), (3, 3), bias=False)
  x = random_features(jax.random.key(3), (5, 6, 4))
  fn = functools.partial(F.spatial_attention, normalize=lambda z: 2. * z - 1.,
                         return_map=True)
  _, spatial_map = fn(params, x)
  logits = np.log(np_spatial_map(params, x)) - np.log1p(-np_spatial_map(params, x))
  np.testing.assert_allclose(spatial_map, np_sigmoid(2. * logits - 1.), rtol=1e-5,
                             atol=1e-6)


# ``order`` against a hand composition of the branch functions.


def _cbam_inputs():
  """Channel-branch parameters, spatial-branch parameters and x, the same in every test."""
  return (channel_params(jax.random.key(0), 4, 2), spatial_params(jax.random.key(1), (3, 3)),
          random_features(jax.random.key(2), (5, 6, 4)))


def _hand_composition(order):
  c_params, s_params, x = _cbam_inputs()
  ca = functools.partial(F.channel_attention, c_params, return_map=True)
  sa = functools.partial(F.spatial_attention, s_params, return_map=True)
  if order == 'channel_first':
    refined, channel_map = ca(x)
    out, spatial_map = sa(refined)
  elif order == 'spatial_first':
    refined, spatial_map = sa(x)
    out, channel_map = ca(refined)
  else:  # 'parallel': x * Mc(x) * Ms(x), both maps from the input.
    _, channel_map = ca(x)
    _, spatial_map = sa(x)
    out = x * channel_map * spatial_map[..., None]
  return out, (channel_map, spatial_map)


@pytest.mark.parametrize('order', F.ORDERS)
def test_order_matches_hand_composition(variant, order):
  c_params, s_params, x = _cbam_inputs()
  fn = functools.partial(F.cbam, order=order, return_maps=True)
  out, maps = variant(fn)(c_params, s_params, x)
  expected_out, expected_maps = _hand_composition(order)
  chex.assert_trees_all_close(out, expected_out, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(maps, expected_maps, rtol=1e-5, atol=1e-6)
  # The orders differ, so a swapped order cannot pass the check above.
  for other in F.ORDERS:
    if other != order:
      assert float(jnp.max(jnp.abs(out - _hand_composition(other)[0]))) > 1e-3


def test_channel_first_is_the_paper(variant):
  # F' = Mc(F) * F ; F'' = Ms(F') * F', with the NumPy references.
  c_params, s_params, x = _cbam_inputs()
  out = variant(F.cbam)(c_params, s_params, x)
  refined = np.asarray(x, np.float64) * np_channel_map(c_params, x)
  expected = refined * np_spatial_map(s_params, refined)[..., None]
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('shape', [(7, 4), (5, 6, 4), (3, 4, 5, 4)])
def test_maps_shapes_and_range(shape):
  nd = len(shape) - 1
  x = 3. * random_features(jax.random.key(4), shape)
  fn = functools.partial(F.cbam, return_maps=True)
  out, (channel_map, spatial_map) = fn(
      _cbam_inputs()[0], spatial_params(jax.random.key(6), (3,) * nd), x)
  chex.assert_shape([out, channel_map, spatial_map], [shape, (4,), shape[:-1]])
  chex.assert_type([channel_map, spatial_map], jnp.float32)
  for attention_map in (channel_map, spatial_map):
    assert bool(jnp.all((attention_map >= 0) & (attention_map <= 1)))


# Reverse-mode gradients against finite differences (float32, random inputs: no ties).


def _assert_grads(fn, *args):
  # Jitted: one program instead of a compilation per op for every finite difference.
  check_grads(jax.jit(fn), args, order=1, modes=('rev',), eps=1e-2, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize('kind', F.POOL_TYPES)
def test_gradient_of_global_pool(kind):
  x = random_features(jax.random.key(0), (3, 4, 4))
  _assert_grads(functools.partial(F.global_pool, kind=kind), x)


def test_gradient_of_channel_pool():
  _assert_grads(F.channel_pool, random_features(jax.random.key(1), (3, 4, 4)))


def test_gradient_of_shared_mlp():
  params = channel_params(jax.random.key(2), 4, 2)
  _assert_grads(F.shared_mlp, params, random_features(jax.random.key(3), (4,)))


def test_gradient_of_channel_attention():
  params = channel_params(jax.random.key(4), 4, 2)
  fn = functools.partial(F.channel_attention, pool_types=('avg', 'max', 'lp', 'lse'))
  _assert_grads(fn, params, random_features(jax.random.key(5), (3, 4, 4)))


def test_gradient_of_spatial_attention():
  params = spatial_params(jax.random.key(6), (3, 3))
  _assert_grads(F.spatial_attention, params, random_features(jax.random.key(7), (3, 4, 4)))


@pytest.mark.parametrize('order', F.ORDERS)
def test_gradient_of_cbam(order):
  fn = functools.partial(F.cbam, order=order)
  _assert_grads(fn, channel_params(jax.random.key(8), 4, 2),
                spatial_params(jax.random.key(9), (3, 3)),
                random_features(jax.random.key(10), (3, 4, 4)))


def test_bfloat16_close_to_float32(variant):
  c_params = channel_params(jax.random.key(0), 4, 2)
  s_params = spatial_params(jax.random.key(1), (3, 3))
  x16 = random_features(jax.random.key(2), (5, 6, 4), jnp.bfloat16)
  for order in F.ORDERS:
    fn = variant(functools.partial(F.cbam, order=order, return_maps=True))
    out16, maps16 = fn(c_params, s_params, x16)
    out32, maps32 = fn(c_params, s_params, x16.astype(jnp.float32))
    assert out16.dtype == jnp.bfloat16
    chex.assert_type(maps16, jnp.float32)
    np.testing.assert_allclose(out16.astype(jnp.float32), out32, rtol=2e-2, atol=2e-2,
                               err_msg=order)
    chex.assert_trees_all_close(maps16, maps32, atol=2e-2)


def test_pooling_is_float32_for_bfloat16(variant):
  # 1 + 2^-7 is exact in bfloat16; the float32 mean and lp-norm of 256 copies are exact too.
  x = jnp.full((16, 16, 2), 1 + 2 ** -7, jnp.bfloat16)
  assert variant(F.channel_pool)(x).dtype == jnp.float32
  avg = variant(functools.partial(F.global_pool, kind='avg'))(x)
  assert avg.dtype == jnp.float32
  np.testing.assert_allclose(avg, [1 + 2 ** -7] * 2, rtol=1e-7)
  lp = variant(functools.partial(F.global_pool, kind='lp'))(x)
  np.testing.assert_allclose(lp, [16 * (1 + 2 ** -7)] * 2, rtol=1e-6)


# NaN and Inf propagate (nothing is masked), as the module docstring promises.


def test_docstring_promises_propagation():
  assert 'NaN and Inf in the input propagate' in F.__doc__


@pytest.mark.parametrize('value', [jnp.nan, jnp.inf])
def test_every_pool_keeps_non_finite_values(value):
  x = random_features(jax.random.key(0), (5, 6, 4)).at[1, 2, 0].set(value)
  for kind in F.POOL_TYPES:
    pooled = F.global_pool(x, kind)
    assert not bool(jnp.isfinite(pooled[0])), kind
    chex.assert_tree_all_finite(pooled[1:])
  both = F.channel_pool(x)
  assert not bool(jnp.any(jnp.isfinite(both[1, 2])))
  chex.assert_tree_all_finite(both[0])


def test_nan_spreads_through_the_channel_mlp():
  x = random_features(jax.random.key(0), (5, 5, 4)).at[1, 2, 0].set(jnp.nan)
  out = F.channel_attention(channel_params(jax.random.key(1), 4, 2), x)
  # The pooled NaN enters fc1, which mixes every channel: the whole output is NaN.
  assert bool(jnp.all(jnp.isnan(out)))


@pytest.mark.parametrize('value', [jnp.nan, jnp.inf])
def test_non_finite_stays_local_in_the_spatial_branch(value):
  x = random_features(jax.random.key(0), (5, 6, 4)).at[3, 4, 1].set(value)
  fn = functools.partial(F.spatial_attention, return_map=True)
  out, spatial_map = fn(spatial_params(jax.random.key(1), (3, 3)), x)
  assert not bool(jnp.all(jnp.isfinite(out[3, 4])))
  assert not (bool(jnp.isfinite(spatial_map[3, 4])) and value != jnp.inf)
  # A 3x3 kernel carries the value one step; the far corner is untouched.
  chex.assert_tree_all_finite(out[:2, :2])


@pytest.mark.parametrize('order', F.ORDERS)
def test_nan_reaches_cbam_output(order):
  x = random_features(jax.random.key(0), (5, 6, 4)).at[2, 3, 1].set(jnp.nan)
  fn = functools.partial(F.cbam, order=order)
  out = fn(channel_params(jax.random.key(1), 4, 2),
           spatial_params(jax.random.key(2), (3, 3)), x)
  assert bool(jnp.isnan(out[2, 3]).all())


# Every bad input gets a ValueError/TypeError that names the problem.


@pytest.mark.parametrize('shape', [(4,), (2, 2, 2, 2, 3)])
def test_wrong_rank(variant, shape):
  with pytest.raises(ValueError, match=r'1 to 3 spatial dimensions.*rank'):
    variant(F.channel_pool)(jnp.ones(shape))


def test_integer_input(variant):
  with pytest.raises(TypeError, match='floating-point features.*int32'):
    variant(functools.partial(F.global_pool, kind='avg'))(jnp.ones((3, 3, 2), jnp.int32))


@pytest.mark.parametrize('shape', [(0, 3, 2), (3, 0, 2), (3, 3, 0)])
def test_empty_axis(variant, shape):
  with pytest.raises(ValueError, match='empty axis'):
    variant(F.channel_pool)(jnp.ones(shape))


def test_unknown_pool_type():
  with pytest.raises(ValueError, match="Unknown pool type 'median'"):
    F.global_pool(jnp.ones((3, 3, 2)), 'median')
  with pytest.raises(ValueError, match="Unknown pool type 'median'"):
    F.channel_attention(channel_params(jax.random.key(0), 2, 1), jnp.ones((3, 3, 2)),
                        pool_types=('avg', 'median'))
  with pytest.raises(ValueError, match='non-empty sequence'):
    F.channel_attention(channel_params(jax.random.key(0), 2, 1), jnp.ones((3, 3, 2)),
                        pool_types='avg')


def test_unknown_order():
  with pytest.raises(ValueError, match="Unknown order 'sideways'"):
    F.cbam(channel_params(jax.random.key(0), 2, 1), spatial_params(jax.random.key(1), (3, 3)),
           jnp.ones((3, 3, 2)), order='sideways')


def test_channel_count_mismatch():
  with pytest.raises(ValueError, match='initialised for 8 channels but got 16'):
    F.channel_attention(channel_params(jax.random.key(0), 8, 2), jnp.ones((3, 3, 16)))


@pytest.mark.parametrize('kernel_size', [(6, 6), (0, 3), (3, 4)])
def test_bad_kernel_size(kernel_size):
  with pytest.raises(ValueError, match='positive odd integer'):
    F.spatial_attention({'conv_kernel': jnp.ones((*kernel_size, 2, 1))}, jnp.ones((5, 5, 2)))


def test_kernel_rank_mismatch():
  with pytest.raises(ValueError, match=r'\(\*kernel_size, 2, 1\).*2-D input'):
    F.spatial_attention(spatial_params(jax.random.key(0), (3,)), jnp.ones((5, 5, 2)))
