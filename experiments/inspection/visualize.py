r"""Where does the network look? PNG grids of attention maps, Grad-CAM and predictions.

  python -m experiments.inspection.visualize --workdir /tmp/default --out /tmp/vis
  python -m experiments.inspection.visualize --workdir /tmp/default --out /tmp/vis --which=best \
      --folder photos/
  python -m experiments.inspection.visualize --workdir /tmp/default --out /tmp/vis \
      --files a.jpg --files b.png

``--workdir`` is a training workdir of ``experiments.training.train`` (or its ``checkpoints``
folder, or one step folder), ``--which`` its checkpoint (latest, best or a step): the model
is rebuilt from the description saved beside the orbax checkpoint, only its variables are
read, and images are normalised like the training data. Images come from the run's own eval split
(default; the 'shapes' dataset also draws its ground-truth boxes), an image folder, or
files. Each row of ``<out>/attention_<k>.png`` shows one image: the input, the spatial
attention of the last block of each stage upsampled to the input (bilinear) over the
image, Grad-CAM of the last block for the predicted class, and the top-3 predictions.
``<out>/top_channels.png`` shows the most attended channels of those blocks.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from cbam_jax import inspection as ci
from experiments import cli, compile_cache

PROG = 'python -m experiments.inspection.visualize'

IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg', '.bmp', '.gif', '.webp')
_BLOCK_NAME = re.compile(r'^layer(\d+)_(\d+)$')


@dataclasses.dataclass
class Run:
  """A trained model restored from a workdir."""

  model: Any
  variables: dict[str, Any]
  config: Any  # ml_collections.ConfigDict of the run
  meta: dict[str, Any]
  step: int

  @property
  def class_names(self) -> tuple[str, ...]:
    names = self.meta.get('dataset', {}).get('class_names')
    if names:
      return tuple(names)
    return tuple(str(i) for i in range(int(self.meta['model']['fields']['num_classes'])))

  @property
  def attention(self) -> str:
    """The attention's registry name (or class name), 'none' without attention."""
    spec = self.meta['model']['fields'].get('attention')
    return str(spec['class'] if isinstance(spec, dict) else spec or 'none')

  @property
  def model_name(self) -> str:
    return str(self.meta['model'].get('size') or self.meta['model']['backbone'])

  @property
  def image_size(self) -> int:
    return int(self.meta['dataset']['image_shape'][0])


def load_run(workdir: str, which: int | str = 'latest') -> Run:
  """Restores the model, its variables (only those) and the config of a training run.

  Args:
    workdir: a workdir of ``experiments.training.train``, its ``checkpoints`` folder or a
      step folder.
    which: ``'latest'``, ``'best'`` (best eval top-1) or a step number.

  Raises:
    FileNotFoundError: no checkpoint there.
  """
  import ml_collections

  from experiments.training import checkpointing

  model, variables, meta, step = checkpointing.load_model(workdir, which)
  return Run(model=model, variables=variables, config=ml_collections.ConfigDict(meta['config']),
             meta=meta, step=step)


# --------------------------------------------------------------------------- images


@dataclasses.dataclass
class Images:
  """A batch to explain: model inputs and what to display."""

  inputs: np.ndarray  # float32 (N, H, W, C), normalised like the training data
  display: np.ndarray  # float32 (N, H, W, C) in [0, 1]
  names: list[str]
  labels: np.ndarray | None = None  # int (N,)
  boxes: np.ndarray | None = None  # float32 (N, 4) (y0, x0, y1, x1) pixels


def _dataset_normalization(config) -> tuple[np.ndarray, np.ndarray, Any]:
  """(mean, std) in [0, 1] units the run was trained with, and the input if it was built."""
  from experiments.data import pipeline as input_pipeline

  settings = input_pipeline.DataSettings.from_config(config)  # Fills in the dataset's.
  mean, std = settings.mean, settings.std
  data = None
  if mean is None or std is None:  # Computed from the training images (shapes, folders).
    data = input_pipeline.create_input(config)
    mean, std = data.mean, data.std
  return np.asarray(mean, np.float32), np.asarray(std, np.float32), data


def eval_images(run: Run, num_images: int, offset: int = 0) -> Images:
  """The first ``num_images`` examples (after ``offset``) of the run's eval split."""
  from experiments.data import pipeline as input_pipeline

  mean, std, data = _dataset_normalization(run.config)
  data = data or input_pipeline.create_input(run.config)
  batches = {'image': [], 'label': [], 'box': []}
  seen = 0
  for batch in data.eval_batches():
    keep = batch['mask'] > 0
    for key in batches:
      if key in batch:
        batches[key].append(np.asarray(batch[key])[keep])
    seen += int(keep.sum())
    if seen >= offset + num_images:
      break
  take = slice(offset, offset + num_images)
  inputs = np.concatenate(batches['image'])[take]
  if len(inputs) == 0:
    raise ValueError(f'The eval split has no examples after offset {offset}.')
  labels = np.concatenate(batches['label'])[take]
  boxes = np.concatenate(batches['box'])[take] if batches['box'] else None
  return Images(inputs=inputs, display=np.clip(inputs * std + mean, 0.0, 1.0),
                names=[f'eval #{offset + i}' for i in range(len(inputs))], labels=labels,
                boxes=boxes)


def _load_image(path: str, size: int) -> np.ndarray:
  """uint8 (size, size, 3): shorter side resized to ``size``, then centre-cropped."""
  from PIL import Image

  with Image.open(path) as image:
    image = image.convert('RGB')
    scale = size / min(image.size)
    resized = image.resize((max(size, round(image.size[0] * scale)),
                            max(size, round(image.size[1] * scale))), Image.BILINEAR)
  width, height = resized.size
  left, top = (width - size) // 2, (height - size) // 2
  return np.asarray(resized.crop((left, top, left + size, top + size)), np.uint8)


def file_images(run: Run, paths: Sequence[str]) -> Images:
  """Images from files, resized and centre-cropped to the run's input size."""
  missing = [p for p in paths if not os.path.isfile(p)]
  if missing:
    raise FileNotFoundError(f'No such image file(s): {", ".join(missing)}.')
  if not paths:
    raise ValueError('No image files given.')
  mean, std, _ = _dataset_normalization(run.config)
  pixels = np.stack([_load_image(p, run.image_size) for p in paths]).astype(np.float32) / 255.0
  return Images(inputs=(pixels - mean) / std, display=pixels,
                names=[os.path.basename(p) for p in paths])


def folder_images(run: Run, folder: str, num_images: int) -> Images:
  """The first ``num_images`` images (sorted paths, recursive) of ``folder``."""
  if not os.path.isdir(folder):
    raise FileNotFoundError(f'--folder {folder} is not a directory.')
  paths = sorted(os.path.join(root, name) for root, _, names in os.walk(folder)
                 for name in names if name.lower().endswith(IMAGE_SUFFIXES))
  if not paths:
    raise ValueError(f'No images ({", ".join(IMAGE_SUFFIXES)}) under {folder}.')
  return file_images(run, paths[:num_images])


# --------------------------------------------------------------------------- analysis


def block_names(params: Mapping[str, Any]) -> list[str]:
  """Residual blocks ``layer{stage}_{index}`` of a params tree, in network order."""
  found = [(int(m[1]), int(m[2]), name) for name in params
           if (m := _BLOCK_NAME.match(name))]
  return [name for *_, name in sorted(found)]


def last_block_per_stage(names: Sequence[str]) -> list[str]:
  """The last ``layer{s}_{i}`` of every stage; other names (e.g. BAM's) are kept in order."""
  last: dict[int, tuple[int, str]] = {}
  others = []
  for name in names:
    m = _BLOCK_NAME.match(name)
    if m is None:
      others.append(name)
    elif int(m[1]) not in last or int(m[2]) > last[int(m[1])][0]:
      last[int(m[1])] = (int(m[2]), name)
  return [last[s][1] for s in sorted(last)] + others


def _analysis_fn(model, cam_blocks: tuple[str, ...]):
  """The jitted analysis of ``model``; cached so repeated calls reuse the compilation."""
  try:
    return _cached_analysis_fn(model, cam_blocks)
  except TypeError:  # A module with unhashable fields: no cache.
    return _cached_analysis_fn.__wrapped__(model, cam_blocks)


@functools.lru_cache(maxsize=16)
def _cached_analysis_fn(model, cam_blocks: tuple[str, ...]):
  @jax.jit
  def analyse(variables, images):
    logits, maps = ci.attention_maps(model, variables, images, return_output=True)
    cams = {block: ci.grad_cam(model, variables, images, block) for block in cam_blocks}
    return logits, maps, cams

  return analyse


@dataclasses.dataclass
class Analysis:
  probs: np.ndarray  # (N, K)
  spatial: dict[str, np.ndarray]  # block -> (N, H, W) at the input resolution
  channel: dict[str, np.ndarray]  # block -> (N, C)
  cams: dict[str, np.ndarray]  # block -> (N, H, W) at the input resolution, in [0, 1]


def analyse(run: Run, inputs: np.ndarray, cam_blocks: Sequence[str],
            map_blocks: Sequence[str] | None = None, batch_size: int = 256) -> Analysis:
  """Probabilities, upsampled spatial maps, channel maps and Grad-CAMs of ``inputs``.

  Args:
    run: the model.
    inputs: (N, H, W, C) normalised images.
    cam_blocks: module paths to compute Grad-CAM on.
    map_blocks: blocks whose maps to keep (None: all).
    batch_size: images per forward pass.
  """
  fn = _analysis_fn(run.model, tuple(cam_blocks))
  size = inputs.shape[1:3]
  parts = []
  for start in range(0, len(inputs), batch_size):
    logits, maps, cams = fn(run.variables, jnp.asarray(inputs[start:start + batch_size]))
    keep = maps if map_blocks is None else {b: maps[b] for b in map_blocks if b in maps}
    parts.append((
        jax.nn.softmax(logits),
        {b: ci.upsample(m['spatial_map'], size) for b, m in keep.items() if 'spatial_map' in m},
        {b: m['channel_map'] for b, m in keep.items() if 'channel_map' in m},
        {b: ci.upsample(c, size) for b, c in cams.items()},
    ))
  parts = jax.device_get(parts)
  cat = lambda trees: jax.tree.map(lambda *xs: np.concatenate(xs), *trees)
  probs, spatial, channel, cams = (cat([p[i] for p in parts]) for i in range(4))
  return Analysis(probs=probs, spatial=spatial, channel=channel, cams=cams)


# --------------------------------------------------------------------------- figures


def _overlay(ax, image, heat, title, *, vmin=None, vmax=None, box=None):
  ax.imshow(image, interpolation='nearest')
  mappable = ax.imshow(heat, cmap='jet', alpha=0.5, vmin=vmin, vmax=vmax,
                       interpolation='bilinear')
  _box(ax, box)
  ax.set_title(title, fontsize=9)
  ax.axis('off')
  colorbar = ax.figure.colorbar(mappable, ax=ax, fraction=0.046, pad=0.03)
  colorbar.ax.tick_params(labelsize=7)


def _box(ax, box):
  if box is None:
    return
  import matplotlib.patches as patches

  y0, x0, y1, x1 = (float(v) for v in box)
  # imshow puts pixel i's centre at i, so the edge coordinate e sits at e - 0.5.
  ax.add_patch(patches.Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False,
                                 edgecolor='white', linewidth=1.5, linestyle='--'))


def attention_figure(images: Images, analysis: Analysis, class_names: Sequence[str], *,
                     stage_blocks: Sequence[str], cam_block: str, title: str):
  """One row per image: input | spatial attention per stage | Grad-CAM | top-3."""
  import matplotlib.pyplot as plt

  spatial_blocks = [b for b in stage_blocks if b in analysis.spatial]
  columns = 1 + len(spatial_blocks) + 1 + 1
  rows = len(images.inputs)
  fig, axes = plt.subplots(rows, columns, figsize=(2.7 * columns, 2.5 * rows + 0.6),
                           squeeze=False)
  for row in range(rows):
    image, box = images.display[row], None if images.boxes is None else images.boxes[row]
    probs = analysis.probs[row]
    predicted = int(np.argmax(probs))
    ax = axes[row, 0]
    ax.imshow(image, interpolation='nearest')
    _box(ax, box)
    label = ('' if images.labels is None
             else f'\ntrue: {class_names[int(images.labels[row])]}')
    ax.set_title(f'{images.names[row]}{label}', fontsize=9)
    ax.axis('off')
    for column, block in enumerate(spatial_blocks, start=1):
      heat = analysis.spatial[block][row]
      _overlay(axes[row, column], image, heat, f'{block} spatial attention', box=box)
    cam_ax = axes[row, 1 + len(spatial_blocks)]
    _overlay(cam_ax, image, analysis.cams[cam_block][row],
             f'Grad-CAM {cam_block}\nclass: {class_names[predicted]}', vmin=0.0, vmax=1.0,
             box=box)
    ax = axes[row, -1]
    top = np.argsort(probs)[::-1][:3]
    colours = ['tab:green' if images.labels is not None and k == images.labels[row]
               else 'tab:blue' for k in top]
    ax.barh(range(len(top))[::-1], probs[top], color=colours)
    ax.set_yticks(range(len(top))[::-1], [class_names[k] for k in top], fontsize=8)
    ax.set_xlim(0, 1)
    ax.tick_params(axis='x', labelsize=7)
    for y, p in zip(range(len(top))[::-1], probs[top], strict=True):
      inside = p > 0.75  # Long bars carry their value inside, in white.
      ax.text(p - 0.02 if inside else p + 0.02, y, f'{p:.2f}', va='center',
              ha='right' if inside else 'left', color='white' if inside else 'black',
              fontsize=8)
    ax.set_title('top-3 (green = true)' if images.labels is not None else 'top-3',
                 fontsize=9)
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  return fig


def channels_figure(analysis: Analysis, blocks: Sequence[str], k: int, title: str):
  """Bar charts of the ``k`` channels with the highest mean channel attention per block."""
  import matplotlib.pyplot as plt

  blocks = [b for b in blocks if b in analysis.channel]
  fig, axes = plt.subplots(1, max(1, len(blocks)), figsize=(3.2 * max(1, len(blocks)), 2.8),
                           squeeze=False)
  for ax, block in zip(axes[0], blocks, strict=False):
    indices, values = jax.device_get(ci.top_channels(analysis.channel[block], k))
    ax.bar([str(int(i)) for i in indices], values, color='tab:orange')
    ax.set_ylim(0, 1)
    ax.set_xlabel('channel')
    ax.set_ylabel('mean channel attention')
    ax.set_title(f'{block}: top-{len(indices)} of {analysis.channel[block].shape[1]}',
                 fontsize=9)
  if not blocks:
    axes[0, 0].text(0.5, 0.5, 'no channel attention in this model', ha='center')
    axes[0, 0].axis('off')
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  return fig


def _save(fig, path: str, dpi: int, palette: bool) -> None:
  import matplotlib.pyplot as plt

  fig.savefig(path, dpi=dpi)
  plt.close(fig)
  if palette:  # 256 colours: about 3x smaller files, for documentation.
    from PIL import Image

    with Image.open(path) as image:
      quantized = image.convert('RGB').quantize(256)
    quantized.save(path, optimize=True)


def visualize(run: Run, images: Images, out: str, *, rows_per_figure: int = 4,
              cam_block: str | None = None, top_k: int = 3, dpi: int = 100,
              palette: bool = False) -> list[str]:
  """Writes the PNG grids for ``images`` into ``out``; returns their paths."""
  import matplotlib

  matplotlib.use('Agg')

  blocks = block_names(run.variables['params'])
  if cam_block is None:
    if not blocks:
      raise ValueError('No layer{s}_{i} blocks in this model; pass --block PATH.')
    cam_block = blocks[-1]
  stage_blocks = last_block_per_stage(blocks)
  analysis = analyse(run, images.inputs, [cam_block])
  stage_blocks += [b for b in last_block_per_stage(sorted(analysis.spatial))
                   if b not in stage_blocks]
  os.makedirs(out, exist_ok=True)
  title = f'{run.model_name}, attention={run.attention}, step {run.step}'
  written = []
  for index, start in enumerate(range(0, len(images.inputs), rows_per_figure)):
    part = slice(start, start + rows_per_figure)
    sub_images = Images(
        inputs=images.inputs[part], display=images.display[part], names=images.names[part],
        labels=None if images.labels is None else images.labels[part],
        boxes=None if images.boxes is None else images.boxes[part])
    sub_analysis = Analysis(
        probs=analysis.probs[part], spatial={b: m[part] for b, m in analysis.spatial.items()},
        channel={b: m[part] for b, m in analysis.channel.items()},
        cams={b: m[part] for b, m in analysis.cams.items()})
    fig = attention_figure(sub_images, sub_analysis, run.class_names,
                           stage_blocks=stage_blocks, cam_block=cam_block, title=title)
    path = os.path.join(out, f'attention_{index}.png')
    _save(fig, path, dpi, palette)
    written.append(path)
  fig = channels_figure(analysis, stage_blocks, top_k,
                        f'{title}: channel attention, mean over {len(images.inputs)} images')
  path = os.path.join(out, 'top_channels.png')
  _save(fig, path, dpi, palette)
  written.append(path)
  return written


def define_flags(values: flags.FlagValues) -> None:
  flags.DEFINE_string('workdir', None, 'Training workdir (or its checkpoints folder, or one '
                      'step folder).', required=True, flag_values=values)
  flags.DEFINE_string('out', None, 'Folder for the PNGs.', required=True, flag_values=values)
  flags.DEFINE_string('which', 'latest', "'latest', 'best' (best eval top-1) or a step "
                      'number.', flag_values=values)
  flags.DEFINE_string('folder', None, 'Explain the images in this folder (recursive).',
                      flag_values=values)
  flags.DEFINE_multi_string('files', [], 'Explain this image file (repeat for more).',
                            flag_values=values)
  flags.DEFINE_integer('num_images', 8, 'Images from the eval split or --folder.',
                       lower_bound=1, flag_values=values)
  flags.DEFINE_integer('offset', 0, 'First eval example to show.', lower_bound=0,
                       flag_values=values)
  flags.DEFINE_integer('rows', 4, 'Images per PNG.', lower_bound=1, flag_values=values)
  flags.DEFINE_string('block', None, 'Grad-CAM module path (default: the last block).',
                      flag_values=values)
  flags.DEFINE_integer('top_k', 3, 'Channels shown per block.', lower_bound=1,
                       flag_values=values)
  flags.DEFINE_integer('dpi', 100, 'PNG resolution.', lower_bound=1, flag_values=values)
  flags.DEFINE_boolean('palette', False, '256-colour PNGs, about 3x smaller (for '
                       'documentation).', flag_values=values)


@cli.command(PROG)
def main(argv: Sequence[str] | None = None) -> list[str]:
  """The command line (``argv`` without the program name; default ``sys.argv[1:]``);
  returns the paths written."""
  values, _ = cli.parse(argv, define_flags, prog=PROG, usage=__doc__)
  compile_cache.enable()
  if values.files and values.folder:
    raise cli.UserError('pass --folder or --files, not both.')
  if os.path.exists(values.out) and not os.path.isdir(values.out):
    raise cli.UserError(f'--out {values.out} is a file; --out names the folder for the PNGs '
                        '(made if missing).')
  run = load_run(values.workdir, values.which)
  if values.files:
    images = file_images(run, values.files)
  elif values.folder:
    images = folder_images(run, values.folder, values.num_images)
  else:
    images = eval_images(run, values.num_images, values.offset)
  written = visualize(run, images, values.out, rows_per_figure=values.rows,
                      cam_block=values.block, top_k=values.top_k, dpi=values.dpi,
                      palette=values.palette)
  for path in written:
    print(path)
  return written


if __name__ == '__main__':
  main()
