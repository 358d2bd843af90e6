r"""Downstream evaluation (fine-tuning) of a pre-trained stage, and the forgetting study.

  # Fine-tune a stage on a task for seeds 0, 10, 100; writes results.json/.csv/.md (Table 1 layout):
  python -m invcoss_jax.main --config=configs/evaluate.py:chestxr \
      --config.init_from=workdirs/xray --config.evaluate.tasks.chestxr.data.path=/data/chestxr \
      --workdir=workdirs/eval_chestxr
  # Demo tasks on the embedded data (micro ViT, 8-pixel patches, as the ':demo' pre-training presets):
  python -m invcoss_jax.main --config=configs/evaluate.py:pneumonia --config.init_from=workdirs/xray_demo
  # Forgetting study: every stage of each continual run on every task, plotted like Fig. 6b:
  python -m invcoss_jax.main --config=configs/evaluate.py:forgetting \
      --config.evaluate.forgetting.runs='("InvCoSS=workdirs/invcoss", "SeqSSL=workdirs/seq")'

Presets: a task name (demo: pneumonia, hippocampus, ct_organs; paper: chestxr, qata, ricord, lits,
vs, la, nch, glas), optionally followed by ',linear' for a linear probe, or 'forgetting' (demo
tasks pneumonia and hippocampus). Paper tasks read your copy of the dataset: set
`--config.evaluate.tasks.<task>.data.path`. `init_from` empty trains from scratch (TFS).
"""

from invcoss_jax.defaults import base_config
from invcoss_jax.evaluate.config import DEMO_TASKS, PAPER_TASKS, task_config
from invcoss_jax.models.presets import demo_model_config



def get_config(arg=None):
  c = base_config()
  c.mode = "evaluate"
  preset, _, protocol = (arg or "pneumonia").partition(",")
  if protocol:
    if protocol not in ("finetune", "linear"):
      raise ValueError(f"configs/evaluate.py: protocol {protocol!r} in preset {arg!r}; expected "
                       "'finetune' or 'linear'")
    c.evaluate.protocol = protocol

  if preset == "forgetting":
    c.mode = "forgetting"
    c.model = demo_model_config()
    c.evaluate.forgetting.tasks = ("pneumonia", "hippocampus")
    for t in c.evaluate.forgetting.tasks:
      c.evaluate.tasks[t] = task_config(t)
    c.evaluate.task = "pneumonia"
  elif preset in DEMO_TASKS:
    c.model = demo_model_config()  # used when init_from is empty; a checkpoint brings its own
    c.evaluate.task = preset
    c.evaluate.tasks[preset] = task_config(preset)
  elif preset in PAPER_TASKS:
    c.evaluate.drop_path = 0.1  # MedCoSS fine-tunes with stochastic depth 0.1
    c.evaluate.task = preset
    c.evaluate.tasks[preset] = task_config(preset)
  else:
    raise ValueError(f"configs/evaluate.py: unknown preset {arg!r}; expected one of "
                     f"{DEMO_TASKS + PAPER_TASKS + ('forgetting',)} (optionally ',linear')")
  return c
