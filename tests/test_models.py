"""Tests of cbam_jax.models: exact parameter counts, shapes, placement, training behaviour.

Large models are only traced (``jax.eval_shape``), never compiled; only tiny ones run.
"""

from __future__ import annotations

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cbam_jax import CBAM, models
from cbam_jax import attention as attention_registry
from cbam_jax.models import _blocks, wide_resnet

# RBG keys: initialising with threefry costs ~1 s of XLA compile per new parameter shape
# on CPU, which dominated this file's run time.
KEY = jax.random.key(0, impl='rbg')


def shapes_of_init(model: nn.Module, input_shape: tuple[int, ...]):
  """``(logits, variables)`` as ShapeDtypeStructs: traced, not computed."""
  return jax.eval_shape(
      lambda x: model.init_with_output(KEY, x), jnp.zeros(input_shape, jnp.float32))


def tiny_images(batch: int = 4, size: int = 8, seed: int = 1) -> jax.Array:
  return jax.random.normal(jax.random.key(seed), (batch, size, size, 3))


@functools.cache
def tiny_cbam_setup():
  """``(model, images, variables)`` of a CBAM ResNetTiny, initialised once per process."""
  model = models.ResNetTiny(attention='cbam')
  x = tiny_images()
  return model, x, jax.jit(model.init)(KEY, x)


class Scale(nn.Module):
  """Test attention: multiplies the residual branch by ``factor`` (no parameters)."""

  factor: float = 2.0

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    del train
    return x * self.factor


# (model, attention, expected params) at 1000 classes: the official CBAM / torchvision counts.
EXPECTED_COUNTS = [
    ('resnet18', 'cbam', 11_779_392),
    pytest.param('resnet34', 'cbam', 21_960_468, marks=pytest.mark.slow),
    ('resnet50', 'cbam', 28_089_624),
    pytest.param('resnet101', 'cbam', 49_330_172, marks=pytest.mark.slow),
    ('resnet50', None, 25_557_032),
    ('resnet50', 'se', 28_088_024),
]


@pytest.mark.parametrize('name,attention,expected', EXPECTED_COUNTS)
def test_param_counts_match_reference(name, attention, expected):
  model = models.create_model(name, attention=attention, num_classes=1000)
  _, variables = shapes_of_init(model, (1, 224, 224, 3))
  assert models.count_params(variables) == expected


def test_resnet20_is_he_et_al_size():
  # He et al. 2016 report 0.27M for ResNet20 with option-A (parameter-free) shortcuts.
  _, variables = shapes_of_init(models.ResNet20(), (1, 32, 32, 3))
  assert models.count_params(variables) == 269_722
  assert not any('downsample' in '/'.join(map(str, path)) for path, _ in
                 jax.tree_util.tree_flatten_with_path(variables['params'])[0])


IMAGENET = ('resnet18', 'resnet34', 'resnet50', 'resnet101', 'resnet152', 'resnext50_32x4d',
            'resnext101_32x4d', 'resnext101_32x8d', 'resnext101_64x4d', 'wide_resnet50_2',
            'wide_resnet101_2', 'wide_resnet18_1_5', 'wide_resnet18_2')
IMAGENET_BASIC = ('resnet18', 'resnet34', 'wide_resnet18_1_5', 'wide_resnet18_2')


# CBAM on small inputs (ImageNet nets on 32x32 reach 1x1 maps) where tracing is cheap.
CBAM_SHAPE_CHECKED = ('resnet18', 'resnet20', 'cifar_resnet18', 'resnet_tiny')
# The ResNet family's models (tests/test_backbones.py checks every family's).
RESNETS = [name for name in models.available_models()
           if models.backbone_for_model(name).family == 'resnet']


@pytest.mark.parametrize('name', RESNETS)
def test_output_shape_of_every_model(name):
  num_classes = 7
  attention = 'cbam' if name in CBAM_SHAPE_CHECKED else None
  model = models.create_model(name, num_classes=num_classes, attention=attention)
  logits, variables = shapes_of_init(model, (2, 32, 32, 3))
  assert logits.shape == (2, num_classes)
  assert logits.dtype == jnp.float32
  if name in wide_resnet.SIZES:  # Stages of 16k, 32k and 64k channels.
    width = 64 * model.widen_factor
  else:
    bottleneck = (name in IMAGENET and name not in IMAGENET_BASIC) or name.startswith('resnext')
    stages = 4 if name in IMAGENET or name == 'cifar_resnet18' else (
        2 if name == 'resnet_tiny' else 3)
    width = model.num_filters * 2 ** (stages - 1) * (4 if bottleneck else 1)
  assert variables['params']['fc']['kernel'].shape == (width, num_classes)


def test_module_names_mirror_torch_keys():
  _, variables = shapes_of_init(models.ResNet50(attention='cbam'), (1, 64, 64, 3))
  params = variables['params']
  blocks = [f'layer{s + 1}_{i}' for s, n in enumerate((3, 4, 6, 3)) for i in range(n)]
  assert set(params) == {'conv1', 'bn1', 'fc', *blocks}
  assert set(params['layer2_0']) == {'conv1', 'bn1', 'conv2', 'bn2', 'conv3', 'bn3',
                                     'downsample_conv', 'downsample_bn', 'attention'}
  assert set(params['layer2_1']) == {'conv1', 'bn1', 'conv2', 'bn2', 'conv3', 'bn3',
                                     'attention'}
  # Stride on the 3x3 conv; official CBAM configuration of the attention.
  assert params['layer2_0']['conv2']['kernel'].shape == (3, 3, 128, 128)
  cbam = params['layer2_0']['attention']
  assert cbam['channel']['fc1_kernel'].shape == (512, 32)
  assert set(cbam['channel']) == {'fc1_kernel', 'fc1_bias', 'fc2_kernel', 'fc2_bias'}
  assert set(cbam['spatial']) == {'conv_kernel', 'norm'}
  assert cbam['spatial']['conv_kernel'].shape == (7, 7, 2, 1)


def tiny_apply(model, variables, x, train):
  return model.apply(variables, x, train=train, mutable=['batch_stats'])


@pytest.mark.slow
def test_batch_stats_update_only_in_train_mode(variant):
  model, x, variables = tiny_cbam_setup()
  apply = variant(functools.partial(tiny_apply, model), static_argnums=2)
  eval_logits, eval_state = apply(variables, x, False)
  train_logits, train_state = apply(variables, x, True)
  chex.assert_shape((eval_logits, train_logits), (4, 10))
  chex.assert_trees_all_close(eval_state['batch_stats'], variables['batch_stats'])
  changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), train_state['batch_stats'],
                         variables['batch_stats'])
  # Every BatchNorm, including the ones inside CBAM's spatial gates, moved.
  assert all(jax.tree.leaves(changed)), changed
  assert not np.allclose(eval_logits, train_logits)


@pytest.mark.slow
def test_eval_without_mutable_and_deterministic():
  model, x, variables = tiny_cbam_setup()
  logits = model.apply(variables, x)
  chex.assert_trees_all_close(logits, jax.jit(model.apply)(variables, x),
                              rtol=1e-5, atol=1e-5)
  with pytest.raises(Exception, match='batch_stats'):
    model.apply(variables, x, train=True)  # Needs mutable batch_stats.


@pytest.mark.slow
def test_bfloat16_forward():
  model, x, variables = tiny_cbam_setup()
  model16 = models.ResNetTiny(attention='cbam', dtype=jnp.bfloat16)
  _, variables16 = shapes_of_init(model16, x.shape)
  chex.assert_trees_all_equal_dtypes(variables16, variables)  # param_dtype float32.
  logits32 = model.apply(variables, x)
  logits16 = model16.apply(variables, x)
  assert logits16.dtype == jnp.float32
  chex.assert_tree_all_finite(logits16)
  assert not np.array_equal(logits16, logits32)  # It really ran in bfloat16.
  scale = float(jnp.abs(logits32).max())
  np.testing.assert_allclose(logits16, logits32, atol=0.05 * scale + 1e-2)


@pytest.mark.slow
def test_training_step_lowers_loss():
  model, x, variables = tiny_cbam_setup()
  labels = jnp.arange(x.shape[0]) % 10
  optimizer = optax.adam(1e-2)

  def loss_fn(params, batch_stats):
    logits, updates = model.apply({'params': params, 'batch_stats': batch_stats},
                                       x, train=True, mutable=['batch_stats'])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss, updates['batch_stats']

  @jax.jit
  def step(params, batch_stats, opt_state):
    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, batch_stats)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), batch_stats, opt_state, loss, grads

  params, batch_stats = variables['params'], variables['batch_stats']
  opt_state = optimizer.init(params)
  losses = []
  for _ in range(5):
    params, batch_stats, opt_state, loss, grads = step(params, batch_stats, opt_state)
    losses.append(float(loss))
  assert losses[-1] < losses[0] - 0.1, losses
  # Gradients reach the attention modules (spatial conv, channel MLP) too.
  att_grads = grads['layer1_0']['attention']
  assert float(jnp.abs(att_grads['channel']['fc1_kernel']).sum()) > 0
  assert float(jnp.abs(att_grads['spatial']['conv_kernel']).sum()) > 0


def test_batchnorm_momentum_is_torch_default():
  # Flax momentum 0.9 == PyTorch 0.1: from zero-initialised running means, one train step
  # stores 0.1 * the batch mean of the stem conv's output. Without attention: the stem's
  # BatchNorm does not depend on it, and CBAM's train-mode program takes seconds to compile.
  model, x = models.ResNetTiny(), tiny_images()
  variables = jax.jit(model.init)(KEY, x)
  _, state = jax.jit(functools.partial(
      model.apply, train=True, capture_intermediates=True,
      mutable=['batch_stats', 'intermediates']))(variables, x)
  (conv_out,) = state['intermediates']['conv1']['__call__']
  np.testing.assert_allclose(state['batch_stats']['bn1']['mean'],
                             0.1 * conv_out.mean(axis=(0, 1, 2)), rtol=1e-5, atol=1e-7)


@pytest.mark.slow  # Whole converted ResNets match torch's logits in test_convert.py.
def test_strides_and_padding_match_torch():
  # PyTorch pads k // 2 on every side; Flax's 'SAME' would pad (2, 3) for the 7x7/2 stem
  # on even sizes. Recompute each strided layer from its captured input with torch-style
  # padding. Bottleneck: stride on the 3x3 conv2 (torchvision v1.5, official CBAM).
  model = models.ResNet(stage_sizes=(1, 1), block_cls=models.Bottleneck, num_filters=4,
                        num_classes=3)
  x = tiny_images(batch=1, size=16)
  variables = model.init(KEY, x)
  _, state = model.apply(variables, x, capture_intermediates=True, mutable=['intermediates'])
  out, params = state['intermediates'], variables['params']

  def conv(inputs, kernel, stride, pad):
    return jax.lax.conv_general_dilated(inputs, kernel, (stride, stride), ((pad, pad),) * 2,
                                        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))

  stem = conv(x, params['conv1']['kernel'], 2, 3)
  np.testing.assert_allclose(out['conv1']['__call__'][0], stem, rtol=1e-5, atol=1e-5)
  pooled = jax.lax.reduce_window(nn.relu(out['bn1']['__call__'][0]), -jnp.inf, jax.lax.max,
                                 (1, 3, 3, 1), (1, 2, 2, 1), ((0, 0), (1, 1), (1, 1), (0, 0)))
  assert pooled.shape == (1, 4, 4, 4)
  np.testing.assert_allclose(out['layer1_0']['conv1']['__call__'][0],
                             conv(pooled, params['layer1_0']['conv1']['kernel'], 1, 0),
                             rtol=1e-5, atol=1e-5)
  block = out['layer2_0']
  (block_in,) = out['layer1_0']['__call__']
  assert block_in.shape == (1, 4, 4, 16)
  assert block['conv1']['__call__'][0].shape == (1, 4, 4, 8)  # conv1 is 1x1, stride 1.
  conv2_in = nn.relu(block['bn1']['__call__'][0])
  np.testing.assert_allclose(block['conv2']['__call__'][0],
                             conv(conv2_in, params['layer2_0']['conv2']['kernel'], 2, 1),
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(block['downsample_conv']['__call__'][0],
                             conv(block_in, params['layer2_0']['downsample_conv']['kernel'],
                                  2, 0), rtol=1e-5, atol=1e-5)


def test_attention_maps_from_every_block():
  model = models.ResNet20(attention='cbam')
  _, state = jax.eval_shape(
      lambda x: model.init_with_output(KEY, x, mutable=['params', 'batch_stats',
                                                        'intermediates']),
      jnp.zeros((2, 16, 16, 3)))
  intermediates = state['intermediates']
  blocks = [f'layer{s}_{i}' for s in (1, 2, 3) for i in range(3)]
  assert sorted(intermediates) == sorted(blocks)
  for stage, size, channels in ((1, 16, 16), (2, 8, 32), (3, 4, 64)):
    for index in range(3):
      maps = intermediates[f'layer{stage}_{index}']['attention']
      (channel_map,) = maps['channel']['channel_map']
      (spatial_map,) = maps['spatial']['spatial_map']
      assert channel_map.shape == (2, channels)
      assert spatial_map.shape == (2, size, size)


@pytest.mark.slow
@pytest.mark.parametrize('zero_init', [True, False])
def test_zero_init_spatial_gate(zero_init):
  model = models.ResNetTiny(attention='cbam', zero_init_spatial_gate=zero_init)
  x = tiny_images()
  variables = model.init(KEY, x)
  _, state = model.apply(variables, x, mutable=['intermediates'])
  for block in ('layer1_0', 'layer2_0'):
    (spatial_map,) = state['intermediates'][block]['attention']['spatial']['spatial_map']
    (channel_map,) = state['intermediates'][block]['attention']['channel']['channel_map']
    assert jnp.all((channel_map >= 0) & (channel_map <= 1))
    assert np.allclose(spatial_map, 0.5) == zero_init


@pytest.mark.slow
def test_attention_fields_override_the_official_cbam_configuration():
  model = models.ResNetTiny(attention='cbam', attention_fields={'reduction_ratio': 4})
  x = tiny_images()
  variables = model.init(KEY, x)
  for block, channels in (('layer1_0', 8), ('layer2_0', 16)):
    channel = variables['params'][block]['attention']['channel']
    assert channel['fc1_kernel'].shape == (channels, channels // 4)
    assert 'fc1_bias' in channel  # The rest of the official configuration stays.
  _, state = model.apply(variables, x, mutable=['intermediates'])
  (spatial_map,) = state['intermediates']['layer1_0']['attention']['spatial']['spatial_map']
  assert np.allclose(spatial_map, 0.5)  # Zero-initialised spatial gate, as without fields.
  with pytest.raises(TypeError, match='reducton'):
    models.ResNetTiny(attention='cbam', attention_fields={'reducton': 4}).init(KEY, x)


@pytest.mark.slow  # The official placement is also held by test_convert.py's logits parity.
@pytest.mark.parametrize('block_cls,last_norm', [(models.BasicBlock, 'bn2'),
                                                 (models.Bottleneck, 'bn3')])
def test_attention_placement_after_last_norm_before_addition(block_cls, last_norm):
  # A parameter-free "attention" that doubles the residual branch; the captured outputs
  # show where it sits: block = relu(2 * last_bn + shortcut).
  model = models.ResNet(stage_sizes=(2,), block_cls=block_cls, num_filters=4, stem='cifar',
                        num_classes=3, attention=Scale)
  x = tiny_images(batch=2, size=8)
  variables = model.init(KEY, x)
  _, state = model.apply(variables, x, capture_intermediates=True, mutable=['intermediates'])
  out = state['intermediates']

  def output(*path):
    node = out
    for key in path:
      node = node[key]
    return node['__call__'][0]

  stem = nn.relu(output('bn1'))
  shortcut0 = stem if block_cls is models.BasicBlock else output('layer1_0', 'downsample_bn')
  np.testing.assert_allclose(output('layer1_0', 'attention'), 2 * output('layer1_0', last_norm),
                             rtol=1e-6)
  np.testing.assert_allclose(output('layer1_0'),
                             nn.relu(2 * output('layer1_0', last_norm) + shortcut0),
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(output('layer1_1'),
                             nn.relu(2 * output('layer1_1', last_norm) + output('layer1_0')),
                             rtol=1e-5, atol=1e-6)


def test_attention_factory_partial_of_cbam():
  factory = functools.partial(CBAM, reduction_ratio=4, kernel_size=3)
  model = models.ResNetTiny(attention=factory, num_filters=16)
  logits, variables = shapes_of_init(model, (4, 8, 8, 3))
  cbam = variables['params']['layer2_0']['attention']
  assert cbam['channel']['fc1_kernel'].shape == (32, 8)
  assert set(cbam['spatial']) == {'conv_kernel', 'conv_bias'}  # As given: no BatchNorm.
  assert cbam['spatial']['conv_kernel'].shape == (3, 3, 2, 1)
  assert logits.shape == (4, 10)


def test_resolve_attention_passes_dtypes_where_declared():
  bf16 = dict(dtype=jnp.bfloat16, param_dtype=jnp.float32)
  module = models.resolve_attention(functools.partial(CBAM, reduction_ratio=4), **bf16)()
  assert module.dtype == jnp.bfloat16 and module.reduction_ratio == 4
  # A dtype set by the partial wins over the model's.
  module = models.resolve_attention(functools.partial(CBAM, dtype=jnp.float16), **bf16)()
  assert module.dtype == jnp.float16
  # Modules without dtype fields are built without them.
  assert isinstance(models.resolve_attention(Scale, **bf16)(), Scale)
  # The name 'cbam' gets the official configuration.
  official = models.resolve_attention('cbam', **bf16)()
  assert official.spatial_norm and official.mlp_bias and official.reduction_ratio == 16
  assert official.dtype == jnp.bfloat16
  spatial = models.resolve_attention('spatial', **bf16)()
  assert spatial.spatial_norm and spatial.dtype == jnp.bfloat16


@pytest.mark.parametrize('attention', [
    pytest.param(name, marks=pytest.mark.slow) if name == 'triplet' else name
    for name in attention_registry.available()])
def test_every_registered_attention_fits_in_blocks(attention):
  # Traced only (train mode, so BatchNorms inside attention modules are exercised); the
  # tiny-model tests above run CBAM numerically.
  model = models.ResNetTiny(attention=attention, stage_attention=attention)
  _, variables = shapes_of_init(model, (2, 8, 8, 3))
  logits, _ = jax.eval_shape(
      lambda v, x: model.apply(v, x, train=True, mutable=['batch_stats']), variables,
      jnp.zeros((2, 8, 8, 3)))
  assert logits.shape == (2, 10) and logits.dtype == jnp.float32
  _, plain = shapes_of_init(models.ResNetTiny(), (2, 8, 8, 3))
  assert models.count_params(variables) >= models.count_params(plain)


def test_unknown_names_and_bad_inputs_raise_clear_errors():
  x = tiny_images(batch=1, size=8)
  with pytest.raises(ValueError, match='Unknown attention .*cbam.*se'):
    models.ResNetTiny(attention='nope').init(KEY, x)
  with pytest.raises(ValueError, match='Unknown attention'):
    models.ResNetTiny(stage_attention='nope').init(KEY, x)
  with pytest.raises(TypeError, match='attention must be None'):
    models.ResNetTiny(attention=3).init(KEY, x)
  with pytest.raises(ValueError, match='Unknown model .*resnet50.*cifar_resnet18'):
    models.create_model('resnet51')
  with pytest.raises(ValueError, match='stem'):
    models.ResNetTiny(stem='vit').init(KEY, x)
  with pytest.raises(ValueError, match='shortcut'):
    models.ResNetTiny(shortcut='zero').init(KEY, x)
  with pytest.raises(ValueError, match=r'\(B, H, W, C\)'):
    models.ResNetTiny().init(KEY, x[0])
  with pytest.raises(TypeError, match='floating-point'):
    models.ResNetTiny().init(KEY, x.astype(jnp.uint8))


@pytest.mark.parametrize('model_fn,stages', [(models.ResNet18, 4), (models.ResNet20, 3),
                                             (models.ResNetTiny, 2)])
def test_stage_attention_after_all_but_last_stage(model_fn, stages):
  model = model_fn(stage_attention='cbam', num_classes=5)
  _, variables = shapes_of_init(model, (1, 32, 32, 3))
  params = variables['params']
  placed = sorted(k for k in params if k.startswith('stage_attention'))
  assert placed == [f'stage_attention{s}' for s in range(1, stages)]
  for stage in range(1, stages):
    channels = model.num_filters * 2 ** (stage - 1)
    assert params[f'stage_attention{stage}']['channel']['fc1_kernel'].shape[0] == channels
  assert not any('attention' in params[k] for k in params if k.startswith('layer'))


def test_zero_init_residual_and_kernel_init():
  model = models.ResNet(stage_sizes=(1,), block_cls=models.BasicBlock, num_filters=64,
                        stem='cifar', zero_init_residual=True)
  params = jax.jit(model.init)(KEY, tiny_images(batch=1, size=4))['params']
  assert not jnp.any(params['layer1_0']['bn2']['scale'])
  assert jnp.all(params['layer1_0']['bn1']['scale'] == 1)
  # Kaiming normal, fan_out: std = sqrt(2 / (3 * 3 * 64)) for a 3x3 conv with 64 outputs.
  kernel = params['layer1_0']['conv2']['kernel']
  np.testing.assert_allclose(jnp.std(kernel), np.sqrt(2 / (9 * 64)), rtol=0.03)
  # The stem (3 in, 64 out) tells fan_out from fan_in: std sqrt(2 / 576), not sqrt(2 / 27).
  np.testing.assert_allclose(jnp.std(params['conv1']['kernel']), np.sqrt(2 / (9 * 64)),
                             rtol=0.1)
  assert not jnp.any(params['fc']['bias'])
  _, _, default = tiny_cbam_setup()
  assert jnp.all(default['params']['layer1_0']['bn2']['scale'] == 1)


def test_pad_shortcut_subsamples_and_zero_pads_channels():
  x = jax.random.normal(KEY, (2, 5, 5, 4))
  padded = _blocks.pad_shortcut(x, 8, 2)
  assert padded.shape == (2, 3, 3, 8)
  np.testing.assert_array_equal(padded[..., 2:6], x[:, ::2, ::2, :])
  assert not jnp.any(padded[..., :2]) and not jnp.any(padded[..., 6:])
  projection = models.ResNet20(shortcut='projection')
  _, variables = shapes_of_init(projection, (1, 32, 32, 3))
  assert 'downsample_conv' in variables['params']['layer2_0']
  assert models.count_params(variables) > 269_722


def test_count_params_counts_params_only():
  _, _, variables = tiny_cbam_setup()
  expected = sum(leaf.size for leaf in jax.tree.leaves(variables['params']))
  assert models.count_params(variables) == expected
  assert models.count_params({'params': variables['params']}) == expected
  with pytest.raises(ValueError, match="'params'"):
    models.count_params(variables['params'])


def test_summary_is_a_plain_table():
  text = models.summary(models.ResNetTiny(attention='cbam'), (1, 8, 8, 3), depth=1)
  assert 'layer1_0' in text and 'Total' in text and 'fc' in text
  assert '\x1b[' not in text  # No terminal colour codes.
  with pytest.raises(ValueError, match='input_shape'):
    models.summary(models.ResNetTiny(), (8, 8, 3))


@pytest.mark.parametrize('name', RESNETS)
def test_create_model_overrides_fields(name):
  model = models.create_model(name, num_classes=3, zero_init_residual=True)
  assert isinstance(model, models.ResNet)
  assert model.num_classes == 3
  assert model.zero_init_residual
  cifar = name not in IMAGENET
  assert model.stem == ('cifar' if cifar else 'imagenet')
  assert models.create_model(name).num_classes == (10 if cifar else 1000)
