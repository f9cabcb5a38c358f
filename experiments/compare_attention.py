r"""The README's attention comparison: ResNet-20 (CIFAR) with each attention module vs none.

Modes:

* ``table`` (default, minutes on a CPU): parameters, forward FLOPs per image (XLA's
  ``cost_analysis`` of the eval-mode forward compiled for the CPU; a multiply-add counts 2)
  and forward time per batch on the default backend (jit, eval mode, median over rounds;
  the variants are timed in interleaved rounds so that load drift on a shared machine hits
  them alike; compare the ratio column).
* ``train``: one ``python -m experiments.train`` run per variant with the same config, seed
  and budget, then a table of the best / last held-out top-1 read from each workdir's
  ``metrics.jsonl``. Runs that already finished are read, not rerun (restartable).

  python -m experiments.compare_attention                                  # table
  python -m experiments.compare_attention --attention none,se,cbam --batch_size 64
  python -m experiments.compare_attention --mode train --epochs 3 \
      --workdir_root /tmp/compare --attention none,se,eca,cbam
  python -m experiments.compare_attention --mode quick_train --epochs 10

* ``quick_train``: the same comparison with a minimal built-in loop (see
  :func:`quick_train`) that decodes the image-folder tarball with Pillow, for machines
  without TensorFlow (e.g. accelerator boxes).

``bam@stages`` is BAM at the stage transitions (``stage_attention='bam'``, its paper's
placement); every other name is the module in every residual block (``attention=name``).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

STAGE_BAM = 'bam@stages'
DEFAULT_MODEL = 'resnet20'
DEFAULT_CONFIG = 'experiments/configs/cifar10.py'


def variant_fields(variant: str) -> dict[str, Any]:
  """``create_model`` fields of a variant name ('none', a registry name or 'bam@stages')."""
  if variant == 'none':
    return {'attention': None}
  if variant == STAGE_BAM:
    return {'attention': None, 'stage_attention': 'bam'}
  return {'attention': variant}


def parse_variants(spec: str) -> list[str]:
  from cbam_jax import attention as registry  # Imported late: --help stays instant.

  if spec == 'all':
    return ['none', *registry.available(), STAGE_BAM]
  variants = [s.strip() for s in spec.split(',') if s.strip()]
  valid = ('none', *registry.available(), STAGE_BAM)
  for variant in variants:
    if variant not in valid:
      raise SystemExit(f'Unknown attention {variant!r}; use "all" or a comma-separated list '
                       f'of {", ".join(valid)}.')
  return variants


# --------------------------------------------------------------------------- table


def _flops(compiled) -> float | None:
  analysis = compiled.cost_analysis()
  if isinstance(analysis, list | tuple):  # Older JAX: one dict per computation.
    analysis = analysis[0] if analysis else None
  if not analysis or 'flops' not in analysis:
    return None
  return float(analysis['flops'])


def measure(variants: Sequence[str], *, model_name: str, batch_size: int, image_size: int,
            rounds: int, calls_per_round: int) -> list[dict[str, Any]]:
  """Params, FLOPs per image and forward seconds per batch of every variant."""
  import jax

  from cbam_jax import models

  x = jax.random.normal(jax.random.key(0), (batch_size, image_size, image_size, 3))
  rows, forwards = [], []
  for variant in variants:
    model = models.create_model(model_name, **variant_fields(variant))
    variables = jax.jit(model.init)(jax.random.key(0), x[:1])
    forward = jax.jit(lambda v, x, model=model: model.apply(v, x, train=False))
    compiled = forward.lower(variables, x).compile()
    # FLOPs from a CPU compile whatever the backend: on GPU the convolutions become cuDNN
    # custom calls that XLA's cost analysis does not count.
    cpu = jax.devices('cpu')[0]
    flops = _flops(forward.lower(jax.device_put(variables, cpu),
                                 jax.device_put(x, cpu)).compile())
    jax.block_until_ready(compiled(variables, x))  # Warm-up.
    forwards.append((compiled, variables))
    rows.append({'attention': variant, 'params': models.count_params(variables),
                 'flops_per_image': None if flops is None else flops / batch_size,
                 'times': []})
  for _ in range(rounds):  # Interleaved: every variant sees the same machine load.
    for row, (compiled, variables) in zip(rows, forwards, strict=True):
      start = time.perf_counter()
      for _ in range(calls_per_round):
        out = compiled(variables, x)
      jax.block_until_ready(out)
      row['times'].append((time.perf_counter() - start) / calls_per_round)
  for row in rows:
    row['seconds'] = statistics.median(row.pop('times'))
  return rows


def format_table(rows: Sequence[dict[str, Any]]) -> str:
  base = next((r for r in rows if r['attention'] == 'none'), rows[0])
  lines = ['| attention | params | Δ params | MFLOPs / image | Δ FLOPs | forward ms / batch | '
           'time vs none |',
           '|---|---:|---:|---:|---:|---:|---:|']
  for r in rows:
    if r['flops_per_image'] is None or base['flops_per_image'] is None:
      flops, dflops = 'n/a', 'n/a'
    else:
      flops = f'{r["flops_per_image"] / 1e6:.2f}'
      dflops = f'{100 * (r["flops_per_image"] / base["flops_per_image"] - 1):+.2f}%'
    lines.append(
        f'| {r["attention"]} | {r["params"]:,} | {r["params"] - base["params"]:+,} | {flops} | '
        f'{dflops} | {1e3 * r["seconds"]:.2f} | {r["seconds"] / base["seconds"]:.2f}x |')
  return '\n'.join(lines)


# --------------------------------------------------------------------------- train


def train_command(variant: str, workdir: str, *, config: str, epochs: int, seed: int,
                  extra: Sequence[str]) -> list[str]:
  """The ``experiments.train`` command line of one variant."""
  fields = variant_fields(variant)
  return [sys.executable, '-m', 'experiments.train', '--config', config, '--workdir', workdir,
          f'--config.num_epochs={epochs}', f'--config.seed={seed}',
          f'--config.model.attention={fields["attention"] or "none"}',
          f'--config.model.stage_attention={fields.get("stage_attention") or "none"}',
          '--config.progress_bar=False', '--config.tensorboard=False', *extra]


def read_result(workdir: str) -> dict[str, Any] | None:
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return None
  with open(path) as f:
    records = [json.loads(line) for line in f if line.strip()]
  evals = [r for r in records if r.get('eval_top1') is not None]
  if not evals:
    return None
  return {'epochs': max(r.get('epoch', 0) for r in records),
          'best_top1': max(r['eval_top1'] for r in evals),
          'last_top1': evals[-1]['eval_top1'],
          'last_loss': evals[-1].get('eval_loss')}


def run_training(variants: Sequence[str], *, root: str, config: str, epochs: int, seed: int,
                 extra: Sequence[str]) -> list[dict[str, Any]]:
  rows = []
  for variant in variants:
    workdir = os.path.join(root, variant.replace('@', '_at_'))
    result = read_result(workdir)
    if result is None or result['epochs'] < epochs:
      command = train_command(variant, workdir, config=config, epochs=epochs, seed=seed,
                              extra=extra)
      print('$', ' '.join(command), flush=True)
      start = time.perf_counter()
      subprocess.run(command, check=True)
      print(f'  {variant}: {time.perf_counter() - start:.0f} s', flush=True)
      result = read_result(workdir)
    rows.append({'attention': variant, **(result or {})})
  return rows


def format_train_table(rows: Sequence[dict[str, Any]]) -> str:
  lines = ['| attention | epochs | best top-1 | last top-1 | last eval loss |',
           '|---|---:|---:|---:|---:|']
  for r in rows:
    if 'best_top1' not in r:  # Skipped or failed.
      lines.append(f'| {r["attention"]} | - | - | - | - |')
      continue
    loss = 'n/a' if r['last_loss'] is None else f'{r["last_loss"]:.4f}'
    lines.append(f'| {r["attention"]} | {r["epochs"]} | {100 * r["best_top1"]:.2f}% | '
                 f'{100 * r["last_top1"]:.2f}% | {loss} |')
  return '\n'.join(lines)


# --------------------------------------------------------------------------- quick train

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


def load_image_folder_tarball(path: str, holdout_fraction: float, seed: int,
                              limit: int | None = None):
  """(train_x, train_y, eval_x, eval_y) uint8 NHWC / int32 from an image-folder .tar.gz.

  Decodes with Pillow (no TensorFlow). The holdout is stratified: ``holdout_fraction`` of
  each class, chosen by ``seed``.
  """
  import io
  import tarfile

  import numpy as np
  from PIL import Image

  images: dict[str, list] = {}
  with tarfile.open(path) as tar:
    for member in tar:
      parts = member.name.split('/')
      if not member.isfile() or len(parts) < 3 or not parts[-1].lower().endswith('.jpg'):
        continue
      data = tar.extractfile(member).read()
      images.setdefault(parts[-2], []).append((parts[-1], data))
  classes = sorted(images)
  rng = np.random.default_rng(seed)
  splits: dict[str, list] = {'train': [], 'eval': []}
  for label, name in enumerate(classes):
    files = sorted(images[name])[:limit]
    order = rng.permutation(len(files))
    num_eval = int(round(holdout_fraction * len(files)))
    for rank, index in enumerate(order):
      splits['eval' if rank < num_eval else 'train'].append((files[index][1], label))

  def decode(pairs):
    x = np.stack([np.asarray(Image.open(io.BytesIO(d)).convert('RGB')) for d, _ in pairs])
    return x, np.asarray([label for _, label in pairs], np.int32)

  return (*decode(splits['train']), *decode(splits['eval']))


def quick_train(variants: Sequence[str], *, tarball: str, epochs: int, batch_size: int,
                learning_rate: float, weight_decay: float, seed: int, limit: int | None,
                deadline_s: float, results_path: str | None) -> list[dict[str, Any]]:
  """A minimal, self-contained CIFAR loop (no TensorFlow) for machines without the training
  stack: SGD with Nesterov momentum 0.9, 1 warm-up epoch then cosine decay, L2 weight decay
  on kernels, random crop (zero padding 4) and flip. Same data order, init and schedule for
  every variant. Stops starting new variants after ``deadline_s``."""
  import jax
  import jax.numpy as jnp
  import optax

  from cbam_jax import models

  start_all = time.perf_counter()
  train_x, train_y, eval_x, eval_y = load_image_folder_tarball(tarball, 0.1, seed, limit)
  print(f'data: {len(train_x)} train / {len(eval_x)} held-out images, '
        f'{time.perf_counter() - start_all:.0f} s', flush=True)
  mean = jnp.asarray(CIFAR_MEAN) * 255
  std = jnp.asarray(CIFAR_STD) * 255
  train_x, train_y = jax.device_put(train_x), jax.device_put(train_y)
  eval_x, eval_y = jax.device_put(eval_x), jax.device_put(eval_y)
  steps_per_epoch = len(train_x) // batch_size
  total_steps = epochs * steps_per_epoch

  def augment(key, images):
    crop_key, flip_key = jax.random.split(key)
    padded = jnp.pad(images, ((0, 0), (4, 4), (4, 4), (0, 0)))
    offsets = jax.random.randint(crop_key, (images.shape[0], 2), 0, 9)
    crops = jax.vmap(lambda im, o: jax.lax.dynamic_slice(im, (o[0], o[1], 0), (32, 32, 3)))(
        padded, offsets)
    flip = jax.random.bernoulli(flip_key, 0.5, (images.shape[0], 1, 1, 1))
    return jnp.where(flip, crops[:, :, ::-1], crops)

  def normalize(images):
    return (images.astype(jnp.float32) - mean) / std

  rows = []
  for variant in variants:
    if time.perf_counter() - start_all > deadline_s:
      print(f'deadline reached: skipping {variant}', flush=True)
      rows.append({'attention': variant, 'skipped': True})
      continue
    model = models.create_model('resnet20', **variant_fields(variant))
    variables = model.init(jax.random.key(seed), jnp.zeros((1, 32, 32, 3)))
    params, batch_stats = variables['params'], variables.get('batch_stats', {})
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, learning_rate, steps_per_epoch, max(total_steps, steps_per_epoch + 1))
    kernels_only = jax.tree.map(lambda p: p.ndim > 1, params)
    tx = optax.chain(optax.add_decayed_weights(weight_decay, mask=kernels_only),
                     optax.sgd(schedule, momentum=0.9, nesterov=True))
    opt_state = tx.init(params)

    @functools.partial(jax.jit, donate_argnums=(0, 1, 2))
    def train_step(params, batch_stats, opt_state, key, index, model=model, tx=tx):
      images = normalize(augment(key, train_x[index]))
      labels = train_y[index]

      def loss_fn(params):
        logits, updates = model.apply({'params': params, 'batch_stats': batch_stats}, images,
                                      train=True, mutable=['batch_stats'])
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return loss, updates.get('batch_stats', {})

      (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), new_stats, opt_state, loss

    @jax.jit
    def eval_correct(params, batch_stats, images, labels, model=model):
      logits = model.apply({'params': params, 'batch_stats': batch_stats}, normalize(images),
                           train=False)
      return jnp.sum(jnp.argmax(logits, -1) == labels)

    key = jax.random.key(seed + 1)
    started = time.perf_counter()
    history, compile_s = [], None
    for epoch in range(epochs):
      key, perm_key = jax.random.split(key)
      order = jax.random.permutation(perm_key, len(train_x))
      for step in range(steps_per_epoch):
        key, step_key = jax.random.split(key)
        index = jax.lax.dynamic_slice_in_dim(order, step * batch_size, batch_size)
        params, batch_stats, opt_state, loss = train_step(params, batch_stats, opt_state,
                                                          step_key, index)
        if compile_s is None:
          jax.block_until_ready(loss)
          compile_s = time.perf_counter() - started
      correct = sum(int(eval_correct(params, batch_stats, eval_x[i:i + 1000],
                                     eval_y[i:i + 1000]))
                    for i in range(0, len(eval_x), 1000))
      history.append(correct / len(eval_x))
      print(f'{variant} epoch {epoch + 1}: loss {float(loss):.3f} held-out top-1 '
            f'{100 * history[-1]:.2f}%', flush=True)
    rows.append({'attention': variant, 'epochs': epochs, 'best_top1': max(history),
                 'last_top1': history[-1], 'last_loss': None, 'history': history,
                 'compile_s': compile_s, 'seconds': time.perf_counter() - started})
    if results_path:
      with open(results_path, 'w') as f:
        json.dump(rows, f, indent=1)
  return rows


# --------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--mode', choices=('table', 'train', 'quick_train'), default='table')
  parser.add_argument('--attention', default='all',
                      help='"all" or a comma-separated list (none, registry names, '
                      f'{STAGE_BAM}).')
  parser.add_argument('--model', default=DEFAULT_MODEL, help='table mode: the model.')
  parser.add_argument('--batch_size', type=int, default=128, help='table mode.')
  parser.add_argument('--image_size', type=int, default=32, help='table mode.')
  parser.add_argument('--rounds', type=int, default=5, help='table mode: timing rounds.')
  parser.add_argument('--calls_per_round', type=int, default=3, help='table mode.')
  parser.add_argument('--json', default=None, help='also write the rows to this file.')
  parser.add_argument('--workdir_root', default='/tmp/compare_attention', help='train mode.')
  parser.add_argument('--config', default=DEFAULT_CONFIG, help='train mode.')
  parser.add_argument('--epochs', type=int, default=3, help='train mode.')
  parser.add_argument('--seed', type=int, default=0, help='train mode.')
  parser.add_argument('--tarball', default=os.path.join(
      os.path.dirname(__file__), '..', '..', 'shared', 'data', 'cifar10-jpeg-train.tar.gz'),
                      help='quick_train mode: the image-folder .tar.gz.')
  parser.add_argument('--batch', type=int, default=128, help='quick_train mode.')
  parser.add_argument('--learning_rate', type=float, default=0.1, help='quick_train mode.')
  parser.add_argument('--weight_decay', type=float, default=5e-4, help='quick_train mode.')
  parser.add_argument('--limit_per_class', type=int, default=None,
                      help='quick_train mode: images per class (smoke tests).')
  parser.add_argument('--deadline_s', type=float, default=float('inf'),
                      help='quick_train mode: start no new variant after this many seconds.')
  parser.add_argument('--train_flag', action='append', default=[],
                      help='train mode: extra flag for experiments.train, repeatable, e.g. '
                      '--train_flag=--config.global_batch_size=256.')
  args = parser.parse_args(argv)
  variants = parse_variants(args.attention)

  if args.mode == 'table':
    import jax
    rows = measure(variants, model_name=args.model, batch_size=args.batch_size,
                   image_size=args.image_size, rounds=args.rounds,
                   calls_per_round=args.calls_per_round)
    print(f'{args.model}, eval-mode forward, batch {args.batch_size} of '
          f'{args.image_size}x{args.image_size}x3, {jax.devices()[0].device_kind} '
          f'({jax.default_backend()}, {len(jax.devices())} device(s) visible, 1 used)')
    print(format_table(rows))
  elif args.mode == 'quick_train':
    rows = quick_train(variants, tarball=args.tarball, epochs=args.epochs,
                       batch_size=args.batch, learning_rate=args.learning_rate,
                       weight_decay=args.weight_decay, seed=args.seed,
                       limit=args.limit_per_class, deadline_s=args.deadline_s,
                       results_path=args.json)
    print(format_train_table(rows))
  else:
    rows = run_training(variants, root=args.workdir_root, config=args.config,
                        epochs=args.epochs, seed=args.seed, extra=args.train_flag)
    print(format_train_table(rows))
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(rows, f, indent=1)


if __name__ == '__main__':
  main()
