"""Work directories through etils.epath: the calls a gs:// bucket takes, run on local paths."""

from __future__ import annotations

import json

from etils import epath
import numpy as np
import pytest

from dynroute_jax import plots
from dynroute_jax import train


@pytest.mark.parametrize("as_epath", [False, True])
def test_workdir_helpers_take_str_and_epath(tiny_config, tmp_path, as_epath):
  workdir = tmp_path / "a" / "b"  # Parents are created too.
  wd = epath.Path(workdir) if as_epath else str(workdir)
  train._prepare_workdir(wd)
  assert workdir.is_dir() and not list(workdir.iterdir())  # The write probe is removed.
  config = tiny_config("drnet")
  train._save_config(config, wd)
  saved = json.loads((workdir / "config.json").read_text())
  assert saved["model"] == json.loads(config.to_json_best_effort())["model"]
  assert not (workdir / "config.json.tmp").exists()
  assert train._check_config_json(config, wd)["model"] == saved["model"]
  with pytest.raises(ValueError, match="holds a run of another model"):
    train._check_config_json(tiny_config("codinet"), wd)


def test_write_probe_failure_is_an_oserror_naming_the_workdir(tmp_path, monkeypatch):
  def fail(self, *args, **kwargs):
    raise PermissionError(13, "Permission denied")

  monkeypatch.setattr(type(epath.Path(tmp_path)), "write_text", fail)
  with pytest.raises(OSError, match=r"Cannot write to work directory .*Permission denied"):
    train._prepare_workdir(tmp_path / "w")


def test_plots_write_into_an_epath_directory(tmp_path):
  out = epath.Path(tmp_path) / "eval" / "figures"
  out.mkdir(parents=True)
  report = {"threshold": 0.5, "thresholds": {"0.5": {"run_ratio_per_block": [1.0, 0.5, 0.5]}}}
  path = plots.selection(report, out / "sel.png")
  assert path == str(tmp_path / "eval" / "figures" / "sel.png")
  assert (tmp_path / "eval" / "figures" / "sel.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
