"""bench/gpu_suite.sh's bookkeeping, with a stand-in interpreter (no JAX, no GPU needed).

The stand-in echoes its arguments, so these tests check what the suite runs, how it reports a
failing or skipped step, and that every step lands in the results file; the figures themselves
need a GPU.
"""

import os
import re
import stat
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUITE = os.path.join(ROOT, "bench", "gpu_suite.sh")
STEPS = ["inference_r110_cond_on", "inference_r110_cond_off", "inference_drnet_s_cond_on",
         "inference_drnet_s_cond_off", "dispatch_cond_on", "train_step"]


def _run_suite(tmp_path, budget_s, fake_body='echo "fake: $*"', env=None):
  fake = tmp_path / "fake_python"
  fake.write_text(f"#!/usr/bin/env bash\n{fake_body}\n")
  fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
  results = tmp_path / "results.md"
  results.write_text("# Benchmark results\n")
  env = dict(os.environ if env is None else env, PYTHON=str(fake), RESULTS=str(results),
             SUITE_BUDGET_S=str(budget_s), TMPDIR=str(tmp_path))
  proc = subprocess.run(["bash", SUITE], capture_output=True, text=True, env=env, timeout=60)
  assert proc.returncode == 0, proc.stderr
  return results.read_text()


def _sections(text):
  """{step name: its fenced log} of the appended section."""
  return dict(re.findall(r"### (\S+)\n\n```\n(.*?)```", text, flags=re.S))


def test_every_step_lands_in_results(tmp_path):
  text = _run_suite(tmp_path, budget_s=470)
  assert text.startswith("# Benchmark results\n")  # appended, nothing already there lost
  assert "## GPU suite, " in text
  sections = _sections(text)
  assert list(sections) == STEPS
  # Each model runs in its own process under each flag setting.
  r110_on = sections["inference_r110_cond_on"]
  assert "--xla_gpu_enable_command_buffer=+CONDITIONAL,+WHILE" in r110_on
  assert "--models r110 --batch 32 256 1024" in r110_on and "drnet_s" not in r110_on
  assert "+CONDITIONAL" not in sections["inference_drnet_s_cond_off"]
  assert "fake: bench/train_step.py --models drnet_S" in sections["train_step"]


def test_compiles_are_real_and_on_the_gpu(tmp_path):
  """JAX's persistent compilation cache is off (compile times are real); the platform is CUDA."""
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(tmp_path / "cache"))
  env.pop("JAX_PLATFORMS", None)
  text = _run_suite(tmp_path, 470, 'echo "cache=$DYNROUTE_JAX_CACHE platforms=$JAX_PLATFORMS '
                    'dir=${JAX_COMPILATION_CACHE_DIR:-unset}"', env=env)
  assert "cache=off platforms=cuda dir=unset" in _sections(text)["dispatch_cond_on"]


def test_failing_step_is_reported_and_the_rest_still_run(tmp_path):
  body = 'echo partial; case "$*" in *dispatch.py*) exit 3;; esac'
  sections = _sections(_run_suite(tmp_path, budget_s=470, fake_body=body))
  assert "(exit status" not in sections["inference_r110_cond_on"]
  assert "(exit status 3)" in sections["dispatch_cond_on"]
  assert "partial" in sections["dispatch_cond_on"]  # its output up to the failure is kept
  assert "(exit status" not in sections["train_step"]


def test_spent_budget_skips_steps_but_still_writes_the_section(tmp_path):
  sections = _sections(_run_suite(tmp_path, budget_s=10))
  assert list(sections) == STEPS
  assert all("skipped: the suite's 10 s budget is spent" in log for log in sections.values())
