"""Orbax checkpoints of the train state plus the JSON needed to rebuild the model.

Layout: ``<workdir>/checkpoints/<step>/{state, meta}``. ``state`` is the train state as a
dict PyTree (step, params, batch_stats, opt_state, epoch running sums); ``meta`` is JSON:
``{'config': ..., 'model': <a cbam_jax.saving model description>, 'dataset': {...}}``;
:func:`load_model` rebuilds the model and reads only its variables. Kept: the last
``keep`` checkpoints plus the best by eval top-1. An unreadable latest checkpoint (killed
mid-write on a file system without atomic renames, a disk error, ...) is moved to
``<workdir>/corrupt_checkpoints`` with a warning and the previous one is used.
"""

from __future__ import annotations

import contextlib
import json
import logging as python_logging
import os
import shutil
import sys
import warnings
from collections.abc import Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from cbam_jax import saving
from experiments import cli

PyTree = Any

CHECKPOINT_SUBDIR = 'checkpoints'
CORRUPT_SUBDIR = 'corrupt_checkpoints'
BEST_METRIC = 'eval_top1'


class CheckpointWriteError(cli.UserError):
  """A checkpoint could not be written (a full disk, a read-only or vanished folder)."""


def _os_error(error: BaseException) -> OSError | None:
  """The OSError behind ``error`` (orbax wraps them), or None."""
  seen = set()
  while error is not None and id(error) not in seen:
    if isinstance(error, OSError):
      return error
    seen.add(id(error))
    error = error.__cause__ or error.__context__
  return None


def checkpoint_dir(workdir: str) -> str:
  """Where the checkpoints of ``workdir`` live (``workdir`` itself if it is that folder)."""
  workdir = os.path.abspath(workdir)
  if os.path.basename(workdir.rstrip('/')) == CHECKPOINT_SUBDIR:
    return workdir
  return os.path.join(workdir, CHECKPOINT_SUBDIR)


class _DropAbslMessage(python_logging.Filter):
  """Drops the absl log records (orbax logs through absl) whose message contains ``text``."""

  def __init__(self, text: str):
    super().__init__()
    self.text = text

  def filter(self, record: python_logging.LogRecord) -> bool:
    return self.text not in record.getMessage()


# Orbax warns for checkpoints saved without metrics. Mid-epoch checkpoints have no eval
# accuracy by design: they are resume points, never candidates for "best".
python_logging.getLogger('absl').addFilter(_DropAbslMessage('did not provide metrics'))
# Orbax logs an ERROR for each unreadable step it lists; the warning or error that follows
# (see Checkpoints) names those steps once.
python_logging.getLogger('absl').addFilter(_DropAbslMessage('Failed to json parse Metadata'))


@contextlib.contextmanager
def _read_only_without_warning():
  """While opening a manager with ``read_only=True``, which is what we asked for, drops the
  warning orbax logs about it ("Given directory is read only=...")."""
  drop = _DropAbslMessage('Given directory is read only')
  logger = python_logging.getLogger('absl')
  logger.addFilter(drop)
  try:
    yield
  finally:
    logger.removeFilter(drop)


def _drop_closed_event_loop_errors() -> None:
  """Silences the "Event loop is closed" errors that the reads of a failed restore report,
  once per array, when they finish after orbax closed its event loop (a traceback each on
  stderr, around the one useful warning). Other unraisable errors reach the previous hook."""
  previous = sys.unraisablehook
  if getattr(previous, 'drops_closed_event_loop', False):
    return

  def hook(unraisable):
    if (isinstance(unraisable.exc_value, RuntimeError)
        and str(unraisable.exc_value) == 'Event loop is closed'):
      return
    previous(unraisable)

  hook.drops_closed_event_loop = True
  sys.unraisablehook = hook


_drop_closed_event_loop_errors()


def _best_metric(metrics: Mapping[str, float]) -> float:
  return float(metrics[BEST_METRIC])


class Checkpoints:
  """``CheckpointManager`` for ``(state, meta)`` with last-N-plus-best retention.

  Args:
    directory: the checkpoints folder (see :func:`checkpoint_dir`).
    keep: how many of the most recent checkpoints to keep (the best one is kept as well).
    async_save: write in a background thread (training goes on meanwhile).
    read_only: for evaluation: never writes or deletes.
  """

  def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True,
               read_only: bool = False):
    if keep < 1:
      raise ValueError(f'keep_checkpoints must be >= 1 (the resume point); got {keep}.')
    self.directory = directory
    policy = ocp.checkpoint_managers.AnyPreservationPolicy([
        ocp.checkpoint_managers.LatestN(n=keep),
        ocp.checkpoint_managers.BestN(get_metric_fn=_best_metric, n=1,
                                      keep_checkpoints_without_metrics=False),
    ])
    options = ocp.CheckpointManagerOptions(
        best_fn=_best_metric, best_mode='max', preservation_policy=policy,
        enable_async_checkpointing=async_save, read_only=read_only, create=not read_only,
        save_interval_steps=0 if read_only else 1)
    self._options = options
    self.manager = self._open_manager()

  def _open_manager(self) -> ocp.CheckpointManager:
    def open_manager():
      quiet = _read_only_without_warning() if self._options.read_only else contextlib.nullcontext()
      with quiet:
        return ocp.CheckpointManager(self.directory, item_names=('state', 'meta'),
                                     options=self._options)

    try:
      return open_manager()
    except Exception as error:  # noqa: BLE001 - orbax reads every step's metadata here.
      unreadable = [step for step in _step_dirs(self.directory)
                    if not _metadata_readable(os.path.join(self.directory, str(step)))]
      if not unreadable:
        raise
      if self._options.read_only:
        raise FileNotFoundError(
            f'Cannot list the checkpoints in {self.directory}: the metadata of step(s) '
            f'{unreadable} cannot be read ({type(error).__name__}: {error}). Move those step '
            f'folders aside (to {self._corrupt_dir()}; resuming training does that), then '
            'pass --which.') from error
      self._set_aside(unreadable, f'{type(error).__name__}: {error}', reload=False)
      return open_manager()

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def best_step(self) -> int | None:
    return self.manager.best_step()

  def save(self, step: int, state: PyTree, meta: Mapping[str, Any],
           metrics: Mapping[str, float] | None = None) -> None:
    """Saves ``state`` (replicated arrays) and ``meta`` (JSON) at ``step``.

    ``metrics`` (with ``'eval_top1'``) make the checkpoint a candidate for "best".
    Must be called by every process.
    """
    if step in self.manager.all_steps():
      return  # Resumed exactly at a saved step: it is already on disk.
    # Host copies: the state is replicated, and orbax would otherwise split each array over
    # the replicas to write in parallel, compiling a slice per array and device (seconds on
    # CPU, for no gain where all devices share one host's memory).
    state = jax.device_get(state)
    with self._writing(step):
      self.manager.save(
          step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                        meta=ocp.args.JsonSave(dict(meta))),
          metrics=None if metrics is None else {k: float(v) for k, v in metrics.items()},
          force=True)

  @contextlib.contextmanager
  def _writing(self, step: int | None):
    """Turns an OSError of a write (no space left, read-only) into CheckpointWriteError."""
    try:
      yield
    except Exception as error:
      cause = _os_error(error)
      if cause is None:
        raise
      finished = [s for s in self.manager.all_steps() if s != step]
      kept = f'step {max(finished)}' if finished else 'none yet'
      raise CheckpointWriteError(
          f'Could not write the checkpoint{"" if step is None else f" of step {step}"} to '
          f'{self.directory}: {cause.strerror or cause}. The checkpoints written before '
          f'(latest: {kept}) are intact; free some space or make the folder writable (or use '
          'another --workdir), then rerun the same command to resume.') from error

  def restore(self, step: int, abstract_state: PyTree | None) -> tuple[PyTree, dict]:
    """``(state, meta)`` at ``step``; arrays laid out like ``abstract_state``'s shardings."""
    state_args = (ocp.args.StandardRestore() if abstract_state is None
                  else ocp.args.StandardRestore(abstract_state))
    restored = self.manager.restore(
        step, args=ocp.args.Composite(state=state_args, meta=ocp.args.JsonRestore()))
    return restored['state'], restored['meta']

  def restore_variables(self, step: int, abstract_variables: PyTree) -> PyTree:
    """Only ``{'params', 'batch_stats'}`` of the state at ``step`` (no optimiser state is
    read), laid out like ``abstract_variables`` (``jax.ShapeDtypeStruct`` leaves: numpy
    arrays, or jax arrays where they carry a sharding)."""
    restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_variables)
    restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=abstract_variables, restore_args=restore_args, partial_restore=True)))
    return dict(restored['state'])

  def choose_step(self, which: str | int = 'latest') -> int:
    """The step ``which`` names: ``'latest'``, ``'best'`` (best eval top-1) or a number.

    Raises:
      FileNotFoundError: no such checkpoint (the message lists the steps there).
      ValueError: ``which`` is none of those.
    """
    steps = self.all_steps()
    if which == 'latest':
      step = self.latest_step()
    elif which == 'best':
      step = self.best_step()
      if step is None and steps:
        raise FileNotFoundError(f'No checkpoint in {self.directory} has an eval top-1 to '
                                f'pick the best by (steps: {steps}); use --which=latest.')
    elif isinstance(which, int) or str(which).isdigit():
      step = int(which)
    else:
      raise ValueError(f"--which must be 'latest', 'best' or a step number; got {which!r}.")
    if step is None or step not in steps:
      raise FileNotFoundError(
          f'No checkpoint {"" if step is None else f"at step {step} "}in {self.directory} '
          f'(steps: {steps}); train first or pick one of those steps.')
    return step

  def restore_meta(self, step: int) -> dict:
    restored = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return restored['meta']

  def restore_latest(self, abstract_state: PyTree,
                     check_meta=None) -> tuple[int, PyTree, dict] | None:
    """The newest readable checkpoint as ``(step, state, meta)``; None when there is none.

    Unreadable newer checkpoints are moved to ``<workdir>/corrupt_checkpoints`` (with a
    warning) once an older one has been restored, so that training can write those steps
    again. ``check_meta(meta)`` may raise to refuse a readable checkpoint (e.g. of another
    model); that error propagates.

    Raises:
      RuntimeError: checkpoints exist but none of them can be read.
    """
    steps = self.all_steps()
    unreadable: list[tuple[int, str]] = []
    for step in reversed(steps):
      try:
        meta = self.restore_meta(step)
      except Exception as error:  # noqa: BLE001 - any read error means "try an older one".
        unreadable.append((step, f'{type(error).__name__}: {error}'))
        continue
      if check_meta is not None:
        check_meta(meta)
      try:
        state, meta = self.restore(step, abstract_state)
      except Exception as error:  # noqa: BLE001
        unreadable.append((step, f'{type(error).__name__}: {error}'))
        continue
      if unreadable:
        self._set_aside([s for s, _ in unreadable],
                        '; '.join(f'step {s}: {why}' for s, why in unreadable),
                        resumed_from=step)
      return step, state, meta
    if unreadable:
      raise RuntimeError(
          f'None of the checkpoints in {self.directory} (steps {steps}) can be read: '
          f'{unreadable[0][1][:300]}. Move them away (or use another --workdir) to start '
          'afresh.')
    return None

  def _corrupt_dir(self) -> str:
    return os.path.join(os.path.dirname(self.directory.rstrip('/')), CORRUPT_SUBDIR)

  def _set_aside(self, steps: list[int], reason: str, *, resumed_from: int | None = None,
                 reload: bool = True) -> None:
    """Moves unreadable step folders to ``corrupt_checkpoints`` (kept for inspection)."""
    if jax.process_index() == 0:
      os.makedirs(self._corrupt_dir(), exist_ok=True)
      for step in steps:
        target = os.path.join(self._corrupt_dir(), str(step))
        if os.path.exists(target):
          shutil.rmtree(target)
        shutil.move(os.path.join(self.directory, str(step)), target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices('cbam_jax_set_aside_corrupt_checkpoints')
    then = ('the newest readable one is used' if resumed_from is None
            else f'resuming from step {resumed_from} instead')
    warnings.warn(
        f'Checkpoint(s) at step(s) {steps} in {self.directory} could not be read and were '
        f'moved to {self._corrupt_dir()}; {then}. ({reason[:400]})', RuntimeWarning,
        stacklevel=3)
    if reload:
      self.manager.reload()

  def wait(self) -> None:
    """Blocks until background writes are on disk."""
    with self._writing(None):
      self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


def _step_dirs(directory: str) -> list[int]:
  if not os.path.isdir(directory):
    return []
  return sorted(int(name) for name in os.listdir(directory)
                if name.isdigit() and os.path.isdir(os.path.join(directory, name)))


def _metadata_readable(step_dir: str) -> bool:
  """Whether the JSON files orbax reads when it lists a step (metadata, metrics) parse."""
  for name in ('_CHECKPOINT_METADATA', os.path.join('metrics', 'metrics')):
    path = os.path.join(step_dir, name)
    if os.path.exists(path):
      try:
        with open(path) as f:
          json.load(f)
      except (OSError, ValueError):
        return False
  return True


def find_checkpoint(path: str) -> tuple[str, int | None]:
  """Resolves ``path`` (a workdir, its checkpoints folder, or one step folder).

  Returns:
    ``(checkpoints_dir, step)``; ``step`` is None unless ``path`` names one step folder.

  Raises:
    FileNotFoundError: ``path`` is not a directory.
  """
  path = os.path.abspath(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f'No checkpoint directory at {path}: point --workdir at a folder '
                            'written by python -m experiments.training.train --workdir DIR.')
  name = os.path.basename(path.rstrip('/'))
  if name.isdigit() and os.path.isdir(os.path.join(path, 'state')):
    return os.path.dirname(path.rstrip('/')), int(name)
  return checkpoint_dir(path), None


def load_model(path: str, which: str | int = 'latest', *, sharding: Any = None
               ) -> tuple[Any, dict[str, PyTree], dict[str, Any], int]:
  """The model of a training checkpoint and only its variables (for evaluation, inspection
  or fine-tuning; the optimiser state is not read).

  Args:
    path: a workdir, its checkpoints folder or one step folder (which then wins over
      ``which``).
    which: ``'latest'``, ``'best'`` or a step number (see :meth:`Checkpoints.choose_step`).
    sharding: where to put the arrays (e.g. replicated over a mesh); None: numpy arrays.

  Returns:
    ``(model, {'params', 'batch_stats'}, meta, step)``: the model is rebuilt from
    ``meta['model']``, a :mod:`cbam_jax.saving` model description, returned in its
    canonical form (:func:`cbam_jax.saving.canonical`, whatever format was saved).

  Raises:
    FileNotFoundError: no checkpoints folder at ``path`` or no such checkpoint in it.
  """
  directory, step = find_checkpoint(path)
  if not os.path.isdir(directory):
    raise FileNotFoundError(f'No checkpoints folder in {path}: point --workdir at a folder '
                            'written by python -m experiments.training.train --workdir DIR.')
  ckpts = Checkpoints(directory, read_only=True)
  try:
    if step is None and which == 'latest':
      ckpts.choose_step('latest')  # No checkpoint at all: the usual message.
      candidates = list(reversed(ckpts.all_steps()))  # Fall back to older ones.
    else:
      candidates = [ckpts.choose_step(which if step is None else step)]
    unreadable = []
    for step in candidates:
      try:
        model, variables, meta = _read_model(ckpts, step, sharding)
        break
      except Exception as error:  # noqa: BLE001 - any read error means "try an older one".
        unreadable.append((step, ' '.join(f'{type(error).__name__}: {error}'.split())[:300]))
    else:
      others = sorted(set(ckpts.all_steps()) - {s for s, _ in unreadable})
      hint = (f'pass --which with one of the other steps ({others})' if others else
              'retrain, or restore the checkpoints from a backup')
      raise FileNotFoundError(
          f'No readable checkpoint in {directory}: step(s) {[s for s, _ in unreadable]} could '
          f'not be read ({unreadable[0][1]}); {hint}.')
  finally:
    ckpts.close()
  if unreadable:
    warnings.warn(
        f'Checkpoint(s) at step(s) {[s for s, _ in unreadable]} in {directory} could not be '
        f'read ({unreadable[0][1]}); using step {step}, the newest readable one. Pass --which '
        'to choose another.', RuntimeWarning, stacklevel=2)
  return model, variables, meta, step


def _read_model(ckpts: Checkpoints, step: int, sharding: Any
                ) -> tuple[Any, dict[str, PyTree], dict[str, Any]]:
  meta = ckpts.restore_meta(step)
  description = meta['model'] = saving.canonical(meta['model'])
  model = saving.build(description)
  abstract = saving.abstract_variables(model, description.get('in_channels', 3))
  if sharding is not None:
    abstract = jax.tree.map(
        lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding), abstract)
  return model, ckpts.restore_variables(step, abstract), meta
