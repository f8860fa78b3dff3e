"""Shared test fixtures: quiet TensorFlow logging, a shared compilation cache, and a factory of tiny
training configs."""

import contextlib
import fcntl
import importlib.util
import os
import pathlib
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# XLA:CPU at optimisation level 0 for the whole suite and its subprocesses (the default is 3): the
# suite's time is mostly compiling tiny models, and its programs run for milliseconds. A cold
# suite on 2 workers, back to back on one machine: 511 s (984 CPU-s) at level 1, 463 s (885 CPU-s)
# at level 0; every file but the fault tests' command-line runs got cheaper. Both sides of every
# comparison use the same flags; a test about the optimisation level itself asks for the level
# it compares with. DYNROUTE_TEST_XLA_OPT=full tests with XLA's default.
# At that level XLA:CPU's older loop emitters also compile faster than its fusion emitters, and
# run as fast: the tiny DRNet train step of the fault tests (on an Intel Xeon, 2 CPUs) compiled in
# 8.0-8.7 s against 11.7-12.4 s, and stepped in 62-67 ms either way. At the default level
# they would cost run time (15 against 11 ms a step) for a smaller compile saving (16.6 against
# 18.0 s), so the library leaves XLA's default alone.
TEST_XLA_FLAGS = ("" if os.environ.get("DYNROUTE_TEST_XLA_OPT") == "full"
                  else "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false")


def xla_flags(devices: int | None = None) -> str:
  """XLA_FLAGS for a subprocess of the suite: the suite's flags, on `devices` CPU devices."""
  count = [] if devices is None else [f"--xla_force_host_platform_device_count={devices}"]
  return " ".join([*TEST_XLA_FLAGS.split(), *count])


os.environ["XLA_FLAGS"] = " ".join([*os.environ.get("XLA_FLAGS", "").split(),
                                   *xla_flags().split()])

import pytest  # pylint: disable=g-import-not-at-top

REPO = pathlib.Path(__file__).resolve().parents[1]

from dynroute_jax import compile_cache  # pylint: disable=g-import-not-at-top,wrong-import-position

# One persistent compilation cache per checkout (.jax_cache/, git-ignored), shared by the
# pytest-xdist workers and by every subprocess a test starts: they inherit these variables and
# JAX reads them at import. Many tests compile the same tiny configs, so only the first compiles.
# DYNROUTE_JAX_CACHE=off turns it off; a JAX_COMPILATION_CACHE_DIR of your own wins.
# Every program is cached, however quick to compile (the library's own threshold skips those
# under MIN_COMPILE_TIME_S): the suite's thousands of small programs recur across workers and
# tests, and reading one back takes milliseconds where compiling it takes tens (a cold suite
# compiled 400 s in-process with the threshold, 367 s without).
CACHE_DIR = compile_cache.resolve_dir(os.environ.get(compile_cache.ENV_VAR, REPO / ".jax_cache"))
if CACHE_DIR is not None:
  os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", CACHE_DIR)
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  if "jax" in sys.modules:  # Imported before this file (a plugin): configure it directly.
    compile_cache.enable(os.environ["JAX_COMPILATION_CACHE_DIR"], min_compile_time_s=float(
        os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))


def load_config_module(name: str):
  """configs/<name>.py as a module, whatever the working directory."""
  spec = importlib.util.spec_from_file_location(f"_test_configs_{name}",
                                                REPO / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def make_tiny_config(model: str = "codinet", dataset: str = "digits", *, stage1_steps: int = 2,
                     stage2_steps: int = 2, batch: int = 16, data_dir: str = ""):
  """A shipped config shrunk to a few-second compile: same losses and stages, tiny widths.

  model: 'codinet' (routed ResNet-8, width 4, 2 views, consistency/diversity/cost losses, stage 2
    with frozen routers and hard decisions) or 'drnet' (3 cells of 1 node, 4 channels, drop-branch,
    auxiliary head on 32x32 inputs).
  dataset: 'digits' (8x8x1, offline) or 'cifar10' (32x32x3; use under tfds.testing.mock_data).
  """
  from dynroute_jax.models import codinet  # pylint: disable=g-import-not-at-top

  if dataset == "digits":
    c = load_config_module("digits").get_config(model)
    if model == "codinet":
      c.model = codinet.default_config("resnet8", num_classes=10, image_size=8, num_channels=1)
  elif dataset == "cifar10":
    c = (load_config_module("codinet_cifar10").get_config("resnet32") if model == "codinet"
         else load_config_module("drnet_cifar10").get_config("S"))
    if model == "codinet":
      c.model.variant = "resnet8"
      c.train.stage1.cost_weight = 0.1
    c.data.autoaugment = False  # Keeps the tiny end-to-end runs' compile short.
  else:
    raise ValueError(f"unknown test dataset {dataset!r}")
  if model == "codinet":
    c.model.width = 4
  else:
    c.model.update(dict(variant="tiny", num_cells=3, init_channels=4, num_nodes=1,
                        stem_multiplier=1))
  c.data.data_dir = data_dir
  c.train.global_batch_size = batch
  c.train.stage1.steps = stage1_steps
  c.train.stage2.steps = stage2_steps
  c.eval.batch_size = 32
  c.eval.thresholds = (c.eval.threshold,)
  # One static threshold (the default sweeps 20, a pass over the test split each); the tests of
  # the static counterpart set their own.
  c.eval.static_thresholds = (0.5,)
  c.checkpoint.every_steps = 1000
  c.log_every_steps = 1000
  return c


@pytest.fixture
def tiny_config():
  """The `make_tiny_config` factory."""
  return make_tiny_config


def host_variables(model, x, seed: int = 0):
  """`model.init`'s variables for input `x`, drawn on the host: normal kernels scaled by
  1/sqrt(fan-in), zero biases and means, unit scales and variances.

  Only the shapes are traced; nothing is compiled. Compiling a model's initializer costs more than
  anything a test then does with it (its hundreds of random draws: 6 s for test_evaluate's DRNet).
  """
  import functools  # pylint: disable=g-import-not-at-top
  import math  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from dynroute_jax import costs  # pylint: disable=g-import-not-at-top

  key = jax.random.key(0)
  shapes = jax.eval_shape(functools.partial(model.init, train=False),
                          {"params": key, "routing": key, "dropout": key}, x)
  rs = np.random.RandomState(seed)

  def fill(path, s):
    name = costs.path_str(path).split("/")[-1]
    if name in ("bias", "mean"):
      return np.zeros(s.shape, s.dtype)
    if name in ("scale", "var"):
      return np.ones(s.shape, s.dtype)
    fan_in = max(1, math.prod(s.shape[:-1]))
    return (rs.normal(size=s.shape) / math.sqrt(fan_in)).astype(s.dtype)

  return jax.tree.map(jax.numpy.asarray, jax.tree_util.tree_map_with_path(fill, shapes))


@contextlib.contextmanager
def shared_across_workers(tmp_path_factory, name: str):
  """(folder, done) for a result every pytest-xdist worker of this run may reuse; yields locked.

  The first worker to enter builds the result in `folder` and the others wait, then find
  `done` True. The folder lives in the run's shared temporary root under xdist, in this process's
  own one otherwise; `done` turns True only when the block ends without an error.
  """
  base = tmp_path_factory.getbasetemp()
  root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
  folder = root / f"shared_{name}"
  folder.mkdir(exist_ok=True)
  with open(root / f"shared_{name}.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    marker = folder / ".done"
    yield folder, marker.exists()
    marker.touch()


def pytest_collection_modifyitems(items):
  """Slow tests first, so that the pytest-xdist workers end on short tests rather than one worker
  finishing a 30-s test while the other idles (longest-first scheduling).

  Order, stable within each rank: the first test that needs `reference` (one worker builds that
  shared run while the other starts on the rest), the other slow tests, the slow tests that need
  `reference` or run its model through `cache_dir` (by then it is built and its programs are
  cached, so no worker waits on its lock or compiles them again), then everything else.
  """
  uses = lambda item, name: name in getattr(item, "fixturenames", ())
  first = next((item for item in items if uses(item, "reference")), None)

  def rank(item) -> int:
    if item is first:
      return 0
    if item.get_closest_marker("slow") is None:
      return 3
    return 2 if uses(item, "reference") or uses(item, "cache_dir") else 1

  items.sort(key=rank)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> str:
  """The compilation cache of the command-line runs: the suite's when there is one."""
  return os.environ.get("JAX_COMPILATION_CACHE_DIR") or str(tmp_path_factory.mktemp("jax_cache"))


@pytest.fixture(scope="session")
def reference(cache_dir, tmp_path_factory):
  """tests/test_faults.py's uninterrupted run, (work directory, final parameters): made once per
  test run and shared by the fault, reliability and soak tests of every worker. Tests copy the
  work directory before changing anything in it."""
  import test_faults  # pylint: disable=g-import-not-at-top
  with shared_across_workers(tmp_path_factory, "reference") as (folder, done):
    workdir = folder / "run"
    if not done:
      test_faults.reference_run(cache_dir, workdir)
  return workdir, test_faults.final_params(workdir)


@pytest.fixture(scope="session")
def reference_output(reference) -> tuple[str, str]:
  """The `reference` run's (standard output, standard error): a user's run of the tiny model."""
  folder = reference[0].parent
  return (folder / "stdout.txt").read_text(), (folder / "stderr.txt").read_text()
