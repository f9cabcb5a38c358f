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
  :mod:`experiments.bench.torch_reference`) in channels_last and NCHW memory formats, with
  ``torch.set_num_threads`` equal to the CPU count. Forward under ``torch.no_grad``.

Model rows (``--only models``): one SGD+momentum training step (forward, cross-entropy,
backward, update) of CIFAR ResNet-20 (batch 128, 32x32) and ResNet-50 (batch 8, 224x224;
64 on an accelerator), each with and without CBAM in every block, JAX and PyTorch. On CPU
JAX runs twice: with the models' default conv (:class:`cbam_jax.conv.MaterializedInputConv`)
and with plain ``nn.Conv``, to show what materialising conv inputs buys; elsewhere the two
are the same program. Memory rows (``--only
memory``): XLA's buffer assignment for the same training steps (``memory_analysis()`` of
the compiled step: arguments + outputs + temporaries - aliased, an upper bound of the peak;
XLA:CPU's own ``peak_memory_in_bytes`` only counts the arguments).

NNX rows (``--only nnx``, not part of the default run): the CBAM ResNet-20 training step
(batch 128) of :mod:`cbam_jax.nnx` (``nnx.Optimizer``), compiled with ``nnx.jit`` (NNX's
recommended API) and as ``nnx.split`` / ``jax.jit`` / ``nnx.merge`` (the functional
pattern, state donated), against the linen step of the models section, timed in the same
interleaved rounds; and the peak step memory of each (buffer assignment, as above).

Conv rows (``--only convs``): the forward, input gradient and kernel gradient of ResNet-20's
3x3 convs, each pass alone, JAX (NHWC) against torch channels-last: where XLA:CPU's
training step loses its time.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import flags

from cbam_jax import models
from cbam_jax.attention.cbam import CBAM
from cbam_jax.conv import materializes_input
from experiments import cli
from experiments.bench import timing

PROG = 'python -m experiments.bench.benchmark'

SECTIONS = ('module', 'models', 'memory', 'convs')
# Sections run only when asked for with --only.
EXTRA_SECTIONS = ('nnx', 'compile')

MODULE_SHAPES = ((32, 56, 56, 256), (32, 28, 28, 512), (32, 14, 14, 1024), (32, 7, 7, 2048),
                 (32, 56, 56, 64), (128, 32, 32, 16))
TINY_MODULE_SHAPES = ((2, 8, 8, 32),)

# name, create_model fields, batch, image size. CPU: ResNet-50 at a small batch; on an
# accelerator the batch a GPU trains it at.
MODEL_CASES = (('resnet20', {}, 128, 32), ('resnet50', {}, 8, 224))
ACCELERATOR_MODEL_CASES = (('resnet20', {}, 128, 32), ('resnet50', {}, 64, 224))
TINY_MODEL_CASES = (('resnet20', {'stage_sizes': (1,)}, 2, 8),)

# The 3x3 convs of CIFAR ResNet-20 at batch 128, (B, H, W, C_in, C_out).
CONV_CASES = ((128, 32, 32, 16, 16), (128, 16, 16, 32, 32), (128, 8, 8, 64, 64))
TINY_CONV_CASES = ((2, 8, 8, 4, 4),)


class NaiveCBAM(nn.Module):
  """CBAM as one would first write it in Flax: Dense layers and ``nn.Conv`` on the pools."""

  reduction_ratio: int = 16
  kernel_size: int = 7

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    channels = x.shape[-1]
    hidden = max(1, channels // self.reduction_ratio)
    fc1, fc2 = nn.Dense(hidden, name='fc1'), nn.Dense(channels, name='fc2')
    mlp = lambda v: fc2(nn.relu(fc1(v)))
    channel_map = nn.sigmoid(mlp(jnp.mean(x, axis=(1, 2))) + mlp(jnp.max(x, axis=(1, 2))))
    x = x * channel_map[:, None, None, :]
    pooled = jnp.concatenate([jnp.mean(x, axis=-1, keepdims=True),
                              jnp.max(x, axis=-1, keepdims=True)], axis=-1)
    logits = nn.Conv(1, (self.kernel_size,) * 2, padding='SAME', use_bias=False,
                     name='conv')(pooled)
    logits = nn.BatchNorm(use_running_average=not train, momentum=0.99, name='norm')(logits)
    return x * nn.sigmoid(logits)


# ----------------------------------------------------------------------------------------------
# Timing.


# Compiled training steps, shared by the models and memory sections of one run.
_COMPILED: dict[Any, Any] = {}


class CompileTimes(NamedTuple):
  """Seconds to build one program: JAX's trace and lowering to StableHLO, then XLA."""

  trace_s: float
  lower_s: float
  xla_s: float

  @property
  def total_s(self) -> float:
    return self.trace_s + self.lower_s + self.xla_s


_NOT_COMPILED = CompileTimes(0.0, 0.0, 0.0)


def compile_jax(fn: Callable[..., Any], args: Sequence[Any], donate: Sequence[int] = (),
                cache_key: Any = None) -> tuple[Any, CompileTimes]:
  """``jit(fn).trace(*args).lower().compile()`` and the seconds of each stage (zeros when
  already compiled in this run)."""
  if cache_key is not None and cache_key in _COMPILED:
    return _COMPILED[cache_key], _NOT_COMPILED
  start = time.perf_counter()
  traced = jax.jit(fn, donate_argnums=tuple(donate)).trace(*args)
  traced_at = time.perf_counter()
  lowered = traced.lower()
  lowered_at = time.perf_counter()
  compiled = lowered.compile()
  times = CompileTimes(traced_at - start, lowered_at - traced_at,
                       time.perf_counter() - lowered_at)
  if cache_key is not None:
    _COMPILED[cache_key] = compiled
  return compiled, times


def jax_call(fn: Callable[..., Any], args: Sequence[Any], donate: Sequence[int] = (),
             cache_key: Any = None) -> tuple[Callable[[], Any], CompileTimes]:
  """A blocking call of compiled ``jit(fn)(*args)`` and its compile seconds."""
  compiled, compile_s = compile_jax(fn, args, donate, cache_key)
  state = list(args)

  def call():
    out = compiled(*state)
    # Donated buffers are consumed: thread the outputs back in (a training loop's shape).
    for index, value in zip(donate, out, strict=False):
      state[index] = value
    return jax.block_until_ready(out)

  return call, compile_s


def time_calls(jax_calls: dict[str, tuple[Callable[[], Any], CompileTimes]],
               torch_calls: dict[str, Callable[[], Any]], repeats: int) -> dict[str, dict]:
  """``{'ms' (median), 'min_ms', 'compile_s'}`` per name, all timed in one interleaved loop;
  JAX's also ``trace_lower_s`` and ``xla_compile_s``, the two parts of ``compile_s``."""
  calls = {name: call for name, (call, _) in jax_calls.items()} | torch_calls
  times = timing.interleaved_times(calls, repeats)
  medians, fastest = timing.median_ms(times), timing.min_ms(times)
  compiles = {name: _compile_fields(seconds) for name, (_, seconds) in jax_calls.items()}
  return {name: {'ms': ms, 'min_ms': fastest[name], 'compile_s': 0.0, **compiles.get(name, {})}
          for name, ms in medians.items()}


def _compile_fields(times: CompileTimes) -> dict[str, float]:
  return {'compile_s': times.total_s, 'trace_lower_s': times.trace_s + times.lower_s,
          'xla_compile_s': times.xla_s}


def _usable_cpus() -> int:
  """CPUs this process may run on (``taskset`` aware), what XLA's thread pool uses."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # Not on Linux.
    return os.cpu_count() or 1


_TORCH_THREADS = [_usable_cpus()]


def torch_device(torch: Any, backend: str) -> str | None:
  """The torch device that runs beside JAX's ``backend``, or ``None`` if torch has none.

  Only the same kind of chip is a fair comparison: JAX on a GPU is never timed against
  PyTorch on the CPU.
  """
  if backend == 'cpu':
    return 'cpu'
  if backend in ('gpu', 'cuda', 'rocm') and torch.cuda.is_available():
    return 'cuda'  # ROCm builds of torch call their GPUs 'cuda' too.
  return None


class TorchSide:
  """PyTorch on the device beside JAX's: where to put tensors and how to block on them."""

  def __init__(self, torch: Any, device: str):
    self.torch, self.device = torch, device

  def blocking(self, call: Callable[[], Any]) -> Callable[[], Any]:
    """``call`` that returns only once its GPU work is done (CUDA launches are async)."""
    if self.device == 'cpu':
      return call
    synchronize = self.torch.cuda.synchronize

    def blocking_call():
      out = call()
      synchronize()
      return out

    return blocking_call


def _torch() -> TorchSide | None:
  """PyTorch set up for the comparison, or ``None`` (not installed, or no matching device)."""
  try:
    import torch
  except ImportError:
    return None
  device = torch_device(torch, jax.default_backend())
  if device is None:
    print(f'PyTorch has no {jax.default_backend()} device: its columns are left out.',
          flush=True)
    return None
  if device == 'cpu':
    torch.set_num_threads(_TORCH_THREADS[0])
  else:
    # What a speed-minded PyTorch user sets, and JAX's float32 default on these GPUs: TF32
    # tensor cores for convolutions (cuDNN's default) and matmuls (torch's is full float32).
    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.allow_tf32 = True
    torch.set_float32_matmul_precision('high')
  return TorchSide(torch, device)


def _shape(text: str) -> tuple[int, ...]:
  """``'B,H,W,C'`` as a tuple of 4 positive ints.

  Raises:
    flags.ValidationError: anything else.
  """
  try:
    shape = tuple(int(part) for part in text.split(','))
  except ValueError:
    raise flags.ValidationError(f'--shape must be comma-separated ints, got {text!r}') from None
  if len(shape) != 4 or min(shape) < 1:
    raise flags.ValidationError(f'--shape must be B,H,W,C with positive sizes, got {text!r}')
  return shape


# ----------------------------------------------------------------------------------------------
# Module benchmark.


def _jax_module_cases(x: jax.Array, key: jax.Array,
                      tiny: bool) -> dict[str, tuple[nn.Module, Any]]:
  cases = {'cbam_jax': CBAM(spatial_norm=True), 'naive': NaiveCBAM()}
  if not tiny:  # Each case is two compilations; CI checks the plumbing with two.
    cases['xla'] = CBAM(spatial_norm=True, conv_impl='xla')
    cases['paper'] = CBAM()
  return {name: (module, module.init(key, x)) for name, module in cases.items()}


def _forward_fn(module: nn.Module) -> Callable[..., jax.Array]:
  return lambda variables, x: module.apply(variables, x, train=False)


def _fwd_bwd_fn(module: nn.Module) -> Callable[..., Any]:
  def loss(params, other, x, cotangent):
    out, updates = module.apply({'params': params, **other}, x, train=True,
                                mutable=['batch_stats'])
    return jnp.vdot(out, cotangent), updates

  def step(variables, x, cotangent):
    params = variables['params']
    other = {k: v for k, v in variables.items() if k != 'params'}
    (_, updates), grads = jax.value_and_grad(loss, argnums=(0, 2), has_aux=True)(
        params, other, x, cotangent)
    return grads, updates

  return step


def _torch_module_calls(side: TorchSide,
                        shape: Sequence[int]) -> dict[str, Callable[[], Any]]:
  from experiments.bench import torch_reference
  torch, device = side.torch, side.device
  batch, height, width, channels = shape
  calls = {}
  for name, memory_format in (('torch_cl', torch.channels_last),
                              ('torch_nchw', torch.contiguous_format)):
    # One module in eval mode for the forward, one in train mode for fwd+bwd: the calls
    # are interleaved, so neither may switch the other's mode.
    eval_module = torch_reference.OfficialCBAM(channels).to(
        device, memory_format=memory_format).eval()
    train_module = torch_reference.OfficialCBAM(channels).to(
        device, memory_format=memory_format).train()
    x = torch.randn(batch, channels, height, width, device=device).contiguous(
        memory_format=memory_format)
    cotangent = torch.randn_like(x)
    x_grad = x.clone().requires_grad_(True)

    def forward(module=eval_module, x=x):
      with torch.no_grad():
        return module(x)

    def fwd_bwd(module=train_module, x_grad=x_grad, cotangent=cotangent):
      module.zero_grad(set_to_none=True)
      x_grad.grad = None
      module(x_grad).backward(cotangent)

    calls[f'{name}/forward'] = side.blocking(forward)
    calls[f'{name}/fwd_bwd'] = side.blocking(fwd_bwd)
  return calls


def run_module(shapes: Sequence[Sequence[int]], repeats: int,
               tiny: bool = False) -> list[dict[str, Any]]:
  side = _torch()
  rows = []
  for shape in shapes:
    key = jax.random.PRNGKey(0)
    x = jax.random.normal(key, shape, jnp.float32)
    cotangent = jax.random.normal(jax.random.PRNGKey(1), shape, jnp.float32)
    jax_calls = {'floor': jax_call(lambda x: x * 1.0001, [x])}
    for name, (module, variables) in _jax_module_cases(x, key, tiny).items():
      jax_calls[f'{name}/forward'] = jax_call(_forward_fn(module), [variables, x])
      jax_calls[f'{name}/fwd_bwd'] = jax_call(_fwd_bwd_fn(module), [variables, x, cotangent])
    torch_calls = {} if side is None else _torch_module_calls(side, shape)
    times = time_calls(jax_calls, torch_calls, repeats)
    row: dict[str, Any] = {'shape': list(shape), 'bytes': int(x.nbytes),
                           'floor_ms': 2 * times.pop('floor')['ms'], 'impls': {}}
    for key_name, value in times.items():
      name, mode = key_name.split('/')
      row['impls'].setdefault(name, {})[mode] = value
    head = row['impls']['cbam_jax']
    for mode in ('forward', 'fwd_bwd'):
      ms = head[mode]['ms']
      # Minimal traffic: forward reads x and writes the output; the backward also reads
      # the cotangent and writes the input gradient.
      moved = (2 if mode == 'forward' else 4) * x.nbytes
      head[mode]['gb_per_s'] = moved / (ms * 1e-3) / 1e9
      head[mode]['vs_floor'] = ms / row['floor_ms']
      for other in ('naive', 'xla', 'torch_cl', 'torch_nchw'):
        if other in row['impls']:
          head[mode][f'vs_{other}'] = ms / row['impls'][other][mode]['ms']
    rows.append(row)
    print(_module_line(row), flush=True)
  return rows


def _module_line(row: dict[str, Any]) -> str:
  parts = [f'{tuple(row["shape"])}: floor {row["floor_ms"]:.2f} ms']
  for name, times in row['impls'].items():
    parts.append(f'{name} {times["forward"]["ms"]:.2f}/{times["fwd_bwd"]["ms"]:.2f}')
  return ' | '.join(parts)


# ----------------------------------------------------------------------------------------------
# Model benchmark.


def _jax_train_step(model: nn.Module, optimizer: optax.GradientTransformation):
  def step(params, batch_stats, opt_state, images, labels):
    def loss_fn(params):
      logits, updates = model.apply({'params': params, 'batch_stats': batch_stats}, images,
                                    train=True, mutable=['batch_stats'])
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
      return loss, updates['batch_stats']

    (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), new_stats, opt_state, loss

  return step


def _jax_model_setup(name: str, fields: dict[str, Any], attention: str | None, batch: int,
                     size: int):
  model = models.create_model(name, attention=attention, **fields)
  num_classes = model.num_classes
  images = jax.random.normal(jax.random.PRNGKey(0), (batch, size, size, 3), jnp.float32)
  labels = jax.random.randint(jax.random.PRNGKey(1), (batch,), 0, num_classes)
  variables = model.init(jax.random.PRNGKey(2), images[:1], train=False)
  optimizer = optax.sgd(0.1, momentum=0.9)
  params, batch_stats = variables['params'], variables['batch_stats']
  args = [params, batch_stats, optimizer.init(params), images, labels]
  return _jax_train_step(model, optimizer), args


def _torch_model_step(side: TorchSide, name: str, fields: dict[str, Any], attention: bool,
                      batch: int, size: int, channels_last: bool) -> Callable[[], None]:
  from experiments.bench import torch_reference
  torch, device = side.torch, side.device
  if name == 'resnet20':
    stages, stem, classes = fields.get('stage_sizes', (3, 3, 3)), 'cifar', 10
  else:
    stages, stem, classes = fields.get('stage_sizes', (3, 4, 6, 3)), 'imagenet', 1000
  model = torch_reference.benchmark_resnet(stages, stem=stem, attention=attention,
                                           num_classes=classes)
  memory_format = torch.channels_last if channels_last else torch.contiguous_format
  model = model.to(device, memory_format=memory_format).train()
  images = torch.randn(batch, 3, size, size, device=device).contiguous(
      memory_format=memory_format)
  labels = torch.randint(0, classes, (batch,), device=device)
  optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

  def step():
    optimizer.zero_grad(set_to_none=True)
    loss = torch.nn.functional.cross_entropy(model(images), labels)
    loss.backward()
    optimizer.step()

  return side.blocking(step)


def run_models(cases, repeats: int) -> list[dict[str, Any]]:
  side = _torch()
  # The models' default conv (MaterializedInputConv) beside plain nn.Conv; where it
  # materialises nothing (accelerators) the two are one program, timed once.
  conv_cases = [('jax', {})]
  if materializes_input():
    conv_cases.append(('jax_nn_conv', {'conv': nn.Conv}))
  rows = []
  for name, fields, batch, size in cases:
    row: dict[str, Any] = {'model': name, 'fields': fields, 'batch': batch, 'image_size': size}
    jax_calls, torch_calls = {}, {}
    for attention in (None, 'cbam'):
      tag = 'cbam' if attention else 'plain'
      for prefix, conv_fields in conv_cases:
        case_fields = {**fields, **conv_fields}
        step, args = _jax_model_setup(name, case_fields, attention, batch, size)
        jax_calls[f'{prefix}_{tag}'] = jax_call(
            step, args, donate=(0, 1, 2),
            cache_key=(name, repr(case_fields), attention, batch, size))
      if side is not None:
        for layout, channels_last in (('cl', True), ('nchw', False)):
          torch_calls[f'torch_{layout}_{tag}'] = _torch_model_step(
              side, name, fields, attention is not None, batch, size, channels_last)
    row['impls'] = time_calls(jax_calls, torch_calls, repeats)
    for times in row['impls'].values():
      times['images_per_s'] = batch / (times['ms'] * 1e-3)
    impls = row['impls']
    row['cbam_overhead'] = {
        prefix: impls[f'{prefix}_cbam']['ms'] / impls[f'{prefix}_plain']['ms']
        for prefix in ('jax', 'jax_nn_conv', 'torch_cl', 'torch_nchw')
        if f'{prefix}_cbam' in impls}
    row['jax_vs_nn_conv'] = {tag: impls[f'jax_{tag}']['ms'] / impls[f'jax_nn_conv_{tag}']['ms']
                             for tag in ('plain', 'cbam') if f'jax_nn_conv_{tag}' in impls}
    row['jax_vs_torch'] = {
        f'{layout}_{tag}': impls[f'jax_{tag}']['ms'] / impls[f'torch_{layout}_{tag}']['ms']
        for layout in ('cl', 'nchw') for tag in ('plain', 'cbam')
        if f'torch_{layout}_{tag}' in impls}
    rows.append(row)
    print(f'{name} b{batch} {size}px: ' + ' | '.join(
        f'{k} {v["ms"]:.1f} ms' for k, v in impls.items()), flush=True)
  return rows


def step_memory(compiled: Any) -> dict[str, float]:
  """MB from XLA's buffer assignment of a compiled step (``memory_analysis()``)."""
  stats = compiled.memory_analysis()
  # XLA:CPU reports no real peak (peak_memory_in_bytes is the argument size there), so
  # the peak is bounded by everything live at once: arguments + outputs + temporaries.
  live = (stats.argument_size_in_bytes + stats.output_size_in_bytes +
          stats.temp_size_in_bytes - stats.alias_size_in_bytes)
  return {
      'peak_mb': live / 2**20,
      'xla_peak_mb': getattr(stats, 'peak_memory_in_bytes', 0) / 2**20,
      'temp_mb': stats.temp_size_in_bytes / 2**20,
      'argument_mb': stats.argument_size_in_bytes / 2**20,
      'output_mb': stats.output_size_in_bytes / 2**20,
  }


def run_memory(cases) -> list[dict[str, Any]]:
  rows = []
  for name, fields, batch, size in cases:
    row: dict[str, Any] = {'model': name, 'batch': batch, 'image_size': size}
    for attention in (None, 'cbam'):
      step, args = _jax_model_setup(name, fields, attention, batch, size)
      compiled, _ = compile_jax(step, args, (0, 1, 2),
                                cache_key=(name, repr(fields), attention, batch, size))
      tag = 'cbam' if attention else 'plain'
      row[tag] = step_memory(compiled)
    row['cbam_ratio'] = (row['cbam']['peak_mb'] / row['plain']['peak_mb']
                         if row['plain']['peak_mb'] else None)
    rows.append(row)
    print(f'{name} b{batch}: peak {row["plain"]["peak_mb"]:.0f} MB plain, '
          f'{row["cbam"]["peak_mb"]:.0f} MB with CBAM', flush=True)
  return rows


# ----------------------------------------------------------------------------------------------
# Conv passes: where XLA:CPU's training step loses to PyTorch's.


def run_convs(cases, repeats: int) -> list[dict[str, Any]]:
  """Forward, input gradient and kernel gradient of a 3x3 conv, JAX NHWC vs torch CL."""
  side = _torch()
  torch = None if side is None else side.torch
  from jax import lax

  def conv(x, w):
    return lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),
                                    dimension_numbers=('NHWC', 'HWIO', 'NHWC'))

  rows = []
  for batch, height, width, c_in, c_out in cases:
    x = jax.random.normal(jax.random.PRNGKey(0), (batch, height, width, c_in))
    w = jax.random.normal(jax.random.PRNGKey(1), (3, 3, c_in, c_out)) * 0.1
    g = jax.random.normal(jax.random.PRNGKey(2), (batch, height, width, c_out))
    jax_calls = {
        'jax/forward': jax_call(conv, [x, w]),
        'jax/input_grad': jax_call(lambda g, x, w: jax.vjp(lambda x: conv(x, w), x)[1](g)[0],
                                   [g, x, w]),
        'jax/kernel_grad': jax_call(lambda g, x, w: jax.vjp(lambda w: conv(x, w), w)[1](g)[0],
                                    [g, x, w]),
    }
    torch_calls = {}
    if side is not None:
      cl = torch.channels_last
      randn = functools.partial(torch.randn, device=side.device)
      tx = randn(batch, c_in, height, width).contiguous(memory_format=cl)
      tw = randn(c_out, c_in, 3, 3).contiguous(memory_format=cl)
      tg = randn(batch, c_out, height, width).contiguous(memory_format=cl)

      def backward(mask, tx=tx, tw=tw, tg=tg):
        return lambda: torch.ops.aten.convolution_backward(
            tg, tx, tw, [0], [1, 1], [1, 1], [1, 1], False, [0, 0], 1, mask)

      torch_calls = {
          'torch_cl/forward': side.blocking(
              lambda tx=tx, tw=tw: torch.nn.functional.conv2d(tx, tw, padding=1)),
          'torch_cl/input_grad': side.blocking(backward([True, False, False])),
          'torch_cl/kernel_grad': side.blocking(backward([False, True, False])),
      }
    times = time_calls(jax_calls, torch_calls, repeats)
    row: dict[str, Any] = {'shape': [batch, height, width, c_in, c_out], 'passes': {}}
    for name, value in times.items():
      impl, conv_pass = name.split('/')
      row['passes'].setdefault(conv_pass, {})[impl] = value['ms']
    for values in row['passes'].values():
      if 'torch_cl' in values:
        values['jax_vs_torch_cl'] = values['jax'] / values['torch_cl']
    rows.append(row)
    print(f'conv {row["shape"]}: ' + ' | '.join(
        f'{p} ' + '/'.join(f'{v:.2f}' for v in values.values())
        for p, values in row['passes'].items()), flush=True)
  return rows


# ----------------------------------------------------------------------------------------------
# Report.



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


def _linen_compile(name, fields, attention, attention_fields, batch, size) -> CompileTimes:
  model_fields = {**fields, 'attention_fields': attention_fields} if attention_fields else fields
  step, args = _jax_model_setup(name, model_fields, attention, batch, size)
  return compile_jax(step, args, donate=(0, 1, 2))[1]


def _nnx_compile(name, fields, attention, batch, size) -> CompileTimes:
  from flax import nnx

  model, optimizer, images, labels = _nnx_setup(name, fields, batch, size, attention)
  graphdef, state = nnx.split((model, optimizer))

  def functional_step(state, images, labels):
    model, optimizer = nnx.merge(graphdef, state)
    loss = _nnx_train_step(model, optimizer, images, labels)
    return nnx.state((model, optimizer)), loss

  return compile_jax(functional_step, [state, images, labels], donate=(0,))[1]


def run_compile(cases, rounds: int, attentions=COMPILE_ATTENTIONS,
                nnx_attentions=NNX_COMPILE_ATTENTIONS) -> list[dict[str, Any]]:
  """Trace + lower and XLA compile seconds of the SGD training step of every model with every
  attention, the fastest of ``rounds`` round-robin rounds (a program is compiled afresh each
  time: JAX's in-memory caches are cleared and the persistent cache is not used)."""
  rows = []
  for name, fields, batch, size in cases:
    compiles: dict[str, Callable[[], CompileTimes]] = {
        label: functools.partial(_linen_compile, name, fields, attention, attention_fields,
                                 batch, size)
        for label, attention, attention_fields in attentions}
    compiles |= {label: functools.partial(_nnx_compile, name, fields, attention, batch, size)
                 for label, attention in nnx_attentions}
    best: dict[str, CompileTimes] = {}
    for _ in range(rounds):
      for label, compile_fn in compiles.items():
        jax.clear_caches()
        times = compile_fn()
        if label not in best or times.total_s < best[label].total_s:
          best[label] = times
    impls = {label: {'trace_s': t.trace_s, 'lower_s': t.lower_s, 'xla_compile_s': t.xla_s,
                     'total_s': t.total_s} for label, t in best.items()}
    for label, times in impls.items():
      base = impls['nnx_none' if label.startswith('nnx_') and 'nnx_none' in impls else 'none']
      times['vs_none'] = times['total_s'] / base['total_s']
    rows.append({'model': name, 'fields': fields, 'batch': batch, 'image_size': size,
                 'rounds': rounds, 'impls': impls})
    print(f'{name} b{batch} {size}px compile: ' + ' | '.join(
        f'{k} {v["total_s"]:.1f} s ({v["vs_none"]:.2f}x)' for k, v in impls.items()),
        flush=True)
  return rows


# ----------------------------------------------------------------------------------------------
# NNX against linen: the same CBAM training step.

NNX_CASES = (('resnet20', {}, 128, 32),)
TINY_NNX_CASES = (('resnet20', {'stage_sizes': (1,)}, 2, 8),)


def _nnx_setup(name: str, fields: dict[str, Any], batch: int, size: int,
               attention: str | None = 'cbam'):
  """An NNX model (CBAM by default) with its optimizer (same SGD as the linen step) and the
  batch."""
  from flax import nnx

  from cbam_jax.nnx import create_model as create_nnx_model

  model = create_nnx_model(name, attention=attention, rngs=nnx.Rngs(2), **fields)
  images = jax.random.normal(jax.random.PRNGKey(0), (batch, size, size, 3), jnp.float32)
  labels = jax.random.randint(jax.random.PRNGKey(1), (batch,), 0, model.num_classes)
  optimizer = nnx.Optimizer(model, optax.sgd(0.1, momentum=0.9), wrt=nnx.Param)
  return model, optimizer, images, labels


def _nnx_train_step(model, optimizer, images, labels):
  from flax import nnx

  def loss_fn(model):
    logits = model(images)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  loss, grads = nnx.value_and_grad(loss_fn)(model)
  optimizer.update(model, grads)
  return loss


def _nnx_jit_call(model, optimizer, images, labels):
  """nnx.jit: the module and optimizer are updated in place. ``((call, compile_s), memory)``."""
  from flax import nnx

  step = nnx.jit(_nnx_train_step, donate_argnums=(0, 1))
  start = time.perf_counter()
  lowered = step.lower(model, optimizer, images, labels)  # Traces and lowers.
  lowered_at = time.perf_counter()
  compiled = lowered.compile()
  compile_s = CompileTimes(lowered_at - start, 0.0, time.perf_counter() - lowered_at)
  jax.block_until_ready(step(model, optimizer, images, labels))  # Traced once, cached.
  return ((lambda: jax.block_until_ready(step(model, optimizer, images, labels)), compile_s),
          step_memory(compiled))


def _nnx_split_call(model, optimizer, images, labels, cache_key):
  """nnx.split / jax.jit / nnx.merge: one pure function of the donated state."""
  from flax import nnx

  graphdef, state = nnx.split((model, optimizer))

  def functional_step(state, images, labels):
    model, optimizer = nnx.merge(graphdef, state)
    loss = _nnx_train_step(model, optimizer, images, labels)
    return nnx.state((model, optimizer)), loss

  args = [state, images, labels]
  call = jax_call(functional_step, args, donate=(0,), cache_key=cache_key)
  return call, step_memory(compile_jax(functional_step, args, (0,), cache_key=cache_key)[0])


def run_nnx(cases, repeats: int) -> list[dict[str, Any]]:

  rows = []
  for name, fields, batch, size in cases:
    row: dict[str, Any] = {'model': name, 'fields': fields, 'batch': batch, 'image_size': size,
                           'attention': 'cbam'}
    linen_step, linen_args = _jax_model_setup(name, fields, 'cbam', batch, size)
    linen_key = (name, repr(fields), 'cbam', batch, size)
    calls = {'linen': jax_call(linen_step, linen_args, donate=(0, 1, 2), cache_key=linen_key)}
    memory = {'linen': step_memory(compile_jax(linen_step, linen_args, (0, 1, 2),
                                               cache_key=linen_key)[0])}

    nnx_key = ('nnx', name, repr(fields), batch, size)
    calls['nnx_jit'], memory['nnx_jit'] = _nnx_jit_call(*_nnx_setup(name, fields, batch, size))
    calls['nnx_split'], memory['nnx_split'] = _nnx_split_call(
        *_nnx_setup(name, fields, batch, size), cache_key=nnx_key)
    row['impls'] = time_calls(calls, {}, repeats)
    for impl, times in row['impls'].items():
      times['images_per_s'] = batch / (times['ms'] * 1e-3)
      times['peak_mb'] = memory[impl]['peak_mb']
    linen = row['impls']['linen']
    row['vs_linen'] = {impl: {'time': times['ms'] / linen['ms'],
                              'peak_memory': times['peak_mb'] / linen['peak_mb']}
                       for impl, times in row['impls'].items() if impl != 'linen'}
    row['targets_met'] = {impl: ratios['time'] <= 1.05 and abs(ratios['peak_memory'] - 1) <= 0.05
                          for impl, ratios in row['vs_linen'].items()}
    rows.append(row)
    print(f'{name} b{batch} {size}px CBAM: ' + ' | '.join(
        f'{k} {v["ms"]:.1f} ms {v["peak_mb"]:.0f} MB' for k, v in row['impls'].items()),
        flush=True)
  return rows


def environment() -> dict[str, Any]:
  cpu = platform.processor() or platform.machine()
  try:
    lscpu = subprocess.run(['lscpu'], capture_output=True, text=True, check=False).stdout
    cpu = next((line.split(':', 1)[1].strip() for line in lscpu.splitlines()
                if line.startswith('Model name')), cpu)
  except OSError:
    pass
  side = _torch()
  on_cuda = side is not None and side.device == 'cuda'
  return {
      'cpu': cpu, 'cpu_count': _usable_cpus(), 'python': platform.python_version(),
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
  flags.DEFINE_multi_enum('model', None, [case[0] for case in MODEL_CASES],
                          'Only this model.', flag_values=values)
  flags.register_validator('shape', lambda shapes: all(_shape(s) for s in shapes or ()),
                           flag_values=values)


@cli.command(PROG)
def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  """The command line (``argv`` without the program name; default ``sys.argv[1:]``);
  returns the results."""
  values, _ = cli.parse(argv, define_flags, prog=PROG, usage=__doc__)
  repeats = values.repeats or (2 if values.tiny else 10)  # lower_bound=1: never 0.
  sections = values.only or list(SECTIONS)
  module_shapes = (tuple(_shape(s) for s in values.shape) if values.shape else
                   TINY_MODULE_SHAPES if values.tiny else MODULE_SHAPES)
  model_cases = (TINY_MODEL_CASES if values.tiny else
                 MODEL_CASES if jax.default_backend() == 'cpu' else ACCELERATOR_MODEL_CASES)
  if values.model:
    model_cases = tuple(case for case in model_cases if case[0] in values.model)
  if values.tiny:
    # CI boxes are small and shared: oneDNN's spinning worker threads make tiny torch ops
    # 100x slower under load, and tiny mode checks the plumbing, not the speed.
    _TORCH_THREADS[0] = 1

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


if __name__ == '__main__':
  from experiments import perf

  perf.reexec_with_cpu_env()  # What experiments.training.train runs with (huge pages for malloc).
  # Compile times are measured: never load a program from a persistent cache.
  jax.config.update('jax_enable_compilation_cache', False)
  main()
