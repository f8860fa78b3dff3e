"""Multi-process training on CPU over loopback: 2 processes x 4 fake devices against 1 x 8.

Every process is a subprocess running tests/mp_driver.py (or the CLI) with its own
XLA_FLAGS=--xla_force_host_platform_device_count, a coordinator on 127.0.0.1 at a free port, and
collectives over gloo (the CPU default). Every wait is bounded by a subprocess timeout; a process
still running at the end of a test is killed.

* `test_two_processes_match_one`: the tiny CoDiNet trains 3 steps on mocked CIFAR-10 with
  2 x 4 devices and with 1 x 8; the per-step losses agree, the 2-process checkpoint restores in a
  single process (restore_for_eval, and the trainer's own resume, which re-evaluates it), and the
  evaluation of the 2-process run counts every test example exactly once.
* `test_peer_never_starts`: either of two processes alone; the JAX runtime aborts it after
  config.distributed.initialization_timeout, having printed what it waited for.
* bad input: inconsistent num_processes, an indivisible global batch and a mesh that does not match
  the devices fail with a ValueError on every process before anything compiles.
* `test_dry_run_cli`: the CLI's dry run on 8 fake devices with FSDP prints per-device memory and
  FLOPs and neither trains nor writes a checkpoint.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import xla_flags  # pylint: disable=g-bad-import-order

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DRIVER = os.path.join(ROOT, "tests", "mp_driver.py")
RUN_TIMEOUT = 480      # One training run under a loaded 2-core machine (typically 1-2 minutes).
FAIL_TIMEOUT = 240     # A run that must fail before compiling.
MOCK_TEST_EXAMPLES = 52  # mp_driver.NUM_EXAMPLES: the mocked test split's size.


# The suite's persistent compilation cache (tests/conftest.py) is kept, as the CLI keeps its own:
# a process's second training run and the 1 x 8 run's resume then load their compiled steps.
CACHE_VARS = ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS")


def _env(local_devices):
  env = {k: v for k, v in os.environ.items()
         if k in CACHE_VARS
         or not k.startswith(("SLURM_", "OMPI_", "TPU_", "MEGASCALE_", "JAX_", "XLA_FLAGS"))}
  env.update(PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu",
             TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1",
             XLA_FLAGS=xla_flags(local_devices))  # The suite's flags: both sides of a comparison.
  return env


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start(args, local_devices, log_path):
  log = open(log_path, "w")  # pylint: disable=consider-using-with
  proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=_env(local_devices), stdout=log,
                          stderr=subprocess.STDOUT, start_new_session=True)
  proc.log_path = log_path
  proc.log_file = log
  return proc


def _wait_all(procs, timeout):
  """Waits for every process until a common deadline; kills the rest. Returns (codes, outputs)."""
  deadline = time.monotonic() + timeout
  codes = []
  try:
    for p in procs:
      try:
        codes.append(p.wait(timeout=max(deadline - time.monotonic(), 1)))
      except subprocess.TimeoutExpired:
        codes.append(None)  # Timed out.
  finally:
    late = [p for p in procs if p.poll() is None]
    for p in late:  # mp_driver prints every thread's stack on SIGUSR1: where did it hang?
      os.kill(p.pid, signal.SIGUSR1)
    if late:
      time.sleep(3)
    for p in procs:
      if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait(timeout=30)
      p.log_file.close()
  outs = []
  for p in procs:
    with open(p.log_path, errors="replace") as f:
      outs.append(f.read())
  return codes, outs


def _driver(workdir, out, *extra):
  return [DRIVER, f"--workdir={workdir}", f"--out={out}", *extra]


def _two_processes(tmp_path, name, extra_per_process=((), ()), timeout=RUN_TIMEOUT, port=None):
  port = port or _free_port()
  procs = [_start(_driver(tmp_path / name, tmp_path / f"{name}.json", "--num_processes=2",
                          f"--process_id={i}", f"--port={port}", *extra_per_process[i]),
                  4, tmp_path / f"{name}_{i}.log") for i in range(2)]
  return _wait_all(procs, timeout)


def _tail(outs, n=3000):
  return "\n".join(f"--- process {i} ---\n{o[-n:]}" for i, o in enumerate(outs))


def _rel(a, b):
  return abs(a - b) / max(abs(b), 1e-12)


def test_two_processes_match_one(tmp_path):
  t0 = time.monotonic()
  codes, outs = _two_processes(tmp_path, "mp")
  assert codes == [0, 0], _tail(outs)
  two = json.loads((tmp_path / "mp.json").read_text())
  t_two = time.monotonic() - t0
  assert (two["process_count"], two["device_count"], two["local_device_count"]) == (2, 8, 4)
  assert (tmp_path / "mp" / "eval" / "report.json").exists()
  # Run again on the same workdir, both processes resume from the final checkpoint and only
  # re-evaluate, to the same report.
  assert two["rerun"]["losses"] == {}
  assert two["rerun"]["report"]["step"] == 3
  assert two["rerun"]["report"]["accuracy_all"] == two["report"]["accuracy_all"]
  assert two["rerun"]["report"]["all"]["num_examples"] == MOCK_TEST_EXAMPLES

  # 1 process x 8 devices: its own run, then the 2-process checkpoint restored and re-evaluated.
  codes, outs = _wait_all([_start(_driver(tmp_path / "sp", tmp_path / "sp.json",
                                          f"--restore_from={tmp_path / 'mp'}"),
                                  8, tmp_path / "sp.log")], RUN_TIMEOUT)
  assert codes == [0], _tail(outs)
  one = json.loads((tmp_path / "sp.json").read_text())
  assert (one["process_count"], one["device_count"]) == (1, 8)
  print(f"2x4 run {t_two:.0f} s, 1x8 run + restore {time.monotonic() - t0 - t_two:.0f} s")

  # Same losses, step by step.
  assert sorted(two["losses"]) == sorted(one["losses"]) == ["0", "1", "2"]
  for step in ("0", "1", "2"):
    print(f"step {step}: 2x4 {two['losses'][step]!r}  1x8 {one['losses'][step]!r}")
    assert _rel(two["losses"][step], one["losses"][step]) <= 1e-5, (two["losses"], one["losses"])

  # The evaluation gathered across both processes counts every test example exactly once.
  for report in (two["report"], one["report"]):
    assert report["all"]["num_examples"] == MOCK_TEST_EXAMPLES
    for sweep in report["thresholds"].values():
      assert sweep["num_examples"] == MOCK_TEST_EXAMPLES
  assert abs(two["report"]["accuracy_all"] - one["report"]["accuracy_all"]) < 1e-9
  assert _rel(two["report"]["macs_all"], one["report"]["macs_all"]) <= 1e-6

  # The checkpoint written by 2 processes restores in 1: same parameters and batch statistics as
  # the single-process run's, and the trainer resumes it (every stage done) and re-evaluates it
  # to the same report.
  restored = one["restored"]
  assert restored["meta_step"] == 3 and restored["same_structure"] and restored["num_leaves"] > 10
  print(f"restored 2x4 checkpoint vs 1x8: max |diff| {restored['max_abs_diff']:.3g} over "
        f"{restored['num_leaves']} parameter leaves and the batch statistics")
  assert restored["max_abs_diff"] <= 1e-5, restored["max_abs_diff"]
  assert restored["resumed_losses"] == {}  # Nothing left to train.
  resumed = restored["resumed_report"]
  assert resumed["step"] == 3 and resumed["all"]["num_examples"] == MOCK_TEST_EXAMPLES
  assert abs(resumed["accuracy_all"] - two["report"]["accuracy_all"]) < 1e-9
  assert abs(resumed["accuracy_routed"] - two["report"]["accuracy_routed"]) < 1e-9


def test_peer_never_starts(tmp_path):
  """Process 0 of 2 alone, and process 1 of 2 alone (both at once, each with its own coordinator
  port): each aborts after the timeout, having said why it waits."""
  timeout_s = 2  # No peer ever comes: any bound shows the abort, and the worker idles through it.
  ports = [_free_port() for _ in range(2)]
  t0 = time.monotonic()
  codes, outs = _wait_all([_start(
      _driver(tmp_path / f"w{present}", tmp_path / "out.json", "--num_processes=2",
              f"--process_id={present}", f"--port={port}", f"--timeout={timeout_s}"),
      4, tmp_path / f"log{present}") for present, port in enumerate(ports)],
                          timeout_s + FAIL_TIMEOUT)
  elapsed = time.monotonic() - t0
  for present, (port, code, out) in enumerate(zip(ports, codes, outs)):
    assert code is not None, f"process {present} not aborted within the bound:\n{out[-3000:]}"
    # SIGABRT from the JAX runtime (a negative code: killed by signal 6), never a clean exit.
    assert code == -signal.SIGABRT, (present, code, out[-3000:])
    assert (f"process {present} of 2, coordinator 127.0.0.1:{port}; waiting up to {timeout_s} s"
            in out), out[-3000:]
    assert "initialization_timeout" in out and "a peer never started" in out
    assert not (tmp_path / f"w{present}").exists()  # Nothing ran past initialize.
  assert elapsed >= timeout_s


def test_processes_disagree_on_num_processes(tmp_path):
  """Process 1 believes in 3 processes: jax.distributed alone would let it run with 2."""
  port = _free_port()
  procs = [_start(_driver(tmp_path / "w", tmp_path / "out.json", f"--num_processes={n}",
                          f"--process_id={i}", f"--port={port}", "--timeout=60"),
                  4, tmp_path / f"log{i}") for i, n in enumerate((2, 3))]
  codes, outs = _wait_all(procs, FAIL_TIMEOUT)
  for code, out in zip(codes, outs):
    assert code not in (0, None), _tail(outs)
    assert "ValueError: The processes disagree on config.distributed.num_processes " \
           "(process 0: 2, process 1: 3" in out, _tail(outs)
  assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("override,message", [
    ("train.global_batch_size=12",
     "config.train.global_batch_size=12 is not divisible by the device count 8"),
    ("mesh.data=3", "config.mesh.data=3 x config.mesh.fsdp=1 = 3 devices, but 8 devices are "
                    "available (2 process(es) x 4 local)"),
])
def test_bad_input_fails_on_every_process(tmp_path, override, message):
  codes, outs = _two_processes(tmp_path, "bad", ((f"--override={override}",),) * 2,
                               timeout=FAIL_TIMEOUT)
  for code, out in zip(codes, outs):
    assert code not in (0, None), _tail(outs)
    assert "ValueError: " + message in out, _tail(outs)
    assert "compiled the train step" not in out
  assert not (tmp_path / "bad" / "checkpoints").exists()


def test_dry_run_cli(tmp_path):
  workdir = tmp_path / "dry"
  codes, outs = _wait_all([_start(
      # The CoDiNet variant: its step compiles in a third of the time of even a one-node DRNet.
      ["-m", "dynroute_jax.main", "--config=configs/digits.py:codinet", f"--workdir={workdir}",
       "--config.dry_run=True", "--config.mesh.param_sharding=fsdp", "--config.mesh.fsdp=2"],
      8, tmp_path / "dry.log")], RUN_TIMEOUT)
  out = outs[0]
  assert codes == [0], out[-4000:]
  assert "dry run: compiled train step" in out
  assert "memory per device: arguments" in out and "estimated peak per device" in out
  assert "FLOPs per step per device" in out and "FLOPs per step, all 8 devices" in out
  assert "unavailable" not in out
  print(out[out.index("dry run: compiled train step"):][:1200])
  assert not (workdir / "checkpoints").exists() or not any((workdir / "checkpoints").iterdir())
  assert not (workdir / "eval").exists()
