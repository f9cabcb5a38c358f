"""cbam_jax.nnx attention modules against their linen twins: same outputs, gradients and
BatchNorm statistics on the same weights (float32, 1e-6), same maps, same errors."""

import dataclasses
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cases import fast_subset
from flax import nnx
from nnx_parity import assert_same_step, randomized

import cbam_jax.nnx as cnnx
from cbam_jax import attention
from cbam_jax.nnx import transfer

# name -> fields exercising the non-default paths (BatchNorm, biases, options).
FIELDS = {
    'cbam': dict(spatial_norm=True, reduction_ratio=4, kernel_size=3,
                 pool_types=('avg', 'max', 'lse')),
    'channel': dict(reduction_ratio=4, pool_types=('avg', 'lp')),
    'spatial': dict(spatial_norm=True, kernel_size=3),
    'se': dict(reduction_ratio=4),
    'eca': dict(kernel_size=3),
    'bam': dict(reduction_ratio=4, output_norm=True, dilation=2),
    'scse': dict(reduction_ratio=4, aggregation='max'),
    'coord': dict(reduction_ratio=4, min_hidden=2),
    'triplet': dict(kernel_size=3),
    'simam': {},
    'lcbam': dict(reduction_ratio=4, kernel_size=3, mlp_bias=True),
}

# (name, spatial shape, channel_axis, train): every member once, and together every mode
# (train/eval), layout (NHWC/NCHW) and rank (1-D/2-D/3-D) each member supports. Kept to a
# handful: each case compiles four programs.
CASES = [
    ('cbam', (5, 6), -1, True), ('cbam', (7,), 1, False), ('cbam', (3, 4, 3), -1, False),
    ('channel', (5, 6), 1, True),
    ('spatial', (5, 6), 1, True), ('spatial', (7,), -1, False),
    ('se', (3, 4, 3), 1, False),
    ('eca', (7,), -1, True),
    ('bam', (4, 5), 1, True), ('bam', (7,), -1, False),
    ('scse', (5, 6), -1, False),
    ('coord', (5, 6), 1, True),
    ('triplet', (4, 5), -1, True),
    ('simam', (3, 4, 3), -1, True),
    ('lcbam', (5, 6), 1, False), ('lcbam', (7,), -1, True),
]


def _input_shape(spatial, channel_axis, channels=8, batch=3):
  shape = (batch, *spatial, channels)
  return shape if channel_axis == -1 else (batch, channels, *spatial)


IDS = [f'{c[0]}-{len(c[1])}d-{"nhwc" if c[2] == -1 else "nchw"}-{"train" if c[3] else "eval"}'
       for c in CASES]
# The fast run (-m "not slow") keeps the cases that compile in about a second; the others
# (1-D and 3-D CBAM, the members with seconds-long programs) run in the full suite.
FAST_CASES = ('cbam-2d-nhwc-train', 'channel-2d-nchw-train', 'spatial-2d-nchw-train',
              'eca-1d-nhwc-train', 'scse-2d-nhwc-eval', 'simam-3d-nhwc-train')


@pytest.mark.parametrize('name,spatial,channel_axis,train', fast_subset(CASES, IDS, FAST_CASES))
def test_matches_linen(name, spatial, channel_axis, train):
  shape = _input_shape(spatial, channel_axis)
  linen_module = attention.create(name, channel_axis=channel_axis, **FIELDS[name])
  x = jax.random.normal(jax.random.key(len(name)), shape)
  variables = randomized(jax.eval_shape(linen_module.init, jax.random.key(0), x),
                         seed=len(name))
  model = transfer.from_linen(linen_module, variables, sample_shape=shape)
  assert isinstance(model, cnnx.resolve(name))
  assert_same_step(linen_module, model, variables, x, train)
  # One set of weights: back to linen unchanged (eval mode did not touch the statistics).
  if not train:
    back = transfer.to_linen(model)
    for collection in ('params', 'batch_stats'):
      np.testing.assert_array_equal(
          np.concatenate([np.ravel(v) for v in jax.tree_util.tree_leaves(back[collection])]
                         or [np.zeros(0)]),
          np.concatenate([np.ravel(v) for v in jax.tree_util.tree_leaves(
              variables.get(collection, {}))] or [np.zeros(0)]))


@pytest.mark.parametrize('name', sorted(FIELDS))
def test_same_maps_and_parameters_as_linen(name):
  linen_module = attention.create(name, **FIELDS[name])
  x = jax.random.normal(jax.random.key(1), (2, 5, 6, 8))
  variables = jax.eval_shape(linen_module.init, jax.random.key(0), x)
  model = nnx.eval_shape(lambda: cnnx.create(name, 8, rngs=nnx.Rngs(0), **FIELDS[name]))
  linen_shapes = jax.tree_util.tree_map(jnp.shape, dict(variables))
  nnx_shapes = jax.tree_util.tree_map(jnp.shape, transfer.to_linen(model))
  for collection in ('params', 'batch_stats'):
    assert nnx_shapes[collection] == linen_shapes.get(collection, {})
  # Maps: the linen 'intermediates' tree, under nnx.capture (nothing stored otherwise).
  _, maps = nnx.eval_shape(lambda m, x: nnx.capture(m, nnx.Intermediate)(x), model, x)
  _, state = jax.eval_shape(lambda v, x: linen_module.apply(
      v, x, train=True, mutable=['intermediates', 'batch_stats']), variables, x)
  assert (jax.tree_util.tree_map(jnp.shape, nnx.to_pure_dict(maps))
          == jax.tree_util.tree_map(jnp.shape, state['intermediates']))
  assert not nnx.state(model, nnx.Intermediate)


def test_fields_are_the_linen_fields_with_the_same_defaults():
  for name in attention.available():
    linen_cls, nnx_cls = attention.resolve(name), cnnx.resolve(name)
    assert attention.member(name).nnx is nnx_cls
    model = nnx.eval_shape(lambda cls=nnx_cls: cls(16, rngs=nnx.Rngs(0)))
    for field in dataclasses.fields(linen_cls):
      if field.name not in ('parent', 'name'):
        assert getattr(model, field.name) == field.default, (name, field.name)
  with pytest.raises(TypeError, match=r"CBAM got unexpected field\(s\) \['reduction'\]"):
    cnnx.CBAM(16, rngs=nnx.Rngs(0), reduction=4)


def test_same_names_and_unknown_name_error():
  assert cnnx.available() == attention.available()
  with pytest.raises(ValueError) as linen_error:
    attention.create('cbma')
  with pytest.raises(ValueError) as nnx_error:
    cnnx.create('cbma', 8, rngs=nnx.Rngs(0))
  assert str(nnx_error.value) == str(linen_error.value)


def _linen_message(module, x):
  with pytest.raises((ValueError, TypeError)) as error:
    jax.eval_shape(module.init, jax.random.key(0), x)
  return str(error.value)


@pytest.mark.parametrize('name,fields,build_shape,bad_shape,dtype', [
    ('cbam', {}, (2, 6, 6, 8), (2, 6, 8), jnp.float32),            # rank of the spatial conv
    ('cbam', {}, (2, 6, 6, 8), (2, 6, 6, 8), jnp.int32),          # dtype
    ('channel', {}, (2, 6, 6, 16), (2, 6, 6, 8), jnp.float32),    # channels
    ('coord', {}, (2, 6, 6, 8), (2, 6, 6, 6, 8), jnp.float32),    # 2-D only
    ('lcbam', {}, (2, 6, 6, 16), (2, 6, 6, 8), jnp.float32),      # channels
])
def test_same_input_errors_as_linen(name, fields, build_shape, bad_shape, dtype):
  linen_module = attention.create(name, **fields)
  variables = jax.eval_shape(linen_module.init, jax.random.key(0), jnp.zeros(build_shape))
  bad = jax.ShapeDtypeStruct(bad_shape, dtype)
  with pytest.raises((ValueError, TypeError)) as linen_error:
    jax.eval_shape(linen_module.apply, variables, bad)
  model = nnx.eval_shape(lambda: cnnx.create(name, build_shape[-1], rngs=nnx.Rngs(0),
                                             **fields))
  with pytest.raises(type(linen_error.value)) as nnx_error:
    nnx.eval_shape(lambda m, x: m(x), model, bad)
  assert str(nnx_error.value) == str(linen_error.value)


@pytest.mark.parametrize('name,fields', [('cbam', dict(kernel_size=4)),
                                         ('cbam', dict(order='backwards')),
                                         ('channel', dict(pool_types=('mean',))),
                                         ('channel', dict(hidden_rounding='ceil')),
                                         ('eca', dict(kernel_size=2)),
                                         ('bam', dict(combine='mean'))])
def test_same_field_errors_as_linen(name, fields):
  message = _linen_message(attention.create(name, **fields),
                           jax.ShapeDtypeStruct((2, 6, 6, 16), jnp.float32))
  with pytest.raises((ValueError, TypeError)) as error:
    cnnx.create(name, 16, rngs=nnx.Rngs(0), **fields)
  assert str(error.value) == message


def test_modules_take_in_features_and_rngs_eagerly():
  model = cnnx.CBAM(in_features=16, rngs=nnx.Rngs(0), spatial_norm=True)
  assert model.channel.fc1_kernel.shape == (16, 1)
  assert model.spatial.conv_kernel.shape == (7, 7, 2, 1)
  assert isinstance(model.spatial.norm.mean, nnx.BatchStat)
  assert 'num_spatial_dims' in inspect.signature(cnnx.CBAM.__init__).parameters
  volume = cnnx.CBAM(16, num_spatial_dims=3, rngs=nnx.Rngs(0))
  assert volume.spatial.conv_kernel.shape == (7, 7, 7, 2, 1)
  model.eval()
  assert model.spatial.norm.use_running_average
  model.train()
  assert not model.spatial.norm.use_running_average
