"""The conformance suite every registered attention member passes, read from the registry.

Each check takes a registry name, so a new member is covered by registering it: the last
test registers a toy member defined here (one file is enough, as docs/extending.md shows)
and runs the whole suite on it. Shapes, dtypes and ranks are traced (``jax.eval_shape``,
no compile); the numeric checks jit one program each and keep the expensive members to the
full run (tests/cases.py)."""

import dataclasses
import functools
import inspect
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cases import fast_subset
from flax import nnx
from nnx_parity import assert_same_step, randomized

import cbam_jax.nnx as cnnx
from cbam_jax import attention
from cbam_jax import functional as F
from cbam_jax.attention import _base
from cbam_jax.nnx import transfer

ALL = attention.available()
# Members whose programs compile in about a second; the others' numeric checks run in the
# full suite only (their fields/registration checks run everywhere).
FAST_MEMBERS = ('cbam', 'channel', 'spatial', 'se', 'eca', 'simam')
# Small conv kernels keep the compile times low; the parity tests run the defaults.
SMALL = {name: {'kernel_size': 3} for name in ('cbam', 'spatial', 'lcbam', 'triplet')}
SMALL['bam'] = {'num_dilated_convs': 1}
SHAPE = (2, 6, 5, 8)  # (B, H, W, C); H != W so that swapped axes show.


def _numeric(names):
  return fast_subset(names, names, FAST_MEMBERS)


def _fields(name):
  return SMALL.get(name, {})


def _features(shape, seed=0, dtype=jnp.float32):
  return jax.random.normal(jax.random.key(seed), shape).astype(dtype)


def _linen_fields(cls):
  return {f.name: f.default for f in dataclasses.fields(cls)
          if f.init and f.name not in ('parent', 'name')}


def _build_nnx(name, in_features, **fields):
  return cnnx.create(name, in_features, rngs=nnx.Rngs(0), **fields)


def _map_names(tree):
  """The names a sown tree records, at any depth (submodules nest them)."""
  paths = jax.tree_util.tree_leaves_with_path(tree)
  return {next(k.key for k in reversed(path) if isinstance(k, jax.tree_util.DictKey))
          for path, _ in paths}


# ------------------------------------------------------------------ the suite


def check_registration(name):
  member = attention.member(name)
  assert issubclass(member.linen, _base.AttentionModule)
  assert issubclass(member.nnx, _base.NnxAttentionModule)
  assert attention.resolve(name) is member.linen and cnnx.resolve(name) is member.nnx
  assert attention.name_of(member.linen) == attention.name_of(member.nnx) == name
  assert attention.name_of(functools.partial(member.linen, dtype=jnp.bfloat16)) == name
  assert member.nnx.supported_spatial_dims == member.linen.supported_spatial_dims
  assert set(member.spatial_dims) <= {1, 2, 3}
  for preset, fields in member.presets.items():
    assert preset in attention.presets.PRESETS
    assert set(fields) <= set(_linen_fields(member.linen)), (preset, fields)
  for map_name in member.maps:
    assert map_name.endswith('_map'), map_name


def check_fields_match_signature(name):
  """The NNX signature names every linen field, with the same default: they cannot drift."""
  member = attention.member(name)
  linen_fields = _linen_fields(member.linen)
  nnx_fields = _base.nnx_field_names(member.nnx)
  assert sorted(nnx_fields) == sorted(linen_fields)
  parameters = inspect.signature(member.nnx.__init__).parameters
  for field, default in linen_fields.items():
    parameter = parameters[field]
    assert parameter.kind is inspect.Parameter.KEYWORD_ONLY, (name, field)
    assert parameter.default == default, (name, field, parameter.default, default)
    assert parameter.annotation is not inspect.Parameter.empty, (name, field)
  assert parameters['rngs'].kind is inspect.Parameter.KEYWORD_ONLY
  # A misspelt field names the closest one, in both skins.
  field = sorted(linen_fields)[0]
  with pytest.raises(TypeError, match=f'did you mean {field!r}'):
    member.linen(**{field + 'x': None})
  with pytest.raises(TypeError, match=f'did you mean {field!r}'):
    member.nnx(8, **{field + 'x': None}, rngs=nnx.Rngs(0))


def _spatial(rank):
  """A small spatial shape of ``rank`` dimensions: SHAPE's for 2-D."""
  return SHAPE[1:3] + (3,) * (rank - 2) if rank >= 2 else (7,)


def _rank_field(name, rank):
  """``num_spatial_dims`` for the NNX members whose parameters depend on the rank."""
  member = attention.member(name)
  return ({'num_spatial_dims': rank} if 'num_spatial_dims' in
          inspect.signature(member.nnx.__init__).parameters else {})


def check_shapes_dtypes_and_ranks(name):
  """Every rank (1-D to 3-D), both layouts, float32 and bfloat16; traced only."""
  member = attention.member(name)
  for rank in (1, 2, 3):
    spatial = _spatial(rank)
    for channel_axis in (-1, 1):
      shape = (2, *spatial, 8) if channel_axis == -1 else (2, 8, *spatial)
      module = attention.create(name, channel_axis=channel_axis, **_fields(name))
      for dtype in (jnp.float32, jnp.bfloat16):
        x = jax.ShapeDtypeStruct(shape, dtype)
        if rank not in member.spatial_dims:
          with pytest.raises(ValueError, match='feature maps'):
            jax.eval_shape(module.init, jax.random.key(0), x)
          continue
        variables = jax.eval_shape(module.init, jax.random.key(0), x)
        y = jax.eval_shape(module.apply, variables, x)
        assert (y.shape, y.dtype) == (shape, dtype), (rank, channel_axis, dtype)
        model = nnx.eval_shape(functools.partial(
            _build_nnx, name, 8, channel_axis=channel_axis, **_fields(name),
            **_rank_field(name, rank)))
        y_nnx = nnx.eval_shape(lambda m, x: m(x), model, x)
        assert (y_nnx.shape, y_nnx.dtype) == (shape, dtype), (rank, channel_axis, dtype)


def check_maps_layout_and_gradients(name):
  """One program: the NHWC output, the sown maps, the NCHW output (the transposed result)
  and the gradients; then ``check_grads`` on the jitted apply."""
  member = attention.member(name)
  module = attention.create(name, **_fields(name))
  nchw = attention.create(name, channel_axis=1, **_fields(name))
  x = _features(SHAPE)
  variables = randomized(jax.eval_shape(module.init, jax.random.key(0), x), seed=1)

  @jax.jit
  def run(variables, x):
    y, state = module.apply(variables, x, mutable=['intermediates'])
    y_nchw = jnp.moveaxis(nchw.apply(variables, jnp.moveaxis(x, -1, 1)), 1, -1)
    return y, state.get('intermediates', {}), y_nchw

  y, sown, y_nchw = run(variables, x)
  assert np.all(np.isfinite(y)) and not np.allclose(y, x)
  np.testing.assert_allclose(y_nchw, y, atol=1e-6, rtol=1e-6)
  # Sown: every *_map is a registered map, float32 in [0, 1]; every registered map is sown.
  sown_maps = {n for n in _map_names(sown) if n.endswith('_map')}
  assert sown_maps == set(member.maps), (sown_maps, member.maps)
  for path, leaf in jax.tree_util.tree_leaves_with_path(sown):
    assert leaf.dtype == jnp.float32, path
    if path[-2].key.endswith('_map'):
      assert np.all((leaf >= 0) & (leaf <= 1)), path
  params = variables.get('params', {})
  others = {k: v for k, v in variables.items() if k != 'params'}
  apply = jax.jit(lambda params, x: module.apply({'params': params, **others}, x))
  jax.test_util.check_grads(apply, (params, x), order=1, modes=['rev'], atol=5e-2, rtol=5e-2)


def check_nnx_parity(name, **fields):
  """Same outputs, gradients and BatchNorm updates in both skins, train and eval mode;
  the same sown maps."""
  module = attention.create(name, **_fields(name), **fields)
  x = _features(SHAPE, seed=2)
  variables = randomized(jax.eval_shape(module.init, jax.random.key(0), x), seed=3)
  model = transfer.from_linen(module, variables, sample_shape=x.shape)
  assert isinstance(model, attention.member(name).nnx)
  assert_same_step(module, model, variables, x, train=True)
  _, maps = nnx.eval_shape(lambda m, x: nnx.capture(m, nnx.Intermediate)(x), model, x)
  _, state = jax.eval_shape(lambda v, x: module.apply(
      v, x, train=True, mutable=['intermediates', 'batch_stats']), variables, x)
  assert (jax.tree_util.tree_map(jnp.shape, nnx.to_pure_dict(maps))
          == jax.tree_util.tree_map(jnp.shape, state['intermediates']))


def _params_shapes(module, x):
  return jax.tree_util.tree_map(
      jnp.shape, jax.eval_shape(module.init, jax.random.key(0), x).get('params', {}))


def check_identity_at_insertion(name, ranks=(2,), dtypes=(jnp.float32, jnp.bfloat16)):
  """``identity_init=True``: the fresh module returns its input bit for bit, in both skins,
  both layouts and each of ``ranks``; its parameters are the member's plus one top-level
  ``identity_scale`` ``(C,)`` (none in a branch), and ``identity_init=False`` adds none."""
  member = attention.member(name)
  for rank in sorted(set(ranks) & set(member.spatial_dims)):
    for channel_axis in (-1, 1):
      shape = (2, *_spatial(rank), 8) if channel_axis == -1 else (2, 8, *_spatial(rank))
      module = attention.create(name, channel_axis=channel_axis, identity_init=True,
                                **_fields(name))
      plain = attention.create(name, channel_axis=channel_axis, **_fields(name))
      plain_shapes = _params_shapes(plain, jax.ShapeDtypeStruct(shape, jnp.float32))
      assert 'identity_scale' not in str(plain_shapes)
      assert _params_shapes(module, jax.ShapeDtypeStruct(shape, jnp.float32)) == {
          **plain_shapes, 'identity_scale': (8,)}
      model = _build_nnx(name, 8, channel_axis=channel_axis, identity_init=True,
                         **_fields(name), **_rank_field(name, rank))
      assert (jax.tree_util.tree_map(jnp.shape, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
              == {**plain_shapes, 'identity_scale': (8,)})
      init_and_apply = jax.jit(lambda x, module=module: module.apply(
          module.init(jax.random.key(1), x), x))
      call = nnx.jit(lambda model, x: model(x))
      for dtype in dtypes if (rank, channel_axis) == (2, -1) else (jnp.float32,):
        x = _features(shape, seed=rank, dtype=dtype)
        np.testing.assert_array_equal(init_and_apply(x), x, err_msg=str((rank, channel_axis)))
        np.testing.assert_array_equal(call(model, x), x, err_msg=str((rank, channel_axis)))


def check_identity_gradients(name):
  """At ``identity_scale = 0`` only the scale gets a gradient (non-zero in every channel);
  after one SGD step the member's own parameters get non-zero gradients too. At
  ``identity_scale = 1`` the module is the member (up to float32 rounding of the blend)."""
  module = attention.create(name, identity_init=True, **_fields(name))
  x = _features(SHAPE, seed=4)
  weights = _features(SHAPE, seed=5)
  variables = jax.jit(module.init)(jax.random.key(0), x)
  params = variables['params']

  @jax.jit
  def grad(params):
    return jax.grad(lambda p: jnp.sum(module.apply({**variables, 'params': p}, x) * weights))(
        params)

  grads = grad(params)
  assert np.all(grads['identity_scale'] != 0), grads['identity_scale']
  own = {k: v for k, v in grads.items() if k != 'identity_scale'}
  for path, leaf in jax.tree_util.tree_leaves_with_path(own):
    assert np.all(leaf == 0), path  # Multiplied by identity_scale = 0.
  stepped = jax.tree_util.tree_map(lambda p, g: p - 0.1 * g, params, grads)
  own_after_step = {k: v for k, v in grad(stepped).items() if k != 'identity_scale'}
  for path, leaf in jax.tree_util.tree_leaves_with_path(own_after_step):
    assert np.any(leaf != 0), path
  plain = attention.create(name, **_fields(name))
  plain_params = {k: v for k, v in params.items() if k != 'identity_scale'}
  ones = {**variables, 'params': {**params, 'identity_scale': jnp.ones_like(
      params['identity_scale'])}}
  np.testing.assert_allclose(jax.jit(module.apply)(ones, x),
                             jax.jit(plain.apply)({**variables, 'params': plain_params}, x),
                             rtol=1e-6, atol=1e-6)


def check_identity_nnx_parity(name):
  """:func:`check_nnx_parity` with ``identity_init=True`` (random ``identity_scale``)."""
  check_nnx_parity(name, identity_init=True)


STATIC_CHECKS = (check_registration, check_fields_match_signature,
                 check_shapes_dtypes_and_ranks)
NUMERIC_CHECKS = (check_maps_layout_and_gradients, check_nnx_parity,
                  check_identity_at_insertion, check_identity_gradients,
                  check_identity_nnx_parity)


@pytest.mark.parametrize('name', ALL)
@pytest.mark.parametrize('check', STATIC_CHECKS, ids=lambda c: c.__name__)
def test_static(check, name):
  check(name)


@pytest.mark.parametrize('name', _numeric(ALL))
@pytest.mark.parametrize('check', NUMERIC_CHECKS, ids=lambda c: c.__name__)
def test_numeric(check, name):
  check(name)


@pytest.mark.slow
@pytest.mark.parametrize('name', ALL)
def test_identity_at_insertion_every_rank(name):
  check_identity_at_insertion(name, ranks=(1, 3), dtypes=(jnp.float32,))


# ------------------------------------------------------------ a toy member, one file


def channel_gain_map(scale, bias, x, *, gate):
  """``gate(scale * GAP(x) + bias)`` of a channels-last batch: ``(B, C)`` float32."""
  pooled = _base.spatial_pool(x, 'avg')
  return gate(pooled * scale.astype(jnp.float32) + bias.astype(jnp.float32))


class ChannelGain(_base.AttentionModule):
  """``x * gate(scale * GAP(x) + bias)``: params ``scale (C,)`` and ``bias (C,)``."""

  gate: Callable[[jax.Array], jax.Array] = nn.sigmoid

  @nn.compact
  def refine(self, x, train):
    del train
    scale = self.param('scale', _base.ones_init, x.shape[-1:], self.param_dtype)
    bias = self.param('bias', self.bias_init, x.shape[-1:], self.param_dtype)
    channel_map = channel_gain_map(scale, bias, x, gate=self.gate)
    self.sow('intermediates', 'channel_map', channel_map)
    return F.apply_gate(x, _base.channel_map_shape(channel_map, x))


class NnxChannelGain(_base.NnxAttentionModule):
  """:class:`ChannelGain` in NNX."""

  gate: Callable[[jax.Array], jax.Array]

  def __init__(self, in_features: int, *, gate: Callable[[jax.Array], jax.Array] = nn.sigmoid,
               channel_axis: int = -1, identity_init: bool = False,
               dtype: _base.Dtype | None = None, param_dtype: _base.Dtype = jnp.float32,
               precision: _base.PrecisionLike = None,
               kernel_init: _base.Initializer = _base.default_kernel_init,
               bias_init: _base.Initializer = _base.default_bias_init, rngs: nnx.Rngs):
    self.set_fields(in_features, locals())
    self.scale = nnx.Param(_base.ones_init(rngs.params(), (in_features,), param_dtype))
    self.bias = nnx.Param(bias_init(rngs.params(), (in_features,), param_dtype))

  def refine(self, x):
    channel_map = channel_gain_map(self.scale[...], self.bias[...], x, gate=self.gate)
    _base.sow_map(self, 'channel_map', channel_map)
    return F.apply_gate(x, _base.channel_map_shape(channel_map, x))


TOY = attention.Member('toy_gain', ChannelGain, NnxChannelGain, maps=('channel_map',),
                       presets={'timm': {'gate': nn.hard_sigmoid}})


@pytest.fixture
def toy_member():
  attention.register(TOY)
  try:
    yield TOY.name
  finally:
    attention.unregister(TOY.name)


def test_a_registered_toy_member_passes_the_suite(toy_member):
  assert toy_member in attention.available() and toy_member in cnnx.available()
  for check in STATIC_CHECKS + NUMERIC_CHECKS:
    check(toy_member)
  # The models and the presets take it by name, in both skins.
  assert attention.presets.fields('timm', toy_member) == {'gate': nn.hard_sigmoid}
  linen_factory = attention.resolve_attention(toy_member, dtype=None, param_dtype=jnp.float32)
  nnx_factory = attention.resolve_attention(toy_member, skin='nnx', dtype=None,
                                            param_dtype=jnp.float32)
  assert isinstance(linen_factory(), ChannelGain)
  assert isinstance(nnx_factory(8, rngs=nnx.Rngs(0)), NnxChannelGain)


def test_unregistered_toy_is_gone():
  assert 'toy_gain' not in attention.available()
  with pytest.raises(ValueError, match='Unknown attention'):
    attention.member('toy_gain')


def test_a_misspelt_name_gets_the_closest():
  with pytest.raises(ValueError, match=r"Unknown attention 'cbma'. Did you mean 'cbam'\?"):
    attention.create('cbma')
  with pytest.raises(ValueError, match=r"Unknown attention 'zzz'. Valid names"):  # No guess.
    attention.create('zzz')


def test_register_checks_the_record():
  with pytest.raises(TypeError, match='Member'):
    attention.register(('toy', ChannelGain))
  with pytest.raises(ValueError, match='already registered'):
    attention.register(attention.member('cbam'))
  with pytest.raises(TypeError, match='nnx must be'):
    attention.register(attention.Member('toy', ChannelGain, ChannelGain))
  class NnxGainWithoutIdentityInit(NnxChannelGain):

    def __init__(self, in_features: int, *, gate: Any = nn.sigmoid, channel_axis: int = -1,
                 dtype: Any = None, param_dtype: Any = jnp.float32, precision: Any = None,
                 kernel_init: Any = None, bias_init: Any = None, rngs: nnx.Rngs):
      raise AssertionError('not built')

  with pytest.raises(TypeError, match=r"lacks the linen fields \['identity_init'\]"):
    attention.register(attention.Member('toy', ChannelGain, NnxGainWithoutIdentityInit))
  with pytest.raises(ValueError, match='attention preset'):
    attention.register(attention.Member('toy', ChannelGain, NnxChannelGain,
                                        presets={'mine': {}}))
  assert 'toy' not in attention.available()
