"""What a training run reports: metrics.jsonl, TensorBoard, the progress bar and its lines."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from typing import Any

# metrics.jsonl keys that measure speed rather than results (they differ between runs).
TIMING_KEYS = ('images_per_sec', 'input_wait_fraction', 'epoch_seconds', 'compile_seconds',
               'wall_time')
METRICS_FILE = 'metrics.jsonl'


class MetricsLog:
  """``metrics.jsonl`` (one JSON object per epoch) and TensorBoard scalars, process 0 only."""

  def __init__(self, workdir: str, *, tensorboard: bool, enabled: bool):
    self.path = os.path.join(workdir, METRICS_FILE)
    self.enabled = enabled
    self._writer = None
    if enabled and tensorboard:
      self._writer = _TensorBoardWriter(os.path.join(workdir, 'tensorboard'))

  def truncate_after(self, step: int) -> None:
    """Drops lines written after the checkpoint being resumed from (they are redone)."""
    if not self.enabled or not os.path.exists(self.path):
      return
    with open(self.path) as f:
      lines = [line for line in f if line.strip()]
    kept = [line for line in lines if json.loads(line)['step'] <= step]
    if len(kept) != len(lines):
      with open(self.path, 'w') as f:
        f.writelines(kept)

  def write(self, record: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    with open(self.path, 'a') as f:
      f.write(json.dumps(record) + '\n')
    if self._writer is not None:
      self._writer.scalars(record['step'], {k: v for k, v in record.items()
                                            if k not in ('epoch', 'step', 'wall_time')})

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  """The records of ``<workdir>/metrics.jsonl``, in order."""
  with open(os.path.join(workdir, METRICS_FILE)) as f:
    return [json.loads(line) for line in f if line.strip()]


def tensorboard_on(setting: bool | None, is_chief: bool) -> bool:
  """config.tensorboard: True (needs TensorFlow), False, or None = on if TensorFlow is
  installed (a line says so when it is not)."""
  if setting is not None:
    return bool(setting)
  from experiments import extras

  if extras.tensorflow_installed():
    return True
  if is_chief:
    print(f'TensorBoard summaries off: TensorFlow is not installed ({extras.TF_EXTRA}); '
          'metrics.jsonl has every metric.', flush=True)
  return False


class _TensorBoardWriter:
  """Scalar event files through ``tf.summary.write`` (no ``tensorboard`` package needed)."""

  def __init__(self, logdir: str):
    from experiments import extras

    # Heavy import; only when TensorBoard output is on.
    tf = extras.import_tensorflow('TensorBoard summaries (config.tensorboard=True)')
    from tensorflow.core.framework import summary_pb2

    self._tf = tf
    self._metadata = summary_pb2.SummaryMetadata(
        plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name='scalars'))
    self._writer = tf.summary.create_file_writer(logdir)

  def scalars(self, step: int, values: Mapping[str, Any]) -> None:
    with self._writer.as_default():
      for name, value in values.items():
        if isinstance(value, (int, float)):
          self._tf.summary.write(name, self._tf.constant(float(value), self._tf.float32),
                                 step=step, metadata=self._metadata)
    self._writer.flush()

  def close(self) -> None:
    self._writer.close()


class Progress:
  """tqdm bar per epoch with loss / accuracy / images per second (process 0 only)."""

  def __init__(self, enabled: bool):
    self.enabled = enabled
    self._bar = None

  def start(self, epoch: int, num_epochs: int, steps: int, initial: int) -> None:
    if self.enabled:
      import tqdm

      self._bar = tqdm.tqdm(total=steps, initial=initial, desc=f'epoch {epoch}/{num_epochs}',
                            unit='step', leave=True, dynamic_ncols=True)

  def update(self, n: int, **postfix: Any) -> None:
    if self._bar is not None:
      if postfix:
        self._bar.set_postfix(postfix, refresh=False)
      self._bar.update(n)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
      self._bar = None


class SetupLog:
  """One line per set-up phase with its seconds (process 0), so that the minute before the
  first progress bar says what it does."""

  def __init__(self, enabled: bool):
    self._enabled, self._since = enabled, time.perf_counter()

  def starting(self, what: str) -> None:
    if self._enabled:
      print(f'{what} ...', flush=True)

  def done(self, what: str) -> None:
    """Prints ``what`` with the seconds since the previous line (or the start)."""
    now = time.perf_counter()
    if self._enabled:
      print(f'{what} ({now - self._since:.1f} s)', flush=True)
    self._since = now


def epoch_line(record: Mapping[str, Any], num_epochs: int) -> str:
  line = (f'epoch {record["epoch"]}/{num_epochs} step {record["step"]}: '
          f'train loss {record["train_loss"]:.4f} acc {record["train_accuracy"]:.4f}')
  if 'eval_top1' in record:
    line += (f' | eval loss {record["eval_loss"]:.4f} top-1 {record["eval_top1"]:.4f} '
             f'top-5 {record["eval_top5"]:.4f}')
  return line + (f' | {record["images_per_sec"]:.0f} img/s, input wait '
                 f'{100 * record["input_wait_fraction"]:.1f}%')


def summary_line(record: Mapping[str, Any], total_steps: int, seconds: float) -> str:
  if not record.get('step'):
    return 'Done: no epochs run.'
  parts = [f'Done: {record["epoch"]} epochs ({total_steps} steps)']
  if record.get('eval_top1') is not None:
    parts.append(f'eval top-1 {100 * record["eval_top1"]:.2f}% '
                 f'top-5 {100 * record["eval_top5"]:.2f}%')
  if record.get('best_eval_top1') is not None:
    parts.append(f'best top-1 {100 * record["best_eval_top1"]:.2f}%')
  if 'images_per_sec' in record:
    parts.append(f'last epoch {record["images_per_sec"]:.0f} img/s')
  if record.get('compile_seconds') is not None:
    parts.append(f'training step compiled in {record["compile_seconds"]:.1f} s')
  parts.append(f'{seconds:.1f} s in this process')
  return ', '.join(parts) + '.'
