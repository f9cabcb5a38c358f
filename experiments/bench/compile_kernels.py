"""Where the kernels of a compiled training step come from, with and without attention.

  python -m experiments.bench.compile_kernels                      # resnet20, batch 128, CBAM
  python -m experiments.bench.compile_kernels --model resnet50 --batch 8 --image_size 224
  python -m experiments.bench.compile_kernels --attention se

XLA:CPU's compile time follows the number of kernels of the optimised program, a few ms of
CPU each (docs/performance.md, "Compile time"), so this compiles the benchmark's SGD
training step (:func:`experiments.bench.benchmark.jax_model_setup`) without attention and
with it, counts the kernels of each (:func:`experiments.bench.benchmark.kernel_instructions`)
and sorts them by origin, read from each instruction's ``op_name`` metadata: the attention's
channel and spatial branches and its gates, forward (``jvp``) and backward (``transpose``);
the optimizer's update; layout copies; and the rest of the network. Prints one table: the
kernels of each origin, without and with attention, and what the attention adds per module;
then the kernels of the parameter initialisation (``jax.jit(model.init)``), which the
trainer compiles before the step.
"""

from __future__ import annotations

import collections
import functools
import re
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from absl import flags

from cbam_jax import attention as attention_registry
from cbam_jax import models
from experiments import cli
from experiments.bench.benchmark import (
  compile_jax,
  jax_model_setup,
  kernel_count,
  kernel_instructions,
)

PROG = 'python -m experiments.bench.compile_kernels'

ORIGINS = ('attention: channel, forward', 'attention: channel, backward',
           'attention: spatial, forward', 'attention: spatial, backward',
           'attention: other, forward', 'attention: other, backward',
           'optimizer update', 'layout copies', 'rest of the network')


def kernel_origin(opcode: str, line: str) -> str:
  """One of :data:`ORIGINS` for a kernel of the training step, from its ``op_name``."""
  match = re.search(r'op_name="([^"]*)"', line)
  name = match.group(1) if match else ''
  if '/attention' in name:
    branch = ('channel' if 'channel' in name else 'spatial' if 'spatial' in name
              else 'other')
    return f'attention: {branch}, {"backward" if "transpose(" in name else "forward"}'
  if '/optimizer/' in name:
    return 'optimizer update'
  if opcode == 'copy':
    return 'layout copies'
  return 'rest of the network'


def kernel_origins(hlo_text: str) -> collections.Counter[str]:
  """Kernels of an optimised training step (``compiled.as_text()``) by :func:`kernel_origin`."""
  return collections.Counter(kernel_origin(opcode, line)
                             for opcode, line in kernel_instructions(hlo_text))


def compiled_step(model: str, attention: str | None, batch: int, image_size: int
                  ) -> tuple[str, float]:
  """The optimised HLO text of the training step and its XLA compile CPU seconds."""
  step, args = jax_model_setup(model, {}, attention, batch, image_size, abstract=True)
  compiled, times = compile_jax(step, args, donate=(0, 1, 2))
  return compiled.as_text(), times.xla_cpu_s


def compiled_init(model: str, attention: str | None, image_size: int) -> tuple[int, float]:
  """Kernels and XLA compile CPU seconds of ``jax.jit(model.init)`` at batch 1 (what the
  trainer compiles before the step), with JAX's default PRNG."""
  network = models.create_model(model, attention=attention)
  images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  compiled, times = compile_jax(functools.partial(network.init, train=False),
                                [jax.random.key(0), images])
  return kernel_count(compiled.as_text()), times.xla_cpu_s


def attention_modules(hlo_text: str) -> int:
  """How many attention modules the step has: distinct ``.../attention`` scopes."""
  return len(set(re.findall(r'op_name="[^"]*?/([\w.]+)/attention/', hlo_text)))


def table(model: str, attention: str, batch: int, image_size: int) -> str:
  plain_text, plain_s = compiled_step(model, None, batch, image_size)
  text, seconds = compiled_step(model, attention, batch, image_size)
  plain, with_attention = kernel_origins(plain_text), kernel_origins(text)
  modules = attention_modules(text)
  lines = [f'{model}, batch {batch}, {image_size}px, SGD training step: kernels by origin '
           f'({modules} {attention} modules)', '',
           f'| origin | none | {attention} | added per module |', '|---|---:|---:|---:|']
  for origin in ORIGINS:
    added = (with_attention[origin] - plain[origin]) / max(modules, 1)
    lines.append(f'| {origin} | {plain[origin]} | {with_attention[origin]} | {added:.1f} |')
  total, plain_total = sum(with_attention.values()), sum(plain.values())
  added = (total - plain_total) / max(modules, 1)
  lines += [f'| **all** | {plain_total} | {total} | {added:.1f} |',
            '', f'XLA compile, CPU seconds: none {plain_s:.2f} ({1e3 * plain_s / plain_total:.1f} '
            f'ms per kernel), {attention} {seconds:.2f} ({1e3 * seconds / total:.1f} ms per '
            f'kernel); kernels {total / plain_total:.2f}x, compile {seconds / plain_s:.2f}x.']
  (plain_init, plain_init_s), (init, init_s) = (compiled_init(model, a, image_size)
                                                for a in (None, attention))
  lines += ['', f'Initialisation, `jax.jit(model.init)` at batch 1: none {plain_init} kernels '
            f'({plain_init_s:.2f} s CPU), {attention} {init} kernels ({init_s:.2f} s CPU).']
  return '\n'.join(lines)


def check_model(name: str) -> None:
  """A UserError naming the valid models unless ``--model`` is one."""
  if name not in models.available_models():
    raise cli.UserError(
        f'unknown model {name!r} in --model.'
        f'{cli.did_you_mean(name, models.available_models(), "{!r}")} Valid: '
        f'{", ".join(models.available_models())}.')


def define_flags(values: flags.FlagValues) -> None:
  flags.DEFINE_string('model', 'resnet20', 'A name from cbam_jax.models.available_models().',
                      flag_values=values)
  flags.DEFINE_string('attention', 'cbam', 'A registered attention name.', flag_values=values)
  flags.DEFINE_integer('batch', 128, 'Batch size.', lower_bound=1, flag_values=values)
  flags.DEFINE_integer('image_size', 32, 'Image height and width.', lower_bound=8,
                       flag_values=values)


@cli.command(PROG)
def main(argv: Sequence[str] | None = None) -> str:
  """The command line (``argv`` without the program name; default ``sys.argv[1:]``); returns
  the table it prints."""
  values, _ = cli.parse(argv, define_flags, prog=PROG, usage=__doc__)
  check_model(values.model)
  if values.attention not in attention_registry.available():
    raise cli.UserError(
        f'unknown attention {values.attention!r} in --attention. Valid: '
        f'{", ".join(attention_registry.available())}.')
  text = table(values.model, values.attention, values.batch, values.image_size)
  print(text)
  return text


if __name__ == '__main__':
  main()
