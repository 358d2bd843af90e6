"""joint: every modality in every step of one stage, `stage_1_joint` (the upper bound of Table 1). Nothing
is retired, so the data-free guard is off; nothing is kept."""

from invcoss_jax.continual import methods


class Joint(methods.Method):
  keeps = "nothing (one stage over every modality)"
  sequential = False


methods.register(Joint("joint"))
