"""Checkpoints of train states: orbax's `CheckpointManager` plus content checksums.

The only module of dynroute_jax that imports orbax (its API changes between releases). Orbax
writes the arrays (OCDBT / tensorstore, never pickle), the JSON meta item, the step metadata and
the atomic commit; `manifest.Verifier` adds the sha256 manifest that tells damaged steps from good
ones. Layout of the directory::

    <step>/params/ batch_stats/ opt_state/   orbax array items (empty trees are not written)
    <step>/meta/                  JSON item: the caller's meta (training stage, config, ...)
    <step>/_CHECKPOINT_METADATA   orbax step metadata; its custom_metadata records the model
                                  fingerprint, creation time, library version and saved items
    <step>/manifest.json          size and sha256 of every other file of the step, written last
    quarantine/<step>-<ns>/       damaged steps, moved aside when their step is saved again

Usage::

    ckpt = Checkpointer(workdir, keep=3, fingerprint=manifest.model_fingerprint(config))
    start = ckpt.latest_good_step()        # None: fresh run
    if start is not None:
      items, meta = ckpt.restore(abstract={'params': ..., 'batch_stats': ..., 'opt_state': ...})
    ckpt.save(step, params=..., batch_stats=..., opt_state=..., meta={'stage': 1, ...})
    ckpt.close()
    params, batch_stats, meta = restore_for_eval(workdir)   # no optimizer state needed

What this module adds to orbax, and why:

- Saving writes when `step % save_interval_steps == 0` or `force`. Orbax's `should_save` cannot
  decide it: it refuses every step at or below the newest step on disk, damaged ones included, so
  a run restarted from step 0 after damage would save nothing until it passed them. A step that
  exists and verifies is never overwritten (saving it again returns False); a damaged one is moved
  to quarantine/ first. After orbax commits a save, a background thread writes the manifest (orbax
  has no hook after the commit: `post_finalization_callback` runs before the rename), so it appears
  even if training is killed before the next save. `wait_until_finished` joins that thread and
  raises `CheckpointSaveError` if the save failed; earlier checkpoints are untouched.
- Retention: after each manifest, the newest `keep` steps that verify in full are kept and older
  steps are deleted; fewer than `keep` verifying steps delete nothing, and a damaged step newer
  than the oldest kept one stays. Orbax's preservation policies are evaluated when a save starts
  and applied when it commits, before the new step has a manifest: a crash there could leave no
  verifying step, so retention runs here once the manifest exists.
- Resuming (`latest_good_step`, `restore()` without a step) takes the newest step that verifies and
  warns about each newer damaged one (left on disk); restoring a named damaged step raises
  `DamagedCheckpointError`.
- Every step records the model fingerprint; a directory whose newest readable step records another
  one raises `FingerprintMismatchError` in the constructor, before anything is written.

Multi-host: every process constructs the `Checkpointer` and calls `save`, `wait_until_finished` and
`restore` (orbax coordinates the array writes). Process 0 alone writes manifests, verifies and
moves damaged steps, and broadcasts its verdicts, so data is read once and every process takes the
same step. The directory must be on a file system shared by all processes, as orbax requires.
"""

from __future__ import annotations

import concurrent.futures
import datetime
import json
import logging
import os
import shutil
import time
from typing import Any, Mapping, NamedTuple, Optional, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp

from dynroute_jax import __version__
from dynroute_jax import manifest

ITEMS = ("params", "batch_stats", "opt_state")
META_ITEM = "meta"
MANIFEST_NAME = manifest.MANIFEST_NAME
QUARANTINE_DIR = "quarantine"
_summarise = manifest.summarise  # The trainer's resume message lists problems with it.


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
  """Checkpoints exist, but none verifies: `problems` maps each damaged step to what is wrong."""

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


def _is_primary() -> bool:
  return jax.process_index() == 0


def _from_process_0(value: int) -> int:
  """Process 0's value of an int on every process (a no-op with one process)."""
  if jax.process_count() == 1:
    return value
  return int(ocp.multihost.broadcast_one_to_all(np.int32(value)))


def _is_empty_tree(tree: Any) -> bool:
  return tree is None or not jax.tree_util.tree_leaves(tree)


class Checkpointer:
  """Saves and restores train states with orbax and checks their integrity (see the module doc).

  Args:
    directory: the work directory's checkpoint folder (created on the first save).
    keep: number of verifying checkpoints to keep (None keeps all).
    async_save: write arrays in the background (orbax asynchronous checkpointing).
    fingerprint: the model's fingerprint (`manifest.model_fingerprint`); checked against the
      directory's checkpoints here and recorded with every save.
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
    self._verifier = manifest.Verifier(self.directory)
    self._manager: Optional[ocp.CheckpointManager] = None
    self._executor: Optional[concurrent.futures.ThreadPoolExecutor] = None
    self._pending: Optional[tuple[int, concurrent.futures.Future]] = None  # Step, manifest.
    self._barrier_count = 0
    self._had_failure = False
    self._closed = False
    if fingerprint is not None:
      self.check_compatible(fingerprint)

  def _get_manager(self, create: bool = False) -> ocp.CheckpointManager:
    """Orbax's manager, made on first use so that reading a missing directory creates nothing."""
    if self._manager is None:
      if not create and not os.path.isdir(self.directory):
        raise CheckpointNotFoundError(f"checkpoint directory {self.directory} does not exist")
      options = ocp.CheckpointManagerOptions(
          create=create,
          enable_async_checkpointing=self.async_save,
          # Removes temporary directories of interrupted saves, only for the first manager:
          # after a failed save in this process its background writers may still be running.
          cleanup_tmp_directories=not self._had_failure,
      )  # No max_to_keep: orbax keeps every step, retention is `_apply_retention`.
      handlers = {k: ocp.StandardCheckpointHandler() for k in ITEMS}
      handlers[META_ITEM] = ocp.JsonCheckpointHandler()
      self._manager = ocp.CheckpointManager(self.directory, item_handlers=handlers,
                                            options=options)
    return self._manager

  def _open_on_every_process(self) -> None:
    """Creates orbax's manager now, on every process, when the directory exists.

    Constructing a CheckpointManager is a collective (it synchronises all processes), so code
    that runs on process 0 alone (verification before a broadcast) must never be the first to
    create it: every process calls this first.
    """
    if self._manager is None and os.path.isdir(self.directory):
      self._get_manager()

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  # -- listing and verification.

  def all_steps(self) -> list[int]:
    """Every step with a committed orbax directory, ascending (good or not)."""
    if not os.path.isdir(self.directory):
      return []
    manager = self._get_manager()
    if self._pending is None:  # Reloading would drop the step orbax is still writing.
      manager.reload()
    return sorted(int(s) for s in manager.all_steps())

  def verify(self, step: int) -> list[str]:
    """Problems found in `step` (an empty list when it is good). Reads every file."""
    return self._verifier.verify(step)

  def damage_report(self) -> dict[int, list[str]]:
    """The problems of every step that does not verify, by step (cached full verification).

    Process 0 verifies; on the other processes a damaged step's entry only says so.
    """
    self.wait_until_finished()
    self._open_on_every_process()
    report = {}
    for step in self.all_steps():
      problems = self._verifier.verify_cached(step) if _is_primary() else []
      if _from_process_0(int(bool(problems))):
        report[step] = problems or ["damaged or incomplete (verified by process 0)"]
    return report

  def latest_good_step(self) -> Optional[int]:
    """The newest step that verifies, or None. Warns about (and keeps) newer damaged steps."""
    self.wait_until_finished()
    self._open_on_every_process()
    found = -1
    if _is_primary():
      newest = self._verifier.newest_verified(self.all_steps())
      found = -1 if newest is None else newest
    found = _from_process_0(found)
    return None if found < 0 else found

  # -- fingerprint.

  def recorded_fingerprint(self) -> Optional[str]:
    """The fingerprint recorded by the newest step whose meta is readable, or None."""
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

    Must be called by every process. `meta` is a JSON-serialisable dict; put at least the training
    `stage` and the config (as a JSON string) there. The step, fingerprint, creation time and
    library version are recorded with it. Empty or None `batch_stats` / `opt_state` are recorded
    as such and restored as they were.
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
    now = time.time()
    stamps = dict(
        fingerprint=self.fingerprint, created=now,
        created_iso=datetime.datetime.fromtimestamp(now, datetime.timezone.utc).isoformat(),
        library_version=__version__, format_version=manifest.FORMAT_VERSION, items=saved_items,
        empty_items={k: ("none" if v is None else "empty")
                     for k, v in trees.items() if _is_empty_tree(v)})
    meta = {**(meta or {}), "step": step}
    try:
      json.dumps(meta)
    except (TypeError, ValueError) as e:
      raise ValueError(f"save: meta for step {step} is not JSON-serialisable: {e}") from e
    if not self._make_room(step):
      return False
    try:
      os.makedirs(self.directory, exist_ok=True)
      args = {k: ocp.args.StandardSave(trees[k]) for k in saved_items}
      args[META_ITEM] = ocp.args.JsonSave(meta)
      self._get_manager(create=True).save(step, args=ocp.args.Composite(**args), force=True,
                                          custom_metadata=stamps)
    except Exception as e:  # pylint: disable=broad-except
      self._drop_failed_save()
      raise CheckpointSaveError(
          f"saving checkpoint step {step} to {self.directory} failed: {type(e).__name__}: {e}. "
          f"Earlier checkpoints are untouched.") from e
    if self._executor is None:
      self._executor = concurrent.futures.ThreadPoolExecutor(
          max_workers=1, thread_name_prefix="checkpoint-manifest")
    self._pending = (step, self._executor.submit(self._write_manifest, step))
    if not self.async_save:
      self.wait_until_finished()
    return True

  def _make_room(self, step: int) -> bool:
    """False if `step` exists and verifies; moves it to quarantine/ first if it is damaged."""
    decision, problems = 0, []  # 0: save; 1: exists and verifies; 2: exists damaged.
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
    return True

  def _write_manifest(self, step: int) -> None:
    """Background thread: waits for orbax to commit `step`, then writes its manifest."""
    self._manager.wait_until_finished()  # Raises if the save failed.
    if _is_primary():
      self._verifier.write(step)

  def _drop_failed_save(self) -> None:
    """After a failed save: forget the step and discard orbax's manager.

    Orbax's manager re-raises a failed background save from every later call, so a fresh one is
    made on next use. The failed step's temporary directory is never listed as a step.
    """
    manager, self._manager = self._manager, None
    self._pending = None
    self._had_failure = True
    if manager is not None:
      try:
        manager.close()
      except Exception:  # pylint: disable=broad-except
        pass

  def _barrier(self, name: str) -> None:
    if jax.process_count() > 1:
      self._barrier_count += 1
      ocp.multihost.sync_global_processes(f"dynroute_checkpoint_{name}_{self._barrier_count}")

  def wait_until_finished(self) -> None:
    """Blocks until the last save is committed and its manifest written; raises if it failed."""
    if self._pending is None:
      return
    (step, written), self._pending = self._pending, None
    try:
      written.result()
    except Exception as e:  # pylint: disable=broad-except
      self._drop_failed_save()
      raise CheckpointSaveError(
          f"saving checkpoint step {step} to {self.directory} failed: {type(e).__name__}: {e}. "
          f"Step {step} is incomplete and will be skipped; earlier checkpoints are "
          f"untouched.") from e
    self._barrier(f"manifest_{step}")  # The manifest is visible to every process from here.
    self._apply_retention()

  def _apply_retention(self) -> None:
    """Deletes the steps older than the newest `keep` steps that verify in full.

    Process 0 decides (cached verdicts: only changed steps are read again) and every process
    deletes the same steps.
    """
    if self.keep is None:
      return
    manager = self._get_manager()
    manager.reload()
    steps = sorted(int(s) for s in manager.all_steps())
    oldest_kept = -1
    if _is_primary():
      good = 0
      for step in reversed(steps):  # Newest first; older steps need no verdict.
        good += not self._verifier.verify_cached(step)
        if good == self.keep:
          oldest_kept = step
          break
    oldest_kept = _from_process_0(oldest_kept)
    if oldest_kept < 0:  # Fewer than `keep` verifying steps: keep everything.
      return
    for step in steps:
      if step < oldest_kept:
        manager.delete(step)
        self._verifier.forget(step)

  def _quarantine(self, step: int, problems: Sequence[str]) -> None:
    """Moves a damaged step aside so that a new save of the same step number can proceed."""
    target = os.path.join(self.directory, QUARANTINE_DIR, f"{step}-{time.time_ns()}")
    logging.warning("Checkpoint step %d in %s is damaged or incomplete (%s); moving it to %s "
                    "before saving step %d again.", step, self.directory, _summarise(problems),
                    target, step)
    if _is_primary():
      os.makedirs(os.path.dirname(target), exist_ok=True)
      shutil.move(self._verifier.step_dir(step), target)
    self._verifier.forget(step)
    self._barrier(f"quarantine_{step}")
    self._get_manager().reload()

  # -- restoring.

  def _resolve_step(self, step: Optional[int]) -> int:
    """`step` if it exists and verifies, the newest verifying step if None; raises otherwise."""
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
    if _from_process_0(int(bool(self.verify(step))) if _is_primary() else 0):
      problems = self.verify(step) or ["process 0 found the step damaged"]
      raise DamagedCheckpointError(
          f"checkpoint step {step} in {self.directory} is damaged or incomplete: "
          f"{_summarise(problems)}", step, problems)
    return step

  def _read_meta_unchecked(self, step: int) -> dict:
    """The caller's meta of `step` with the recorded stamps (step, fingerprint, ...)."""
    manager = self._get_manager()
    meta = manager.restore(step, args=ocp.args.Composite(
        **{META_ITEM: ocp.args.JsonRestore()}))[META_ITEM]
    if not isinstance(meta, dict):
      raise CheckpointError(f"checkpoint step {step} in {self.directory} has no meta item")
    # Earlier versions kept the stamps in the meta item; their custom metadata is empty.
    return {**meta, **(manager.metadata(step).custom_metadata or {}), "step": step}

  def read_meta(self, step: Optional[int] = None) -> dict:
    """The meta dict of `step` (default: the newest good step), after verification."""
    return self._read_meta_unchecked(self._resolve_step(step))

  def restore(self, step: Optional[int] = None, *,
              abstract: Optional[Mapping[str, Any]] = None,
              items: Sequence[str] = ITEMS,
              shardings: Optional[Mapping[str, Any]] = None,
              sharding: Optional[jax.sharding.Sharding] = None) -> tuple[dict, dict]:
    """Restores `items` of `step` (default: the newest good step). Returns (items dict, meta).

    `abstract` maps an item name to a target tree of `jax.ShapeDtypeStruct`s with shardings
    (e.g. `jax.eval_shape` of the train state): arrays are placed with those shardings, whatever
    mesh or device count the checkpoint was saved from. `shardings` optionally maps an item name to
    a matching tree of shardings that replace the abstract leaves' own. An item without an abstract
    target comes back as the saved tree of dicts/lists of arrays; abstract leaves without a
    sharding and such items are placed with `sharding` (default: the first local device). Custom
    containers (optax states are named tuples) need an abstract target to come back as such.
    """
    abstract = dict(abstract or {})
    unknown = [k for k in list(items) + list(abstract) if k not in ITEMS]
    if unknown:
      raise ValueError(f"restore: unknown items {unknown}; known items: {list(ITEMS)}")
    step = self._resolve_step(step)
    if sharding is None:
      sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    try:
      meta = self._read_meta_unchecked(step)
      saved = set(meta.get("items", ITEMS))
      args = {}
      for k in (k for k in items if k in saved):
        if k in abstract:
          target = _placed(abstract[k], (shardings or {}).get(k), sharding)
        else:  # The saved shapes and dtypes; orbax's sharding metadata is another mesh's.
          tree = self._get_manager().metadata(step).item_metadata[k]
          target = _placed(getattr(tree, "tree", tree), None, sharding, own_sharding=False)
        args[k] = ocp.args.StandardRestore(target)
      restored = self._get_manager().restore(step, args=ocp.args.Composite(**args)) if args else {}
    except CheckpointError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(f"restoring checkpoint step {step} from {self.directory} failed: "
                            f"{type(e).__name__}: {e}") from e
    return {k: _restored_item(k, restored, saved, meta, abstract) for k in items}, meta

  def close(self) -> None:
    """Finishes the pending save and releases orbax's resources."""
    if self._closed:
      return
    try:
      self.wait_until_finished()
    finally:
      self._closed = True
      if self._executor is not None:
        self._executor.shutdown()
      if self._manager is not None:
        self._manager.close()


def _placed(tree: Any, shardings: Any, default: jax.sharding.Sharding,
            own_sharding: bool = True) -> Any:
  """`jax.ShapeDtypeStruct`s of `tree`'s array leaves for orbax to restore into.

  Each leaf is placed with its entry of `shardings` (a matching tree) if given, else with its own
  sharding (if `own_sharding`), else with `default`.
  """
  def place(leaf, leaf_sharding=None):
    if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
      return leaf
    own = getattr(leaf, "sharding", None) if own_sharding else None
    return jax.ShapeDtypeStruct(tuple(leaf.shape), leaf.dtype,
                                sharding=leaf_sharding or own or default)

  is_leaf = lambda x: hasattr(x, "shape") and hasattr(x, "dtype")
  if shardings is None:
    return jax.tree_util.tree_map(place, tree, is_leaf=is_leaf)
  return jax.tree_util.tree_map(place, tree, shardings, is_leaf=is_leaf)


def _restored_item(name: str, restored: Mapping[str, Any], saved: set, meta: dict,
                   abstract: Mapping[str, Any]) -> Any:
  """An item as it was saved: restored arrays, or the empty tree or None it was."""
  if name in saved:
    return restored[name]
  if meta.get("empty_items", {}).get(name) == "none":
    return None
  if name in abstract and _is_empty_tree(abstract[name]) and abstract[name] is not None:
    return abstract[name]  # A leafless tree (e.g. optax EmptyState()s) is its own value.
  return {}


def restore_for_eval(workdir: str | os.PathLike, step: Optional[int] = None, *,
                     sharding: Optional[jax.sharding.Sharding] = None) -> EvalCheckpoint:
  """Restores params and batch statistics (no optimizer state) for evaluation.

  `step=None` takes the newest step that verifies; a named step that is damaged raises
  `DamagedCheckpointError`. Arrays come back on the first local device, or placed with `sharding`
  when given (e.g. a replicated `NamedSharding`), whatever the device count of the run that saved
  them.
  """
  ckpt = Checkpointer(workdir, async_save=False)
  try:
    restored, meta = ckpt.restore(step, items=("params", "batch_stats"), sharding=sharding)
  finally:
    ckpt.close()
  return EvalCheckpoint(restored["params"], restored["batch_stats"], meta)
