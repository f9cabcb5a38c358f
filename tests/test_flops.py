"""cbam_jax.models.flops (XLA's cost analysis) and macs (the papers' convention) against
hand counts, in both skins (the paper's Table 4: tests/experiments/test_param_counts.py)."""

from __future__ import annotations

import flax.linen as nn
import pytest
from flax import nnx

import cbam_jax.nnx as cbam_nnx
from cbam_jax import models


class ConvDense(nn.Module):
  """A bias-free conv and Dense: nothing but multiply-adds."""

  padding: str | int = 'VALID'
  groups: int = 1

  @nn.compact
  def __call__(self, x, train=False):
    del train
    x = nn.Conv(4, (3, 3), padding=self.padding, feature_group_count=self.groups,
                use_bias=False)(x)
    return nn.Dense(5, use_bias=False)(x.reshape(x.shape[0], -1))


def test_a_conv_and_a_dense_by_hand():
  # (2, 6, 6, 3) -> conv 3x3 VALID -> (2, 4, 4, 4): 2*4*4*4 outputs of 3*3*3 taps;
  # Dense 64 -> 5 on 2 rows.
  expected = 2 * 4 * 4 * 4 * 27 + 2 * 64 * 5
  assert models.macs(ConvDense(), (2, 6, 6, 3)) == expected
  assert models.flops(ConvDense(), (2, 6, 6, 3)) == 2 * expected  # A multiply-add is 2.
  # Grouped: each output sees 3*3*(4/2) taps.
  assert models.macs(ConvDense(groups=2), (1, 6, 6, 4)) == 4 * 4 * 4 * 18 + 64 * 5


def test_padding_taps_count_in_macs_not_in_xla_flops():
  # 'SAME' 3x3 on 8x8: macs counts every output's 27 taps; XLA skips the taps on the zero
  # border: per axis 8 * 3 - 2 of them, so (22 * 22) * 3 per output channel.
  dense = 8 * 8 * 4 * 5
  assert models.macs(ConvDense(padding=1), (1, 8, 8, 3)) == 8 * 8 * 4 * 27 + dense
  assert models.flops(ConvDense(padding=1), (1, 8, 8, 3)) == 2 * (22 * 22 * 3 * 4 + dense)


def test_nnx_models_count_as_their_linen_twins():
  model = nnx.eval_shape(lambda: cbam_nnx.create_model('resnet_tiny', attention='cbam',
                                                      rngs=nnx.Rngs(0)))
  linen = models.create_model('resnet_tiny', attention='cbam')
  assert models.macs(model, (2, 16, 16, 3)) == models.macs(linen, (2, 16, 16, 3)) > 0
  assert models.flops(model, (2, 16, 16, 3)) == models.flops(linen, (2, 16, 16, 3)) > 0


def test_cbams_spatial_conv_counts_whatever_its_algorithm():
  # On CPU the 'auto' spatial conv is shifted elementwise multiply-adds ('shift'), no conv
  # in the jaxpr; macs traces the reference paths, so it counts the 7x7x2 conv as 'xla' has
  # it: 98 taps at every position of each module's input.
  def cbam_macs(**fields):
    model = models.create_model('resnet_tiny', attention='cbam', attention_fields=fields)
    return models.macs(model, (2, 16, 16, 3))

  se = models.macs(models.create_model('resnet_tiny', attention='se'), (2, 16, 16, 3))
  assert cbam_macs() == cbam_macs(conv_impl='xla') > se
  # Beyond SE: the MLP's second (max-pooled) pass, the same count again, and the conv.
  plain = models.macs(models.create_model('resnet_tiny'), (2, 16, 16, 3))
  spatial_conv = cbam_macs() - plain - 2 * (se - plain)
  assert spatial_conv > 0 and spatial_conv % 98 == 0


def test_the_papers_resnet_gflops():
  # The CBAM paper's Table 4: ResNet18 1.814 GFLOPs (multiply-accumulates).
  assert round(models.macs(models.create_model('resnet18'), (1, 224, 224, 3)) / 1e9, 3) == 1.814
  # ResNet50 3.858: the stride-on-the-1x1 bottleneck (ResNet v1). Ours strides the 3x3 (as
  # the official code and torchvision), whose first 1x1 of stages 2-4 then runs at 4x the
  # positions: 3/4 of 56*56*256*128 multiply-adds more in each.
  resnet50 = models.macs(models.create_model('resnet50'), (1, 224, 224, 3))
  assert round((resnet50 - 3 * 3 / 4 * 56 * 56 * 256 * 128) / 1e9, 3) == 3.858
  # WideResNet18 (widen=1.5) 3.866, with its 64-channel stem.
  wide = models.macs(models.create_model('wide_resnet18_1_5'), (1, 224, 224, 3))
  assert round(wide / 1e9, 3) == 3.866


def test_bad_input():
  with pytest.raises(ValueError, match=r'input_shape must be \(B, H, W, C\)'):
    models.macs(ConvDense(), (6, 6, 3))
  with pytest.raises(TypeError, match='Expected a linen or NNX model'):
    models.flops(object(), (1, 6, 6, 3))
