"""``python -m experiments.bench.benchmark``."""

import jax

from experiments.bench.benchmark import main

if __name__ == '__main__':
  from experiments import perf

  perf.reexec_with_cpu_env()  # What experiments.training.train runs with (huge pages for malloc).
  # Compile times are measured: never load a program from a persistent cache.
  jax.config.update('jax_enable_compilation_cache', False)
  main()

