"""Bad input to every command line: one line naming the problem and the fix, exit status 2.

One row per case (docs/errors.md lists them): the command, its arguments and what the
line must say. ``{tmp}`` in an argument is the test's temporary folder.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import subprocess
import sys

import ml_collections
import pytest

from experiments import cli

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# (case, module whose main() is called, argv, regex the one line must match)
IN_PROCESS = [
    ('evaluate: missing workdir', 'experiments.training.evaluate',
     ['--workdir={tmp}/nowhere'], r'No checkpoint directory at .*nowhere: point --workdir'),
    ('evaluate: malformed --data_override', 'experiments.training.evaluate',
     ['--workdir={tmp}', '--data_override=eval_batch_size'], r'--data_override wants KEY=VALUE'),
    ('visualize: misspelt flag', 'experiments.inspection.visualize',
     ['--workdir={tmp}', '--out={tmp}/o', '--num-images=3'],
     r"Unknown command line flag 'num-images'. Did you mean: num_images"),
    ('visualize: --folder with --files', 'experiments.inspection.visualize',
     ['--workdir={tmp}', '--out={tmp}/o', '--folder={tmp}', '--files=a.png'],
     r'pass --folder or --files, not both'),
    ('visualize: --out is a file', 'experiments.inspection.visualize',
     ['--workdir={tmp}', '--out={tmp}/notes.txt'],
     r'--out .*notes.txt is a file; --out names the folder for the PNGs'),
    ('localization: bad --tolerance', 'experiments.inspection.localization',
     ['--workdir={tmp}', '--tolerance=a'], r'--tolerance wants numbers'),
    ('convert: missing input', 'cbam_jax.convert',
     ['{tmp}/nothing.pth', '{tmp}/out'], r"No PyTorch checkpoint at '.*nothing.pth'"),
    ('convert: input is not a PyTorch checkpoint', 'cbam_jax.convert',
     ['{tmp}/notes.txt', '{tmp}/out'], r"notes.txt' is not a PyTorch checkpoint"),
    ('convert: output exists', 'cbam_jax.convert',
     ['{tmp}/notes.txt', '{tmp}'], r'exists and is not empty; pass --overwrite'),
    ('convert: one argument', 'cbam_jax.convert', ['in.pth'], r'give IN.pth and OUT_DIR'),
    ('benchmark: bad --shape', 'experiments.bench.benchmark', ['--shape', '2,8,8'],
     r"--shape must be B,H,W,C with positive sizes, got '2,8,8'"),
    ('param_counts: unknown model', 'experiments.bench.param_counts',
     ['--models', 'resnet21'], r"unknown model 'resnet21' in --models\. Did you mean "
     r"'resnet\d+'\? Valid: resnet18, "),
    ('xla_flags: unknown flag set', 'experiments.bench.xla_flags', ['--flags', 'onednnn'],
     r'--flags=onednnn: value should be one of'),
    ('time_to_first_step: missing --config', 'experiments.bench.time_to_first_step',
     ['--config={tmp}/nope.py'], r'--config .*nope.py: no such file'),
    ('study: bad --mode', 'experiments.study.run', ['--mode', 'tain'],
     r'--mode=tain: value should be one of'),
    ('data pipeline: malformed --set', 'experiments.data.pipeline', ['--set', 'augment'],
     r"--set 'augment': write KEY=VALUE"),
    ('data pipeline: misspelt --set key', 'experiments.data.pipeline',
     ['--set', 'shapes.num_trian=64'],
     r"--set 'shapes.num_trian=64': 'shapes.num_trian' is not a config field\. Did you mean "
     r"'shapes.num_train'\?"),
]


@pytest.mark.parametrize('module, argv, message', [row[1:] for row in IN_PROCESS],
                         ids=[row[0] for row in IN_PROCESS])
def test_one_line_and_status_2(module, argv, message, tmp_path, capsys):
  if 'PyTorch checkpoint' in message:
    pytest.importorskip('torch')
  (tmp_path / 'notes.txt').write_text('not a checkpoint\n')
  main = importlib.import_module(module).main
  with pytest.raises(SystemExit, match=message) as error:
    main([arg.format(tmp=tmp_path) for arg in argv])
  assert error.value.code == cli.USER_ERROR_STATUS
  prog = 'python -m ' + module
  assert str(error.value).startswith(f'{prog}: ') and '\n' not in str(error.value)
  stderr = capsys.readouterr().err.strip().splitlines()
  assert len(stderr) == 1 and stderr[0].startswith(str(error.value))
  assert 'CBAM_JAX_TRACEBACK=1' in stderr[0]


def test_the_traceback_on_request(tmp_path, monkeypatch):
  from experiments.training import evaluate

  monkeypatch.setenv(cli.TRACEBACK_ENV, '1')
  with pytest.raises(FileNotFoundError, match='No checkpoint directory'):
    evaluate.main([f'--workdir={tmp_path}/nowhere'])


# (case, train arguments after --workdir, regex of the one line). Subprocesses: the trainer
# reads its flags from the process's command line.
TRAIN = [
    ('misspelt config file', ['--config=experiments/configs/defualt.py'],
     r'--config=experiments/configs/defualt.py: no such config file\. Did you mean '
     r'--config=experiments/configs/default.py\?'),
    ('top-level flag that is a config field', ['--num_epochs=3'],
     r"Unknown command line flag 'num_epochs'\. Did you mean --config\.num_epochs=3\?"),
    ('misspelt config override', ['--config.num_epoch=3'],
     r'Bad config override \(--config.num_epoch=3\): no such field: .*Did you mean "num_epochs"'),
    ('an override through a field that holds a value', ['--config.optimizer.learning_rate=0.01'],
     r"--config\.optimizer\.learning_rate=0\.01: config\.optimizer is a value \('sgd'\), not a "
     r'group of fields\. Did you mean --config\.learning_rate=0\.01\?'),
    ('a sub-field of the FIELD=VALUE attention_fields',
     ['--config.model.attention_fields.kernel_size=3'],
     r'It takes comma-separated FIELD=VALUE: --config\.model\.attention_fields=kernel_size=3\.'),
    ('a value for a group of fields', ['--config.model=resnet20'],
     r'config\.model is a group of fields \(.*\); set one of them, e\.g\. '
     r'--config\.model\.name=resnet20\.'),
    ('a folder dataset (a field that defaults to None) that is missing',
     ['--config.dataset=folder', '--config.folder={tmp}/no_images'], r'no_images'),
]


@pytest.mark.slow
@pytest.mark.parametrize('argv, message', [row[1:] for row in TRAIN],
                         ids=[row[0] for row in TRAIN])
def test_train_one_line_and_status_2(argv, message, tmp_path):
  workdir = tmp_path / 'run'
  argv = [arg.format(tmp=tmp_path) for arg in argv]
  if not any(arg.startswith('--config=') for arg in argv):
    argv.insert(0, '--config=experiments/configs/smoke.py')
  process = subprocess.run(
      [sys.executable, '-m', 'experiments.training.train', f'--workdir={workdir}', *argv],
      cwd=REPO, capture_output=True, text=True, timeout=180,
      env={**os.environ, 'JAX_PLATFORMS': 'cpu', 'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=0'})
  assert process.returncode == cli.USER_ERROR_STATUS, process.stderr[-3000:]
  lines = process.stderr.strip().splitlines()
  assert len(lines) == 1, process.stderr[-3000:]
  assert lines[0].startswith('python -m experiments.training.train: ')
  assert re.search(message, lines[0]), lines[0]
  assert not os.path.exists(workdir / 'config.json')


def _fields(config: ml_collections.ConfigDict, prefix: str = ''):
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      yield from _fields(value, f'{prefix}{key}.')
    else:
      yield f'{prefix}{key}', config, key


@pytest.mark.parametrize('name', ['default', 'cifar10', 'imagenet', 'smoke'])
def test_every_unset_config_field_has_a_type_the_command_line_can_set(name):
  config = importlib.import_module(f'experiments.configs.{name}').get_config()
  untyped = [path for path, parent, key in _fields(config)
             if getattr(parent, key) is None
             and not isinstance(parent._fields[key], ml_collections.FieldReference)]
  assert not untyped, f'None without a type (use config_dict.placeholder(type)): {untyped}'


@pytest.mark.skipif(importlib.util.find_spec('tensorflow') is None,
                    reason='TensorFlow not installed')
def test_tensorflow_adds_nothing_to_a_commands_output(tmp_path):
  # TensorFlow 2.21 prints a oneDNN notice through absl whatever TF_CPP_MIN_LOG_LEVEL says;
  # importing `experiments` (every command does, first) keeps it out.
  env = {k: v for k, v in os.environ.items() if not k.startswith('TF_')}
  code = ('import experiments, tensorflow as tf; '
          f'tf.summary.create_file_writer({str(tmp_path)!r}).flush()')
  process = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True,
                           text=True, timeout=120, env=env)
  assert process.returncode == 0, process.stderr[-3000:]
  assert process.stdout == '' and process.stderr == '', process.stderr[-3000:]
