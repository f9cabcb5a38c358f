"""ONNX export through jax2onnx, checked with onnxruntime.

Needs ``pip install 'cbam_jax[export]'`` (onnx, onnx-ir, onnxruntime) and
``pip install --no-deps jax2onnx==0.17.1`` (with its dependencies it would downgrade the
training stack's orbax; see docs/deploy.md). The program
is traced with JAX first, every cbam_jax spatial conv as one ``lax.conv`` (``conv_impl='xla'``,
no conv-input fusion boundary: the same numbers as the CPU fast path, one ONNX ``Conv``
instead of ~100 shifted multiply-adds, which jax2onnx converts in time quadratic in the
number of operations), and handed to jax2onnx as plain primitives
(:mod:`cbam_jax.export._jaxpr`: custom derivatives and fusion boundaries are inference
no-ops), so the graph holds only the math: convs, matrix products, reductions,
elementwise ops, no loops.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cbam_jax.export import _files, _jaxpr
from cbam_jax.export._inference import ExportError, inference_function, input_spec

DEFAULT_OPSET = 21
INPUT_NAME = 'input'
# onnxruntime against JAX, float32: the tolerance the export tests hold every model to.
TOLERANCE = 1e-5


def _import_converter() -> tuple[Any, ...]:
  missing = []
  modules = []
  for name in ('jax2onnx', 'onnx', 'onnxruntime'):
    try:
      modules.append(importlib.import_module(name))
    except ImportError:
      missing.append(name)
  if missing:
    raise ImportError(f'ONNX export needs {", ".join(missing)}: pip install '
                      "'cbam_jax[export]' && pip install --no-deps jax2onnx==0.17.1 "
                      '(docs/deploy.md).')
  return tuple(modules)


@contextlib.contextmanager
def _quiet_converter() -> Iterator[None]:
  """Silences jax2onnx's and onnx_ir's warnings while converting: one per optional plugin
  family whose library is absent (equinox, dm-pix; cbam_jax uses none) and one per shape
  constant, none of them about the model."""
  loggers = [logging.getLogger(name) for name in ('jax2onnx', 'onnx_ir')]
  levels = [logger.level for logger in loggers]
  for logger in loggers:
    logger.setLevel(logging.ERROR)
  try:
    yield
  finally:
    for logger, level in zip(loggers, levels, strict=True):
      logger.setLevel(level)


def _check_supported(closed: Any, registry: Mapping[str, Any]) -> None:
  """Raises ExportError naming the first operation jax2onnx cannot convert, and where."""
  from jax._src import source_info_util

  for eqn in _jaxpr.primitives(closed.jaxpr):
    if eqn.primitive.name not in registry:
      where = source_info_util.summarize(eqn.source_info)
      raise ExportError(
          f"Operation '{eqn.primitive.name}' (at {where}) has no ONNX conversion in "
          'jax2onnx; export this model with to_stablehlo, or replace the operation.')


def _flat_outputs(outputs: Any) -> list[np.ndarray]:
  return [np.asarray(leaf) for leaf in jax.tree_util.tree_leaves(outputs)]


def to_onnx(model: Any, variables: Mapping[str, Any] | None, example: Any,
            path: str | os.PathLike[str], *, opset: int = DEFAULT_OPSET,
            batch_polymorphic: bool = True, check: bool = True) -> Any:
  """Writes ``model``'s inference function (evaluation mode) as an ONNX file.

  Args:
    model: a linen module (called as ``model.apply(variables, x, train=False)``, ``train``
      only where its ``__call__`` takes it) or an NNX module (a copy is switched to
      ``eval()``).
    variables: the linen model's ``{'params', 'batch_stats', ...}``; ``None`` for NNX.
    example: a float32 array: the input's shape and, with ``check``, the input the ONNX
      model is checked on (a ``jax.ShapeDtypeStruct`` needs ``check=False``).
    path: the ``.onnx`` file to write; an existing file is replaced only once the new one
      is written and checked (a failure leaves it as it was).
    opset: the ONNX opset (default 21; jax2onnx supports 21 and later).
    batch_polymorphic: the first dimension is named (``'b'``) in the graph, so any batch
      size runs; ``False`` fixes ``example``'s batch size.
    check: run the written file with onnxruntime on ``example`` and require JAX's outputs
      within 1e-5 (absolute, and relative to the largest output).

  Returns:
    The ``onnx.ModelProto`` written.

  Raises:
    ImportError: jax2onnx, onnx or onnxruntime is not installed.
    ExportError: an operation without an ONNX conversion (named, with its source line), a
      non-float32 example, or onnxruntime's outputs differ from JAX's.
  """
  fn = inference_function(model, variables, plain_conv=True)
  reference = inference_function(model, variables)
  spec = input_spec(example, batch_polymorphic)
  if spec.dtype != jnp.float32:
    raise ExportError(f'ONNX export is tested for float32 inputs; got {spec.dtype}. Cast '
                      'the example (and the model) to float32, or use to_stablehlo.')
  if check and isinstance(example, jax.ShapeDtypeStruct):
    raise ExportError('check=True runs the model on example; pass an array, or check=False.')
  jax2onnx, onnx, onnxruntime = _import_converter()
  from jax2onnx.plugins import plugin_system

  closed = jax.make_jaxpr(fn)(spec)
  inference_only = jax.make_jaxpr(lambda x: _jaxpr.replay(closed, x))(spec)
  try:
    with _quiet_converter():
      plugin_system.import_all_plugins()
      _check_supported(inference_only, plugin_system.PLUGIN_REGISTRY)
      proto = jax2onnx.to_onnx(lambda x: _jaxpr.replay(inference_only, x), [spec],
                               opset=opset, model_name=type(model).__name__,
                               input_names=[INPUT_NAME])
  except (NotImplementedError, ValueError, TypeError) as error:
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else ''
    raise ExportError(f'jax2onnx could not convert {type(model).__name__}: '
                      f'{type(error).__name__}: {first_line}') from error
  onnx.checker.check_model(proto)
  # Checked before it replaces `path`: a failed check leaves an earlier file as it was.
  with _files.replacing(path) as written:
    onnx.save(proto, written)
    if check:
      _check_with_onnxruntime(onnxruntime, written, example, reference, type(model).__name__)
  return proto


def _check_with_onnxruntime(onnxruntime: Any, path: str, example: Any, reference: Any,
                            name: str) -> None:
  """Raises ExportError unless the ONNX file at ``path`` gives ``reference``'s outputs on
  ``example`` within :data:`TOLERANCE`."""
  options = onnxruntime.SessionOptions()
  options.log_severity_level = 3  # Errors only: not its notes on unused initialisers.
  session = onnxruntime.InferenceSession(path, options, providers=['CPUExecutionProvider'])
  got = session.run(None, {INPUT_NAME: np.asarray(example)})
  want = _flat_outputs(jax.jit(reference)(example))
  for index, (a, b) in enumerate(zip(got, want, strict=True)):
    difference = float(np.max(np.abs(a - b))) if a.size else 0.0
    scale = max(1.0, float(np.max(np.abs(b))) if b.size else 0.0)
    if difference > TOLERANCE * scale:
      raise ExportError(f'onnxruntime output {index} differs from JAX by {difference:.3g} '
                        f'(allowed {TOLERANCE * scale:.3g}); the export of {name} is wrong, '
                        'please report it.')
