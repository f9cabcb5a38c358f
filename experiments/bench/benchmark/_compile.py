"""Compile rows: trace + lower and XLA compile of the training step, every attention, linen
and NNX, side by side."""


from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax

from experiments.bench.benchmark._harness import (
  CompileTimes,
  compile_jax,
  kernel_count,
)
from experiments.bench.benchmark._models import jax_model_setup
from experiments.bench.benchmark._nnx import nnx_setup, nnx_train_step

# ----------------------------------------------------------------------------------------------
# Compile time of the training step, for every attention, side by side.

# name, attention, attention_fields. 'cbam_xla_conv': CBAM with the lax.conv spatial conv
# (what 'auto' picks on GPU/TPU), to separate the shift conv's share from the rest.
COMPILE_ATTENTIONS = (('none', None, None), ('se', 'se', None), ('channel', 'channel', None),
                      ('spatial', 'spatial', None), ('cbam', 'cbam', None),
                      ('cbam_xla_conv', 'cbam', {'conv_impl': 'xla'}))
TINY_COMPILE_ATTENTIONS = (('none', None, None), ('cbam', 'cbam', None))
# NNX rows of the compile section: (name, attention).
NNX_COMPILE_ATTENTIONS = (('nnx_none', None), ('nnx_cbam', 'cbam'))


def _linen_compile(name, fields, attention, attention_fields, batch, size
                   ) -> tuple[CompileTimes, int]:
  model_fields = {**fields, 'attention_fields': attention_fields} if attention_fields else fields
  step, args = jax_model_setup(name, model_fields, attention, batch, size, abstract=True)
  compiled, times = compile_jax(step, args, donate=(0, 1, 2))
  return times, kernel_count(compiled.as_text())


def _nnx_compile(name, fields, attention, batch, size) -> tuple[CompileTimes, int]:
  from flax import nnx

  model, optimizer, images, labels = nnx_setup(name, fields, batch, size, attention,
                                              abstract=True)
  graphdef, state = nnx.split((model, optimizer))

  def functional_step(state, images, labels):
    model, optimizer = nnx.merge(graphdef, state)
    loss = nnx_train_step(model, optimizer, images, labels)
    return nnx.state((model, optimizer)), loss

  compiled, times = compile_jax(functional_step, [state, images, labels], donate=(0,))
  return times, kernel_count(compiled.as_text())


def run_compile(cases, rounds: int, attentions=COMPILE_ATTENTIONS,
                nnx_attentions=NNX_COMPILE_ATTENTIONS) -> list[dict[str, Any]]:
  """Trace + lower and XLA compile seconds of the SGD training step of every model with every
  attention, the fastest of ``rounds`` round-robin rounds (a program is compiled afresh each
  time: JAX's in-memory caches are cleared and the persistent cache is not used); also the
  XLA compile's CPU seconds (of that round) and the program's kernels
  (:func:`kernel_count`), whose number XLA:CPU's compile time follows."""
  rows = []
  for name, fields, batch, size in cases:
    compiles: dict[str, Callable[[], tuple[CompileTimes, int]]] = {
        label: functools.partial(_linen_compile, name, fields, attention, attention_fields,
                                 batch, size)
        for label, attention, attention_fields in attentions}
    compiles |= {label: functools.partial(_nnx_compile, name, fields, attention, batch, size)
                 for label, attention in nnx_attentions}
    best: dict[str, CompileTimes] = {}
    kernels: dict[str, int] = {}
    for _ in range(rounds):
      for label, compile_fn in compiles.items():
        jax.clear_caches()
        times, kernels[label] = compile_fn()
        if label not in best or times.total_s < best[label].total_s:
          best[label] = times
    impls = {label: {'trace_s': t.trace_s, 'lower_s': t.lower_s, 'xla_compile_s': t.xla_s,
                     'xla_compile_cpu_s': t.xla_cpu_s, 'total_s': t.total_s,
                     'kernels': kernels[label],
                     'xla_cpu_ms_per_kernel': 1e3 * t.xla_cpu_s / kernels[label]}
             for label, t in best.items()}
    for label, times in impls.items():
      base = impls['nnx_none' if label.startswith('nnx_') and 'nnx_none' in impls else 'none']
      times['vs_none'] = times['total_s'] / base['total_s']
      times['kernels_vs_none'] = times['kernels'] / base['kernels']
    rows.append({'model': name, 'fields': fields, 'batch': batch, 'image_size': size,
                 'rounds': rounds, 'impls': impls})
    print(f'{name} b{batch} {size}px compile: ' + ' | '.join(
        f'{k} {v["total_s"]:.1f} s ({v["vs_none"]:.2f}x), {v["kernels"]} kernels'
        for k, v in impls.items()),
        flush=True)
  return rows
