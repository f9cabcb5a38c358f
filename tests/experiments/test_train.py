"""The training job: configs, optimiser, loop, checkpoints, resume, evaluation, errors.

Tiny models on tiny images: the cost is compilation, so most tests use ``resnet_tiny``
without attention on 16x16 images; the smoke-config test runs the CBAM model.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import chex
import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl import flags
from ml_collections import config_flags

from cbam_jax import saving
from experiments.configs import smoke
from experiments.training import checkpointing, evaluate, metrics, optimizer, pretrained, train_lib

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WORKER = os.path.join(REPO, 'tests', 'experiments', '_train_worker.py')

# 64 train / 32 eval examples of 16x16 'shapes', batches of 16: 4 steps per epoch.
TINY = {
    'image_size': 16, 'shapes.num_train': 64, 'shapes.num_eval': 32, 'global_batch_size': 16,
    'eval_batch_size': 16, 'model.attention': 'none', 'num_epochs': 2,
    'checkpoint_every_steps': 2, 'progress_bar': False, 'tensorboard': False,
}


def tiny_config(**overrides):
  config = smoke.get_config()
  config.update_from_flattened_dict({**TINY, **overrides})
  return config


def final_state(workdir: str, step: int | None = None) -> dict:
  ckpts = checkpointing.Checkpoints(checkpointing.checkpoint_dir(workdir), read_only=True)
  step = ckpts.latest_step() if step is None else step
  state, _ = ckpts.restore(step, None)
  ckpts.close()
  return jax.tree.map(np.asarray, state)


def results(records: list[dict]) -> list[dict]:
  """metrics.jsonl records without the speed measurements."""
  return [{k: v for k, v in r.items() if k not in metrics.TIMING_KEYS} for r in records]


def run_worker(workdir, overrides, *, devices=1, step_delay=0.0, distributed=None,
               compilation_cache=None):
  command = [sys.executable, WORKER, f'--workdir={workdir}',
             f'--config_json={json.dumps({**TINY, **overrides})}', f'--devices={devices}',
             f'--step_delay={step_delay}']
  if distributed:
    command += [f'--coordinator={distributed[0]}', f'--num_processes={distributed[1]}',
                f'--process_id={distributed[2]}']
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'TF_CPP_MIN_LOG_LEVEL': '3'}
  if compilation_cache:  # Later runs of the same program skip compilation.
    env.update(JAX_COMPILATION_CACHE_DIR=str(compilation_cache),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0')
  return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def finish(process, timeout=240):
  output, _ = process.communicate(timeout=timeout)
  assert process.returncode == 0, output[-3000:]
  return output


# --------------------------------------------------------------------------- unit level


def test_weight_decay_masks_biases_and_norms():
  params = {'conv': {'kernel': jnp.ones((3, 3, 2, 2))}, 'bn': {'scale': jnp.ones((2,)),
            'bias': jnp.ones((2,))}, 'fc': {'kernel': jnp.ones((2, 3)), 'bias': jnp.ones((3,))}}
  config = tiny_config(weight_decay=0.5, learning_rate=1.0, momentum=0.0,
                       lr_reference_batch_size=0, schedule='constant')
  tx, _ = optimizer.create_optimizer(config, steps_per_epoch=4)
  zero_grads = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zero_grads, tx.init(params), params)
  # With zero gradients only the decay moves parameters: -lr * wd * p on kernels only.
  chex.assert_trees_all_close(updates['conv']['kernel'], -0.5 * params['conv']['kernel'])
  chex.assert_trees_all_close(updates['fc']['kernel'], -0.5 * params['fc']['kernel'])
  for leaf in (updates['bn']['scale'], updates['bn']['bias'], updates['fc']['bias']):
    chex.assert_trees_all_close(leaf, jnp.zeros_like(leaf))


def test_step_schedule_warmup_and_batch_scaling():
  config = tiny_config(schedule='step', learning_rate=0.1, lr_reference_batch_size=8,
                       global_batch_size=16, warmup_epochs=1.0, num_epochs=10,
                       lr_decay_epochs=(3, 6), lr_decay_factor=0.1)
  schedule = optimizer.learning_rate_schedule(config, steps_per_epoch=10)
  # Peak 0.1 * 16 / 8 = 0.2, linear warmup over epoch 1, x0.1 at epochs 3 and 6.
  np.testing.assert_allclose(
      [schedule(s) for s in (0, 5, 10, 29, 30, 59, 60, 99)],
      [0.0, 0.1, 0.2, 0.2, 0.02, 0.02, 0.002, 0.002], rtol=1e-5)


def test_cosine_schedule_ends_at_zero():
  schedule = optimizer.learning_rate_schedule(
      tiny_config(learning_rate=0.4, lr_reference_batch_size=0, warmup_epochs=0.5,
                  num_epochs=2), steps_per_epoch=4)
  np.testing.assert_allclose([schedule(0), schedule(2), schedule(8)], [0.0, 0.4, 0.0],
                             atol=1e-7)


def test_adamw_and_clipping():
  params = {'kernel': jnp.ones((2, 2))}
  config = tiny_config(optimizer='adamw', grad_clip_norm=1e-3, learning_rate=0.1,
                       lr_reference_batch_size=0, schedule='constant', weight_decay=0.0)
  tx, _ = optimizer.create_optimizer(config, steps_per_epoch=4)
  updates, _ = tx.update({'kernel': jnp.full((2, 2), 100.0)}, tx.init(params), params)
  # Adam normalises the (clipped) gradient: the first step is -lr * sign(g).
  chex.assert_trees_all_close(updates['kernel'], jnp.full((2, 2), -0.1), rtol=1e-3)


def test_unknown_optimizer_and_schedule():
  with pytest.raises(ValueError, match='optimizer'):
    optimizer.create_optimizer(tiny_config(optimizer='lamb'), 4)
  with pytest.raises(ValueError, match='schedule'):
    optimizer.create_optimizer(tiny_config(schedule='linear'), 4)


def test_label_smoothing_loss():
  logits = jnp.array([[2.0, 0.0, -1.0]])
  smooth = train_lib.cross_entropy(logits, jnp.array([0]), label_smoothing=0.3)
  targets = jnp.array([[0.8, 0.1, 0.1]])
  expected = -jnp.sum(targets * jax.nn.log_softmax(logits))
  chex.assert_trees_all_close(smooth, expected[None], rtol=1e-6)


def test_model_description_attention_none_and_dtype():
  config = tiny_config()
  config.model.attention = 'None'
  config.model.dtype = 'bfloat16'
  description = train_lib.model_description(config, num_classes=6)
  fields = description['fields']
  assert fields['attention'] is None and fields['num_classes'] == 6
  assert description['size'] == 'resnet_tiny' and fields['dtype'] == 'bfloat16'
  model = saving.build(json.loads(json.dumps(description)))
  assert model.attention is None and model.dtype == jnp.bfloat16
  assert model.param_dtype == jnp.float32
  config.model.dtype = 'float8'
  with pytest.raises(ValueError, match='dtype'):
    train_lib.model_description(config, 6)
  config.model.dtype = 'float32'
  config.model.num_filter = 4
  with pytest.raises(ValueError, match="'num_filter' \\(did you mean 'num_filters'"):
    train_lib.model_description(config, 6)


def test_descriptions_written_before_a_field_existed_describe_the_same_model():
  description = train_lib.model_description(tiny_config(), num_classes=6)
  # What the trainer saved before descriptions listed every field: resuming such a run
  # must not be refused as "another model".
  old = {'name': 'resnet_tiny', 'attention': None, 'stage_attention': None,
         'dtype': 'float32', 'num_classes': 6}
  assert saving.same_model(old, description)
  assert not saving.same_model({**old, 'num_classes': 7}, description)


def test_parse_attention_fields():
  assert train_lib.parse_attention_fields(' reduction_ratio=4, mlp_bias=False,'
                                          'hidden_rounding=round,') == {
      'reduction_ratio': 4, 'mlp_bias': False, 'hidden_rounding': 'round'}
  assert train_lib.parse_attention_fields({'reduction_ratio': 8}) == {'reduction_ratio': 8}
  with pytest.raises(ValueError, match='not FIELD=VALUE'):
    train_lib.parse_attention_fields('reduction_ratio')


# ml_collections loads config files with importlib's deprecated load_module().
@pytest.mark.filterwarnings('ignore:the load_module:DeprecationWarning')
def test_variant_fields_from_the_command_line():
  argv = ['prog', f'--config={REPO}/experiments/configs/smoke.py',
          '--config.model.zero_init_spatial_gate=False',
          '--config.model.attention_fields=reduction_ratio=4']
  values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', flag_values=values, sys_argv=argv,
                                  lock_config=True)
  values(argv)
  fields = train_lib.model_description(values.config, num_classes=6)
  assert fields['fields']['zero_init_spatial_gate'] is False
  assert fields['fields']['attention_fields'] == {'reduction_ratio': 4}
  model = saving.build(json.loads(json.dumps(fields)))  # As from a checkpoint.
  assert model.zero_init_spatial_gate is False and model.attention_fields['reduction_ratio'] == 4
  hash(model)  # FrozenDict: the module stays hashable.


# ml_collections loads config files with importlib's deprecated load_module().
@pytest.mark.filterwarnings('ignore:the load_module:DeprecationWarning')
def test_config_files_and_command_line_overrides():
  for name in ('default', 'cifar10', 'imagenet', 'smoke'):
    argv = ['prog', f'--config={REPO}/experiments/configs/{name}.py',
            '--config.model.attention=none', '--config.num_epochs=3']
    values = flags.FlagValues()
    config_flags.DEFINE_config_file('config', flag_values=values, sys_argv=argv)
    values(argv)
    config = values.config
    assert config.num_epochs == 3
    assert train_lib.attention_from_config(config.model.attention) is None
  imagenet = config_flags.config_flags._LoadConfigModule(
      'imagenet', f'{REPO}/experiments/configs/imagenet.py').get_config()
  assert (imagenet.model.name, imagenet.global_batch_size, imagenet.num_epochs,
          imagenet.weight_decay, imagenet.momentum) == ('resnet50', 256, 90, 1e-4, 0.9)


# --------------------------------------------------------------------------- errors


def test_tensorboard_without_tensorflow_names_the_extra(tmp_path, monkeypatch, capsys):
  monkeypatch.setitem(sys.modules, 'tensorflow', None)  # `import tensorflow` fails
  with pytest.raises(ImportError, match=r"TensorBoard.*pip install -e '\.\[tf\]'"):
    metrics.MetricsLog(str(tmp_path), tensorboard=True, enabled=True)
  monkeypatch.setattr('importlib.util.find_spec', lambda name, *a: None)
  assert not metrics.tensorboard_on(None, is_chief=True)
  assert 'TensorBoard summaries off' in capsys.readouterr().out
  assert not metrics.tensorboard_on(False, is_chief=True)


def test_batch_that_does_not_divide_over_devices(tmp_path):
  with pytest.raises(ValueError, match=r'global_batch_size=12 does not divide over 8 devices'):
    train_lib.train_and_evaluate(tiny_config(global_batch_size=12), str(tmp_path))
  with pytest.raises(ValueError, match=r'eval_batch_size=20 does not divide'):
    train_lib.train_and_evaluate(tiny_config(eval_batch_size=20), str(tmp_path))
  with pytest.raises(ValueError, match=r'global_batch_size must be positive; got -8'):
    train_lib.train_and_evaluate(tiny_config(global_batch_size=-8), str(tmp_path))


def test_a_workdir_that_cannot_hold_a_run_is_refused_before_any_work(tmp_path):
  a_file = tmp_path / 'notes.txt'
  a_file.write_text('mine\n')
  with pytest.raises(ValueError, match=r'notes.txt is a file; --workdir names the folder'):
    train_lib.train_and_evaluate(tiny_config(), str(a_file))
  with pytest.raises(ValueError, match=r'notes.txt/run cannot be written: .*notes.txt is not a '
                                       r'folder this user can write to'):
    train_lib.train_and_evaluate(tiny_config(), str(a_file / 'run'))
  assert a_file.read_text() == 'mine\n' and os.listdir(tmp_path) == ['notes.txt']


def test_missing_dataset(tmp_path):
  config = tiny_config(dataset='folder', folder=str(tmp_path / 'no_such_folder'))
  with pytest.raises(FileNotFoundError, match='no_such_folder'):
    train_lib.train_and_evaluate(config, str(tmp_path / 'work'))


@pytest.mark.slow
def test_bad_config_key_on_the_command_line(tmp_path):
  process = subprocess.run(
      [sys.executable, '-m', 'experiments.training.train', '--config=experiments/configs/smoke.py',
       f'--workdir={tmp_path}', '--config.num_epoch=3'],
      cwd=REPO, capture_output=True, text=True, timeout=120,
      env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  assert process.returncode != 0
  last_line = process.stderr.strip().splitlines()[-1]
  assert 'Bad config override (--config.num_epoch=3)' in last_line, process.stderr[-2000:]
  assert 'Did you mean "num_epochs"' in last_line


def _snapshot(workdir):
  """Every file under ``workdir`` with its bytes and modification time."""
  files = {}
  for root, _, names in os.walk(workdir):
    for name in names:
      path = os.path.join(root, name)
      with open(path, 'rb') as f:
        files[os.path.relpath(path, workdir)] = (f.read(), os.stat(path).st_mtime_ns)
  return files


@pytest.mark.slow
def test_a_refused_run_changes_nothing_in_the_workdir(tmp_path):
  workdir = str(tmp_path / 'run')
  train_lib.train_and_evaluate(tiny_config(num_epochs=1, async_checkpointing=False), workdir)
  before = _snapshot(workdir)
  assert 'config.json' in before and 'metrics.jsonl' in before
  refusals = [  # Every way the trainer refuses a run, each into the same workdir.
      ({'model.attention': 'cbam'}, ValueError, 'another model'),
      ({'num_epochs': 0}, ValueError, 'num_epochs must be >= 1'),
      ({'global_batch_size': 12}, ValueError, 'does not divide'),
      ({'global_batch_size': 128, 'eval_batch_size': 16}, ValueError, 'exceeds the 64'),
      ({'dataset': 'folder', 'folder': str(tmp_path / 'nowhere')}, FileNotFoundError,
       'nowhere'),
      ({'model.name': 'resnet_tine'}, ValueError, 'resnet_tine'),
      ({'on_nonfinite': 'ignore'}, ValueError, 'on_nonfinite'),
      ({'keep_checkpoints': 0}, ValueError, 'keep_checkpoints'),
  ]
  for overrides, error, message in refusals:
    with pytest.raises(error, match=message):
      train_lib.train_and_evaluate(tiny_config(**{'num_epochs': 1, **overrides}), workdir)
    assert _snapshot(workdir) == before, overrides
  # A fresh workdir refused for a bad init_from gets no config.json either.
  fresh = str(tmp_path / 'fresh')
  with pytest.raises(FileNotFoundError, match='init_from'):
    train_lib.train_and_evaluate(tiny_config(init_from=str(tmp_path / 'none')), fresh)
  assert not os.path.exists(os.path.join(fresh, 'config.json'))

  # A save killed halfway leaves orbax's temporary folder (renamed into place only when
  # complete): readers do not see it, and the latest complete checkpoint is used.
  checkpoints = checkpointing.checkpoint_dir(workdir)
  partial = os.path.join(checkpoints, '6.orbax-checkpoint-tmp-1234567890')
  shutil.copytree(os.path.join(checkpoints, '4'), partial)
  shutil.rmtree(os.path.join(partial, 'meta'))
  assert checkpointing.load_model(workdir)[3] == 4

  # The latest checkpoint's arrays zeroed: evaluation falls back to the newest readable one
  # and says so; asked for that step, it names the folder and --which.
  for root, _, names in os.walk(os.path.join(checkpointing.checkpoint_dir(workdir), '4', 'state')):
    for name in names:
      if 'ocdbt' in root or os.sep + 'd' in root:
        path = os.path.join(root, name)
        with open(path, 'wb') as f:
          f.write(bytes(os.path.getsize(path)) or b'\0')
  with pytest.warns(RuntimeWarning, match=r'step\(s\) \[4\] .* using step 2, the newest readable'):
    _, _, _, step = checkpointing.load_model(workdir)
  assert step == 2
  with pytest.raises(FileNotFoundError, match=r'No readable checkpoint in .*checkpoints: '
                     r'step\(s\) \[4\] could not be read .*pass --which with one of the other '
                     r'steps \(\[2\]\)'):
    checkpointing.load_model(workdir, '4')
  # Metadata that orbax cannot even list: a read-only reader says what to do.
  for name in ('_CHECKPOINT_METADATA', os.path.join('metrics', 'metrics')):
    with open(os.path.join(checkpoints, '4', name), 'w') as f:
      f.write('garbage')
  with pytest.raises(FileNotFoundError, match=r'Cannot list the checkpoints in .*: the metadata '
                     r'of step\(s\) \[4\] cannot be read .*Move those step folders aside'):
    checkpointing.load_model(workdir)


@pytest.mark.slow
def test_a_diverged_run_stops_without_saving_a_nonfinite_checkpoint(tmp_path):
  config = tiny_config(learning_rate=1e30, lr_reference_batch_size=0, num_epochs=1,
                       async_checkpointing=False, log_every_steps=1, checkpoint_every_steps=1)
  workdir = str(tmp_path / 'nan')
  with pytest.raises(train_lib.DivergedError,
                     match=r'Training diverged: .* by step \d+; stopped without saving it\. '
                           r'Likely causes: a learning rate too high \(config.learning_rate='):
    train_lib.train_and_evaluate(config, workdir)
  ckpts = checkpointing.Checkpoints(checkpointing.checkpoint_dir(workdir), read_only=True)
  steps = ckpts.all_steps()
  ckpts.close()
  assert len(steps) < 4  # It stopped before the end of the epoch.
  for step in steps:
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(final_state(workdir, step)))


class _TinyClassifier(flax.linen.Module):
  """BatchNorm and a Dense head: what train_step needs, compiled in a blink."""

  @flax.linen.compact
  def __call__(self, x, train=False):
    x = flax.linen.BatchNorm(use_running_average=not train)(x.reshape(x.shape[0], -1))
    return flax.linen.Dense(6)(x)


def test_skip_nonfinite_keeps_the_state_of_a_bad_step():
  model, tx = _TinyClassifier(), optax.sgd(0.1)
  state = jax.jit(functools.partial(train_lib.create_train_state, model, tx, (8, 8, 3), 0))()
  batch = {'image': jax.random.normal(jax.random.key(1), (4, 8, 8, 3)),
           'label': jnp.zeros(4, jnp.int32)}
  step = jax.jit(functools.partial(train_lib.train_step, model=model, tx=tx, label_smoothing=0.0,
                                   skip_nonfinite=True))
  good = step(state, batch)
  assert int(good.step) == 1 and float(good.epoch_sums['count']) == 4
  assert not np.array_equal(good.params['Dense_0']['kernel'], state.params['Dense_0']['kernel'])
  bad = step(state, {**batch, 'image': batch['image'].at[0, 0, 0, 0].set(jnp.nan)})
  assert int(bad.step) == 1
  chex.assert_trees_all_equal(bad.replace(step=state.step), state)


# Injected, as orbax reports them: this machine's tests run as root, whom no folder refuses.
@pytest.mark.parametrize('code, reason', [(errno.ENOSPC, 'No space left on device'),
                                          (errno.EROFS, 'Read-only file system')],
                         ids=['full_disk', 'read_only'])
def test_a_failed_write_during_a_save_is_one_clear_error_and_keeps_the_last_checkpoint(
    tmp_path, monkeypatch, code, reason):
  ckpts = checkpointing.Checkpoints(str(tmp_path / 'checkpoints'), async_save=False)
  state = {'params': {'w': np.arange(4, dtype=np.float32)}}
  ckpts.save(1, state, {'model': {}})
  save = ckpts.manager.save

  def full_disk(step, *args, **kwargs):
    if step == 2:  # Orbax wraps the OSError of the failed write.
      raise RuntimeError('write failed') from OSError(code, reason)
    return save(step, *args, **kwargs)

  monkeypatch.setattr(ckpts.manager, 'save', full_disk)
  with pytest.raises(checkpointing.CheckpointWriteError,
                     match=rf'Could not write the checkpoint of step 2 to .*checkpoints: {reason}'
                           r'\. The checkpoints written before \(latest: step 1\) are intact; '
                           r'free some space or make the folder writable .* rerun the same '
                           r'command to resume\.'):
    ckpts.save(2, state, {'model': {}})
  assert ckpts.all_steps() == [1]
  restored, _ = ckpts.restore(1, None)
  np.testing.assert_array_equal(restored['params']['w'], state['params']['w'])
  ckpts.close()


_KILLED_DURING_SAVE = """
import os, signal, sys, threading, time
import numpy as np
from experiments.training import checkpointing

directory = sys.argv[1]
ckpts = checkpointing.Checkpoints(directory, async_save=False)
ckpts.save(1, {'params': {'w': np.arange(4, dtype=np.float32)}}, {'model': {}})


def kill_once_writing():  # SIGKILL as soon as step 2's files appear, before they are complete.
  while not any(name.startswith('2') for name in os.listdir(directory)):
    time.sleep(0.0005)
  os.kill(os.getpid(), signal.SIGKILL)


threading.Thread(target=kill_once_writing, daemon=True).start()
ckpts.save(2, {'params': {'w': np.ones((64, 1024, 1024), np.float32)}}, {'model': {}})
print('the save finished before the kill')
"""


@pytest.mark.slow
def test_sigkill_during_a_save_keeps_the_previous_checkpoint_for_the_resume(tmp_path):
  directory = str(tmp_path / 'checkpoints')
  result = subprocess.run([sys.executable, '-c', _KILLED_DURING_SAVE, directory], cwd=REPO,
                          env={**os.environ, 'JAX_PLATFORMS': 'cpu'}, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == -signal.SIGKILL, result.stdout + result.stderr
  assert any(name.startswith('2') for name in os.listdir(directory))  # Killed mid-write.
  ckpts = checkpointing.Checkpoints(directory, async_save=False)
  assert ckpts.all_steps() == [1]  # What a resume reads: the complete checkpoint only.
  restored, _ = ckpts.restore(1, None)
  np.testing.assert_array_equal(restored['params']['w'], np.arange(4, dtype=np.float32))
  ckpts.save(2, restored, {'model': {}})  # And the run goes on from it.
  assert ckpts.all_steps() == [1, 2]
  ckpts.close()


# --------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_smoke_config_end_to_end(tmp_path):
  workdir = str(tmp_path)
  config = smoke.get_config()
  config.progress_bar = False
  final = train_lib.train_and_evaluate(config, workdir)

  records = metrics.read_metrics(workdir)
  steps_per_epoch = config.shapes.num_train // config.global_batch_size
  assert [r['epoch'] for r in records] == list(range(1, config.num_epochs + 1))
  assert [r['step'] for r in records] == [e * steps_per_epoch for e in (1, 2)]
  for record in records:
    for key in ('train_loss', 'train_accuracy', 'eval_loss', 'eval_top1', 'eval_top5',
                'learning_rate', *metrics.TIMING_KEYS):
      assert np.isfinite(record[key]), (key, record)
    assert 0 <= record['eval_top1'] <= record['eval_top5'] <= 1
    assert 0 <= record['train_accuracy'] <= 1 and record['images_per_sec'] > 0
    assert 0 <= record['input_wait_fraction'] <= 1
  assert final['eval_top1'] == records[-1]['eval_top1']
  assert final['best_eval_top1'] == max(r['eval_top1'] for r in records)
  assert os.listdir(os.path.join(workdir, 'tensorboard'))
  with open(os.path.join(workdir, 'config.json')) as f:
    meta = json.load(f)
  assert meta['model']['fields']['attention'] == 'cbam'
  assert meta['model']['fields']['num_classes'] == 6
  # Mid-epoch checkpoints every 4 steps plus epoch ends; the last 3 (+ the best) are kept.
  steps = checkpointing.Checkpoints(checkpointing.checkpoint_dir(workdir),
                                    read_only=True).all_steps()
  assert steps[-1] == config.num_epochs * steps_per_epoch and len(steps) <= 4

  # Evaluation-only mode rebuilds the model from the checkpoint and agrees with training.
  latest = evaluate.evaluate_checkpoint(workdir, 'latest')
  assert latest['step'] == records[-1]['step']
  np.testing.assert_allclose([latest['eval_top1'], latest['eval_top5'], latest['eval_loss']],
                             [records[-1][k] for k in ('eval_top1', 'eval_top5', 'eval_loss')],
                             rtol=1e-5)
  best = evaluate.evaluate_checkpoint(workdir, 'best')
  assert best['eval_top1'] == max(r['eval_top1'] for r in records)
  with pytest.raises(FileNotFoundError, match='No checkpoint at step 3'):
    evaluate.evaluate_checkpoint(workdir, '3')


@pytest.mark.slow
def test_one_step_on_mock_cifar10(tmp_path):
  tfds = pytest.importorskip('tensorflow_datasets')
  config = tiny_config(dataset='cifar10', num_epochs=1, image_size=32, augment='cifar',
                       checkpoint_every_steps=0, eval_split='test')
  with tfds.testing.mock_data(num_examples=16):
    final = train_lib.train_and_evaluate(config, str(tmp_path))
  assert final['step'] == 1 and np.isfinite(final['train_loss'])
  assert final_state(str(tmp_path))['step'] == 1


@pytest.mark.slow
def test_image_folder_end_to_end(tmp_path):
  image_lib = pytest.importorskip('PIL.Image')
  rng = np.random.default_rng(0)
  for split, count in (('train', 16), ('test', 8)):
    for label, colour in enumerate(((255, 0, 0), (0, 0, 255))):
      os.makedirs(tmp_path / 'images' / split / f'class{label}')
      for i in range(count):
        pixels = np.clip(rng.normal(colour, 30, (8, 8, 3)), 0, 255).astype(np.uint8)
        image_lib.fromarray(pixels).save(tmp_path / 'images' / split / f'class{label}' / f'{i}.png')
  config = tiny_config(dataset='folder', folder=str(tmp_path / 'images'), eval_split='test',
                       num_epochs=2, learning_rate=0.1, augment='none')
  final = train_lib.train_and_evaluate(config, str(tmp_path / 'work'))
  records = metrics.read_metrics(str(tmp_path / 'work'))
  assert [r['step'] for r in records] == [2, 4]
  assert final['eval_top1'] == records[-1]['eval_top1'] and 0 <= final['eval_top1'] <= 1


SHARED_TARBALL = os.path.join(REPO, '..', 'shared', 'data', 'cifar10-jpeg-train.tar.gz')
# A sitecustomize under which TensorFlow looks not installed (`import tensorflow` fails and
# importlib.util.find_spec finds nothing).
_NO_TENSORFLOW = """
import importlib.machinery

_find_spec = importlib.machinery.PathFinder.find_spec


def _find_spec_without_tensorflow(fullname, path=None, target=None):
  if fullname == 'tensorflow' or fullname.startswith('tensorflow.'):
    return None
  return _find_spec(fullname, path, target)


importlib.machinery.PathFinder.find_spec = staticmethod(_find_spec_without_tensorflow)
"""


def _capped_cifar10_archive(path, per_class):
  """The first `per_class` images of each class of the shared tarball, as a new .tar.gz."""
  import tarfile

  taken = {}
  with tarfile.open(SHARED_TARBALL) as source, tarfile.open(path, 'w:gz') as target:
    for member in source:
      if member.isfile():
        cls = member.name.split('/')[-2]
        if taken.get(cls, 0) >= per_class:
          continue
        taken[cls] = taken.get(cls, 0) + 1
      target.addfile(member, source.extractfile(member) if member.isfile() else None)


@pytest.mark.slow
@pytest.mark.parametrize('source', ['generated', 'shared_tarball'])
def test_folder_training_without_tensorflow(tmp_path, source, monkeypatch):
  # The trainer runs on an image folder (or a .tar.gz of real CIFAR-10 JPEGs) where
  # `import tensorflow` fails; its decoded arrays, and so its batches, equal the former
  # TensorFlow path's (tfds ImageFolder + tf.image).
  from experiments.data import pipeline as input_pipeline
  from experiments.data import sources
  from tests.experiments.test_input_pipeline import tensorflow_folder_arrays

  image_lib = pytest.importorskip('PIL.Image')
  if source == 'generated':
    rng = np.random.default_rng(0)
    folder = tmp_path / 'images'
    for split, count in (('train', 16), ('test', 8)):
      for label in range(2):
        os.makedirs(folder / split / f'class{label}')
        for i in range(count):
          pixels = rng.integers(0, 256, (int(rng.integers(12, 30)), 20, 3), dtype=np.uint8)
          image_lib.fromarray(pixels).save(folder / split / f'class{label}' / f'{i}.jpg')
    overrides = {'eval_split': 'test', 'augment': 'flip'}
  else:
    if not os.path.exists(SHARED_TARBALL):
      pytest.skip('shared CIFAR-10 tarball missing')
    folder = tmp_path / 'cifar10-capped.tar.gz'
    _capped_cifar10_archive(folder, per_class=40)
    overrides = {'eval_split': None, 'holdout_fraction': 0.2, 'image_size': 32,
                 'augment': 'cifar', 'global_batch_size': 64, 'eval_batch_size': 64}
  overrides.update(dataset='folder', folder=str(folder), cache_dir=str(tmp_path / 'cache'),
                   num_epochs=1, tensorboard=None)
  blocker = tmp_path / 'no_tensorflow'
  blocker.mkdir()
  (blocker / 'sitecustomize.py').write_text(_NO_TENSORFLOW)
  monkeypatch.setenv('PYTHONPATH', os.pathsep.join(
    [str(blocker)] + [p for p in os.environ.get('PYTHONPATH', '').split(os.pathsep) if p]))
  output = finish(run_worker(tmp_path / 'work', overrides))
  assert 'tensorflow imported: False' in output and 'TensorBoard summaries off' in output
  records = metrics.read_metrics(str(tmp_path / 'work'))
  assert len(records) == 1 and np.isfinite(records[0]['train_loss'])

  # Batches from the arrays the TensorFlow-free run decoded (its array cache) equal batches
  # from the TensorFlow path's arrays.
  config = tiny_config(**overrides)
  root = sources.resolve_folder(str(folder), config.cache_dir)
  without_tf = input_pipeline.create_input(config)
  splits = ['train'] + (['test'] if overrides['eval_split'] else [])
  size = without_tf.info.image_shape[0]
  reference = {'class_names': np.array(without_tf.info.class_names),
               'image_size': np.int64(size), 'kind': np.array(config.augment)}
  for split in splits:
    images, labels, names = tensorflow_folder_arrays(root, split, size)
    assert names == without_tf.info.class_names
    reference[f'{split}/image'], reference[f'{split}/label'] = images, labels
  monkeypatch.setattr(input_pipeline, '_decode_folder', lambda *args: reference)
  config.cache_arrays = False
  with_tf = input_pipeline.create_input(config)
  for epoch in (0, 1):
    for a, b in zip(with_tf.train_batches(epoch), without_tf.train_batches(epoch), strict=True):
      for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
  for a, b in zip(with_tf.eval_batches(), without_tf.eval_batches(), strict=True):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def _corrupt(folder):
  for root, _, files in os.walk(folder):
    for name in files:
      with open(os.path.join(root, name), 'wb') as f:
        f.write(b'\x00garbage')


@pytest.mark.slow
def test_corrupt_checkpoints_fall_back_and_init_from(tmp_path, capsys):
  config = tiny_config(num_epochs=3, checkpoint_every_steps=0, async_checkpointing=False)
  workdir = str(tmp_path / 'run')
  train_lib.train_and_evaluate(config, workdir)
  reference, records = final_state(workdir), metrics.read_metrics(workdir)
  checkpoints = checkpointing.checkpoint_dir(workdir)
  assert sorted(os.listdir(checkpoints)) == ['12', '4', '8']
  _corrupt(os.path.join(checkpoints, '12', 'state'))  # Arrays unreadable, metadata fine.
  _corrupt(os.path.join(checkpoints, '8'))  # Nothing readable: orbax cannot even list it.
  capsys.readouterr()
  with pytest.warns(RuntimeWarning) as caught:
    train_lib.train_and_evaluate(config, workdir)
  messages = [str(w.message) for w in caught]
  assert any('step(s) [8]' in m for m in messages), messages
  assert any('step(s) [12]' in m and 'resuming from step 4' in m for m in messages), messages
  out = capsys.readouterr().out
  assert 'Resuming from step 4' in out
  # One line per set-up phase, with its time; the compile time again in the summary.
  assert 'Data ready: shapes' in out and 'Compiling the training step ...' in out
  assert 'Compiled the training step (' in out and 'training step compiled in' in out
  assert sorted(os.listdir(os.path.join(str(tmp_path / 'run'),
                                        checkpointing.CORRUPT_SUBDIR))) == ['12', '8']
  # Epochs 2 and 3 were trained again, to the same result.
  chex.assert_trees_all_equal(final_state(workdir), reference)
  assert results(metrics.read_metrics(workdir)) == results(records)

  # Fine-tuning from that workdir with lr 0 (weight decay is scaled by lr too) keeps the
  # pretrained parameters exactly.
  config = tiny_config(init_from=workdir, num_epochs=1, learning_rate=0.0,
                       checkpoint_every_steps=0)
  train_lib.train_and_evaluate(config, str(tmp_path / 'finetune'))
  chex.assert_trees_all_equal(final_state(str(tmp_path / 'finetune'))['params'],
                              reference['params'])


@pytest.mark.slow
def test_kill_and_resume_is_bit_exact(tmp_path):
  overrides, cache = {'num_epochs': 2}, tmp_path / 'compilation_cache'
  uninterrupted = run_worker(tmp_path / 'a', overrides, compilation_cache=cache)
  killed = run_worker(tmp_path / 'b', overrides, step_delay=0.5, compilation_cache=cache)
  first_checkpoint = tmp_path / 'b' / 'checkpoints' / '2'
  deadline = time.monotonic() + 240
  while not first_checkpoint.is_dir() and killed.poll() is None:
    assert time.monotonic() < deadline, 'no checkpoint appeared'
    time.sleep(0.02)
  killed.send_signal(signal.SIGKILL)
  killed.communicate()
  assert killed.returncode == -signal.SIGKILL
  assert not (tmp_path / 'b' / 'checkpoints' / '4').exists()  # Killed mid-epoch 1.
  finish(run_worker(tmp_path / 'b', overrides, compilation_cache=cache))
  finish(uninterrupted)
  chex.assert_trees_all_equal(final_state(str(tmp_path / 'b')), final_state(str(tmp_path / 'a')))
  resumed = metrics.read_metrics(str(tmp_path / 'b'))
  assert [r['epoch'] for r in resumed] == [1, 2]
  assert results(resumed) == results(metrics.read_metrics(str(tmp_path / 'a')))


@pytest.mark.slow
def test_same_result_on_1_device_8_devices_and_2_processes(tmp_path):
  assert jax.device_count() == 8
  with socket.socket() as probe:
    probe.bind(('127.0.0.1', 0))
    port = probe.getsockname()[1]
  # Two processes with 2 CPU devices each, in the background while this one trains.
  workers = [run_worker(tmp_path / 'two_processes', {}, devices=2,
                        distributed=(f'127.0.0.1:{port}', 2, i)) for i in range(2)]
  train_lib.train_and_evaluate(tiny_config(), str(tmp_path / 'one'), devices=jax.devices()[:1])
  train_lib.train_and_evaluate(tiny_config(), str(tmp_path / 'eight'))
  outputs = [finish(worker) for worker in workers]
  assert 'Done:' in outputs[0] and 'Done:' not in outputs[1]  # Process 0 reports.

  one = final_state(str(tmp_path / 'one'))
  assert one['step'] == 8
  for other in ('eight', 'two_processes'):
    # Reductions (BatchNorm statistics, gradients) are summed in another order.
    chex.assert_trees_all_close(final_state(str(tmp_path / other)), one, atol=1e-5, rtol=1e-5)
    assert len(metrics.read_metrics(str(tmp_path / other))) == 2


def test_load_pretrained_from_a_saved_model(tmp_path):
  from cbam_jax import models

  model = models.create_model('resnet_tiny', num_classes=6)
  # Random arrays of the right shapes (no compilation needed, unlike model.init).
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
  rng = np.random.default_rng(3)
  variables = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(s.dtype), shapes)
  saving.save(tmp_path, model, variables)
  loaded, description = pretrained.load_pretrained(str(tmp_path))
  chex.assert_trees_all_equal(jax.tree.map(np.asarray, loaded),
                              jax.tree.map(np.asarray, dict(variables)))
  assert description['fields']['num_classes'] == 6
  with pytest.raises(FileNotFoundError, match='init_from'):
    pretrained.load_pretrained(str(tmp_path / 'missing'))


# ---------------------------------------------------------------- init_from: strict loading


@flax.struct.dataclass
class _Weights:
  params: dict
  batch_stats: dict


def _abstract_weights(name, value, **fields):
  """``{'params', 'batch_stats'}`` of a model, every array filled with ``value`` (no
  compilation: shapes by ``jax.eval_shape``), and the model's description."""
  from cbam_jax import models

  model = models.create_model(name, **fields)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
  variables = jax.tree.map(lambda s: np.full(s.shape, value, s.dtype), shapes)
  return variables, saving.describe(model)


def test_init_from_inserts_attention_and_a_new_head_but_refuses_another_architecture(capsys):
  replicated = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  plain, _ = _abstract_weights('resnet_tiny', 1.0, attention=None, num_classes=6)
  fresh, description = _abstract_weights('resnet_tiny', 0.0, attention='cbam', num_classes=4)
  state = _Weights(fresh['params'], fresh['batch_stats'])

  merged = pretrained.init_from(state, 'PLAIN', plain, description, replicated, True)
  out = capsys.readouterr().out
  assert 'Inserted attention (cbam, official init) at 2 place(s)' in out, out
  assert "Initialised a new classifier head (2 array(s): params['fc']['bias']" in out, out
  for names, leaf in pretrained._flat(merged.params).items():
    expected = 0.0 if ('attention' in names or names[0] == 'fc') else 1.0
    assert np.all(np.asarray(leaf) == expected), names

  # Another architecture: a one-line error naming the first mismatch, never a partial load.
  other, _ = _abstract_weights('resnet20', 1.0, attention=None, num_classes=4)
  with pytest.raises(ValueError, match=r"another architecture than this model \(resnet\): "
                     r"params\['bn1'\]\['bias'\] is \(16,\) in the checkpoint but \(8,\)"):
    pretrained.init_from(state, 'R20', other, description, replicated, True)
  # ... unless asked for, and then every array left out is listed.
  pretrained.init_from(state, 'R20', other, description, replicated, True, partial=True)
  out = capsys.readouterr().out
  assert 'Partial load (config.init_from_partial)' in out
  assert "the checkpoint has params['layer3_0']" in out  # resnet20 has a third stage.
  # Attention the model lacks is a mismatch too (a CBAM checkpoint into a plain model).
  cbam, _ = _abstract_weights('resnet_tiny', 1.0, attention='cbam', num_classes=4)
  _, plain_description = _abstract_weights('resnet_tiny', 0.0, attention=None, num_classes=4)
  with pytest.raises(ValueError, match=r"the checkpoint has params\['layer1_0'\]\['attention'\]"):
    pretrained.init_from(_Weights(plain['params'], plain['batch_stats']), 'CBAM', cbam,
                         plain_description, replicated, True)


def test_insertion_description_uses_identity_init_only_when_inserting():
  plain, _ = _abstract_weights('resnet_tiny', 1.0, attention=None)
  cbam, description = _abstract_weights('resnet_tiny', 1.0, attention='cbam')
  inserted = pretrained.insertion_description(description, plain, 'identity')
  assert inserted['fields']['attention_fields'] == {'identity_init': True}
  assert pretrained.insertion_description(description, plain, 'official') == description
  assert pretrained.insertion_description(description, cbam, 'identity') == description
  with pytest.raises(ValueError, match="init_attention='zeros' is unknown"):
    pretrained.insertion_description(description, plain, 'zeros')


@pytest.mark.slow
def test_fine_tuning_with_attention_inserted_at_identity_keeps_the_network(tmp_path, capsys):
  base = str(tmp_path / 'plain')
  train_lib.train_and_evaluate(tiny_config(num_epochs=1, checkpoint_every_steps=0), base)
  trained = metrics.read_metrics(base)[-1]
  epoch0 = {}
  for arm, overrides in {'identity': {'init_attention': 'identity'},
                         'official': {'init_attention': 'official'}}.items():
    workdir = str(tmp_path / arm)
    config = tiny_config(init_from=base, num_epochs=1, checkpoint_every_steps=0,
                         **{'model.attention': 'cbam'}, **overrides)
    train_lib.train_and_evaluate(config, workdir)
    records = metrics.read_metrics(workdir)
    assert [r['epoch'] for r in records] == [0, 1]
    epoch0[arm] = records[0]
    with open(os.path.join(workdir, 'config.json')) as f:
      attention_fields = json.load(f)['model']['fields']['attention_fields']
    assert attention_fields == ({'identity_init': True} if arm == 'identity' else None)
  out = capsys.readouterr().out
  assert 'Inserted attention (cbam, identity init) at 2 place(s)' in out
  assert 'epoch 0 (init_from, before training)' in out
  # Identity at insertion: the held-out evaluation is the trained network's, to float32
  # rounding; the official init changes the network.
  np.testing.assert_allclose(epoch0['identity']['eval_loss'], trained['eval_loss'], rtol=1e-6)
  assert epoch0['identity']['eval_top1'] == trained['eval_top1']
  assert abs(epoch0['official']['eval_loss'] - trained['eval_loss']) > 1e-3
