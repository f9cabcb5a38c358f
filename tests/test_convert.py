"""PyTorch -> cbam_jax weight conversion: logits parity with the reference layouts, the
torchvision backbone path, the CLI round trip and the error messages."""

import functools
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cases import fast_subset

torch = pytest.importorskip('torch')

import torch_reference as refs  # noqa: E402  (needs torch)
from cbam_jax import convert, saving  # noqa: E402
from cbam_jax.convert import keys as convert_keys  # noqa: E402
from cbam_jax.models import Bottleneck  # noqa: E402

pytestmark = pytest.mark.torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOLERANCE = 1e-4


def images(size: int, batch: int = 2, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).normal(size=(batch, size, size, 3)).astype(np.float32)


@functools.cache
def reference(name: str) -> torch.nn.Module:
  """Small randomised reference networks (cached: several tests read the same one)."""
  build = {
      # Official CBAM: hidden = C // 16, so BasicBlocks need >= 16 channels.
      'official_cifar_basic': lambda: refs.OfficialResNet(
          'basic', [2, 1, 1, 1], 'CIFAR10', num_classes=10, width=16),
      'official_imagenet_bottleneck': lambda: refs.OfficialResNet(
          'bottleneck', [1, 1, 1, 1], 'ImageNet', num_classes=7, width=8),
      # Two stages: avg_pool2d(x, 4) is global at 8x8 input.
      'official_tiny': lambda: refs.OfficialResNet(
          'basic', [2, 1], 'CIFAR10', num_classes=10, width=16),
      'official_bam': lambda: refs.OfficialResNet(
          'basic', [1, 1, 1], 'CIFAR10', num_classes=5, width=32, att_type='BAM'),
      'official_no_spatial': lambda: refs.OfficialResNet(
          'basic', [1, 1, 1], 'CIFAR10', num_classes=5, width=16, no_spatial=True),
      'timm_cbam_basic': lambda: refs.TimmResNet(
          'basic', [1, 1, 1, 1], num_classes=6, attn_layer='cbam', width=16),
      'timm_se_bottleneck': lambda: refs.TimmResNet(
          'bottleneck', [1, 1, 1, 1], num_classes=6, attn_layer='se', width=8),
      'timm_se_basic': lambda: refs.TimmResNet(
          'basic', [1, 2, 1], num_classes=6, attn_layer='se', width=16),
      'torchvision_basic': lambda: refs.OfficialResNet(
          'basic', [1, 2, 1, 1], 'ImageNet', num_classes=4, att_type=None, width=8,
          global_pool=True),
      # ResNeXt: timm's 64-channel stem before stages of 8..64 features, 4 groups of 2..16
      # channels (resnext50_32x4d's 32 x 4 at a sixteenth of the width).
      'timm_resnext_cbam': lambda: refs.TimmResNet(
          'bottleneck', [1, 1, 1, 1], num_classes=6, attn_layer='cbam', width=8,
          stem_width=64, cardinality=4, base_width=16),
      'timm_resnext_se': lambda: refs.TimmResNet(
          'bottleneck', [1, 1, 1, 1], num_classes=6, attn_layer='se', width=8, stem_width=64,
          cardinality=2, base_width=32),
      # torchvision's layout: ResNeXt 8x4d, Wide ResNet-2 (width_per_group 128).
      'torchvision_resnext': lambda: refs.OfficialResNet(
          'bottleneck', [1, 1, 1, 1], 'ImageNet', num_classes=4, att_type=None, width=16,
          global_pool=True, groups=8, width_per_group=4),
      'torchvision_wide': lambda: refs.OfficialResNet(
          'bottleneck', [1, 1, 1, 1], 'ImageNet', num_classes=4, att_type=None, width=8,
          global_pool=True, width_per_group=128),
  }[name]
  return refs.randomize(build(), seed=len(name))


def jax_logits(model, variables, x: np.ndarray) -> np.ndarray:
  return np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x))


# (reference, source, input size, expected attention class or None)
PARITY_CASES = [
    ('official_cifar_basic', 'official', 32, 'CBAM'),  # avg_pool2d(x, 4) is global at 32.
    ('official_imagenet_bottleneck', 'official', 224, 'CBAM'),  # AvgPool2d(7) at 224.
    ('official_no_spatial', 'official', 16, 'CBAM'),
    ('official_bam', 'official', 16, None),  # BAM after stages 1 and 2.  # 3 stages: 16 -> 4x4.
    ('timm_cbam_basic', 'timm', 64, 'CBAM'),
    ('timm_se_bottleneck', 'timm', 64, 'SqueezeExcitation'),
    ('timm_se_basic', 'timm', 48, 'SqueezeExcitation'),
    ('torchvision_basic', 'torchvision', 40, None),
    ('timm_resnext_cbam', 'timm', 32, 'CBAM'),  # SE-ResNeXt: tests/test_nnx_convert.py.
    ('torchvision_resnext', 'torchvision', 32, None),
]
# The fast run checks one official CBAM network and one timm CBAM ResNeXt; the full suite
# all of them.
FAST_PARITY = ('official_cifar_basic', 'timm_resnext_cbam')


@pytest.mark.parametrize('name,source,size,attention', fast_subset(
    PARITY_CASES, [c[0] for c in PARITY_CASES], FAST_PARITY))
def test_logits_match_pytorch(name, source, size, attention):
  torch_model = reference(name)
  x = images(size)
  kwargs = {'attention': None} if source == 'torchvision' else {}
  model, variables, report = convert.from_pytorch(
      torch_model.state_dict(), source, return_report=True, **kwargs)
  if attention is None:
    assert report.config['fields']['attention'] is None
  else:
    assert report.config['fields']['attention']['class'] == attention
  assert not report.new_keys and not report.missing_keys and not report.unexpected_keys
  expected = refs.nchw_logits(torch_model, x)
  np.testing.assert_allclose(jax_logits(model, variables, x), expected, rtol=0, atol=TOLERANCE)


def test_inferred_architecture():
  _, _, official = convert.from_pytorch(
      reference('official_imagenet_bottleneck').state_dict(), 'official', return_report=True)
  config = official.config['fields']
  assert (config['stage_sizes'], config['block'], config['num_filters'], config['stem'],
          config['num_classes']) == ([1, 1, 1, 1], 'bottleneck', 8, 'imagenet', 7)
  assert config['attention']['fields'] == {
      'hidden_rounding': 'floor', 'kernel_size': 7, 'mlp_bias': True, 'norm_epsilon': 1e-5,
      'norm_momentum': 0.99, 'reduction_ratio': 16, 'spatial_norm': True, 'use_bias': False,
      'use_spatial': True}
  _, _, cifar = convert.from_pytorch(
      reference('official_cifar_basic').state_dict(), 'official', return_report=True)
  cifar_fields = cifar.config['fields']
  assert (cifar_fields['stem'], cifar_fields['stage_sizes'], cifar_fields['block']) == (
      'cifar', [2, 1, 1, 1], 'basic')
  assert cifar_fields['attention']['fields']['use_spatial']
  no_spatial = convert.from_pytorch(
      reference('official_no_spatial').state_dict(), 'official', return_report=True)[2]
  assert not no_spatial.config['fields']['attention']['fields']['use_spatial']
  bam = convert.from_pytorch(
      reference('official_bam').state_dict(), 'official', return_report=True)[2].config['fields']
  assert bam['attention'] is None
  assert bam['stage_attention']['class'] == 'BottleneckAttention'
  assert {k: bam['stage_attention']['fields'][k] for k in ('combine', 'num_dilated_convs')} == {
      'combine': 'product', 'num_dilated_convs': 2}
  timm_cbam = convert.from_pytorch(
      reference('timm_cbam_basic').state_dict(), 'timm', return_report=True)[2]
  assert {k: timm_cbam.config['fields']['attention']['fields'][k]
          for k in ('hidden_rounding', 'mlp_bias', 'norm_momentum')} == {
              'hidden_rounding': 'round', 'mlp_bias': False, 'norm_momentum': 0.9}


# timm_resnext_cbam: its parity test.
@pytest.mark.parametrize('name,grouping', [
    ('timm_resnext_se', (8, 64, 2, 32)),
    ('torchvision_resnext', (16, None, 8, 4)),
    ('torchvision_wide', (8, None, 1, 128)),
    ('timm_cbam_basic', (16, None, 1, 64)),
])
def test_inferred_resnext_grouping(name, grouping):
  """(num_filters, stem_features, groups, width_per_group) read from the shapes alone; every
  key lands with its shape checked (no forward pass: the parity tests run those)."""
  source = name.split('_')[0]
  model, _, report = convert.from_pytorch(
      reference(name).state_dict(), source, return_report=True,
      attention=None if source == 'torchvision' else 'auto')
  assert (model.num_filters, model.stem_features, model.groups,
          model.width_per_group) == grouping
  assert not report.new_keys and not report.missing_keys and not report.unexpected_keys


@pytest.mark.slow
def test_timm_transcriptions_at_full_size():
  """The transcribed timm networks have timm's published parameter counts (millions, two
  decimals: timm's results/results-imagenet.csv), and timm's seresnext50_32x4d converts at
  full size (every key, shapes checked; no forward pass)."""
  def millions(model):
    return round(sum(p.numel() for p in model.parameters()) / 1e6, 2)

  seresnext = refs.TimmResNet('bottleneck', [3, 4, 6, 3], num_classes=1000, attn_layer='se',
                              cardinality=32, base_width=4)
  assert millions(seresnext) == 27.56
  assert millions(refs.TimmResNet('bottleneck', [3, 4, 6, 3], num_classes=1000,
                                  attn_layer=None, cardinality=32, base_width=4)) == 25.03
  assert millions(refs.TimmMobileNet(2, num_classes=1000, channel_multiplier=1.4)) == 6.11
  assert millions(refs.TimmMobileNet(1, num_classes=1000, channel_multiplier=1.25)) == 6.27
  model, _, report = convert.from_pytorch(seresnext.state_dict(), 'timm', return_report=True)
  assert (model.num_filters, model.stem_features, model.groups, model.width_per_group) == (
      64, None, 32, 4)
  assert not report.missing_keys and not report.unexpected_keys


def test_resnext_widths_that_no_width_per_group_gives():
  arrays = {k: v.numpy() for k, v in reference('timm_resnext_se').state_dict().items()}
  # Stage 2's inner width 8 (2 groups of 4) where int(16 * 32 / 64) * 2 = 16 is needed.
  arrays['layer2.0.conv2.weight'] = np.zeros((8, 4, 3, 3), np.float32)
  with pytest.raises(ValueError, match=r'inner widths \[8, 8, 32, 64\].*follow no '
                     'width_per_group'):
    convert.from_pytorch(arrays, 'timm')
  arrays['layer2.0.conv2.weight'] = np.zeros((32, 8, 3, 3), np.float32)  # 4 groups.
  with pytest.raises(ValueError, match=r'layer2\.0\.conv2\.weight .*same number of groups'):
    convert.from_pytorch(arrays, 'timm')


def test_timm_se_hidden_sizes_follow_make_divisible():
  # timm: hidden = make_divisible(C / 16, 8): 16 -> 8, 32 -> 8, 64 -> 8 (C // 16 = 1, 2, 4).
  _, variables, report = convert.from_pytorch(reference('timm_se_basic').state_dict(), 'timm',
                                              return_report=True)
  fields = report.config['fields']['attention']['fields']
  assert (fields['hidden_rounding'], fields['hidden_divisor']) == ('round', 8)
  hidden = [variables['params'][block]['attention']['channel']['fc1_kernel'].shape
            for block in ('layer1_0', 'layer2_0', 'layer3_0')]
  assert hidden == [(16, 8), (32, 8), (64, 8)]


def test_official_spatial_pool_order_is_swapped(monkeypatch):
  # The official pools [max, mean]; without swapping the kernel's inputs parity breaks.
  torch_model, x = reference('official_tiny'), images(8)
  expected = refs.nchw_logits(torch_model, x)
  monkeypatch.setitem(convert_keys._ATTENTION_KEYS['official'], ('spatial', 'conv_kernel'),
                      ('cbam.SpatialGate.spatial.conv.weight', convert_keys._conv))
  model, variables = convert.from_pytorch(torch_model.state_dict(), 'official')
  assert np.abs(jax_logits(model, variables, x) - expected).max() > 100 * TOLERANCE


def test_numpy_state_dict_module_prefix_and_wrapper():
  torch_model, x = reference('timm_se_basic'), images(48, seed=2)
  state = {'module.' + k: v.numpy() for k, v in torch_model.state_dict().items()}
  model, variables = convert.from_pytorch({'state_dict': state, 'epoch': 3}, 'timm')
  np.testing.assert_allclose(jax_logits(model, variables, x), refs.nchw_logits(torch_model, x),
                             rtol=0, atol=TOLERANCE)


def _flax_path(torch_key: str) -> tuple[str, ...]:
  """Independent of cbam_jax.convert: where a torchvision key must land."""
  parts = torch_key.split('.')
  collection = 'batch_stats' if parts[-1].startswith('running_') else 'params'
  leaf = {'running_mean': 'mean', 'running_var': 'var', 'bias': 'bias'}.get(parts[-1])
  if parts[0].startswith('layer'):
    module = '.'.join(parts[2:-1])
    module = {'downsample.0': 'downsample_conv', 'downsample.1': 'downsample_bn'}.get(
        module, module)
    path = (f'{parts[0]}_{parts[1]}', module)
  else:
    path = (parts[0],)
  if leaf is None:  # weight: a conv/fc kernel or a BatchNorm scale.
    leaf = 'kernel' if 'conv' in path[-1] or path[-1] == 'fc' else 'scale'
  return (collection, *path, leaf)


@pytest.mark.slow
def test_torchvision_backbone_into_cbam_resnet():
  torch_model = reference('torchvision_basic')
  state = {k: v for k, v in torch_model.state_dict().items()
           if not k.endswith('num_batches_tracked')}
  model, variables, report = convert.from_pytorch(
      state, 'torchvision', rng=1, return_report=True)
  # Backbone: every PyTorch tensor landed, in Flax layout.
  assert sorted(report.loaded_keys) == sorted(state)
  for key, value in state.items():
    value = value.numpy()
    if value.ndim == 4:
      value = value.transpose(2, 3, 1, 0)
    elif value.ndim == 2:
      value = value.T
    got = functools.reduce(lambda tree, name: tree[name], _flax_path(key), variables)
    np.testing.assert_array_equal(np.asarray(got), value, err_msg=key)
  # New: exactly the attention variables, in the official CBAM configuration.
  attention_paths = [
      '/'.join(str(getattr(p, 'key', p)) for p in path)
      for path, _ in jax.tree_util.tree_flatten_with_path(variables)[0]
      if any(getattr(p, 'key', None) == 'attention' for p in path)]
  assert sorted(report.new_keys) == sorted(attention_paths)
  assert len(attention_paths) == 5 * 9  # 5 blocks x (4 MLP + conv + 2 BN + 2 BN stats).
  assert report.config['fields']['attention'] == 'cbam'
  # Forward runs; the fresh spatial gates start at 0.5 (official zero-init BN scale).
  logits, state_out = jax.jit(functools.partial(model.apply, mutable=['intermediates']))(
      variables, images(40))
  assert logits.shape == (2, 4) and np.isfinite(np.asarray(logits)).all()
  spatial = state_out['intermediates']['layer1_0']['attention']['spatial']['spatial_map'][0]
  np.testing.assert_allclose(spatial, 0.5, atol=1e-6)
  channel = state_out['intermediates']['layer1_0']['attention']['channel']['channel_map'][0]
  assert np.ptp(np.asarray(channel)) > 0  # Random MLP weights: not a constant gate.


@pytest.mark.slow
def test_cli_round_trip(tmp_path, capsys):
  torch_model, x = reference('official_tiny'), images(8, seed=1)
  path = tmp_path / 'cbam.pth'
  # As the official releases are saved: a training checkpoint of a DataParallel model.
  torch.save({'epoch': 1, 'arch': 'resnet', 'state_dict': {
      'module.' + k: v for k, v in torch_model.state_dict().items()}}, path)
  out_dir = tmp_path / 'converted'
  assert convert.main([str(path), str(out_dir), '--source=official']) == 0
  assert 'Converted' in capsys.readouterr().out
  with open(out_dir / 'model.json') as f:
    meta = json.load(f)
  assert meta['format'] == saving.FORMAT and meta['source'] == 'official'
  assert meta['model']['fields']['stage_sizes'] == [2, 1]
  model, variables = saving.load(out_dir)
  np.testing.assert_allclose(jax_logits(model, variables, x), refs.nchw_logits(torch_model, x),
                             rtol=0, atol=TOLERANCE)
  assert jax.tree_util.tree_structure(variables) == jax.tree_util.tree_structure(
      convert.from_pytorch(torch_model.state_dict(), 'official')[1])
  # Fine-tuning on another label set: a new head, the rest as converted.
  model3, variables3 = saving.load(out_dir, num_classes=3)
  assert model3.num_classes == 3 and variables3['params']['fc']['kernel'].shape == (32, 3)
  np.testing.assert_array_equal(variables3['params']['layer2_0']['conv1']['kernel'],
                                variables['params']['layer2_0']['conv1']['kernel'])
  with pytest.raises(FileNotFoundError, match='not a saved model directory'):
    saving.load(tmp_path)


def test_cli_errors_are_one_line(tmp_path):
  with pytest.raises(SystemExit, match=r"convert: No PyTorch checkpoint at '.*nothing.pth'"):
    convert.main([str(tmp_path / 'nothing.pth'), str(tmp_path / 'out')])
  with pytest.raises(SystemExit, match="Unknown command line flag 'no-strict'"):
    convert.main(['in.pth', 'out', '--no-strict'])
  with pytest.raises(SystemExit, match='give IN.pth and OUT_DIR'):
    convert.main(['in.pth'])
  with pytest.raises(SystemExit, match='give IN.pth and OUT_DIR, got 3'):
    convert.main(['in.pth', 'out', 'more'])
  with pytest.raises(SystemExit, match='source'):
    convert.main(['in.pth', 'out', '--source=caffe'])



@pytest.mark.slow
def test_cli_overwrite_source_hint_and_interrupted_conversion(tmp_path, monkeypatch, capsys):
  path, out = tmp_path / 'timm.pth', tmp_path / 'out'
  torch.save(reference('timm_cbam_basic').state_dict(), path)
  with pytest.raises(SystemExit, match=r'not match the inferred .official. model: .* The state '
                     r'dict fits --source=timm: pass that\.$') as error:
    convert.main([str(path), str(out), '--source=official'])
  assert error.value.code == 2 and not out.exists()
  assert convert.main([str(path), str(out), '--source=timm']) == 0
  written = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
  with pytest.raises(SystemExit, match='exists and is not empty; pass --overwrite'):
    convert.main([str(path), str(out), '--source=timm'])

  # Killed halfway through writing (here: an interrupt inside saving.save): the previous
  # output stays as it was and nothing half-written is left beside it.
  def interrupted_save(directory, *args, **kwargs):
    (pathlib.Path(directory) / 'model.json').write_text('{')
    raise KeyboardInterrupt

  monkeypatch.setattr(saving, 'save', interrupted_save)
  with pytest.raises(KeyboardInterrupt):
    convert.main([str(path), str(out), '--source=timm', '--overwrite'])
  assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == written
  assert sorted(p.name for p in tmp_path.iterdir()) == ['out', 'timm.pth']
  monkeypatch.undo()
  assert convert.main([str(path), str(out), '--source=timm', '--overwrite']) == 0
  model, _ = saving.load(out)
  assert sorted(p.name for p in tmp_path.iterdir()) == ['out', 'timm.pth']

@pytest.mark.slow
def test_module_entry_point_and_lazy_torch():
  code = (
      'import runpy, sys\n'
      "sys.argv = ['cbam_jax.convert', '--help']\n"
      'try:\n'
      "  runpy.run_module('cbam_jax.convert', run_name='__main__', alter_sys=True)\n"
      'except SystemExit as e:\n'
      '  assert e.code == 0, e.code\n'
      "assert 'torch' not in sys.modules, 'importing cbam_jax.convert imported torch'\n")
  env = {**os.environ, 'PYTHONPATH': REPO_ROOT, 'JAX_PLATFORMS': 'cpu'}
  result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                          env=env, timeout=120, check=False)
  assert result.returncode == 0, result.stderr
  assert 'OUT_DIR' in result.stdout and '--source' in result.stdout


def test_config_round_trip():
  for name, source in [('official_tiny', 'official'), ('timm_se_basic', 'timm')]:
    model, _, report = convert.from_pytorch(
        reference(name).state_dict(), source, return_report=True)
    rebuilt = saving.build(json.loads(json.dumps(report.config)))
    assert saving.describe(rebuilt) == report.config
    assert rebuilt.attention.func is model.attention.func
  with pytest.raises(TypeError, match='cannot be saved'):
    saving.describe(model.clone(attention=lambda **kw: None))


# ----------------------------------------------------------------------------------------------
# Errors.


def _official_state() -> dict[str, np.ndarray]:
  return {k: v.numpy() for k, v in reference('official_tiny').state_dict().items()}


def test_missing_keys_are_listed():
  state = _official_state()
  del state['layer2.0.bn1.running_var'], state['layer1.1.cbam.ChannelGate.mlp.3.bias']
  with pytest.raises(ValueError, match='missing keys \\(2\\)') as error:
    convert.from_pytorch(state, 'official')
  assert 'layer2.0.bn1.running_var' in str(error.value)
  assert 'layer1.1.cbam.ChannelGate.mlp.3.bias' in str(error.value)
  assert 'strict=False' in str(error.value)


def test_unexpected_keys_are_listed():
  state = _official_state()
  state['head.extra.weight'] = np.zeros((3, 3), np.float32)
  with pytest.raises(ValueError, match='unexpected keys \\(1\\): head.extra.weight'):
    convert.from_pytorch(state, 'official')


@pytest.mark.slow
def test_non_strict_loads_what_matches():
  state = _official_state()
  del state['layer2.0.bn1.running_var']
  state['head.extra.weight'] = np.zeros((3, 3), np.float32)
  model, variables, report = convert.from_pytorch(
      state, 'official', strict=False, return_report=True)
  assert report.missing_keys == ('layer2.0.bn1.running_var',)
  assert report.unexpected_keys == ('head.extra.weight',)
  # Missing BatchNorm variance keeps Flax's initial value (ones); the rest is loaded.
  np.testing.assert_array_equal(variables['batch_stats']['layer2_0']['bn1']['var'], 1.0)
  np.testing.assert_array_equal(variables['batch_stats']['layer2_0']['bn1']['mean'],
                                state['layer2.0.bn1.running_mean'])
  assert jax_logits(model, variables, images(8)).shape == (2, 10)


def test_wrong_source_gives_a_hint():
  state = {k: v.numpy() for k, v in reference('timm_cbam_basic').state_dict().items()}
  with pytest.raises(ValueError, match="try source='timm'"):
    convert.from_pytorch(state, 'official')
  with pytest.raises(ValueError, match="try source='official'"):
    convert.from_pytorch(_official_state(), 'torchvision')


def test_shape_mismatch_names_the_key():
  state = _official_state()
  state['layer2.0.conv2.weight'] = state['layer2.0.conv2.weight'][:, :-1]
  with pytest.raises(ValueError, match='layer2.0.conv2.weight has shape'):
    convert.from_pytorch(state, 'official')


def test_inconsistent_hidden_sizes():
  state = _official_state()
  prefix = 'layer2.0.cbam.ChannelGate.mlp.'
  state[prefix + '1.weight'] = np.zeros((5, 32), np.float32)
  state[prefix + '1.bias'] = np.zeros((5,), np.float32)
  state[prefix + '3.weight'] = np.zeros((32, 5), np.float32)
  with pytest.raises(ValueError, match=r'hidden sizes \[\(16, 1\), \(32, 5\)\]'):
    convert.from_pytorch(state, 'official')


@pytest.mark.parametrize('kwargs,error,match', [
    (dict(source='caffe'), ValueError, 'Unknown source'),
    (dict(source='official', attention='se'), ValueError, 'read from the weights'),
])
def test_bad_arguments(kwargs, error, match):
  with pytest.raises(error, match=match):
    convert.from_pytorch(_official_state(), **kwargs)


def test_bad_state_dicts():
  with pytest.raises(TypeError, match='Expected a state dict'):
    convert.from_pytorch([1, 2], 'official')
  with pytest.raises(ValueError, match='no weights'):
    convert.from_pytorch({'layer1.0.bn1.num_batches_tracked': torch.tensor(1)}, 'official')
  state = _official_state()
  state['conv1.weight'] = np.zeros((16, 3, 5, 5), np.float32)
  with pytest.raises(ValueError, match='7x7/2 conv'):
    convert.from_pytorch(state, 'official')
  with pytest.raises(ValueError, match="no 'fc.weight'"):
    convert.from_pytorch({k: v for k, v in _official_state().items() if k != 'fc.weight'},
                         'official')


def test_bfloat16_tensors_are_read():
  torch_model = reference('timm_se_bottleneck')
  state = {k: v.to(torch.bfloat16) if v.is_floating_point() else v
           for k, v in torch_model.state_dict().items()}
  model, variables = convert.from_pytorch(state, 'timm')
  assert model.block_cls is Bottleneck
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(variables))
  np.testing.assert_array_equal(
      variables['params']['fc']['bias'], state['fc.bias'].float().numpy())
