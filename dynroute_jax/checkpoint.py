"""Checkpoints of train states: orbax's `CheckpointManager` plus content checksums.

The only module of dynroute_jax that imports orbax. Orbax writes the arrays (tensorstore, never
pickle), the JSON meta item, the step metadata (whose `custom_metadata` records the model
fingerprint, creation time, library version and saved items) and commits each step atomically;
`manifest.Verifier` adds `<step>/manifest.json`, the sha256 of every file, written last, that
tells damaged steps from good ones. Usage::

    ckpt = Checkpointer(workdir, keep=3, fingerprint=manifest.model_fingerprint(config))
    if (start := ckpt.latest_good_step()) is not None:   # None: a fresh run
      items, meta = ckpt.restore(start, abstract={'params': ..., 'opt_state': ...})
    ckpt.save(step, params=..., batch_stats=..., opt_state=..., meta={'stage': 1})
    ckpt.close()
    params, batch_stats, meta = restore_for_eval(workdir)

What this adds to orbax, and why:
- `save(step)` writes when `step % save_interval_steps == 0` or `force`: orbax's `should_save`
  refuses every step at or below the newest on disk, damaged ones included, so a run restarted
  from step 0 after damage would save nothing until it passed them. A step that verifies is never
  overwritten (saving it returns False); a damaged one is moved to `quarantine/` first. Orbax has
  no hook after a commit (`post_finalization_callback` runs before the rename), so a background
  thread waits for it and writes the manifest, even if training is killed before the next save.
- Retention keeps the newest `keep` steps that verify in full and every damaged step newer than
  the oldest of them; with fewer than `keep` verifying steps nothing is deleted. Orbax's
  preservation policies delete when the new step commits, before it has a manifest (a crash then
  could leave no verifying step), so retention runs here once the manifest exists.
- Resuming takes the newest step that verifies and warns about newer damaged ones (left on disk);
  a named damaged step raises `DamagedCheckpointError`. A directory whose newest readable step
  records another model fingerprint raises `FingerprintMismatchError` before anything is written.

Multi-host: every process constructs the `Checkpointer` and calls `save`, `wait_until_finished` and
`restore`; process 0 alone writes manifests, verifies and moves damaged steps, and broadcasts its
verdicts, so all processes take the same step. The directory must be on a shared file system.

Each behaviour above is a tested fault guarantee; their code is why the module passes 400 lines.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import datetime
import json
import logging
import os
import time
from typing import Any, Mapping, NamedTuple, Optional, Sequence

from etils import epath
import jax
import numpy as np
import orbax.checkpoint as ocp

from dynroute_jax import __version__
from dynroute_jax import manifest

ITEMS = ("params", "batch_stats", "opt_state")
META_ITEM = "meta"
MANIFEST_NAME = manifest.MANIFEST_NAME
QUARANTINE_DIR = manifest.QUARANTINE_DIR


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
  """Process 0's value of an int on every process (every process must call this)."""
  if jax.process_count() == 1:
    return value
  return int(ocp.multihost.broadcast_one_to_all(np.int32(value)))


def _save_error(step: int, directory: str, e: Exception, note: str) -> CheckpointSaveError:
  return CheckpointSaveError(f"saving checkpoint step {step} to {directory} failed: "
                             f"{type(e).__name__}: {e}. {note}")


def _is_empty_tree(tree: Any) -> bool:
  return tree is None or not jax.tree_util.tree_leaves(tree)


class Checkpointer:
  """Saves and restores train states with orbax and checks their integrity (see the module doc).

  Args:
    directory: the checkpoint folder (created on the first save).
    keep: number of verifying checkpoints to keep (None keeps all).
    async_save: write arrays in the background (orbax asynchronous checkpointing).
    fingerprint: `manifest.model_fingerprint` of the model, checked against the directory's
      checkpoints here and recorded with every save.
    save_interval_steps: `save(step)` writes only multiples of it, unless `force=True`.
    read_only: a reader of a directory another process may be saving into (evaluation): it
      leaves the temporary directories of saves in progress alone and refuses to save.
  """

  def __init__(self, directory: str | os.PathLike, *, keep: Optional[int] = 3,
               async_save: bool = True, fingerprint: Optional[str] = None,
               save_interval_steps: int = 1, read_only: bool = False):
    if keep is not None and keep < 1:
      raise ValueError(f"keep must be >= 1 or None, got {keep}")
    if save_interval_steps < 1:
      raise ValueError(f"save_interval_steps must be >= 1, got {save_interval_steps}")
    # Any file system etils.epath supports; local paths made absolute (orbax requires it).
    directory = os.fspath(directory)
    self.directory = os.path.abspath(directory) if manifest.is_local(directory) else directory
    self.keep, self.async_save, self.fingerprint = keep, async_save, fingerprint
    self.save_interval_steps = save_interval_steps
    self.read_only = read_only
    self._verifier = manifest.Verifier(self.directory)
    self._manager: Optional[ocp.CheckpointManager] = None
    self._executor: Optional[concurrent.futures.ThreadPoolExecutor] = None
    self._pending: Optional[tuple[int, concurrent.futures.Future]] = None  # Step, manifest.
    self._barrier_count = 0
    self._had_failure = False
    self._closed = False
    # True once the directory is known to hold this model's checkpoints (or none): a save then
    # need not read the newest step's meta again (a quarter of a second each, and the work
    # directory's lock keeps other trainers out).
    self._compatible = False
    if fingerprint is not None:
      self.check_compatible(fingerprint)

  def _exists(self) -> bool:
    return epath.Path(self.directory).is_dir()

  def _get_manager(self, create: bool = False) -> ocp.CheckpointManager:
    """Orbax's manager, made on first use so that reading a missing directory creates nothing."""
    if self._manager is None:
      if not create and not self._exists():
        raise CheckpointNotFoundError(f"checkpoint directory {self.directory} does not exist")
      options = ocp.CheckpointManagerOptions(
          create=create,
          enable_async_checkpointing=self.async_save,
          # Removes temporary directories of interrupted saves, only for the first manager of a
          # writer: after a failed save in this process its background writers may still be
          # running, and a reader's may be a live save of the training it evaluates.
          cleanup_tmp_directories=not (self._had_failure or self.read_only),
      )  # No max_to_keep: orbax keeps every step, retention is `_apply_retention`.
      handlers = {k: ocp.StandardCheckpointHandler() for k in ITEMS}
      handlers[META_ITEM] = ocp.JsonCheckpointHandler()
      self._manager = ocp.CheckpointManager(self.directory, item_handlers=handlers,
                                            options=options)
    return self._manager

  def _open_on_every_process(self) -> None:
    """Creates orbax's manager on every process: its constructor is a collective, which code that
    runs on process 0 alone (verification before a broadcast) must never be first to call."""
    if self._manager is None and self._exists():
      self._get_manager()

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  # -- listing and verification.

  def all_steps(self) -> list[int]:
    """Every step with a committed orbax directory, ascending (good or not)."""
    if not self._exists():
      return []
    manager = self._get_manager()
    if self._pending is None:  # Reloading would drop the step orbax is still writing.
      manager.reload()
    return sorted(int(s) for s in manager.all_steps())

  def verify(self, step: int) -> list[str]:
    """Problems found in `step` (an empty list when it is good). Reads every file."""
    return self._verifier.verify(step)

  def damage_report(self) -> dict[int, list[str]]:
    """The problems of every step that does not verify (process 0's, cached), by step."""
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
    found = self._verifier.newest_verified(self.all_steps()) if _is_primary() else None
    found = _from_process_0(-1 if found is None else found)
    return None if found < 0 else found

  def recorded_fingerprint(self) -> Optional[str]:
    """The fingerprint recorded by the newest step whose meta is readable, or None."""
    for step in reversed(self.all_steps()):
      with contextlib.suppress(Exception):  # An unreadable step: ask the one before.
        if (fingerprint := self._read_meta_unchecked(step).get("fingerprint")) is not None:
          return fingerprint
    return None

  def check_compatible(self, fingerprint: Optional[str]) -> None:
    """Raises FingerprintMismatchError if the directory holds another model's checkpoints."""
    if fingerprint is None:
      return  # Nothing to compare with.
    recorded = self.recorded_fingerprint()
    if recorded is not None and recorded != fingerprint:
      raise FingerprintMismatchError(
          f"checkpoint directory {self.directory} holds checkpoints of a different model: "
          f"recorded model fingerprint {recorded}, this model's fingerprint {fingerprint}. "
          f"Use another work directory, or the model config the checkpoints were made with.")
    self._compatible = fingerprint == self.fingerprint

  # -- saving.

  def save(self, step: int, *, params: Any, batch_stats: Any = None, opt_state: Any = None,
           meta: Optional[Mapping[str, Any]] = None, force: bool = False) -> bool:
    """Saves a train state at `step` (on every process); returns whether a save was started.

    `meta` is a JSON-serialisable dict (the training `stage`, the config as a JSON string, ...).
    Empty or None `batch_stats` / `opt_state` are restored as they were.
    """
    if self._closed:
      raise CheckpointError(f"Checkpointer for {self.directory} is closed")
    if self.read_only:
      raise CheckpointError(f"Checkpointer for {self.directory} is read-only (an evaluation's); "
                            "make one with read_only=False to save")
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
      epath.Path(self.directory).mkdir(parents=True, exist_ok=True)
      args = {k: ocp.args.StandardSave(trees[k]) for k in saved_items}
      args[META_ITEM] = ocp.args.JsonSave(meta)
      self._get_manager(create=True).save(step, args=ocp.args.Composite(**args), force=True,
                                          custom_metadata=stamps)
    except Exception as e:  # pylint: disable=broad-except
      self._drop_failed_save()
      raise _save_error(step, self.directory, e, "Earlier checkpoints are untouched.") from e
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
    if self._exists():
      if not self._compatible:
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
    if decision == 2:  # Moved aside, never deleted: it may be all that is left of a run.
      if _is_primary():
        self._verifier.quarantine(step, problems)
      self._verifier.forget(step)
      self._barrier(f"quarantine_{step}")
      self._get_manager().reload()
    return True

  def _write_manifest(self, step: int) -> None:
    """Background thread: waits for orbax to commit `step`, then writes its manifest."""
    self._manager.wait_until_finished()  # Raises if the save failed.
    if _is_primary():
      self._verifier.write(step)

  def _drop_failed_save(self) -> None:
    """Forgets a failed save and its manager, which would re-raise the failure from every call."""
    manager, self._manager, self._pending, self._had_failure = self._manager, None, None, True
    if manager is not None:
      with contextlib.suppress(Exception):
        manager.close()

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
      raise _save_error(step, self.directory, e, f"Step {step} is incomplete and will be "
                        "skipped; earlier checkpoints are untouched.") from e
    self._barrier(f"manifest_{step}")  # The manifest is visible to every process from here.
    self._apply_retention()

  def _apply_retention(self) -> None:
    """Deletes the steps older than the newest `keep` verifying ones (process 0 decides)."""
    if self.keep is None:
      return
    manager = self._get_manager()
    manager.reload()
    steps = sorted(int(s) for s in manager.all_steps())
    oldest_kept = self._verifier.oldest_to_keep(steps, self.keep) if _is_primary() else None
    oldest_kept = _from_process_0(-1 if oldest_kept is None else oldest_kept)
    if oldest_kept < 0:  # Fewer than `keep` verifying steps: keep everything.
      return
    for step in steps:
      if step < oldest_kept:
        manager.delete(step)
        self._verifier.forget(step)

  # -- restoring.

  def _resolve_step(self, step: Optional[int]) -> int:
    """`step` if it exists and verifies, the newest verifying step if None; raises otherwise."""
    self.wait_until_finished()
    if not self._exists():
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
          f"{manifest.summarise(problems)}", step, problems)
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

    `abstract` maps an item name to a tree of `jax.ShapeDtypeStruct`s, placed with their own
    shardings or those of the matching tree `shardings[name]`, whatever mesh the checkpoint was
    saved from (orbax restores into sharded targets). Other items come back as saved (dicts and
    lists: optax's named tuples need an abstract target); leaves without a sharding are placed
    with `sharding` (default: the first local device).
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
      args, saved_trees = {}, None
      for k in (k for k in items if k in saved):
        if k in abstract:
          target = _placed(abstract[k], (shardings or {}).get(k), sharding)
        else:  # The saved shapes and dtypes; orbax's sharding metadata is another mesh's.
          saved_trees = saved_trees or self._get_manager().metadata(step).item_metadata
          tree = getattr(saved_trees[k], "tree", saved_trees[k])
          target = _placed(tree, None, sharding, own_sharding=False)
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
  """Restore targets: each array leaf placed by `shardings` (a matching tree), else by its own
  sharding (if `own_sharding`), else by `default`."""
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
  ckpt = Checkpointer(workdir, async_save=False, read_only=True)
  try:
    restored, meta = ckpt.restore(step, items=("params", "batch_stats"), sharding=sharding)
  finally:
    ckpt.close()
  return EvalCheckpoint(restored["params"], restored["batch_stats"], meta)
