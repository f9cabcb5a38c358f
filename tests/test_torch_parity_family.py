"""Parity of the attention family with PyTorch references written here from the papers and
the official code: identical weights, eval mode with non-trivial BatchNorm running
statistics, NCHW in PyTorch vs NHWC in JAX, max abs difference <= 1e-5 in float32."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cbam_jax import attention

torch = pytest.importorskip('torch')
nn = torch.nn
TF = torch.nn.functional

pytestmark = pytest.mark.torch

TOLERANCE = 1e-5


# ---------------------------------------------------------------- PyTorch references


class TorchSE(nn.Module):
  """Hu et al.: GAP -> Linear -> ReLU -> Linear -> sigmoid (SENet's fc layers)."""

  def __init__(self, channels, reduction=16):
    super().__init__()
    self.fc1 = nn.Linear(channels, channels // reduction)
    self.fc2 = nn.Linear(channels // reduction, channels)

  def forward(self, x):
    y = self.fc2(TF.relu(self.fc1(x.mean((2, 3)))))
    return x * torch.sigmoid(y)[:, :, None, None]


class TorchECA(nn.Module):
  """Official eca_layer with the paper's adaptive kernel size."""

  def __init__(self, channels, gamma=2, b=1):
    super().__init__()
    t = int(abs((math.log(channels, 2) + b) / gamma))
    k = t if t % 2 else t + 1
    self.conv = nn.Conv1d(1, 1, kernel_size=k, padding=(k - 1) // 2, bias=False)

  def forward(self, x):
    y = x.mean((2, 3))[:, None, :]  # (B, 1, C): channels along the conv's length.
    y = self.conv(y)[:, 0]
    return x * torch.sigmoid(y)[:, :, None, None]


class TorchBAM(nn.Module):
  """Official BAM (Jongchan/attention-module MODELS/bam.py), one hidden layer, 2 dilated
  convs, dilation 4; ``combine`` selects the official product or the paper's sum."""

  def __init__(self, channels, reduction=16, combine='product'):
    super().__init__()
    hidden = channels // reduction
    self.combine = combine
    self.fc0 = nn.Linear(channels, hidden)
    self.bn_c = nn.BatchNorm1d(hidden)
    self.fc_final = nn.Linear(hidden, channels)
    self.reduce = nn.Conv2d(channels, hidden, 1)
    self.bn_reduce = nn.BatchNorm2d(hidden)
    self.di = nn.ModuleList([nn.Conv2d(hidden, hidden, 3, padding=4, dilation=4)
                             for _ in range(2)])
    self.bn_di = nn.ModuleList([nn.BatchNorm2d(hidden) for _ in range(2)])
    self.final = nn.Conv2d(hidden, 1, 1)

  def forward(self, x):
    c = self.fc_final(TF.relu(self.bn_c(self.fc0(x.mean((2, 3))))))[:, :, None, None]
    s = TF.relu(self.bn_reduce(self.reduce(x)))
    for conv, bn in zip(self.di, self.bn_di, strict=True):
      s = TF.relu(bn(conv(s)))
    s = self.final(s)
    logits = c * s if self.combine == 'product' else c + s
    return x * (1 + torch.sigmoid(logits))


class TorchSCSE(nn.Module):
  """Roy et al. (as segmentation_models_pytorch's SCSEModule): x * cSE + x * sSE."""

  def __init__(self, channels, reduction=16):
    super().__init__()
    self.fc1 = nn.Conv2d(channels, channels // reduction, 1)
    self.fc2 = nn.Conv2d(channels // reduction, channels, 1)
    self.sse = nn.Conv2d(channels, 1, 1)

  def forward(self, x):
    cse = torch.sigmoid(self.fc2(TF.relu(self.fc1(x.mean((2, 3), keepdim=True)))))
    return x * cse + x * torch.sigmoid(self.sse(x))


class TorchCoord(nn.Module):
  """Official CoordAtt (houqb/CoordAttention), inp == oup."""

  def __init__(self, channels, reduction=32):
    super().__init__()
    mip = max(8, channels // reduction)
    self.conv1 = nn.Conv2d(channels, mip, 1)
    self.bn1 = nn.BatchNorm2d(mip)
    self.conv_h = nn.Conv2d(mip, channels, 1)
    self.conv_w = nn.Conv2d(mip, channels, 1)

  def forward(self, x):
    h, w = x.shape[2:]
    x_h = x.mean(3, keepdim=True)  # (n, c, h, 1)
    x_w = x.mean(2, keepdim=True).permute(0, 1, 3, 2)  # (n, c, w, 1)
    y = self.bn1(self.conv1(torch.cat([x_h, x_w], dim=2)))
    y = y * TF.relu6(y + 3) / 6
    y_h, y_w = torch.split(y, [h, w], dim=2)
    a_h = torch.sigmoid(self.conv_h(y_h))
    a_w = torch.sigmoid(self.conv_w(y_w.permute(0, 1, 3, 2)))
    return x * a_w * a_h


class TorchZGate(nn.Module):
  def __init__(self, k=7):
    super().__init__()
    self.conv = nn.Conv2d(2, 1, k, padding=k // 2, bias=False)
    self.bn = nn.BatchNorm2d(1, eps=1e-5, momentum=0.01)

  def forward(self, x):
    pooled = torch.cat([x.amax(1, keepdim=True), x.mean(1, keepdim=True)], dim=1)
    return x * torch.sigmoid(self.bn(self.conv(pooled)))


class TorchTriplet(nn.Module):
  """Official TripletAttention (landskape-ai/triplet-attention)."""

  def __init__(self):
    super().__init__()
    self.cw, self.hc, self.hw = TorchZGate(), TorchZGate(), TorchZGate()

  def forward(self, x):
    out_cw = self.cw(x.permute(0, 2, 1, 3)).permute(0, 2, 1, 3)
    out_hc = self.hc(x.permute(0, 3, 2, 1)).permute(0, 3, 2, 1)
    return (out_cw + out_hc + self.hw(x)) / 3


class TorchLightCBAM(nn.Module):
  """timm's LightCbamModule: rd = round(C/16), no MLP bias, 1-in spatial conv + BN."""

  def __init__(self, channels, k=7):
    super().__init__()
    hidden = max(1, int(channels / 16 + 0.5))
    self.fc1 = nn.Conv2d(channels, hidden, 1, bias=False)
    self.fc2 = nn.Conv2d(hidden, channels, 1, bias=False)
    self.conv = nn.Conv2d(1, 1, k, padding=k // 2, bias=False)
    self.bn = nn.BatchNorm2d(1)

  def forward(self, x):
    pooled = 0.5 * x.mean((2, 3), keepdim=True) + 0.5 * x.amax((2, 3), keepdim=True)
    x = x * torch.sigmoid(self.fc2(TF.relu(self.fc1(pooled))))
    s = 0.5 * x.mean(1, keepdim=True) + 0.5 * x.amax(1, keepdim=True)
    return x * torch.sigmoid(self.bn(self.conv(s)))


# ---------------------------------------------------------------- weight conversion


def _np(t):
  return t.detach().numpy().astype(np.float32)


def _randomize(module, seed):
  """Non-trivial weights everywhere and BatchNorm running statistics far from (0, 1)."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in module.parameters():
      p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    for m in module.modules():
      if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
        m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.5)
        m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) * 1.5 + 0.5)
  return module.eval()


def _dense(linear_or_conv):
  w = _np(linear_or_conv.weight)
  w = w.reshape(w.shape[0], w.shape[1])  # (out, in[, 1, 1]) -> (out, in)
  out = {'kernel': w.T}
  if linear_or_conv.bias is not None:
    out['bias'] = _np(linear_or_conv.bias)
  return out


def _conv(conv):
  out = {'kernel': _np(conv.weight).transpose(2, 3, 1, 0)}  # OIHW -> HWIO
  if conv.bias is not None:
    out['bias'] = _np(conv.bias)
  return out


def _bn(bn):
  return ({'scale': _np(bn.weight), 'bias': _np(bn.bias)},
          {'mean': _np(bn.running_mean), 'var': _np(bn.running_var)})


def _mlp(fc1, fc2):
  first, second = _dense(fc1), _dense(fc2)
  params = {'fc1_kernel': first['kernel'], 'fc2_kernel': second['kernel']}
  if 'bias' in first:
    params.update(fc1_bias=first['bias'], fc2_bias=second['bias'])
  return params


def _check(module, variables, torch_module, shape=(2, 32, 6, 7), seed=0):
  x = torch.randn(shape, generator=torch.Generator().manual_seed(seed + 100))
  with torch.no_grad():
    expected = _np(torch_module(x))
  x_nhwc = jnp.asarray(_np(x).transpose(0, 2, 3, 1))
  variables = jax.tree.map(jnp.asarray, variables)
  # The converted tree must be exactly the one the module creates.
  init_shapes = jax.tree.map(jnp.shape, jax.eval_shape(module.init, jax.random.key(0), x_nhwc))
  assert jax.tree.map(jnp.shape, variables) == init_shapes
  apply = jax.jit(module.apply, static_argnames='train')
  got = np.asarray(apply(variables, x_nhwc, train=False)).transpose(0, 3, 1, 2)
  np.testing.assert_allclose(got, expected, atol=TOLERANCE, rtol=0)
  return x, x_nhwc, variables


# ---------------------------------------------------------------- tests


def test_se_matches_torch():
  ref = _randomize(TorchSE(32), 1)
  _check(attention.create('se'), {'params': {'channel': _mlp(ref.fc1, ref.fc2)}}, ref)


@pytest.mark.parametrize('channels', [32, 256])  # adaptive k = 3 and 5
def test_eca_matches_torch(channels):
  ref = _randomize(TorchECA(channels), 2)
  kernel = _np(ref.conv.weight).transpose(2, 1, 0)
  assert kernel.shape[0] == attention.eca_kernel_size(channels)
  _check(attention.create('eca'), {'params': {'conv_kernel': kernel}}, ref,
         shape=(2, channels, 5, 4))


def test_eca_kernel_size_is_the_papers_formula():
  for channels in (1, 2, 3, 16, 64, 100, 128, 256, 512, 1024, 2048):
    t = int(abs((math.log(channels, 2) + 1) / 2))
    assert attention.eca_kernel_size(channels) == (t if t % 2 else t + 1)
  assert attention.eca_kernel_size(256) == 5
  assert attention.eca_kernel_size(64) == 3


def _bam_variables(ref):
  c_norm, c_stats = _bn(ref.bn_c)
  params = {
      'channel': {**_mlp(ref.fc0, ref.fc_final), 'norm': c_norm},
      'spatial': {'reduce_conv': _conv(ref.reduce), 'final_conv': _conv(ref.final)},
  }
  stats = {'channel': {'norm': c_stats}, 'spatial': {}}
  params['spatial']['reduce_norm'], stats['spatial']['reduce_norm'] = _bn(ref.bn_reduce)
  for i, (conv, bn) in enumerate(zip(ref.di, ref.bn_di, strict=True)):
    params['spatial'][f'dilated_conv{i}'] = _conv(conv)
    params['spatial'][f'dilated_norm{i}'], stats['spatial'][f'dilated_norm{i}'] = _bn(bn)
  return {'params': params, 'batch_stats': stats}


@pytest.mark.parametrize('combine', ['product', 'sum'])
def test_bam_matches_torch(combine):
  ref = _randomize(TorchBAM(32, combine=combine), 3)
  module = attention.create('bam', combine=combine)
  x, x_nhwc, variables = _check(module, _bam_variables(ref), ref, shape=(3, 32, 9, 10))
  # Train mode: batch statistics in both (running-stat updates differ by design: PyTorch
  # tracks the unbiased variance, Flax the biased one).
  ref.train()
  with torch.no_grad():
    expected = _np(ref(x))
  got, _ = jax.jit(module.apply, static_argnames=('train', 'mutable'))(
      variables, x_nhwc, train=True, mutable=('batch_stats',))
  np.testing.assert_allclose(np.asarray(got).transpose(0, 3, 1, 2), expected,
                             atol=TOLERANCE, rtol=0)


def test_scse_matches_torch():
  ref = _randomize(TorchSCSE(32), 4)
  sse = _dense(ref.sse)
  params = {'channel': _mlp(ref.fc1, ref.fc2),
            'spatial': {'conv_kernel': sse['kernel'], 'conv_bias': sse['bias']}}
  _check(attention.create('scse'), {'params': params}, ref)


def test_coord_matches_torch():
  ref = _randomize(TorchCoord(32), 5)
  norm, stats = _bn(ref.bn1)
  params = {'conv1': _dense(ref.conv1), 'bn1': norm, 'conv_h': _dense(ref.conv_h),
            'conv_w': _dense(ref.conv_w)}
  _check(attention.create('coord'), {'params': params, 'batch_stats': {'bn1': stats}}, ref,
         shape=(2, 32, 5, 7))  # H != W catches a swapped split.


def test_triplet_matches_torch():
  ref = _randomize(TorchTriplet(), 6)
  params, stats = {}, {}
  for name in ('cw', 'hc', 'hw'):
    gate = getattr(ref, name)
    norm, stat = _bn(gate.bn)
    params[name] = {'conv_kernel': _conv(gate.conv)['kernel'], 'norm': norm}
    stats[name] = {'norm': stat}
  # H, W and C all differ, so a wrong rotation cannot go unnoticed.
  _check(attention.create('triplet'), {'params': params, 'batch_stats': stats}, ref,
         shape=(2, 12, 9, 10))


def test_lcbam_matches_torch():
  ref = _randomize(TorchLightCBAM(32), 7)
  norm, stats = _bn(ref.bn)
  params = {'channel': _mlp(ref.fc1, ref.fc2),
            'spatial': {'conv_kernel': _conv(ref.conv)['kernel'], 'norm': norm}}
  _check(attention.create('lcbam'), {'params': params, 'batch_stats': {'spatial': {
      'norm': stats}}}, ref)
