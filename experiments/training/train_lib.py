"""The training job behind ``experiments/training/train.py``: state, optimiser, steps and the loop.

Data parallel with ``jax.jit`` over a 1-D mesh (see ``experiments/training/distributed.py``).
Resuming is exact: the train state (including the running sums of the epoch's train
metrics) is checkpointed, and the input pipeline yields the same batches from any
``(epoch, step)``, so a run killed and restarted from its latest checkpoint ends with the
same parameters and metrics as an uninterrupted one.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import json
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from cbam_jax import models, saving
from experiments import cli
from experiments.configs import NO_ATTENTION
from experiments.data import pipeline as input_pipeline
from experiments.training import checkpointing, distributed, metrics, optimizer, pretrained

PyTree = Any

_DTYPES = ('float32', 'bfloat16', 'float16')
# config.on_nonfinite: what a non-finite loss or gradient does.
ON_NONFINITE = ('stop', 'skip')


class DivergedError(cli.UserError):
  """The loss or the parameters became NaN or infinite; the run stopped before saving them."""


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training (all replicated across devices).

  Attributes:
    step: int32 scalar, optimiser steps taken.
    params: the model's ``'params'`` collection.
    batch_stats: the model's ``'batch_stats'`` collection (BatchNorm running averages).
    opt_state: the optax state.
    epoch_sums: float32 scalars ``loss`` (sum of per-example losses), ``correct`` and
      ``count`` since the start of the current epoch; checkpointed so that a resumed epoch
      reports the same train metrics as an uninterrupted one.
  """

  step: jax.Array
  params: PyTree
  batch_stats: PyTree
  opt_state: PyTree
  epoch_sums: dict[str, jax.Array]

  def to_dict(self) -> dict[str, PyTree]:
    return {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}

  @classmethod
  def from_dict(cls, tree: Mapping[str, PyTree]) -> TrainState:
    return cls(**tree)


def zero_epoch_sums() -> dict[str, jax.Array]:
  return {name: jnp.zeros((), jnp.float32) for name in ('loss', 'correct', 'count')}


# --------------------------------------------------------------------------- config


def attention_from_config(value: Any) -> str | None:
  """``config.model.attention`` -> a registry name, or None for 'none'/''/None."""
  if value is None or (isinstance(value, str) and value.strip().lower() in NO_ATTENTION):
    return None
  return value


def model_description(config: ml_collections.ConfigDict, num_classes: int,
                      in_channels: int = 3) -> dict[str, Any]:
  """The :mod:`cbam_jax.saving` description (canonical: every field) of the model
  ``config.model`` asks for; nothing is built.

  ``config.model`` is ``name`` (a model of :func:`cbam_jax.models.available_models`) plus
  the fields of its backbone to change; saved with every checkpoint,
  :func:`cbam_jax.saving.build` builds the network from it.
  """
  # Unset placeholders (None) mean the model's default.
  fields = {k: v for k, v in config.model.to_dict().items() if v is not None}
  if 'attention_fields' in fields:
    fields['attention_fields'] = parse_attention_fields(fields['attention_fields'])
  if 'name' not in fields:
    raise ValueError('config.model.name is missing; set it to one of '
                     f'{", ".join(models.available_models())}.')
  name = fields.pop('name')
  fields['attention'] = attention_from_config(fields.get('attention'))
  fields['stage_attention'] = attention_from_config(fields.get('stage_attention'))
  fields['num_classes'] = int(num_classes)
  dtype = fields.get('dtype', 'float32')
  if dtype not in _DTYPES:
    raise ValueError(f'config.model.dtype={dtype!r} is not supported; use one of '
                     f'{", ".join(_DTYPES)}.')
  try:
    family = models.backbone_for_model(name).family
    return saving.canonical({'backbone': family, 'size': name, 'fields': fields,
                             'in_channels': int(in_channels)})
  except ValueError as error:
    raise ValueError(f'config.model: {error} Fields of config.model other than name are '
                     "fields of the named model's backbone.") from None


def parse_attention_fields(spec: str | Mapping[str, Any]) -> dict[str, Any]:
  """``'reduction_ratio=4,mlp_bias=False'`` -> ``{'reduction_ratio': 4, 'mlp_bias': False}``.

  Values are Python literals (numbers, True/False/None, quoted strings, tuples); a bare word
  is a string. A mapping (e.g. read back from a checkpoint) is returned as a dict.
  """
  if isinstance(spec, Mapping):
    return dict(spec)
  fields = {}
  for item in filter(None, (part.strip() for part in spec.split(','))):
    key, sep, value = item.partition('=')
    if not sep or not key.strip().isidentifier():
      raise ValueError(f'config.model.attention_fields={spec!r}: {item!r} is not FIELD=VALUE; '
                       'write e.g. --config.model.attention_fields=reduction_ratio=4,'
                       'mlp_bias=False.')
    try:
      fields[key.strip()] = ast.literal_eval(value.strip())
    except (ValueError, SyntaxError):
      fields[key.strip()] = value.strip()
  return fields


# --------------------------------------------------------------------------- steps


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
  """Per-example softmax cross-entropy. ``logits (B, K)``, int ``labels (B,)`` -> ``(B,)``."""
  targets = jax.nn.one_hot(labels, logits.shape[-1], dtype=jnp.float32)
  if label_smoothing:
    targets = optax.smooth_labels(targets, label_smoothing)
  return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)


def _variables(params: PyTree, batch_stats: PyTree) -> dict[str, PyTree]:
  return {'params': params, 'batch_stats': batch_stats} if batch_stats else {'params': params}


def train_step(state: TrainState, batch: Mapping[str, jax.Array], *, model: nn.Module,
               tx: optax.GradientTransformation, label_smoothing: float,
               skip_nonfinite: bool = False) -> TrainState:
  """One optimiser step on a global batch ``{'image': (B, H, W, C), 'label': (B,)}``.

  With ``skip_nonfinite``, a step whose loss or gradient norm is not finite changes nothing
  but the step counter (its examples are not counted in ``epoch_sums``).
  """

  def loss_fn(params):
    logits, updates = model.apply(_variables(params, state.batch_stats), batch['image'],
                                  train=True, mutable=['batch_stats'])
    losses = cross_entropy(logits, batch['label'], label_smoothing)
    return jnp.mean(losses), (losses, logits, updates.get('batch_stats', {}))

  (_, (losses, logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  correct = jnp.sum(jnp.argmax(logits, -1) == batch['label'])
  sums = state.epoch_sums
  epoch_sums = {'loss': sums['loss'] + jnp.sum(losses),
                'correct': sums['correct'] + correct.astype(jnp.float32),
                'count': sums['count'] + jnp.float32(losses.shape[0])}
  new_state = TrainState(step=state.step + 1, params=params, batch_stats=batch_stats,
                         opt_state=opt_state, epoch_sums=epoch_sums)
  if not skip_nonfinite:
    return new_state
  finite = jnp.isfinite(jnp.sum(losses)) & jnp.isfinite(optax.tree.norm(grads))
  kept = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
  return kept.replace(step=state.step + 1)


def eval_step(params: PyTree, batch_stats: PyTree, batch: Mapping[str, jax.Array], *,
              model: nn.Module) -> dict[str, jax.Array]:
  """Sums over the real (``mask == 1``) examples of a batch: loss, top1, top5, count."""
  logits = model.apply(_variables(params, batch_stats), batch['image'], train=False)
  labels, mask = batch['label'], batch['mask']
  k = min(5, logits.shape[-1])
  top_k = jax.lax.top_k(logits, k)[1]
  in_top_k = jnp.any(top_k == labels[:, None], axis=-1)
  return {'loss': jnp.sum(cross_entropy(logits, labels) * mask),
          'top1': jnp.sum((top_k[:, 0] == labels) * mask),
          'top5': jnp.sum(in_top_k * mask),
          'count': jnp.sum(mask)}


def evaluate(eval_fn: Callable[..., dict[str, jax.Array]], params: PyTree, batch_stats: PyTree,
             batches: Iterator[Mapping[str, np.ndarray]], mesh) -> dict[str, float]:
  """Top-1/top-5 accuracy and mean loss over every eval batch (all hosts)."""
  totals = None
  for local_batch in batches:
    batch = distributed.global_batch(local_batch, mesh, ('image', 'label', 'mask'))
    sums = eval_fn(params, batch_stats, batch)
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  if totals is None:
    raise ValueError('The evaluation split is empty; set config.eval_split or '
                     'config.holdout_fraction > 0.')
  totals = jax.device_get(totals)
  count = max(float(totals['count']), 1.0)
  return {'eval_loss': float(totals['loss']) / count, 'eval_top1': float(totals['top1']) / count,
          'eval_top5': float(totals['top5']) / count}


# --------------------------------------------------------------------------- state


def init_variables(model: nn.Module, image_shape: Sequence[int], seed: int) -> dict[str, PyTree]:
  return model.init(jax.random.key(seed), jnp.zeros((1, *image_shape), jnp.float32),
                    train=False)


def create_train_state(model: nn.Module, tx: optax.GradientTransformation,
                       image_shape: Sequence[int], seed: int) -> TrainState:
  variables = init_variables(model, image_shape, seed)
  params = variables['params']
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=variables.get('batch_stats', {}), opt_state=tx.init(params),
                    epoch_sums=zero_epoch_sums())


# --------------------------------------------------------------------------- logging


# --------------------------------------------------------------------------- the loop


def _check_workdir(workdir: str) -> None:
  """A clear error, before any work, for a workdir that cannot hold a run: a file, or a
  path under a folder it cannot be made in. Nothing is created here."""
  path = os.path.abspath(workdir)
  if os.path.exists(path) and not os.path.isdir(path):
    raise ValueError(f'--workdir {workdir} is a file; --workdir names the folder for the '
                     'checkpoints and metrics (made if missing).')
  existing = path
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
    raise ValueError(f'--workdir {workdir} cannot be written: {existing} is not a folder '
                     'this user can write to. Choose another --workdir.')


def _make_workdir(workdir: str) -> None:
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as error:
    raise ValueError(f'--workdir {workdir} cannot be created ({error.strerror}). Choose '
                     'another --workdir.') from error


def _check_config(config: ml_collections.ConfigDict) -> None:
  if config.num_epochs < 1:
    raise ValueError(f'config.num_epochs must be >= 1; got {config.num_epochs}.')
  if config.checkpoint_every_steps < 0:
    raise ValueError('config.checkpoint_every_steps must be >= 0 (0 = at epoch ends only).')
  if config.eval_every_epochs < 1:
    raise ValueError('config.eval_every_epochs must be >= 1.')
  if not 0.0 <= config.label_smoothing < 1.0:
    raise ValueError(f'config.label_smoothing must be in [0, 1); got {config.label_smoothing}.')
  if config.get('init_attention', 'identity') not in pretrained.INIT_ATTENTION:
    raise ValueError(f'config.init_attention={config.init_attention!r} is unknown; use '
                     f"'identity' (inserted attention starts as the identity) or 'official'.")
  if config.get('on_nonfinite', 'stop') not in ON_NONFINITE:
    raise ValueError(f'config.on_nonfinite={config.on_nonfinite!r} is not one of '
                     f'{", ".join(ON_NONFINITE)}.')


def _mean(sums: Mapping[str, Any], key: str) -> float:
  """``sums[key] / sums['count']``; NaN (without a warning) when nothing was counted."""
  return float(sums[key] / sums['count']) if sums['count'] else float('nan')


@jax.jit
def _all_finite(tree: PyTree) -> jax.Array:
  return jnp.all(jnp.asarray([jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree)]))


def _check_finite(config: ml_collections.ConfigDict, sums: Mapping[str, Any], step: int,
                  params: PyTree | None = None) -> None:
  """Raises DivergedError if the epoch's loss sum (or ``params``, when given) is not finite.

  The loss sum holds every step of the epoch so far, so one NaN step is caught at the next
  check (every ``log_every_steps``, and before every checkpoint).
  """
  loss = float(sums['loss'])
  if np.isfinite(loss) and (params is None or bool(_all_finite(params))):
    return
  what = f'the train loss is {loss}' if not np.isfinite(loss) else 'the parameters are not finite'
  raise DivergedError(
      f'Training diverged: {what} by step {step}; stopped without saving it. Likely causes: '
      f'a learning rate too high (config.learning_rate={config.learning_rate}), no gradient '
      f'clipping (config.grad_clip_norm={config.grad_clip_norm}), float16 overflow '
      f'(config.model.dtype), or non-finite input values. Lower the learning rate, or set '
      "config.on_nonfinite='skip' to skip such steps.")


def _fine_tuning(config: ml_collections.ConfigDict, description: dict[str, Any],
                 ) -> tuple[dict[str, Any], dict[str, PyTree] | None]:
  """``(the model to build, the config.init_from variables or None)``.

  Inserting attention that init_from lacks with ``config.init_attention='identity'`` changes
  the model (``identity_init=True``). The decision depends on init_from alone, so a resumed
  run (which starts from its own checkpoint) takes the same one.
  """
  if not config.init_from:
    return description, None
  variables, _ = pretrained.load_pretrained(config.init_from)
  return (pretrained.insertion_description(description, variables, config.init_attention),
          variables)


def _check_same_model(expected: Mapping[str, Any], directory: str) -> Callable[[dict], None]:
  def check(meta: dict) -> None:
    saved = meta.get('model')
    # Compared as canonical descriptions (every field filled in): one written before a
    # field existed, or in format 1, still matches.
    if saved is not None and not saving.same_model(saved, expected):
      raise ValueError(
          f'The checkpoints in {directory} are of another model ({saved}) than this config '
          f'asks for ({dict(expected)}). Use a new --workdir, or the config they were made '
          'with.')
  return check


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       devices: Sequence[jax.Device] | None = None) -> dict[str, Any]:
  """Trains (resuming from ``workdir`` if it holds checkpoints) and evaluates every epoch.

  Args:
    config: see ``experiments/configs/__init__.py``.
    workdir: checkpoints, ``metrics.jsonl``, TensorBoard events and ``config.json`` go here.
    devices: the devices to train on (default: all devices of all processes).

  Returns:
    The last epoch's metrics record, plus ``'best_eval_top1'``.
  """
  _check_config(config)
  _check_workdir(workdir)
  start_time = time.time()
  mesh = distributed.make_mesh(devices)
  distributed.check_batch_divides(config.global_batch_size, mesh, 'global_batch_size')
  eval_batch_size = config.get('eval_batch_size') or config.global_batch_size
  distributed.check_batch_divides(eval_batch_size, mesh, 'eval_batch_size')
  process_index, process_count = jax.process_index(), jax.process_count()
  is_chief = process_index == 0
  setup = metrics.SetupLog(enabled=is_chief)
  data = input_pipeline.create_input(config, process_index=process_index,
                                     process_count=process_count)
  setup.done(f'Data ready: {config.dataset}, {data.info.num_train} training examples')
  info, steps_per_epoch = data.info, data.steps_per_epoch
  if steps_per_epoch < 1:
    raise ValueError(f'The training split has {info.num_train} examples, fewer than one batch '
                     f'of global_batch_size={config.global_batch_size}; lower the batch size.')
  total_steps = config.num_epochs * steps_per_epoch

  fields = model_description(config, info.num_classes, info.image_shape[-1])
  fields, pretrained_variables = _fine_tuning(config, fields)
  model = saving.build(fields)  # The one build: resuming compares descriptions.
  tx, schedule = optimizer.create_optimizer(config, steps_per_epoch)
  replicated = distributed.replicated(mesh)
  batch_sharding = distributed.batch_sharded(mesh)

  init = jax.jit(functools.partial(create_train_state, model, tx, info.image_shape,
                                   config.seed), out_shardings=replicated)
  abstract_state = jax.eval_shape(init)
  state_shardings = jax.tree.map(lambda _: replicated, abstract_state)
  abstract_state = jax.tree.map(
      lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=replicated),
      abstract_state)

  _make_workdir(workdir)
  meta = {'config': json.loads(config.to_json_best_effort()), 'model': fields,
          'dataset': {'name': config.dataset, 'num_classes': info.num_classes,
                      'image_shape': list(info.image_shape),
                      'class_names': list(info.class_names)}}

  ckpts = checkpointing.Checkpoints(checkpointing.checkpoint_dir(workdir),
                                    keep=config.keep_checkpoints,
                                    async_save=config.async_checkpointing)
  restored = ckpts.restore_latest(abstract_state.to_dict(),
                                  check_meta=_check_same_model(fields, ckpts.directory))
  if restored is not None:
    step, state_dict, _ = restored
    state = TrainState.from_dict(state_dict)
    if is_chief:
      print(f'Resuming from step {step} ({ckpts.directory}).', flush=True)
  else:
    # Initialisation runs once: compile it without LLVM optimisations (5-8x faster to
    # compile on CPU; the values are deterministic for a given setting).
    state = init.lower().compile(compiler_options={'xla_backend_optimization_level': 0})()
    if pretrained_variables is not None:
      state = pretrained.init_from(state, config.init_from, pretrained_variables, fields,
                                   replicated, is_chief, partial=config.init_from_partial)

  if is_chief:  # Only now: a refused run (another model, a bad init_from) changes nothing.
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      json.dump(meta, f, indent=2)
  metrics_log = metrics.MetricsLog(
      workdir, tensorboard=metrics.tensorboard_on(config.tensorboard, is_chief), enabled=is_chief)
  start_step = int(jax.device_get(state.step))
  # A fresh start drops every line of an earlier attempt (its step-0 evaluation too).
  metrics_log.truncate_after(start_step if start_step else -1)

  step_fn = jax.jit(
      functools.partial(train_step, model=model, tx=tx, label_smoothing=config.label_smoothing,
                        skip_nonfinite=config.get('on_nonfinite', 'stop') == 'skip'),
      in_shardings=(state_shardings, batch_sharding), out_shardings=state_shardings)
  eval_fn = jax.jit(functools.partial(eval_step, model=model),
                    in_shardings=(state_shardings.params, state_shardings.batch_stats,
                                  batch_sharding), out_shardings=replicated)
  setup.done('Model state ready')
  setup.starting('Compiling the training step')
  # Compile ahead of time, so that step timings and images/s exclude compilation.
  compile_start = time.perf_counter()
  batch_spec = {
      'image': jax.ShapeDtypeStruct((config.global_batch_size, *info.image_shape), jnp.float32,
                                    sharding=batch_sharding),
      'label': jax.ShapeDtypeStruct((config.global_batch_size,), jnp.int32,
                                    sharding=batch_sharding)}
  step_fn = step_fn.lower(abstract_state, batch_spec).compile()
  compile_seconds = time.perf_counter() - compile_start
  setup.done('Compiled the training step')

  progress = metrics.Progress(enabled=is_chief and config.progress_bar)
  history = metrics.read_metrics(workdir) if is_chief and os.path.exists(metrics_log.path) else []
  best_top1 = max((r['eval_top1'] for r in history if r.get('eval_top1') is not None),
                  default=None)
  record: dict[str, Any] = history[-1] if history else {}
  if start_step == 0 and pretrained_variables is not None:
    # The network as fine-tuning receives it (e.g. right after inserting attention).
    record = {'epoch': 0, 'step': 0,
              **evaluate(eval_fn, state.params, state.batch_stats, data.eval_batches(), mesh),
              'wall_time': time.time()}
    metrics_log.write(record)
    if is_chief:
      print(f'epoch 0 (init_from, before training): eval loss {record["eval_loss"]:.4f} '
            f'top-1 {record["eval_top1"]:.4f}', flush=True)
  try:
    for epoch in range(start_step // steps_per_epoch, config.num_epochs):
      first_step = max(start_step - epoch * steps_per_epoch, 0)
      if first_step == 0:
        state = state.replace(epoch_sums=jax.device_put(zero_epoch_sums(), replicated))
      progress.start(epoch + 1, config.num_epochs, steps_per_epoch, first_step)
      epoch_start = time.perf_counter()
      input_wait = 0.0
      shown = 0  # Steps of this epoch the progress bar already counts (past first_step).
      step = epoch * steps_per_epoch + first_step
      # The pipeline computes the next batches on grain threads while the device computes.
      batches = data.train_batches(epoch, first_step)
      while True:
        fetch_start = time.perf_counter()
        local_batch = next(batches, None)
        if local_batch is None:
          break
        batch = distributed.global_batch(local_batch, mesh, ('image', 'label'))
        input_wait += time.perf_counter() - fetch_start
        state = step_fn(state, batch)
        step += 1
        if step % config.log_every_steps == 0 or step % steps_per_epoch == 0:
          sums = jax.device_get(state.epoch_sums)  # Waits for the device: not every step.
          _check_finite(config, sums, step)
          done = step - epoch * steps_per_epoch - first_step
          rate = done * config.global_batch_size / (time.perf_counter() - epoch_start)
          progress.update(done - shown, loss=f'{_mean(sums, "loss"):.4f}',
                          acc=f'{_mean(sums, "correct"):.3f}', img_s=f'{rate:.0f}')
          shown = done
        if (config.checkpoint_every_steps and step % config.checkpoint_every_steps == 0
            and step % steps_per_epoch != 0):
          _check_finite(config, jax.device_get(state.epoch_sums), step, state.params)
          ckpts.save(step, state.to_dict(), meta)
      if step != (epoch + 1) * steps_per_epoch:
        raise RuntimeError(f'The input pipeline yielded {step - epoch * steps_per_epoch} '
                           f'batches in epoch {epoch}; expected {steps_per_epoch}.')
      sums = jax.device_get(state.epoch_sums)
      epoch_seconds = time.perf_counter() - epoch_start
      progress.close()
      _check_finite(config, sums, step, state.params)
      skipped = round(float((step - epoch * steps_per_epoch) * config.global_batch_size
                            - sums['count']) / config.global_batch_size)
      if skipped:
        if skipped == steps_per_epoch:
          raise DivergedError(f'Training diverged: every step of epoch {epoch + 1} had a '
                              'non-finite loss or gradient and was skipped. Lower the '
                              'learning rate (config.learning_rate).')
        if is_chief:
          print(f'Skipped {skipped} step(s) of epoch {epoch + 1} with a non-finite loss or '
                "gradient (config.on_nonfinite='skip').", flush=True)
      record = {'epoch': epoch + 1, 'step': step,
                'train_loss': float(sums['loss'] / sums['count']),
                'train_accuracy': float(sums['correct'] / sums['count']),
                'learning_rate': float(schedule(step - 1))}
      if (epoch + 1) % config.eval_every_epochs == 0 or epoch + 1 == config.num_epochs:
        record.update(evaluate(eval_fn, state.params, state.batch_stats,
                               data.eval_batches(), mesh))
        best_top1 = max(best_top1 or 0.0, record['eval_top1'])
      images = (step - epoch * steps_per_epoch - first_step) * config.global_batch_size
      record.update({'images_per_sec': images / max(epoch_seconds, 1e-9),
                     'input_wait_fraction': input_wait / max(epoch_seconds, 1e-9),
                     'epoch_seconds': epoch_seconds, 'compile_seconds': compile_seconds,
                     'wall_time': time.time()})
      metrics_log.write(record)
      if is_chief:
        print(metrics.epoch_line(record, config.num_epochs), flush=True)
      # After the metrics line: a checkpoint at step S implies that line S is on disk.
      ckpts.save(step, state.to_dict(), meta,
                 metrics={'eval_top1': record['eval_top1']} if 'eval_top1' in record else None)
    ckpts.wait()
  finally:
    progress.close()
    ckpts.close()
    metrics_log.close()

  record = dict(record)
  record['best_eval_top1'] = best_top1
  if is_chief:
    print(metrics.summary_line(record, total_steps, time.time() - start_time), flush=True)
  return record


