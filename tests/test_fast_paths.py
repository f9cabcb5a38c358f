"""The fast spatial-conv paths give the ``lax.conv`` reference's numbers and gradients."""

from __future__ import annotations

import functools

import chex
import flax.linen
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cbam_jax import functional as F
from cbam_jax._fast.logits import batched_spatial_logits, channel_pool_planes
from cbam_jax._fast.pool import mean_max
from cbam_jax._fast.spatial_conv import resolve_impl, spatial_conv, spatial_conv_planes
from cbam_jax.attention.cbam import CBAM

TOL = dict(atol=1e-5, rtol=1e-5)

# (batch, spatial, kernel_size): 1-D, 2-D and 3-D; sizes smaller than the kernel, even and
# odd sizes, kernels 3/5/7 and mixed; a width over the 64-wide kernel-gradient block.
CONV_CASES = [
    pytest.param(2, (3,), (7,), id='1d_shorter_than_k7'),
    pytest.param(2, (6, 8), (7, 7), id='2d_k7_even'),
    pytest.param(3, (3, 5), (5, 5), id='2d_k5_odd_h_w_below_k'),
    pytest.param(1, (2, 70), (3, 5), id='2d_mixed_k_wide_blocks'),
    # The full suite only: the 3-D programs (105 taps) take seconds to compile.
    pytest.param(1, (2, 5, 3), (5, 3, 7), id='3d_mixed_below_k', marks=pytest.mark.slow),
]


def _random(key_index: int, shape, scale: float = 1.0) -> jax.Array:
  return scale * jax.random.normal(jax.random.PRNGKey(key_index), shape, jnp.float32)


def _value_and_grads(conv, planes, kernel, cotangent):
  return jax.value_and_grad(lambda p, k: jnp.vdot(conv(p, k), cotangent), argnums=(0, 1))(
      planes, kernel), conv(planes, kernel)


@pytest.mark.parametrize('batch, spatial, kernel_size', CONV_CASES)
def test_shift_matches_xla_outputs_and_gradients(batch, spatial, kernel_size):
  planes = _random(0, (2, batch, *spatial))
  kernel = _random(1, (*kernel_size, 2, 1), 0.3)
  cotangent = _random(2, (batch, *spatial))
  results = {
      impl: jax.jit(functools.partial(
          _value_and_grads, functools.partial(spatial_conv_planes, impl=impl)))(
              planes, kernel, cotangent)
      for impl in ('xla', 'shift')}
  (_, (grad_planes_ref, grad_kernel_ref)), out_ref = results['xla']
  (_, (grad_planes, grad_kernel)), out = results['shift']
  assert out.shape == (batch, *spatial)
  chex.assert_trees_all_close(out, out_ref, **TOL)
  chex.assert_trees_all_close(grad_planes, grad_planes_ref, **TOL)
  chex.assert_trees_all_close(grad_kernel, grad_kernel_ref, **TOL)


def test_kernel_gradient_matches_float64_sum():
  # Independent of XLA's conv: the defining sum in numpy float64.
  planes = np.asarray(_random(3, (2, 2, 5, 6)), np.float64)
  grad = np.asarray(_random(4, (2, 5, 6)), np.float64)
  kernel = _random(5, (3, 5, 2, 1))
  _, vjp = jax.vjp(lambda k: spatial_conv_planes(jnp.asarray(planes, jnp.float32), k,
                                                 impl='shift'), kernel)
  (grad_kernel,) = vjp(jnp.asarray(grad, jnp.float32))
  padded = np.pad(planes, [(0, 0), (0, 0), (1, 1), (2, 2)])
  expected = np.zeros((3, 5, 2, 1))
  for i in range(3):
    for j in range(5):
      expected[i, j, :, 0] = np.einsum('cbyx,byx->c', padded[:, :, i:i + 5, j:j + 6], grad)
  np.testing.assert_allclose(grad_kernel, expected, atol=1e-5, rtol=1e-5)


def test_correlation_matches_float64_sum():
  # The two-pass correlation (taps along the last axis for every leading offset, then the
  # diagonal sum) against its defining sum, with several output planes as in the input
  # gradient: out[d, b, *s] = sum_{o, c} K[*o, c, d] * padded[c, b, *(s + o)]. 3-D: two
  # leading kernel dims, one larger than its spatial size.
  from cbam_jax._fast.spatial_conv import _correlate_planes
  kernel_size, spatial = (3, 5, 3), (2, 3, 4)
  planes = np.asarray(_random(10, (2, 3, *spatial)), np.float64)
  kernel = np.asarray(_random(11, (*kernel_size, 2, 3)), np.float64)
  out = jax.jit(_correlate_planes)(jnp.asarray(planes, jnp.float32),
                                   jnp.asarray(kernel, jnp.float32))
  padded = np.pad(planes, [(0, 0), (0, 0)] + [(k // 2, k // 2) for k in kernel_size])
  expected = np.zeros((3, 3, *spatial))
  for offset in np.ndindex(*kernel_size):
    window = padded[(slice(None),) * 2 + tuple(
        slice(o, o + n) for o, n in zip(offset, spatial, strict=True))]
    expected += np.einsum('cb...,cd->db...', window, kernel[offset])
  np.testing.assert_allclose(out, expected, atol=1e-5, rtol=1e-5)


def test_computes_in_float32_and_returns_promoted_dtype():
  planes = _random(6, (2, 2, 6, 6)).astype(jnp.bfloat16)
  kernel = _random(7, (3, 3, 2, 1)).astype(jnp.bfloat16)
  out = spatial_conv_planes(planes, kernel, impl='shift')
  assert out.dtype == jnp.bfloat16
  ref = spatial_conv_planes(planes.astype(jnp.float32), kernel.astype(jnp.float32),
                            impl='xla')
  chex.assert_trees_all_close(out.astype(jnp.float32), ref, atol=0.1, rtol=0.02)


def test_nan_kernel_propagates_like_xla():
  # The shift conv's loop runs twice when the kernel's first tap is NaN (see
  # cbam_jax._fast.boundary.computed_once); the numbers must still be the reference's.
  planes = _random(8, (2, 2, 5, 6))
  cotangent = _random(9, (2, 5, 6))
  for index in ((0, 0, 0, 0), (1, 2, 1, 0)):
    kernel = _random(10, (3, 3, 2, 1)).at[index].set(jnp.nan)
    (_, grads_ref), out_ref = _value_and_grads(
        functools.partial(spatial_conv_planes, impl='xla'), planes, kernel, cotangent)
    (_, grads), out = jax.jit(functools.partial(
        _value_and_grads, functools.partial(spatial_conv_planes, impl='shift')))(
            planes, kernel, cotangent)
    assert np.isnan(out).any()
    for got, want in ((out, out_ref), *zip(grads, grads_ref, strict=True)):
      np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
      np.testing.assert_allclose(np.nan_to_num(got), np.nan_to_num(want), **TOL)


def test_second_order_gradients_match_xla():
  # Reverse-over-reverse (gradient penalties, meta-learning) and forward-over-reverse
  # (Hessian-vector products) through the custom backward and its compute-once loops.
  planes = _random(11, (2, 2, 5, 6))
  kernel = _random(12, (3, 3, 2, 1), 0.5)

  def second_orders(impl):
    def grads(p, k):
      return jax.grad(lambda p, k: jnp.sum(jnp.sin(spatial_conv_planes(p, k, impl=impl))),
                      argnums=(0, 1))(p, k)

    def penalty(p, k):
      grad_p, grad_k = grads(p, k)
      return jnp.sum(jnp.cos(grad_p)) + jnp.sum(grad_k ** 2)

    reverse = jax.grad(penalty, argnums=(0, 1))(planes, kernel)
    forward = jax.jvp(lambda p: grads(p, kernel), (planes,), (jnp.ones_like(planes),))[1]
    return reverse, forward

  for got, want in zip(jax.tree.leaves(jax.jit(lambda: second_orders('shift'))()),
                       jax.tree.leaves(second_orders('xla')), strict=True):
    scale = float(jnp.max(jnp.abs(want)))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * scale)


def test_unknown_impl_is_rejected():
  with pytest.raises(ValueError, match='impl'):
    spatial_conv_planes(jnp.zeros((2, 1, 4, 4)), jnp.zeros((3, 3, 2, 1)), impl='fft')


def test_auto_picks_shift_on_cpu():
  assert jax.default_backend() == 'cpu'
  assert resolve_impl('auto') == 'shift'
  assert resolve_impl('xla') == 'xla'


def _single_example_loss(impl, pooled, kernel, cotangent):
  out = jax.vmap(lambda example: spatial_conv(example, kernel, impl=impl))(pooled)
  return jnp.vdot(out, cotangent)


def test_shift_matches_xla_under_vmap_1d(variant):
  pooled, kernel, cotangent = _random(8, (3, 6, 2)), _random(9, (5, 2, 1)), _random(10, (3, 6))
  grads = {impl: variant(jax.value_and_grad(
      functools.partial(_single_example_loss, impl), argnums=(0, 1)))(
          pooled, kernel, cotangent) for impl in ('xla', 'shift')}
  chex.assert_trees_all_close(grads['shift'], grads['xla'], **TOL)


@pytest.mark.parametrize('with_bias', [False, True], ids=['no_bias', 'bias'])
def test_matches_vmapped_functional_reference(with_bias):
  x = _random(11, (2, 5, 9, 6))
  params = {'conv_kernel': _random(12, (7, 7, 2, 1), 0.3)}
  if with_bias:
    params['conv_bias'] = jnp.array([0.25])
  reference = jax.vmap(lambda e: F.spatial_logits(params, e, impl='xla'))(x)
  fast = batched_spatial_logits(params, x, impl='shift')
  assert fast.dtype == jnp.float32
  chex.assert_trees_all_close(fast, reference, **TOL)


def test_planes_are_channel_mean_then_max():
  x = _random(13, (2, 3, 4, 5))
  planes = channel_pool_planes(x)
  chex.assert_trees_all_close(planes, jnp.moveaxis(jax.vmap(F.channel_pool)(x), -1, 0))


@pytest.mark.parametrize('shape, fields, train', [
    pytest.param((2, 6, 5, 32), dict(spatial_norm=True), True, id='official_2d_train'),
    pytest.param((2, 3, 2, 16), dict(spatial_norm=True), False, id='official_eval_map_below_k'),
    pytest.param((1, 3, 4, 5, 16), dict(kernel_size=3, order='parallel'), True,
                 id='parallel_3d_k3', marks=pytest.mark.slow),  # 3-D: the full suite only.
])


def test_fast_module_matches_xla_module(shape, fields, train):
  """``CBAM(conv_impl=...)``: the fast path is invisible in outputs and gradients."""
  x = _random(14, shape)
  cotangent = _random(15, shape)
  reference = CBAM(conv_impl='xla', **fields)
  variables = jax.jit(reference.init)(jax.random.PRNGKey(16), x)
  if 'batch_stats' in variables:  # Non-trivial running statistics for eval mode.
    variables = {**variables,
                 'batch_stats': jax.tree.map(lambda v: v + 0.3, variables['batch_stats'])}

  def loss(module, params, x):
    out, _ = module.apply({**variables, 'params': params}, x, train=train,
                          mutable=['batch_stats'])
    return jnp.vdot(out, cotangent), out

  results = {}
  for impl in ('xla', 'shift'):  # 'auto' is 'shift' on CPU (test_auto_picks_shift_on_cpu).
    module = CBAM(conv_impl=impl, **fields)
    results[impl] = jax.jit(jax.value_and_grad(
        functools.partial(loss, module), argnums=(0, 1), has_aux=True))(
            variables['params'], x)
  chex.assert_trees_all_close(results['shift'], results['xla'], **TOL)


def test_shift_gradient_matches_finite_differences():
  # Guards the hand-written VJP against a sign or flip error that no comparison with a
  # shared reference would catch.
  planes, cotangent = _random(17, (2, 1, 4, 5)), _random(19, (1, 4, 5))
  kernel = _random(18, (3, 3, 2, 1), 0.5)
  loss = jax.jit(lambda p, k: jnp.vdot(spatial_conv_planes(p, k, impl='shift'), cotangent))
  grad_planes, grad_kernel = jax.grad(loss, argnums=(0, 1))(planes, kernel)
  eps = 1e-2
  for argument, grad, index in ((0, grad_planes, (1, 0, 0, 4)), (1, grad_kernel, (0, 2, 1, 0))):
    args = [planes, kernel]
    bump = jnp.zeros_like(args[argument]).at[index].set(eps)
    plus = loss(*[a + bump if i == argument else a for i, a in enumerate(args)])
    minus = loss(*[a - bump if i == argument else a for i, a in enumerate(args)])
    np.testing.assert_allclose(grad[index], (plus - minus) / (2 * eps), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize('axes', [(-1,), (1, 2), (1, 2, 3)],
                         ids=['minor', 'spatial', 'all_but_batch'])
def test_values_and_gradients_match_jnp_with_ties(axes):
  # Clipped values give many tied maxima: the gradient must split evenly among them.
  x = jnp.minimum(jnp.round(_random(20, (2, 3, 4, 5)) * 2) / 2, 0.5)
  cot_mean = _random(21, jnp.mean(x, axis=axes).shape)
  cot_max = _random(22, cot_mean.shape)

  def loss(pool, x):
    mean, maximum = pool(x)
    return jnp.vdot(mean, cot_mean) + jnp.vdot(maximum, cot_max)

  reference = lambda x: (jnp.mean(x, axis=axes), jnp.max(x, axis=axes))
  fast = lambda x: mean_max(x, axes)
  chex.assert_trees_all_close(jax.jit(fast)(x), reference(x), **TOL)
  chex.assert_trees_all_close(
      jax.jit(jax.grad(functools.partial(loss, fast)))(x),
      jax.grad(functools.partial(loss, reference))(x), **TOL)
  # Ties really occurred, so the split is exercised.
  counts = jnp.sum(x == jnp.max(x, axis=axes, keepdims=True), axis=axes)
  assert int(jnp.max(counts)) > 1


def test_keeps_bfloat16():
  x = _random(23, (2, 3, 4)).astype(jnp.bfloat16)
  grad = jax.grad(lambda x: jnp.sum(mean_max(x, (-1,))[1].astype(jnp.float32)))(x)
  assert grad.dtype == jnp.bfloat16


def test_computed_once_is_fn_under_jit_vmap_and_nested_gradients():
  from cbam_jax._fast.boundary import computed_once

  def fn(x, w):
    return jnp.sin(x) * w

  def once(x, w):
    return computed_once(fn, x, w)

  x, w = _random(30, (3, 4)), _random(31, (4,))
  for transform in (lambda f: f, jax.jit, lambda f: jax.vmap(f, in_axes=(0, None))):
    chex.assert_trees_all_close(transform(once)(x, w), transform(fn)(x, w))
  second = lambda f: jax.grad(lambda x: jnp.sum(jax.grad(lambda x: jnp.sum(f(x, w) ** 2))(x)))
  chex.assert_trees_all_close(jax.jit(second(once))(x), second(fn)(x), atol=1e-6)
  nan_w = w.at[0].set(jnp.nan)  # The last argument's NaN makes the loop run twice.
  np.testing.assert_array_equal(np.isnan(jax.jit(once)(x, nan_w)), np.isnan(fn(x, nan_w)))
  assert 'while' in str(jax.make_jaxpr(once)(x, w))  # The loop is what XLA cannot fuse across.


@pytest.mark.slow
def test_fast_paths_under_explicit_sharding():
  # computed_once's probe and the kernel-gradient matmul must work when the batch is
  # explicitly sharded (jax.make_mesh with Explicit axes): same numbers as unsharded.
  from jax.sharding import AxisType, NamedSharding, PartitionSpec

  from cbam_jax.conv import MaterializedInputConv

  mesh = jax.make_mesh((8,), ('data',), axis_types=(AxisType.Explicit,))
  x = jax.random.normal(jax.random.key(0), (16, 9, 7, 12))
  sharded = jax.device_put(x, NamedSharding(mesh, PartitionSpec('data')))
  module = CBAM(spatial_norm=True, reduction_ratio=4, conv_impl='shift')
  variables = module.init(jax.random.key(1), x)

  def loss(params, x):
    out, _ = module.apply({**variables, 'params': params}, x, train=True,
                          mutable=['batch_stats'])
    return jnp.sum(out ** 2)  # Positive terms: the sharded sum's order barely matters.

  step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
  expected = step(variables['params'], x)
  with jax.set_mesh(mesh):
    got = step(variables['params'], sharded)
  assert jax.typeof(got[1][1]).sharding.spec[0] == 'data'
  for got_leaf, expected_leaf in zip(jax.tree.leaves(got), jax.tree.leaves(expected),
                                     strict=True):
    # Relative to each leaf's largest entry: sharded sums add in another order.
    scale = float(jnp.max(jnp.abs(expected_leaf)))
    np.testing.assert_allclose(got_leaf, expected_leaf, rtol=0, atol=1e-5 * scale)

  conv = MaterializedInputConv(4, (3, 3), materialize_input=True)
  conv_vars = conv.init(jax.random.key(2), x)
  with jax.set_mesh(mesh):
    out = jax.jit(conv.apply)(conv_vars, sharded)
  expected = flax.linen.Conv(4, (3, 3)).apply(conv_vars, x)
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
