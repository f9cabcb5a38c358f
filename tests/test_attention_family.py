"""The attention family behind cbam_jax.attention.create: shapes, jit, gradients, dtypes,
spatial ranks, layouts, sown maps, errors, and use inside the ResNets."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cases import fast_subset

from cbam_jax import attention
from cbam_jax.attention import _base

ALL = attention.available()
# The members defined for images only, as registered.
IMAGE_ONLY = tuple(name for name in ALL if attention.member(name).spatial_dims == (2,))
WITH_BATCH_NORM = ('bam', 'coord', 'triplet', 'lcbam')
PARAMETER_FREE = ('simam',)
# The fast run (-m "not slow") keeps CBAM, its branches and the cheap members; the members
# whose programs take seconds to compile (bam, coord, lcbam, scse, triplet) run in the full
# suite only.
FAST_MEMBERS = ('cbam', 'channel', 'spatial', 'se', 'eca', 'simam')


def _cases(names):
  return fast_subset(names, names, FAST_MEMBERS)


SHAPE = (2, 6, 5, 32)  # H != W so that swapped axes show.


# Small conv kernels keep the compile times of the conv-gate members low; the parity tests
# run the defaults.
FAST_FIELDS = {name: {'kernel_size': 3} for name in ('cbam', 'spatial', 'lcbam', 'triplet')}
FAST_FIELDS['bam'] = {'num_dilated_convs': 1}


def _create(name, **fields):
  return attention.create(name, **{**FAST_FIELDS.get(name, {}), **fields})


def _features(shape, seed=0, dtype=jnp.float32):
  return jax.random.normal(jax.random.key(seed), shape).astype(dtype)


def _init(module, x):
  return jax.jit(module.init)(jax.random.key(1), x)


def _trace_init(module, x):
  """Shapes only: runs every trace-time check without compiling."""
  return jax.eval_shape(module.init, jax.random.key(1), x)


def test_registry_lists_the_family():
  for name in ('cbam', 'channel', 'spatial', 'se', 'eca', 'bam', 'scse', 'coord', 'triplet',
               'simam', 'lcbam'):
    assert name in ALL


def test_unknown_name_lists_valid_names():
  with pytest.raises(ValueError, match='Unknown attention .*eca.*simam'):
    attention.create('nope')
  with pytest.raises(ValueError, match='Valid names'):
    attention.resolve(None)


def test_register_twice_is_an_error():
  with pytest.raises(ValueError, match='already registered'):
    attention.register(attention.member('eca'))


# Compiles dominate the run time: each member is compiled twice (an eval pass and a
# train-mode gradient pass) and every test below reads from those two results.


@functools.cache
def _eval_outputs(name):
  """Variables, NHWC output, sown maps, NCHW output and bfloat16 output on SHAPE."""
  module, nchw = _create(name), _create(name, channel_axis=1)

  @jax.jit
  def run(x):
    variables = module.init(jax.random.key(1), x)
    y, state = module.apply(variables, x, mutable=['intermediates'])
    y_nchw = jnp.moveaxis(nchw.apply(variables, jnp.moveaxis(x, -1, 1)), 1, -1)
    y16 = module.apply(variables, x.astype(jnp.bfloat16))
    return variables, y, state.get('intermediates', {}), y_nchw, y16

  x = _features(SHAPE)
  return (x, *run(x))


@functools.cache
def _train_outputs(name):
  """Train-mode output, updated batch_stats and gradients w.r.t. every parameter."""
  module = _create(name)
  x, variables, *_ = _eval_outputs(name)
  others = {k: v for k, v in variables.items() if k != 'params'}

  @jax.jit
  def run(params, x):
    def loss(params):
      out, updates = module.apply({'params': params, **others}, x, train=True,
                                  mutable=['batch_stats'])
      weights = jnp.linspace(0.5, 1.5, out.shape[-1])  # Not a symmetric loss.
      return jnp.sum(jnp.square(out) * weights), (out, updates)
    return jax.grad(loss, has_aux=True)(params)

  grads, (y_train, updates) = run(variables.get('params', {}), x)
  return grads, y_train, updates


@pytest.mark.parametrize('name', _cases(ALL))
def test_forward_under_jit_and_dtypes(name):
  x, _, y, _, _, y16 = _eval_outputs(name)
  assert y.shape == x.shape and y.dtype == jnp.float32
  assert np.all(np.isfinite(y))
  assert not np.allclose(y, x)  # The module does something.
  # bfloat16 in -> bfloat16 out, close to the float32 result.
  assert y16.shape == x.shape and y16.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(y16, np.float32), y, atol=0.1, rtol=0.05)


@pytest.mark.parametrize('name', _cases(ALL))
def test_gradients_are_finite_and_nonzero(name):
  _, variables, *_ = _eval_outputs(name)
  grads, _, _ = _train_outputs(name)
  if name in PARAMETER_FREE:
    assert not variables.get('params') and not grads
    return
  leaves = jax.tree_util.tree_leaves_with_path(grads)
  assert len(leaves) == len(jax.tree_util.tree_leaves(variables['params']))
  for path, g in leaves:
    assert np.all(np.isfinite(g)), path
    assert np.any(g != 0), f'zero gradient for {jax.tree_util.keystr(path)}'


@pytest.mark.parametrize('name', _cases(WITH_BATCH_NORM))
def test_train_mode_uses_batch_statistics(name):
  _, variables, y_eval, *_ = _eval_outputs(name)
  _, y_train, updates = _train_outputs(name)
  assert not np.allclose(y_train, y_eval)
  moved = jax.tree.map(lambda a, b: bool(np.any(a != b)), updates['batch_stats'],
                       variables['batch_stats'])
  assert all(jax.tree_util.tree_leaves(moved))


@pytest.mark.parametrize('name', _cases(ALL))
def test_channels_first_is_the_transposed_result(name):
  _, _, y, _, y_nchw, _ = _eval_outputs(name)
  np.testing.assert_allclose(y_nchw, y, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize('name', _cases(ALL))
def test_other_spatial_ranks(name):
  module = _create(name)
  signal, volume = _features((2, 9, 16)), _features((1, 3, 4, 5, 16))
  if name in IMAGE_ONLY:
    for x in (signal, volume):
      with pytest.raises(ValueError, match='2-D feature maps'):
        _trace_init(module, x)
    return

  @jax.jit
  def run(signal, volume):
    return [module.apply(module.init(jax.random.key(1), x), x) for x in (signal, volume)]

  for x, y in zip((signal, volume), run(signal, volume), strict=True):
    assert y.shape == x.shape and np.all(np.isfinite(y))
    assert not np.allclose(y, x)


@pytest.mark.parametrize('name', ALL)
def test_bad_input_is_a_clear_error(name):
  module = _create(name)
  x = _features(SHAPE)
  with pytest.raises(TypeError, match='floating-point'):
    _trace_init(module, x.astype(jnp.int32))
  for bad_rank in (x[0, 0, 0], x.reshape(1, 1, 1, 2, 3, 10, 32)):
    with pytest.raises(ValueError, match='layout'):
      _trace_init(module, bad_rank)
  with pytest.raises(ValueError, match='empty axis'):
    _trace_init(module, x[:, :0])
  with pytest.raises(ValueError, match='channel_axis'):
    _trace_init(_create(name, channel_axis=0), x)


@pytest.mark.parametrize('name', sorted(set(ALL) - {'simam', 'spatial', 'triplet', 'eca'}))
def test_other_channel_count_is_a_clear_error(name):
  module = _create(name)
  variables = _trace_init(module, _features(SHAPE))
  with pytest.raises(ValueError, match='(?i)re-initialise'):
    jax.eval_shape(module.apply, variables, _features(SHAPE[:-1] + (16,)))


SOWN = {
    'eca': {'channel_map': (2, 32)},
    'bam': {'attention_map': SHAPE, 'channel': {'channel_logits': (2, 32)},
            'spatial': {'spatial_logits': (2, 6, 5)}},
    'scse': {'channel': {'channel_map': (2, 32)}, 'spatial': {'spatial_map': (2, 6, 5)}},
    'coord': {'height_map': (2, 6, 32), 'width_map': (2, 5, 32)},
    'triplet': {'channel_width_map': (2, 32, 5), 'height_channel_map': (2, 6, 32),
                'spatial_map': (2, 6, 5)},
    'simam': {'attention_map': SHAPE},
    'lcbam': {'channel': {'channel_map': (2, 32)}, 'spatial': {'spatial_map': (2, 6, 5)}},
}


@pytest.mark.parametrize('name', sorted(SOWN))
def test_sown_maps(name):
  _, _, _, sown, _, _ = _eval_outputs(name)
  shapes = jax.tree.map(lambda t: tuple(a.shape for a in t), sown,
                        is_leaf=lambda t: isinstance(t, tuple))
  expected = jax.tree.map(lambda s: (s,), SOWN[name], is_leaf=lambda t: isinstance(t, tuple))
  assert shapes == expected
  for path, leaf in jax.tree_util.tree_leaves_with_path(sown):
    assert leaf.dtype == jnp.float32
    if path[-2].key.endswith('_map'):  # Maps are in [0, 1]; BAM's *_logits are not maps.
      assert np.all((leaf >= 0) & (leaf <= 1))


# ----------------------------------------------------------------------- SimAM


def _simam_numpy(x, e_lambda=1e-4):
  x = np.asarray(x, np.float64)
  axes = tuple(range(1, x.ndim - 1))
  n = math.prod(x.shape[1:-1]) - 1
  d = (x - x.mean(axis=axes, keepdims=True)) ** 2
  e_inv = d / (4 * (d.sum(axis=axes, keepdims=True) / n + e_lambda)) + 0.5
  return x / (1 + np.exp(-e_inv))


def test_simam_matches_the_formula_without_parameters(variant):
  module = attention.create('simam')
  for shape in [(2, 7, 3), (1, 2, 3, 4, 3)]:
    x = _features(shape, seed=5)
    variables = _init(module, x)
    assert not variables.get('params', {})
    got = variant(module.apply)(variables, x)
    np.testing.assert_allclose(got, _simam_numpy(x), atol=1e-6, rtol=1e-5)


def test_simam_lambda_changes_the_result():
  x = _features((2, 4, 4, 3))
  a = attention.create('simam').apply({}, x)
  b = attention.create('simam', e_lambda=10.0).apply({}, x)
  assert not np.allclose(a, b)
  np.testing.assert_allclose(b, _simam_numpy(x, 10.0), atol=1e-6, rtol=1e-5)


def test_simam_single_position_is_an_error():
  with pytest.raises(ValueError, match='at least 2 spatial positions'):
    attention.create('simam').apply({}, jnp.ones((2, 1, 1, 4)))


# ----------------------------------------------------------------------- member details


@pytest.mark.slow
def test_eca_kernel_adapts_and_can_be_fixed():
  for channels, k in [(16, 3), (64, 3), (256, 5), (512, 5)]:
    variables = _trace_init(attention.create('eca'), _features((1, 2, 2, channels)))
    assert variables['params']['conv_kernel'].shape == (k, 1, 1)
  variables = _trace_init(attention.create('eca', kernel_size=7), _features((1, 2, 2, 16)))
  assert variables['params']['conv_kernel'].shape == (7, 1, 1)
  for bad in (4, 0, (3, 3)):
    with pytest.raises(ValueError, match='kernel_size'):
      _trace_init(attention.create('eca', kernel_size=bad), _features((1, 2, 2, 16)))


def test_eca_is_one_conv_across_channels():
  x = _features((2, 3, 3, 8))
  kernel = jnp.array([1.0, -2.0, 0.5]).reshape(3, 1, 1)
  y = attention.create('eca').apply({'params': {'conv_kernel': kernel}}, x)
  pooled = np.pad(np.asarray(x).mean(axis=(1, 2)), ((0, 0), (1, 1)))
  logits = pooled[:, :-2] * 1.0 - 2.0 * pooled[:, 1:-1] + 0.5 * pooled[:, 2:]
  np.testing.assert_allclose(y, x / (1 + np.exp(-logits))[:, None, None], atol=1e-6)


@pytest.mark.slow
def test_bam_combine_and_output_norm():
  x = _features(SHAPE)
  with pytest.raises(ValueError, match='combine'):
    _trace_init(attention.create('bam', combine='mean'), x)
  plain = _init(attention.create('bam'), x)
  normed = _trace_init(attention.create('bam', output_norm=True), x)
  assert 'output_norm' in normed['params']['channel']
  assert 'output_norm' in normed['params']['spatial']
  assert 'output_norm' not in plain['params']['channel']
  a, b = jax.jit(lambda v, x: [attention.create('bam', combine=c).apply(v, x)
                                for c in ('sum', 'product')])(plain, x)
  assert not np.allclose(a, b)
  # 1 + sigmoid(.) lies in (1, 2): BAM amplifies, never suppresses.
  ratio = np.asarray(a) / np.asarray(x)
  assert np.all((ratio > 1) & (ratio < 2))


def test_bam_hidden_width_is_c_over_r():
  variables = _trace_init(attention.create('bam'), _features((1, 4, 4, 64)))
  assert variables['params']['channel']['fc1_kernel'].shape == (64, 4)
  assert variables['params']['spatial']['reduce_conv']['kernel'].shape == (1, 1, 64, 4)
  assert variables['params']['spatial']['dilated_conv0']['kernel'].shape == (3, 3, 4, 4)


def test_scse_max_aggregation():
  x = _features(SHAPE)
  module = attention.create('scse')
  variables = _init(module, x)
  _, state = module.apply(variables, x, mutable=['intermediates'])
  c = state['intermediates']['channel']['channel_map'][0][:, None, None, :]
  s = state['intermediates']['spatial']['spatial_map'][0][..., None]
  np.testing.assert_allclose(module.apply(variables, x), x * c + x * s, atol=1e-6)
  got = attention.create('scse', aggregation='max').apply(variables, x)
  np.testing.assert_allclose(got, np.maximum(x * c, x * s), atol=1e-6)
  with pytest.raises(ValueError, match='aggregation'):
    attention.create('scse', aggregation='sum').apply(variables, x)


def test_coord_hidden_width():
  for channels, mip in [(32, 8), (512, 16)]:
    variables = _trace_init(attention.create('coord'), _features((1, 3, 4, channels)))
    assert variables['params']['conv1']['kernel'].shape == (channels, mip)


def test_triplet_without_spatial_branch():
  x = _features(SHAPE)
  variables = _trace_init(_create('triplet', use_spatial=False), x)
  assert set(variables['params']) == {'cw', 'hc'}


def test_fields_reach_the_parameters():
  x = _features(SHAPE)
  for name in sorted(set(ALL) - set(PARAMETER_FREE)):
    variables = _init(_create(name, param_dtype=jnp.bfloat16,
                                  kernel_init=jax.nn.initializers.ones), x)
    leaves = jax.tree_util.tree_leaves(variables['params'])
    assert all(leaf.dtype == jnp.bfloat16 for leaf in leaves), name
    assert any(np.all(np.asarray(leaf, np.float32) == 1) for leaf in leaves), name


def test_check_spatial_dims_message():
  with pytest.raises(ValueError, match=r'2-D feature maps \(B, H, W, C\).*1 spatial'):
    _base.check_spatial_dims('Thing', jnp.ones((1, 4, 3)), (2,))


# ----------------------------------------------------------------------- in the models


@pytest.mark.parametrize('name', [
    pytest.param(name, marks=pytest.mark.slow) if name in ('triplet', 'bam') else name
    for name in ALL])
def test_every_member_fits_in_a_resnet(name):
  models = pytest.importorskip('cbam_jax.models')
  model = models.create_model('resnet_tiny', attention=name)
  x = _features((2, 8, 8, 3))
  variables = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), x)
  logits = jax.eval_shape(model.apply, variables, x)
  assert logits.shape == (2, 10)
  if name not in PARAMETER_FREE:
    assert 'attention' in variables['params']['layer1_0']


@pytest.mark.slow
def test_bam_at_stage_transitions():
  models = pytest.importorskip('cbam_jax.models')
  model = models.create_model('resnet_tiny', stage_attention='bam')
  x = _features((2, 8, 8, 3))

  @jax.jit
  def run(x):
    variables = model.init(jax.random.key(0), x)
    return variables, model.apply(variables, x, train=True, mutable=['batch_stats'])

  variables, (logits, state) = run(x)
  params = variables['params']
  assert 'stage_attention1' in params and 'stage_attention2' not in params  # not after last
  assert 'attention' not in params['layer1_0']
  assert set(params['stage_attention1']) == {'channel', 'spatial'}
  assert logits.shape == (2, 10) and np.all(np.isfinite(logits))
  assert 'stage_attention1' in state['batch_stats']
