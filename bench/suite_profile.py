"""Where the test suite's time goes: a pytest plugin that records each test's CPU, and a report.

Record (every pytest-xdist worker appends one JSON line per test to DIR/<worker>.jsonl):

  DYNROUTE_SUITE_PROFILE=/tmp/suite PYTHONPATH=bench .venv/bin/python -m pytest -p suite_profile \
      -n auto --dist loadgroup -q tests

Report (CPU per test file and the 25 most expensive tests):

  python bench/suite_profile.py /tmp/suite

Per test: the worker's own CPU (user + system), the CPU of the subprocesses it waited for
(`RUSAGE_CHILDREN`), the wall time, and JAX's own durations over the test (`jax.monitoring`:
tracing, lowering to MLIR, XLA compiles, persistent-cache reads). On 2 workers the suite's wall
time is at least half its CPU time, so CPU is what to cut. A fixture's cost goes to the first test
that needs it.
"""

from __future__ import annotations

import collections
import json
import os
import pathlib
import resource
import sys
import time

import pytest

import _timing

ENV_VAR = "DYNROUTE_SUITE_PROFILE"
HOST = _timing.host()  # Recorded with every test: a time means little without the processor.
# jax.monitoring duration events kept, by short name.
EVENTS = {"/jax/core/compile/jaxpr_trace_duration": "trace",
          "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower",
          "/jax/core/compile/backend_compile_duration": "compile",
          "/jax/compilation_cache/cache_retrieval_time_sec": "cache_read"}

_totals: collections.Counter = collections.Counter()
_listening = False


def _listen() -> None:
  """Sums JAX's compile-path durations (and counts them) from the first test on."""
  global _listening
  if _listening:
    return
  from jax import monitoring  # pylint: disable=g-import-not-at-top

  def on_duration(event: str, seconds: float, **_) -> None:
    if event in EVENTS:
      _totals[EVENTS[event]] += seconds
      _totals["n_" + EVENTS[event]] += 1

  monitoring.register_event_duration_secs_listener(on_duration)
  _listening = True


def _cpu() -> tuple[float, float]:
  me, children = (resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
  return me.ru_utime + me.ru_stime, children.ru_utime + children.ru_stime


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):  # pylint: disable=unused-argument
  out_dir = os.environ.get(ENV_VAR)
  if not out_dir:
    yield
    return
  _listen()
  before, (own, children), start = dict(_totals), _cpu(), time.time()
  yield
  own2, children2 = _cpu()
  jax_s = {k: round(v - before.get(k, 0), 3) for k, v in _totals.items() if v != before.get(k, 0)}
  row = dict(id=item.nodeid, host=HOST, start=start, wall=time.time() - start, self=own2 - own,
             children=children2 - children, jax=jax_s)
  path = pathlib.Path(out_dir)
  path.mkdir(parents=True, exist_ok=True)
  with open(path / f"{os.environ.get('PYTEST_XDIST_WORKER', 'main')}.jsonl", "a") as f:
    f.write(json.dumps(row) + "\n")


def report(out_dir: str) -> str:
  """The table of CPU per test file and of the most expensive tests."""
  rows = [json.loads(line) for p in sorted(pathlib.Path(out_dir).glob("*.jsonl"))
          for line in p.read_text().splitlines()]
  if not rows:
    return f"no records in {out_dir}"
  cpu = lambda r: r["self"] + r["children"]
  hosts = sorted({r.get("host", "host not recorded") for r in rows})
  lines = [f"on {' and '.join(hosts)}: {len(rows)} tests, "
           f"{sum(map(cpu, rows)) / 60:.1f} CPU-minutes "
           f"({sum(r['self'] for r in rows):.0f} s in the workers, "
           f"{sum(r['children'] for r in rows):.0f} s in subprocesses)",
           f"{'CPU s':>7} {'own':>7} {'trace':>6} {'lower':>6} {'compile':>7} {'n':>5}  file"]
  files: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
  for r in rows:
    f = files[r["id"].split("::")[0]]
    f["cpu"] += cpu(r)
    f["self"] += r["self"]
    for k in ("trace", "lower", "compile", "n_compile"):
      f[k] += r["jax"].get(k, 0)
  for name, f in sorted(files.items(), key=lambda kv: -kv[1]["cpu"]):
    lines.append(f"{f['cpu']:7.1f} {f['self']:7.1f} {f['trace']:6.1f} {f['lower']:6.1f} "
                 f"{f['compile']:7.1f} {f['n_compile']:5.0f}  {name}")
  lines.append(f"\n{'CPU s':>7} {'own':>7} {'wall':>6}  test")
  for r in sorted(rows, key=cpu, reverse=True)[:25]:
    lines.append(f"{cpu(r):7.1f} {r['self']:7.1f} {r['wall']:6.1f}  {r['id']}")
  return "\n".join(lines)


if __name__ == "__main__":
  if len(sys.argv) != 2:
    sys.exit(__doc__)
  print(report(sys.argv[1]))
