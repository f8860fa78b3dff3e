"""dynroute_jax: dynamic routing networks (DRNet, CoDiNet) in JAX/Flax."""

__version__ = "0.1.0"


def restore(workdir, step=None):
  """Restores a training run for inference: see `dynroute_jax.inference.restore`.

  `clf = dynroute_jax.restore(workdir)`; `clf(images_uint8_BxHxWxC)` returns logits, executed MACs
  and the routing mask per example. Imported lazily so `import dynroute_jax` stays light.
  """
  from dynroute_jax import inference  # pylint: disable=g-import-not-at-top
  return inference.restore(workdir, step)
