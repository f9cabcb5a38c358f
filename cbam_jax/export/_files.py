"""Writing an exported file so that a failure leaves the user's file as it was."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator


@contextlib.contextmanager
def replacing(path: str | os.PathLike[str]) -> Iterator[str]:
  """A temporary path beside ``path`` to write (and check) the new file at; it replaces
  ``path`` in one rename when the block ends without an error. On an error, or a crash
  before the rename, ``path`` is as it was and the temporary file is removed (after a
  crash, a hidden ``.NAME.*.partial`` may remain).

  The temporary file is created by the writer, so it gets the usual permissions.
  """
  path = os.path.abspath(os.fspath(path))
  folder, name = os.path.split(path)
  temporary = os.path.join(folder, f'.{name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.partial')
  try:
    yield temporary
    os.replace(temporary, path)
  finally:
    with contextlib.suppress(FileNotFoundError):
      os.remove(temporary)
