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


def test_a_resume_with_changed_settings_keeps_the_earlier_config(tiny_config, tmp_path, caplog):
  # Regression: a resume with other settings overwrote config.json, losing the record of how the
  # steps before it were trained.
  config = tiny_config("drnet")
  train._save_config(config, tmp_path)
  train._save_config(config, tmp_path)  # The same config again: nothing to keep.
  assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]
  earlier = (tmp_path / "config.json").read_text()
  changed = config.copy_and_resolve_references()
  changed.train.stage2.steps += 3
  with caplog.at_level("WARNING"):
    train._save_config(changed, tmp_path)
  kept = [p for p in tmp_path.iterdir() if p.name not in ("config.json",)]
  assert len(kept) == 1 and kept[0].name.startswith("config.") and kept[0].suffix == ".json"
  assert kept[0].read_text() == earlier
  assert json.loads((tmp_path / "config.json").read_text())["train"]["stage2"]["steps"] == (
      config.train.stage2.steps + 3)
  assert "differs from" in caplog.text and "train.stage2.steps" in caplog.text


def test_a_resume_may_not_move_its_checkpoint_into_another_stage(tiny_config, tmp_path):
  from dynroute_jax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  from dynroute_jax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  with ckpt_lib.Checkpointer(str(tmp_path), async_save=False) as ckpt:
    ckpt.save(3, params={"w": np.zeros(2, np.float32)}, meta={"stage": 1})
    ckpt.save(6, params={"w": np.zeros(2, np.float32)}, meta={"stage": 2})
    plan = lambda s1, s2: train.plan_stages(
        tiny_config("drnet", stage1_steps=s1, stage2_steps=s2), 1000)
    for step, s1, s2 in ((3, 4, 2), (6, 4, 2), (3, 8, 2), (6, 4, 9)):  # Same or lengthened.
      workdir_lib.check_resume_stage(ckpt, step, plan(s1, s2))
    with pytest.raises(ValueError, match=r"step 3: it was saved in stage 1, but .* put step 3 in "
                                         r"stage 2\. Resume with the stage lengths"):
      workdir_lib.check_resume_stage(ckpt, 3, plan(2, 4))
    with pytest.raises(ValueError, match=r"step 6: .*in no stage \(this config ends training at "
                                         r"step 5\)"):
      workdir_lib.check_resume_stage(ckpt, 6, plan(4, 1))
