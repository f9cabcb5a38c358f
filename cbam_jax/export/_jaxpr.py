"""An inference-only replay of a jaxpr, for converters that see primitives one by one.

:func:`replay` evaluates a traced program with the parts that exist for training or for
XLA:CPU's scheduler taken out; the numbers are those of the original program:

* custom derivatives (``custom_jvp_call``, ``custom_vjp_call``: the 'shift' spatial conv,
  the fusion boundaries) run their forward function; inference never differentiates;
* nested ``jit`` calls are inlined;
* a ``while`` loop whose used results do not depend on the loop's carry (a fusion
  boundary: a one-trip loop that computes the same values on every trip) becomes its body,
  run once, selected against the initial carry by the loop's condition on that carry
  (the loop's own result for any trip count). Other loops stay loops;
* ``pad`` of an array with a symbolic (batch) dimension, edge padding only, becomes
  concatenations with blocks of the padding value: jax2onnx 0.17's ``pad`` cannot name a
  symbolic dimension in its output shape;
* ``reduce_window_max`` over an array of rank 4 or more that pools fewer axes (the
  ImageNet stem's 3x3 max-pool over ``(B, H, W, C)``) pools a ``(B * C, H, W)`` view
  instead: jax2onnx 0.17 makes it a ``MaxPool`` with a kernel of the array's rank, and
  onnxruntime pools at most three dimensions.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from jax import lax
from jax.extend import core as jex_core

_CUSTOM_DERIVATIVES = ('custom_jvp_call', 'custom_vjp_call')
_CALLS = ('jit', 'pjit', 'closed_call', 'core_call')


def replay(closed: jex_core.ClosedJaxpr, *args: Any) -> list[Any]:
  """The outputs of ``closed`` on ``args``, re-bound primitive by primitive (see above)."""
  return _evaluate(closed.jaxpr, closed.consts, args)


def _is_var(atom: Any) -> bool:
  return isinstance(atom, jex_core.Var) and not isinstance(atom, jex_core.Literal)


def _evaluate(jaxpr: jex_core.Jaxpr, consts: Any, args: Any) -> list[Any]:
  env: dict[Any, Any] = {}

  def read(atom):
    return atom.val if isinstance(atom, jex_core.Literal) else env[atom]

  env.update(zip(jaxpr.constvars, consts, strict=True))
  env.update(zip(jaxpr.invars, args, strict=True))
  used = {v for eqn in jaxpr.eqns for v in eqn.invars if _is_var(v)}
  used |= {v for v in jaxpr.outvars if _is_var(v)}
  for eqn in jaxpr.eqns:
    invals = [read(v) for v in eqn.invars]
    name = eqn.primitive.name
    if name in _CUSTOM_DERIVATIVES:
      inner = eqn.params['call_jaxpr']
      outs = _evaluate(inner.jaxpr, inner.consts, invals)
    elif name in _CALLS and isinstance(eqn.params.get('jaxpr'), jex_core.ClosedJaxpr):
      inner = eqn.params['jaxpr']
      outs = _evaluate(inner.jaxpr, inner.consts, invals)
    elif name == 'while' and _loop_is_boundary(eqn, used):
      outs = _run_boundary_once(eqn, invals, used)
    elif name == 'reduce_window_max' and _pools_fewer_axes(eqn.params, invals[0].ndim):
      outs = [_max_pool_merged(invals[0], eqn.params)]
    elif name == 'pad' and _is_symbolic_edge_pad(invals[0], eqn.params['padding_config']):
      outs = [_pad_by_concatenation(invals[0], invals[1], eqn.params['padding_config'])]
    else:
      outs = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
      if not eqn.primitive.multiple_results:
        outs = [outs]
    env.update(zip(eqn.outvars, outs, strict=True))
  return [read(v) for v in jaxpr.outvars]


def _carry_dependent(jaxpr: jex_core.Jaxpr, num_consts: int) -> set[Any]:
  """The variables of a loop body that depend on its carry (inputs after the consts)."""
  dependent = set(jaxpr.invars[num_consts:])
  for eqn in jaxpr.eqns:
    if any(_is_var(v) and v in dependent for v in eqn.invars):
      dependent.update(eqn.outvars)
  return dependent


def _loop_is_boundary(eqn: jex_core.JaxprEqn, used: set[Any]) -> bool:
  body = eqn.params['body_jaxpr'].jaxpr
  dependent = _carry_dependent(body, eqn.params['body_nconsts'])
  return all(not (_is_var(out) and out in dependent)
             for outvar, out in zip(eqn.outvars, body.outvars, strict=True) if outvar in used)


def _run_boundary_once(eqn: jex_core.JaxprEqn, invals: list[Any], used: set[Any]
                       ) -> list[Any]:
  cond, body = eqn.params['cond_jaxpr'], eqn.params['body_jaxpr']
  cond_nconsts, body_nconsts = eqn.params['cond_nconsts'], eqn.params['body_nconsts']
  cond_consts = invals[:cond_nconsts]
  body_consts = invals[cond_nconsts:cond_nconsts + body_nconsts]
  init = invals[cond_nconsts + body_nconsts:]
  runs, = _evaluate(cond.jaxpr, cond.consts, [*cond_consts, *init])
  once = _evaluate(body.jaxpr, body.consts, [*body_consts, *init])
  return [lax.select_n(runs, start, end) if outvar in used else start
          for outvar, start, end in zip(eqn.outvars, init, once, strict=True)]


def primitives(jaxpr: jex_core.Jaxpr) -> Iterator[jex_core.JaxprEqn]:
  """Every equation of ``jaxpr`` and of the jaxprs nested in its equations' parameters."""
  for eqn in jaxpr.eqns:
    yield eqn
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        if isinstance(sub, jex_core.ClosedJaxpr):
          yield from primitives(sub.jaxpr)
        elif isinstance(sub, jex_core.Jaxpr):
          yield from primitives(sub)



def _is_symbolic_edge_pad(operand: Any, padding_config: Any) -> bool:
  return (not all(isinstance(d, int) for d in operand.shape) and
          all(low >= 0 and high >= 0 and interior == 0
              for low, high, interior in padding_config))


def _pad_by_concatenation(operand: Any, padding_value: Any, padding_config: Any) -> Any:
  for axis, (low, high, _) in enumerate(padding_config):
    parts = []
    for width, last in ((low, False), (high, True)):
      if width:
        shape = (*operand.shape[:axis], width, *operand.shape[axis + 1:])
        block = lax.broadcast_in_dim(padding_value, shape, ())
        parts.append(block) if last else parts.insert(0, block)
      if not last:
        parts.append(operand)
    if len(parts) > 1:
      operand = lax.concatenate(parts, axis)
  return operand


_WINDOW_PARAMS = ('window_dimensions', 'window_strides', 'padding', 'base_dilation',
                  'window_dilation')


def _pooled_axes(params: Any) -> list[int]:
  return [axis for axis, (window, stride, pad, base, dilation) in
          enumerate(zip(*(params[k] for k in _WINDOW_PARAMS), strict=True))
          if (window, stride, tuple(pad), base, dilation) != (1, 1, (0, 0), 1, 1)]


def _pools_fewer_axes(params: Any, ndim: int) -> bool:
  return ndim > 3 and len(_pooled_axes(params)) < ndim - 1


def _max_pool_merged(operand: Any, params: Any) -> Any:
  """The max-pool of ``operand`` over its pooled axes, computed on a view whose other
  axes are merged into one leading axis."""
  pooled = _pooled_axes(params)
  others = [axis for axis in range(operand.ndim) if axis not in pooled]
  moved = lax.transpose(operand, (*others, *pooled))
  other_shape = moved.shape[:len(others)]
  size = 1
  for dim in other_shape:
    size = size * dim
  merged = lax.reshape(moved, (size, *moved.shape[len(others):]))
  out = lax.reduce_window_max_p.bind(
      merged, **{k: (((0, 0),) if k == 'padding' else (1,)) +
                 tuple(tuple(params[k][a]) if k == 'padding' else params[k][a]
                       for a in pooled) for k in _WINDOW_PARAMS})
  out = lax.reshape(out, (*other_shape, *out.shape[1:]))
  order = [0] * operand.ndim
  for position, axis in enumerate((*others, *pooled)):
    order[axis] = position
  return lax.transpose(out, tuple(order))
