"""Errors a new user meets first name the problem and the fix: a missing batch axis, a batch
given to the one-example functional core, a misspelt field name."""

from __future__ import annotations

import collections
import dataclasses
import functools
import re

import chex
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import cbam_jax
import cbam_jax.nnx as cnnx
from cbam_jax import _validation, attention, models
from cbam_jax import functional as F
from cbam_jax._fast import spatial_conv

MISSING_BATCH = r'got shape \(5, 6, 8\): modules take a batch, \(B, \*spatial, C\).*x\[None\]'
ONE_EXAMPLE = r'functional works on ONE example.*got shape \(2, 5, 6, 8\).*batch of 2-D.*jax\.vmap'
IMAGE = jnp.ones((5, 6, 8))  # One (H, W, C) image, no batch axis.


def _init(module, x):
  return jax.eval_shape(module.init, jax.random.key(0), x)


@pytest.mark.parametrize('name', ['cbam', 'spatial', 'lcbam'])
def test_linen_module_with_2d_kernel_given_one_image_asks_for_a_batch(name):
  module = attention.resolve(name)(kernel_size=3)
  variables = _init(module, IMAGE[None])
  with pytest.raises(ValueError, match=MISSING_BATCH):
    jax.eval_shape(module.apply, variables, IMAGE)
  # A 2-D kernel_size fixes the rank before any parameter exists.
  with pytest.raises(ValueError, match=MISSING_BATCH):
    _init(attention.resolve(name)(kernel_size=(3, 3)), IMAGE)


@pytest.mark.parametrize('name', ['triplet', 'coord'])
def test_image_only_member_given_one_image_names_the_missing_batch(name):
  # Rank 3 is one image or a batch of 1-D signals; the message names both.
  message = (r'2-D feature maps \(B, H, W, C\); got shape \(5, 6, 8\) with 1 spatial.*'
             r'one example without a batch axis, add one with x\[None\]')
  with pytest.raises(ValueError, match=message):
    _init(attention.resolve(name)(), IMAGE)
  model = nnx.eval_shape(lambda: cnnx.resolve(name)(8, rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match=message):
    nnx.eval_shape(lambda m: m(IMAGE), model)


@pytest.mark.parametrize('name', ['cbam', 'spatial', 'lcbam'])
def test_nnx_module_given_one_image_asks_for_a_batch(name):
  model = nnx.eval_shape(lambda: cnnx.resolve(name)(8, kernel_size=3, rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match=MISSING_BATCH):
    nnx.eval_shape(lambda m: m(IMAGE), model)


def test_a_batch_of_1d_signals_stays_legitimate():
  signals = jnp.ones((2, 9, 6))  # (B, L, C)
  for kernel_size in (3, (3,)):
    module = cbam_jax.CBAM(kernel_size=kernel_size, reduction_ratio=2)
    variables = _init(module, signals)
    assert jax.eval_shape(module.apply, variables, signals).shape == signals.shape
  model = nnx.eval_shape(lambda: cnnx.CBAM(6, kernel_size=3, reduction_ratio=2,
                                            num_spatial_dims=1, rngs=nnx.Rngs(0)))
  assert nnx.eval_shape(lambda m, s: m(s), model, signals).shape == signals.shape


# (member, its fields): one with a spatial kernel, one MLP, one without parameters.
ONE_IMAGE_MEMBERS = {'cbam': dict(reduction_ratio=1, kernel_size=3),
                     'se': dict(reduction_ratio=1), 'simam': {}}


def _member(skin, name, channels, *, abstract=True, **fields):
  """``(apply, variables)``: ``apply(variables, x, **kwargs)`` runs the member, in eval mode;
  ``abstract``: shapes only (for ``jax.eval_shape``). NNX members are built for 1-D
  input, which the one-image check must still catch."""
  fields = {**ONE_IMAGE_MEMBERS[name], **fields}
  if skin == 'linen':
    module = attention.resolve(name)(**fields)
    # Any batch of 1-D signals, to initialise.
    signals = jnp.moveaxis(jnp.ones((2, 9, channels)), -1, fields.get('channel_axis', -1))
    init = jax.eval_shape if abstract else lambda init, *args: init(*args)
    return module.apply, init(module.init, jax.random.key(0), signals)
  if name == 'cbam':
    fields['num_spatial_dims'] = 1

  def build():
    return cnnx.resolve(name)(channels, **fields, rngs=nnx.Rngs(0))

  model = nnx.eval_shape(build) if abstract else build()
  model.eval()
  graph, state = nnx.split(model)
  return lambda state, x, **kwargs: nnx.merge(graph, state)(x, **kwargs), state


@pytest.mark.parametrize('skin', ['linen', 'nnx'])
@pytest.mark.parametrize('name', list(ONE_IMAGE_MEMBERS))
@pytest.mark.parametrize('shape', [(8, 8, 3), (6, 6, 1)])  # One RGB image, one grey.
def test_module_given_one_image_asks_for_a_batch_or_signals(skin, name, shape):
  apply, variables = _member(skin, name, shape[-1])
  x = jax.random.normal(jax.random.key(1), shape)
  with pytest.raises(ValueError, match=(
      rf'got shape {re.escape(str(shape))}, which looks like ONE image \(H, W, C\) '
      rf'without a batch axis.*run it as {shape[0]} 1-D signals.*x\[None\], or call the '
      r'module with signals=True')):
    jax.eval_shape(apply, variables, x)


@pytest.mark.parametrize('skin', ['linen', 'nnx'])
@pytest.mark.parametrize('name', list(ONE_IMAGE_MEMBERS))
def test_signals_true_runs_a_batch_of_1d_signals_with_unchanged_numbers(skin, name):
  apply, variables = _member(skin, name, 3, abstract=False)
  x = jax.random.normal(jax.random.key(1), (8, 8, 3))
  # The numbers of any other batch of these signals: the same examples in two parts (which
  # do not look like an image) give the same output.
  out = apply(variables, x, signals=True)
  parts = [apply(variables, part) for part in (x[:2], x[2:])]
  chex.assert_trees_all_close(out, jnp.concatenate(parts), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('skin', ['linen', 'nnx'])
def test_shapes_that_do_not_look_like_one_image_run_unchanged(skin):
  for shape, channel_axis in (((8, 100, 16), -1),  # Genuine 1-D signals.
                              ((8, 8, 16), -1),    # Square, but 16 channels.
                              ((8, 9, 3), -1),     # 3 channels, not square.
                              ((4, 4, 3), -1),     # Square and RGB, but too small.
                              ((3, 8, 8), -1),     # Channels-last: 8 channels.
                              ((3, 8, 8), 1),      # Channels-first is not checked.
                              ((2, 3, 8, 8), -1)):  # Rank 4 is never refused (docs/api.md).
    apply, variables = _member(skin, 'se', shape[channel_axis], channel_axis=channel_axis)
    assert jax.eval_shape(apply, variables, jnp.ones(shape)).shape == shape


def test_image_only_member_given_one_square_image_keeps_its_own_message():
  # Triplet attention has no 1-D reading, so signals=True would be no fix to offer.
  with pytest.raises(ValueError, match=r'2-D feature maps.*x\[None\]\. For 1-D'):
    _init(attention.resolve('triplet')(), jnp.ones((8, 8, 3)))


def test_functional_given_a_batch_says_one_example_and_vmap():
  params = _init(cbam_jax.CBAM(kernel_size=3, reduction_ratio=2), IMAGE[None])['params']
  batch = jnp.ones((2, *IMAGE.shape))
  with pytest.raises(ValueError, match=ONE_EXAMPLE):
    jax.eval_shape(F.spatial_attention, params['spatial'], batch)
  with pytest.raises(ValueError, match=ONE_EXAMPLE):
    jax.eval_shape(F.cbam, params['channel'], params['spatial'], batch)
  # What the message says to do works.
  mapped = jax.vmap(F.cbam, in_axes=(None, None, 0))
  assert jax.eval_shape(mapped, params['channel'], params['spatial'], batch).shape == batch.shape


@pytest.fixture
def checks(monkeypatch):
  """Counts the input checks (``features``, ``kernel``: the spatial kernel against the input
  of the functional core), the ``order`` checks and the resolutions of the conv ``impl``."""
  calls = collections.Counter()

  def counted(fn, name=None):
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
      calls[name or args[0]] += 1
      return fn(*args, **kwargs)
    return wrapped

  monkeypatch.setattr(_validation, 'check_features',
                      counted(_validation.check_features, 'features'))
  monkeypatch.setattr(_validation, 'check_spatial_kernel',
                      counted(_validation.check_spatial_kernel, 'kernel'))
  monkeypatch.setattr(_validation, 'check_choice', counted(_validation.check_choice))
  monkeypatch.setattr(spatial_conv, 'check_choice',  # resolve_impl's only check.
                      counted(spatial_conv.check_choice, 'impl'))
  return calls


@pytest.mark.parametrize('conv_impl', ['auto', 'xla'])
def test_one_cbam_call_checks_its_input_once(checks, conv_impl):
  x = jnp.ones((2, 5, 6, 8))
  module = cbam_jax.CBAM(reduction_ratio=2, kernel_size=3, conv_impl=conv_impl)
  variables = _init(module, x)
  checks.clear()
  jax.eval_shape(module.apply, variables, x)  # The boundary: __call__.
  assert (checks['features'], checks['kernel'], checks['impl'], checks['order']) == (1, 0, 1, 1)
  model = nnx.eval_shape(lambda: cnnx.CBAM(8, reduction_ratio=2, kernel_size=3,
                                            conv_impl=conv_impl, rngs=nnx.Rngs(0)))
  checks.clear()
  nnx.eval_shape(lambda m: m(x), model)  # The order was checked when it was built.
  assert (checks['features'], checks['kernel'], checks['impl'], checks['order']) == (1, 0, 1, 0)
  # The functional core, called directly, checks its one example once too.
  checks.clear()
  jax.eval_shape(functools.partial(F.cbam, impl=conv_impl), variables['params']['channel'],
                 variables['params']['spatial'], x[0])
  assert (checks['features'], checks['kernel'], checks['impl'], checks['order']) == (1, 1, 1, 1)
  # A branch's map asked for alone (a public method) checks its input once as well.
  checks.clear()
  branch = cbam_jax.SpatialAttention(kernel_size=3, conv_impl=conv_impl)
  maps = jax.eval_shape(functools.partial(branch.apply, method='attention_map'),
                        {'params': variables['params']['spatial']}, x)
  assert maps.shape == x.shape[:-1] and (checks['features'], checks['impl']) == (1, 1)


def test_misspelt_linen_field_suggests_the_right_one():
  with pytest.raises(TypeError, match=r"unexpected field\(s\) \['reduction'\].*did you mean "
                                      r"'reduction_ratio'"):
    cbam_jax.CBAM(reduction=8)
  with pytest.raises(TypeError, match="did you mean 'kernel_size'"):
    attention.resolve('lcbam')(kernel_sizes=3)
  # Correct fields, positional fields and Flax's own clone still work.
  module = cbam_jax.CBAM(reduction_ratio=8)
  assert module.clone(kernel_size=3).kernel_size == 3
  assert cbam_jax.ChannelAttention(-1).channel_axis == -1


def test_misspelt_model_field_suggests_the_right_one():
  with pytest.raises(TypeError, match=r"ResNet got unexpected field\(s\) \['atention'\].*"
                                      r"did you mean 'attention'"):
    models.create_model('resnet20', atention='cbam')
  with pytest.raises(TypeError, match="did you mean 'num_classes'"):
    models.ResNet(stage_sizes=(1,), block_cls=models.BasicBlock, num_clases=3)
  # Correct fields, the registry's partials and Flax's own clone still work.
  model = models.create_model('resnet_tiny', attention='cbam')
  assert model.clone(num_classes=3).num_classes == 3
  assert models.ResNet((1,), models.BasicBlock).stage_sizes == (1,)


def test_misspelt_nnx_field_suggests_the_right_one():
  with pytest.raises(TypeError, match=r"CBAM got unexpected field\(s\) \['reduction'\].*"
                                      r"did you mean 'reduction_ratio'"):
    cnnx.CBAM(16, reduction=4, rngs=nnx.Rngs(0))


def test_nnx_create_model_asks_for_rngs():
  for rngs in (None, 0):
    with pytest.raises(TypeError, match=r"create_model\('resnet_tiny'\) needs "
                                        r"rngs=nnx.Rngs\(seed\).*got rngs="):
      cnnx.create_model('resnet_tiny', rngs=rngs)


def test_unknown_attention_fails_when_the_model_is_built():
  with pytest.raises(ValueError,
                     match=r"Unknown attention 'cbma'\. Did you mean 'cbam'\? Valid names: .*cbam"):
    models.create_model('resnet_tiny', attention='cbma')
  with pytest.raises(ValueError, match=r"Unknown attention 'bma'"):
    models.create_model('resnet_tiny', stage_attention='bma')
  with pytest.raises(ValueError, match=r"Unknown attention 'CBAM'\. Did you mean 'cbam'\?"):
    models.create_model('resnet_tiny', attention='CBAM')


def test_channels_first_images_are_refused_unless_said_otherwise():
  model = models.create_model('resnet_tiny')
  nchw = jnp.ones((2, 3, 16, 16))
  with pytest.raises(ValueError, match=r'\(2, 3, 16, 16\) looks channels-first \(NCHW, 3 '
                     r'channels\)\. Transpose with x\.transpose\(0, 2, 3, 1\), or apply with '
                     r'channels_last=True'):
    _init(model, nchw)
  variables = jax.eval_shape(lambda k, x: model.init(k, x, channels_last=True),
                             jax.random.key(0), nchw)
  assert variables['params']['conv1']['kernel'].shape[2] == 16  # Taken as 16 channels.
  # NHWC images, even tiny ones, pass: (2, 16, 16, 3) and (2, 3, 3, 16).
  for shape in ((2, 16, 16, 3), (2, 3, 3, 16)):
    assert _init(model, jnp.ones(shape))['params']['conv1']['kernel'].shape[2] == shape[3]


def test_nnx_network_without_a_required_field_names_it():
  # Its explicit signature names them (found by the type checker: under **fields the
  # missing default_factory used to be called, "'_MISSING_TYPE' object is not callable").
  with pytest.raises(TypeError, match=r"missing 2 required keyword-only arguments: "
                     r"'stage_sizes' and 'block_cls'"):
    cnnx.ResNet(rngs=nnx.Rngs(0))


def test_gate_in_order_without_any_gate_says_so():
  with pytest.raises(ValueError, match=r'gate_in_order got no gate \(channel_gate and '
                     r'spatial_gate are both None\); pass at least one\.'):
    F.gate_in_order(jnp.ones((4, 4, 3)), None, None)


@pytest.mark.parametrize('name', attention.available())
def test_every_member_checks_its_input_once(checks, name):
  x = jnp.ones((2, 6, 6, 8))
  fields = ({'kernel_size': 3} if 'kernel_size' in
            {f.name for f in dataclasses.fields(attention.member(name).linen)} else {})
  module = attention.create(name, **fields)
  variables = _init(module, x)
  checks.clear()
  jax.eval_shape(functools.partial(module.apply, train=True, mutable=['batch_stats']), variables, x)
  linen_checks = checks['features']
  model = nnx.eval_shape(lambda: cnnx.create(name, 8, rngs=nnx.Rngs(0), **fields))
  checks.clear()
  model.train()
  nnx.eval_shape(lambda m: m(x), model)
  assert (linen_checks, checks['features']) == (1, 1)
