"""CPU performance settings for training scripts.

XLA reads ``XLA_FLAGS`` once, when its CPU backend starts (the first computation), so
:func:`configure_cpu` must run before anything touches a JAX array. It only adds flags
that keep results bit-for-bit the same kind of float32 arithmetic: fast-math and
vector-width experiments are measured in ``experiments/bench_xla_flags.py`` and left out
(see the README's performance section for the numbers).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

__all__ = ['RECOMMENDED_CPU_FLAGS', 'configure_cpu']

# Flags that measured faster for convolution-heavy CPU training here. Empty means "XLA's
# defaults were best": no flag we tried helped consistently (see bench_xla_flags).
RECOMMENDED_CPU_FLAGS: tuple[str, ...] = ()


def configure_cpu(extra_flags: Sequence[str] = (), *, override: bool = False) -> str:
  """Adds the recommended XLA:CPU flags (and ``extra_flags``) to ``XLA_FLAGS``.

  Flags the user already set win unless ``override``: a flag name present in
  ``XLA_FLAGS`` is not appended again.

  Args:
    extra_flags: more ``--name=value`` flags to add.
    override: replace existing values of the same flags.

  Returns:
    The resulting ``XLA_FLAGS`` value.

  Raises:
    RuntimeError: the JAX CPU backend has already started, so new flags would be ignored.
    ValueError: a flag does not look like ``--name=value``.
  """
  import jax._src.xla_bridge as xla_bridge

  if getattr(xla_bridge, '_backends', None):
    raise RuntimeError(
        'configure_cpu() must run before JAX starts its backends (before the first array '
        'is created); call it at the top of the training script.')
  current = os.environ.get('XLA_FLAGS', '').split()
  by_name = {flag.split('=', 1)[0]: flag for flag in current}
  for flag in (*RECOMMENDED_CPU_FLAGS, *extra_flags):
    if not flag.startswith('--') or '=' not in flag:
      raise ValueError(f'XLA flag {flag!r} must look like --name=value.')
    name = flag.split('=', 1)[0]
    if override or name not in by_name:
      by_name[name] = flag
  os.environ['XLA_FLAGS'] = ' '.join(by_name.values())
  return os.environ['XLA_FLAGS']
