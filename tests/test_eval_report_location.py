"""`evaluate` never replaces the training's eval/report.json with an older step's report."""

import json
import logging
import os

import pytest

from dynroute_jax import evaluate

from test_evaluate import init_variables, save_run, small_config  # pylint: disable=g-bad-import-order


def _flip_byte(step_dir):
  files = [os.path.join(r, f) for r, _, fs in os.walk(os.path.join(step_dir, "params")) for f in fs]
  path = max(files, key=os.path.getsize)
  with open(path, "r+b") as f:
    f.seek(os.path.getsize(path) // 2)
    b = f.read(1)
    f.seek(-1, os.SEEK_CUR)
    f.write(bytes([b[0] ^ 0x01]))


@pytest.mark.slow  # Three evaluations: about 2 minutes on a loaded 2-core machine.
def test_older_or_fallback_step_gets_its_own_report(tmp_path, caplog):
  workdir = str(tmp_path / "run")
  cfg = small_config()
  cfg.model.num_nodes = 1  # Where the reports go does not depend on the model's size.
  _, variables = init_variables(cfg)
  save_run(workdir, cfg, variables)  # Steps 3 and 5 (the newest).
  kwargs = dict(plots=False, instance_awareness=False, thresholds="0.8")
  main_report = os.path.join(workdir, "eval", "report.json")

  report = evaluate.evaluate_workdir(workdir, **kwargs)
  assert report["step"] == 5 and report["report_file"] == main_report
  with open(main_report, "rb") as f:
    newest_bytes = f.read()

  # The newest step is damaged: evaluate falls back to step 3, into eval/step_3/, and says so.
  _flip_byte(os.path.join(workdir, "checkpoints", "5"))
  with caplog.at_level(logging.WARNING):
    report = evaluate.evaluate_workdir(workdir, **kwargs)
  assert report["step"] == 3
  own = os.path.join(workdir, "eval", "step_3", "report.json")
  assert report["report_file"] == own
  with open(own) as f:
    assert json.load(f)["step"] == 3
  with open(main_report, "rb") as f:
    assert f.read() == newest_bytes  # The newest step's report is untouched.
  warnings = " ".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
  assert "Evaluating checkpoint step 3, not the newest checkpoint step 5" in warnings, warnings
  assert "does not verify" in warnings and "eval/step_3" in warnings
  assert not [n for n in os.listdir(workdir) if n.startswith(".eval_step_")]  # Moved into place.

  # An explicitly older step: the same place, replaced.
  report = evaluate.evaluate_workdir(workdir, step=3, **kwargs)
  assert report["report_file"] == own and os.path.exists(own)
  with open(main_report, "rb") as f:
    assert f.read() == newest_bytes
