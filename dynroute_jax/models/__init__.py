"""The routed models and their registry: `config.model.name` -> a builder from the config's model section.

A new routed model adds its own module here (a Flax module implementing `base.RoutedModel`, and a
`from_config`) and one line to `REGISTRY`.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn

from dynroute_jax.models import codinet
from dynroute_jax.models import drnet

REGISTRY: dict[str, Callable[[Any], nn.Module]] = {
    "drnet": drnet.from_config,
    "codinet": codinet.from_config,
}
MODEL_NAMES = tuple(REGISTRY)


def build_model(model_config: Any) -> nn.Module:
  """Validates the config's `model` section and builds the Flax module it names; nothing is compiled."""
  name = model_config.get("name")
  if name not in REGISTRY:
    raise ValueError(f"config.model.name must be one of {MODEL_NAMES}; got {name!r}.")
  return REGISTRY[name](model_config)
