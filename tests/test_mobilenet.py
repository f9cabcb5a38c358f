"""The MobileNet families (v1: the CBAM paper's Table 5; v2: torchvision's): published
parameter counts, attention placement, dropout, a training step of the trainer and the
conversion of torchvision's MobileNetV2 weights and of timm's MobileNets (v2 and v1).

Counts are traced (``jax.eval_shape``); what runs uses a quarter of the width on small
images. ``tests/test_backbones.py`` runs the conformance suite on them.
"""

from __future__ import annotations

import functools
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import cbam_jax.nnx as cbam_nnx
from cbam_jax import models, saving
from cbam_jax.models import mobilenet_v1, mobilenet_v2

IMAGENET = jnp.zeros((1, 224, 224, 3))
QUARTER = dict(width_multiplier=0.25, num_classes=10)


def _count(name: str, **fields) -> int:
  model = models.create_model(name, **fields)
  return models.count_params(jax.eval_shape(model.init, jax.random.key(0), IMAGENET))


def _se_params(channels: int, reduction: int = 16) -> int:
  """SE with bias, hidden C // r: what the official CBAM channel MLP has too."""
  hidden = channels // reduction
  return 2 * channels * hidden + hidden + channels


def _v1_hand_count(multiplier: float, sites: tuple[str, ...] = (), cbam: bool = False) -> int:
  """MobileNet v1 by hand: stem 3x3x3xC + BN; per block depthwise 9C + BN, pointwise
  C*C' + BN; head 1000 x (C + 1); attention after the chosen convs (CBAM: SE's MLP plus a
  bias-free 7x7x2 conv and its BatchNorm)."""
  width = functools.partial(mobilenet_v1.scaled_width, multiplier=multiplier)
  channels = width(32)
  total = 27 * channels + 2 * channels
  for out, _ in mobilenet_v1.BLOCKS:
    out = width(out)
    total += 11 * channels + channels * out + 2 * out
    for site, at in (('depthwise', channels), ('pointwise', out)):
      if site in sites:
        total += _se_params(at) + (98 + 2 if cbam else 0)
    channels = out
  return total + 1000 * (channels + 1)


def test_counts_without_attention_are_the_published_ones():
  # timm's mobilenetv1_100 (efficientnet.py, _gen_mobilenet_v1 at 1.0; the MobileNet paper's
  # 4.2M), width 0.7 with widths round(0.7 * C) (CBAM paper Table 5: 2.30M) and
  # torchvision's mobilenet_v2 (its documented num_params 3,504,872).
  assert _count('mobilenetv1_100') == _v1_hand_count(1.0) == 4_231_976
  assert _count('mobilenetv1_070') == _v1_hand_count(0.7) == 2_302_106
  assert _count('mobilenet_v2') == 3_504_872


def test_torchvision_mobilenet_v2_count():
  torchvision = pytest.importorskip('torchvision')
  reference = torchvision.models.mobilenet_v2(weights=None)
  assert sum(p.numel() for p in reference.parameters()) == _count('mobilenet_v2')


def test_v1_attention_after_both_convs_gives_the_paper_counts():
  # CBAM paper Table 5: MobileNet + SE / + CBAM 5.07M, at 0.7 2.71M. One module after
  # every conv (26) gives them; one per block (SENet's SE-MobileNet, 4.7M) does not. At 0.7,
  # widths truncated (int(0.7 * C), TF-slim's rule) would give + SE 2,704,594 (2.70M).
  both = mobilenet_v1.DEFAULT_ATTENTION_SITES
  with_cbam = _count('mobilenetv1_100', attention='cbam')
  assert with_cbam == _v1_hand_count(1.0, both, cbam=True) and round(with_cbam / 1e6, 2) == 5.07
  assert round(_v1_hand_count(1.0, both) / 1e6, 2) == 5.07                       # + SE
  with_se = _count('mobilenetv1_070', attention='se')
  assert with_se == _v1_hand_count(0.7, both) and round(with_se / 1e6, 2) == 2.71
  assert round(_v1_hand_count(0.7, both, cbam=True) / 1e6, 2) == 2.71            # + CBAM
  pointwise = _count('mobilenetv1_100', attention='se', attention_sites=('pointwise',))
  assert pointwise == _v1_hand_count(1.0, ('pointwise',)) == 4_718_044


@pytest.mark.slow
def test_v1_cbam_on_the_block_input_gives_the_paper_gflops():
  # Table 5 prints 0.576 GFLOPs for MobileNet + CBAM; after both convs we count 0.5746G.
  # With the depthwise-site module on the block's input instead (the same channels, so the
  # same parameters), the spatial conv of the four stride-2 blocks runs at the resolution
  # before the stride: 98 taps x (9408 + 2352 + 588 + 147) positions more, 0.5759G.
  after = models.create_model('mobilenetv1_100', attention='cbam')
  before = models.create_model('mobilenetv1_100', attention='cbam',
                               attention_sites=('input', 'pointwise'))
  assert _count('mobilenetv1_100', attention='cbam') == _count(
      'mobilenetv1_100', attention='cbam', attention_sites=('input', 'pointwise'))
  macs_after, macs_before = (models.macs(m, (1, 224, 224, 3)) for m in (after, before))
  assert macs_before - macs_after == 98 * (9408 + 2352 + 588 + 147)
  assert (round(macs_after / 1e9, 3), round(macs_before / 1e9, 3)) == (0.575, 0.576)


@pytest.mark.parametrize('name', ['mobilenetv1_070', 'mobilenet_v2'])
def test_logits_shape_and_dtype(name):
  model = models.create_model(name, num_classes=7, dtype=jnp.bfloat16)
  x = jnp.zeros((2, 32, 32, 3))
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  logits = jax.eval_shape(functools.partial(model.apply, train=False), variables, x)
  assert logits.shape == (2, 7) and logits.dtype == jnp.float32


def test_placement_and_names():
  variables = jax.eval_shape(
      models.create_model('mobilenetv1_070', attention='cbam', stage_attention='se').init,
      jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  params = variables['params']
  assert {name for name in params if name.startswith('block')} == {
      f'block{i}' for i in range(1, 14)}
  assert set(params['block2']) == {'dw_conv', 'dw_bn', 'dw_attention', 'pw_conv', 'pw_bn',
                                   'attention'}
  assert params['block2']['dw_conv']['kernel'].shape == (3, 3, 1, 45)   # Depthwise.
  assert sorted(n for n in params if n.startswith('stage')) == [
      f'stage_attention{k}' for k in range(1, 5)]

  model = models.create_model('mobilenet_v2', attention='cbam', stage_attention='se')
  params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))['params']
  assert set(params['block1']) == {'dw_conv', 'dw_bn', 'project_conv', 'project_bn',
                                   'attention'}
  assert set(params['block2']) == {'expand_conv', 'expand_bn', 'dw_conv', 'dw_bn',
                                   'project_conv', 'project_bn', 'attention'}
  assert params['block2']['dw_conv']['kernel'].shape == (3, 3, 1, 96)
  # Attention sees the projection's channels (24), not the expanded ones.
  assert params['block3']['attention']['channel']['fc1_kernel'].shape[0] == 24
  assert params['last_conv']['kernel'].shape == (1, 1, 320, 1280)
  # Before each downsampling block: after blocks 1, 3, 6 and 13 (16, 24, 32, 96 channels).
  assert [models.count_params({'params': params[f'stage_attention{k}']})
          for k in range(1, 5)] == [_se_params(c) for c in (16, 24, 32, 96)]
  assert 'stage_attention5' not in params


@pytest.mark.parametrize('features,strides,residual', [(8, 1, True), (8, 2, False),
                                                       (16, 1, False)])
def test_v2_block_adds_its_input_only_where_the_shape_is_kept(features, strides, residual):
  """With the projection's BatchNorm zeroed, a block is the identity or zero."""
  block = mobilenet_v2._InvertedResidual(
      features=features, expansion=6, strides=strides, conv=nn.Conv, attention=None,
      norm=functools.partial(nn.BatchNorm, use_running_average=True), act=nn.relu6)
  x = jax.random.normal(jax.random.key(0), (1, 4, 4, 8))
  variables = block.init(jax.random.key(1), x, False)
  bn = variables['params']['project_bn']
  variables['params']['project_bn'] = jax.tree.map(jnp.zeros_like, bn)
  y = block.apply(variables, x, False)
  np.testing.assert_array_equal(y, x if residual else jnp.zeros_like(y))


def test_dropout_needs_its_key_in_training():
  model = models.create_model('mobilenet_v2', dropout_rate=0.2, **QUARTER)
  x = jnp.zeros((2, 16, 16, 3))
  variables = jax.eval_shape(model.init, jax.random.key(1), x)  # The check comes first.
  with pytest.raises(ValueError, match=r"dropout_rate=0.2.*rngs=\{'dropout': key\}"):
    model.apply(variables, x, train=True, mutable=['batch_stats'])


@pytest.mark.parametrize('fields,message', [
    (dict(width_multiplier=0.0), 'width_multiplier must be positive'),
    (dict(dropout_rate=1.0), r'dropout_rate must be in \[0, 1\)'),
    (dict(attention_sites=('depthwize',)), "attention_sites entry.*'depthwise'"),
])
def test_bad_fields_are_one_line_errors(fields, message):
  x = jnp.zeros((1, 16, 16, 3))
  with pytest.raises(ValueError, match=message):
    jax.eval_shape(models.create_model('mobilenetv1_100', **fields).init, jax.random.key(0), x)
  with pytest.raises(ValueError, match=message):
    cbam_nnx.create_model('mobilenetv1_100', rngs=nnx.Rngs(0), **fields)


def test_description_round_trip_keeps_the_family_fields():
  model = models.create_model('mobilenetv1_070', attention='cbam',
                              attention_sites=('pointwise',), dropout_rate=0.1)
  description = saving.describe(model, name='mobilenetv1_070')
  assert description['backbone'] == 'mobilenet_v1'
  fields = description['fields']
  assert fields['width_multiplier'] == 0.7 and fields['attention_sites'] == ['pointwise']
  assert saving.build(json.loads(json.dumps(description))) == model


def _torchvision_mobilenet_v2(torch, num_classes: int):
  """torchvision's mobilenet_v2, rebuilt with its module names (torchvision is not a
  dependency): Conv2dNormActivation = Sequential(conv, BN, ReLU6), InvertedResidual.conv,
  classifier = Sequential(Dropout(0.2), Linear)."""
  nn_ = torch.nn

  def conv_bn(cin, cout, kernel=3, stride=1, groups=1):
    return nn_.Sequential(
        nn_.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
        nn_.BatchNorm2d(cout), nn_.ReLU6())

  class InvertedResidual(nn_.Module):
    def __init__(self, cin, cout, stride, expansion):
      super().__init__()
      hidden = int(round(cin * expansion))
      self.use_res_connect = stride == 1 and cin == cout
      layers = [conv_bn(cin, hidden, 1)] if expansion != 1 else []
      layers += [conv_bn(hidden, hidden, 3, stride, hidden),
                 nn_.Conv2d(hidden, cout, 1, bias=False), nn_.BatchNorm2d(cout)]
      self.conv = nn_.Sequential(*layers)

    def forward(self, x):
      return x + self.conv(x) if self.use_res_connect else self.conv(x)

  class MobileNetV2(nn_.Module):
    def __init__(self):
      super().__init__()
      features, cin = [conv_bn(3, 32, stride=2)], 32
      for t, c, n, s in [[1, 16, 1, 1], [6, 24, 2, 2], [6, 32, 3, 2], [6, 64, 4, 2],
                         [6, 96, 3, 1], [6, 160, 3, 2], [6, 320, 1, 1]]:
        for i in range(n):
          features.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
          cin = c
      features.append(conv_bn(cin, 1280, 1))
      self.features = nn_.Sequential(*features)
      self.classifier = nn_.Sequential(nn_.Dropout(0.2), nn_.Linear(1280, num_classes))

    def forward(self, x):
      x = nn_.functional.adaptive_avg_pool2d(self.features(x), 1)
      return self.classifier(torch.flatten(x, 1))

  return MobileNetV2()


@pytest.mark.slow
@pytest.mark.torch
def test_torchvision_mobilenet_v2_weights_convert_in_both_skins():
  torch = pytest.importorskip('torch')
  import torch_reference as refs
  from cbam_jax import convert
  from cbam_jax.convert import mobilenet as convert_mobilenet

  torch_model = refs.randomize(_torchvision_mobilenet_v2(torch, num_classes=5), seed=3)
  state = torch_model.state_dict()
  x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
  expected = refs.nchw_logits(torch_model, x)

  model, variables, report = convert.from_pytorch(state, 'torchvision', attention=None,
                                                  return_report=True)
  assert isinstance(model, models.MobileNetV2) and model.num_classes == 5
  assert not report.new_keys and not report.missing_keys and not report.unexpected_keys
  assert len(report.loaded_keys) == len([k for k in state if 'num_batches' not in k])
  logits = jax.jit(lambda v, x: model.apply(v, x))(variables, x)
  np.testing.assert_allclose(logits, expected, rtol=0, atol=1e-4)

  nnx_model = convert.from_pytorch(state, 'torchvision', attention=None, api='nnx')
  assert isinstance(nnx_model, cbam_nnx.MobileNetV2)
  nnx_model.eval()
  np.testing.assert_allclose(nnx_model(jnp.asarray(x)), expected, rtol=0, atol=1e-4)

  # 'auto' = CBAM (freshly initialised, as for a torchvision ResNet); inferred, not built.
  arrays = {k: v.numpy() for k, v in state.items()}
  assert convert_mobilenet.infer_model(arrays, 'auto', {})[0].attention == 'cbam'
  assert convert_mobilenet.infer_model(arrays, None, {})[0] == model


# timm's MobileNets, transcribed in torch_reference/ (TimmMobileNet):
# (version, timm's channel_multiplier) as mobilenetv2_140 and mobilenetv1_125 (the widths at
# 1.0: the slow test below).
@pytest.mark.torch
@pytest.mark.parametrize('version,multiplier', [(2, 1.4), (1, 1.25)],
                         ids=['mobilenetv2_140', 'mobilenetv1_125'])
def test_timm_mobilenet_keys_widths_and_classes_are_read(version, multiplier):
  """Every timm key lands with its shape checked (no forward pass: the slow test runs one)."""
  pytest.importorskip('torch')
  import torch_reference as refs
  from cbam_jax import convert

  state = refs.TimmMobileNet(version, num_classes=7, channel_multiplier=multiplier).state_dict()
  model, _, report = convert.from_pytorch(state, 'timm', attention=None, return_report=True)
  assert type(model) is {1: models.MobileNetV1, 2: models.MobileNetV2}[version]
  assert (model.width_multiplier, model.num_classes) == (multiplier, 7)
  assert not report.new_keys and not report.missing_keys and not report.unexpected_keys
  assert len(report.loaded_keys) == len([k for k in state if 'num_batches' not in k])


@pytest.mark.torch
def test_timm_mobilenet_attention_is_fresh_under_the_timm_preset():
  pytest.importorskip('torch')
  import torch_reference as refs
  from cbam_jax.attention import CBAM, SqueezeExcitation, presets
  from cbam_jax.convert import mobilenet as convert_mobilenet

  arrays = {k: v.numpy() for k, v in refs.TimmMobileNet(1, num_classes=5).state_dict().items()}
  cbam = convert_mobilenet.infer_model(arrays, 'auto', {}, 'timm')[0].attention
  assert (cbam.func, cbam.keywords) == (CBAM, presets.fields('timm', 'cbam'))
  se = convert_mobilenet.infer_model(arrays, 'se', {'reduction_ratio': 8}, 'timm')[0].attention
  assert (se.func, se.keywords) == (SqueezeExcitation,
                                    presets.fields('timm', 'se', reduction_ratio=8))
  assert convert_mobilenet.infer_model(arrays, None, {}, 'timm')[0].attention is None


@pytest.mark.torch
def test_timm_mobilenets_cbam_jax_lacks_are_one_line_errors():
  pytest.importorskip('torch')
  import torch_reference as refs
  from cbam_jax import convert

  def arrays(version, **kwargs):
    model = refs.TimmMobileNet(version, num_classes=5, **kwargs)
    return {k: v.numpy() for k, v in model.state_dict().items()}

  # timm's 0.7: widths rounded to multiples of 8 (24, 48, 88, ...), ours to the nearest.
  with pytest.raises(ValueError, match=r'^The timm mobilenetv1 widths \[24, 48, 88, .* are '
                     r"not cbam_jax's at width_multiplier=0.703125 \(\[23, 45, 90, "):
    convert.from_pytorch(arrays(1, channel_multiplier=0.7), 'timm')
  with_head = {**arrays(1), 'conv_head.weight': np.zeros((1024, 1024, 1, 1), np.float32)}
  with pytest.raises(ValueError, match=r"mobilenetv1_\*h head conv .* only mobilenetv1_100"):
    convert.from_pytorch(with_head, 'timm')
  six_stages = {k: v for k, v in arrays(2).items() if not k.startswith('blocks.6.')}
  with pytest.raises(ValueError, match=r'EfficientNet-builder network .* with \[1, 2, 3, 4, 3, '
                     r"3\] blocks per stage; only timm's mobilenetv2_\*"):
    convert.from_pytorch(six_stages, 'timm')


@pytest.mark.slow
@pytest.mark.torch
@pytest.mark.parametrize('version', [2, 1], ids=['mobilenetv2_100', 'mobilenetv1_100'])
def test_timm_mobilenet_weights_convert_in_both_skins(version):
  pytest.importorskip('torch')
  import torch_reference as refs
  from cbam_jax import convert

  torch_model = refs.randomize(refs.TimmMobileNet(version, num_classes=5), seed=version)
  state = torch_model.state_dict()
  x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
  expected = refs.nchw_logits(torch_model, x)

  model, variables = convert.from_pytorch(state, 'timm', attention=None)
  logits = jax.jit(lambda v, x: model.apply(v, x))(variables, x)
  np.testing.assert_allclose(logits, expected, rtol=0, atol=1e-4)

  nnx_model = convert.from_pytorch(state, 'timm', attention=None, api='nnx')
  assert type(nnx_model) is {1: cbam_nnx.MobileNetV1, 2: cbam_nnx.MobileNetV2}[version]
  nnx_model.eval()
  np.testing.assert_allclose(nnx.jit(lambda m, x: m(x))(nnx_model, jnp.asarray(x)), expected,
                             rtol=0, atol=1e-4)
