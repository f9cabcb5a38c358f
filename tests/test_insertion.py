"""Attention into a trained network (docs/insertion.md): linen ``add_attention`` on a
registered backbone, NNX ``add_attention`` on any module, and the converter's
``identity_init``. With ``identity_init=True`` every check is exactness: the network with
attention computes the old logits."""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx, traverse_util

import cbam_jax.nnx as cnnx
from cbam_jax import models
from cbam_jax.models.resnet import Bottleneck, ResNet

IMAGES = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
# A ResNeXt of the family's Bottleneck with groups, small enough to compile in a second.
TINY_RESNEXT = dict(stage_sizes=(1, 1), block_cls=Bottleneck, num_filters=8, stem='cifar',
                    num_classes=3, groups=4, width_per_group=8)


def _flat(variables):
  return traverse_util.flatten_dict(dict(variables))


@functools.cache
def _trained(name_or_fields):
  """A plain network and variables with non-trivial BatchNorm statistics."""
  if isinstance(name_or_fields, str):
    model = models.create_model(name_or_fields)
  else:
    model = ResNet(**dict(name_or_fields))
  variables = jax.jit(model.init)(jax.random.key(0), IMAGES)
  # Statistics as training leaves them (means off 0, variances off 1), set in numpy: no
  # training step to compile.
  rng = np.random.default_rng(0)
  stats = jax.tree_util.tree_map(
      lambda a: jnp.asarray(np.asarray(a) + rng.uniform(0.1, 0.5, a.shape).astype(a.dtype)),
      variables['batch_stats'])
  return model, {'params': variables['params'], 'batch_stats': stats}


def _logits(model, variables, x):
  """Eval logits, train logits and the train mode's batch statistics."""
  @jax.jit
  def run(variables, x):
    train, updates = model.apply(variables, x, train=True, mutable=['batch_stats'])
    return model.apply(variables, x), train, updates['batch_stats']
  return run(variables, x)


# --------------------------------------------------------------------------- linen


@pytest.mark.parametrize('network', [
    'resnet_tiny', pytest.param(tuple(TINY_RESNEXT.items()), marks=pytest.mark.slow)],
    ids=['resnet', 'resnext'])
def test_linen_identity_insertion_keeps_logits_and_weights(network):
  model, variables = _trained(network)
  new_model, new_variables = models.add_attention(
      model, variables, 'cbam', stage_attention='se', identity_init=True)
  assert (new_model.attention, new_model.stage_attention.keywords) == (
      'cbam', {'identity_init': True})
  assert dict(new_model.attention_fields) == {'identity_init': True}
  old, new = _flat(variables), _flat(new_variables)
  for path, value in old.items():  # Carried over: the very arrays.
    assert new[path] is value, path
  added = sorted('/'.join(p) for p in set(new) - set(old))
  assert added and all('/attention/' in p or '/stage_attention1/' in p for p in added)
  assert ('params', 'layer1_0', 'attention', 'identity_scale') in new
  chex.assert_trees_all_equal_shapes_and_dtypes(
      new_variables, jax.eval_shape(new_model.init, jax.random.key(0), IMAGES))

  x = IMAGES[::-1] * 1.5
  old_eval, old_train, old_stats = _logits(model, variables, x)
  new_eval, new_train, new_stats = _logits(new_model, new_variables, x)
  np.testing.assert_allclose(new_eval, old_eval, rtol=0, atol=1e-6)
  np.testing.assert_allclose(new_train, old_train, rtol=0, atol=1e-6)
  new_stats = _flat(new_stats)
  for path, value in _flat(old_stats).items():
    np.testing.assert_allclose(new_stats[path], value, rtol=0, atol=1e-6)


def test_linen_fields_merge_and_seed():
  model, variables = _trained('resnet_tiny')
  model = model.clone(attention_fields={'reduction_ratio': 4})
  one, vars_one = models.add_attention(model, variables, 'se', rng=3, hidden_rounding='round')
  _, vars_other = models.add_attention(model, variables, 'se',
                                       rng=jax.random.key(4, impl='rbg'))
  assert dict(one.attention_fields) == {'reduction_ratio': 4, 'hidden_rounding': 'round'}
  path = ('params', 'layer1_0', 'attention', 'channel', 'fc1_kernel')
  assert _flat(vars_one)[path].shape == (8, 2)  # 8 channels / 4.
  assert not np.array_equal(_flat(vars_one)[path], _flat(vars_other)[path])


def test_linen_without_identity_init_changes_logits():
  model, variables = _trained('resnet_tiny')
  new_model, new_variables = models.add_attention(model, variables, 'se')
  old, new = jax.jit(model.apply)(variables, IMAGES), jax.jit(new_model.apply)(
      new_variables, IMAGES)
  assert np.abs(np.asarray(old) - np.asarray(new)).max() > 1e-3


def test_linen_refusals():
  model, variables = _trained('resnet_tiny')
  with pytest.raises(TypeError, match='cbam_jax.nnx.add_attention'):
    models.add_attention(nn.Dense(3), {'params': {}}, 'cbam')
  with pytest.raises(ValueError, match='already has attention=.*attention=None'):
    models.add_attention(model.clone(attention='se'), variables, 'cbam')
  with pytest.raises(ValueError, match='nothing to add'):
    models.add_attention(model, variables, None)
  with pytest.raises(ValueError, match='Unknown attention|unknown'):
    models.add_attention(model, variables, 'cbamm')
  # Variables of another network: refused whole (no partial load).
  other = models.create_model('resnet_tiny', num_classes=4)
  with pytest.raises(ValueError, match='do not fit model.*other shapes.*fc'):
    models.add_attention(other, variables, 'cbam')
  extra = {**variables, 'params': {**variables['params'], 'stray': jnp.zeros(2)}}
  with pytest.raises(ValueError, match='no place.*params/stray'):
    models.add_attention(model, extra, 'cbam')


# --------------------------------------------------------------------------- NNX


def _state_shapes(module):
  return jax.tree_util.tree_map(jnp.shape, nnx.to_pure_dict(nnx.state(module)))


def _nnx_logits(module, x):
  return nnx.jit(lambda m, x: m(x))(module, x)


@pytest.mark.parametrize('mode', ['train', 'eval'])
def test_nnx_backbone_placement_is_create_models_tree(mode):
  model = cnnx.create_model('resnet_tiny', rngs=nnx.Rngs(0))
  getattr(model, mode)()
  before = _nnx_logits(model, IMAGES)
  added = cnnx.add_attention(model, 'cbam', identity_init=True, rngs=nnx.Rngs(1))
  assert list(added) == ['layer1_0/attention', 'layer2_0/attention']
  assert added['layer1_0/attention'] is model.layer1_0.attention
  built = nnx.eval_shape(lambda: cnnx.create_model(
      'resnet_tiny', attention='cbam', attention_fields={'identity_init': True},
      rngs=nnx.Rngs(0)))
  assert _state_shapes(model) == _state_shapes(built)
  # The new modules are in their host's mode.
  assert model.layer1_0.attention.spatial.norm.use_running_average == (mode == 'eval')
  np.testing.assert_allclose(_nnx_logits(model, IMAGES), before, rtol=0, atol=1e-6)
  # And they are the linen twin's variables (what saving and transfer rely on).
  linen = models.create_model('resnet_tiny', attention='cbam',
                              attention_fields={'identity_init': True})
  chex.assert_trees_all_equal_shapes_and_dtypes(
      cnnx.to_linen(model), jax.eval_shape(linen.init, jax.random.key(0), IMAGES))


def test_nnx_backbone_placement_resnext_traced():
  def build(**fields):
    return nnx.eval_shape(lambda: cnnx.create_model('resnext50_32x4d', rngs=nnx.Rngs(0),
                                                    **fields))
  model = build()
  added = cnnx.add_attention(model, 'se', identity_init=True, rngs=nnx.Rngs(1))
  assert len(added) == 16
  assert _state_shapes(model) == _state_shapes(
      build(attention='se', attention_fields={'identity_init': True}))


class ConvBnStack(nnx.Module):
  """A user's network: conv-bn-relu twice (one in a list), then a linear head."""

  def __init__(self, *, rngs: nnx.Rngs):
    self.conv = nnx.Conv(3, 8, (3, 3), rngs=rngs)
    self.bn = nnx.BatchNorm(8, rngs=rngs)
    self.layers = nnx.List([nnx.Conv(8, 6, (3, 3), rngs=rngs), nnx.BatchNorm(6, rngs=rngs)])
    self.head = nnx.Linear(6, 4, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.bn(self.conv(x)))
    x = nnx.relu(self.layers[1](self.layers[0](x)))
    return self.head(jnp.mean(x, axis=(1, 2)))


@pytest.mark.parametrize('where', [
    nnx.BatchNorm,
    lambda path, module: isinstance(module, nnx.Conv) and path[0] == 'layers',
], ids=['type', 'predicate'])
def test_nnx_any_module_keeps_outputs_and_trains_the_scale(where):
  net = ConvBnStack(rngs=nnx.Rngs(0))
  before = _nnx_logits(net, IMAGES)
  added = cnnx.add_attention(net, 'cbam', where=where, identity_init=True, kernel_size=3,
                             rngs=nnx.Rngs(1))
  expected = (['bn/attention', 'layers/1/attention'] if where is nnx.BatchNorm
              else ['layers/0/attention'])
  assert list(added) == expected
  wrapped = net.bn if where is nnx.BatchNorm else net.layers[0]
  assert isinstance(wrapped, cnnx.Attended)
  assert wrapped.attention.identity_scale.shape == (6 if where is not nnx.BatchNorm else 8,)
  np.testing.assert_allclose(_nnx_logits(net, IMAGES), before, rtol=0, atol=1e-6)

  @nnx.jit
  def grads(net, x):
    return nnx.grad(lambda net: jnp.sum(net(x) ** 2))(net)

  scales = {path: value for path, value in traverse_util.flatten_dict(
      nnx.to_pure_dict(grads(net, IMAGES))).items() if path[-1] == 'identity_scale'}
  assert len(scales) == len(expected)
  for path, value in scales.items():
    assert np.all(np.asarray(value) != 0), path
  net.eval()  # Mode reaches the attention inside the wrapper.
  assert all(module.spatial.norm.use_running_average for module in added.values())


def test_nnx_features_and_refusals():
  class Scale(nnx.Module):  # No attribute that names its channels.
    def __call__(self, x):
      return 2 * x

  class Net(nnx.Module):
    def __init__(self):
      self.scale = Scale()

    def __call__(self, x):
      return self.scale(x)

  net = Net()
  with pytest.raises(ValueError, match="channels of Scale at 'scale'.*features="):
    cnnx.add_attention(net, 'se', where=Scale, rngs=nnx.Rngs(0))
  added = cnnx.add_attention(net, 'se', where=Scale, features=3, identity_init=True,
                             rngs=nnx.Rngs(0))
  assert list(added) == ['scale/attention']
  np.testing.assert_allclose(_nnx_logits(net, IMAGES), 2 * IMAGES, rtol=0, atol=1e-6)

  with pytest.raises(ValueError, match='where=None.*pass where='):
    cnnx.add_attention(ConvBnStack(rngs=nnx.Rngs(0)), 'cbam', rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='selects no submodule'):
    cnnx.add_attention(ConvBnStack(rngs=nnx.Rngs(0)), 'cbam', where=nnx.Dropout,
                       rngs=nnx.Rngs(0))
  resnet = nnx.eval_shape(lambda: cnnx.create_model('resnet_tiny', attention='se',
                                                    rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match='attention in its blocks already'):
    cnnx.add_attention(resnet, 'cbam', rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='nothing to add'):
    cnnx.add_attention(resnet, None, rngs=nnx.Rngs(0))


# --------------------------------------------------------------------------- converter


@pytest.mark.torch
@pytest.mark.parametrize('api', ['linen', pytest.param('nnx', marks=pytest.mark.slow)])
def test_torchvision_conversion_with_identity_attention(api):
  pytest.importorskip('torch')
  import torch_reference as refs
  from cbam_jax import convert

  torch_model = refs.randomize(refs.OfficialResNet(
      'basic', [1, 1], 'CIFAR10', num_classes=4, att_type=None, width=16, global_pool=True),
      seed=3)
  x = np.asarray(IMAGES)
  expected = refs.nchw_logits(torch_model, x)
  converted = convert.from_pytorch(torch_model.state_dict(), 'torchvision', attention='cbam',
                                   identity_init=True, api=api, return_report=True)
  report = converted[-1]
  assert report.config['fields']['attention_fields'] == {'identity_init': True}
  assert 'params/layer1_0/attention/identity_scale' in report.new_keys
  if api == 'linen':
    model, variables, _ = converted
    logits = jax.jit(model.apply)(variables, x)
  else:
    module = converted[0]
    module.eval()
    logits = _nnx_logits(module, x)
  np.testing.assert_allclose(logits, expected, rtol=0, atol=1e-4)
  plain, plain_variables = convert.from_pytorch(torch_model.state_dict(), 'torchvision',
                                                attention=None)
  np.testing.assert_allclose(logits, jax.jit(plain.apply)(plain_variables, x), rtol=0,
                             atol=1e-6)


@pytest.mark.torch
def test_conversion_refuses_identity_init_without_fresh_attention():
  pytest.importorskip('torch')
  import torch_reference as refs
  from cbam_jax import convert

  state = refs.OfficialResNet('basic', [1, 1], 'CIFAR10', num_classes=4, att_type=None,
                              width=16, global_pool=True).state_dict()
  with pytest.raises(ValueError, match="identity_init=True.*source='torchvision' with "
                     'attention'):
    convert.from_pytorch(state, 'torchvision', attention=None, identity_init=True)


@pytest.mark.torch
@pytest.mark.slow
def test_convert_cli_identity_init_round_trip(tmp_path, capsys):
  torch = pytest.importorskip('torch')
  import torch_reference as refs
  from cbam_jax import convert, saving

  torch_model = refs.randomize(refs.OfficialResNet(
      'basic', [1, 1], 'CIFAR10', num_classes=4, att_type=None, width=16, global_pool=True),
      seed=5)
  path = tmp_path / 'tv.pth'
  torch.save(torch_model.state_dict(), path)
  assert convert.main([str(path), str(tmp_path / 'out'), '--source=torchvision',
                       '--identity_init']) == 0
  assert 'Converted' in capsys.readouterr().out
  model, variables = saving.load(tmp_path / 'out')
  assert dict(model.attention_fields) == {'identity_init': True}
  x = np.asarray(IMAGES)
  np.testing.assert_allclose(jax.jit(model.apply)(variables, x),
                             refs.nchw_logits(torch_model, x), rtol=0, atol=1e-4)
  with pytest.raises(SystemExit, match="identity_init=True.*source='torchvision'"):
    convert.main([str(path), str(tmp_path / 'out2'), '--source=torchvision',
                  '--attention=none', '--identity_init'])
