"""absl flag parsing for the library's own command lines (``python -m cbam_jax.convert``,
``python -m cbam_jax.export``), which cannot use ``experiments.cli``: the library does not
import the scripts."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from absl import flags

HELP_HINT = 'Pass --help to list the flags.'


class UsageError(ValueError):
  """A mistake on the command line: printed as one line, exit status 2."""


def parse(argv: Sequence[str], define: Callable[[flags.FlagValues], None], *, prog: str,
          usage: str) -> tuple[flags.FlagValues, list[str]]:
  """``(flags, positional arguments)`` of ``argv`` (without the program name); ``--help``
  prints ``usage`` and the flags and exits 0; a bad flag is a one-line :class:`UsageError`."""
  values = flags.FlagValues()
  define(values)
  if any(arg in ('--help', '-h', '--helpfull') for arg in argv):
    print(f'{usage.strip()}\n\nFlags:\n{values.get_help()}')
    raise SystemExit(0)
  try:
    positional = values([prog, *argv])[1:]
  except flags.Error as error:
    raise UsageError(f'{" ".join(str(error).split())} {HELP_HINT}') from None
  return values, positional
