"""When `maybe_initialize` calls jax.distributed.initialize, and with what (no real cluster needed).

The last test starts two real CPU processes on localhost that form one 8-device mesh.
"""

import os
import socket
import subprocess
import sys
import textwrap

import ml_collections
import pytest

from conftest import xla_flags  # pylint: disable=g-bad-import-order

from dynroute_jax import distributed

SLURM_STEP = {"SLURM_JOB_ID": "1234", "SLURM_STEP_NODELIST": "node[001-002]", "SLURM_PROCID": "3",
              "SLURM_LOCALID": "1", "SLURM_NTASKS": "4", "SLURM_STEP_NUM_TASKS": "4",
              "SLURM_NNODES": "2", "SLURM_STEP_NUM_NODES": "2"}


def _cfg(**kw):
  c = ml_collections.ConfigDict(dict(initialize="auto", coordinator_address="", num_processes=0,
                                     process_id=-1, initialization_timeout=300))
  c.update(kw)
  return c


@pytest.mark.parametrize("env,expected", [
    ({}, None),
    ({"HOME": "/root", "CUDA_VISIBLE_DEVICES": "0,1,2,3"}, None),   # one GPU box
    (SLURM_STEP, "slurm"),
    ({**SLURM_STEP, "SLURM_NTASKS": "1", "SLURM_STEP_NUM_TASKS": "1"}, None),  # single task
    ({k: v for k, v in SLURM_STEP.items() if k != "SLURM_STEP_NODELIST"}, None),  # batch script
    ({"SLURM_JOB_ID": "1", "SLURM_NTASKS": "8"}, None),            # salloc shell, no srun
    ({"OMPI_COMM_WORLD_SIZE": "4", "OMPI_MCA_orte_hnp_uri": "x"}, "openmpi"),
    ({"OMPI_COMM_WORLD_SIZE": "1"}, None),
    ({"TPU_WORKER_HOSTNAMES": "t-0,t-1,t-2,t-3", "TPU_WORKER_ID": "2"}, "tpu_pod"),
    ({"TPU_WORKER_HOSTNAMES": "localhost"}, None),                  # single-host TPU VM
    ({"MEGASCALE_NUM_SLICES": "2"}, "tpu_multislice"),
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}, "env:JAX_COORDINATOR_ADDRESS"),
])
def test_detect_cluster(env, expected):
  assert distributed.detect_cluster(env) == expected


def test_initialize_kwargs_modes():
  assert distributed.initialize_kwargs(_cfg(), {}) is None
  assert distributed.initialize_kwargs(_cfg(initialize="never"), SLURM_STEP) is None
  assert distributed.initialize_kwargs(_cfg(initialize="always"), {}) == {"initialization_timeout": 300}
  kw = distributed.initialize_kwargs(_cfg(), SLURM_STEP)
  assert kw == {"initialization_timeout": 300}  # JAX's SLURM detection fills the rest.
  kw = distributed.initialize_kwargs(
      _cfg(coordinator_address="10.1.2.3:1234", num_processes=2, process_id=1,
           initialization_timeout=60), {})
  assert kw == {"coordinator_address": "10.1.2.3:1234", "num_processes": 2, "process_id": 1,
                "initialization_timeout": 60}


def test_slurm_local_device_ids():
  # One process per node, 8 visible GPUs: all of them (JAX alone would pick GPU SLURM_LOCALID=0).
  per_node = {**SLURM_STEP, "SLURM_NTASKS": "2", "SLURM_STEP_NUM_TASKS": "2", "SLURM_LOCALID": "0",
              "CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"}
  assert distributed.initialize_kwargs(_cfg(), per_node)["local_device_ids"] == list(range(8))
  # One process per GPU with one GPU bound per task: CUDA calls it 0, whatever SLURM_LOCALID is.
  bound = {**SLURM_STEP, "CUDA_VISIBLE_DEVICES": "5"}
  assert distributed.initialize_kwargs(_cfg(), bound)["local_device_ids"] == [0]
  # One process per GPU, all GPUs visible: JAX's default ([SLURM_LOCALID]) is right.
  shared = {**SLURM_STEP, "CUDA_VISIBLE_DEVICES": "0,1"}
  assert "local_device_ids" not in distributed.initialize_kwargs(_cfg(), shared)
  # The user's JAX_LOCAL_DEVICE_IDS wins.
  assert "local_device_ids" not in distributed.initialize_kwargs(
      _cfg(), {**per_node, "JAX_LOCAL_DEVICE_IDS": "0,1"})


@pytest.mark.parametrize("kw,match", [
    (dict(initialize="sometimes"), "config.distributed.initialize"),
    (dict(coordinator_address="h:1", num_processes=2, process_id=2), r"process_id=2 must be < .*num_processes=2"),
    (dict(num_processes=4), "coordinator_address is empty"),
    (dict(process_id=0), "coordinator_address is empty"),
    (dict(coordinator_address="h:1", num_processes=2), "set both"),
    (dict(coordinator_address="nohostport"), "'host:port'"),
    (dict(coordinator_address="h:1", num_processes=2, process_id=0, initialize="never"), "contradicts"),
    (dict(num_processes=-1), "num_processes"),
    (dict(process_id=-2), "process_id"),
    (dict(initialization_timeout=0), "initialization_timeout"),
])
def test_validation_errors(kw, match):
  with pytest.raises(ValueError, match=match):
    distributed.initialize_kwargs(_cfg(**kw), {})


def test_maybe_initialize_calls_jax_only_when_asked(monkeypatch):
  calls = []
  monkeypatch.setattr(distributed.jax.distributed, "initialize", lambda **kw: calls.append(kw))
  monkeypatch.setattr(distributed, "_initialized", False)
  for k in list(os.environ):
    if k.startswith(("SLURM_", "OMPI_", "TPU_", "MEGASCALE_", "JAX_COORDINATOR")):
      monkeypatch.delenv(k)
  assert distributed.maybe_initialize(_cfg()) is False
  assert calls == []
  for k, v in SLURM_STEP.items():
    monkeypatch.setenv(k, v)
  monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
  assert distributed.maybe_initialize(_cfg()) is True
  assert calls == [{"initialization_timeout": 300, "local_device_ids": [0]}]
  assert distributed.maybe_initialize(_cfg()) is True  # idempotent
  assert len(calls) == 1
  # Validation runs before anything else, even when already initialized.
  with pytest.raises(ValueError):
    distributed.maybe_initialize(_cfg(num_processes=3))


_WORKER = textwrap.dedent("""
    import sys
    import jax
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", 4)
    import ml_collections, numpy as np, jax.numpy as jnp
    from jax.experimental import multihost_utils
    from dynroute_jax import distributed, sharding
    pid, port = int(sys.argv[1]), sys.argv[2]
    cfg = ml_collections.ConfigDict(dict(initialize="auto", coordinator_address="127.0.0.1:" + port,
                                         num_processes=2, process_id=pid, initialization_timeout=60))
    assert distributed.maybe_initialize(cfg)
    assert jax.process_count() == 2 and jax.device_count() == 8
    assert distributed.is_main_process() == (pid == 0)
    mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=2)))
    assert sharding.check_batch(16, mesh) == 8
    local = {"x": np.arange(8, dtype=np.float32) + 8 * pid}
    batch = sharding.make_global_batch(local, mesh)
    assert batch["x"].shape == (16,)
    total = jax.jit(lambda x: jnp.sum(x * x), out_shardings=sharding.replicated(mesh))(batch["x"])
    full = multihost_utils.process_allgather(batch["x"], tiled=True)
    assert np.array_equal(full, np.arange(16, dtype=np.float32)), full
    assert float(total) == float(np.sum(np.arange(16.0) ** 2)), total
    assert distributed.any_process(pid == 1) and not distributed.any_process(False)
    print("worker", pid, "ok")
""")


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_real_processes_form_one_mesh(tmp_path):
  script = tmp_path / "worker.py"
  script.write_text(_WORKER)
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(("SLURM_", "OMPI_", "TPU_", "MEGASCALE_", "JAX_", "XLA_FLAGS"))}
  env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
  env["XLA_FLAGS"] = xla_flags()
  port = str(_free_port())
  procs = [subprocess.Popen([sys.executable, str(script), str(i), port], cwd=root, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  outs = []
  try:
    for p in procs:
      outs.append(p.communicate(timeout=240)[0])
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for i, (p, out) in enumerate(zip(procs, outs)):
    assert p.returncode == 0 and f"worker {i} ok" in out, out[-4000:]
