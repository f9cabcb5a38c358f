"""Which XLA:CPU flags and process settings speed up convolution-heavy training? Side by side.

  python -m experiments.bench.xla_flags [--tiny] [--out DIR] [--flags NAME --flags NAME ...]

Every setting runs in a fresh subprocess (XLA reads ``XLA_FLAGS`` once, when the backend
starts, and glibc its ``GLIBC_TUNABLES`` when the process starts; ``default`` runs with
neither, whatever this process has) and times the same workloads: a ResNet-20 style 3x3
convolution forward+backward in NHWC and NCHW, the CBAM 7x7 2->1 convolution through
``lax.conv``, the CBAM module forward+backward and a CIFAR ResNet-20 (+CBAM) training step.
The numbers of every setting are divided by those of the default set measured in the same run.
The two training steps also report their XLA compile (CPU seconds, ``_compile_cpu_s``) and
kernels (``_kernels``), and the CBAM step a digest of its outputs (``_result``), which the
table marks ``same`` or ``differs`` against the default's: a flag that changes it changes
the numbers.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
from collections.abc import Sequence

from absl import flags

from experiments import cli
from experiments.bench import timing

PROG = 'python -m experiments.bench.xla_flags'

# name -> environment of the worker. XLA_FLAGS is appended to the caller's own.
FLAG_SETS = {
    'default': {},
    'onednn': {'XLA_FLAGS': '--xla_cpu_use_onednn=true'},
    'onednn_fusions': {'XLA_FLAGS': '--xla_cpu_use_onednn=true '
                                    '--xla_cpu_experimental_onednn_fusion_type=dot,eltwise,reduce'},
    'no_xnnpack': {'XLA_FLAGS': '--xla_cpu_use_xnnpack=false'},
    'xnn_graph_greedy': {
        'XLA_FLAGS': '--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY'},
    # YNNPACK runs XLA:CPU's reductions and dots by default; these move its boundary.
    'ynn_no_reduce': {'XLA_FLAGS': '--xla_cpu_experimental_ynn_fusion_type=-reduce'},
    'ynn_convolution': {
        'XLA_FLAGS': '--xla_cpu_experimental_ynn_fusion_type=+individual_convolution'},
    'vector_512': {'XLA_FLAGS': '--xla_cpu_prefer_vector_width=512'},
    'eigen_single_thread': {'XLA_FLAGS': '--xla_cpu_multi_thread_eigen=false'},
    'fast_math': {'XLA_FLAGS': '--xla_cpu_enable_fast_math=true'},
    # Flags that might compile faster (docs/performance.md, "Compile time").
    'fast_compile_preset': {'XLA_FLAGS': '--xla_cpu_opt_preset=CPU_OPT_PRESET_FAST_COMPILE'},
    'region_copy_insertion': {'XLA_FLAGS': '--xla_cpu_copy_insertion_use_region_analysis=true'},
    'no_fusion_emitters': {'XLA_FLAGS': '--xla_cpu_use_fusion_emitters=false'},
    'one_codegen_part': {'XLA_FLAGS': '--xla_cpu_parallel_codegen_split_count=1'},
    # Transparent huge pages for malloc: what experiments.perf.reexec_with_cpu_env sets.
    'huge_pages': {'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=1'},
}


def worker_env(name: str, environ: dict[str, str]) -> dict[str, str]:
  """The environment of setting ``name``'s worker, given the caller's ``environ``."""
  settings = FLAG_SETS[name]
  env = {k: v for k, v in environ.items() if k not in ('GLIBC_TUNABLES', 'XLA_FLAGS')}
  env.update({k: v for k, v in settings.items() if k != 'XLA_FLAGS'})
  flags = f'{environ.get("XLA_FLAGS", "")} {settings.get("XLA_FLAGS", "")}'.strip()
  if flags:
    env['XLA_FLAGS'] = flags
  return env


def _label(name: str) -> str:
  settings = FLAG_SETS[name]
  return ' '.join(f'{k}={v}' if k != 'XLA_FLAGS' else v for k, v in settings.items()) or '(none)'


def _worker(tiny: bool, repeats: int) -> dict[str, float | int | str]:
  import hashlib
  import time

  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  from jax import lax

  from cbam_jax import models
  from cbam_jax.attention.cbam import CBAM
  from experiments.bench.benchmark import kernel_count

  compiles: dict[str, float | int | str] = {}

  def blocking_call(fn, *args, record: str | None = None):
    lowered = jax.jit(fn).lower(*args)
    start = time.process_time()
    compiled = lowered.compile()
    if record:
      compiles[f'{record}_compile_cpu_s'] = time.process_time() - start
      compiles[f'{record}_kernels'] = kernel_count(compiled.as_text())
    return lambda: jax.block_until_ready(compiled(*args))

  key = jax.random.PRNGKey(0)
  batch, size, width = (8, 16, 16) if tiny else (128, 32, 16)
  calls = {}

  x = jax.random.normal(key, (batch, size, size, width))
  w = jax.random.normal(key, (3, 3, width, width)) * 0.1
  for layout, (lhs, rhs) in {'nhwc': ('NHWC', 'HWIO'), 'nchw': ('NCHW', 'OIHW')}.items():
    xs = x if layout == 'nhwc' else jnp.transpose(x, (0, 3, 1, 2))
    ws = w if layout == 'nhwc' else jnp.transpose(w, (3, 2, 0, 1))

    def conv_loss(xs, ws, lhs=lhs, rhs=rhs):
      out = lax.conv_general_dilated(xs, ws, (1, 1), 'SAME', dimension_numbers=(lhs, rhs, lhs))
      return jnp.sum(out * out)

    calls[f'conv3x3_fwd_bwd_{layout}'] = blocking_call(
        jax.grad(conv_loss, argnums=(0, 1)), xs, ws)

  cbam_shape = (2, 16, 16, 32) if tiny else (32, 56, 56, 64)
  pooled = jax.random.normal(key, (*cbam_shape[:3], 2))
  kernel = jax.random.normal(key, (7, 7, 2, 1))
  conv7 = lambda p, k: lax.conv_general_dilated(p, k, (1, 1), 'SAME',
                                                dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  calls['conv7x7_2to1_fwd'] = blocking_call(conv7, pooled, kernel)

  xc = jax.random.normal(key, cbam_shape)
  for impl in ('xla', 'shift'):
    module = CBAM(spatial_norm=True, conv_impl=impl)
    variables = module.init(key, xc)

    def module_loss(params, x, module=module, variables=variables):
      out, _ = module.apply({**variables, 'params': params}, x, train=True,
                            mutable=['batch_stats'])
      return jnp.sum(out * out)

    calls[f'cbam_{impl}_fwd_bwd'] = blocking_call(
        jax.grad(module_loss, argnums=(0, 1)), variables['params'], xc)

  for attention in (None, 'cbam'):
    fields = {'stage_sizes': (1, 1, 1)} if tiny else {}
    model = models.create_model('resnet20', attention=attention, **fields)
    images = jax.random.normal(key, (batch, size, size, 3))
    labels = jnp.zeros((batch,), jnp.int32)
    variables = model.init(key, images[:1])
    optimizer = optax.sgd(0.1, momentum=0.9)

    def step(params, stats, opt_state, model=model, images=images, labels=labels,
             optimizer=optimizer):
      def loss_fn(params):
        logits, updates = model.apply({'params': params, 'batch_stats': stats}, images,
                                      train=True, mutable=['batch_stats'])
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), updates
      grads, updates = jax.grad(loss_fn, has_aux=True)(params)
      new_updates, opt_state = optimizer.update(grads, opt_state, params)
      return optax.apply_updates(params, new_updates), updates, opt_state

    params = variables['params']
    name = f'resnet20_{attention or "plain"}_step'
    calls[name] = blocking_call(step, params, variables['batch_stats'],
                                optimizer.init(params), record=name)
  outputs = jax.tree_util.tree_leaves(calls['resnet20_cbam_step']())
  compiles['resnet20_cbam_step_result'] = hashlib.sha256(
      b''.join(np.asarray(leaf).tobytes() for leaf in outputs)).hexdigest()[:12]
  # The workloads of one setting in interleaved rounds; settings are compared by their
  # ratios to the default's (another process, so not interleaved with it).
  return {**timing.interleaved_median_ms(calls, repeats), **compiles}


def _cell(value: float | int | str, base: float | int | str) -> str:
  """A table cell: a number and its ratio to the default's, or whether a digest is the same."""
  if isinstance(value, str):
    return 'same' if value == base else 'differs'
  number = str(value) if isinstance(value, int) else f'{value:.{2 if value < 10 else 1}f}'
  return f'{number} ({value / base:.2f}x)'  # type: ignore[operator]


def define_flags(values: flags.FlagValues) -> None:
  flags.DEFINE_boolean('tiny', False, 'Tiny workloads (CI).', flag_values=values)
  flags.DEFINE_integer('repeats', 10, 'Timed rounds per workload.', lower_bound=1,
                       flag_values=values)
  flags.DEFINE_string('out', None, 'Write xla_flags.json and xla_flags.md to this folder.',
                      flag_values=values)
  flags.DEFINE_multi_enum('flags', None, list(FLAG_SETS), 'Only this flag set (default: all; '
                          'default always runs, the baseline).', flag_values=values)
  flags.DEFINE_boolean('worker', False, 'Internal: time the workloads in this process and '
                       'print them as JSON (what each setting\'s subprocess runs).',
                       flag_values=values)


@cli.command(PROG)
def main(argv: Sequence[str] | None = None) -> dict:
  """The command line (``argv`` without the program name; default ``sys.argv[1:]``);
  returns the times of each flag set."""
  values, _ = cli.parse(argv, define_flags, prog=PROG, usage=__doc__)
  if values.worker:
    print(json.dumps(_worker(values.tiny, values.repeats)))
    return {}

  results = {}
  names = list(dict.fromkeys(['default', *(values.flags or FLAG_SETS)]))  # The baseline first.
  for name in names:
    env = worker_env(name, dict(os.environ))
    command = [sys.executable, '-m', 'experiments.bench.xla_flags', '--worker',
               '--repeats', str(values.repeats)] + (['--tiny'] if values.tiny else [])
    proc = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
      results[name] = {'error': proc.stderr.strip().splitlines()[-1:]}
    else:
      results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    print(name, results[name], flush=True)

  base = results.get('default', {})
  lines = ['| flags | ' + ' | '.join(base) + ' |', '|---|' + '---|' * len(base)]
  for name, row in results.items():
    if 'error' in row:
      lines.append(f'| {name} | error: {row["error"]} |')
      continue
    cells = [_cell(row[k], base[k]) if k in row else '-' for k in base]
    lines.append(f'| `{_label(name)}` | ' + ' | '.join(cells) + ' |')
  table = '\n'.join(lines)
  print(table)
  if values.out:
    out = pathlib.Path(values.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / 'xla_flags.json').write_text(json.dumps(results, indent=2))
    (out / 'xla_flags.md').write_text(table + '\n')
  return results


if __name__ == '__main__':
  main()
