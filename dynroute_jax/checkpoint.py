"""Checkpointing with integrity checks: the only module of dynroute_jax that imports orbax.

Orbax's API changes between releases, so everything else in the project goes through this module.

Layout of a work directory::

    <directory>/
      checkpoint_info.json        model fingerprint of the run (written once, by process 0)
      <step>/                     one orbax step directory per checkpoint
        params/ batch_stats/ opt_state/   orbax array items (OCDBT / tensorstore, no pickle)
        meta/                     JSON item: step, stage, fingerprint, config, created, version
        manifest.json             sha256 and size of every other file of the step, written LAST

Usage::

    ckpt = Checkpointer(workdir, keep=3, fingerprint=model_fingerprint(config.model, params))
    start = ckpt.latest_good_step()        # None: fresh run
    if start is not None:
      items, meta = ckpt.restore(abstract={'params': abs_params, 'batch_stats': abs_bs,
                                           'opt_state': abs_opt})
    for step in ...:
      ckpt.save(step, params=..., batch_stats=..., opt_state=..., meta={'stage': 1, ...})
    ckpt.save(last_step, ..., force=True)  # the final checkpoint, whatever the interval
    ckpt.close()

    params, batch_stats, meta = restore_for_eval(workdir)   # no optimizer state needed

Public API
----------
- `Checkpointer(directory, *, keep=3, async_save=True, fingerprint=None, save_interval_steps=1)`:
  `save`, `wait_until_finished`, `all_steps`, `latest_good_step`, `verify`,
  `restore`, `read_meta`, `check_compatible`, `close` (also a context manager).
- `restore_for_eval(workdir, step=None, *, sharding=None)` -> `EvalCheckpoint(params, batch_stats,
  meta)`.
- `model_fingerprint(model_config, params)`: hash of the model config and the parameter tree's
  structure, shapes and dtypes.
- `damage_report()`: the problems of every step that does not verify.
- Errors, all subclasses of `CheckpointError` (a `RuntimeError`): `CheckpointNotFoundError`,
  `DamagedCheckpointError`, `NoGoodCheckpointError`, `FingerprintMismatchError`,
  `CheckpointSaveError`.

Integrity
---------
Orbax restores several kinds of damaged checkpoints silently and its step listing never notices
damage. So once a save has completed, process 0 writes `manifest.json` into the step directory:
size and sha256 of every file there. It is written through a temporary file and an atomic rename,
after everything else, so a step without a valid manifest is incomplete or damaged.
`verify(step)` recomputes the checksums and returns a list of problems (empty when good).

How completion of an asynchronous save is detected: orbax has no hook that runs after a step is
committed (its `post_finalization_callback` runs *before* the temporary directory is renamed
into place). After each asynchronous `save` this module starts one watcher thread that blocks in
orbax's `CheckpointManager.wait_until_finished()` (which returns once the step is committed and
raises if the save failed) and then writes the manifest. So the manifest normally appears shortly
after the save finishes, even if training is killed before the next save. `wait_until_finished()`
(called by every `save` before it starts, by `restore`, `latest_good_step` and `close`) joins the
watcher, re-raises its failure as `CheckpointSaveError`, and applies the retention policy.

Resuming (`restore()` without a step, `latest_good_step()`) uses the newest step that verifies;
each newer step that does not verify is logged with `logging.warning` naming the step and its
problems, and is left on disk. Restoring a named step that does not verify raises
`DamagedCheckpointError` naming the step and what is wrong.

Retention: `keep` counts steps that verify with their full checksums (not merely steps that have
a manifest). After each completed save the newest `keep` verifying steps are kept and steps older
than the oldest kept one are deleted; with fewer than `keep` verifying steps nothing is deleted,
so the last verifying step is never deleted. A damaged or incomplete step newer than the oldest
kept one is never deleted by retention. Verifying reads every file, so each verdict is cached per
step, keyed by the size, mtime and inode of every file in the step directory (the manifest
included): a step is read in full once per process (the step just saved not even once, its
checksums were just computed) and re-read only when one of its files changes. When a later save reaches the step number of
such a damaged step, the damaged directory is moved to `<directory>/quarantine/` (not deleted)
and the new checkpoint is written. A step that exists and verifies is never overwritten: saving
it again is a no-op that returns False (so a forced final save after a periodic save of the same
step is harmless).

Model fingerprint: `checkpoint_info.json` (and every step's meta) records the fingerprint of the
model. Opening a directory whose checkpoints belong to a different model raises
`FingerprintMismatchError` naming both, in the constructor, before anything is written.

Multi-host: every process constructs the `Checkpointer` and calls `save`, `wait_until_finished`
and `restore` (orbax coordinates the array writes). Only process 0 writes `manifest.json`,
`checkpoint_info.json` and moves damaged steps to quarantine; a barrier after the manifest is
written makes it visible to all processes before they go on. When resuming or restoring,
process 0 verifies the checksums and broadcasts its verdict, so the data is read once and every
process takes the same step. `verify()` itself works on any process. Assumption: the directory is
on a file system shared by all processes (as orbax itself requires for multi-host checkpoints).

No pickle is ever loaded: arrays come from orbax's tensorstore formats, the rest is JSON.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import logging
import os
import shutil
import threading
import time
from typing import Any, Mapping, NamedTuple, Optional, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp

from dynroute_jax import __version__

ITEMS = ("params", "batch_stats", "opt_state")
META_ITEM = "meta"
MANIFEST_NAME = "manifest.json"
INFO_NAME = "checkpoint_info.json"
QUARANTINE_DIR = "quarantine"
FORMAT_VERSION = 1
_HASH_CHUNK = 1 << 20
_MAX_PROBLEMS_IN_MESSAGE = 6


class CheckpointError(RuntimeError):
  """Base class of every error raised by this module."""


class CheckpointNotFoundError(CheckpointError):
  """The work directory, or the requested step, holds no checkpoint."""


class DamagedCheckpointError(CheckpointError):
  """A step exists but does not verify against its manifest."""

  def __init__(self, message: str, step: int, problems: Sequence[str]):
    super().__init__(message)
    self.step = step
    self.problems = list(problems)


class NoGoodCheckpointError(CheckpointError):
  """Checkpoints exist, but none verifies: resuming would silently start over from nothing.

  `problems` maps each damaged step to what is wrong with it.
  """

  def __init__(self, message: str, problems: Mapping[int, Sequence[str]]):
    super().__init__(message)
    self.problems = {int(k): list(v) for k, v in problems.items()}


class FingerprintMismatchError(CheckpointError):
  """The directory holds checkpoints of a different model."""


class CheckpointSaveError(CheckpointError):
  """A save failed (disk full, read-only file system, ...). Earlier checkpoints are intact."""


class EvalCheckpoint(NamedTuple):
  params: Any
  batch_stats: Any
  meta: dict


# ----------------------------------------------------------------------------------------------
# Fingerprint.


def _config_to_jsonable(model_config: Any) -> Any:
  if model_config is None:
    return None
  if isinstance(model_config, str):
    return model_config
  if hasattr(model_config, "to_dict"):  # ml_collections.ConfigDict
    model_config = model_config.to_dict()
  if dataclasses.is_dataclass(model_config) and not isinstance(model_config, type):
    model_config = dataclasses.asdict(model_config)
  return model_config


def model_fingerprint(model_config: Any, params: Any = None) -> str:
  """A short hash of the model config and of the parameter tree (paths, shapes, dtypes).

  `model_config` may be a dict, an `ml_collections.ConfigDict`, a dataclass or a JSON string;
  `params` may hold arrays or `jax.ShapeDtypeStruct`s. Two models share a fingerprint when both
  agree, so restoring one's checkpoint into the other is meaningful.
  """
  config = _config_to_jsonable(model_config)
  structure = []
  if params is not None:
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
      shape = tuple(int(d) for d in np.shape(leaf))
      dtype = str(getattr(leaf, "dtype", np.asarray(leaf).dtype))
      structure.append([jax.tree_util.keystr(path), list(shape), dtype])
  blob = json.dumps({"config": config, "params": structure}, sort_keys=True, default=repr)
  return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------
# Files.


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    while chunk := f.read(_HASH_CHUNK):
      digest.update(chunk)
  return digest.hexdigest()


def _list_files(root: str) -> list[str]:
  """Relative paths of every regular file under root, sorted, the manifest excluded."""
  files = []
  for dirpath, _, filenames in os.walk(root):
    for name in filenames:
      rel = os.path.relpath(os.path.join(dirpath, name), root)
      if rel == MANIFEST_NAME or name.startswith("." + MANIFEST_NAME):
        continue
      files.append(rel.replace(os.sep, "/"))
  return sorted(files)


def _atomic_write_json(path: str, obj: Any) -> None:
  """Writes JSON through a temporary file in the same directory, fsync, then rename."""
  directory, name = os.path.split(path)
  tmp = os.path.join(directory, f".{name}.tmp-{os.getpid()}-{threading.get_ident()}")
  try:
    with open(tmp, "w") as f:
      json.dump(obj, f, indent=1, sort_keys=True)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    try:
      os.remove(tmp)
    except OSError:
      pass
    raise
  try:  # Make the rename durable; not every file system supports fsync on a directory.
    fd = os.open(directory, os.O_RDONLY)
    try:
      os.fsync(fd)
    finally:
      os.close(fd)
  except OSError:
    pass


def _read_json(path: str) -> Any:
  with open(path) as f:
    return json.load(f)


def _summarise(problems: Sequence[str]) -> str:
  shown = list(problems[:_MAX_PROBLEMS_IN_MESSAGE])
  if len(problems) > len(shown):
    shown.append(f"... and {len(problems) - len(shown)} more")
  return "; ".join(shown)


def _is_primary() -> bool:
  return jax.process_index() == 0


def _from_process_0(value: int) -> int:
  """Process 0's value of an int on every process (a no-op with one process)."""
  if jax.process_count() == 1:
    return value
  return int(ocp.multihost.broadcast_one_to_all(np.int32(value)))


def _is_empty_tree(tree: Any) -> bool:
  return tree is None or not jax.tree_util.tree_leaves(tree)


# ----------------------------------------------------------------------------------------------
# Checkpointer.


class Checkpointer:
  """Saves and restores train states with orbax, and checks their integrity. See module doc.

  Args:
    directory: the work directory's checkpoint folder (created on the first save).
    keep: number of good checkpoints to keep (None keeps all).
    async_save: write arrays in the background (orbax async checkpointing).
    fingerprint: the model's fingerprint (`model_fingerprint`); checked against the directory's
      checkpoints at construction and recorded with every save.
    save_interval_steps: `save(step)` writes only when `step % save_interval_steps == 0`, unless
      `force=True`.
  """

  def __init__(self, directory: str | os.PathLike, *, keep: Optional[int] = 3,
               async_save: bool = True, fingerprint: Optional[str] = None,
               save_interval_steps: int = 1):
    if keep is not None and keep < 1:
      raise ValueError(f"keep must be >= 1 or None, got {keep}")
    if save_interval_steps < 1:
      raise ValueError(f"save_interval_steps must be >= 1, got {save_interval_steps}")
    self.directory = os.path.abspath(os.fspath(directory))
    self.keep = keep
    self.async_save = async_save
    self.fingerprint = fingerprint
    self.save_interval_steps = save_interval_steps
    self._manager: Optional[ocp.CheckpointManager] = None
    self._watcher: Optional[threading.Thread] = None
    self._watcher_error: Optional[BaseException] = None
    self._pending_step: Optional[int] = None
    self._barrier_count = 0
    self._had_failure = False
    self._closed = False
    # step -> (file signature, problems): full verifications already done (see `_verify_cached`).
    self._verdicts: dict[int, tuple[tuple, tuple[str, ...]]] = {}
    if fingerprint is not None:
      self.check_compatible(fingerprint)

  # -- orbax manager, created lazily so that reading a missing directory creates nothing.

  def _get_manager(self, create: bool = False) -> ocp.CheckpointManager:
    if self._manager is None:
      if not create and not os.path.isdir(self.directory):
        raise CheckpointNotFoundError(
            f"checkpoint directory {self.directory} does not exist")
      options = ocp.CheckpointManagerOptions(
          max_to_keep=None,  # Retention is ours: it counts good steps only.
          create=create,
          enable_async_checkpointing=self.async_save,
          # Removes temporary directories of interrupted saves, only for the first manager:
          # after a failed save in this process its background writers may still be running.
          cleanup_tmp_directories=not self._had_failure,
      )
      handlers = {k: ocp.StandardCheckpointHandler() for k in ITEMS}
      handlers[META_ITEM] = ocp.JsonCheckpointHandler()
      self._manager = ocp.CheckpointManager(
          self.directory, item_handlers=handlers, options=options)
    return self._manager

  def _open_on_every_process(self) -> None:
    """Creates the orbax manager now, on every process, when the directory exists.

    Constructing an orbax CheckpointManager is a collective (it synchronises all processes after
    writing its root metadata). Code that runs on process 0 alone (verification before a
    broadcast) must therefore never be the first to create it, or process 0 waits in that barrier
    while the others wait in the broadcast: every process calls this first.
    """
    if self._manager is None and os.path.isdir(self.directory):
      self._get_manager()

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def _step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(int(step)))

  # -- listing and verification.

  def all_steps(self) -> list[int]:
    """Every step with a committed orbax directory, ascending (good or not)."""
    if not os.path.isdir(self.directory):
      return []
    manager = self._get_manager()
    if self._watcher is None:
      manager.reload()
    return sorted(int(s) for s in manager.all_steps())

  def verify(self, step: int) -> list[str]:
    """Problems found in `step` (an empty list when it is good). Reads every file."""
    signature = self._signature(step)  # Taken first: a file changing meanwhile voids the entry.
    problems = self._problems(step, full=True)
    self._verdicts[int(step)] = (signature, tuple(problems))
    return problems

  def _signature(self, step: int) -> tuple:
    """(path, size, mtime, inode) of every file of the step: what a cached verdict is valid for.

    Costs one stat per file. Rewriting, truncating, deleting, adding or touching any file of the
    step (the manifest included) changes it; damage that leaves size, mtime and inode unchanged
    (bit rot under the file system) is found only by a full `verify`.
    """
    step_dir = self._step_dir(step)
    entries = []
    for dirpath, _, filenames in os.walk(step_dir):
      for name in filenames:
        path = os.path.join(dirpath, name)
        try:
          st = os.stat(path)
        except OSError:
          continue
        entries.append((os.path.relpath(path, step_dir), st.st_size, st.st_mtime_ns, st.st_ino))
    return tuple(sorted(entries))

  def _verify_cached(self, step: int) -> list[str]:
    """`verify(step)`, read in full only when the step's files changed since the last verdict."""
    cached = self._verdicts.get(int(step))
    if cached is not None and cached[0] == self._signature(step):
      return list(cached[1])
    return self.verify(step)

  def damage_report(self) -> dict[int, list[str]]:
    """The problems of every step that does not verify, by step (cached full verification).

    Process 0 verifies; on the other processes a damaged step's entry only says so (reading every
    checkpoint on every host is what the broadcast verdicts avoid).
    """
    self.wait_until_finished()
    self._open_on_every_process()
    report = {}
    for step in self.all_steps():
      bad = _from_process_0(int(bool(self._verify_cached(step))) if _is_primary() else 0)
      if bad:
        report[step] = (self._verify_cached(step) if _is_primary()
                        else ["damaged or incomplete (verified by process 0)"])
    return report

  def _problems(self, step: int, full: bool) -> list[str]:
    step_dir = self._step_dir(step)
    if not os.path.isdir(step_dir):
      return [f"step directory {step_dir} is missing"]
    manifest_path = os.path.join(step_dir, MANIFEST_NAME)
    if not os.path.exists(manifest_path):
      return [f"{MANIFEST_NAME} is missing (the save did not complete, or the file was removed)"]
    try:
      manifest = _read_json(manifest_path)
      files = manifest["files"]
      if int(manifest["step"]) != int(step):
        return [f"{MANIFEST_NAME} belongs to step {manifest['step']}, not {step}"]
    except (OSError, ValueError, KeyError, TypeError) as e:
      return [f"{MANIFEST_NAME} is unreadable: {e}"]
    if not full:
      return []
    problems = []
    for rel, entry in sorted(files.items()):
      path = os.path.join(step_dir, rel)
      if not os.path.isfile(path):
        problems.append(f"missing file {rel}")
        continue
      size = os.path.getsize(path)
      if size != entry["size"]:
        problems.append(f"size mismatch in {rel}: {size} bytes, expected {entry['size']}")
        continue
      if _sha256(path) != entry["sha256"]:
        problems.append(f"checksum mismatch in {rel}")
    return problems

  def latest_good_step(self) -> Optional[int]:
    """The newest step that verifies, or None. Warns about (and keeps) newer damaged steps.

    With several processes, process 0 verifies and the others take its answer.
    """
    self.wait_until_finished()
    self._open_on_every_process()
    found = -1
    if _is_primary():
      for step in reversed(self.all_steps()):
        problems = self.verify(step)
        if not problems:
          found = step
          break
        logging.warning("Skipping checkpoint step %d in %s: damaged or incomplete: %s", step,
                        self.directory, _summarise(problems))
    found = _from_process_0(found)
    return None if found < 0 else found

  # -- fingerprint.

  def recorded_fingerprint(self) -> Optional[str]:
    """The fingerprint recorded in the directory (info file, else the newest readable meta)."""
    info_path = os.path.join(self.directory, INFO_NAME)
    if os.path.exists(info_path):
      try:
        return _read_json(info_path).get("fingerprint")
      except (OSError, ValueError) as e:
        raise CheckpointError(f"{info_path} is unreadable: {e}") from e
    if not os.path.isdir(self.directory):
      return None
    for step in reversed(self.all_steps()):
      try:
        fingerprint = self._read_meta_unchecked(step).get("fingerprint")
      except Exception:  # pylint: disable=broad-except
        continue
      if fingerprint is not None:
        return fingerprint
    return None

  def check_compatible(self, fingerprint: Optional[str]) -> None:
    """Raises FingerprintMismatchError if the directory holds another model's checkpoints."""
    recorded = self.recorded_fingerprint()
    if fingerprint is not None and recorded is not None and recorded != fingerprint:
      raise FingerprintMismatchError(
          f"checkpoint directory {self.directory} holds checkpoints of a different model: "
          f"recorded model fingerprint {recorded}, this model's fingerprint {fingerprint}. "
          f"Use another work directory, or the model config the checkpoints were made with.")

  # -- saving.

  def save(self, step: int, *, params: Any, batch_stats: Any = None, opt_state: Any = None,
           meta: Optional[Mapping[str, Any]] = None, force: bool = False) -> bool:
    """Saves a train state at `step`; returns whether a save was started.

    Must be called by every process. `meta` is a JSON-serialisable dict; put at least the
    training `stage` and the config (as a JSON string) there. `step`, the fingerprint, the
    creation time and the library version are added. Empty or None `batch_stats` /
    `opt_state` are recorded as such and restored as they were.
    """
    if self._closed:
      raise CheckpointError(f"Checkpointer for {self.directory} is closed")
    step = int(step)
    if not force and step % self.save_interval_steps != 0:
      return False
    self.wait_until_finished()

    trees = {"params": params, "batch_stats": batch_stats, "opt_state": opt_state}
    if _is_empty_tree(params):
      raise ValueError("save: params is empty")
    saved_items = [k for k, v in trees.items() if not _is_empty_tree(v)]
    empty_items = {k: ("none" if v is None else "empty")
                   for k, v in trees.items() if _is_empty_tree(v)}
    now = time.time()
    full_meta = dict(meta or {})
    full_meta.update(
        step=step,
        fingerprint=self.fingerprint,
        created=now,
        created_iso=datetime.datetime.fromtimestamp(now, datetime.timezone.utc).isoformat(),
        library_version=__version__,
        format_version=FORMAT_VERSION,
        items=saved_items,
        empty_items=empty_items,
    )
    try:
      json.dumps(full_meta)
    except (TypeError, ValueError) as e:
      raise ValueError(f"save: meta for step {step} is not JSON-serialisable: {e}") from e

    # 0: save; 1: the step exists and verifies, skip; 2: it exists damaged, move it aside first.
    decision, problems = 0, []
    if os.path.isdir(self.directory):
      self.check_compatible(self.fingerprint)
      self._open_on_every_process()
      if _is_primary() and step in self.all_steps():
        problems = self.verify(step)
        decision = 2 if problems else 1
    decision = _from_process_0(decision)  # Every process must take the same decision.
    if decision == 1:
      logging.info("Checkpoint step %d already exists in %s and verifies; not saving it again.",
                   step, self.directory)
      return False
    if decision == 2:
      self._quarantine(step, problems)

    try:
      os.makedirs(self.directory, exist_ok=True)
      if self.fingerprint is not None and _is_primary():
        info_path = os.path.join(self.directory, INFO_NAME)
        if not os.path.exists(info_path):
          _atomic_write_json(info_path, {"fingerprint": self.fingerprint,
                                         "library_version": __version__,
                                         "format_version": FORMAT_VERSION})
      manager = self._get_manager(create=True)
      args = {k: ocp.args.StandardSave(trees[k]) for k in saved_items}
      args[META_ITEM] = ocp.args.JsonSave(full_meta)
      manager.save(step, args=ocp.args.Composite(**args), force=True)
    except Exception as e:  # pylint: disable=broad-except
      self._drop_failed_save()
      raise CheckpointSaveError(
          f"saving checkpoint step {step} to {self.directory} failed: {type(e).__name__}: {e}. "
          f"Earlier checkpoints are untouched.") from e

    self._pending_step = step
    if self.async_save:
      self._watcher_error = None
      self._watcher = threading.Thread(target=self._watch, args=(step,),
                                       name=f"checkpoint-manifest-{step}", daemon=True)
      self._watcher.start()
    else:
      self._finish_pending()
    return True

  def _drop_failed_save(self) -> None:
    """After a failed save: forget the step and discard orbax's manager.

    Orbax's manager keeps re-raising a failed background save from every later call, so a fresh
    one is made on next use. The failed step's temporary directory is never listed as a step.
    """
    manager, self._manager = self._manager, None
    self._pending_step = None
    self._had_failure = True
    if manager is not None:
      try:
        manager.close()
      except Exception:  # pylint: disable=broad-except
        pass

  def _write_manifest(self, step: int) -> None:
    step_dir = self._step_dir(step)
    files = {}
    for rel in _list_files(step_dir):
      path = os.path.join(step_dir, rel)
      files[rel] = {"size": os.path.getsize(path), "sha256": _sha256(path)}
    _atomic_write_json(os.path.join(step_dir, MANIFEST_NAME), {
        "step": step, "format_version": FORMAT_VERSION, "algorithm": "sha256",
        "written": time.time(), "files": files})
    # The checksums were just computed from these very files: the step verifies, without a
    # second read (a file changed meanwhile shows in the signature and forces a full verify).
    self._verdicts[step] = (self._signature(step), ())

  def _watch(self, step: int) -> None:
    """Watcher thread: wait for orbax to commit `step`, then write its manifest."""
    try:
      self._manager.wait_until_finished()
      if _is_primary():
        self._write_manifest(step)
    except BaseException as e:  # pylint: disable=broad-except
      self._watcher_error = e

  def _barrier(self, name: str) -> None:
    if jax.process_count() > 1:
      self._barrier_count += 1
      ocp.multihost.sync_global_processes(f"dynroute_checkpoint_{name}_{self._barrier_count}")

  def _finish_pending(self) -> None:
    """Completes the pending save (sync mode) or collects the watcher's result (async)."""
    step = self._pending_step
    if step is None:
      return
    watcher, self._watcher = self._watcher, None
    error = None
    if watcher is not None:
      watcher.join()
      error, self._watcher_error = self._watcher_error, None
    else:
      try:
        self._manager.wait_until_finished()
        if _is_primary():
          self._write_manifest(step)
      except Exception as e:  # pylint: disable=broad-except
        error = e
    self._pending_step = None
    if error is not None:
      self._drop_failed_save()
      raise CheckpointSaveError(
          f"saving checkpoint step {step} to {self.directory} failed: "
          f"{type(error).__name__}: {error}. Step {step} is incomplete and will be skipped; "
          f"earlier checkpoints are untouched.") from error
    self._barrier(f"manifest_{step}")
    self._apply_retention()

  def wait_until_finished(self) -> None:
    """Blocks until the last save is committed and its manifest written; raises if it failed."""
    self._finish_pending()

  def _apply_retention(self) -> None:
    """Deletes the steps older than the newest `keep` steps that verify (see the module doc).

    Only full verification counts: a step whose manifest exists but whose files do not match it
    is not a good step, or retention could delete the last good checkpoints in favour of damaged
    ones. Process 0 decides (cached verdicts) and every process deletes the same steps.
    """
    if self.keep is None:
      return
    manager = self._get_manager()
    manager.reload()
    steps = sorted(int(s) for s in manager.all_steps())
    oldest_kept = -1
    if _is_primary():
      good = []
      for step in reversed(steps):  # Newest first; older steps need no verdict.
        if not self._verify_cached(step):
          good.append(step)
          if len(good) == self.keep:
            oldest_kept = step
            break
    oldest_kept = _from_process_0(oldest_kept)
    if oldest_kept < 0:  # Fewer than `keep` verifying steps: keep everything.
      return
    for step in steps:
      if step < oldest_kept:
        manager.delete(step)
        self._verdicts.pop(step, None)

  def _quarantine(self, step: int, problems: Sequence[str]) -> None:
    """Moves a damaged step aside so that a new save of the same step number can proceed."""
    target = os.path.join(self.directory, QUARANTINE_DIR, f"{step}-{time.time_ns()}")
    logging.warning("Checkpoint step %d in %s is damaged or incomplete (%s); moving it to %s "
                    "before saving step %d again.", step, self.directory, _summarise(problems),
                    target, step)
    if _is_primary():
      os.makedirs(os.path.dirname(target), exist_ok=True)
      shutil.move(self._step_dir(step), target)
    self._verdicts.pop(int(step), None)
    self._barrier(f"quarantine_{step}")
    self._get_manager().reload()

  # -- restoring.

  def _resolve_step(self, step: Optional[int]) -> int:
    self.wait_until_finished()
    if not os.path.isdir(self.directory):
      raise CheckpointNotFoundError(f"checkpoint directory {self.directory} does not exist")
    steps = self.all_steps()
    if not steps:
      raise CheckpointNotFoundError(f"checkpoint directory {self.directory} holds no checkpoints")
    if step is None:
      good = self.latest_good_step()
      if good is None:
        raise CheckpointNotFoundError(
            f"no checkpoint in {self.directory} verifies (steps present: "
            f"{', '.join(map(str, steps))}, all damaged or incomplete)")
      return good
    step = int(step)
    if step not in steps:
      raise CheckpointNotFoundError(
          f"no checkpoint for step {step} in {self.directory}; available steps: "
          f"{', '.join(map(str, steps))}")
    bad = _from_process_0(int(bool(self.verify(step))) if _is_primary() else 0)
    if bad:
      problems = self.verify(step) or ["process 0 found the step damaged"]
      raise DamagedCheckpointError(
          f"checkpoint step {step} in {self.directory} is damaged or incomplete: "
          f"{_summarise(problems)}", step, problems)
    return step

  def _read_meta_unchecked(self, step: int) -> dict:
    restored = self._get_manager().restore(
        step, args=ocp.args.Composite(**{META_ITEM: ocp.args.JsonRestore()}))
    meta = restored[META_ITEM]
    if not isinstance(meta, dict):
      raise CheckpointError(f"checkpoint step {step} in {self.directory} has no meta item")
    return meta

  def read_meta(self, step: Optional[int] = None) -> dict:
    """The meta dict of `step` (default: the newest good step), after verification."""
    step = self._resolve_step(step)
    return self._read_meta_unchecked(step)

  def restore(self, step: Optional[int] = None, *,
              abstract: Optional[Mapping[str, Any]] = None,
              items: Sequence[str] = ITEMS,
              shardings: Optional[Mapping[str, Any]] = None,
              sharding: Optional[jax.sharding.Sharding] = None) -> tuple[dict, dict]:
    """Restores `items` of `step` (default: the newest good step). Returns (items dict, meta).

    `abstract` maps an item name to a target tree of `jax.ShapeDtypeStruct`s with shardings
    (e.g. from `jax.eval_shape` plus the train state's shardings): arrays are placed with those
    shardings, whatever mesh or device count the checkpoint was saved from. An item without an
    abstract target is restored as the saved tree of dicts/lists of jax arrays placed with
    `sharding` (default: the first local device). Custom containers (optax states are named
    tuples) need an abstract target to come back as such.

    `shardings` optionally maps an item name to a tree of shardings matching its abstract tree;
    they replace the abstract leaves' shardings. Abstract leaves left without a sharding get
    `sharding`.
    """
    abstract = dict(abstract or {})
    unknown = [k for k in list(items) + list(abstract) if k not in ITEMS]
    if unknown:
      raise ValueError(f"restore: unknown items {unknown}; known items: {list(ITEMS)}")
    step = self._resolve_step(step)
    manager = self._get_manager()
    if sharding is None:
      sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    try:
      meta = self._read_meta_unchecked(step)
      saved = set(meta.get("items", ITEMS))
      to_restore = [k for k in items if k in saved]
      args = {}
      metadata = None
      for k in to_restore:
        if k in abstract:
          target = _with_shardings(abstract[k], (shardings or {}).get(k), sharding)
        else:
          if metadata is None:
            metadata = manager.item_metadata(step)
          target = _abstract_from_metadata(metadata[k], sharding)
        args[k] = ocp.args.StandardRestore(target)
      restored = manager.restore(step, args=ocp.args.Composite(**args)) if args else {}
    except CheckpointError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(
          f"restoring checkpoint step {step} from {self.directory} failed: "
          f"{type(e).__name__}: {e}") from e
    out = {}
    for k in items:
      if k in saved:
        out[k] = restored[k]
      elif meta.get("empty_items", {}).get(k) == "none":
        out[k] = None
      elif k in abstract and _is_empty_tree(abstract[k]) and abstract[k] is not None:
        out[k] = abstract[k]  # A leafless tree (e.g. optax EmptyState()s) is its own value.
      else:
        out[k] = {}
    return out, meta

  def close(self) -> None:
    """Finishes the pending save and releases orbax's resources."""
    if self._closed:
      return
    try:
      self.wait_until_finished()
    finally:
      self._closed = True
      if self._manager is not None:
        self._manager.close()


def _with_shardings(abstract: Any, shardings: Any, default: jax.sharding.Sharding) -> Any:
  """ShapeDtypeStructs of `abstract` placed with `shardings` (a matching tree) or `default`."""
  def place(leaf, leaf_sharding=None):
    if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
      return leaf
    leaf_sharding = leaf_sharding or getattr(leaf, "sharding", None) or default
    return jax.ShapeDtypeStruct(tuple(leaf.shape), leaf.dtype, sharding=leaf_sharding)

  if shardings is None:
    return jax.tree_util.tree_map(place, abstract)
  return jax.tree_util.tree_map(place, abstract, shardings)


def _abstract_from_metadata(tree_metadata: Any, sharding) -> Any:
  tree = getattr(tree_metadata, "tree", tree_metadata)

  def to_struct(leaf):
    shape = getattr(leaf, "shape", None)
    dtype = getattr(leaf, "dtype", None)
    if shape is None or dtype is None:
      return leaf
    return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=sharding)

  return jax.tree_util.tree_map(
      to_struct, tree, is_leaf=lambda x: hasattr(x, "shape") and hasattr(x, "dtype"))


def restore_for_eval(workdir: str | os.PathLike, step: Optional[int] = None, *,
                     sharding: Optional[jax.sharding.Sharding] = None) -> EvalCheckpoint:
  """Restores params and batch statistics (no optimizer state) for evaluation.

  `step=None` takes the newest step that verifies; a named step that is damaged raises
  `DamagedCheckpointError`. Arrays come back as jax arrays on the first local device, or placed
  with `sharding` when given (e.g. a replicated `NamedSharding`); reshard them as the evaluation
  needs. Works whatever the device count of the run that saved them.
  """
  ckpt = Checkpointer(workdir, async_save=False)
  try:
    restored, meta = ckpt.restore(step, items=("params", "batch_stats"), sharding=sharding)
  finally:
    ckpt.close()
  return EvalCheckpoint(restored["params"], restored["batch_stats"], meta)
