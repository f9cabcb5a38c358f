"""Command lines of cbam_jax and its experiments: absl flags, parsed afresh on every call.

Each tool defines its flags on a new ``flags.FlagValues`` per ``main(argv)`` call (not on
the global ``flags.FLAGS``), so tests can call ``main`` many times in one process without
one call's flags leaking into the next. Errors a user can fix (a bad flag, a missing
folder or checkpoint) end the program with one line, not a traceback.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator, Sequence

from absl import flags


def parse(argv: Sequence[str] | None, define: Callable[[flags.FlagValues], None], *,
          prog: str, usage: str, max_positional: int = 0) -> tuple[flags.FlagValues, list[str]]:
  """``(flag values, positional arguments)`` of ``argv`` (without the program name;
  ``sys.argv[1:]`` when None). ``--help`` prints ``usage`` and the flags, then exits 0.

  Raises:
    SystemExit: a bad or unknown flag, a missing required one, too many arguments.
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
    raise SystemExit(f'{prog}: {message} Pass --help to list the flags.') from None
  if len(positional) > max_positional:
    extra = positional[max_positional:]
    raise SystemExit(f'{prog}: unexpected argument(s) {" ".join(extra)}. Pass --help to list '
                     'the flags.')
  return values, positional


@contextlib.contextmanager
def one_line_errors(prog: str, *errors: type[Exception]) -> Iterator[None]:
  """Turns ``errors`` (default: ``FileNotFoundError``, a missing input) into ``SystemExit``
  with their message: one line on stderr and exit status 1, no traceback."""
  caught = errors or (FileNotFoundError,)
  try:
    yield
  except caught as error:
    raise SystemExit(f'{prog}: {error}') from None
