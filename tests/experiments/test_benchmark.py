"""The benchmark suite runs end to end in its tiny CI mode and writes its reports."""

from __future__ import annotations

import json
import sys

import jax
import jax.numpy as jnp
import pytest

from cbam_jax import models
from experiments.bench import benchmark
from experiments.bench.benchmark import _models as benchmark_models


@pytest.mark.slow
def test_tiny_benchmark_writes_json_and_markdown(tmp_path):
  # Every section in one run: the NNX section reuses the linen programs compiled for the
  # training-step rows.
  sections = [f'--only={name}' for name in benchmark.SECTIONS + benchmark.EXTRA_SECTIONS]
  results = benchmark.main(['--tiny', '--out', str(tmp_path), *sections])

  saved = json.loads((tmp_path / 'results.json').read_text())
  assert saved['tiny'] is True
  assert saved['environment']['jax'] and saved['environment']['cpu_count'] >= 1
  (row,) = saved['module']
  assert row['shape'] == list(benchmark.TINY_MODULE_SHAPES[0])
  assert row['floor_ms'] > 0
  for name in ('cbam_jax', 'naive'):
    for mode in ('forward', 'fwd_bwd'):
      assert row['impls'][name][mode]['ms'] > 0
      assert row['impls'][name][mode]['compile_s'] > 0
  head = row['impls']['cbam_jax']['forward']
  assert head['vs_floor'] == pytest.approx(head['ms'] / row['floor_ms'])
  assert head['vs_naive'] == pytest.approx(head['ms'] / row['impls']['naive']['forward']['ms'])

  try:
    import torch  # noqa: F401
  except ImportError:
    assert 'torch_cl' not in row['impls']
  else:  # PyTorch columns sit beside the JAX ones.
    assert row['impls']['torch_cl']['forward']['ms'] > 0
    assert row['impls']['torch_nchw']['fwd_bwd']['ms'] > 0
    assert 'vs_torch_cl' in head

  (model,) = saved['models']
  assert {'jax_plain', 'jax_cbam', 'jax_nn_conv_plain', 'jax_nn_conv_cbam'} <= set(model['impls'])
  assert model['jax_vs_nn_conv']['cbam'] == pytest.approx(
      model['impls']['jax_cbam']['ms'] / model['impls']['jax_nn_conv_cbam']['ms'])
  assert model['cbam_overhead']['jax'] == pytest.approx(
      model['impls']['jax_cbam']['ms'] / model['impls']['jax_plain']['ms'])
  # Peak step memory of every implementation, JAX and PyTorch; CBAM's maps and gates add.
  for impl in model['impls'].values():
    assert impl['peak_mb'] > 0
  for prefix in {name.rsplit('_', 1)[0] for name in model['impls']}:
    assert model['impls'][f'{prefix}_cbam']['peak_mb'] > model['impls'][f'{prefix}_plain'][
        'peak_mb'], prefix
  (conv,) = saved['convs']
  assert set(conv['passes']) == {'forward', 'input_grad', 'kernel_grad'}
  for values in conv['passes'].values():
    assert values['jax'] > 0
    if 'torch_cl' in values:
      assert values['jax_vs_torch_cl'] == pytest.approx(values['jax'] / values['torch_cl'])
  (memory,) = saved['memory']
  assert memory['cbam']['peak_mb'] > 0 and memory['plain']['peak_mb'] > 0

  (nnx_row,) = saved['nnx']
  assert nnx_row['attention'] == 'cbam'
  assert set(nnx_row['impls']) == {'linen', 'nnx_jit', 'nnx_split'}
  linen = nnx_row['impls']['linen']
  for form in ('nnx_jit', 'nnx_split'):
    impl = nnx_row['impls'][form]
    assert impl['ms'] > 0 and impl['peak_mb'] > 0
    assert nnx_row['vs_linen'][form]['time'] == pytest.approx(impl['ms'] / linen['ms'])
    assert nnx_row['vs_linen'][form]['peak_memory'] == pytest.approx(
        impl['peak_mb'] / linen['peak_mb'])
    # One model, one step: the compiled programs need the same buffers within 5%.
    assert nnx_row['vs_linen'][form]['peak_memory'] == pytest.approx(1.0, abs=0.05)

  (compiles,) = saved['compile']
  assert set(compiles['impls']) == {'none', 'cbam', 'nnx_none', 'nnx_cbam'}
  for times in compiles['impls'].values():
    assert times['trace_s'] > 0 and times['lower_s'] >= 0 and times['xla_compile_s'] > 0
    assert times['xla_compile_cpu_s'] > 0 and times['kernels'] > 0
    assert times['total_s'] == pytest.approx(
        times['trace_s'] + times['lower_s'] + times['xla_compile_s'])
  assert compiles['impls']['nnx_cbam']['vs_none'] == pytest.approx(
      compiles['impls']['nnx_cbam']['total_s'] / compiles['impls']['nnx_none']['total_s'])
  # CBAM adds kernels to the program, in both skins.
  assert compiles['impls']['cbam']['kernels'] > compiles['impls']['none']['kernels']
  assert compiles['impls']['nnx_cbam']['kernels_vs_none'] > 1
  # The model rows split their compile time too.
  assert model['impls']['jax_cbam']['trace_lower_s'] > 0
  assert model['impls']['jax_cbam']['compile_s'] == pytest.approx(
      model['impls']['jax_cbam']['trace_lower_s'] + model['impls']['jax_cbam']['xla_compile_s'])

  markdown = (tmp_path / 'results.md').read_text()
  assert 'Training-step compile time' in markdown
  assert '| 2x8x8x32 | forward |' in markdown
  assert 'Training step' in markdown and 'memory' in markdown and 'conv passes' in markdown
  assert 'Training step peak memory' in markdown
  assert 'NNX vs linen' in markdown
  assert results['module'][0]['floor_ms'] == saved['module'][0]['floor_ms']


def test_kernel_count_counts_fusions_library_calls_and_loop_bodies():
  def compiled_text(fn, *args):
    return jax.jit(fn).lower(*args).compile().as_text()

  x = jnp.ones((64, 64))
  # One elementwise chain: one fusion.
  assert benchmark.kernel_count(compiled_text(lambda a: jnp.sin(a) * 2 + 1, x)) == 1
  # A dot is a kernel of its own; the elementwise work around it fuses.
  assert benchmark.kernel_count(compiled_text(lambda a: jnp.tanh(a @ a) + 1, x)) == 2
  # The kernels of a loop's body (the dot, the tanh, the counter's add) and condition (the
  # compare) count, and the copies into the loop's state; the loop itself does not.
  loop = benchmark.kernel_count(compiled_text(
      lambda a: jax.lax.fori_loop(0, 3, lambda i, b: jnp.tanh(b @ a), a), x))
  assert loop >= 4


def test_bad_shape_is_rejected():
  with pytest.raises(SystemExit, match=r"--shape must be B,H,W,C with positive sizes, got '2,8,8'"):
    benchmark.main(['--shape', '2,8,8'])


@pytest.mark.parametrize('module, argv, message', [
    ('benchmark', ['--only', 'modules'], r'--only=modules: value should be one of <module\|'),
    ('benchmark', ['--repeats', '0'], r'--repeats=0: 0 is not a positive integer'),
    ('xla_flags', ['--flags', 'onednnn'], r'--flags=onednnn: value should be one of '),
    ('param_counts', ['--models', 'resnet20,resnet21'], r"unknown model 'resnet21' in --models"),
    ('param_counts', ['--attention', 'sse'], r"Unknown attention 'sse'"),
])
def test_bench_command_lines_reject_bad_values_in_one_line(module, argv, message):
  import importlib
  main = importlib.import_module(f'experiments.bench.{module}').main
  with pytest.raises(SystemExit, match=message) as error:
    main(argv)
  assert str(error.value).startswith(f'python -m experiments.bench.{module}: ')
  assert '\n' not in str(error.value)


def test_repeated_flags_collect_every_value():
  from experiments import cli
  from experiments.bench import xla_flags
  values, _ = cli.parse(['--only', 'module', '--only=nnx', '--shape', '1,2,2,8', '--model',
                          'resnet20'], benchmark.define_flags, prog='b', usage='')
  assert values.only == ['module', 'nnx'] and values.model == ['resnet20']
  assert values.shape == ['1,2,2,8'] and benchmark.parse_shape(values.shape[0]) == (1, 2, 2, 8)
  values, _ = cli.parse(['--flags', 'onednn', '--flags', 'fast_math', '--worker'],
                         xla_flags.define_flags, prog='x', usage='')
  assert values.flags == ['onednn', 'fast_math'] and values.worker and values.repeats == 10


def test_xla_flag_study_worker_environments():
  from experiments.bench import xla_flags as study
  caller = {'PATH': '/bin', 'XLA_FLAGS': '--xla_dump_to=/tmp/d',
            'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=1'}
  # The baseline runs without the caller's glibc tunables but keeps its XLA flags.
  assert study.worker_env('default', caller) == {'PATH': '/bin',
                                                 'XLA_FLAGS': '--xla_dump_to=/tmp/d'}
  assert study.worker_env('huge_pages', caller)['GLIBC_TUNABLES'] == 'glibc.malloc.hugetlb=1'
  onednn = study.worker_env('onednn', {'PATH': '/bin'})
  assert onednn == {'PATH': '/bin', 'XLA_FLAGS': '--xla_cpu_use_onednn=true'}


def test_every_xla_flag_set_names_flags_this_jaxlib_knows():
  import os
  import subprocess
  import sys

  from experiments.bench import xla_flags as study
  # XLA aborts the process on an unknown flag when the backend starts.
  flags = ' '.join(s['XLA_FLAGS'] for s in study.FLAG_SETS.values() if 'XLA_FLAGS' in s)
  process = subprocess.run([sys.executable, '-c', 'import jax; jax.devices()'],
                           env={**os.environ, 'XLA_FLAGS': flags, 'JAX_PLATFORMS': 'cpu'},
                           capture_output=True, text=True, timeout=120)
  assert process.returncode == 0, process.stderr[-2000:]


def test_xla_flag_table_cells():
  from experiments.bench.xla_flags import _cell
  assert _cell(2.5, 1.25) == '2.50 (2.00x)' and _cell(340.4, 340.4) == '340.4 (1.00x)'
  assert _cell(1352, 1439) == '1352 (0.94x)'
  assert _cell('3fa2', '3fa2') == 'same' and _cell('3fa2', '9b01') == 'differs'


class _FakeCuda:
  """The slice of ``torch.cuda`` the benchmark uses, counting synchronisations."""

  def __init__(self, available: bool):
    self.available, self.synchronized = available, 0

  def is_available(self) -> bool:
    return self.available

  def synchronize(self) -> None:
    self.synchronized += 1


def _fake_torch(cuda_available: bool):
  import types
  fake = types.SimpleNamespace(cuda=_FakeCuda(cuda_available), __version__='0.fake')
  fake.set_num_threads = lambda n: None
  return fake


@pytest.mark.parametrize('backend, cuda, expected', [
    ('cpu', False, 'cpu'), ('cpu', True, 'cpu'),  # JAX on CPU: torch on CPU, GPU or not.
    ('gpu', True, 'cuda'), ('rocm', True, 'cuda'),
    ('gpu', False, None),  # Never JAX on a GPU against torch on the CPU.
    ('tpu', True, None),
])
def test_torch_runs_on_the_same_kind_of_device_as_jax(backend, cuda, expected):
  assert benchmark.torch_device(_fake_torch(cuda), backend) == expected


def test_torch_columns_are_dropped_when_torch_cannot_use_jaxs_device(monkeypatch, capsys):
  monkeypatch.setitem(sys.modules, 'torch', _fake_torch(cuda_available=False))
  monkeypatch.setattr(benchmark.jax, 'default_backend', lambda: 'gpu')
  assert benchmark.torch_side() is None
  assert 'no gpu device' in capsys.readouterr().out


def test_torch_calls_on_a_gpu_block_until_the_work_is_done():
  fake = _fake_torch(cuda_available=True)
  calls = []
  on_gpu = benchmark.TorchSide(fake, 'cuda').blocking(lambda: calls.append(1) or 'out')
  assert on_gpu() == 'out' and on_gpu() == 'out'
  assert calls == [1, 1] and fake.cuda.synchronized == 2
  on_cpu = benchmark.TorchSide(fake, 'cpu').blocking(lambda: 'out')
  assert on_cpu() == 'out' and fake.cuda.synchronized == 2


def test_torch_step_peak_is_parameters_momentum_and_gradients():
  # A bias-free 1000x1000 Linear on one example: 4 MB of weights, 4 MB of momentum and the
  # step's 4 MB gradient; activations are a few KB.
  torch = pytest.importorskip('torch')
  layer = torch.nn.Linear(1000, 1000, bias=False)
  images, labels = torch.randn(1, 1000), torch.tensor([3])
  optimizer = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9)

  def step():
    optimizer.zero_grad(set_to_none=True)
    torch.nn.functional.cross_entropy(layer(images), labels).backward()
    optimizer.step()

  step()  # The momentum buffer exists from the first step on.
  optimizer.zero_grad(set_to_none=True)
  momentum = optimizer.state[layer.weight]['momentum_buffer']
  peak = benchmark.TorchSide(torch, 'cpu').step_peak_bytes(
      step, [layer.weight, momentum, images, labels])
  assert 3 * 4e6 <= peak < 3 * 4e6 + 1e5


@pytest.mark.slow
def test_models_time_one_jax_program_where_convs_materialise_nothing(monkeypatch):
  # What an accelerator looks like to the benchmark: MaterializedInputConv is nn.Conv.
  monkeypatch.setattr(benchmark_models, 'materializes_input', lambda: False)
  (row,) = benchmark.run_models(benchmark.TINY_MODEL_CASES, repeats=1)
  assert {'jax_plain', 'jax_cbam'} <= set(row['impls'])
  assert not any(name.startswith('jax_nn_conv') for name in row['impls'])
  assert row['jax_vs_nn_conv'] == {}
  markdown = benchmark.to_markdown({'environment': benchmark.environment(), 'models': [row]})
  model_line = next(line for line in markdown.splitlines() if line.startswith('| resnet20'))
  assert model_line.split(' | ')[4:6] == ['-', '-']  # The nn.Conv columns.


@pytest.mark.parametrize('name, fields', [
    ('resnext50_32x4d', {'stage_sizes': (1, 1, 1, 1)}),
    ('wide_resnet50_2', {'stage_sizes': (1, 1, 1, 1)}),
    ('mobilenet_v2', {}),
])
def test_torch_side_of_a_model_row_has_our_parameter_count(name, fields):
  # The PyTorch network a model row times is ours: same parameters, plain and with CBAM.
  pytest.importorskip('torch')
  for attention in (False, True):
    model = models.create_model(name, attention='cbam' if attention else None, **fields)
    variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    reference = benchmark_models.torch_model(name, fields, attention)
    assert sum(p.numel() for p in reference.parameters()) == models.count_params(variables)


def test_compiling_from_shapes_gives_the_same_program():
  # The compile section traces the step with jax.eval_shape'd arguments: nothing to initialise.
  texts = []
  for abstract in (False, True):
    step, args = benchmark.jax_model_setup('resnet_tiny', {}, 'cbam', 2, 8, abstract=abstract)
    assert all(isinstance(leaf, jax.ShapeDtypeStruct)
               for leaf in jax.tree.leaves(args)) == abstract
    compiled, _ = benchmark.compile_jax(step, args, donate=(0, 1, 2))
    # The instructions without their metadata (source file tables differ in order).
    texts.append([line.split(', metadata=')[0] for line in compiled.as_text().splitlines()
                  if ' = ' in line])
  assert texts[0] == texts[1]
