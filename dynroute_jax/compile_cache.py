"""JAX's persistent compilation cache for the command-line programs.

A second run of the same command (a resume, a rerun with another work directory, `evaluate` after
`main`) loads its compiled train and evaluation steps from disk instead of compiling them again:
on a 2-core CPU the digits train steps take tens of seconds to compile and a fraction of a second
to load.

Where: `$DYNROUTE_JAX_CACHE` if set, else `$XDG_CACHE_HOME/dynroute_jax/jax_cache` (default
`~/.cache/dynroute_jax/jax_cache`). `DYNROUTE_JAX_CACHE=off` (or `0`, `none`, empty) turns it off.
JAX's own settings win: with `JAX_COMPILATION_CACHE_DIR` set (or `jax_compilation_cache_dir`
already configured) that directory is used as it is, and `JAX_PERSISTENT_CACHE_MIN_*` variables
keep their values. The cache is keyed by the computation, the compile options, the XLA flags and
the jax/jaxlib versions, so a stale entry is never used; the directory only grows, and deleting it
is always safe.
"""

from __future__ import annotations

import os
import pathlib

ENV_VAR = "DYNROUTE_JAX_CACHE"
OFF_VALUES = ("", "0", "off", "none", "false", "no")
# Compiles shorter than this are not written: loading a tiny executable costs about as much as
# compiling it, and the step functions that matter take seconds even on a fast CPU.
MIN_COMPILE_TIME_S = 0.3


def default_dir() -> pathlib.Path:
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return pathlib.Path(base) / "dynroute_jax" / "jax_cache"


def resolve_dir(cache_dir: str | os.PathLike[str] | None = None) -> str | None:
  """The directory `enable` would use (None: off), without touching JAX."""
  if cache_dir is None:
    cache_dir = os.environ.get(ENV_VAR)
    if cache_dir is None:
      return str(default_dir())
  cache_dir = os.fspath(cache_dir)
  if cache_dir.strip().lower() in OFF_VALUES:
    return None
  return os.path.expanduser(cache_dir)


def enable(cache_dir: str | os.PathLike[str] | None = None,
           min_compile_time_s: float = MIN_COMPILE_TIME_S) -> str | None:
  """Turns on JAX's persistent compilation cache; returns its directory, or None when off.

  Must run before the first compile of the process (JAX opens the cache once).

  Args:
    cache_dir: the directory (local or any filesystem etils.epath supports); None reads
      `$DYNROUTE_JAX_CACHE`, then the default; an off value disables the cache.
    min_compile_time_s: compiles faster than this are not written.
  """
  import jax  # pylint: disable=g-import-not-at-top
  configured = jax.config.jax_compilation_cache_dir
  if configured:  # JAX_COMPILATION_CACHE_DIR or the caller's own setting.
    return configured
  path = resolve_dir(cache_dir)
  if path is None:
    return None
  jax.config.update("jax_compilation_cache_dir", path)
  if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_time_s))
  return path


__all__ = ["ENV_VAR", "MIN_COMPILE_TIME_S", "default_dir", "enable", "resolve_dir"]
