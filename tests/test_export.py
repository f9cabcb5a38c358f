"""cbam_jax.export: StableHLO (reloaded with jax.export alone) and ONNX (onnxruntime)
outputs equal JAX's within 1e-5 at two batch sizes, for every attention member inside a
small network of a user's own, linen and NNX, and for CBAM ResNets; the command line.

The ONNX tests skip without jax2onnx, onnx and onnxruntime (the optional ``export`` extra,
not part of ``test``: docs/deploy.md says why).
"""

import functools
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cbam_jax import attention, saving
from cbam_jax import nnx as cnnx
from cbam_jax.export import ExportError, to_onnx, to_stablehlo
from cbam_jax.export import __main__ as cli
from cbam_jax.models import create_model
from tests.cases import fast_subset
from tests.random_variables import random_variables

TOLERANCE = 1e-5
# Small kernels keep the programs small; the 7x7 default is exported in the ResNet tests.
FIELDS = {name: {'kernel_size': 3} for name in ('cbam', 'spatial', 'lcbam', 'triplet')}
FIELDS['bam'] = {'num_dilated_convs': 1}
MEMBERS = fast_subset(attention.available(), attention.available(), ('cbam',))


class SmallNet(nn.Module):
  """A user's own network with attention modules inside, one after the other."""
  attention: tuple[str, ...]

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.relu(nn.BatchNorm(use_running_average=not train)(nn.Conv(16, (3, 3))(x)))
    for name in self.attention:
      x = attention.create(name, **FIELDS.get(name, {}))(x, train=train)
    return nn.Dense(5)(jnp.mean(x, axis=(1, 2)))


class SmallNnxNet(nnx.Module):
  def __init__(self, names: tuple[str, ...], *, rngs: nnx.Rngs):
    self.conv = nnx.Conv(3, 16, (3, 3), rngs=rngs)
    self.norm = nnx.BatchNorm(16, rngs=rngs)
    self.attention = nnx.List([cnnx.create(name, 16, rngs=rngs, **FIELDS.get(name, {}))
                               for name in names])
    self.head = nnx.Linear(16, 5, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.norm(self.conv(x)))
    for module in self.attention:
      x = module(x)
    return self.head(jnp.mean(x, axis=(1, 2)))


def _images(batch, size=8, seed=0):
  return jnp.asarray(np.random.default_rng(seed).standard_normal((batch, size, size, 3)),
                     jnp.float32)


def _variables(model, x):
  """Random variables whose kernels have unit gain (std 1/sqrt(fan_in)), so that the
  outputs stay near unit scale through 50 layers and 1e-5 is a meaningful tolerance (with
  He's gain a random ResNet-50 amplifies float32 rounding to ~2e-5 of its largest logit)."""
  def rescale(path, leaf):
    if jax.tree_util.keystr(path).endswith("['kernel']") and leaf.ndim > 1:
      return leaf * np.sqrt(1.0 / np.prod(leaf.shape[:-1])) / 0.3
    return leaf
  return jax.tree_util.tree_map_with_path(rescale, random_variables(model, x))


def _linen(names, size=8):
  model = SmallNet(tuple(names))
  return model, _variables(model, _images(1, size))


def _nnx(names):
  model = SmallNnxNet(tuple(names), rngs=nnx.Rngs(0))
  model.norm.mean[...] = jnp.linspace(-0.5, 0.5, 16)  # Eval mode must use these.
  model.norm.var[...] = jnp.linspace(0.5, 2.0, 16)
  return model


def _reference(model, variables, x):
  """JAX's outputs in evaluation mode, jitted."""
  if variables is None:
    eval_model = nnx.merge(*nnx.split(model))
    eval_model.eval()
    return np.asarray(nnx.jit(lambda m, x: m(x))(eval_model, x))
  return np.asarray(jax.jit(functools.partial(model.apply, train=False))(variables, x))


def _assert_close(got, want):
  """Within 1e-5 of the outputs' scale: absolute for outputs up to 1 (the small networks),
  relative to the largest output beyond (float32 keeps ~7 digits of a ResNet-50 logit)."""
  np.testing.assert_allclose(got, want, rtol=0,
                             atol=TOLERANCE * max(1.0, float(np.max(np.abs(want)))))


def _check_stablehlo(model, variables, size=8, batches=(3, 1)):
  """Exported at batch 2; reloaded and run at `batches` (each up to 3) against JAX."""
  blob = to_stablehlo(model, variables, _images(2, size))
  exported = jax.export.deserialize(blob)
  x = _images(3, size, seed=1)
  want = _reference(model, variables, x)
  for batch in batches:
    _assert_close(np.asarray(exported.call(x[:batch])), want[:batch])


@pytest.fixture
def ort():
  """onnxruntime; the test skips (before building its model) without the ONNX converter."""
  pytest.importorskip('jax2onnx')
  pytest.importorskip('onnx')
  return pytest.importorskip('onnxruntime')


def _check_onnx(ort, model, variables, path, size=8):
  proto = to_onnx(model, variables, _images(2, size), path)
  assert 'Loop' not in {node.op_type for node in proto.graph.node}  # No fusion boundaries.
  session = ort.InferenceSession(os.fspath(path), providers=['CPUExecutionProvider'])
  x = _images(3, size, seed=1)
  want = _reference(model, variables, x)
  for batch in (3, 1):
    got, = session.run(None, {'input': np.asarray(x[:batch])})
    _assert_close(got, want[:batch])
  return proto


# --------------------------------------------------------------------------- StableHLO


# Every member in one network: one program to compile instead of eleven.
def test_stablehlo_every_member_in_a_linen_network():
  _check_stablehlo(*_linen(attention.available()))


def test_stablehlo_cbam_in_an_nnx_network():
  model = _nnx(['cbam'])
  _check_stablehlo(model, None)
  assert not model.norm.use_running_average  # The caller's model keeps its training mode.


@pytest.mark.slow
def test_stablehlo_every_member_in_an_nnx_network():
  _check_stablehlo(_nnx(attention.available()), None)


# The linen CIFAR ResNet goes through StableHLO in the command-line tests, the ImageNet one
# here; CI's time goes to one of each API.
@pytest.mark.slow
def test_stablehlo_cbam_resnet20_nnx():
  _check_stablehlo(cnnx.create_model('resnet20', attention='cbam', rngs=nnx.Rngs(0)), None,
                   size=16)


@pytest.mark.slow
def test_stablehlo_cbam_resnet50():
  model = create_model('resnet50', attention='cbam')
  # One batch size: the small networks test that the batch axis stays free.
  _check_stablehlo(model, _variables(model, _images(1, 32)), size=32, batches=(3,))


def test_stablehlo_fixed_batch_rejects_other_batches():
  exported = jax.export.deserialize(
      to_stablehlo(*_linen(['se']), _images(2), batch_polymorphic=False))
  assert exported.in_avals[0].shape == (2, 8, 8, 3)
  with pytest.raises(ValueError, match='shape'):
    exported.call(_images(3))


@pytest.mark.slow
def test_stablehlo_runs_without_cbam_jax(tmp_path):
  model, variables = _linen(['cbam'])
  (tmp_path / 'model.stablehlo').write_bytes(to_stablehlo(model, variables, _images(2)))
  np.save(tmp_path / 'x.npy', np.asarray(_images(3, seed=1)))
  script = ('import sys, numpy as np, jax\n'
            f'exported = jax.export.deserialize(open({str(tmp_path / "model.stablehlo")!r}, '
            '"rb").read())\n'
            f'y = exported.call(np.load({str(tmp_path / "x.npy")!r}))\n'
            f'np.save({str(tmp_path / "y.npy")!r}, np.asarray(y))\n'
            'assert not any(m.startswith("cbam_jax") for m in sys.modules), "imported"\n')
  env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
  subprocess.run([sys.executable, '-c', script], check=True, cwd=tmp_path, env=env)
  _assert_close(np.load(tmp_path / 'y.npy'), _reference(model, variables, _images(3, seed=1)))


# --------------------------------------------------------------------------- ONNX


@pytest.mark.parametrize('name', MEMBERS)
def test_onnx_member_in_a_linen_network(name, tmp_path, ort):
  proto = _check_onnx(ort, *_linen([name]), tmp_path / 'model.onnx')
  if name == 'cbam':  # The network's conv and CBAM's spatial conv, each one plain Conv.
    assert [node.op_type for node in proto.graph.node].count('Conv') == 2


@pytest.mark.parametrize('name', fast_subset(attention.available(), attention.available(),
                                             ('cbam',)))
def test_onnx_member_in_an_nnx_network(name, tmp_path, ort):
  _check_onnx(ort, _nnx([name]), None, tmp_path / 'model.onnx')


@pytest.mark.slow
def test_onnx_cbam_resnet20(tmp_path, ort):
  model = create_model('resnet20', attention='cbam')
  _check_onnx(ort, model, _variables(model, _images(1, 16)), tmp_path / 'model.onnx', size=16)


@pytest.mark.slow
def test_onnx_cbam_resnet20_nnx(tmp_path, ort):
  _check_onnx(ort, cnnx.create_model('resnet20', attention='cbam', rngs=nnx.Rngs(0)), None,
              tmp_path / 'model.onnx', size=16)


@pytest.mark.slow
def test_onnx_cbam_resnet50(tmp_path, ort):
  model = create_model('resnet50', attention='cbam')
  _check_onnx(ort, model, _variables(model, _images(1, 32)), tmp_path / 'model.onnx', size=32)


def test_onnx_names_an_operation_it_cannot_convert(tmp_path, ort):
  del ort  # Only its skip.

  class HostCall(nn.Module):
    @nn.compact
    def __call__(self, x):
      return jax.pure_callback(np.sin, jax.ShapeDtypeStruct(x.shape, x.dtype), x)

  with pytest.raises(ExportError, match=r"Operation 'pure_callback' \(at .*\) has no ONNX"):
    to_onnx(HostCall(), {'params': {}}, _images(1), tmp_path / 'model.onnx')


def test_a_failed_onnx_check_leaves_the_earlier_file(tmp_path, ort, monkeypatch):
  del ort  # Only its skip.
  from cbam_jax.export import onnx as onnx_export

  path = tmp_path / 'model.onnx'
  path.write_bytes(b'the earlier export')
  monkeypatch.setattr(onnx_export, 'TOLERANCE', -1.0)  # Every output "differs".
  with pytest.raises(ExportError, match='differs from JAX'):
    to_onnx(*_linen(['se']), _images(1), path)
  assert path.read_bytes() == b'the earlier export'
  assert sorted(os.listdir(tmp_path)) == ['model.onnx']


# --------------------------------------------------------------------------- errors


def test_an_export_replaces_a_file_only_once_written(tmp_path):
  from cbam_jax.export._files import replacing

  path = tmp_path / 'model.bin'
  path.write_bytes(b'old')
  with pytest.raises(RuntimeError, match='failed'), replacing(path) as written:
    with open(written, 'wb') as f:
      f.write(b'half')
    raise RuntimeError('failed')
  assert path.read_bytes() == b'old' and os.listdir(tmp_path) == ['model.bin']
  with replacing(path) as written, open(written, 'wb') as f:
    f.write(b'new')
  assert path.read_bytes() == b'new' and os.listdir(tmp_path) == ['model.bin']
  umask = os.umask(0)
  os.umask(umask)
  assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask  # As open() would make it.


def test_errors_name_the_problem():
  model, variables = _linen(['se'])
  with pytest.raises(ExportError, match='needs its variables'):
    to_stablehlo(model, None, _images(1))
  with pytest.raises(ExportError, match='pass variables=None'):
    to_stablehlo(_nnx(['se']), variables, _images(1))
  with pytest.raises(ExportError, match='example must be an array'):
    to_stablehlo(model, variables, [1, 2])
  with pytest.raises(ExportError, match='flax.linen or flax.nnx module'):
    to_stablehlo(lambda x: x, variables, _images(1))
  with pytest.raises(ExportError, match='float32'):
    to_onnx(model, variables, _images(1).astype(jnp.bfloat16), '/nonexistent/model.onnx')


# --------------------------------------------------------------------------- command line


@pytest.fixture(scope='module')
def saved_model(tmp_path_factory):
  directory = tmp_path_factory.mktemp('saved') / 'model'
  # ResNet-20's layout, one block per stage, four filters: a quick program to compile.
  model = create_model('resnet20', attention='cbam', num_classes=3, stage_sizes=(1, 1, 1),
                       num_filters=4)
  variables = _variables(model, _images(1, 16))
  saving.save(directory, model, variables, name='resnet20')
  return directory, model, variables


def _run_cli(capsys, *argv):
  with pytest.raises(SystemExit) as exit_info:
    cli.main([str(a) for a in argv])
  lines = capsys.readouterr().err.strip().splitlines()
  return exit_info.value.code, lines


@pytest.mark.slow
def test_cli_exports_a_saved_model_and_keeps_existing_files(saved_model, tmp_path, capsys):
  directory, model, variables = saved_model
  out = tmp_path / 'model.stablehlo'
  cli.main(['--model', str(directory), '--format', 'stablehlo', '--out', str(out),
            '--image_size', '16'])
  x = _images(2, 16, seed=1)
  _assert_close(np.asarray(jax.export.deserialize(out.read_bytes()).call(x)),
                _reference(model, variables, x))
  code, lines = _run_cli(capsys, '--model', directory, '--format', 'stablehlo', '--out', out)
  assert code == 2 and len(lines) == 1 and 'exists; pass --overwrite' in lines[0]
  cli.main(['--model', str(directory), '--format', 'stablehlo', '--out', str(out),
            '--image_size', '16', '--overwrite'])


@pytest.mark.parametrize('argv, message', [
    (['--format', 'stablehlo', '--out', 'x'], '--model is required'),
    (['--model', '.', '--format', 'tflite', '--out', 'x'], 'stablehlo'),
    (['--model', '/nonexistent', '--format', 'onnx', '--out', 'x'], 'no such directory'),
    (['--model', '.', '--format', 'onnx', '--out', '/nonexistent/x.onnx'],
     'its folder does not exist'),
])
def test_cli_user_errors_are_one_line_exit_2(argv, message, capsys):
  code, lines = _run_cli(capsys, *argv)
  assert code == 2 and len(lines) == 1 and message in lines[0], lines


def test_cli_reports_a_folder_that_is_no_model(tmp_path, capsys):
  code, lines = _run_cli(capsys, '--model', tmp_path, '--format', 'stablehlo', '--out',
                         tmp_path / 'x')
  assert code == 2 and len(lines) == 1 and 'neither a saved model directory' in lines[0], lines
