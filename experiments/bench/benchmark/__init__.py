"""CBAM speed and memory benchmarks, every comparison side by side in one run.

  python -m experiments.bench.benchmark                      # everything (~10 min on 2 cores)
  python -m experiments.bench.benchmark --only module        # module | models | memory | convs
  python -m experiments.bench.benchmark --only nnx           # NNX vs linen (not in the default run)
  python -m experiments.bench.benchmark --tiny --out /tmp/b  # CI: tiny shapes, seconds

Times are medians over ``--repeats`` calls after compilation, the implementations of a
row timed in interleaved rounds, each timed call after 25 ms of untimed calls of itself
(:mod:`experiments.bench.timing`, the harness of every benchmark script); compile time is
reported separately. Machines here are shared and noisy, so compare the ratios inside one
run rather than milliseconds across runs.

The same command runs on a GPU: JAX then uses it, and PyTorch runs on the same GPU (each
call followed by ``torch.cuda.synchronize``; cuDNN autotuning on; TF32 for float32 convs and
matmuls, as JAX does by default there), or not at all if its build has no CUDA: JAX on a
GPU is never compared with PyTorch on the CPU.

Module rows (``--only module``): the official CBAM (``CBAM(spatial_norm=True)``: channel
MLP with biases, reduction 16, 7x7 spatial conv + BatchNorm) is the headline; its forward
is timed in eval mode (running BatchNorm statistics, as at inference) and forward+backward
in train mode (batch statistics), the gradient taken w.r.t. the input and all parameters.
Against it, in the same run:

* ``floor``: twice one elementwise read+write pass over ``x`` (``x * 1.0001``). A CBAM
  forward must read ``x`` at least twice and write it once, so this is its memory floor.
* ``xla``: the same module with ``conv_impl='xla'`` (``lax.conv`` for the 7x7 conv, the
  numerical reference);
* ``paper``: the paper's CBAM (no BatchNorm, conv bias), fast path;
* ``naive``: a straightforward Flax CBAM (``nn.Dense`` MLP, ``nn.Conv`` 7x7 over the
  concatenated pools, ``nn.BatchNorm``), what one writes without care for speed;
* ``torch_cl`` / ``torch_nchw``: the official PyTorch module (see
  :mod:`torch_reference`) in channels_last and NCHW memory formats, with
  ``torch.set_num_threads`` equal to the CPU count. Forward under ``torch.no_grad``.

Model rows (``--only models``): one SGD+momentum training step (forward, cross-entropy,
backward, update) of CIFAR ResNet-20 (batch 128, 32x32) and ResNet-50 (batch 8, 224x224;
64 on an accelerator), each with and without CBAM in every block, JAX and PyTorch; and, only
when named with ``--model``, ResNeXt-50 32x4d, WideResNet-50-2 and MobileNetV2 (batch 4,
112x112; 64 at 224x224 on an accelerator; PyTorch: :mod:`torch_reference`'s
official CBAM ResNet with torchvision's groups and widths, and its MobileNetV2 with CBAM
where ours has it). On CPU
JAX runs twice: with the models' default conv (:class:`cbam_jax.conv.MaterializedInputConv`)
and with plain ``nn.Conv``, to show what materialising conv inputs buys; elsewhere the two
are the same program. Each row also has the step's peak memory (``peak_mb`` of every
implementation, a table of its own): JAX's from the compiled step's ``memory_analysis()``
(arguments + outputs + temporaries - aliased, as the memory rows below), PyTorch's as the
tensor bytes live between steps (parameters, buffers, momentum, the batch) plus the highest
running sum of allocations minus frees during one step: ``torch.profiler``'s memory events
on CPU, ``torch.cuda.max_memory_allocated`` on a GPU (:meth:`TorchSide.step_peak_bytes`).
Both count tensor bytes, not the process's resident memory. Memory rows (``--only
memory``): XLA's buffer assignment for the same training steps (``memory_analysis()`` of
the compiled step: arguments + outputs + temporaries - aliased, an upper bound of the peak;
XLA:CPU's own ``peak_memory_in_bytes`` only counts the arguments).

NNX rows (``--only nnx``, not part of the default run): the CBAM ResNet-20 training step
(batch 128) of :mod:`cbam_jax.nnx` (``nnx.Optimizer``), compiled with ``nnx.jit`` (NNX's
recommended API) and as ``nnx.split`` / ``jax.jit`` / ``nnx.merge`` (the functional
pattern, state donated), against the linen step of the models section, timed in the same
interleaved rounds; and the peak step memory of each (buffer assignment, as above).

Compile rows (``--only compile``, not part of the default run): trace + lower and XLA
compile seconds of each model's training step with every attention, linen and NNX, and the
kernels of each compiled program (:func:`kernel_count`), whose number XLA:CPU's compile time
follows.

Conv rows (``--only convs``): the forward, input gradient and kernel gradient of ResNet-20's
3x3 convs, each pass alone, JAX (NHWC) against torch channels-last: where XLA:CPU's
training step loses its time.
"""


from __future__ import annotations

import json
import os
import pathlib
import platform
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from absl import flags

from experiments import cli
from experiments.bench.benchmark._compile import (
    COMPILE_ATTENTIONS,
    TINY_COMPILE_ATTENTIONS,
    run_compile,
)
from experiments.bench.benchmark._convs import run_convs
from experiments.bench.benchmark._harness import (
    TORCH_THREADS,
    CompileTimes,
    TorchSide,
    compile_jax,
    jax_call,
    kernel_count,
    kernel_instructions,
    parse_shape,
    time_calls,
    torch_device,
    torch_side,
    usable_cpus,
)
from experiments.bench.benchmark._models import (
    jax_model_setup,
    run_memory,
    run_models,
    step_memory,
)
from experiments.bench.benchmark._module import (
    MODULE_SHAPES,
    TINY_MODULE_SHAPES,
    NaiveCBAM,
    run_module,
)
from experiments.bench.benchmark._nnx import NNX_CASES, TINY_NNX_CASES, run_nnx

__all__ = [
    'ACCELERATOR_EXTRA_MODEL_CASES',
    'ACCELERATOR_MODEL_CASES',
    'COMPILE_ATTENTIONS',
    'CONV_CASES',
    'CompileTimes',
    'EXTRA_MODEL_CASES',
    'EXTRA_SECTIONS',
    'MODEL_CASES',
    'MODULE_SHAPES',
    'NNX_CASES',
    'NaiveCBAM',
    'SECTIONS',
    'TINY_COMPILE_ATTENTIONS',
    'TINY_CONV_CASES',
    'TINY_MODEL_CASES',
    'TINY_MODULE_SHAPES',
    'TINY_NNX_CASES',
    'TorchSide',
    'compile_jax',
    'define_flags',
    'environment',
    'jax_call',
    'jax_model_setup',
    'kernel_count',
    'kernel_instructions',
    'main',
    'parse_shape',
    'run_compile',
    'run_convs',
    'run_memory',
    'run_models',
    'run_module',
    'run_nnx',
    'step_memory',
    'time_calls',
    'to_markdown',
    'torch_device',
    'torch_side',
]

PROG = 'python -m experiments.bench.benchmark'

SECTIONS = ('module', 'models', 'memory', 'convs')
# Sections run only when asked for with --only.
EXTRA_SECTIONS = ('nnx', 'compile')


# name, create_model fields, batch, image size. CPU: ResNet-50 at a small batch; on an
# accelerator the batch a GPU trains it at.
MODEL_CASES = (('resnet20', {}, 128, 32), ('resnet50', {}, 8, 224))
ACCELERATOR_MODEL_CASES = (('resnet20', {}, 128, 32), ('resnet50', {}, 64, 224))
# Run only when named with --model: on CPU each takes minutes (ResNeXt's grouped convs
# compile and run slowly in XLA:CPU), at batch 4 and 112x112 there.
EXTRA_MODEL_CASES = (('resnext50_32x4d', {}, 4, 112), ('wide_resnet50_2', {}, 4, 112),
                     ('mobilenet_v2', {}, 4, 112))
ACCELERATOR_EXTRA_MODEL_CASES = (('resnext50_32x4d', {}, 64, 224),
                                 ('wide_resnet50_2', {}, 64, 224), ('mobilenet_v2', {}, 64, 224))
TINY_MODEL_CASES = (('resnet20', {'stage_sizes': (1,)}, 2, 8),)

# The 3x3 convs of CIFAR ResNet-20 at batch 128, (B, H, W, C_in, C_out).
CONV_CASES = ((128, 32, 32, 16, 16), (128, 16, 16, 32, 32), (128, 8, 8, 64, 64))
TINY_CONV_CASES = ((2, 8, 8, 4, 4),)


def environment() -> dict[str, Any]:
  cpu = platform.processor() or platform.machine()
  try:
    lscpu = subprocess.run(['lscpu'], capture_output=True, text=True, check=False).stdout
    cpu = next((line.split(':', 1)[1].strip() for line in lscpu.splitlines()
                if line.startswith('Model name')), cpu)
  except OSError:
    pass
  side = torch_side()
  on_cuda = side is not None and side.device == 'cuda'
  return {
      'cpu': cpu, 'cpu_count': usable_cpus(), 'python': platform.python_version(),
      'jax': jax.__version__, 'backend': jax.default_backend(),
      'device': jax.devices()[0].device_kind,
      'torch': None if side is None else side.torch.__version__,
      'torch_device': None if side is None else side.device,
      'torch_device_name': side.torch.cuda.get_device_name() if on_cuda else None,
      'torch_threads': None if side is None else side.torch.get_num_threads(),
      'xla_flags': os.environ.get('XLA_FLAGS', ''),
      'glibc_tunables': os.environ.get('GLIBC_TUNABLES', ''),
      'command': 'python -m experiments.bench.benchmark ' + ' '.join(sys.argv[1:]),
  }


def _fmt(value: float | None, digits: int = 2) -> str:
  return '-' if value is None else f'{value:.{digits}f}'


def to_markdown(results: dict[str, Any]) -> str:
  env = results['environment']
  lines = [f'Command: `{env["command"]}`  ', f'CPU: {env["cpu"]} ({env["cpu_count"]} cores), '
           f'jax {env["jax"]}, torch {env["torch"] or "not installed or no matching device"}'
           + ('' if env['backend'] == 'cpu' else
              f'  \nDevice: {env["device"]} (JAX {env["backend"]}, torch '
              f'{env["torch_device_name"] or "-"}; float32 matmuls and convs in TF32 on both)'),
           '']
  if results.get('module'):
    lines += ['### CBAM module (official: spatial BN; forward eval, fwd+bwd train), ms', '',
              '| shape | mode | floor | cbam_jax | xla conv | paper | naive Flax | torch CL '
              '| torch NCHW | GB/s | vs floor | vs naive | vs torch CL | vs torch NCHW |',
              '|' + '---|' * 14]
    for row in results['module']:
      impls = row['impls']
      for mode in ('forward', 'fwd_bwd'):
        head = impls['cbam_jax'][mode]
        ms = lambda name, mode=mode, impls=impls: (
            impls[name][mode]['ms'] if name in impls else None)
        lines.append('| ' + ' | '.join([
            'x'.join(map(str, row['shape'])), mode, _fmt(row['floor_ms']),
            _fmt(ms('cbam_jax')), _fmt(ms('xla')), _fmt(ms('paper')), _fmt(ms('naive')),
            _fmt(ms('torch_cl')), _fmt(ms('torch_nchw')), _fmt(head['gb_per_s'], 1),
            _fmt(head['vs_floor']), _fmt(head.get('vs_naive')), _fmt(head.get('vs_torch_cl')),
            _fmt(head.get('vs_torch_nchw'))]) + ' |')
    lines.append('')
  if results.get('models'):
    lines += ['### Training step (SGD momentum), ms (images/s)', '',
              '| model | batch | JAX | JAX+CBAM | JAX nn.Conv | JAX nn.Conv+CBAM | torch CL '
              '| torch CL+CBAM | torch NCHW | torch NCHW+CBAM | CBAM overhead JAX '
              '| JAX/torch CL (plain) | JAX/torch CL (CBAM) | JAX compile s (plain / CBAM) |',
              '|' + '---|' * 14]
    for row in results['models']:
      impls = row['impls']
      cell = lambda name, impls=impls: (
          f'{impls[name]["ms"]:.1f} ({impls[name]["images_per_s"]:.0f})' if name in impls
          else '-')
      lines.append('| ' + ' | '.join([
          f'{row["model"]} {row["image_size"]}px', str(row['batch']), cell('jax_plain'),
          cell('jax_cbam'), cell('jax_nn_conv_plain'), cell('jax_nn_conv_cbam'),
          cell('torch_cl_plain'), cell('torch_cl_cbam'), cell('torch_nchw_plain'),
          cell('torch_nchw_cbam'), _fmt(row['cbam_overhead'].get('jax')),
          _fmt(row['jax_vs_torch'].get('cl_plain')), _fmt(row['jax_vs_torch'].get('cl_cbam')),
          f'{impls["jax_plain"]["compile_s"]:.1f} / {impls["jax_cbam"]["compile_s"]:.1f}'])
          + ' |')
    lines += ['', '### Training step peak memory, MB (JAX: XLA buffer assignment; torch: '
              'tensor bytes live at the step start + its peak allocations)', '',
              '| model | batch | JAX | JAX+CBAM | JAX nn.Conv | JAX nn.Conv+CBAM | torch CL '
              '| torch CL+CBAM | torch NCHW | torch NCHW+CBAM |', '|' + '---|' * 10]
    for row in results['models']:
      impls = row['impls']
      lines.append('| ' + ' | '.join(
          [f'{row["model"]} {row["image_size"]}px', str(row['batch'])] +
          [_fmt(impls[name]['peak_mb'], 1) if name in impls else '-'
           for name in ('jax_plain', 'jax_cbam', 'jax_nn_conv_plain', 'jax_nn_conv_cbam',
                        'torch_cl_plain', 'torch_cl_cbam', 'torch_nchw_plain',
                        'torch_nchw_cbam')]) + ' |')
    lines.append('')
  if results.get('compile'):
    labels = list(results['compile'][0]['impls'])
    lines += ['### Training-step compile time, s: trace+lower + XLA = total (x no attention)',
              '', '| model | batch | ' + ' | '.join(labels) + ' |',
              '|' + '---|' * (2 + len(labels))]
    for row in results['compile']:
      cells = [f'{v["trace_s"] + v["lower_s"]:.1f} + {v["xla_compile_s"]:.1f} = '
               f'{v["total_s"]:.1f} ({v["vs_none"]:.2f}x)' for v in row['impls'].values()]
      lines.append(f'| {row["model"]} {row["image_size"]}px | {row["batch"]} | ' +
                   ' | '.join(cells) + ' |')
    lines += ['', '### Kernels of the compiled training step (x no attention), and XLA compile '
              'CPU ms per kernel', '', '| model | batch | ' + ' | '.join(labels) + ' |',
              '|' + '---|' * (2 + len(labels))]
    for row in results['compile']:
      cells = [f'{v["kernels"]} ({v["kernels_vs_none"]:.2f}x), '
               f'{v["xla_cpu_ms_per_kernel"]:.1f} ms' for v in row['impls'].values()]
      lines.append(f'| {row["model"]} {row["image_size"]}px | {row["batch"]} | ' +
                   ' | '.join(cells) + ' |')
    lines.append('')
  if results.get('convs'):
    lines += ['### 3x3 conv passes (ResNet-20 shapes, NHWC / channels-last), ms', '',
              '| B,H,W,C_in,C_out | pass | JAX | torch CL | JAX/torch CL |',
              '|---|---|---|---|---|']
    for row in results['convs']:
      for conv_pass, values in row['passes'].items():
        lines.append(f'| {",".join(map(str, row["shape"]))} | {conv_pass} | '
                     f'{_fmt(values["jax"])} | {_fmt(values.get("torch_cl"))} | '
                     f'{_fmt(values.get("jax_vs_torch_cl"))} |')
    lines.append('')
  if results.get('nnx'):
    lines += ['### NNX vs linen: CBAM training step (SGD momentum), ms and peak MB', '',
              '| model | batch | linen | nnx.jit | split/jit/merge | nnx.jit / linen time '
              '| split / linen time | nnx.jit / linen memory | split / linen memory |',
              '|' + '---|' * 9]
    for row in results['nnx']:
      impls, ratios = row['impls'], row['vs_linen']
      cell = lambda name, impls=impls: f'{impls[name]["ms"]:.1f} ({impls[name]["peak_mb"]:.0f})'
      lines.append('| ' + ' | '.join([
          f'{row["model"]} {row["image_size"]}px', str(row['batch']), cell('linen'),
          cell('nnx_jit'), cell('nnx_split'), _fmt(ratios['nnx_jit']['time']),
          _fmt(ratios['nnx_split']['time']), _fmt(ratios['nnx_jit']['peak_memory'], 3),
          _fmt(ratios['nnx_split']['peak_memory'], 3)]) + ' |')
    lines.append('')
  if results.get('memory'):
    lines += ['### Training-step memory (XLA buffer assignment), MB', '',
              '| model | batch | peak | peak with CBAM | ratio |', '|---|---|---|---|---|']
    for row in results['memory']:
      lines.append(f'| {row["model"]} {row["image_size"]}px | {row["batch"]} | '
                   f'{row["plain"]["peak_mb"]:.0f} | {row["cbam"]["peak_mb"]:.0f} | '
                   f'{_fmt(row["cbam_ratio"])} |')
    lines.append('')
  return '\n'.join(lines)


def define_flags(values: flags.FlagValues) -> None:
  flags.DEFINE_boolean('tiny', False, 'Tiny shapes and models (CI).', flag_values=values)
  flags.DEFINE_string('out', None, 'Write results.json and results.md to this folder.',
                      flag_values=values)
  flags.DEFINE_multi_enum('only', None, SECTIONS + EXTRA_SECTIONS,
                          'Run only this section; default: all but '
                          f'{", ".join(EXTRA_SECTIONS)}.', flag_values=values)
  flags.DEFINE_integer('repeats', None, 'Timed calls per case (default 10, 2 with --tiny).',
                       lower_bound=1, flag_values=values)
  flags.DEFINE_integer('compile_rounds', 1, 'Compilations per program in the compile section '
                       '(the fastest is reported).', lower_bound=1, flag_values=values)
  flags.DEFINE_multi_string('shape', None, 'Module shape B,H,W,C; default: '
                            'the standard list.', flag_values=values)
  flags.DEFINE_multi_enum('model', None, [case[0] for case in MODEL_CASES + EXTRA_MODEL_CASES],
                          f'Only this model; {", ".join(c[0] for c in EXTRA_MODEL_CASES)} '
                          'run only when named.', flag_values=values)
  flags.register_validator('shape', lambda shapes: all(parse_shape(s) for s in shapes or ()),
                           flag_values=values)


@cli.command(PROG)
def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  """The command line (``argv`` without the program name; default ``sys.argv[1:]``);
  returns the results."""
  values, _ = cli.parse(argv, define_flags, prog=PROG, usage=__doc__)
  repeats = values.repeats or (2 if values.tiny else 10)  # lower_bound=1: never 0.
  sections = values.only or list(SECTIONS)
  module_shapes = (tuple(parse_shape(s) for s in values.shape) if values.shape else
                   TINY_MODULE_SHAPES if values.tiny else MODULE_SHAPES)
  on_cpu = jax.default_backend() == 'cpu'
  model_cases = (TINY_MODEL_CASES if values.tiny else
                 MODEL_CASES if on_cpu else ACCELERATOR_MODEL_CASES)
  if values.model:
    model_cases += () if values.tiny else (
        EXTRA_MODEL_CASES if on_cpu else ACCELERATOR_EXTRA_MODEL_CASES)
    model_cases = tuple(case for case in model_cases if case[0] in values.model)
  if values.tiny:
    # CI boxes are small and shared: oneDNN's spinning worker threads make tiny torch ops
    # 100x slower under load, and tiny mode checks the plumbing, not the speed.
    TORCH_THREADS[0] = 1

  results: dict[str, Any] = {'environment': environment(), 'tiny': values.tiny,
                             'repeats': repeats}
  if 'module' in sections:
    results['module'] = run_module(module_shapes, repeats, values.tiny)
  if 'models' in sections:
    results['models'] = run_models(model_cases, repeats)
  if 'convs' in sections:
    results['convs'] = run_convs(TINY_CONV_CASES if values.tiny else CONV_CASES, repeats)
  if 'memory' in sections:
    results['memory'] = run_memory(model_cases)
  if 'nnx' in sections:
    results['nnx'] = run_nnx(TINY_NNX_CASES if values.tiny else NNX_CASES, repeats)
  if 'compile' in sections:
    results['compile'] = run_compile(
        model_cases, values.compile_rounds,
        TINY_COMPILE_ATTENTIONS if values.tiny else COMPILE_ATTENTIONS)
  markdown = to_markdown(results)
  print(markdown)
  if values.out is not None:
    out = pathlib.Path(values.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / 'results.json').write_text(json.dumps(results, indent=2, default=_jsonable))
    (out / 'results.md').write_text(markdown)
  return results


def _jsonable(value: Any) -> Any:
  if isinstance(value, (np.generic,)):
    return value.item()
  if isinstance(value, tuple):
    return list(value)
  raise TypeError(f'not JSON serialisable: {type(value).__name__}')
