"""The work directory's checks before training: writable, locked, of this model, resumable.

Each check refuses the run before anything in the work directory changes (a refused resume leaves
it as it was); `save_config` is the first write. Any filesystem etils.epath supports works (local,
gs://, ...), through the same calls.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
from typing import Any
import uuid

from absl import logging
from etils import epath
import jax
import ml_collections

from dynroute_jax import checkpoint as ckpt_lib
from dynroute_jax import distributed
from dynroute_jax import manifest
from dynroute_jax import schedules
from dynroute_jax import workdir_lock


def prepare_workdir(workdir: str | os.PathLike[str]) -> None:
  """Creates the work directory and checks that a file can be written there, before any compile."""
  path = epath.Path(workdir)
  try:
    path.mkdir(parents=True, exist_ok=True)
    probe = path / f".write-test-{uuid.uuid4().hex}"
    probe.write_text("")
    probe.unlink()
  except Exception as e:  # pylint: disable=broad-except
    # Remote backends raise their own error types (e.g. tf.errors.OpError); report them alike.
    raise OSError(getattr(e, "errno", None), f"Cannot write to work directory {workdir} "
                  f"({getattr(e, 'strerror', None) or e}). Choose another --workdir or fix its "
                  "permissions; nothing was written.") from e


def lock_workdir(workdir: str | os.PathLike[str], cleanup: contextlib.ExitStack) -> None:
  """Takes the work directory's lock (process 0) until `cleanup` unwinds; every process agrees.

  Raises workdir_lock.WorkdirLockedError on every process when process 0 could not take it, so
  the others do not wait forever in the first collective.
  """
  if "://" in os.fspath(workdir):  # An object store (gs://...) has no atomic exclusive create.
    logging.warning("Work directory %s is not on a local file system: it is not locked against a "
                    "second training.", workdir)
    return
  lock = workdir_lock.WorkdirLock(os.fspath(workdir), enabled=jax.process_index() == 0)
  error = None
  try:
    lock.acquire()
  except workdir_lock.WorkdirLockedError as e:
    error = e
  # One process decides alone (no collective, so the step loop's agreement calls stay per step).
  failed = (distributed.any_process(error is not None) if jax.process_count() > 1
            else error is not None)
  if failed:
    raise error or workdir_lock.WorkdirLockedError(
        f"Process 0 could not lock work directory {workdir}: another training uses it (process "
        "0's error names it).")
  cleanup.callback(lock.release)


def check_config_json(config: ml_collections.ConfigDict, workdir: str | os.PathLike[str]
                      ) -> dict[str, Any]:
  """Raises if workdir/config.json belongs to another model; returns the config as JSON data."""
  path = epath.Path(workdir) / "config.json"
  new = json.loads(config.to_json_best_effort())
  if path.exists():
    try:
      old = json.loads(path.read_text())
    except json.JSONDecodeError:
      old = None
    if isinstance(old, dict) and old.get("model") != new.get("model"):
      raise ValueError(
          f"Workdir {workdir} holds a run of another model (config.json model section differs: "
          f"{old.get('model', {}).get('name')}/{old.get('model', {}).get('variant')} there, "
          f"{new['model'].get('name')}/{new['model'].get('variant')} now). Use a new --workdir; "
          "nothing was changed.")
  return new


def _changed_fields(old: Any, new: Any, prefix: str = "") -> list[str]:
  """The dotted paths whose values differ between two JSON configs."""
  if not (isinstance(old, dict) and isinstance(new, dict)):
    return [prefix] if old != new else []
  return [p for k in sorted(set(old) | set(new))
          for p in _changed_fields(old.get(k), new.get(k), f"{prefix}.{k}" if prefix else k)]


def save_config(config: ml_collections.ConfigDict, workdir: str | os.PathLike[str]) -> None:
  """Writes the resolved config; a workdir holding another model's config is refused untouched.

  An earlier config.json that differs (a resume with changed settings) is kept beside it as
  config.<UTC time>.json, and the changed fields are logged: the record of how the steps before
  the resume were trained is never lost.
  """
  path = epath.Path(workdir) / "config.json"
  new = check_config_json(config, workdir)
  if jax.process_index() == 0:
    _keep_earlier_config(path, new)
    tmp = path.parent / (path.name + ".tmp")
    tmp.write_text(json.dumps(new, indent=2, sort_keys=True))
    tmp.replace(path)  # Atomic on local filesystems; a copy and delete on object stores.


def _keep_earlier_config(path: epath.Path, new: dict[str, Any]) -> None:
  """Copies `path` to config.<UTC time>.json when it differs from `new`, with a warning."""
  if not path.exists():
    return
  text = path.read_text()
  try:
    changed = _changed_fields(json.loads(text), new)
  except json.JSONDecodeError:
    changed = ["(config.json is not JSON)"]
  if not changed:
    return
  stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S")
  kept, n = path.parent / f"config.{stamp}.json", 1
  while kept.exists():  # Two resumes within a second: keep both.
    kept, n = path.parent / f"config.{stamp}-{n}.json", n + 1
  kept.write_text(text)
  logging.warning("This run's config differs from %s in %s; the earlier one is kept as %s.", path,
                  ", ".join(changed[:8]) + (f" and {len(changed) - 8} more" if len(changed) > 8
                                            else ""), kept.name)


def check_resume_stage(ckpt: ckpt_lib.Checkpointer, step: int,
                       stages: list[schedules.Stage]) -> None:
  """Refuses a resume whose config puts checkpoint `step` in another stage than it was saved in.

  Changed stage lengths would otherwise train a stage again on the weights of a later one (or
  evaluate a run cut short) and report it as the run. Lengthening the checkpoint's own stage, the
  last one included, is allowed.
  """
  saved = int(ckpt.read_meta(step)["stage"])
  planned = getattr(schedules.stage_at(stages, step), "index", None)
  if planned == saved:
    return
  where = (f"stage {planned}" if planned is not None
           else f"no stage (this config ends training at step {stages[-1].end})")
  raise ValueError(
      f"Cannot resume from checkpoint step {step}: it was saved in stage {saved}, but this "
      f"config's stage lengths (config.train.stage*.steps / epochs) put step {step} in {where}. "
      "Resume with the stage lengths of the run's config.json, or use a new --workdir; nothing "
      "was changed.")


def resume_step(ckpt: ckpt_lib.Checkpointer, config: ml_collections.ConfigDict) -> int | None:
  """The step to resume from: the newest that verifies; None to start from step 0.

  Checkpoints that exist but of which none verifies are never silently ignored (that would train
  from nothing and report it as the run): NoGoodCheckpointError names every damaged step, unless
  config.checkpoint.restart_if_damaged is set.
  """
  step = ckpt.latest_good_step()
  if step is not None or not ckpt.all_steps():
    return step
  damaged = ckpt.damage_report()
  listing = "; ".join(f"step {s}: {manifest.summarise(p)}"
                      for s, p in sorted(damaged.items(), reverse=True))
  if not config.checkpoint.restart_if_damaged:
    raise ckpt_lib.NoGoodCheckpointError(
        f"Cannot resume: no checkpoint in {ckpt.directory} verifies ({listing}). Nothing was "
        "changed. Restore the checkpoints from a copy, use another --workdir, or start over "
        "from step 0 with --config.checkpoint.restart_if_damaged=True (the damaged steps are "
        "then moved to the quarantine/ folder when their step numbers are saved again).",
        damaged)
  logging.warning("No checkpoint in %s verifies (%s); config.checkpoint.restart_if_damaged is "
                  "set, so training starts from step 0.", ckpt.directory, listing)
  return None
