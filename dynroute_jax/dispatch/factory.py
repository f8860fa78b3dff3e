"""Strategies from names, keyword options and config mappings; the one list of strategy names.

  make_strategy("chunk", chunk=64)            == Chunk(chunk=64)
  make_strategy(dict(name="chunk", chunk=64)) == Chunk(chunk=64)
  from_config(dict(name="chunk", chunk=64))   the same from a ConfigDict or a dict
  resolve("auto", 256, "cpu")                 == Chunk(): the concrete strategy that runs
  describe(Compact(buckets=16))               'compact(buckets=16)': for reports and logs

Options of other strategies than the named one are accepted and ignored, so that one config (or one
set of keywords) can carry the options of both 'compact' and 'chunk'; 'auto' hands each its own.
Unknown option names raise TypeError (as an unknown keyword argument does).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax

from dynroute_jax.dispatch import strategies

Strategy = strategies.Strategy

# Every strategy name, in the documented order: what configs, flags and model arguments accept.
STRATEGIES: tuple[str, ...] = tuple(cls.name for cls in strategies.CLASSES)
_BY_NAME = {cls.name: cls for cls in strategies.CLASSES}
# The options of each concrete strategy: its dataclass fields.
_OPTIONS = {cls.name: tuple(f.name for f in dataclasses.fields(cls))
            for cls in strategies.CLASSES if cls is not strategies.Auto}
_KNOWN_OPTIONS = sorted({name for names in _OPTIONS.values() for name in names})

StrategySpec = str | Mapping[str, Any] | Strategy


def check_name(name: Any, field: str = "strategy") -> str:
  """`name` if it is one of STRATEGIES; else a ValueError naming `field` and the allowed names."""
  if not isinstance(name, str) or name not in STRATEGIES:
    raise ValueError(f"{field} must be one of {STRATEGIES}; got {name!r}.")
  return name


def _check_strategy_name(name: Any) -> str:
  if not isinstance(name, str) or name not in STRATEGIES:
    raise ValueError(f"Unknown dispatch strategy {name!r}; allowed: {', '.join(STRATEGIES)}.")
  return name


def _check_option_names(options: Mapping[str, Any]) -> None:
  unknown = set(options) - set(_KNOWN_OPTIONS)
  if unknown:
    raise TypeError(f"unknown dispatch option(s) {sorted(unknown)}; known: {_KNOWN_OPTIONS}.")


def _build(name: str, options: Mapping[str, Any]) -> Strategy:
  """The strategy `name` with the options it takes from `options` (checked names)."""
  if name == "auto":
    return strategies.Auto(compact=_build("compact", options), chunk=_build("chunk", options))
  return _BY_NAME[name](**{k: v for k, v in options.items() if k in _OPTIONS[name]})


def _name_and_options(spec: StrategySpec, options: Mapping[str, Any]
                      ) -> tuple[str, dict[str, Any]]:
  """Splits a name or a mapping `dict(name=..., **options)` plus keywords into name and options."""
  if isinstance(spec, str):
    name, options = spec, dict(options)
  elif not isinstance(spec, Mapping):
    raise ValueError(f"a dispatch strategy is a name, one of {STRATEGIES}, a mapping "
                     f"dict(name=..., **options) or a Strategy object; got {spec!r}.")
  else:
    if options:
      raise TypeError(f"options go inside the mapping; got {spec!r} and keywords {sorted(options)}.")
    options = dict(spec.items())
    if "name" not in options:
      raise ValueError(f"a dispatch mapping needs a 'name', one of {STRATEGIES}; got {spec!r}.")
    name = options.pop("name")
  _check_strategy_name(name)
  _check_option_names(options)
  return name, options


def make_strategy(spec: StrategySpec = "auto", **options: Any) -> Strategy:
  """A strategy object from a name and keyword options, a mapping, or a strategy object.

  Args:
    spec: one of STRATEGIES; a mapping `dict(name=..., **options)` (no keywords then); or a
      `Strategy`, returned as is (no keywords then).
    **options: 'compact': buckets, spacing, branching; 'chunk': chunk, tail_levels (see their
      dataclasses). Options of other strategies are ignored; 'auto' passes each its own.

  Raises:
    ValueError: an unknown strategy name or a bad option value (naming the field and the allowed
      values).
    TypeError: an unknown option name, or options given twice.
  """
  if isinstance(spec, Strategy):
    if options:
      raise TypeError(f"options go inside the strategy object; got {spec!r} and keywords "
                      f"{sorted(options)}.")
    return spec
  return _build(*_name_and_options(spec, options))


def option_defaults() -> dict[str, Any]:
  """Every strategy option with its default: the fields of `config.eval.dispatch`."""
  return {f.name: f.default for cls in strategies.CLASSES if cls is not strategies.Auto
          for f in dataclasses.fields(cls)}


def describe(spec: StrategySpec) -> str:
  """The strategy's name, with the options that differ from their defaults in brackets.

  'chunk' for `Chunk()`, "compact(buckets=16, branching='cond_chain')" for that object; 'auto'
  lists the options of its 'compact' and 'chunk' that differ.
  """
  s = make_strategy(spec)
  parts = (s.compact, s.chunk) if isinstance(s, strategies.Auto) else (s,)
  changed = [f"{f.name}={getattr(p, f.name)!r}" for p in parts for f in dataclasses.fields(p)
             if getattr(p, f.name) != f.default]
  return f"{s.name}({', '.join(changed)})" if changed else s.name


def from_config(config: Mapping[str, Any], field: str = "config.eval.dispatch") -> Strategy:
  """The strategy of a config mapping `dict(name=..., **options)` (a ConfigDict or a dict).

  Raises:
    ValueError: the mapping is not a valid strategy; the message starts with `field`.
  """
  items = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  try:
    return make_strategy(items)
  except (TypeError, ValueError) as e:
    raise ValueError(f"{field}: {e}") from e


def resolve(spec: StrategySpec = "auto", batch_size: int = 1, platform: str | None = None,
            **options: Any) -> Strategy:
  """The concrete strategy that runs at `batch_size` on `platform` (default: the default backend).

  For a name, 'auto' is resolved first and only the strategy picked is built, so the options of the
  other strategies are never looked at (as keywords to `select_apply` always were).
  """
  if isinstance(spec, str):
    name, options = _name_and_options(spec, options)
    if name == "auto":
      name = strategies.default_strategy(platform or jax.default_backend(), batch_size)
    return _build(name, options)
  return make_strategy(spec, **options).resolve(batch_size, platform)


def resolve_strategy(strategy: StrategySpec, batch_size: int, platform: str | None = None) -> str:
  """The name of `resolve(strategy, batch_size, platform)`: 'auto' mapped to the platform default."""
  return resolve(strategy, batch_size, platform).name
