"""CBAM against PyTorch references of the official code and of timm, with identical weights.

The references (:mod:`torch_reference`, shared with the benchmark) are
written from the public code:

* official: Jongchan/attention-module ``MODELS/cbam.py`` (``ChannelGate``, ``ChannelPool``,
  ``SpatialGate``, ``CBAM``, ``logsumexp_2d``), whose spatial pool is ``[max, mean]``;
* timm: ``timm/layers/cbam.py`` ``CbamModule`` (bias-free 1x1-conv MLP, hidden
  ``make_divisible(C / 16, 1)``, spatial pool ``[mean, max]``, ``ConvNormAct`` with
  BatchNorm momentum 0.1).

The small conversion helpers below map those state dicts onto our parameter trees; the
library's own converter lives elsewhere.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cbam_jax import CBAM

torch = pytest.importorskip('torch')
from torch_reference import OfficialCBAM, TimmCbamModule  # noqa: E402

pytestmark = pytest.mark.torch

TOLERANCE = 1e-5  # Max abs difference, float32.


# ---------------------------------------------------------------------------------------------
# Conversion (test-only).


def to_numpy(tensor) -> np.ndarray:
  return tensor.detach().cpu().numpy()


def linear_kernel(weight) -> np.ndarray:
  """torch Linear ``(out, in)`` or 1x1 Conv2d ``(out, in, 1, 1)`` -> Dense kernel ``(in, out)``."""
  weight = to_numpy(weight)
  return weight.reshape(weight.shape[:2]).T


def spatial_kernel(weight, swap_pools: bool) -> np.ndarray:
  """torch Conv2d ``(O, I, kh, kw)`` -> ``(kh, kw, I, O)``.

  ``swap_pools`` for the official code, whose input channel 0 is the max and 1 the mean,
  where ours are mean then max.
  """
  kernel = to_numpy(weight).transpose(2, 3, 1, 0)
  return kernel[:, :, ::-1, :] if swap_pools else kernel


def batch_norm(bn):
  params = {'scale': to_numpy(bn.weight), 'bias': to_numpy(bn.bias)}
  stats = {'mean': to_numpy(bn.running_mean), 'var': to_numpy(bn.running_var)}
  return params, stats


def convert_official(module: OfficialCBAM) -> dict:
  fc1, fc2 = module.ChannelGate.mlp[1], module.ChannelGate.mlp[3]
  params = {'channel': {'fc1_kernel': linear_kernel(fc1.weight), 'fc1_bias': to_numpy(fc1.bias),
                        'fc2_kernel': linear_kernel(fc2.weight),
                        'fc2_bias': to_numpy(fc2.bias)}}
  variables = {'params': params}
  if not module.no_spatial:
    gate = module.SpatialGate.spatial
    norm_params, norm_stats = batch_norm(gate.bn)
    params['spatial'] = {'conv_kernel': spatial_kernel(gate.conv.weight, swap_pools=True),
                         'norm': norm_params}
    variables['batch_stats'] = {'spatial': {'norm': norm_stats}}
  return jax.tree.map(jnp.asarray, variables)


def convert_timm(module: TimmCbamModule) -> dict:
  channel, spatial = module.channel, module.spatial.conv
  norm_params, norm_stats = batch_norm(spatial.bn)
  params = {
      'channel': {'fc1_kernel': linear_kernel(channel.fc1.weight),
                  'fc2_kernel': linear_kernel(channel.fc2.weight)},
      'spatial': {'conv_kernel': spatial_kernel(spatial.conv.weight, swap_pools=False),
                  'norm': norm_params},
  }
  return jax.tree.map(jnp.asarray, {'params': params,
                                    'batch_stats': {'spatial': {'norm': norm_stats}}})


def randomize_batch_norm(bn, generator):
  """Non-trivial affine and running stats, so a missing or misplaced norm shows."""
  with torch.no_grad():
    bn.weight.copy_(1 + 0.5 * torch.randn(1, generator=generator))
    bn.bias.copy_(0.5 * torch.randn(1, generator=generator))
    bn.running_mean.copy_(0.3 * torch.randn(1, generator=generator))
    bn.running_var.copy_(0.5 + torch.rand(1, generator=generator))


def randomize_mlp_biases(module, generator):
  with torch.no_grad():
    for fc in (module.ChannelGate.mlp[1], module.ChannelGate.mlp[3]):
      fc.bias.copy_(0.5 * torch.randn(fc.bias.shape, generator=generator))


def nchw_input(shape, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def assert_close(ours, reference_nchw: np.ndarray, channels_first: bool):
  ours = np.asarray(ours)
  expected = reference_nchw if channels_first else reference_nchw.transpose(0, 2, 3, 1)
  assert ours.shape == expected.shape
  np.testing.assert_array_less(np.max(np.abs(ours - expected)), TOLERANCE)


def run_both_layouts(module_fields: dict, variables: dict, x_nchw: np.ndarray, **kwargs):
  """Our NHWC output (as NHWC) and our ``channel_axis=1`` output (as NCHW)."""
  nhwc = CBAM(**module_fields).apply(variables, jnp.asarray(x_nchw.transpose(0, 2, 3, 1)),
                                     **kwargs)
  nchw = CBAM(channel_axis=1, **module_fields).apply(variables, jnp.asarray(x_nchw), **kwargs)
  return nhwc, nchw


# ---------------------------------------------------------------------------------------------
# Tests.


@pytest.fixture(autouse=True)
def _seed_torch():
  torch.manual_seed(0)


@pytest.mark.parametrize('pool_types', [('avg', 'max'), ('avg', 'max', 'lp', 'lse')])
def test_official_cbam_eval(pool_types):
  generator = torch.Generator().manual_seed(1)
  reference = OfficialCBAM(32, reduction_ratio=16, pool_types=pool_types).eval()
  randomize_mlp_biases(reference, generator)
  randomize_batch_norm(reference.SpatialGate.spatial.bn, generator)
  x = nchw_input((2, 32, 9, 8))
  with torch.no_grad():
    expected = to_numpy(reference(torch.from_numpy(x)))
  # The official module: C // 16 hidden units with biases, BN after a bias-free conv.
  fields = dict(reduction_ratio=16, pool_types=pool_types, spatial_norm=True)
  nhwc, nchw = run_both_layouts(fields, convert_official(reference), x)
  assert_close(nhwc, expected, channels_first=False)
  assert_close(nchw, expected, channels_first=True)


def test_official_cbam_no_spatial():
  generator = torch.Generator().manual_seed(2)
  reference = OfficialCBAM(32, reduction_ratio=8, no_spatial=True).eval()
  randomize_mlp_biases(reference, generator)
  x = nchw_input((2, 32, 5, 6), seed=1)
  with torch.no_grad():
    expected = to_numpy(reference(torch.from_numpy(x)))
  nhwc, nchw = run_both_layouts(dict(reduction_ratio=8, use_spatial=False),
                                convert_official(reference), x)
  assert_close(nhwc, expected, channels_first=False)
  assert_close(nchw, expected, channels_first=True)


def test_timm_cbam_eval():
  generator = torch.Generator().manual_seed(3)
  # 40 / 16 = 2.5: timm rounds to 3 hidden units where the official code floors to 2.
  reference = TimmCbamModule(40).eval()
  assert reference.channel.fc1.out_channels == 3
  randomize_batch_norm(reference.spatial.conv.bn, generator)
  x = nchw_input((2, 40, 8, 7), seed=2)
  with torch.no_grad():
    expected = to_numpy(reference(torch.from_numpy(x)))
  fields = dict(hidden_rounding='round', mlp_bias=False, spatial_norm=True, norm_momentum=0.9)
  variables = convert_timm(reference)
  assert variables['params']['channel']['fc1_kernel'].shape == (40, 3)
  nhwc, nchw = run_both_layouts(fields, variables, x)
  assert_close(nhwc, expected, channels_first=False)
  assert_close(nchw, expected, channels_first=True)


def test_official_cbam_train_step_updates_running_stats():
  generator = torch.Generator().manual_seed(4)
  reference = OfficialCBAM(16, reduction_ratio=4).train()
  randomize_mlp_biases(reference, generator)
  randomize_batch_norm(reference.SpatialGate.spatial.bn, generator)
  variables = convert_official(reference)  # Before the step: the starting running stats.
  x = nchw_input((3, 16, 7, 7), seed=3)
  bn = reference.SpatialGate.spatial.bn
  with torch.no_grad():
    refined = reference.ChannelGate(torch.from_numpy(x))
    logits = reference.SpatialGate.spatial.conv(reference.SpatialGate.compress(refined))
    expected = to_numpy(reference(torch.from_numpy(x)))
  fields = dict(reduction_ratio=4, spatial_norm=True)  # norm_momentum 0.99 == torch's 0.01.
  for channel_axis, x_ours in ((-1, x.transpose(0, 2, 3, 1)), (1, x)):
    out, state = CBAM(channel_axis=channel_axis, **fields).apply(
        variables, jnp.asarray(x_ours), train=True, mutable=['batch_stats'])
    # Training normalises with the batch's (biased) statistics in both frameworks.
    assert_close(out, expected, channels_first=channel_axis == 1)
    stats = state['batch_stats']['spatial']['norm']
    np.testing.assert_allclose(stats['mean'], to_numpy(bn.running_mean), rtol=0, atol=1e-6)
    # torch's running var takes the unbiased batch variance, Flax's the biased one: with
    # n = B*H*W values the update differs by momentum * var / (n - 1). Undo that factor.
    n = logits.numel()
    old_var = variables['batch_stats']['spatial']['norm']['var']
    batch_var_unbiased = to_numpy(logits.var(unbiased=True)).reshape(1)
    expected_var = 0.99 * old_var + 0.01 * batch_var_unbiased * (n - 1) / n
    np.testing.assert_allclose(stats['var'], expected_var, rtol=1e-5, atol=1e-7)
    torch_var_gap = to_numpy(bn.running_var) - np.asarray(stats['var'])
    np.testing.assert_allclose(torch_var_gap, 0.01 * batch_var_unbiased / n, rtol=1e-3,
                               atol=3e-7)
