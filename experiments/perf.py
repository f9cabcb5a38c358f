"""CPU performance settings for the training and benchmark scripts (free of JAX to import).

XLA reads ``XLA_FLAGS`` once, when its CPU backend starts (the first computation), so
:func:`configure_cpu` must run before anything touches a JAX array. It only adds flags
that keep results bit-for-bit the same kind of float32 arithmetic: fast-math and
vector-width experiments are measured in ``experiments/bench/xla_flags.py`` and left out
(see docs/performance.md for the numbers).

glibc reads its tunables even earlier, when the process starts, so
:func:`reexec_with_cpu_env` restarts the interpreter with :data:`RECOMMENDED_CPU_ENV`
(once, before anything is imported that matters). Transparent huge pages for ``malloc``
made XLA:CPU training steps ~1.2x faster here: XLA allocates its large temporaries fresh
on every call, and with 4 KiB pages the first touch of each page (a page fault) cost
about as much as the arithmetic.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Mapping, Sequence

__all__ = ['RECOMMENDED_CPU_FLAGS', 'RECOMMENDED_CPU_ENV', 'configure_cpu', 'cpu_env_updates',
           'reexec_with_cpu_env']

# glibc tunables (name -> value) for GLIBC_TUNABLES. hugetlb=1: malloc asks the kernel for
# transparent huge pages (madvise), which needs glibc >= 2.35 and THP not set to 'never'.
RECOMMENDED_CPU_ENV: Mapping[str, str] = {'glibc.malloc.hugetlb': '1'}
_THP_MODE_FILE = '/sys/kernel/mm/transparent_hugepage/enabled'
_MIN_GLIBC = (2, 35)

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


def _thp_mode() -> str | None:
  """The kernel's transparent-huge-page mode (``'always'``, ``'madvise'``, ``'never'``)."""
  try:
    with open(_THP_MODE_FILE) as f:
      text = f.read()
  except OSError:
    return None
  start, end = text.find('['), text.find(']')
  return text[start + 1:end] if 0 <= start < end else None


def cpu_env_updates(environ: Mapping[str, str] | None = None, *,
                    libc: tuple[str, str] | None = None,
                    thp_mode: str | None = 'auto') -> dict[str, str]:
  """The environment variables to change so that :data:`RECOMMENDED_CPU_ENV` takes effect.

  Empty when nothing would change or nothing can: not glibc >= 2.35, THP unavailable or
  ``'never'``, or every recommended tunable already named in ``GLIBC_TUNABLES`` (set one
  yourself, e.g. ``GLIBC_TUNABLES=glibc.malloc.hugetlb=0``, to opt out).

  Args:
    environ: the environment (default ``os.environ``).
    libc: ``(name, version)`` as :func:`platform.libc_ver` returns it (default: this one's).
    thp_mode: the kernel's THP mode; ``'auto'`` reads it from ``/sys``.

  Returns:
    ``{'GLIBC_TUNABLES': ...}`` with the missing tunables appended, or ``{}``.
  """
  environ = os.environ if environ is None else environ
  name, version = platform.libc_ver() if libc is None else libc
  if thp_mode == 'auto':
    thp_mode = _thp_mode()
  try:
    parsed = tuple(int(part) for part in version.split('.')[:2])
  except ValueError:
    return {}
  if name != 'glibc' or parsed < _MIN_GLIBC or thp_mode not in ('always', 'madvise'):
    return {}
  current = [item for item in environ.get('GLIBC_TUNABLES', '').split(':') if item]
  named = {item.split('=', 1)[0] for item in current}
  missing = [f'{key}={value}' for key, value in RECOMMENDED_CPU_ENV.items()
             if key not in named]
  if not missing:
    return {}
  return {'GLIBC_TUNABLES': ':'.join(current + missing)}


def reexec_with_cpu_env() -> None:
  """Restarts this Python process with :func:`cpu_env_updates` applied, if there are any.

  Call it first thing in a script's ``__main__`` block: the process is replaced
  (``os.execve``) with the same interpreter and command line (``sys.orig_argv``), so
  nothing done before the call survives. Does nothing when no update is needed, so the
  restarted process (which has them) runs on.
  """
  updates = cpu_env_updates()
  if not updates:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], {**os.environ, **updates})
