"""Building blocks of `experiments.data.pipeline` (sources, augmentations, pipelines)."""
