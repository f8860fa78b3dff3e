"""Multi-process start-up: when and how to call `jax.distributed.initialize`.

`maybe_initialize(config.distributed)` must run before any other JAX call that touches devices
(`jax.devices()`, `jax.process_count()`, creating an array, jitting): once a backend exists,
`jax.distributed.initialize` raises. `main.py` calls it first thing after parsing flags.

`config.distributed.initialize`:
  'never'   single process; never initializes.
  'always'  initializes; fields left unset (coordinator_address '', num_processes 0,
            process_id -1) are filled by JAX's own cluster auto-detection (SLURM, Open MPI,
            Cloud TPU metadata / GKE, Kubernetes).
  'auto'    (default) initializes only when a multi-process environment is detected:
              * explicit settings: config.distributed.coordinator_address or num_processes > 1, or
                the JAX_COORDINATOR_ADDRESS environment variable;
              * a SLURM job step with more than one task (srun inside sbatch/salloc: SLURM_JOB_ID,
                SLURM_STEP_NODELIST, SLURM_PROCID and SLURM_NTASKS > 1). The batch script itself
                (no srun step) is NOT detected: a process started there would wait for peers that
                never come;
              * Open MPI (mpirun) with OMPI_COMM_WORLD_SIZE > 1;
              * a multi-host Cloud TPU slice on GKE (TPU_WORKER_HOSTNAMES / TPU_PROCESS_ADDRESSES
                with more than one host) or multi-slice (MEGASCALE_NUM_SLICES > 1).
            A plain single host (one GPU box, a laptop, CI, a single-host TPU VM) is never
            initialized. TPU VMs created with `gcloud compute tpus tpu-vm` do not expose the worker
            list in the environment (JAX reads it from the metadata server), so launch/tpu_pod.sh
            passes `--config.distributed.initialize=always`.

GPU device assignment under SLURM (see launch/README.md): JAX's SLURM detection restricts each
process to the GPU whose index equals SLURM_LOCALID. That is right for one process per GPU with
all node GPUs visible, and wrong in two common set-ups, which `maybe_initialize` corrects:
  * one process per node (our default launch): SLURM_LOCALID is 0, so JAX would expose only GPU 0;
    we pass every visible GPU instead;
  * one process per GPU with SLURM binding one GPU per task (--gpus-per-task=1, --gpu-bind):
    CUDA_VISIBLE_DEVICES holds one GPU, which CUDA calls device 0, while SLURM_LOCALID is 0..k-1;
    we pass [0].
JAX_LOCAL_DEVICE_IDS, when set, always wins.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, Mapping

import jax

_log = logging.getLogger(__name__)

_SLURM_STEP_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_PROCID", "SLURM_LOCALID")


def _int_env(env: Mapping[str, str], name: str) -> int | None:
  value = env.get(name)
  try:
    return int(value) if value not in (None, "") else None
  except ValueError:
    return None


def _hosts(value: str | None) -> int:
  return len([h for h in (value or "").split(",") if h.strip()])


def detect_cluster(env: Mapping[str, str] | None = None) -> str | None:
  """Name of the detected multi-process environment, or None on a plain single host."""
  env = os.environ if env is None else env
  if env.get("JAX_COORDINATOR_ADDRESS"):
    return "env:JAX_COORDINATOR_ADDRESS"
  if all(v in env for v in _SLURM_STEP_VARS):
    ntasks = _int_env(env, "SLURM_STEP_NUM_TASKS") or _int_env(env, "SLURM_NTASKS") or 1
    if ntasks > 1:
      return "slurm"
  if "OMPI_MCA_orte_hnp_uri" in env or "OMPI_COMM_WORLD_SIZE" in env:
    if (_int_env(env, "OMPI_COMM_WORLD_SIZE") or 1) > 1:
      return "openmpi"
  tpu_hosts = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES")
  if _hosts(tpu_hosts) > 1:
    return "tpu_pod"
  if (_int_env(env, "MEGASCALE_NUM_SLICES") or 1) > 1:
    return "tpu_multislice"
  return None


def validate_config(dist_config: Any) -> None:
  """Raises ValueError for inconsistent settings, before anything starts."""
  mode = dist_config.initialize
  if mode not in ("auto", "always", "never"):
    raise ValueError(f"config.distributed.initialize must be 'auto', 'always' or 'never'; got {mode!r}.")
  n, pid = dist_config.num_processes, dist_config.process_id
  addr = dist_config.coordinator_address
  if not isinstance(n, int) or n < 0:
    raise ValueError(f"config.distributed.num_processes must be an int >= 0 (0 = detect); got {n!r}.")
  if not isinstance(pid, int) or pid < -1:
    raise ValueError(f"config.distributed.process_id must be an int >= 0, or -1 (detect); got {pid!r}.")
  if n and pid >= n:
    raise ValueError(f"config.distributed.process_id={pid} must be < config.distributed.num_processes={n} "
                     f"(process ids run from 0 to num_processes - 1).")
  if (n > 1 or pid >= 0) and not addr:
    raise ValueError(
        f"config.distributed.num_processes={n} / process_id={pid} are set but "
        f"config.distributed.coordinator_address is empty. Set it to 'host:port' of process 0 "
        f"(the same on every process), or leave all three unset to let the cluster be detected.")
  if addr:
    host, sep, port = addr.rpartition(":")
    if not sep or not host or not port.isdigit():
      raise ValueError(f"config.distributed.coordinator_address must be 'host:port'; got {addr!r}.")
    if (n == 0) != (pid == -1):
      raise ValueError(
          "config.distributed.coordinator_address is set: also set both "
          f"config.distributed.num_processes and process_id (got {n} and {pid}), or neither to let "
          "the cluster environment provide them.")
  if mode == "never" and (addr or n > 1):
    raise ValueError("config.distributed.initialize='never' contradicts coordinator_address/"
                     f"num_processes={n}; use 'auto' or 'always'.")
  timeout = dist_config.initialization_timeout
  if not isinstance(timeout, int) or timeout <= 0:
    raise ValueError(f"config.distributed.initialization_timeout must be a positive int (seconds); "
                     f"got {timeout!r}.")


def _slurm_local_device_ids(env: Mapping[str, str]) -> list[int] | None:
  """Corrects JAX's SLURM GPU assignment (see module docstring); None = let JAX decide."""
  if env.get("JAX_LOCAL_DEVICE_IDS") or not all(v in env for v in _SLURM_STEP_VARS):
    return None
  visible = [d for d in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
  if not visible:
    return None  # Not a GPU job, or all GPUs visible with unknown count: JAX's default.
  ntasks = _int_env(env, "SLURM_STEP_NUM_TASKS") or _int_env(env, "SLURM_NTASKS")
  nnodes = _int_env(env, "SLURM_STEP_NUM_NODES") or _int_env(env, "SLURM_NNODES")
  if ntasks and nnodes and ntasks == nnodes:
    return list(range(len(visible)))  # One process per node: all of the node's GPUs.
  if len(visible) == 1:
    return [0]  # One GPU bound per task: CUDA renumbers it 0.
  return None


def initialize_kwargs(dist_config: Any, env: Mapping[str, str] | None = None) -> dict[str, Any] | None:
  """Arguments for `jax.distributed.initialize`, or None when this process should not initialize."""
  env = os.environ if env is None else env
  validate_config(dist_config)
  mode = dist_config.initialize
  explicit = bool(dist_config.coordinator_address) or dist_config.num_processes > 1
  if mode == "never" or (mode == "auto" and not explicit and detect_cluster(env) is None):
    return None
  kwargs: dict[str, Any] = {"initialization_timeout": dist_config.initialization_timeout}
  if dist_config.coordinator_address:
    kwargs["coordinator_address"] = dist_config.coordinator_address
  if dist_config.num_processes > 0:
    kwargs["num_processes"] = dist_config.num_processes
  if dist_config.process_id >= 0:
    kwargs["process_id"] = dist_config.process_id
  local_ids = _slurm_local_device_ids(env)
  if local_ids is not None:
    kwargs["local_device_ids"] = local_ids
  return kwargs


def startup_message(kwargs: Mapping[str, Any]) -> str:
  """The line printed before `jax.distributed.initialize` blocks, naming what it waits for."""
  unset = "from the cluster environment"
  coordinator = kwargs.get("coordinator_address", unset)
  n = kwargs.get("num_processes", unset)
  pid = kwargs.get("process_id", unset)
  timeout = kwargs["initialization_timeout"]
  return (f"jax.distributed.initialize: process {pid} of {n}, coordinator {coordinator}; waiting up "
          f"to {timeout} s (config.distributed.initialization_timeout) for all processes to "
          f"connect. If this process then aborts (SIGABRT, exit status 134), a peer never started, "
          f"crashed, or cannot reach the coordinator, or the processes disagree on "
          f"coordinator_address / num_processes.")


_initialized = False


def maybe_initialize(dist_config: Any, env: Mapping[str, str] | None = None) -> bool:
  """Calls `jax.distributed.initialize` when `config.distributed` asks for it; returns whether it did.

  Call before any other JAX call. Idempotent within a process.
  """
  global _initialized
  kwargs = initialize_kwargs(dist_config, env)
  if kwargs is None or _initialized:
    return _initialized
  _log.info("jax.distributed.initialize(%s) [detected: %s]", kwargs,
            detect_cluster(os.environ if env is None else env) or "config")
  # Printed, not only logged, and flushed: when a peer never connects, the JAX runtime aborts this
  # process (SIGABRT, which Python cannot catch) after the timeout, and this line is all the user
  # gets to explain it.
  print(startup_message(kwargs), file=sys.stderr, flush=True)
  jax.distributed.initialize(**kwargs)
  _initialized = True
  check_process_count(dist_config.num_processes)
  _log.info("process %d of %d, %d local / %d global devices", jax.process_index(),
            jax.process_count(), jax.local_device_count(), jax.device_count())
  return True


def check_process_count(num_processes: int) -> None:
  """Raises ValueError on EVERY process when the processes' num_processes settings disagree.

  `jax.distributed.initialize` does not compare them: the coordinator (process 0) waits for its own
  count, and a process configured with another count joins anyway and runs with the coordinator's,
  silently. So after initializing, every process shares its setting (one tiny collective) and all
  raise the same error. 0 means "from the cluster environment" and is not compared.
  """
  count = jax.process_count()
  if count == 1:
    if num_processes > 1:
      raise ValueError(f"config.distributed.num_processes={num_processes}, but this process runs "
                       f"alone (jax.process_count() == 1).")
    return
  import numpy as np
  from jax.experimental import multihost_utils
  configured = np.asarray(multihost_utils.process_allgather(
      np.asarray([num_processes], np.int32))).reshape(-1)
  if any(n not in (0, count) for n in configured):
    per_process = ", ".join(f"process {i}: {int(n)}" for i, n in enumerate(configured))
    raise ValueError(
        f"The processes disagree on config.distributed.num_processes ({per_process}; 0 = from the "
        f"environment), and {count} processes joined the coordinator. Start every process with the "
        f"same num_processes and coordinator_address. Nothing was compiled or written.")


def any_process(flag: bool) -> bool:
  """True when `flag` is true on ANY process (a collective: every process must call it together).

  For decisions that change the sequence of collectives, such as stopping on a preemption signal
  that reached only some processes: deciding locally would leave the others waiting in the next
  step's all-reduce until the cluster kills the job. Costs one tiny cross-process collective;
  call it every few steps, at the same steps on every process. Single process: returns `flag`.
  """
  if jax.process_count() == 1:
    return bool(flag)
  import numpy as np
  from jax.experimental import multihost_utils
  flags = multihost_utils.process_allgather(np.asarray([int(bool(flag))], np.int32), tiled=True)
  return bool(np.any(flags))


def is_main_process() -> bool:
  """True on process 0 (writes logs, summaries and other single-writer files)."""
  return jax.process_index() == 0
