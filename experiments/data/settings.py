"""The data configuration, parsed once: `DataSettings.from_config(config)`.

People write and override an ml_collections config (`default_data_config()` and the training
configs built on it, e.g. `--config.image_size=64`); the data code reads the frozen, typed
`DataSettings` that `create_input` parses from it on entry, never the config itself.

The dataclass defaults below are the one source of truth: `default_data_config()` is built
from them, and a config that lacks a field (one saved before the field existed) gets the
same default. (They live here, not in the config, because the parser needs them for such
configs, and a typed field says what its default means.) A None in a field whose type does
not admit None (an unset placeholder) also means the default. Fields typed `... | None` keep
None: it means "the dataset's default" (filled in from `base.DATASETS` by `from_config`) or,
for `eval_split`, "carve a holdout".
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import types
import typing
from collections.abc import Mapping
from typing import Any

import ml_collections

from experiments import cli
from experiments.data import augment
from experiments.data import shapes as shapes_lib
from experiments.data.base import DATASETS


@dataclasses.dataclass(frozen=True)
class ShapesSettings:
  """`config.shapes`: the procedural dataset (see experiments.data.shapes.generate)."""

  num_train: int = 10_000
  num_eval: int = 2_000
  seed: int = 0
  num_classes: int = len(shapes_lib.CLASS_NAMES)
  scale_range: tuple[float, float] = (0.12, 0.25)
  num_strokes: int = 3
  num_blobs: int = 3
  num_decoys: int = 2
  noise_std: float = 0.06


@dataclasses.dataclass(frozen=True)
class DataSettings:
  """Every data field of the config; the names are the config's (`config.X` is `settings.X`).

  Attributes:
    dataset: 'shapes' | 'cifar10' | 'cifar100' | 'imagenet2012' | 'imagenette' | 'folder'.
    data_dir: tfds data dir (None: tfds default, ~/tensorflow_datasets).
    manual_dir: tfds manual download dir for imagenet2012 (None: <data_dir>/downloads/manual).
    download: let tfds download and prepare missing datasets (off: fail with instructions).
    tfds_config: tfds builder config, e.g. 'full-size-v2' for imagenette (None: default).
    folder: image folder root (root/<split>/<class>/*.jpg) or a .tar.gz of one.
    cache_dir: where archives are extracted (None: $CBAM_JAX_CACHE or ~/.cache/cbam_jax).
    cache_arrays: keep a folder's decoded uint8 arrays in cache_dir (a .npy per split, keyed
      by the folder's file list, sizes and mtimes), so later runs skip JPEG decoding and TF.
    train_split: None = the dataset's 'train'.
    eval_split: 'auto' = the dataset's test/validation split if it has one, else a holdout;
      a split name; or None = always carve `holdout_fraction` of train (stratified,
      deterministic from `split_seed`, disjoint from the remaining train examples).
    holdout_fraction, split_seed: the carved holdout.
    image_size: None = the dataset's default (shapes/CIFAR 32, ImageNet 224; a folder's: its
      images' own size, else 224).
    augment: None = dataset default (a folder's: 'cifar' up to 64 px, else 'imagenet');
      'none' | 'flip' | 'cifar' | 'imagenet'.
    mean, std: per-channel normalisation in [0, 1] units (None = dataset default / computed
      from the training images).
    global_batch_size, eval_batch_size (None = global_batch_size), seed (order + augment).
    input_threads: grain threads computing batches ahead of the training step (0 = inline,
      in the training loop's thread).
    input_workers: grain worker processes computing batches instead of threads (0 = threads);
      for streaming datasets, where decoding dominates (in-memory arrays are copied to
      each worker).
    prefetch_batches: how many batches the threads (each worker) may compute ahead.
    shapes: the procedural dataset, `ShapesSettings`.
  """

  dataset: str = 'shapes'
  data_dir: str | None = None
  manual_dir: str | None = None
  download: bool = False
  tfds_config: str | None = None
  folder: str | None = None
  cache_dir: str | None = None
  cache_arrays: bool = True
  train_split: str | None = None
  eval_split: str | None = 'auto'
  holdout_fraction: float = 0.1
  split_seed: int = 0
  image_size: int | None = None
  augment: str | None = None
  mean: tuple[float, ...] | None = None
  std: tuple[float, ...] | None = None
  global_batch_size: int = 128
  eval_batch_size: int | None = None
  seed: int = 0
  input_threads: int = 2
  input_workers: int = 0
  prefetch_batches: int = 2
  shapes: ShapesSettings = dataclasses.field(default_factory=ShapesSettings)

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict | Mapping[str, Any]) -> DataSettings:
    """The data fields of `config` (a training config holds others too), with the dataset's
    defaults filled in: `image_size`, `augment`, `mean`, `std` and `train_split` where
    `base.DATASETS` fixes them, `eval_split` 'auto' for tfds datasets, `eval_batch_size`.

    Raises:
      ValueError: an unknown dataset or augment; a field of `config.shapes` that does not
        exist, or a top-level field close to a data field's name (a misspelling).
    """
    raw = config.to_dict() if hasattr(config, 'to_dict') else dict(config)
    _check_spelling(raw, cls, 'config', 'a data field', strict=False)
    shapes_raw = raw.get('shapes') or {}
    shapes_raw = shapes_raw.to_dict() if hasattr(shapes_raw, 'to_dict') else dict(shapes_raw)
    _check_spelling(shapes_raw, ShapesSettings, 'config.shapes', 'a field of config.shapes',
                    strict=True)
    values = _with_defaults(raw, cls)
    values['shapes'] = ShapesSettings(**_with_defaults(shapes_raw, ShapesSettings))
    name = values['dataset']
    if name not in DATASETS:
      hint = cli.did_you_mean(str(name), DATASETS, '{!r}')
      raise ValueError(
        f'Unknown dataset {name!r}.{hint} Set config.dataset to one of {sorted(DATASETS)} '
        "(an image folder or .tar.gz of one: dataset='folder', folder=PATH)."
      )
    defaults = DATASETS[name]
    for field in ('image_size', 'augment', 'mean', 'std', 'train_split'):
      if values[field] is None:
        values[field] = defaults.get(field)
    if values['eval_split'] == 'auto' and defaults.get('eval_split'):
      values['eval_split'] = defaults['eval_split']
    if values['eval_batch_size'] is None:
      values['eval_batch_size'] = values['global_batch_size']
    if values['augment'] is not None:
      augment.check_kind(values['augment'])
    values['download'] = bool(values['download'])
    return cls(**values)


def default_data_config() -> ml_collections.ConfigDict:
  """The data fields with their defaults (`DataSettings`'); training configs build on this.

  A field that defaults to None is a typed placeholder, so that the command line can set
  it (`--config.folder=DIR`): ml_collections refuses to override a plain None.
  """
  hints = typing.get_type_hints(DataSettings)
  defaults = {name: ml_collections.config_dict.placeholder(_value_type(hints[name]))
                    if value is None else value
              for name, value in _field_defaults(DataSettings).items()}
  config = ml_collections.ConfigDict(defaults)
  config.shapes = ml_collections.ConfigDict(_field_defaults(ShapesSettings))
  return config


def _value_type(hint: Any) -> type:
  """`str` of `str | None`, `tuple` of `tuple[float, ...] | None`."""
  (value_type,) = [t for t in typing.get_args(hint) if t is not type(None)]
  return typing.get_origin(value_type) or value_type


def _field_defaults(cls) -> dict[str, Any]:
  return {f.name: f.default for f in dataclasses.fields(cls)
          if f.default is not dataclasses.MISSING}


@functools.cache
def _none_is_a_value(cls) -> frozenset[str]:
  """The fields of `cls` whose type admits None."""
  hints = typing.get_type_hints(cls)
  return frozenset(name for name, hint in hints.items()
                   if isinstance(hint, types.UnionType) and type(None) in typing.get_args(hint))


def _with_defaults(raw: dict[str, Any], cls) -> dict[str, Any]:
  """The fields of `cls` from `raw`; absent ones, and None where None is no value, default."""
  values = {}
  for field, default in _field_defaults(cls).items():
    value = raw.get(field)
    if field not in raw or (value is None and field not in _none_is_a_value(cls)):
      value = default
    values[field] = tuple(value) if isinstance(value, list) else value
  return values


def _check_spelling(raw: dict[str, Any], cls, where: str, what: str, *, strict: bool) -> None:
  """Rejects names that are not fields of `cls`: all of them (`strict`), or, where the
  config holds other fields too (a training config), those close to a field's name."""
  fields = [f.name for f in dataclasses.fields(cls)]
  for name in raw:
    if name in fields:
      continue
    close = difflib.get_close_matches(name, fields, n=2, cutoff=0.8)
    if close or strict:
      hint = (f'did you mean {" or ".join(f"{where}.{c}" for c in close)}?' if close
              else f'the fields are {", ".join(fields)}.')
      raise ValueError(f'{where}.{name} is not {what}; {hint}')
