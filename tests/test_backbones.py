"""Backbone conformance, read from the registry: every model of
:func:`cbam_jax.models.available_models` in both skins, and a toy backbone defined here
(one linen and one NNX network, one registration) that passes the same checks.

Parameter counts are traced (``jax.eval_shape``), never computed; parity, saving and
training run on small models only.
"""

from __future__ import annotations

import json

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from cases import fast_subset
from flax import nnx
from nnx_parity import assert_same_step, randomized

import cbam_jax.nnx as cbam_nnx
from cbam_jax import models, saving
from cbam_jax.models import _blocks
from cbam_jax.nnx import transfer

# (no attention, attention='cbam') parameters at each model's default num_classes (1000
# ImageNet, 10 CIFAR), ImageNet models on 224x224, CIFAR ones on 32x32. Computed from the
# code before the registry (fd0e580) by jax.eval_shape; the no-attention ImageNet counts are
# torchvision's (resnet18 11,689,512, resnet34 21,797,672, resnet50 25,557,032, resnet101
# 44,549,160, resnet152 60,192,808), the CBAM ones the official CBAM code's, resnet20 the
# 0.27M of He et al. 2016 (269,722). ResNeXt and Wide ResNet (jax.eval_shape of this code):
# the no-attention counts are torchvision's documented ones (resnext50_32x4d 25,028,904,
# resnext101_32x8d 88,791,336, resnext101_64x4d 83,455,272, wide_resnet50_2 68,883,240,
# wide_resnet101_2 126,886,696); torchvision has no resnext101_32x4d, whose count is its
# architecture's by hand: stem 7*7*3*64 + 2*64; per bottleneck with planes p (64 * 2**stage),
# width w = int(p * width_per_group / 64) * groups, input c: c*w + 9*w*w/groups + w*4p +
# 2*(2w + 4p), plus c*4p + 2*4p in a stage's first block; fc 2048*1000 + 1000 (the formula
# gives all five torchvision counts too). The CBAM counts round to the paper's Table 4
# (ResNeXt50 (32x4d) + CBAM 27.56M, ResNeXt101 (32x4d) + CBAM 48.96M).
# The CBAM paper's WideResNet18 (ResNet-18's stages x1.5 and x2 after a 64-channel stem):
# its Table 4's 25.88M / 26.08M (CBAM) and 45.62M / 45.97M. ResNeXt-29: 34.4M and 68.1M in
# Xie et al. 2017 (Table 7); 68,155,210 is osmr/imgclsmob's resnext29_16x64d (its README).
# WRN-d-k: osmr/imgclsmob's wrn28_10 36,479,194 (also xternalz/WideResNet-pytorch's);
# WRN-16-8 10,961,370, WRN-16-4 2,748,890 (WRN reproductions from the authors' code); the
# WRN paper's 36.5M, 11.0M, 2.7M and 8.9M (WRN-40-4).
# MobileNets: the no-attention counts are timm's mobilenetv1_100 (4,231,976; the MobileNet
# paper's 4.2M), width 0.7 with rounded widths (2,302,106; the CBAM paper's Table 5 2.30M)
# and torchvision's mobilenet_v2 (3,504,872); with CBAM, jax.eval_shape of this code
# (tests/test_mobilenet.py derives them by hand and compares with the CBAM paper's Table 5).
EXPECTED_PARAMS = {
    'resnet18': (11_689_512, 11_779_392),
    'resnet34': (21_797_672, 21_960_468),
    'resnet50': (25_557_032, 28_089_624),
    'resnet101': (44_549_160, 49_330_172),
    'resnet152': (60_192_808, 66_826_848),
    'resnext50_32x4d': (25_028_904, 27_561_496),
    'resnext101_32x4d': (44_177_704, 48_958_716),
    'resnext101_32x8d': (88_791_336, 93_572_348),
    'resnext101_64x4d': (83_455_272, 88_236_284),
    'wide_resnet50_2': (68_883_240, 71_415_832),
    'wide_resnet101_2': (126_886_696, 131_667_708),
    'wide_resnet18_1_5': (25_875_816, 26_075_516),
    'wide_resnet18_2': (45_618_216, 45_971_256),
    'resnet20': (269_722, 272_995),
    'resnet32': (464_154, 469_609),
    'resnet44': (658_586, 666_223),
    'resnet56': (853_018, 862_837),
    'resnet110': (1_727_962, 1_747_600),
    'resnext29_8x64d': (34_426_698, 34_949_406),
    'resnext29_16x64d': (68_155_210, 68_677_918),
    'cifar_resnet18': (11_173_962, 11_263_842),
    'resnet_tiny': (5_266, 5_540),
    'wrn16_4': (2_748_890, 2_771_946),
    'wrn16_8': (10_961_370, 11_049_890),
    'wrn28_10': (36_479_194, 36_753_954),
    'wrn40_4': (8_949_210, 9_018_378),
    'mobilenetv1_100': (4_231_976, 5_074_714),
    'mobilenetv1_070': (2_302_106, 2_710_874),
    'mobilenet_v2': (3_504_872, 3_536_585),
}
# Traced in both skins, with and without CBAM: each block type and stem, a grouped
# bottleneck, each family (the fast run keeps the CIFAR ones).
BOTH_SKINS = ('resnet_tiny', 'resnet20', 'resnet50', 'resnext50_32x4d', 'wrn16_8',
              'mobilenet_v2')
FAST_BOTH_SKINS = ('resnet_tiny', 'resnet20', 'wrn16_8')
# Small enough to run (parity, saving, training); a family with no small size runs a small
# network of one of its sizes (WRN-10-1 for the Wide ResNets).
SMALL = ('resnet_tiny', 'resnet20')
SMALL_FIELDS = {'wrn16_8': dict(depth=10, widen_factor=1)}
# MobileNets run on small images at a quarter of their width (parity, saving).
QUARTER = dict(width_multiplier=0.25, num_classes=10)


def _image_size(name: str) -> int:
  return 32 if models.create_model(name).num_classes == 10 else 224


def _images(batch: int = 2, size: int = 8, channels: int = 3, seed: int = 1) -> jax.Array:
  return jax.random.normal(jax.random.key(seed), (batch, size, size, channels))


# --------------------------------------------------------------------------- the checks


def _linen_variables(name: str, attention: str | None, size: int):
  model = models.create_model(name, attention=attention)
  x = jnp.zeros((1, size, size, 3), jnp.float32)
  return jax.eval_shape(lambda: model.init(jax.random.key(0), x))


def check_param_counts(name: str, expected: tuple[int, int] | None, size: int
                       ) -> tuple[int, int]:
  """Linen and NNX networks of ``name`` have ``expected`` (no attention, CBAM) parameters
  (traced), and the same parameter and statistic trees; returns the counts."""
  counts = []
  for attention in (None, 'cbam'):
    variables = _linen_variables(name, attention, size)
    model = nnx.eval_shape(lambda a=attention: cbam_nnx.create_model(
        name, attention=a, rngs=nnx.Rngs(0)))
    assert models.count_params(variables) == cbam_nnx.count_params(model), (name, attention)
    shapes = jax.tree.map(jnp.shape, transfer.to_linen(model))
    assert shapes == jax.tree.map(jnp.shape, {'params': variables['params'],
                                              'batch_stats': variables.get('batch_stats', {})})
    counts.append(models.count_params(variables))
  if expected is not None:
    assert tuple(counts) == expected, name
  return tuple(counts)


def check_parity(name: str, train: bool, size: int = 8, **fields) -> None:
  """The NNX twin of the linen network (random weights) gives its outputs, updated
  statistics and gradients."""
  linen = models.create_model(name, **fields)
  x = _images(size=size)
  variables = randomized(jax.eval_shape(linen.init, jax.random.key(0), x), seed=3)
  model = transfer.from_linen(linen, variables)
  assert isinstance(model, models.backbone_for_model(name).nnx)
  assert_same_step(linen, model, variables, x, train)


def check_saving(tmp_path, name: str, **fields) -> None:
  """Description -> JSON -> network round trip, and a saved directory read back in both
  skins."""
  linen = models.create_model(name, **fields)
  description = saving.describe(linen, name=name)
  assert description['backbone'] == models.backbone_for_model(name).family
  assert description['size'] == name
  again = saving.build(json.loads(json.dumps(description)))
  assert again == linen and saving.describe(again, name=name) == description
  assert saving.same_model({'backbone': description['backbone'], 'size': name,
                            'fields': {}}, saving.describe(models.create_model(name)))
  variables = randomized(saving.abstract_variables(linen), seed=5)
  saving.save(tmp_path, linen, variables, name=name)
  loaded_model, loaded = saving.load(tmp_path)
  assert loaded_model == linen
  chex.assert_trees_all_equal(jax.tree.map(np.asarray, loaded),
                              jax.tree.map(np.asarray, variables))
  nnx_model = saving.load(tmp_path, api='nnx')
  assert isinstance(nnx_model, models.backbone_for_model(name).nnx)
  chex.assert_trees_all_equal(jax.tree.map(np.asarray, transfer.to_linen(nnx_model)),
                              jax.tree.map(np.asarray, variables))


def check_training_step(name: str, **fields) -> None:
  """A few SGD steps on one batch lower its loss and move every BatchNorm statistic."""
  model = models.create_model(name, **fields)
  x = _images(batch=8)
  labels = jnp.arange(8) % model.num_classes
  variables = jax.jit(model.init)(jax.random.key(0), x)
  tx = optax.sgd(0.05, momentum=0.9)

  @jax.jit
  def step(params, batch_stats, opt_state):
    def loss_fn(params):
      logits, updates = model.apply({'params': params, 'batch_stats': batch_stats}, x,
                                    train=True, mutable=['batch_stats'])
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), updates
    (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    changes, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, changes), updates['batch_stats'], opt_state, loss

  params, batch_stats = variables['params'], variables.get('batch_stats', {})
  opt_state, losses = tx.init(params), []
  for _ in range(4):
    params, batch_stats, opt_state, loss = step(params, batch_stats, opt_state)
    losses.append(float(loss))
  assert np.all(np.isfinite(losses)) and losses[-1] < losses[0], losses
  moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), batch_stats,
                       variables.get('batch_stats', {}))
  assert all(m > 0 for m in jax.tree_util.tree_leaves(moved))


# --------------------------------------------------------------------------- the registry


def test_registry_lists_every_model_once_for_both_skins():
  assert models.available_models() == tuple(EXPECTED_PARAMS)
  assert cbam_nnx.available_models() == models.available_models()
  assert models.available_backbones() == ('resnet', 'wide_resnet', 'mobilenet_v1',
                                            'mobilenet_v2')
  for name in models.available_models():
    backbone = models.backbone_for_model(name)
    assert isinstance(models.create_model(name), backbone.linen)
  with pytest.raises(ValueError,
                     match=r"Unknown model 'resnet19'. Did you mean 'resnet18'\? Valid names"):
    models.create_model('resnet19')
  with pytest.raises(ValueError, match="Unknown model 'resnet19'"):
    cbam_nnx.create_model('resnet19', rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="already registered"):
    models.register_backbone(models.get_backbone('resnet'))


@pytest.mark.parametrize('name', fast_subset(list(BOTH_SKINS), list(BOTH_SKINS),
                                             FAST_BOTH_SKINS))
def test_param_counts_in_both_skins(name):
  check_param_counts(name, EXPECTED_PARAMS[name], _image_size(name))


# The others: one linen trace each (tracing a deep network in NNX too, and with CBAM, took
# minutes in all; tests/test_models.py traces the CBAM counts).
OTHERS = [name for name in EXPECTED_PARAMS if name not in BOTH_SKINS]


@pytest.mark.parametrize('name', [pytest.param(name, marks=pytest.mark.slow) for name in OTHERS])
def test_param_counts_without_attention(name):
  variables = _linen_variables(name, None, _image_size(name))
  assert models.count_params(variables) == EXPECTED_PARAMS[name][0]


@pytest.mark.parametrize('name,train,attention', [
    ('resnet_tiny', False, None),
    pytest.param('resnet20', True, 'se', marks=pytest.mark.slow),
])
def test_linen_nnx_parity(name, train, attention):
  check_parity(name, train, attention=attention)


@pytest.mark.parametrize('name,fields', SMALL_FIELDS.items())
def test_small_networks_of_other_families_parity_and_saving(tmp_path, name, fields):
  check_parity(name, False, **fields)
  check_saving(tmp_path, name, attention='cbam', **fields)


@pytest.mark.slow
@pytest.mark.parametrize('name,fields', SMALL_FIELDS.items())
def test_small_networks_of_other_families_with_attention_in_training(name, fields):
  check_parity(name, True, attention='se', **fields)
  check_training_step(name, **fields)


@pytest.mark.slow
def test_linen_nnx_parity_with_attention_fields():
  check_parity('resnet_tiny', False, attention='cbam', attention_fields={'reduction_ratio': 4})


@pytest.mark.parametrize('name', fast_subset(list(SMALL), list(SMALL), ('resnet_tiny',)))
def test_saving_round_trip(tmp_path, name):
  check_saving(tmp_path, name, attention='cbam')


@pytest.mark.slow
def test_training_step():
  check_training_step('resnet_tiny', attention='se')


# The MobileNets compile slowly for their depth (13 and 17 blocks): parity of each, saving
# of one; no training step (tests/test_mobilenet.py runs the trainer's).
@pytest.mark.parametrize('name,train,attention,fields', [
    ('mobilenet_v2', False, None, {}),
    # SE: the same sites per block as CBAM, at a fraction of CBAM's compile time; all three.
    pytest.param('mobilenetv1_100', True, 'se',
                 dict(attention_sites=('input', 'depthwise', 'pointwise')),
                 marks=pytest.mark.slow),
])
def test_mobilenet_linen_nnx_parity(name, train, attention, fields):
  check_parity(name, train, size=16, attention=attention, **fields, **QUARTER)


def test_mobilenet_saving_round_trip(tmp_path):
  check_saving(tmp_path, 'mobilenet_v2', attention='cbam', stage_attention='se', **QUARTER)


# A tiny ResNeXt: bottlenecks whose 3x3 convs have 2 groups (inner widths 4 and 8).
TINY_RESNEXT = dict(block_cls=models.Bottleneck, groups=2, width_per_group=16)


def test_tiny_resnext_parity():
  model = models.create_model('resnet_tiny', **TINY_RESNEXT)
  variables = jax.eval_shape(model.init, jax.random.key(0), _images())
  assert variables['params']['layer2_0']['conv2']['kernel'].shape == (3, 3, 4, 8)
  check_parity('resnet_tiny', False, **TINY_RESNEXT)


@pytest.mark.slow
def test_tiny_resnext_with_cbam_parity_and_training_step():
  check_parity('resnet_tiny', True, attention='cbam', **TINY_RESNEXT)
  check_training_step('resnet_tiny', **TINY_RESNEXT)  # CBAM's compile time: once, above.


def test_stem_features_other_than_the_first_stage():
  model = models.create_model('resnet_tiny', stem_features=4)
  variables = jax.eval_shape(model.init, jax.random.key(0), _images())
  assert variables['params']['conv1']['kernel'].shape == (3, 3, 3, 4)
  # The first block goes 4 -> 8 channels: a projection shortcut.
  assert variables['params']['layer1_0']['downsample_conv']['kernel'].shape == (1, 1, 4, 8)
  nnx_model = nnx.eval_shape(lambda: cbam_nnx.create_model('resnet_tiny', stem_features=4,
                                                           rngs=nnx.Rngs(0)))
  assert (jax.tree.map(jnp.shape, transfer.to_linen(nnx_model))
          == jax.tree.map(jnp.shape, dict(variables)))
  with pytest.raises(ValueError, match='stem_features must be a positive channel count'):
    jax.eval_shape(models.create_model('resnet_tiny', stem_features=0).init,
                   jax.random.key(0), _images())
  with pytest.raises(ValueError, match='stem_features must be a positive channel count'):
    cbam_nnx.create_model('resnet_tiny', stem_features=0, rngs=nnx.Rngs(0))


@pytest.mark.parametrize('fields,message', [
    (dict(groups=2), 'BasicBlock takes only groups=1 and width_per_group=64.*block_cls=Bottleneck'),
    (dict(TINY_RESNEXT, width_per_group=4), 'give the first stage.*no channels'),
])
def test_grouped_bottleneck_errors(fields, message):
  model = models.create_model('resnet_tiny', **fields)
  with pytest.raises(ValueError, match=message):
    jax.eval_shape(model.init, jax.random.key(0), _images())
  with pytest.raises(ValueError, match=message):
    cbam_nnx.create_model('resnet_tiny', rngs=nnx.Rngs(0), **fields)


# --------------------------------------------------------------------------- a new family


class ToyNet(nn.Module):
  """A toy backbone: one 3x3 conv, BatchNorm, attention, global pooling, a Dense head."""

  features: int = 4
  num_classes: int = 3
  attention: models._attention.AttentionSpec = None
  dtype: jnp.dtype = jnp.float32
  act: object = nn.relu  # Code, not data: a description holds only the default.

  @nn.compact
  def __call__(self, x, train: bool = False):
    _blocks.check_images(x, 'ToyNet')
    x = nn.Conv(self.features, (3, 3), padding=_blocks.same_padding(3), dtype=self.dtype,
                name='conv1')(x)
    x = self.act(nn.BatchNorm(use_running_average=not train, momentum=0.9, name='bn1')(x))
    attention = models.resolve_attention(self.attention, dtype=self.dtype,
                                         param_dtype=jnp.float32)
    if attention is not None:
      x = attention(name='attention')(x, train=train)
    return nn.Dense(self.num_classes, name='fc')(jnp.mean(x, axis=(1, 2))).astype(jnp.float32)


class ToyNetNNX(nnx.Module):
  """ToyNet in NNX."""

  def __init__(self, *, in_features: int = 3, features: int = 4, num_classes: int = 3,
               attention=None, dtype=jnp.float32, act=nn.relu, rngs: nnx.Rngs):
    self.act = act
    self.conv1 = nnx.Conv(in_features, features, (3, 3), padding=_blocks.same_padding(3),
                          dtype=dtype, rngs=rngs)
    self.bn1 = nnx.BatchNorm(features, momentum=0.9, rngs=rngs)
    attention = models._attention.resolve_nnx_attention(attention, dtype=dtype,
                                                         param_dtype=jnp.float32)
    self.attention = None if attention is None else attention(features, rngs=rngs)
    self.fc = nnx.Linear(features, num_classes, rngs=rngs)

  def __call__(self, x):
    x = self.act(self.bn1(self.conv1(x)))
    if self.attention is not None:
      x = self.attention(x)
    return self.fc(jnp.mean(x, axis=(1, 2))).astype(jnp.float32)


def _toy_head_init(model, features, key):
  return nn.Dense(model.num_classes).init(key, jnp.zeros((1, features)))['params']


@pytest.fixture
def toy_backbone():
  """The toy family registered for one test: its whole registration is this call."""
  backbone = models.register_backbone(models.Backbone(
      family='toy', linen=ToyNet, nnx=ToyNetNNX,
      sizes={'toy_small': {'features': 4}, 'toy_wide': {'features': 8, 'num_classes': 5}},
      fields={'features': models.Field(), 'num_classes': models.Field(),
              'attention': models.Field('attention'), 'dtype': models.Field('dtype')},
      head_init=_toy_head_init))
  try:
    yield backbone
  finally:
    models.unregister_backbone('toy')
  assert 'toy_small' not in models.available_models()


@pytest.mark.slow
def test_a_toy_backbone_passes_the_suite(tmp_path, toy_backbone):
  assert models.available_models()[-2:] == ('toy_small', 'toy_wide')
  assert cbam_nnx.available_models() == models.available_models()
  # conv1 3x3x3x8 + 8, bn1 2 x 8, fc 8x5 + 5.
  plain, with_cbam = check_param_counts('toy_wide', None, 8)
  assert plain == 3 * 3 * 3 * 8 + 8 + 2 * 8 + 8 * 5 + 5 and with_cbam > plain
  check_parity('toy_small', True, attention='se')
  check_saving(tmp_path / 'toy', 'toy_wide', attention='cbam')
  check_training_step('toy_small', attention='cbam')
  # A new head for fine-tuning, from the family's head_init.
  model, variables = saving.load(tmp_path / 'toy', num_classes=2)
  assert model.num_classes == 2 and variables['params']['fc']['kernel'].shape == (8, 2)
  # Code fields are not saved; the family's own fields are checked.
  with pytest.raises(TypeError, match=r'ToyNet.act=.*not the default'):
    saving.describe(ToyNet(act=jax.nn.gelu))
  with pytest.raises(ValueError, match=r"'feature' \(did you mean 'features'"):
    saving.build({'backbone': 'toy', 'size': 'toy_small', 'fields': {'feature': 3}})
  with pytest.raises(ValueError, match="Model 'resnet20' is not of the 'toy' family"):
    saving.build({'backbone': 'toy', 'size': 'resnet20'})


def test_registration_errors():
  class NotToy(nn.Module):
    width: int = 1

  fields = {'depth': models.Field()}
  with pytest.raises(ValueError, match='NotToy has no field.*depth'):
    models.register_backbone(models.Backbone('not_toy', NotToy, object, fields, {'n': {}}))
  with pytest.raises(ValueError, match="Model name.*resnet20 are already registered"):
    models.register_backbone(models.Backbone('not_toy', NotToy, object, {}, {'resnet20': {}}))
  with pytest.raises(ValueError, match='Field kind'):
    models.Field('blob')
  with pytest.raises(ValueError, match="Unknown backbone 'not_toy'"):
    models.unregister_backbone('not_toy')
  assert models.available_backbones() == ('resnet', 'wide_resnet', 'mobilenet_v1',
                                            'mobilenet_v2')
