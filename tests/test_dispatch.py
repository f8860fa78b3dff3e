"""Tests of dynroute_jax.dispatch: every strategy equals 'dense', and skipped work is not computed.

Also the strategy objects, the factory and config specs. One module (over 400 lines) because the
three parts share the test blocks, masks and the HLO and row-recording helpers.
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax import lax

from dynroute_jax import dispatch

SKIPPING = ("batch_cond", "per_example", "compact", "chunk")
ALL = ("dense",) + SKIPPING
DN = ("NHWC", "HWIO", "NHWC")
C = 3


def _normal(seed, shape):
  """Standard normal float32 values drawn on the host: an eager `jax.random.normal` compiles a
  random-number program per shape (about half a second each on a 2-core CPU)."""
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _w(seed, cin=C, cout=C):
  return 0.3 * _normal(seed, (3, 3, cin, cout))


def conv(x, w, stride=1):
  return lax.conv_general_dilated(x, w, (stride, stride), "SAME", dimension_numbers=DN)


W1, W2, W3, WS = _w(1), _w(2), _w(3), _w(4, C, 2 * C)


def res_block(x):
  return jax.nn.relu(x + conv(jax.nn.relu(conv(x, W1)), W2))


def down_block(x):
  """Stride 2, C -> 2C channels."""
  return jax.nn.relu(conv(x, WS, 2))


def down_shortcut(x):
  x = x[:, ::2, ::2, :]
  return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, C)))


MIX_FNS = (res_block, lambda x: conv(x, W3), lambda x: jnp.tanh(x) * 2.0)


def _masks(b, rng):
  """All run, none run, a single example, a random half (as distinct cases)."""
  single = np.zeros(b, bool)
  single[rng.integers(b)] = True
  return [np.ones(b, bool), np.zeros(b, bool), single, rng.random(b) < 0.5]


def _x(b, seed=0, hw=6):
  return _normal(seed, (b, hw, hw, C))


BATCHES = (1, 3, 8, 33)


@pytest.mark.parametrize("strategy", ALL)
def test_select_apply_identity_matches_reference(strategy):
  rng = np.random.default_rng(0)
  f = jax.jit(lambda x, r: dispatch.select_apply(res_block, x, r, None, strategy=strategy))
  for b in BATCHES:
    x = _x(b, b)
    full = res_block(x)
    for run in _masks(b, rng):
      want = np.where(run[:, None, None, None], full, x)
      np.testing.assert_allclose(f(x, run), want, rtol=1e-5, atol=1e-5, err_msg=f"B={b} {run}")


@pytest.mark.parametrize("strategy", ALL)
def test_select_apply_stride2_with_fallback(strategy):
  rng = np.random.default_rng(1)

  def routed(x, r):
    return dispatch.select_apply(down_block, x, r, down_shortcut(x), strategy=strategy)

  f = jax.jit(routed)
  for b in BATCHES:
    x = _x(b, b + 10)
    full, fb = down_block(x), down_shortcut(x)
    for run in _masks(b, rng):
      y = f(x, run)
      assert y.shape == (b, 3, 3, 2 * C)
      want = np.where(run[:, None, None, None], full, fb)
      np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5, err_msg=f"B={b} {run}")


@pytest.mark.parametrize("strategy", ALL)
def test_mix_branches_matches_reference(strategy):
  rng = np.random.default_rng(2)
  f = jax.jit(lambda x, w: dispatch.mix_branches(MIX_FNS, x, w, strategy=strategy))
  for b in BATCHES:
    x = _x(b, b + 20)
    outs = [np.asarray(fn(x)) for fn in MIX_FNS]
    raw = rng.random((b, 3))
    cases = [raw, np.zeros((b, 3)), raw * (rng.random((b, 3)) < 0.5),
             raw * (np.arange(3)[None, :] == rng.integers(3, size=(b, 1)))]
    for w in cases:
      w = w.astype(np.float32)
      want = sum(w[:, k, None, None, None] * outs[k] for k in range(3))
      np.testing.assert_allclose(f(x, w), want, rtol=1e-5, atol=1e-5, err_msg=f"B={b} {w}")


@pytest.mark.parametrize("opts", [
    dict(strategy="compact", buckets=3),
    dict(strategy="compact", buckets=(4, 16)),
    dict(strategy="compact", spacing="geometric"),
    dict(strategy="compact", branching="cond_chain"),
    dict(strategy="chunk", chunk=3),
    dict(strategy="chunk", chunk=8, tail_levels=0),
    dict(strategy="chunk", chunk=8, tail_levels=3),
    dict(strategy="chunk", chunk=64),
])
def test_options_match_reference(opts):
  rng = np.random.default_rng(3)
  f = jax.jit(lambda x, r: dispatch.select_apply(res_block, x, r, None, **opts))
  g = jax.jit(lambda x, w: dispatch.mix_branches(MIX_FNS, x, w, **opts))
  b = 33
  x = _x(b, 5)
  full = res_block(x)
  outs = [np.asarray(fn(x)) for fn in MIX_FNS]
  for p in (0.0, 0.1, 0.3, 0.6, 0.9, 1.0):
    run = rng.random(b) < p
    np.testing.assert_allclose(f(x, run), np.where(run[:, None, None, None], full, x),
                               rtol=1e-5, atol=1e-5)
    w = (rng.random((b, 3)) * (rng.random((b, 3)) < p)).astype(np.float32)
    want = sum(w[:, k, None, None, None] * outs[k] for k in range(3))
    np.testing.assert_allclose(g(x, w), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("strategy", ("per_example", "compact", "chunk"))
def test_pytree_input_and_output(strategy):
  b = 8
  x = {"a": _x(b, 7), "s": jnp.arange(b, dtype=jnp.float32)}

  def fn(t):
    return {"a": res_block(t["a"]), "s": t["s"] * 2.0}

  run = np.arange(b) % 3 == 0
  y = jax.jit(lambda x, r: dispatch.select_apply(fn, x, r, None, strategy=strategy))(x, run)
  np.testing.assert_allclose(y["s"], np.where(run, 2.0, 1.0) * np.arange(b))
  np.testing.assert_allclose(y["a"], np.where(run[:, None, None, None], res_block(x["a"]), x["a"]),
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("strategy", ALL)
def test_outputs_take_the_fallbacks_dtype_when_fn_returns_another(strategy):
  # Regression: a bfloat16 fn with a float32 fallback (or x) ran under 'dense' but raised in
  # every skipping strategy ("cond branches must have equal output types").
  b = 5
  x = 0.1 * jnp.arange(b * 2, dtype=jnp.float32).reshape(b, 2) + 0.013
  run = np.array([1, 0, 1, 0, 0], bool)

  def fn(t):
    return (2.0 * t + 1.0).astype(jnp.bfloat16)

  ran = np.asarray(fn(x).astype(jnp.float32))
  for fallback in (-x, None):
    y = jax.jit(lambda x, r, f: dispatch.select_apply(fn, x, r, f, strategy=strategy))(
        x, run, fallback)
    skipped = np.asarray(x if fallback is None else fallback)
    assert y.dtype == jnp.float32
    # The skipped rows are the fallback's float32 values exactly, not rounded through bfloat16.
    np.testing.assert_array_equal(y, np.where(run[:, None], ran, skipped))
  for b1 in range(2):  # batch 1, selected and not: the single-example cond
    y = jax.jit(lambda x, r: dispatch.select_apply(fn, x, r, None, strategy=strategy))(
        x[b1:b1 + 1], run[b1:b1 + 1])
    np.testing.assert_array_equal(y, np.where(run[b1:b1 + 1, None], ran[b1:b1 + 1], x[b1:b1 + 1]))


def test_validation():
  x, run = _x(4), jnp.ones(4, bool)
  with pytest.raises(ValueError, match="allowed: auto, dense, batch_cond, per_example, compact, chunk"):
    dispatch.select_apply(res_block, x, run, strategy="vmap")
  with pytest.raises(ValueError, match="allowed"):
    dispatch.mix_branches(MIX_FNS, x, jnp.ones((4, 3)), strategy="sparse")
  with pytest.raises(ValueError, match="shape"):
    dispatch.select_apply(res_block, x, jnp.ones(5, bool), strategy="chunk")
  with pytest.raises(ValueError, match="shape"):
    dispatch.mix_branches(MIX_FNS, x, jnp.ones((4, 2)), strategy="chunk")
  with pytest.raises(ValueError, match="output shape"):
    dispatch.mix_branches((res_block, down_block), x, jnp.ones((4, 2)), strategy="chunk")
  with pytest.raises(TypeError, match="unknown dispatch option"):
    dispatch.select_apply(res_block, x, run, strategy="chunk", chunks=4)
  # Another strategy's options are accepted and ignored (one config can carry both).
  dispatch.select_apply(res_block, x, run, strategy="compact", chunk=4)


def test_auto_and_defaults():
  assert dispatch.default_strategy("cpu", 256) == "chunk"
  assert dispatch.default_strategy("cpu", 1) == "batch_cond"
  assert dispatch.default_strategy("gpu", 8) == "dense"
  assert dispatch.default_strategy("gpu", 256) == "compact"
  assert dispatch.default_strategy("tpu", 256) == "compact"
  for b in (1, 256):
    assert dispatch.resolve_strategy("auto", b) == dispatch.default_strategy(jax.default_backend(), b)
  assert set(dispatch.STRATEGIES) == {"auto", "dense", "batch_cond", "per_example", "compact",
                                      "chunk"}
  assert dispatch.capacity_buckets(256) == (32, 64, 96, 128, 160, 192, 224, 256)
  assert dispatch.capacity_buckets(3, 8) == (1, 2, 3)
  x = _x(3)
  run = np.array([True, False, True])
  np.testing.assert_allclose(
      jax.jit(lambda x, r: dispatch.select_apply(res_block, x, r, strategy="auto"))(x, run),
      np.where(run[:, None, None, None], res_block(x), x), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# Strategy objects, the factory and configs.
# ------------------------------------------------------------------------------------------------


def test_strategy_names_are_the_classes():
  assert dispatch.STRATEGIES == ("auto", "dense", "batch_cond", "per_example", "compact", "chunk")
  classes = (dispatch.Auto, dispatch.Dense, dispatch.BatchCond, dispatch.PerExample,
             dispatch.Compact, dispatch.Chunk)
  assert tuple(cls.name for cls in classes) == dispatch.STRATEGIES
  for cls in classes:
    s = cls()
    assert isinstance(s, dispatch.Strategy)
    assert hash(s) == hash(cls()) and s == cls()  # frozen: usable as a static (jit, Flax) field
    assert dispatch.make_strategy(cls.name) == s
  with pytest.raises(dataclasses.FrozenInstanceError):
    dispatch.Chunk().chunk = 4


@pytest.mark.parametrize("spec, want", [
    ("dense", dispatch.Dense()),
    (dict(name="chunk", chunk=64), dispatch.Chunk(chunk=64)),
    (dict(name="compact", buckets=[4, 16], branching="cond_chain"),
     dispatch.Compact(buckets=(4, 16), branching="cond_chain")),
    # Options of another strategy are accepted and ignored; 'auto' hands each its own.
    (dict(name="compact", chunk=4), dispatch.Compact()),
    (dict(name="auto", chunk=4, spacing="geometric"),
     dispatch.Auto(compact=dispatch.Compact(spacing="geometric"), chunk=dispatch.Chunk(chunk=4))),
    (dispatch.Chunk(chunk=3), dispatch.Chunk(chunk=3)),
])
def test_make_strategy(spec, want):
  assert dispatch.make_strategy(spec) == want
  if isinstance(spec, dict):
    assert dispatch.from_config(ml_collections.ConfigDict(spec)) == want
    options = dict(spec)
    name = options.pop("name")
    assert dispatch.make_strategy(name, **options) == want


def test_resolve_auto():
  assert dispatch.resolve("auto", 256, "cpu") == dispatch.Chunk()
  assert dispatch.resolve("auto", 1, "cpu") == dispatch.BatchCond()
  assert dispatch.resolve("auto", 256, "gpu", buckets=4) == dispatch.Compact(buckets=4)
  auto = dispatch.Auto(compact=dispatch.Compact(buckets=4), chunk=dispatch.Chunk(chunk=16))
  assert auto.resolve(256, "cpu") == dispatch.Chunk(chunk=16)
  assert auto.resolve(256, "tpu") == dispatch.Compact(buckets=4)
  assert auto.resolve(8, "gpu") == dispatch.Dense()
  assert dispatch.Chunk(chunk=16).resolve(256, "gpu") == dispatch.Chunk(chunk=16)
  assert dispatch.resolve_strategy(auto, 8, "gpu") == "dense"
  for b in (1, 256):
    assert dispatch.resolve(dict(name="auto"), b).name == dispatch.default_strategy(
        jax.default_backend(), b)
  # A name resolves before its options are built: the options of the strategy not picked are
  # never looked at (as with keywords before strategies were objects).
  assert dispatch.resolve("auto", 256, "gpu", chunk=0) == dispatch.Compact()


@pytest.mark.parametrize("spec, error, match", [
    (dict(name="sparse"), ValueError, "allowed: auto, dense, batch_cond, per_example, compact"),
    (dict(chunk=4), ValueError, r"needs a 'name', one of \('auto', 'dense'"),
    (dict(name="chunk", chunks=4), TypeError, r"unknown dispatch option\(s\) \['chunks'\]; known: "
     r"\['branching', 'buckets', 'chunk', 'spacing', 'tail_levels'\]"),
    (dict(name="chunk", chunk=0), ValueError, "chunk must be >= 1; got 0"),
    (dict(name="chunk", chunk="8"), ValueError, "chunk must be an int >= 1 or None; got '8'"),
    (dict(name="chunk", tail_levels=1.5), ValueError, "tail_levels must be an int; got 1.5"),
    (dict(name="compact", buckets=0), ValueError, "buckets must be >= 1; got 0"),
    (dict(name="compact", buckets=(4, 0)), ValueError, "buckets must be >= 1; got 0"),
    (dict(name="compact", spacing="log"), ValueError, "spacing must be 'linear' or 'geometric'"),
    (dict(name="compact", branching="if"), ValueError, "branching must be 'switch' or 'cond_chain'"),
    (dict(name="auto", buckets=-1), ValueError, "buckets must be >= 1"),
])
def test_bad_specs_name_the_field_and_the_allowed_values(spec, error, match):
  with pytest.raises(error, match=match):
    dispatch.make_strategy(spec)
  # From a config, every error is a ValueError that names the config field.
  with pytest.raises(ValueError, match="^config.eval.dispatch: .*" + match):
    dispatch.from_config(spec)


def test_describe_and_option_defaults():
  assert dispatch.option_defaults() == dict(buckets=8, spacing="linear", branching="switch",
                                            chunk=None, tail_levels=2)
  assert dispatch.describe("chunk") == "chunk"
  assert dispatch.describe(dispatch.Chunk(chunk=4)) == "chunk(chunk=4)"
  assert (dispatch.describe(dict(name="compact", buckets=16, branching="cond_chain"))
          == "compact(buckets=16, branching='cond_chain')")
  assert dispatch.describe(dict(name="auto", chunk=4)) == "auto(chunk=4)"
  # Every default spelled out is the default strategy.
  assert dispatch.make_strategy(dict(name="auto", **dispatch.option_defaults())) == dispatch.Auto()


@pytest.mark.parametrize("spec", [5, None, ("chunk",)])
def test_a_spec_that_is_neither_name_mapping_nor_object(spec):
  with pytest.raises(ValueError, match="a dispatch strategy is a name, one of"):
    dispatch.make_strategy(spec)


def test_check_name_and_misuse():
  assert dispatch.check_name("chunk") == "chunk"
  with pytest.raises(ValueError, match=re.escape(
      f"--strategy must be one of {dispatch.STRATEGIES}; got 'fast'.")):
    dispatch.check_name("fast", "--strategy")
  with pytest.raises(ValueError, match="strategy must be one of"):
    dispatch.check_name(dispatch.Chunk())
  with pytest.raises(TypeError, match="options go inside the strategy object"):
    dispatch.make_strategy(dispatch.Chunk(), chunk=4)
  with pytest.raises(TypeError, match="options go inside the mapping"):
    dispatch.make_strategy(dict(name="chunk"), chunk=4)
  with pytest.raises(ValueError, match="Auto.chunk must be a Chunk"):
    dispatch.Auto(chunk=4)
  x, run = _x(4), jnp.ones(4, bool)
  with pytest.raises(TypeError, match="options go inside the strategy object"):
    dispatch.select_apply(res_block, x, run, strategy=dispatch.Chunk(), chunk=4)


@pytest.mark.parametrize("name, opts, obj", [
    ("dense", {}, dispatch.Dense()),
    ("per_example", {}, dispatch.PerExample()),
    ("compact", dict(buckets=4, branching="cond_chain"),
     dispatch.Compact(buckets=4, branching="cond_chain")),
    ("chunk", dict(chunk=8, tail_levels=1), dispatch.Chunk(chunk=8, tail_levels=1)),
])
def test_objects_and_mappings_compile_to_what_names_do(name, opts, obj):
  """A name with keywords, a mapping and an object are one strategy: the same compiled program."""
  x = jax.ShapeDtypeStruct((16, 8, 8, C), jnp.float32)
  run = jax.ShapeDtypeStruct((16,), jnp.bool_)
  w = jax.ShapeDtypeStruct((16, 3), jnp.float32)

  def hlo(**kw):
    sel = jax.jit(lambda x, r: dispatch.select_apply(res_block, x, r, None, **kw))
    mix = jax.jit(lambda x, w: dispatch.mix_branches(MIX_FNS, x, w, **kw))
    return sel.lower(x, run).as_text(), mix.lower(x, w).as_text()

  want = hlo(strategy=name, **opts)
  assert hlo(strategy=obj) == want
  assert hlo(strategy=dict(name=name, **opts)) == want


# ------------------------------------------------------------------------------------------------
# Skipped work is not computed: compiled HLO and instrumented runs.
# ------------------------------------------------------------------------------------------------


def _computations(hlo: str) -> dict[str, str]:
  """Splits HLO module text into {computation name: body}; the entry is named 'ENTRY'."""
  comps, name, lines = {}, None, []
  for line in hlo.splitlines():
    m = re.match(r"^(ENTRY )?%?([\w.\-]+) .*\{$", line)
    if m and not line.startswith(" "):
      name, lines = ("ENTRY" if m.group(1) else m.group(2)), []
    elif line.startswith("}") and name is not None:
      comps[name] = "\n".join(lines)
      name = None
    elif name is not None:
      lines.append(line)
  return comps


def _conv_batches(text: str) -> list[int]:
  """Batch sizes of the f32 convolutions (outputs f32[n,h,w,c]) in HLO text."""
  return [int(n) for n in re.findall(r"= f32\[(\d+),\d+,\d+,\d+\]\{[^}]*\} convolution\(", text)]


def _compiled(strategy, b, **opts):
  x = jax.ShapeDtypeStruct((b, 8, 8, C), jnp.float32)
  run = jax.ShapeDtypeStruct((b,), jnp.bool_)
  f = jax.jit(lambda x, r: dispatch.select_apply(res_block, x, r, None, strategy=strategy, **opts))
  return f.lower(x, run).compile().as_text()


def test_hlo_dense_has_full_batch_convs():
  # Checks the HLO parsing on the reference: two full-batch convolutions, no control flow.
  hlo = _compiled("dense", 64)
  assert sorted(_conv_batches(hlo)) == [64, 64]
  assert "conditional(" not in hlo and "while(" not in hlo


def test_hlo_chunk_runs_only_chunk_sized_convs():
  """Chunks of 8 rows and a tail in grains of 2, nothing else (two copies of the function besides
  the whole batch); the whole batch only in the branch taken when every row is selected (no
  gather, scatter or loop then), never in a loop or unconditionally."""
  hlo = _compiled("chunk", 64, chunk=8, tail_levels=2)
  assert "while(" in hlo and "conditional(" in hlo
  comps = _computations(hlo)
  assert not _conv_batches(comps["ENTRY"])
  full = [name for name, body in comps.items() if 64 in _conv_batches(body)]
  assert len(full) == 1, full
  assert set(_conv_batches(comps[full[0]])) == {64}
  # That computation is a branch of a conditional, and no loop body reaches it.
  assert re.search(rf"branch_computations=\{{[^}}]*%{re.escape(full[0])}\b", hlo), full
  assert not re.search(rf"body=%{re.escape(full[0])}\b", hlo)
  rest = [n for body in comps.values() for n in _conv_batches(body) if n != 64]
  assert sorted(rest) == [2, 2, 8, 8], rest  # Two convolutions per copy.


def test_hlo_compact_convs_only_inside_conditional_branches():
  hlo = _compiled("compact", 64, buckets=4)
  assert "conditional(" in hlo
  comps = _computations(hlo)
  assert not _conv_batches(comps["ENTRY"]), "a convolution runs unconditionally"
  # One copy of the block per capacity bucket; the full batch only in the last bucket's branch.
  assert set(_conv_batches(hlo)) == {16, 32, 48, 64}


def test_hlo_per_example_and_batch_cond():
  hlo = _compiled("per_example", 16)
  assert "while(" in hlo and "conditional(" in hlo
  assert set(_conv_batches(hlo)) == {1}
  hlo = _compiled("batch_cond", 16)
  assert "conditional(" in hlo
  assert not _conv_batches(_computations(hlo)["ENTRY"])


@pytest.mark.parametrize("opts", [dict(strategy="chunk"),
                                  dict(strategy="compact", branching="cond_chain")])
def test_hlo_identity_updates_in_place(opts):
  """No full-batch copy of the activations: the selected rows are overwritten in place.

  Checked on a residual stack under lax.scan with the input donated (as an intermediate of a model
  would be). Guards against regressions that add a full-batch memory pass per routed site.
  """
  b, n = 32, 3
  x = jax.ShapeDtypeStruct((b, 8, 8, C), jnp.float32)
  run = jax.ShapeDtypeStruct((n, b), jnp.bool_)

  def stack(x, run):
    def body(h, r):
      return dispatch.select_apply(res_block, h, r, None, **opts), None
    return lax.scan(body, x, run)[0]

  hlo = jax.jit(stack, donate_argnums=0).lower(x, run).compile().as_text()
  assert not re.findall(r"f32\[32,8,8,3\]\{[^}]*\} copy\(", hlo)


def test_hlo_compact_switch_is_one_conditional():
  hlo = _compiled("compact", 64, buckets=4, branching="switch")
  assert len(re.findall(r" conditional\(", hlo)) == 1, "one switch per site"
  assert "branch_computations" in hlo


class _Recorder:
  """Host-side log of the rows each instrumented function really processed."""

  def __init__(self):
    self.calls = []  # (tag, number of rows, ids of real rows)

  def wrap(self, fn, tag):
    """fn instrumented: channel 0 of pixel (0, 0) carries 1 + example id for a real row, and 0 for
    padding (unselected rows and zero rows past the batch are given id 0 by the test's input)."""

    def report(ids):
      ids = np.asarray(ids)
      self.calls.append((tag, len(ids), sorted(int(round(i)) - 1 for i in ids if i > 0.5)))

    def wrapped(x):
      jax.debug.callback(report, x[:, 0, 0, 0])
      return fn(x)

    return wrapped

  def rows(self, tag=None):
    return sorted(i for t, _, ids in self.calls if tag in (None, t) for i in ids)

  def computed(self, tag=None):
    return sum(n for t, n, _ in self.calls if tag in (None, t))

  def ncalls(self, tag=None):
    return sum(1 for t, _, _ in self.calls if tag in (None, t))


def _marked(x, mask):
  """Writes 1 + id into the marker of selected rows and 0 into the others."""
  ids = jnp.where(jnp.asarray(mask), jnp.arange(x.shape[0]) + 1.0, 0.0)
  return x.at[:, 0, 0, 0].set(ids)


@pytest.mark.parametrize("strategy", ALL)
def test_select_apply_processes_exactly_the_selected_rows(strategy):
  rng = np.random.default_rng(4)
  rec = _Recorder()
  fn = rec.wrap(res_block, "f")
  f = jax.jit(lambda x, r: dispatch.select_apply(fn, x, r, None, strategy=strategy, chunk=8))
  for b in (1, 8, 33):
    for run in _masks(b, rng) + [rng.random(b) < 0.25]:
      rec.calls.clear()
      jax.block_until_ready(f(_marked(_x(b, 3), run), run))
      jax.effects_barrier()
      selected = list(np.flatnonzero(run))
      count = len(selected)
      if strategy == "dense":
        assert rec.computed() == b
        continue
      if strategy == "batch_cond":
        assert rec.computed() == (b if count else 0)
        continue
      # Every selected row was processed exactly once.
      assert rec.rows() == selected, (b, run)
      if strategy == "per_example":
        assert rec.ncalls() == count and rec.computed() == count
      elif strategy == "compact":
        caps = dispatch.capacity_buckets(b, 8)
        assert rec.computed() == (min(c for c in caps if c >= count) if count else 0)
      elif strategy == "chunk":
        # chunk 8 with two tail levels: rows processed in grains of 2 (b = 1: a single cond); with
        # every row selected, the batch as it is, in one call.
        if count == b:
          assert rec.ncalls() == 1 and rec.computed() == b
        else:
          assert rec.computed() == -(-count // 2) * 2, (b, count)


@pytest.mark.parametrize("opts", [dict(strategy="chunk", chunk=8, tail_levels=0),
                                  dict(strategy="chunk", chunk=4),
                                  dict(strategy="compact", buckets=3)])
def test_padding_rows_are_unselected_rows_of_the_batch(opts):
  """Padding slots read real unselected rows, never rows past the end of the batch.

  So the gather needs no zero fill (on XLA:CPU a select over every gathered element). Chunks of 8
  with no tail run past the end of a batch of 10 for any count above 8.
  """
  rng = np.random.default_rng(6)
  rec = _Recorder()
  f = jax.jit(lambda x, r: dispatch.select_apply(rec.wrap(res_block, "f"), x, r, None, **opts))
  b = 10
  x = _x(b, 3).at[:, 0, 0, 0].set(jnp.arange(b) + 1.0)  # every row carries 1 + its id
  for count in range(1, b):
    run = np.zeros(b, bool)
    run[rng.permutation(b)[:count]] = True
    rec.calls.clear()
    jax.block_until_ready(f(x, run))
    jax.effects_barrier()
    for _, n, ids in rec.calls:
      assert n == len(ids), (count, n, ids)  # no zero row: every processed row is a batch row
    # Each selected row once; every other processed row (padding) is an unselected one.
    assert [i for i in rec.rows() if run[i]] == list(np.flatnonzero(run)), count


@pytest.mark.parametrize("strategy", SKIPPING)
def test_mix_branches_processes_exactly_the_kept_rows(strategy):
  rng = np.random.default_rng(5)
  rec = _Recorder()
  fns = [rec.wrap(f, k) for k, f in enumerate(MIX_FNS)]
  f = jax.jit(lambda x, w: dispatch.mix_branches(fns, x, w, strategy=strategy, chunk=4))
  b = 33
  x = _x(b, 9)
  for p in (0.0, 0.2, 0.6, 1.0):
    w = (rng.random((b, 3)) * (rng.random((b, 3)) < p)).astype(np.float32)
    for k in range(3):
      rec.calls.clear()
      # Mark only the rows that kept branch k; read branch k's log.
      jax.block_until_ready(f(_marked(x, w[:, k] > 0), w))
      jax.effects_barrier()
      kept = list(np.flatnonzero(w[:, k] > 0))
      if strategy == "batch_cond":
        assert rec.computed(k) == (b if kept else 0)
        continue
      assert rec.rows(k) == kept
      if strategy == "per_example":
        assert rec.ncalls(k) == len(kept)
      elif strategy == "chunk":
        assert rec.computed(k) == len(kept)  # chunk 4, tails 2 and 1: grain 1, no padding
      else:
        assert rec.computed(k) >= len(kept)


def test_vmap_of_cond_computes_both_branches():
  """The trap the dispatcher avoids: under vmap a cond becomes a select and both branches run."""
  calls = []

  def expensive(x):
    jax.debug.callback(lambda v: calls.append(np.asarray(v).shape), x)
    return x * 2.0

  def per_example(x, r):
    return lax.cond(r, expensive, lambda v: v, x)

  x = jnp.ones((4, 2))
  run = jnp.array([False, False, False, False])
  jaxpr = str(jax.make_jaxpr(jax.vmap(per_example))(x, run))
  assert "select_n" in jaxpr and "cond[" not in jaxpr
  jax.block_until_ready(jax.jit(jax.vmap(per_example))(x, run))
  jax.effects_barrier()
  assert calls, "vmap(cond) ran the untaken branch"
  calls.clear()
  # The dispatcher's per-example strategy (lax.map + cond) runs nothing here.
  jax.block_until_ready(jax.jit(lambda x, r: dispatch.select_apply(
      lambda v: expensive(v), x, r, None, strategy="per_example"))(x, run))
  jax.effects_barrier()
  assert not calls
