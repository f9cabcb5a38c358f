"""The linen modules: equal to the vmapped functional core, layouts, options, BatchNorm, errors."""

from __future__ import annotations

import functools
import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cases import fast_subset

from cbam_jax import CBAM, ChannelAttention, SpatialAttention
from cbam_jax import functional as F

EPS = 1e-5


def randomize(variables, seed: int = 0, scale: float = 0.5):
  """Random params (biases included) and BatchNorm stats: zeros and ones hide mistakes."""
  leaves, treedef = jax.tree.flatten(variables['params'])
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  params = treedef.unflatten([scale * jax.random.normal(k, p.shape, p.dtype)
                              for k, p in zip(keys, leaves, strict=True)])
  out = {**variables, 'params': params}
  if 'batch_stats' in variables:
    stats = jax.tree.map(lambda s: s, variables['batch_stats'])
    key_mean, key_var = jax.random.split(jax.random.key(seed + 1))
    norm = stats['spatial']['norm'] if 'spatial' in stats else stats['norm']
    norm['mean'] = jax.random.normal(key_mean, norm['mean'].shape)
    norm['var'] = jax.random.uniform(key_var, norm['var'].shape, minval=0.5, maxval=2.)
    out['batch_stats'] = stats
  return out


def bn_normalize(norm_params, norm_stats):
  """Inference BatchNorm of the logits, as the functional ``normalize`` hook takes it."""
  return lambda z: ((z - norm_stats['mean'][0]) / jnp.sqrt(norm_stats['var'][0] + EPS)
                    * norm_params['scale'][0] + norm_params['bias'][0])


def features(shape, seed: int = 0, dtype=jnp.float32):
  return jax.random.normal(jax.random.key(seed), shape, dtype)


def apply_with_maps(module, variables, x, *, jit=True, **kwargs):
  """``module.apply`` returning ``(out, sown maps)``, jitted unless ``jit=False``: one program
  compiles in about the time of a few eager ops, and an eager CBAM call runs dozens."""
  apply = functools.partial(module.apply, mutable=['intermediates'], **kwargs)
  out, state = (jax.jit(apply) if jit else apply)(variables, x)
  return out, state['intermediates']


SHAPES = {1: (2, 9, 6), 2: (2, 5, 6, 6), 3: (2, 3, 4, 5, 6)}


def small(module_cls, **fields):
  """A module with a 3x3 conv and 2x reduction: tiny shapes keep the tests fast."""
  if module_cls is not ChannelAttention:
    fields.setdefault('kernel_size', 3)
  if module_cls is not SpatialAttention:
    fields.setdefault('reduction_ratio', 2)
  return module_cls(**fields)


# The module equals ``jax.vmap`` of the single-example functions with its params.


@pytest.mark.parametrize('spatial_norm', [False, True])
@pytest.mark.parametrize('order', F.ORDERS)
def test_cbam_matches_vmapped_functional(order, spatial_norm):
  x = features(SHAPES[2])
  module = CBAM(reduction_ratio=2, kernel_size=3, order=order, spatial_norm=spatial_norm,
                pool_types=('avg', 'max', 'lse'))
  variables = randomize(jax.jit(module.init)(jax.random.key(0), x))
  out, maps = apply_with_maps(module, variables, x)
  spatial = dict(variables['params']['spatial'])
  normalize = None
  if spatial_norm:
    normalize = bn_normalize(spatial.pop('norm'), variables['batch_stats']['spatial']['norm'])
  fn = functools.partial(F.cbam, order=order, normalize=normalize, return_maps=True,
                         pool_types=('avg', 'max', 'lse'))
  expected, (channel_map, spatial_map) = jax.jit(jax.vmap(fn, in_axes=(None, None, 0)))(
      variables['params']['channel'], spatial, x)
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(maps['channel']['channel_map'][0], channel_map, rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_allclose(maps['spatial']['spatial_map'][0], spatial_map, rtol=1e-5,
                             atol=1e-6)


def test_jit_matches_eager():
  x = features(SHAPES[2], seed=11)
  module = CBAM(reduction_ratio=2, kernel_size=3, spatial_norm=True)
  variables = randomize(jax.jit(module.init)(jax.random.key(0), x))
  apply = functools.partial(module.apply, mutable=['batch_stats'], train=True)
  chex.assert_trees_all_close(jax.jit(apply)(variables, x), apply(variables, x),
                              rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('num_spatial', [1, 2, 3])
@pytest.mark.slow
def test_branches(num_spatial):
  x = features(SHAPES[num_spatial], seed=num_spatial)
  channel = ChannelAttention(reduction_ratio=3, pool_types=('avg', 'lp'))
  variables = randomize(jax.jit(channel.init)(jax.random.key(1), x))
  expected = jax.vmap(functools.partial(F.channel_attention, pool_types=('avg', 'lp')),
                      in_axes=(None, 0))(variables['params'], x)
  np.testing.assert_allclose(channel.apply(variables, x), expected, rtol=1e-5, atol=1e-6)

  spatial = SpatialAttention(kernel_size=3)
  variables = randomize(jax.jit(spatial.init)(jax.random.key(2), x))
  expected = jax.vmap(F.spatial_attention, in_axes=(None, 0))(variables['params'], x)
  np.testing.assert_allclose(spatial.apply(variables, x), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_attention_map_methods():
  x = features(SHAPES[2])
  module = SpatialAttention(kernel_size=3, spatial_norm=True)
  variables = randomize(jax.jit(module.init)(jax.random.key(0), x))
  spatial_map = module.apply(variables, x, method='attention_map')
  params = dict(variables['params'])
  normalize = bn_normalize(params.pop('norm'), variables['batch_stats']['norm'])
  _, expected = jax.vmap(functools.partial(F.spatial_attention, normalize=normalize,
                                           return_map=True), in_axes=(None, 0))(params, x)
  np.testing.assert_allclose(spatial_map, expected, rtol=1e-5, atol=1e-6)
  channel = ChannelAttention(reduction_ratio=2)
  variables = randomize(jax.jit(channel.init)(jax.random.key(0), x))
  _, expected = jax.vmap(functools.partial(F.channel_attention, return_map=True),
                         in_axes=(None, 0))(variables['params'], x)
  np.testing.assert_allclose(channel.apply(variables, x, method='attention_map'), expected,
                             rtol=1e-5, atol=1e-6)


CHANNEL_AXIS_CASES = [(cls, n) for cls in (CBAM, ChannelAttention, SpatialAttention)
                      for n in (1, 2, 3)]
CHANNEL_AXIS_IDS = [f'{cls.__name__}-{n}d' for cls, n in CHANNEL_AXIS_CASES]


# CBAM in 1-D and 3-D only composes the branches, which run in every rank here.
@pytest.mark.parametrize('module_cls,num_spatial', fast_subset(
    CHANNEL_AXIS_CASES, CHANNEL_AXIS_IDS, fast=set(CHANNEL_AXIS_IDS) - {'CBAM-1d', 'CBAM-3d'}))
def test_channels_first_is_the_transposed_channels_last_result(module_cls, num_spatial):
  """``channel_axis=1`` (channels first) gives exactly the transposed channels-last result."""
  x = features(SHAPES[num_spatial], seed=3)
  fields = dict(kernel_size=3) if module_cls is not ChannelAttention else {}
  if module_cls is not SpatialAttention:
    fields['reduction_ratio'] = 2
  if module_cls is CBAM:
    fields['spatial_norm'] = True
  last = module_cls(**fields)
  variables = randomize(jax.jit(last.init)(jax.random.key(0), x))
  # Eager: the claim is bit-equality, and jitted NCHW and NHWC programs fuse differently.
  out_last, maps_last = apply_with_maps(last, variables, x, jit=False)
  first = module_cls(channel_axis=1, **fields)
  x_first = jnp.moveaxis(x, -1, 1)
  out_first, maps_first = apply_with_maps(first, variables, x_first, jit=False)
  assert out_first.shape == x_first.shape
  np.testing.assert_array_equal(out_first, jnp.moveaxis(out_last, -1, 1))
  chex.assert_trees_all_equal(maps_first, maps_last)
  # The channel-first module initialises the same variable shapes from NCHW input.
  chex.assert_trees_all_equal_shapes(jax.jit(first.init)(jax.random.key(0), x_first), variables)


CHANNEL_OPTIONS = dict(
    pool_types=[('avg',), ('max',), ('avg', 'max'), ('lp', 'lse'), ('avg', 'max', 'lp', 'lse')],
    mlp_bias=[True, False],
    hidden_features=[None, 3],
    hidden_rounding=['floor', 'round'],
)
BRANCHES = [dict(), dict(use_channel=False), dict(use_spatial=False)]


def test_channel_option_combinations():
  # 24 channels, r = 16: floor gives 24 // 16 = 1, round (timm) gives round(1.5) = 2.
  x = jax.ShapeDtypeStruct((2, 4, 4, 24), jnp.float32)
  for values in itertools.product(*CHANNEL_OPTIONS.values()):
    fields = dict(zip(CHANNEL_OPTIONS, values, strict=True))
    module = CBAM(kernel_size=3, **fields)
    variables = jax.eval_shape(module.init, jax.random.key(0), x)
    out = jax.eval_shape(module.apply, variables, x)
    assert (out.shape, out.dtype) == (x.shape, x.dtype), fields
    hidden = fields['hidden_features'] or {'floor': 1, 'round': 2}[fields['hidden_rounding']]
    channel = variables['params']['channel']
    expected = {'fc1_kernel': (24, hidden), 'fc2_kernel': (hidden, 24)}
    if fields['mlp_bias']:
      expected.update(fc1_bias=(hidden,), fc2_bias=(24,))
    assert jax.tree.map(lambda a: a.shape, channel) == expected, fields


def test_composition_combinations():
  # Shapes of everything the module makes, for every order x branch x norm x rank.
  for order, branches, spatial_norm, num_spatial in itertools.product(
      F.ORDERS, BRANCHES, [False, True], [1, 2, 3]):
    fields = dict(order=order, spatial_norm=spatial_norm, kernel_size=3, reduction_ratio=2,
                  **branches)
    shape = SHAPES[num_spatial]
    x = jax.ShapeDtypeStruct(shape, jnp.float32)
    module = CBAM(**fields)
    variables = jax.eval_shape(module.init, jax.random.key(0), x)
    out, maps = jax.eval_shape(functools.partial(apply_with_maps, module), variables, x)
    assert out.shape == shape, fields
    expected_maps = {}
    if branches.get('use_channel', True):
      expected_maps['channel'] = {'channel_map': ((shape[0], shape[-1]),)}
    if branches.get('use_spatial', True):
      expected_maps['spatial'] = {'spatial_map': (shape[:-1],)}
    assert jax.tree.map(lambda a: a.shape, maps) == expected_maps, fields
    has_norm = spatial_norm and branches.get('use_spatial', True)
    assert ('batch_stats' in variables) == has_norm, fields
    if branches.get('use_spatial', True):
      spatial = variables['params']['spatial']
      assert spatial['conv_kernel'].shape == (3,) * num_spatial + (2, 1), fields
      assert ('conv_bias' in spatial) == (not spatial_norm), fields
      assert ('norm' in spatial) == spatial_norm, fields


@pytest.mark.parametrize('num_spatial', [1, 2, 3])
@pytest.mark.parametrize('order', F.ORDERS)
def test_maps_in_unit_interval(order, num_spatial):
  x = 4. * features(SHAPES[num_spatial], seed=5)
  module = CBAM(order=order, kernel_size=3, reduction_ratio=2, spatial_norm=True,
                pool_types=('avg', 'max', 'lp', 'lse'))
  variables = randomize(jax.jit(module.init)(jax.random.key(0), x), scale=2.)
  out, maps = apply_with_maps(module, variables, x)
  chex.assert_tree_all_finite(out)
  for attention_map in jax.tree.leaves(maps):
    assert attention_map.dtype == jnp.float32
    assert bool(jnp.all((attention_map >= 0) & (attention_map <= 1)))
    assert float(jnp.std(attention_map)) > 0.  # A real map, not a constant.


def test_single_branch_matches_branch_module():
  x = features(SHAPES[2], seed=6)
  module = CBAM(use_spatial=False, reduction_ratio=2)
  variables = randomize(jax.jit(module.init)(jax.random.key(0), x))
  expected = ChannelAttention(reduction_ratio=2).apply(
      {'params': variables['params']['channel']}, x)
  np.testing.assert_array_equal(module.apply(variables, x), expected)
  module = CBAM(use_channel=False, kernel_size=3)
  variables = randomize(jax.jit(module.init)(jax.random.key(0), x))
  expected = SpatialAttention(kernel_size=3).apply(
      {'params': variables['params']['spatial']}, x)
  np.testing.assert_array_equal(module.apply(variables, x), expected)


def test_anisotropic_kernel():
  x = features(SHAPES[2])
  variables = jax.jit(SpatialAttention(kernel_size=(3, 5)).init)(jax.random.key(0), x)
  assert variables['params']['conv_kernel'].shape == (3, 5, 2, 1)


# ``spatial_norm=True``: running stats move only in training; eval uses them.


def _batch_norm_case():
  """x, a SpatialAttention with BatchNorm, its randomized variables, and its conv logits."""
  x = features(SHAPES[2], seed=7)
  module = SpatialAttention(kernel_size=3, spatial_norm=True)
  variables = randomize(jax.jit(module.init)(jax.random.key(0), x))
  conv_params = {'conv_kernel': variables['params']['conv_kernel']}
  logits = jax.vmap(F.spatial_logits, in_axes=(None, 0))(conv_params, x)
  return x, module, variables, logits


def test_eval_keeps_and_uses_running_stats():
  x, module, variables, logits = _batch_norm_case()
  out, state = module.apply(variables, x, train=False, mutable=['batch_stats'])
  chex.assert_trees_all_equal(state['batch_stats'], variables['batch_stats'])
  normalize = bn_normalize(variables['params']['norm'],
                           variables['batch_stats']['norm'])
  expected = x * jax.nn.sigmoid(normalize(logits))[..., None]
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)


def test_train_updates_running_stats_and_uses_batch_stats():
  x, module, variables, logits = _batch_norm_case()
  out, state = module.apply(variables, x, train=True, mutable=['batch_stats'])
  old = variables['batch_stats']['norm']
  new = state['batch_stats']['norm']
  batch_mean, batch_var = jnp.mean(logits), jnp.var(logits)  # Flax: biased var.
  np.testing.assert_allclose(new['mean'], 0.99 * old['mean'] + 0.01 * batch_mean, rtol=1e-5)
  np.testing.assert_allclose(new['var'], 0.99 * old['var'] + 0.01 * batch_var, rtol=1e-5)
  params = variables['params']['norm']
  expected_map = jax.nn.sigmoid((logits - batch_mean) / jnp.sqrt(batch_var + EPS)
                                * params['scale'][0] + params['bias'][0])
  np.testing.assert_allclose(out, x * expected_map[..., None], rtol=1e-5, atol=1e-5)


def test_cbam_threads_train_to_the_norm():
  x = _batch_norm_case()[0]
  module = CBAM(kernel_size=3, reduction_ratio=2, spatial_norm=True)
  variables = randomize(jax.jit(module.init)(jax.random.key(0), x))
  _, state = module.apply(variables, x, train=False, mutable=['batch_stats'])
  chex.assert_trees_all_equal(state['batch_stats'], variables['batch_stats'])
  _, state = module.apply(variables, x, train=True, mutable=['batch_stats'])
  assert not np.allclose(state['batch_stats']['spatial']['norm']['mean'],
                         variables['batch_stats']['spatial']['norm']['mean'])


@pytest.mark.parametrize('compute_dtype', [None, jnp.bfloat16])
def test_bfloat16_input(compute_dtype):
  x16 = features(SHAPES[2], seed=8, dtype=jnp.bfloat16)
  module = CBAM(reduction_ratio=2, kernel_size=3, spatial_norm=True, dtype=compute_dtype)
  variables = randomize(jax.jit(module.init)(jax.random.key(0), x16))
  out16, maps16 = apply_with_maps(module, variables, x16)
  out32, maps32 = apply_with_maps(module, variables, x16.astype(jnp.float32))
  assert out16.dtype == jnp.bfloat16
  chex.assert_type(jax.tree.leaves(maps16), jnp.float32)
  chex.assert_type(jax.tree.leaves(variables['params']), jnp.float32)
  np.testing.assert_allclose(out16.astype(jnp.float32), out32, rtol=3e-2, atol=3e-2)
  chex.assert_trees_all_close(maps16, maps32, atol=3e-2)


def test_bfloat16_params():
  x = features(SHAPES[1], seed=9)
  module = CBAM(reduction_ratio=2, kernel_size=3, param_dtype=jnp.bfloat16)
  variables = jax.jit(module.init)(jax.random.key(0), x)
  chex.assert_type(jax.tree.leaves(variables['params']), jnp.bfloat16)
  out, maps = apply_with_maps(module, variables, x)
  assert out.dtype == jnp.float32
  chex.assert_type(jax.tree.leaves(maps), jnp.float32)


@pytest.mark.parametrize('order', F.ORDERS)
def test_nan_propagates(order):
  x = features(SHAPES[2], seed=10).at[1, 2, 3, 0].set(jnp.nan)
  module = CBAM(order=order, reduction_ratio=2, kernel_size=3)
  variables = randomize(jax.jit(module.init)(jax.random.key(0), features(SHAPES[2])))
  out = module.apply(variables, x)
  assert bool(jnp.all(jnp.isnan(out[1, 2, 3])))
  chex.assert_tree_all_finite(out[0])  # Examples do not mix.


# Every bad input or field gets a ValueError/TypeError naming the problem.


def _trace_init(module, shape, dtype=jnp.float32):
  # Traced, not run: the checks fire while tracing, and shapes are all these tests read.
  return jax.eval_shape(module.init, jax.random.key(0), jnp.ones(shape, dtype))


@pytest.mark.parametrize('module_cls', [CBAM, ChannelAttention, SpatialAttention])
def test_wrong_rank(module_cls):
  for shape in [(2, 8), (1, 2, 2, 2, 2, 8)]:
    with pytest.raises(ValueError, match=r'\(B, \*spatial, C\) with 1 to 3 spatial'):
      _trace_init(small(module_cls), shape)


def test_rank_hint_for_a_single_example():
  with pytest.raises(ValueError, match='add a batch axis'):
    _trace_init(small(CBAM), (5, 8))  # One (L, C) example.


@pytest.mark.parametrize('module_cls', [CBAM, ChannelAttention])
def test_channel_count_mismatch(module_cls):
  module = small(module_cls)
  variables = _trace_init(module, (2, 5, 6, 8))
  with pytest.raises(ValueError, match='initialised for 8 channels but got 16'):
    module.apply(variables, jnp.ones((2, 5, 6, 16)))


@pytest.mark.parametrize('module_cls', [CBAM, SpatialAttention])
def test_spatial_rank_change(module_cls):
  module = small(module_cls)
  variables = _trace_init(module, SHAPES[2])
  with pytest.raises(ValueError, match=r'initialised with a conv kernel of shape \(3, 3, 2, 1'):
    jax.eval_shape(module.apply, variables, jnp.ones(SHAPES[3]))


@pytest.mark.parametrize('kernel_size', [6, 0, -3, (3, 4), 3.0, True])
def test_bad_kernel_size(kernel_size):
  for module_cls in (CBAM, SpatialAttention):
    with pytest.raises(ValueError, match='kernel_size must be a positive odd integer'):
      _trace_init(module_cls(kernel_size=kernel_size), SHAPES[2])


def test_kernel_size_entries_must_match_rank():
  with pytest.raises(ValueError, match='has 1 entries but the input has 2 spatial'):
    _trace_init(CBAM(kernel_size=(3,)), SHAPES[2])


@pytest.mark.parametrize('module_cls', [CBAM, ChannelAttention, SpatialAttention])
def test_integer_input(module_cls):
  with pytest.raises(TypeError, match='floating-point features, got dtype uint8'):
    _trace_init(small(module_cls), SHAPES[2], jnp.uint8)


@pytest.mark.parametrize('pool_types', [('avg', 'median'), ('mean',), ()])
def test_bad_pool_types(pool_types):
  match = 'Unknown pool type' if pool_types else 'non-empty sequence'
  for module_cls in (CBAM, ChannelAttention):
    with pytest.raises(ValueError, match=match):
      _trace_init(small(module_cls, pool_types=pool_types), SHAPES[2])


def test_unknown_order():
  with pytest.raises(ValueError, match="Unknown order 'sequential'"):
    _trace_init(small(CBAM, order='sequential'), SHAPES[2])


@pytest.mark.parametrize('shape', [(2, 0, 5, 4), (2, 5, 5, 0), (0, 5, 5, 4)])
def test_empty_axis(shape):
  for module_cls in (CBAM, ChannelAttention, SpatialAttention):
    with pytest.raises(ValueError, match='empty axis'):
      _trace_init(small(module_cls), shape)


@pytest.mark.parametrize('channel_axis', [0, 4, -4, 7])
def test_bad_channel_axis(channel_axis):
  for module_cls in (CBAM, ChannelAttention, SpatialAttention):
    with pytest.raises(ValueError, match=f'channel_axis={channel_axis} is not a channel'):
      _trace_init(small(module_cls, channel_axis=channel_axis), SHAPES[2])


def test_bad_hidden_size_fields():
  with pytest.raises(ValueError, match="Unknown hidden_rounding 'ceil'"):
    _trace_init(small(CBAM, hidden_rounding='ceil'), SHAPES[2])
  with pytest.raises(ValueError, match='hidden_features must be >= 1'):
    _trace_init(small(CBAM, hidden_features=0), SHAPES[2])
  with pytest.raises(ValueError, match='reduction_ratio must be positive'):
    _trace_init(small(CBAM, reduction_ratio=0), SHAPES[2])
  with pytest.raises(ValueError, match="hidden_divisor=8 needs hidden_rounding='round'"):
    _trace_init(small(CBAM, hidden_divisor=8), SHAPES[2])
  for bad in (0, 8.0, True):
    with pytest.raises(ValueError, match='hidden_divisor must be a positive int'):
      _trace_init(small(CBAM, hidden_rounding='round', hidden_divisor=bad), SHAPES[2])


@pytest.mark.parametrize('channels, divisor, hidden', [
    (16, 1, 1), (64, 1, 4), (72, 1, 5), (88, 1, 6), (64, 8, 8), (200, 8, 16), (16, 8, 8),
    (8, 4, 4)])
def test_hidden_divisor_follows_timm_make_divisible(channels, divisor, hidden):
  # timm.layers.make_divisible(C / 16, divisor): 72 / 16 = 4.5 rounds up to 5, 200 / 16 =
  # 12.5 goes to the nearest multiple of 8 (16), and never below the divisor.
  module = ChannelAttention(reduction_ratio=16, hidden_rounding='round',
                            hidden_divisor=divisor)
  variables = _trace_init(module, (1, 2, 2, channels))
  assert variables['params']['fc1_kernel'].shape == (channels, hidden)


def test_no_branch():
  with pytest.raises(ValueError, match='use_channel=False and use_spatial=False'):
    _trace_init(small(CBAM, use_channel=False, use_spatial=False), SHAPES[2])


def test_errors_are_raised_under_jit():
  module = small(CBAM)
  variables = _trace_init(module, (2, 5, 6, 8))
  with pytest.raises(ValueError, match='initialised for 8 channels but got 16'):
    jax.jit(module.apply)(variables, jnp.ones((2, 5, 6, 16)))

