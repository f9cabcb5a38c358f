"""Times the same programs under two checkouts of cbam_jax, interleaved, in one run.

``python -m experiments.bench.side_by_side --other /path/to/old/checkout [--rounds 15]``

A refactoring must keep the fast paths' speed, and this machine's speed drifts by tens of
percent between runs, so the two versions are compared in ONE run: two worker processes,
one per checkout (``PYTHONPATH``), each compiles every case once, then the driver asks
them in turn for one timed call of the same case, alternating which goes first, so that a
slow phase of a shared machine hits both. Only one worker computes at a time (the other
waits on its pipe). The cases use only API that every 0.x version has: ``cbam_jax.CBAM``
and ``cbam_jax.models.create_model``: the official CBAM module (spatial BatchNorm) forward
and forward + backward at the benchmark's module shapes, and a training step (SGD with
momentum) of ResNet-20 and ResNet-50, plain and with CBAM; and the same in NNX
(``cbam_jax.nnx.CBAM``, ``cbam_jax.nnx.create_model``) for the CBAM module at two shapes and
the ResNet-20 CBAM step. Prints, and writes with
``--out``, each case's median and fastest time per checkout and the ratio this / other,
and the same for the CPU time of the worker during the call (``time.process_time()``, all
its threads), which other processes on a loaded machine inflate far less than wall time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

# (name, kind, shape or (model, batch, size)); the module shapes are the benchmark's.
MODULE_SHAPES = ((32, 56, 56, 256), (32, 28, 28, 512), (32, 14, 14, 1024), (32, 7, 7, 2048),
                 (32, 56, 56, 64), (128, 32, 32, 16))
STEPS = (('resnet20', 128, 32), ('resnet50', 8, 224))
# NNX: the same CBAM module (forward + backward) at the smallest and largest shape, and the
# ResNet-20 CBAM step, through nnx.split / nnx.merge.
NNX_MODULE_SHAPES = ((32, 56, 56, 256), (128, 32, 32, 16))


def case_names(models_only: bool = False) -> list[str]:
  names = [] if models_only else [
      f'cbam {mode} {"x".join(map(str, shape))}' for shape in MODULE_SHAPES
      for mode in ('forward', 'fwd_bwd')]
  names += [f'step {model}{" cbam" if cbam else ""} b{batch}'
            for model, batch, _ in STEPS for cbam in (False, True)]
  if not models_only:
    names += [f'nnx cbam fwd_bwd {"x".join(map(str, shape))}' for shape in NNX_MODULE_SHAPES]
  return names + ['nnx step resnet20 cbam b128']


def _build_nnx(rest: list[str]):
  """The compiled, argument-bound call of an ``nnx ...`` case (worker side): one pure
  function of the split state that merges the module inside, as the benchmark's NNX rows."""
  import jax
  import jax.numpy as jnp
  import optax
  from flax import nnx

  import cbam_jax.nnx as cbam_nnx

  if rest[0] == 'cbam':
    shape = tuple(int(n) for n in rest[-1].split('x'))
    x = jax.random.normal(jax.random.key(0), shape)
    graphdef, state = nnx.split(cbam_nnx.CBAM(shape[-1], spatial_norm=True, rngs=nnx.Rngs(1)))

    def module_fwd_bwd(state, x):
      module = nnx.merge(graphdef, state)
      return nnx.grad(lambda m, x: jnp.sum(m(x) ** 2), argnums=(0, 1))(module, x)
    compiled = jax.jit(module_fwd_bwd).lower(state, x).compile()
    return lambda: compiled(state, x)
  model = cbam_nnx.create_model('resnet20', num_classes=10, attention='cbam',
                                rngs=nnx.Rngs(1))
  optimizer = nnx.Optimizer(model, optax.sgd(0.1, momentum=0.9), wrt=nnx.Param)
  graphdef, state = nnx.split((model, optimizer))
  images = jax.random.normal(jax.random.key(0), (128, 32, 32, 3))
  labels = jnp.arange(128) % 10

  def train_step(state, images, labels):
    model, optimizer = nnx.merge(graphdef, state)

    def loss_fn(model):
      return optax.softmax_cross_entropy_with_integer_labels(model(images), labels).mean()
    optimizer.update(model, nnx.grad(loss_fn)(model))
    return nnx.state((model, optimizer))

  compiled = jax.jit(train_step).lower(state, images, labels).compile()
  return lambda: compiled(state, images, labels)  # The same state each call: no donation.


def _build(name: str):
  """The compiled, argument-bound call of case ``name`` (worker side)."""
  import jax
  import jax.numpy as jnp
  import optax

  import cbam_jax

  kind, *rest = name.split()
  if kind == 'nnx':
    return _build_nnx(rest)
  if kind == 'cbam':
    mode, shape_text = rest
    shape = tuple(int(n) for n in shape_text.split('x'))
    x = jax.random.normal(jax.random.key(0), shape)
    module = cbam_jax.CBAM(spatial_norm=True)
    variables = module.init(jax.random.key(1), x)
    if mode == 'forward':
      fn = jax.jit(lambda v, x: module.apply(v, x))
    else:
      def loss(params, x):
        out, _ = module.apply({**variables, 'params': params}, x, train=True,
                              mutable=['batch_stats'])
        return jnp.sum(out * out)
      fn = jax.jit(jax.grad(loss, argnums=(0, 1)))
      variables = variables['params']
    compiled = fn.lower(variables, x).compile()
    return lambda: compiled(variables, x)
  model_name = rest[0]
  batch = int(rest[-1][1:])
  size = dict((m, s) for m, _, s in STEPS)[model_name]
  model = cbam_jax.models.create_model(model_name, num_classes=10 if size == 32 else 1000,
                                       attention='cbam' if 'cbam' in rest else None)
  images = jax.random.normal(jax.random.key(0), (batch, size, size, 3))
  labels = jnp.arange(batch) % 10
  variables = model.init(jax.random.key(1), images[:1], train=False)
  optimizer = optax.sgd(0.1, momentum=0.9)
  state = (variables['params'], variables['batch_stats'], optimizer.init(variables['params']))

  # Written here, not imported from experiments.bench.benchmark: the worker's PYTHONPATH is
  # the checkout under test, whose experiments/ may lack (or differ in) that harness.
  def step(state, images, labels):
    params, stats, opt_state = state

    def loss(params):
      logits, updates = model.apply({'params': params, 'batch_stats': stats}, images,
                                    train=True, mutable=['batch_stats'])
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), updates

    grads, updates = jax.grad(loss, has_aux=True)(params)
    updates_opt, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates_opt), updates['batch_stats'], opt_state

  compiled = jax.jit(step).lower(state, images, labels).compile()
  return lambda: compiled(state, images, labels)  # The same state each call: no donation.


def _worker() -> None:
  """Reads case names from stdin; ``build NAME`` compiles, ``time NAME`` answers the call's
  wall seconds and the CPU seconds of this process (all its threads) during it."""
  import jax

  calls = {}
  for line in sys.stdin:
    command, name = line.rstrip('\n').split(' ', 1)
    if command == 'build':
      calls[name] = _build(name)
      jax.block_until_ready(calls[name]())  # Warm: the first call allocates.
      print('ok', flush=True)
    else:
      start, start_cpu = time.perf_counter(), time.process_time()
      jax.block_until_ready(calls[name]())
      print(time.perf_counter() - start, time.process_time() - start_cpu, flush=True)


class _Worker:
  def __init__(self, root: Path, env: dict[str, str]):
    self.root = root
    self.process = subprocess.Popen(
        [sys.executable, __file__, '--worker'], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        text=True, env={**env, 'PYTHONPATH': str(root)}, cwd=root)

  def ask(self, command: str, name: str) -> str:
    assert self.process.stdin and self.process.stdout
    self.process.stdin.write(f'{command} {name}\n')
    self.process.stdin.flush()
    answer = self.process.stdout.readline().strip()
    if not answer:
      raise RuntimeError(f'The worker for {self.root} stopped at {command} {name!r}.')
    return answer

  def close(self) -> None:
    assert self.process.stdin
    self.process.stdin.close()
    self.process.wait()


def main(argv: list[str]) -> None:
  import argparse
  import statistics

  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--other', required=True, type=Path,
                      help='another checkout of this repository (e.g. a git worktree)')
  parser.add_argument('--rounds', type=int, default=15)
  parser.add_argument('--models_only', action='store_true')
  parser.add_argument('--only', action='append', help='run only cases containing this text')
  parser.add_argument('--out', type=Path, help='write the results as JSON here')
  args = parser.parse_args(argv)
  if not (args.other / 'cbam_jax' / '__init__.py').is_file():
    sys.exit(f'error: --other {args.other} is not a checkout of cbam_jax (no '
             'cbam_jax/__init__.py there); make one with `git worktree add --detach DIR COMMIT`.')
  this = Path(__file__).resolve().parents[2]
  from experiments import perf

  env = {**os.environ, **perf.cpu_env_updates(),
         'JAX_ENABLE_COMPILATION_CACHE': 'false'}
  workers = {'this': _Worker(this, env), 'other': _Worker(args.other.resolve(), env)}
  names = [name for name in case_names(args.models_only)
           if not args.only or any(text in name for text in args.only)]
  results = {}
  try:
    for name in names:
      for worker in workers.values():
        worker.ask('build', name)
      times: dict[str, list[float]] = {'this': [], 'other': []}
      cpu_times: dict[str, list[float]] = {'this': [], 'other': []}
      for round_index in range(args.rounds):
        order = ('this', 'other') if round_index % 2 == 0 else ('other', 'this')
        for label in order:
          wall, cpu = workers[label].ask('time', name).split()
          times[label].append(float(wall))
          cpu_times[label].append(float(cpu))
      row: dict[str, Any] = {
          label: {'median_ms': 1e3 * statistics.median(t), 'min_ms': 1e3 * min(t),
                  'cpu_median_ms': 1e3 * statistics.median(cpu_times[label])}
          for label, t in times.items()}
      for key in ('median_ms', 'min_ms', 'cpu_median_ms'):
        row[f'ratio_{key[:-3]}'] = row['this'][key] / row['other'][key]
      results[name] = row
      print(f'{name}: this {row["this"]["median_ms"]:.2f} ms (fastest '
            f'{row["this"]["min_ms"]:.2f}), other {row["other"]["median_ms"]:.2f} ms (fastest '
            f'{row["other"]["min_ms"]:.2f}); this/other {row["ratio_median"]:.3f} median, '
            f'{row["ratio_min"]:.3f} fastest, {row["ratio_cpu_median"]:.3f} CPU time '
            '(median)', flush=True)
  finally:
    for worker in workers.values():
      worker.close()
  if args.out:
    args.out.write_text(json.dumps({'rounds': args.rounds, 'other': str(args.other),
                                    'cases': results}, indent=1))


if __name__ == '__main__':
  if sys.argv[1:] == ['--worker']:
    _worker()
  else:
    main(sys.argv[1:])
