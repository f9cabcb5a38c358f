"""The pure single-example CBAM functions against the lecture's numbers and NumPy references."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.signal
from absl.testing import parameterized
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


class LectureExampleTest(chex.TestCase):
  """The worked example: X with channel 0 = [[1,2],[3,4]] and channel 1 = [[5,6],[7,8]]."""

  @chex.variants(with_jit=True, without_jit=True)
  def test_channel_pool(self):
    pooled = self.variant(F.channel_pool)(LECTURE_X)
    np.testing.assert_array_equal(pooled[..., 0], [[3., 4.], [5., 6.]])  # Channel-wise mean.
    np.testing.assert_array_equal(pooled[..., 1], [[5., 6.], [7., 8.]])  # Channel-wise max.
    self.assertEqual(pooled.dtype, jnp.float32)

  @chex.variants(with_jit=True, without_jit=True)
  def test_global_pool_avg_and_max(self):
    # The slide prints 6.25 for channel 1's average, but (5 + 6 + 7 + 8) / 4 = 6.5.
    avg = self.variant(functools.partial(F.global_pool, kind='avg'))(LECTURE_X)
    np.testing.assert_array_equal(avg, [2.5, 6.5])
    peak = self.variant(functools.partial(F.global_pool, kind='max'))(LECTURE_X)
    np.testing.assert_array_equal(peak, [4., 8.])

  @chex.variants(with_jit=True, without_jit=True)
  def test_global_pool_lp_and_lse(self):
    # 'lp' is the official lp_pool2d with p=2 over the whole map: sqrt(sum x^2), unnormalised.
    lp = self.variant(functools.partial(F.global_pool, kind='lp'))(LECTURE_X)
    np.testing.assert_allclose(lp, [np.sqrt(1 + 4 + 9 + 16), np.sqrt(25 + 36 + 49 + 64)],
                               rtol=1e-6)
    lse = self.variant(functools.partial(F.global_pool, kind='lse'))(LECTURE_X)
    expected = [np.log(np.exp([1., 2., 3., 4.]).sum()), np.log(np.exp([5., 6., 7., 8.]).sum())]
    np.testing.assert_allclose(lse, expected, rtol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_lse_is_stable_for_large_values(self):
    # exp(1000) overflows float32 (and float64); a stable log-sum-exp does not.
    x = LECTURE_X + np.array([1000., -1000.], np.float32)
    lse = self.variant(functools.partial(F.global_pool, kind='lse'))(x)
    chex.assert_tree_all_finite(lse)
    expected = np_global_pool(np.asarray(x, np.float64), 'lse')
    np.testing.assert_allclose(lse, expected, rtol=1e-6)
    np.testing.assert_allclose(lse[0], 1004. + np.log(np.exp([-3., -2., -1., 0.]).sum()),
                               rtol=1e-6)


class PoolingTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters((6, 3), (4, 5, 3), (2, 3, 4, 3))
  def test_global_pool_matches_numpy(self, *shape):
    x = random_features(jax.random.key(0), shape)
    for kind in F.POOL_TYPES:
      pooled = self.variant(functools.partial(F.global_pool, kind=kind))(x)
      chex.assert_shape(pooled, (shape[-1],))
      np.testing.assert_allclose(pooled, np_global_pool(x, kind), rtol=1e-5, atol=1e-6,
                                 err_msg=kind)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters((6, 3), (4, 5, 3), (2, 3, 4, 3))
  def test_channel_pool_matches_numpy(self, *shape):
    x = random_features(jax.random.key(0), shape)
    pooled = self.variant(F.channel_pool)(x)
    chex.assert_shape(pooled, (*shape[:-1], 2))
    np.testing.assert_allclose(pooled[..., 0], np.mean(x, -1), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(pooled[..., 1], np.max(x, -1))


class AttentionTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(True, False)
  def test_shared_mlp_matches_numpy(self, bias):
    params = channel_params(jax.random.key(0), 6, 3, bias=bias)
    v = random_features(jax.random.key(1), (2, 6))
    out = self.variant(F.shared_mlp)(params, v)
    np.testing.assert_allclose(out, np_mlp(params, np.asarray(v, np.float64)), rtol=1e-5,
                               atol=1e-5)

  @chex.variants(with_jit=True, without_jit=True)
  def test_channel_attention_matches_numpy(self):
    params = channel_params(jax.random.key(0), 4, 2)
    x = random_features(jax.random.key(1), (5, 6, 4))
    for pool_types in [('avg', 'max'), ('avg',), ('max',), ('avg', 'max', 'lp', 'lse')]:
      fn = functools.partial(F.channel_attention, pool_types=pool_types, return_map=True)
      out, channel_map = self.variant(fn)(params, x)
      expected_map = np_channel_map(params, x, pool_types)
      np.testing.assert_allclose(channel_map, expected_map, rtol=1e-5, atol=1e-6,
                                 err_msg=str(pool_types))
      np.testing.assert_allclose(out, np.asarray(x) * expected_map, rtol=1e-5, atol=1e-6)
      self.assertEqual(channel_map.dtype, jnp.float32)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(((9, 3), (5,), True), ((6, 7, 3), (3, 5), False),
                            ((4, 5, 6, 3), (3, 3, 3), True))
  def test_spatial_attention_matches_numpy(self, shape, kernel_size, bias):
    params = spatial_params(jax.random.key(2), kernel_size, bias=bias)
    x = random_features(jax.random.key(3), shape)
    fn = functools.partial(F.spatial_attention, return_map=True)
    out, spatial_map = self.variant(fn)(params, x)
    expected_map = np_spatial_map(params, x)
    chex.assert_shape(spatial_map, shape[:-1])
    np.testing.assert_allclose(spatial_map, expected_map, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out, np.asarray(x) * expected_map[..., None], rtol=1e-5,
                               atol=1e-6)

  @chex.variants(without_jit=True)
  def test_spatial_attention_normalize_runs_before_gate(self):
    params = spatial_params(jax.random.key(2), (3, 3), bias=False)
    x = random_features(jax.random.key(3), (5, 6, 4))
    fn = functools.partial(F.spatial_attention, normalize=lambda z: 2. * z - 1.,
                           return_map=True)
    _, spatial_map = self.variant(fn)(params, x)
    logits = np.log(np_spatial_map(params, x)) - np.log1p(-np_spatial_map(params, x))
    np.testing.assert_allclose(spatial_map, np_sigmoid(2. * logits - 1.), rtol=1e-5,
                               atol=1e-6)


class CbamOrderTest(chex.TestCase):
  """``order`` against a hand composition of the branch functions."""

  def setUp(self):
    super().setUp()
    self.channel_params = channel_params(jax.random.key(0), 4, 2)
    self.spatial_params = spatial_params(jax.random.key(1), (3, 3))
    self.x = random_features(jax.random.key(2), (5, 6, 4))

  def hand_composition(self, order):
    ca = functools.partial(F.channel_attention, self.channel_params, return_map=True)
    sa = functools.partial(F.spatial_attention, self.spatial_params, return_map=True)
    if order == 'channel_first':
      refined, channel_map = ca(self.x)
      out, spatial_map = sa(refined)
    elif order == 'spatial_first':
      refined, spatial_map = sa(self.x)
      out, channel_map = ca(refined)
    else:  # 'parallel': x * Mc(x) * Ms(x), both maps from the input.
      _, channel_map = ca(self.x)
      _, spatial_map = sa(self.x)
      out = self.x * channel_map * spatial_map[..., None]
    return out, (channel_map, spatial_map)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(*F.ORDERS)
  def test_order_matches_hand_composition(self, order):
    fn = functools.partial(F.cbam, order=order, return_maps=True)
    out, maps = self.variant(fn)(self.channel_params, self.spatial_params, self.x)
    expected_out, expected_maps = self.hand_composition(order)
    chex.assert_trees_all_close(out, expected_out, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(maps, expected_maps, rtol=1e-5, atol=1e-6)
    # The orders differ, so a swapped order cannot pass the check above.
    for other in F.ORDERS:
      if other != order:
        self.assertGreater(float(jnp.max(jnp.abs(out - self.hand_composition(other)[0]))),
                           1e-3)

  @chex.variants(with_jit=True, without_jit=True)
  def test_channel_first_is_the_paper(self):
    # F' = Mc(F) * F ; F'' = Ms(F') * F', with the NumPy references.
    out = self.variant(F.cbam)(self.channel_params, self.spatial_params, self.x)
    refined = np.asarray(self.x, np.float64) * np_channel_map(self.channel_params, self.x)
    expected = refined * np_spatial_map(self.spatial_params, refined)[..., None]
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)

  @chex.variants(without_jit=True)
  @parameterized.parameters((7, 4), (5, 6, 4), (3, 4, 5, 4))
  def test_maps_shapes_and_range(self, *shape):
    nd = len(shape) - 1
    x = 3. * random_features(jax.random.key(4), shape)
    fn = functools.partial(F.cbam, return_maps=True)
    out, (channel_map, spatial_map) = self.variant(fn)(
        self.channel_params, spatial_params(jax.random.key(6), (3,) * nd), x)
    chex.assert_shape([out, channel_map, spatial_map], [shape, (4,), shape[:-1]])
    chex.assert_type([channel_map, spatial_map], jnp.float32)
    for attention_map in (channel_map, spatial_map):
      self.assertTrue(bool(jnp.all((attention_map >= 0) & (attention_map <= 1))))


class GradientTest(chex.TestCase):
  """Reverse-mode gradients against finite differences (float32, random inputs: no ties)."""

  def assert_grads(self, fn, *args):
    # Jitted: one program instead of a compilation per op for every finite difference.
    check_grads(jax.jit(fn), args, order=1, modes=('rev',), eps=1e-2, atol=2e-2, rtol=2e-2)

  @parameterized.parameters(*F.POOL_TYPES)
  def test_global_pool(self, kind):
    x = random_features(jax.random.key(0), (3, 4, 4))
    self.assert_grads(functools.partial(F.global_pool, kind=kind), x)

  def test_channel_pool(self):
    self.assert_grads(F.channel_pool, random_features(jax.random.key(1), (3, 4, 4)))

  def test_shared_mlp(self):
    params = channel_params(jax.random.key(2), 4, 2)
    self.assert_grads(F.shared_mlp, params, random_features(jax.random.key(3), (4,)))

  def test_channel_attention(self):
    params = channel_params(jax.random.key(4), 4, 2)
    fn = functools.partial(F.channel_attention, pool_types=('avg', 'max', 'lp', 'lse'))
    self.assert_grads(fn, params, random_features(jax.random.key(5), (3, 4, 4)))

  def test_spatial_attention(self):
    params = spatial_params(jax.random.key(6), (3, 3))
    self.assert_grads(F.spatial_attention, params, random_features(jax.random.key(7), (3, 4, 4)))

  @parameterized.parameters(*F.ORDERS)
  def test_cbam(self, order):
    fn = functools.partial(F.cbam, order=order)
    self.assert_grads(fn, channel_params(jax.random.key(8), 4, 2),
                      spatial_params(jax.random.key(9), (3, 3)),
                      random_features(jax.random.key(10), (3, 4, 4)))


class DtypeTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_bfloat16_close_to_float32(self):
    c_params = channel_params(jax.random.key(0), 4, 2)
    s_params = spatial_params(jax.random.key(1), (3, 3))
    x16 = random_features(jax.random.key(2), (5, 6, 4), jnp.bfloat16)
    for order in F.ORDERS:
      fn = self.variant(functools.partial(F.cbam, order=order, return_maps=True))
      out16, maps16 = fn(c_params, s_params, x16)
      out32, maps32 = fn(c_params, s_params, x16.astype(jnp.float32))
      self.assertEqual(out16.dtype, jnp.bfloat16)
      chex.assert_type(maps16, jnp.float32)
      np.testing.assert_allclose(out16.astype(jnp.float32), out32, rtol=2e-2, atol=2e-2,
                                 err_msg=order)
      chex.assert_trees_all_close(maps16, maps32, atol=2e-2)

  @chex.variants(with_jit=True, without_jit=True)
  def test_pooling_is_float32_for_bfloat16(self):
    # 1 + 2^-7 is exact in bfloat16; the float32 mean and lp-norm of 256 copies are exact too.
    x = jnp.full((16, 16, 2), 1 + 2 ** -7, jnp.bfloat16)
    self.assertEqual(self.variant(F.channel_pool)(x).dtype, jnp.float32)
    avg = self.variant(functools.partial(F.global_pool, kind='avg'))(x)
    self.assertEqual(avg.dtype, jnp.float32)
    np.testing.assert_allclose(avg, [1 + 2 ** -7] * 2, rtol=1e-7)
    lp = self.variant(functools.partial(F.global_pool, kind='lp'))(x)
    np.testing.assert_allclose(lp, [16 * (1 + 2 ** -7)] * 2, rtol=1e-6)


class NonFiniteTest(chex.TestCase):
  """NaN and Inf propagate (nothing is masked), as the module docstring promises."""

  def test_docstring_promises_propagation(self):
    self.assertIn('NaN and Inf in the input propagate', F.__doc__)

  @parameterized.parameters(jnp.nan, jnp.inf)
  def test_every_pool_keeps_non_finite_values(self, value):
    x = random_features(jax.random.key(0), (5, 6, 4)).at[1, 2, 0].set(value)
    for kind in F.POOL_TYPES:
      pooled = F.global_pool(x, kind)
      self.assertFalse(bool(jnp.isfinite(pooled[0])), kind)
      chex.assert_tree_all_finite(pooled[1:])
    both = F.channel_pool(x)
    self.assertFalse(bool(jnp.any(jnp.isfinite(both[1, 2]))))
    chex.assert_tree_all_finite(both[0])

  @chex.variants(without_jit=True)
  def test_nan_spreads_through_the_channel_mlp(self):
    x = random_features(jax.random.key(0), (5, 5, 4)).at[1, 2, 0].set(jnp.nan)
    out = self.variant(F.channel_attention)(channel_params(jax.random.key(1), 4, 2), x)
    # The pooled NaN enters fc1, which mixes every channel: the whole output is NaN.
    self.assertTrue(bool(jnp.all(jnp.isnan(out))))

  @chex.variants(without_jit=True)
  @parameterized.parameters(jnp.nan, jnp.inf)
  def test_non_finite_stays_local_in_the_spatial_branch(self, value):
    x = random_features(jax.random.key(0), (5, 6, 4)).at[3, 4, 1].set(value)
    fn = functools.partial(F.spatial_attention, return_map=True)
    out, spatial_map = self.variant(fn)(spatial_params(jax.random.key(1), (3, 3)), x)
    self.assertFalse(bool(jnp.all(jnp.isfinite(out[3, 4]))))
    self.assertFalse(bool(jnp.isfinite(spatial_map[3, 4])) and value != jnp.inf)
    # A 3x3 kernel carries the value one step; the far corner is untouched.
    chex.assert_tree_all_finite(out[:2, :2])

  @chex.variants(without_jit=True)
  @parameterized.parameters(*F.ORDERS)
  def test_nan_reaches_cbam_output(self, order):
    x = random_features(jax.random.key(0), (5, 6, 4)).at[2, 3, 1].set(jnp.nan)
    fn = functools.partial(F.cbam, order=order)
    out = self.variant(fn)(channel_params(jax.random.key(1), 4, 2),
                           spatial_params(jax.random.key(2), (3, 3)), x)
    self.assertTrue(bool(jnp.isnan(out[2, 3]).all()))


class ErrorTest(chex.TestCase):
  """Every bad input gets a ValueError/TypeError that names the problem."""

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters((4,), (2, 2, 2, 2, 3))
  def test_wrong_rank(self, *shape):
    with pytest.raises(ValueError, match=r'1 to 3 spatial dimensions.*rank'):
      self.variant(F.channel_pool)(jnp.ones(shape))

  @chex.variants(with_jit=True, without_jit=True)
  def test_integer_input(self):
    with pytest.raises(TypeError, match='floating-point features.*int32'):
      self.variant(functools.partial(F.global_pool, kind='avg'))(jnp.ones((3, 3, 2), jnp.int32))

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters((0, 3, 2), (3, 0, 2), (3, 3, 0))
  def test_empty_axis(self, *shape):
    with pytest.raises(ValueError, match='empty axis'):
      self.variant(F.channel_pool)(jnp.ones(shape))

  def test_unknown_pool_type(self):
    with pytest.raises(ValueError, match="Unknown pool type 'median'"):
      F.global_pool(jnp.ones((3, 3, 2)), 'median')
    with pytest.raises(ValueError, match="Unknown pool type 'median'"):
      F.channel_attention(channel_params(jax.random.key(0), 2, 1), jnp.ones((3, 3, 2)),
                          pool_types=('avg', 'median'))
    with pytest.raises(ValueError, match='non-empty sequence'):
      F.channel_attention(channel_params(jax.random.key(0), 2, 1), jnp.ones((3, 3, 2)),
                          pool_types='avg')

  def test_unknown_order(self):
    with pytest.raises(ValueError, match="Unknown order 'sideways'"):
      F.cbam(channel_params(jax.random.key(0), 2, 1), spatial_params(jax.random.key(1), (3, 3)),
             jnp.ones((3, 3, 2)), order='sideways')

  def test_channel_count_mismatch(self):
    with pytest.raises(ValueError, match='initialised for 8 channels but got 16'):
      F.channel_attention(channel_params(jax.random.key(0), 8, 2), jnp.ones((3, 3, 16)))

  @parameterized.parameters((6, 6), (0, 3), (3, 4))
  def test_bad_kernel_size(self, *kernel_size):
    with pytest.raises(ValueError, match='positive odd integer'):
      F.spatial_attention({'conv_kernel': jnp.ones((*kernel_size, 2, 1))}, jnp.ones((5, 5, 2)))

  def test_kernel_rank_mismatch(self):
    with pytest.raises(ValueError, match=r'\(\*kernel_size, 2, 1\).*2-D input'):
      F.spatial_attention(spatial_params(jax.random.key(0), (3,)), jnp.ones((5, 5, 2)))
