"""Building blocks of `experiments.input_pipeline` (sources, augmentations, pipelines)."""
