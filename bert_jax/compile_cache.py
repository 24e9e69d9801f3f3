"""A persistent XLA compilation cache for jobs that compile the same step many times."""

from __future__ import annotations

import os


def use_compilation_cache(directory: str) -> str:
  """Points JAX's persistent compilation cache at `directory` unless one is set already
  (JAX_COMPILATION_CACHE_DIR or an earlier call wins). Returns the directory in use.

  Every fine-tuning run of an ablation or the demo builds fresh jitted closures, so
  in-process caching never hits; with this cache the second run of the same shapes skips
  XLA compilation (docs/ablations/README.md: 60 s -> 33 s for a tiny fine-tuning run).
  """
  import jax
  if not jax.config.jax_compilation_cache_dir:
    os.makedirs(directory, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", directory)
  return jax.config.jax_compilation_cache_dir
