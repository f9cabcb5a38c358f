"""StableHLO export: a serialised :mod:`jax.export` artifact that runs with JAX alone.

The artifact is the program ``jax.jit`` runs, weights included as constants; its outputs
equal jit's to float32 rounding (the shape-polymorphic module is compiled on its own, so
XLA may fuse it differently). Reload and run it without cbam_jax::

  exported = jax.export.deserialize(open('model.stablehlo', 'rb').read())
  logits = exported.call(images)      # any batch size when exported batch-polymorphic
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax

from cbam_jax.export._inference import ExportError, inference_function, input_spec


def to_stablehlo(model: Any, variables: Mapping[str, Any] | None, example: Any, *,
                 batch_polymorphic: bool = True,
                 platforms: Sequence[str] | None = None) -> bytearray:
  """Serialises ``model``'s inference function (evaluation mode) with ``jax.export``.

  Args:
    model: a linen module (called as ``model.apply(variables, x, train=False)``, ``train``
      only where its ``__call__`` takes it) or an NNX module (a copy is switched to
      ``eval()``; ``model`` itself is left as it is).
    variables: the linen model's ``{'params', 'batch_stats', ...}``; ``None`` for NNX.
    example: an array or ``jax.ShapeDtypeStruct``: the input's shape and dtype.
    batch_polymorphic: make the first dimension symbolic (``'b'``), so that the artifact
      runs for any batch size; ``False`` fixes ``example``'s batch size.
    platforms: what the artifact may run on (``jax.export``'s ``platforms``, e.g.
      ``('cpu', 'cuda')``); default: the current backend. The program is traced on the
      current backend, so CPU-only schedule hints (one-trip loops that XLA:CPU keeps as
      fusion boundaries) stay in an artifact exported on a CPU: export on the platform
      you serve on.

  Returns:
    The bytes of ``jax.export.Exported.serialize()``; reload them with
    ``jax.export.deserialize(blob)`` and run ``.call(x)``.

  Raises:
    ExportError: a model, variables or example that cannot be exported.
  """
  fn = inference_function(model, variables)
  spec = input_spec(example, batch_polymorphic)
  kwargs: dict[str, Any] = {} if platforms is None else {'platforms': tuple(platforms)}
  try:
    exported = jax.export.export(jax.jit(fn), **kwargs)(spec)
  except jax.errors.InconclusiveDimensionOperation as error:
    raise ExportError(
        f'The model cannot be exported for any batch size: {str(error).splitlines()[0]} '
        'Pass batch_polymorphic=False to fix the batch size.') from None
  return exported.serialize()
