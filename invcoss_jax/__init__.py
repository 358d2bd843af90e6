"""InvCoSS in JAX: inversion-driven continual self-supervised pre-training for medical images."""

__version__ = "0.1.0"
