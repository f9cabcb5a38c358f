"""convert.from_pytorch(..., api='nnx'): official and timm weights give the same logits in
NNX as in linen, and as in PyTorch."""

import jax
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip('torch')

from nnx_parity import assert_close  # noqa: E402

import torch_reference as refs  # noqa: E402  (needs torch)
from cbam_jax import convert  # noqa: E402
from cbam_jax import nnx as cbam_nnx  # noqa: E402

pytestmark = pytest.mark.torch

# (reference network, source, image size): official CBAM (2 stages: avg_pool2d(x, 4) is
# global at 8x8), timm's CBAM ResNet and timm's SE-ResNeXt (grouped 3x3 convs, 64-channel stem).
CASES = [
    (lambda: refs.OfficialResNet('basic', [2, 1], 'CIFAR10', num_classes=10, width=16),
     'official', 8),
    pytest.param(lambda: refs.TimmResNet('basic', [1, 1, 1, 1], num_classes=6,
                                         attn_layer='cbam', width=16), 'timm', 32,
                 marks=pytest.mark.slow),
    (lambda: refs.TimmResNet('bottleneck', [1, 1, 1, 1], num_classes=6, attn_layer='se',
                             width=8, stem_width=64, cardinality=4, base_width=16), 'timm', 32),
]


@pytest.mark.parametrize('build,source,size', CASES, ids=['official', 'timm', 'timm_resnext'])
def test_nnx_logits_match_linen(build, source, size):
  torch_model = refs.randomize(build(), seed=size)
  x = np.random.default_rng(0).normal(size=(2, size, size, 3)).astype(np.float32)
  linen_model, variables = convert.from_pytorch(torch_model.state_dict(), source)
  model, report = convert.from_pytorch(torch_model.state_dict(), source, api='nnx',
                                       return_report=True)
  assert isinstance(model, cbam_nnx.ResNet) and not report.missing_keys
  expected = jax.jit(linen_model.apply)(variables, x)
  model.eval()
  logits = nnx.jit(lambda m, x: m(x))(model, x)
  assert_close(logits, expected)
  np.testing.assert_allclose(logits, refs.nchw_logits(torch_model, x), rtol=0, atol=1e-4)


def test_unknown_api():
  with pytest.raises(ValueError, match="Unknown api 'flax'"):
    convert.from_pytorch({'conv1.weight': np.zeros((8, 3, 3, 3))}, api='flax')
