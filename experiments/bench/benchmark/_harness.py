"""The timing harness of the benchmark: compiling with per-stage times, timing JAX and
PyTorch calls side by side, PyTorch on the device beside JAX's."""


from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import jax
from absl import flags

from experiments.bench import timing

# ----------------------------------------------------------------------------------------------
# Timing.


# Compiled training steps, shared by the models and memory sections of one run.
COMPILED: dict[Any, Any] = {}


class CompileTimes(NamedTuple):
  """Seconds to build one program: JAX's trace and lowering to StableHLO, then XLA."""

  trace_s: float
  lower_s: float
  xla_s: float
  # CPU seconds of the XLA compile (this process, all threads): what load inflates least.
  xla_cpu_s: float = 0.0

  @property
  def total_s(self) -> float:
    return self.trace_s + self.lower_s + self.xla_s


_NOTCOMPILED = CompileTimes(0.0, 0.0, 0.0)


def compile_jax(fn: Callable[..., Any], args: Sequence[Any], donate: Sequence[int] = (),
                cache_key: Any = None) -> tuple[Any, CompileTimes]:
  """``jit(fn).trace(*args).lower().compile()`` and the seconds of each stage (zeros when
  already compiled in this run)."""
  if cache_key is not None and cache_key in COMPILED:
    return COMPILED[cache_key], _NOTCOMPILED
  start = time.perf_counter()
  traced = jax.jit(fn, donate_argnums=tuple(donate)).trace(*args)
  traced_at = time.perf_counter()
  lowered = traced.lower()
  lowered_at, lowered_cpu = time.perf_counter(), time.process_time()
  compiled = lowered.compile()
  times = CompileTimes(traced_at - start, lowered_at - traced_at,
                       time.perf_counter() - lowered_at, time.process_time() - lowered_cpu)
  if cache_key is not None:
    COMPILED[cache_key] = compiled
  return compiled, times


_INSTRUCTION = re.compile(r'\s*(?:ROOT )?%[\w.\-]+ = (?:\(.*?\)\S*|\S+) ([a-z][\w\-]*)\(')
_NOT_KERNELS = frozenset({'parameter', 'constant', 'tuple', 'get-tuple-element', 'bitcast',
                          'while'})


def kernel_instructions(hlo_text: str) -> Iterator[tuple[str, str]]:
  """``(opcode, line)`` of every kernel of an optimised XLA program (``compiled.as_text()``):
  the instructions of its entry computation and of its loops' bodies and conditions, other
  than parameters, constants, tuples, bitcasts and the loops themselves. On XLA:CPU each is
  one generated or library kernel (a fusion counts once)."""
  loop_parts = set(re.findall(r'(?:condition|body)=%([\w.\-]+)', hlo_text))
  for block in re.split(r'\n(?=\S)', hlo_text):  # A computation starts at column 0.
    header = re.match(r'(ENTRY )?%([\w.\-]+)', block)
    if header is None or not (header.group(1) or header.group(2) in loop_parts):
      continue
    for line in block.splitlines()[1:]:
      match = _INSTRUCTION.match(line)
      if match and match.group(1) not in _NOT_KERNELS:
        yield match.group(1), line


def kernel_count(hlo_text: str) -> int:
  """The number of :func:`kernel_instructions`; XLA:CPU's compile time grows with it."""
  return sum(1 for _ in kernel_instructions(hlo_text))


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


def usable_cpus() -> int:
  """CPUs this process may run on (``taskset`` aware), what XLA's thread pool uses."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # Not on Linux.
    return os.cpu_count() or 1


TORCH_THREADS = [usable_cpus()]


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

  def step_peak_bytes(self, step: Callable[[], Any], live: Sequence[Any]) -> int:
    """Peak tensor bytes of one call of the training ``step``, whose state between steps is
    the tensors ``live`` (parameters, buffers, optimizer state, the batch; the gradients are
    made by the step, after ``zero_grad(set_to_none=True)``), measured as XLA's buffer
    assignment counts JAX's step: bytes of tensors, not the process's resident memory.

    On CUDA: ``torch.cuda.max_memory_allocated()`` over the call. On CPU, where torch keeps
    no such counter: the bytes of ``live`` (each storage once) plus the highest running sum
    of the allocations minus frees that ``torch.profiler`` (``profile_memory=True``) records
    during the call.
    """
    torch = self.torch
    if self.device != 'cpu':
      torch.cuda.synchronize()
      torch.cuda.reset_peak_memory_stats()
      step()
      return torch.cuda.max_memory_allocated()
    storages = {tensor.untyped_storage().data_ptr(): tensor.untyped_storage().nbytes()
                for tensor in live}
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities, profile_memory=True) as profile:
      step()
    allocations = sorted((event.start_ns(), event.nbytes())
                         for event in profile.profiler.kineto_results.events()
                         if event.name() == '[memory]')
    running = highest = 0
    for _, nbytes in allocations:
      running += nbytes
      highest = max(highest, running)
    return sum(storages.values()) + highest


def torch_side() -> TorchSide | None:
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
    torch.set_num_threads(TORCH_THREADS[0])
  else:
    # What a speed-minded PyTorch user sets, and JAX's float32 default on these GPUs: TF32
    # tensor cores for convolutions (cuDNN's default) and matmuls (torch's is full float32).
    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.allow_tf32 = True
    torch.set_float32_matmul_precision('high')
  return TorchSide(torch, device)


def parse_shape(text: str) -> tuple[int, ...]:
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
