"""Continual pre-training across modality stages: InvCoSS and the comparison methods of Table 1.

sequence.py (the sequence and each stage's training, on the trainer core; the `continual` job is
invcoss_jax/jobs/continual.py), stages.py (stage plan and workdir
layout), step.py (the composite train step), streams.py (current and buffer data per step), losses.py,
buffers.py (er / medcoss buffers), ewc.py, packnet.py, params.py (hand-over), stage_end.py (what a stage
leaves behind), guard.py (the data-free guard), methods/ (the registry of methods, one module each: what a
stage keeps and replays, the method's loss terms and teacher). See docs/continual.md.
"""
