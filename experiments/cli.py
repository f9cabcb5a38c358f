"""The command lines of the experiments: absl flags parsed afresh on every call, one-line errors.

Each tool defines its flags on a new ``flags.FlagValues`` per ``main(argv)`` call (not on
the global ``flags.FLAGS``), so tests can call ``main`` many times in one process without
one call's flags leaking into the next.

Errors a user can fix (a bad flag or config field, a missing file or folder, bad data, an
unreadable checkpoint, an architecture mismatch) end the program with one line naming the
problem and the fix, and exit status 2 (:func:`command`). A traceback appears only for
bugs, or when the environment variable ``CBAM_JAX_TRACEBACK=1`` asks for it.
"""

from __future__ import annotations

import difflib
import functools
import os
import sys
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NoReturn, TypeVar

from absl import flags

# Set to 1 to see the traceback behind a one-line error.
TRACEBACK_ENV = 'CBAM_JAX_TRACEBACK'
USER_ERROR_STATUS = 2

# What a user can fix without touching the code: bad values (config, flags, data), paths.
USER_ERRORS: tuple[type[Exception], ...] = (
    ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
    PermissionError)

_Main = TypeVar('_Main', bound=Callable[..., Any])


class UserError(Exception):
  """An error the user can fix: :func:`command` prints its message as one line."""


def closest(name: str, choices: Iterable[str]) -> str | None:
  """The choice most like ``name`` (a misspelling of it, case aside), or None."""
  by_lower = {choice.lower(): choice for choice in choices}
  found = difflib.get_close_matches(name.lower(), list(by_lower), n=1, cutoff=0.6)
  return by_lower[found[0]] if found else None


def did_you_mean(name: str, choices: Iterable[str], template: str = '{}') -> str:
  """``' Did you mean X?'`` for the closest choice (``template`` formats it, e.g. ``'{!r}'``
  or ``'--config.{}'``), or ``''``."""
  found = closest(name, choices)
  return f' Did you mean {template.format(found)}?' if found else ''


def set_field(config: Any, key: str, value: Any, what: str) -> None:
  """Sets the existing field ``key`` (dotted, e.g. ``shapes.num_train``) of an
  ``ml_collections.ConfigDict`` to ``value``.

  Raises:
    UserError: ``key`` names no field (``what`` says where it came from, e.g.
      ``"--set 'x=1'"``); the closest field is suggested. An unlocked ConfigDict would
      otherwise add the misspelt field silently.
  """
  target, parents = config, key.split('.')
  *parents, leaf = parents
  for depth, name in enumerate([*parents, leaf]):
    fields = list(target.keys()) if hasattr(target, 'keys') else []
    if name not in fields:
      prefix = '.'.join(parents[:depth])
      dotted = [f'{prefix}.{f}' if prefix else f for f in fields]
      raise UserError(f'{what}: {key!r} is not a config field.{did_you_mean(key, dotted, "{!r}")}')
    if depth < len(parents):
      target = target[name]
  try:
    target[leaf] = value
  except TypeError as error:
    raise UserError(f'{what}: {" ".join(str(error).split())}') from None


def exit_with(prog: str, error: BaseException | str) -> NoReturn:
  """Prints ``prog: error`` as one line on stderr and exits with status 2.

  The ``SystemExit`` carries the line too, so callers of ``main`` (tests) can match it.
  """
  message = ' '.join(str(error).split()) or type(error).__name__
  line = f'{prog}: {message}'
  print(f'{line} (Set {TRACEBACK_ENV}=1 for the traceback.)', file=sys.stderr, flush=True)
  exit_error = SystemExit(line)
  exit_error.code = USER_ERROR_STATUS
  raise exit_error from None


def _format_warning(prog: str, message: Warning | str, category: type[Warning], *args: Any,
                    **kwargs: Any) -> str:
  """A warning as one line, ``prog: Category: message`` (no source line)."""
  return f'{prog}: {category.__name__}: {" ".join(str(message).split())}\n'


def command(prog: str, *errors: type[Exception]) -> Callable[[_Main], _Main]:
  """Decorates a ``main``: :class:`UserError`, :data:`USER_ERRORS` and ``errors`` become
  one line on stderr and exit status 2 (the traceback with ``CBAM_JAX_TRACEBACK=1``), and
  warnings are shown as one line each."""
  caught = (UserError, *USER_ERRORS, *errors)

  def decorate(main: _Main) -> _Main:
    @functools.wraps(main)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
      # Only the display changes: warnings recorded (pytest.warns) are recorded as before.
      format_warning, warnings.formatwarning = (warnings.formatwarning,
                                                functools.partial(_format_warning, prog))
      try:
        return main(*args, **kwargs)
      except caught as error:
        if os.environ.get(TRACEBACK_ENV, '') not in ('', '0'):
          raise
        exit_with(prog, error)
      finally:
        warnings.formatwarning = format_warning

    return wrapped  # type: ignore[return-value]

  return decorate


def parse(argv: Sequence[str] | None, define: Callable[[flags.FlagValues], None], *,
          prog: str, usage: str, max_positional: int = 0) -> tuple[flags.FlagValues, list[str]]:
  """``(flag values, positional arguments)`` of ``argv`` (without the program name;
  ``sys.argv[1:]`` when None). ``--help`` prints ``usage`` and the flags, then exits 0.

  Raises:
    UserError: a bad or unknown flag, a missing required one, too many arguments.
  """
  argv = list(sys.argv[1:] if argv is None else argv)
  values = flags.FlagValues()
  define(values)
  if any(arg in ('--help', '-h', '--helpfull') for arg in argv):
    print(f'{usage.strip()}\n\nFlags:\n{values.get_help()}')
    raise SystemExit(0)
  try:
    positional = values([prog, *argv])[1:]
  except flags.Error as error:
    message = ' '.join(str(error).split())
    message += '' if message.endswith(('.', '?')) else '.'
    raise UserError(f'{message} Pass --help to list the flags.') from None
  if len(positional) > max_positional:
    extra = positional[max_positional:]
    raise UserError(f'unexpected argument(s) {" ".join(extra)}. Pass --help to list the flags.')
  return values, positional

