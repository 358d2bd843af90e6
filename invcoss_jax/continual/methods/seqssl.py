"""seqssl: sequential self-supervised pre-training with nothing kept and nothing replayed (the forgetting
baseline): each stage trains its task loss alone, starting from the previous stage's model."""

from invcoss_jax.continual import methods

methods.register(methods.Method("seqssl"))
