"""Tests of dynroute_jax.checkpoint: round trips, retention, integrity checks, errors."""

import errno
import json
import logging
import os
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from conftest import xla_flags  # pylint: disable=g-bad-import-order
from etils import epath

from dynroute_jax import checkpoint as C
from dynroute_jax import manifest


def tiny_config(width=4, image_size=8):
  return ml_collections.ConfigDict({
      "model": {"name": "tiny", "width": width},
      "data": {"num_classes": 10, "image_size": image_size, "num_channels": 1},
      "train": {"lr": 0.1}})


FP = manifest.model_fingerprint(tiny_config())


def make_state(step: int):
  """A tiny train state whose values depend on `step`."""
  rng = np.random.default_rng(step)
  params = {"dense": {"w": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32),
                      "b": jnp.asarray(rng.normal(size=(4,)), jnp.float32)},
            "router": {"w": jnp.asarray(rng.normal(size=(4, 2)), jnp.bfloat16)}}
  batch_stats = {"bn": {"mean": jnp.full((4,), float(step)), "var": jnp.ones((4,))}}
  tx = optax.chain(optax.add_decayed_weights(3e-4), optax.sgd(0.1, momentum=0.9))
  opt_state = tx.init(params)
  opt_state = jax.tree_util.tree_map(lambda x: x + step, opt_state)
  return params, batch_stats, opt_state, tx


def save_state(ckpt, step, stage=1, force=False):
  params, batch_stats, opt_state, _ = make_state(step)
  return ckpt.save(step, params=params, batch_stats=batch_stats, opt_state=opt_state,
                   meta={"stage": stage, "config": json.dumps({"lr": 0.1})}, force=force)


def assert_bitwise_equal(a, b):
  la, ta = jax.tree_util.tree_flatten(a)
  lb, tb = jax.tree_util.tree_flatten(b)
  assert ta == tb
  for x, y in zip(la, lb):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape
    assert x.tobytes() == y.tobytes()


def abstract_of(step):
  params, batch_stats, opt_state, _ = make_state(step)
  return {k: jax.eval_shape(lambda t=t: t) for k, t in
          (("params", params), ("batch_stats", batch_stats), ("opt_state", opt_state))}


@pytest.fixture
def two_steps(tmp_path):
  """A directory with good steps 1 and 2 (sync saves)."""
  d = str(tmp_path / "ckpt")
  with C.Checkpointer(d, keep=5, async_save=False, fingerprint=FP) as ckpt:
    save_state(ckpt, 1)
    save_state(ckpt, 2, stage=2)
  return d


def _no_pickle(*args, **kwargs):
  raise AssertionError("pickle used while restoring")


def test_round_trip_bitwise_async(tmp_path, monkeypatch):
  d = str(tmp_path / "ckpt")
  ckpt = C.Checkpointer(d, keep=3, fingerprint=FP)
  assert ckpt.all_steps() == [] and ckpt.latest_good_step() is None
  assert not os.path.exists(d)  # Reading creates nothing.
  assert save_state(ckpt, 10, stage=2)
  ckpt.wait_until_finished()
  assert ckpt.verify(10) == []
  import pickle
  monkeypatch.setattr(pickle, "load", _no_pickle)
  monkeypatch.setattr(pickle, "loads", _no_pickle)
  monkeypatch.setattr(pickle, "Unpickler", _no_pickle)
  items, meta = ckpt.restore(abstract=abstract_of(10))
  params, batch_stats, opt_state, _ = make_state(10)
  assert_bitwise_equal(items["params"], params)
  assert_bitwise_equal(items["batch_stats"], batch_stats)
  assert_bitwise_equal(items["opt_state"], opt_state)  # Named tuples come back as such.
  assert meta["step"] == 10 and meta["stage"] == 2 and meta["fingerprint"] == FP
  assert meta["library_version"] and meta["created"] > 0 and json.loads(meta["config"])
  ckpt.close()


def test_manifest_written_in_background_without_wait(tmp_path):
  d = str(tmp_path / "ckpt")
  ckpt = C.Checkpointer(d, fingerprint=FP)
  save_state(ckpt, 1)
  manifest = os.path.join(d, "1", C.MANIFEST_NAME)
  deadline = time.time() + 60
  while not os.path.exists(manifest) and time.time() < deadline:
    time.sleep(0.05)
  assert os.path.exists(manifest)  # The watcher wrote it; nobody called wait_until_finished.
  files = json.load(open(manifest))["files"]
  assert any(f.startswith("params/") for f in files) and "meta/metadata" in files
  ckpt.close()
  assert C.Checkpointer(d).verify(1) == []


def test_keep_n_and_interval(tmp_path):
  d = str(tmp_path / "ckpt")
  with C.Checkpointer(d, keep=2, save_interval_steps=2, fingerprint=FP) as ckpt:
    for step in range(1, 9):
      save_state(ckpt, step)
    assert not save_state(ckpt, 8, force=True)  # Exists and verifies: a no-op.
    assert save_state(ckpt, 9, force=True)      # The final checkpoint, off the interval.
    ckpt.wait_until_finished()
    assert ckpt.all_steps() == [8, 9]
    assert ckpt.latest_good_step() == 9


def test_keep_counts_good_steps_only(tmp_path):
  d = str(tmp_path / "ckpt")
  with C.Checkpointer(d, keep=2, async_save=False, fingerprint=FP) as ckpt:
    for step in (1, 2, 3):
      save_state(ckpt, step)
    os.remove(os.path.join(d, "3", C.MANIFEST_NAME))
    save_state(ckpt, 4)
    # Good steps are 2 and 4; the damaged step 3 between them is kept, step 1 goes.
    assert ckpt.all_steps() == [2, 3, 4]


def _largest_data_file(step_dir):
  candidates = []
  for root, _, files in os.walk(os.path.join(step_dir, "params")):
    for f in files:
      if os.sep + "d" in root:
        p = os.path.join(root, f)
        candidates.append((os.path.getsize(p), p))
  return max(candidates)[1]


def _delete_data_file(step_dir):
  os.remove(_largest_data_file(step_dir))


def _truncate_file(step_dir):
  path = _largest_data_file(step_dir)
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)


def _flip_byte(step_dir):
  path = _largest_data_file(step_dir)
  with open(path, "r+b") as f:
    f.seek(os.path.getsize(path) // 2)
    b = f.read(1)
    f.seek(-1, os.SEEK_CUR)
    f.write(bytes([b[0] ^ 0x01]))


def _delete_manifest(step_dir):
  os.remove(os.path.join(step_dir, C.MANIFEST_NAME))


def _delete_item_dir(step_dir):
  import shutil
  shutil.rmtree(os.path.join(step_dir, "params"))


def _delete_orbax_metadata(step_dir):  # Orbax itself restores this one silently.
  os.remove(os.path.join(step_dir, "params", "_METADATA"))


DAMAGES = {"delete_data_file": (_delete_data_file, "missing file"),
           "truncate_file": (_truncate_file, "size mismatch"),
           "flip_byte": (_flip_byte, "checksum mismatch"),
           "delete_manifest": (_delete_manifest, "manifest.json is missing"),
           "delete_item_dir": (_delete_item_dir, "missing file params/"),
           "delete_orbax_metadata": (_delete_orbax_metadata, "missing file params/_METADATA")}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_damage_detected_and_resume_falls_back(two_steps, damage, caplog):
  fn, expected = DAMAGES[damage]
  step_dir = os.path.join(two_steps, "2")
  fn(step_dir)
  ckpt = C.Checkpointer(two_steps, fingerprint=FP)
  assert ckpt.all_steps() == [1, 2]  # Orbax's listing does not notice.
  problems = ckpt.verify(2)
  assert problems and any(expected in p for p in problems), problems
  assert ckpt.verify(1) == []

  with caplog.at_level(logging.WARNING):
    assert ckpt.latest_good_step() == 1
  assert any("step 2" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
  items, meta = ckpt.restore(abstract=abstract_of(1))
  assert meta["step"] == 1 and meta["stage"] == 1
  assert_bitwise_equal(items["params"], make_state(1)[0])
  assert os.path.isdir(step_dir)  # Not deleted.

  with pytest.raises(C.DamagedCheckpointError, match=r"step 2\b.*" + expected.split()[0]) as e:
    ckpt.restore(2, abstract=abstract_of(2))
  assert e.value.step == 2 and e.value.problems == problems
  with pytest.raises(C.CheckpointError, match="step 2"):
    C.restore_for_eval(two_steps, step=2)
  ckpt.close()


def test_damaged_step_is_quarantined_when_saved_again(two_steps):
  _flip_byte(os.path.join(two_steps, "2"))
  with C.Checkpointer(two_steps, async_save=False, fingerprint=FP) as ckpt:
    assert ckpt.latest_good_step() == 1
    assert save_state(ckpt, 2)
    assert ckpt.verify(2) == [] and ckpt.all_steps() == [1, 2]
  quarantined = os.listdir(os.path.join(two_steps, C.QUARANTINE_DIR))
  assert len(quarantined) == 1 and quarantined[0].startswith("2-")


def test_all_damaged(two_steps):
  _delete_manifest(os.path.join(two_steps, "1"))
  _delete_manifest(os.path.join(two_steps, "2"))
  with pytest.raises(C.CheckpointNotFoundError, match="1, 2"):
    C.Checkpointer(two_steps).restore()


def test_missing_step_lists_available(two_steps):
  ckpt = C.Checkpointer(two_steps)
  with pytest.raises(C.CheckpointNotFoundError, match=r"step 7.*available steps: 1, 2"):
    ckpt.restore(7)
  with pytest.raises(C.CheckpointNotFoundError, match="available steps: 1, 2"):
    C.restore_for_eval(two_steps, step=7)


def test_evaluation_leaves_a_save_in_progress_alone(two_steps):
  # Regression: restore_for_eval (`evaluate`, `dynroute_jax.restore`) opened orbax's manager with
  # the clean-up of temporary directories on, so evaluating a running training deleted the step
  # it was writing, and that save then failed.
  in_progress = os.path.join(two_steps, "3.orbax-checkpoint-tmp-1765000000000000")
  os.makedirs(os.path.join(in_progress, "params"))
  with open(os.path.join(in_progress, "params", "part"), "w") as f:
    f.write("being written")
  restored = C.restore_for_eval(two_steps)
  assert restored.meta["step"] == 2
  assert os.path.exists(os.path.join(in_progress, "params", "part"))
  reader = C.Checkpointer(two_steps, read_only=True)
  with pytest.raises(C.CheckpointError, match="read-only"):
    save_state(reader, 4)
  reader.close()
  # A writer opening the directory (a resumed training) still removes what an interrupted save
  # left behind.
  with C.Checkpointer(two_steps, keep=5, async_save=False, fingerprint=FP) as writer:
    assert writer.latest_good_step() == 2
  assert not os.path.exists(in_progress)


def test_missing_or_empty_workdir(tmp_path):
  missing = str(tmp_path / "nope")
  with pytest.raises(C.CheckpointNotFoundError, match="does not exist"):
    C.restore_for_eval(missing)
  assert not os.path.exists(missing)
  os.makedirs(tmp_path / "empty")
  with pytest.raises(C.CheckpointNotFoundError, match="holds no checkpoints"):
    C.restore_for_eval(str(tmp_path / "empty"))
  assert C.Checkpointer(str(tmp_path / "empty")).latest_good_step() is None


def test_fingerprint_mismatch(two_steps):
  before = sorted(os.walk(two_steps))
  other = manifest.model_fingerprint(tiny_config(width=8))
  assert other != FP
  with pytest.raises(C.FingerprintMismatchError) as e:
    C.Checkpointer(two_steps, fingerprint=other)
  assert FP in str(e.value) and other in str(e.value) and two_steps in str(e.value)
  assert sorted(os.walk(two_steps)) == before  # Nothing written.
  C.Checkpointer(two_steps).check_compatible(FP)  # Same model: fine.
  # The fingerprint comes from the newest step whose meta is readable.
  import shutil
  shutil.rmtree(os.path.join(two_steps, "2", "meta"))
  assert C.Checkpointer(two_steps).recorded_fingerprint() == FP
  with pytest.raises(C.FingerprintMismatchError):
    C.Checkpointer(two_steps, fingerprint=other)


def test_saves_check_the_fingerprint_once(two_steps, monkeypatch):
  """Reading the newest step's meta costs a quarter of a second: once per Checkpointer is enough."""
  reads = []
  read = C.Checkpointer._read_meta_unchecked  # pylint: disable=protected-access
  monkeypatch.setattr(C.Checkpointer, "_read_meta_unchecked",
                      lambda self, step: reads.append(step) or read(self, step))
  with C.Checkpointer(two_steps, keep=5, async_save=False, fingerprint=FP) as ckpt:
    assert len(reads) == 1  # The check on opening.
    for step in (3, 4, 5):
      assert save_state(ckpt, step, force=True)
  assert len(reads) == 1
  with C.Checkpointer(two_steps, keep=5, async_save=False) as ckpt:  # No fingerprint: no check.
    assert save_state(ckpt, 6, force=True)
  assert len(reads) == 1


def test_fingerprint_depends_on_model_and_data_shape():
  # The formula every existing checkpoint records: a changed value makes old work directories
  # look like another model's.
  assert FP == "1caae13aa67f55aa"
  assert manifest.model_fingerprint(tiny_config(width=8)) != FP
  assert manifest.model_fingerprint(tiny_config(image_size=16)) != FP
  other_training = tiny_config()
  other_training.train.lr = 0.5
  assert manifest.model_fingerprint(other_training) == FP


def test_restore_params_only_without_optimizer_state(two_steps):
  ckpt = C.Checkpointer(two_steps)
  items, meta = ckpt.restore(items=("params", "batch_stats"))  # No abstract target either.
  assert set(items) == {"params", "batch_stats"} and meta["step"] == 2
  params, batch_stats, _, _ = make_state(2)
  assert_bitwise_equal(items["params"], params)
  assert_bitwise_equal(items["batch_stats"], batch_stats)
  ev = C.restore_for_eval(two_steps, step=1)
  assert_bitwise_equal(ev.params, make_state(1)[0])
  assert_bitwise_equal(ev.batch_stats, make_state(1)[1])
  assert ev.meta["step"] == 1 and ev.meta["stage"] == 1
  params2, batch_stats2, meta2 = C.restore_for_eval(two_steps)
  assert meta2["stage"] == 2


def test_empty_and_missing_items(tmp_path):
  d = str(tmp_path / "ckpt")
  params = make_state(1)[0]
  with C.Checkpointer(d, async_save=False) as ckpt:
    ckpt.save(3, params=params, batch_stats={}, opt_state=None, meta={"stage": 1})
    items, meta = ckpt.restore(abstract={"params": jax.eval_shape(lambda: params)})
    assert_bitwise_equal(items["params"], params)
    assert items["batch_stats"] == {} and items["opt_state"] is None
    # Plain SGD's state has no arrays at all: it comes back as the abstract target.
    empty_opt = optax.sgd(0.1).init(params)
    ckpt.save(4, params=params, batch_stats={}, opt_state=empty_opt, meta={"stage": 1})
    items, _ = ckpt.restore(abstract={"params": jax.eval_shape(lambda: params),
                                      "opt_state": jax.eval_shape(lambda: empty_opt)})
    assert jax.tree.structure(items["opt_state"]) == jax.tree.structure(empty_opt)


def test_bad_meta_rejected_before_writing(tmp_path):
  d = str(tmp_path / "ckpt")
  params = make_state(1)[0]
  with C.Checkpointer(d, async_save=False) as ckpt:
    with pytest.raises(ValueError, match="JSON"):
      ckpt.save(1, params=params, meta={"stage": object()})
  assert not os.path.exists(d)


def _enospc(*args, **kwargs):
  raise OSError(errno.ENOSPC, "No space left on device")


# Orbax's background threads of the failed save report to a closed event loop: harmless noise.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("async_save", [True, False])
def test_disk_full_keeps_earlier_checkpoints(tmp_path, monkeypatch, async_save):
  d = str(tmp_path / "ckpt")
  ckpt = C.Checkpointer(d, keep=3, async_save=async_save, fingerprint=FP)
  save_state(ckpt, 1)
  ckpt.wait_until_finished()
  # Orbax's own writes fail (the JSON item and commit markers go through epath).
  path_cls = type(epath.Path(d))
  monkeypatch.setattr(path_cls, "write_text", _enospc)
  with pytest.raises(C.CheckpointSaveError) as e:
    save_state(ckpt, 2)
    ckpt.wait_until_finished()
  assert "step 2" in str(e.value) and d in str(e.value)
  monkeypatch.undo()
  assert ckpt.all_steps() == [1] and ckpt.verify(1) == [] and ckpt.latest_good_step() == 1
  # The checkpointer still works afterwards.
  assert save_state(ckpt, 3)
  ckpt.wait_until_finished()
  assert ckpt.latest_good_step() == 3
  ckpt.close()


def test_manifest_write_failure(tmp_path, monkeypatch, caplog):
  d = str(tmp_path / "ckpt")
  ckpt = C.Checkpointer(d, keep=3, fingerprint=FP)
  save_state(ckpt, 1)
  ckpt.wait_until_finished()
  monkeypatch.setattr(manifest, "_atomic_write_json", _enospc)
  save_state(ckpt, 2)
  with pytest.raises(C.CheckpointSaveError, match=r"step 2 .*No space left"):
    ckpt.wait_until_finished()
  monkeypatch.undo()
  with caplog.at_level(logging.WARNING):
    assert ckpt.latest_good_step() == 1
  assert any("step 2" in r.getMessage() for r in caplog.records)
  ckpt.close()


_SUBPROCESS = textwrap.dedent("""
    import sys
    import jax, numpy as np
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", 4)
    from jax.sharding import NamedSharding, PartitionSpec as P
    from dynroute_jax import checkpoint as C
    src, dst = sys.argv[1], sys.argv[2]
    mesh = jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    # Restore a 1-device checkpoint onto 4 devices, sharded.
    ckpt = C.Checkpointer(src)
    ev = C.restore_for_eval(src)
    abstract = {"params": jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=NamedSharding(
            mesh, P(*[None] * (a.ndim - 1), "data") if a.shape[-1] % 4 == 0 else P())),
        ev.params)}
    items, meta = ckpt.restore(abstract=abstract, items=("params",))
    w = items["params"]["dense"]["w"]
    assert len(w.sharding.device_set) == 4, w.sharding
    for a, b in zip(jax.tree.leaves(items["params"]), jax.tree.leaves(ev.params)):
      assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
    # Save a checkpoint sharded over 4 devices.
    with C.Checkpointer(dst, async_save=True) as out:
      out.save(5, params=items["params"], batch_stats=ev.batch_stats, meta={"stage": 1})
    print("OK")
""")


def test_restore_onto_different_device_count(two_steps, tmp_path):
  dst = str(tmp_path / "sharded")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=root)
  env["XLA_FLAGS"] = xla_flags()  # One CPU device.
  proc = subprocess.run([sys.executable, "-c", _SUBPROCESS, two_steps, dst], env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]
  # Restore the 4-device checkpoint here onto one device.
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = {"params": jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=one), abstract_of(2)["params"])}
  ckpt = C.Checkpointer(dst)
  assert ckpt.verify(5) == []
  items, meta = ckpt.restore(abstract=abstract, items=("params",))
  assert_bitwise_equal(items["params"], make_state(2)[0])
  assert items["params"]["dense"]["w"].sharding == one
  # And with a sharding tree given separately (as the trainer does).
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
  rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  rep_tree = jax.tree.map(lambda _: rep, abstract_of(2)["params"])
  items, _ = ckpt.restore(abstract=abstract_of(2), items=("params",),
                          shardings={"params": rep_tree})
  assert items["params"]["dense"]["w"].sharding == rep
  assert_bitwise_equal(C.restore_for_eval(dst).params, make_state(2)[0])


_TWO_PROCESSES = textwrap.dedent("""
    import os, sys
    import jax
    pid, port, d = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    jax.config.update("jax_platforms", "cpu")
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid,
                               initialization_timeout=60)
    import numpy as np, jax.numpy as jnp
    from jax.experimental import multihost_utils
    from jax.sharding import NamedSharding, PartitionSpec as P
    from dynroute_jax import checkpoint as C
    mesh = jax.make_mesh((2,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    sh = NamedSharding(mesh, P("data"))
    def make(step):
      host = np.arange(8, dtype=np.float32) + step
      return {"w": jax.make_array_from_callback((8,), sh, lambda idx: host[idx])}
    ck = C.Checkpointer(d, keep=2, fingerprint="abc")
    for s in (1, 2, 3):
      ck.save(s, params=make(s), meta={"stage": 1})
    ck.wait_until_finished()
    print("steps", ck.all_steps(), ck.latest_good_step(), flush=True)
    abstract = {"params": {"w": jax.ShapeDtypeStruct((8,), jnp.float32, sharding=sh)}}
    items, meta = ck.restore(abstract=abstract, items=("params",))
    w = multihost_utils.process_allgather(items["params"]["w"], tiled=True)
    print("restored", np.asarray(w).tolist(), meta["step"], flush=True)
    multihost_utils.sync_global_devices("before_damage")
    if pid == 0:  # Only process 0 sees the damage happen; all must agree on the step.
      os.remove(os.path.join(d, "3", "manifest.json"))
    multihost_utils.sync_global_devices("after_damage")
    print("after damage", ck.latest_good_step(), flush=True)
    ck.save(3, params=make(3), meta={"stage": 1}, force=True)
    ck.close()
    print("final", ck.all_steps(), ck.verify(3), flush=True)
""")


def test_two_processes(tmp_path):
  """Two jax.distributed CPU processes share a directory: manifests, retention, resume."""
  import socket
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  script = tmp_path / "two.py"
  script.write_text(_TWO_PROCESSES)
  d = str(tmp_path / "ckpt")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=root)
  env["XLA_FLAGS"] = xla_flags()  # One CPU device.
  procs = [subprocess.Popen([sys.executable, str(script), str(i), str(port), d], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  outs = []
  try:
    for p in procs:
      outs.append(p.communicate(timeout=240))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
    lines = [l for l in out.splitlines() if not l.startswith("[Gloo]")]
    assert lines == ["steps [2, 3] 3",
                     "restored [3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0] 3",
                     "after damage 2",
                     "final [2, 3] []"], out
  assert len(os.listdir(os.path.join(d, C.QUARANTINE_DIR))) == 1


def test_retention_never_deletes_the_last_verifying_steps(tmp_path):
  """Damaged steps whose manifest exists do not count toward `keep` (they used to, and the new
  good checkpoints were deleted in their favour as soon as they were written)."""
  d = str(tmp_path / "ckpt")
  with C.Checkpointer(d, keep=2, async_save=False, fingerprint=FP) as ckpt:
    save_state(ckpt, 10)
    save_state(ckpt, 11)
  _flip_byte(os.path.join(d, "10"))
  _flip_byte(os.path.join(d, "11"))
  with C.Checkpointer(d, keep=2, fingerprint=FP) as ckpt:  # Async: as training saves.
    assert ckpt.latest_good_step() is None
    for step, expected in ((1, [1, 10, 11]), (2, [1, 2, 10, 11]), (3, [2, 3, 10, 11])):
      save_state(ckpt, step)
      ckpt.wait_until_finished()
      assert ckpt.all_steps() == expected
      assert ckpt.latest_good_step() == step
    assert sorted(ckpt.damage_report()) == [10, 11]


def test_retention_verifies_in_full_and_caches_the_verdicts(tmp_path, monkeypatch):
  d = str(tmp_path / "ckpt")
  hashed = []
  real_sha256 = manifest._sha256
  monkeypatch.setattr(manifest, "_sha256", lambda path: hashed.append(os.fspath(path)) or real_sha256(path))
  with C.Checkpointer(d, keep=2, async_save=False, fingerprint=FP) as ckpt:
    for step in (1, 2, 3):
      save_state(ckpt, step)
    # Each file was read once, to write its manifest: retention re-read nothing.
    assert len(hashed) == len(set(hashed))
    time.sleep(0.05)  # Past the file system's timestamp granularity: the damage changes mtime.
    _flip_byte(os.path.join(d, "3"))  # Its manifest is intact: only the checksums tell.
    hashed.clear()
    save_state(ckpt, 4)
    # Newest verifying steps: 4 and 2; the damaged 3 between them stays, 1 goes.
    assert ckpt.all_steps() == [2, 3, 4]
    step3 = [p for p in hashed if os.sep + "3" + os.sep in p]
    step2 = [p for p in hashed if os.sep + "2" + os.sep in p]
    assert step3 and not step2  # The changed step was re-read, the unchanged one was not.
    assert "checksum mismatch" in " ".join(ckpt.damage_report()[3])


def test_object_store_code_path_on_a_local_directory(tmp_path, monkeypatch):
  """The branch for gs://-style file systems (one-put manifest, (size, mtime) cache keys,
  quarantine by copy and delete) saves, verifies, finds damage, quarantines and restores."""
  monkeypatch.setattr(manifest, "is_local", lambda path: False)
  d = str(tmp_path / "ckpt")
  with C.Checkpointer(d, async_save=False, fingerprint=FP) as ckpt:
    save_state(ckpt, 1)
    save_state(ckpt, 2)
    assert ckpt.verify(1) == [] and ckpt.verify(2) == []
    assert not [n for n in os.listdir(os.path.join(d, "2")) if ".tmp-" in n]  # one put, no temp
  _flip_byte(os.path.join(d, "2"))
  with C.Checkpointer(d, async_save=False, fingerprint=FP) as ckpt:
    assert any("checksum mismatch" in p for p in ckpt.verify(2))
    assert ckpt.latest_good_step() == 1
    assert save_state(ckpt, 2)  # the damaged step is moved aside first
    assert ckpt.verify(2) == []
    items, meta = ckpt.restore(abstract=abstract_of(2))
    assert meta["step"] == 2
    assert_bitwise_equal(items["params"], make_state(2)[0])
  (quarantined,) = os.listdir(os.path.join(d, C.QUARANTINE_DIR))
  assert quarantined.startswith("2-")
  assert os.listdir(os.path.join(d, C.QUARANTINE_DIR, quarantined))  # the files came along
