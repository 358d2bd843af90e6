"""noise: the control for invcoss. Everything of invcoss (set size, grey prior, statistics, distillation,
mixup, storage, `invert_with`) except the inversion: its set is the generator's output at initialisation, drawn
from the key inversion would start from (`inversion.engine.generator_at_init`; `inversion.json` says
`"optimised": false`). Whatever invcoss retains beyond noise is what the inversion contributes.

The whole method is this file: a subclass of invcoss's `Synthetic` that changes one declaration and checks
the option it needs, registered under the file's name (docs/continual.md, "Adding a method")."""

from invcoss_jax.config_checks import ConfigError
from invcoss_jax.continual import methods
from invcoss_jax.continual.methods.invcoss import Synthetic


class Noise(Synthetic):
  keeps = "statistics and the generator's output at initialisation"
  optimise = False

  def check(self, config):
    if str(config.inversion.generator) == "none":
      raise ConfigError("config.continual.method='noise' replays a generator's output at initialisation, but "
                        "config.inversion.generator='none' has no generator; pick invunet, cmi or cmi_large")


methods.register(Noise("noise"))
