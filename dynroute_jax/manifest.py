"""Content checksums of checkpoint steps, which orbax does not keep, and the model fingerprint.

Orbax restores several kinds of damaged checkpoints silently, and its step listing never notices
damage. So once a step is committed, `Verifier.write` puts `manifest.json` into the step
directory: size and sha256 of every other file there, written through a temporary file and an
atomic rename, after everything else. A step without a valid manifest is incomplete or damaged.
`Verifier.verify` recomputes the checksums and returns the problems found (empty when good).

Verifying reads every file, so each verdict is cached per step, keyed by the size, mtime and inode
of every file of the step (the manifest included): a step is read in full once per process (the
step just written not even once) and again only when one of its files changes. Damage that leaves
size, mtime and inode unchanged (bit rot under the file system) is found by `verify` only.

Step directories are read through `etils.epath`, so checkpoints may live on any file system
orbax supports (`gs://...` included). On local file systems the manifest is fsync'd before its
rename and the directory after it, and the cache key uses inodes and nanosecond mtimes; an object
store commits each object whole (the manifest is written in one put) and has no inodes, so there
the key is (path, size, mtime).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
import time
from typing import Any, Iterable, Optional, Sequence

from etils import epath
import ml_collections

MANIFEST_NAME = "manifest.json"
QUARANTINE_DIR = "quarantine"
FORMAT_VERSION = 1
_HASH_CHUNK = 1 << 20
_MAX_PROBLEMS_IN_MESSAGE = 6


def model_fingerprint(config: ml_collections.ConfigDict) -> str:
  """Identifies the architecture: checkpoints of another model must not be restored into it.

  A hash of `config.model` and of the data shape the model is built for (classes, image size,
  channels). The formula is the one every existing checkpoint records; changing it would make
  every earlier work directory look like another model's.
  """
  blob = json.dumps({"model": config.model.to_dict(), "num_classes": config.data.num_classes,
                     "image_size": config.data.image_size,
                     "num_channels": config.data.num_channels}, sort_keys=True, default=str)
  return hashlib.sha256(blob.encode()).hexdigest()[:16]


def summarise(problems: Sequence[str]) -> str:
  """The first few problems on one line, for messages."""
  shown = list(problems[:_MAX_PROBLEMS_IN_MESSAGE])
  if len(problems) > len(shown):
    shown.append(f"... and {len(problems) - len(shown)} more")
  return "; ".join(shown)


PathLike = str | os.PathLike


def is_local(path: PathLike) -> bool:
  """True for a path of the local (or a mounted) file system, False for `scheme://...`."""
  return "://" not in os.fspath(path)


def _sha256(path: epath.Path) -> str:
  digest = hashlib.sha256()
  with path.open("rb") as f:
    while chunk := f.read(_HASH_CHUNK):
      digest.update(chunk)
  return digest.hexdigest()


def _walk_files(root: epath.Path) -> list[tuple[str, epath.Path]]:
  """(relative path with '/', path) of every regular file under root, sorted."""
  if not root.is_dir():
    return []
  files = []
  for dirpath, _, filenames in root.walk():
    for name in filenames:
      path = epath.Path(dirpath) / name
      files.append((os.fspath(path.relative_to(root)).replace(os.sep, "/"), path))
  return sorted(files)


def _list_files(root: epath.Path) -> list[str]:
  """Relative paths of every regular file under root, sorted, the manifest excluded."""
  return [rel for rel, path in _walk_files(root)
          if rel != MANIFEST_NAME and not path.name.startswith("." + MANIFEST_NAME)]


def _atomic_write_json(path: epath.Path, obj: Any) -> None:
  """Writes JSON so that readers see all of it or nothing.

  Locally: a temporary file in the same directory, fsync, rename, fsync of the directory. An
  object store creates each object whole, so there one write is already atomic.
  """
  if not is_local(path):
    path.write_text(json.dumps(obj, indent=1, sort_keys=True))
    return
  path = os.fspath(path)
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
  try:  # Makes the rename durable; not every file system supports fsync on a directory.
    fd = os.open(directory, os.O_RDONLY)
    try:
      os.fsync(fd)
    finally:
      os.close(fd)
  except OSError:
    pass


def _stat(path: epath.Path) -> tuple:
  """(size, mtime, inode) locally; (size, mtime) where there are no inodes."""
  if is_local(path):
    st = os.stat(path)
    return (st.st_size, st.st_mtime_ns, st.st_ino)
  st = path.stat()
  return (st.length, st.mtime)


def _signature(step_dir: epath.Path) -> tuple:
  """(path, size, mtime[, inode]) of every file of a step: what a cached verdict is valid for."""
  entries = []
  for rel, path in _walk_files(step_dir):
    try:
      entries.append((rel,) + _stat(path))
    except (OSError, FileNotFoundError):  # Removed while listing: the verdict is void anyway.
      continue
  return tuple(entries)


def _problems(step_dir: epath.Path, step: int) -> list[str]:
  """What is wrong with the step directory against its manifest; reads every file."""
  if not step_dir.is_dir():
    return [f"step directory {step_dir} is missing"]
  manifest_path = step_dir / MANIFEST_NAME
  if not manifest_path.exists():
    return [f"{MANIFEST_NAME} is missing (the save did not complete, or the file was removed)"]
  try:
    with manifest_path.open() as f:
      manifest = json.load(f)
    files = manifest["files"]
    if int(manifest["step"]) != int(step):
      return [f"{MANIFEST_NAME} belongs to step {manifest['step']}, not {step}"]
  except (OSError, ValueError, KeyError, TypeError) as e:
    return [f"{MANIFEST_NAME} is unreadable: {e}"]
  problems = []
  for rel, entry in sorted(files.items()):
    path = step_dir / rel
    if not path.is_file():
      problems.append(f"missing file {rel}")
      continue
    size = _stat(path)[0]
    if size != entry["size"]:
      problems.append(f"size mismatch in {rel}: {size} bytes, expected {entry['size']}")
      continue
    if _sha256(path) != entry["sha256"]:
      problems.append(f"checksum mismatch in {rel}")
  return problems


class Verifier:
  """Writes and checks the manifests of the step directories `<directory>/<step>/`.

  Args:
    directory: the folder holding one directory per step, named by its step number (any
      file system etils.epath supports).
  """

  def __init__(self, directory: PathLike):
    self.directory = epath.Path(directory)
    # step -> (file signature, problems): the full verifications already done.
    self._verdicts: dict[int, tuple[tuple, tuple[str, ...]]] = {}

  def step_dir(self, step: int) -> epath.Path:
    return self.directory / str(int(step))

  def write(self, step: int) -> None:
    """Writes the manifest of a committed step: its files' sizes and checksums."""
    step_dir = self.step_dir(step)
    files = {}
    for rel in _list_files(step_dir):
      path = step_dir / rel
      files[rel] = {"size": _stat(path)[0], "sha256": _sha256(path)}
    _atomic_write_json(step_dir / MANIFEST_NAME, {
        "step": int(step), "format_version": FORMAT_VERSION, "algorithm": "sha256",
        "written": time.time(), "files": files})
    # The checksums were just computed from these very files: the step verifies without a second
    # read (a file changed meanwhile shows in the signature and forces a full verify).
    self._verdicts[int(step)] = (_signature(step_dir), ())

  def verify(self, step: int) -> list[str]:
    """Problems found in `step` (an empty list when it is good). Reads every file."""
    step_dir = self.step_dir(step)
    signature = _signature(step_dir)  # Taken first: a file changing meanwhile voids the entry.
    problems = _problems(step_dir, step)
    self._verdicts[int(step)] = (signature, tuple(problems))
    return problems

  def verify_cached(self, step: int) -> list[str]:
    """`verify(step)`, read in full only when the step's files changed since the last verdict."""
    cached = self._verdicts.get(int(step))
    if cached is not None and cached[0] == _signature(self.step_dir(step)):
      return list(cached[1])
    return self.verify(step)

  def forget(self, step: int) -> None:
    """Drops the cached verdict of a step that was deleted or moved away."""
    self._verdicts.pop(int(step), None)

  def quarantine(self, step: int, problems: Sequence[str]) -> None:
    """Moves a damaged step to `quarantine/<step>-<ns>/`, so that it can be saved again."""
    target = self.directory / QUARANTINE_DIR / f"{step}-{time.time_ns()}"
    logging.warning("Checkpoint step %d in %s is damaged or incomplete (%s); moving it to %s "
                    "before saving step %d again.", step, self.directory, summarise(problems),
                    target, step)
    target.parent.mkdir(parents=True, exist_ok=True)
    if is_local(target):
      shutil.move(os.fspath(self.step_dir(step)), os.fspath(target))
    else:  # Object stores have no directory rename: copy, then remove the original.
      for rel, path in _walk_files(self.step_dir(step)):
        (target / rel).parent.mkdir(parents=True, exist_ok=True)
        path.copy(target / rel)
      self.step_dir(step).rmtree()
    self.forget(step)

  def oldest_to_keep(self, steps: Iterable[int], keep: int) -> Optional[int]:
    """The oldest of the newest `keep` verifying steps, or None when fewer verify.

    Retention deletes only steps older than it: damaged steps do not count, so the last verifying
    steps are never deleted in their favour, and with fewer than `keep` nothing is deleted.
    """
    good = 0
    for step in sorted(steps, reverse=True):  # Newest first; older steps need no verdict.
      good += not self.verify_cached(step)
      if good == keep:
        return step
    return None

  def newest_verified(self, steps: Iterable[int]) -> Optional[int]:
    """The newest of `steps` that verifies in full, or None; warns about each newer damaged one."""
    for step in sorted(steps, reverse=True):
      problems = self.verify(step)
      if not problems:
        return step
      logging.warning("Skipping checkpoint step %d in %s: damaged or incomplete: %s", step,
                      self.directory, summarise(problems))
    return None
