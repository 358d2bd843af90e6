r"""Multi-process entry point: starts JAX's distributed runtime, then runs `invcoss_jax.main` unchanged.

Every process of a job runs this same command; each one drives its local devices, reads its own share of
the data (the grain pipelines split examples by `jax.process_index()`) and takes part in every checkpoint
(orbax coordinates the processes; the workdir must be on storage all of them see).

  python launch/distributed_main.py --distributed=slurm --config=configs/xray.py --workdir=/shared/xray

--distributed:
  auto   SLURM with more than one task, or JAX_COORDINATOR_ADDRESS set: initialise; otherwise one process.
  slurm  jax.distributed.initialize() from SLURM's variables (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID,
         SLURM_STEP_NODELIST): one task per GPU, each task using GPU number SLURM_LOCALID of its node.
  tpu    jax.distributed.initialize() on a Cloud TPU VM pod slice (workers found from the TPU metadata).
  env    explicit: JAX_COORDINATOR_ADDRESS (host:port of process 0), JAX_NUM_PROCESSES, JAX_PROCESS_ID and
         optionally JAX_LOCAL_DEVICE_IDS (e.g. '0,1').
  none   a single process (all local devices).
"""

from __future__ import annotations

import os
import sys
from typing import Any, Mapping

# Run as a script (python launch/distributed_main.py): the package is the checkout's.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402

from invcoss_jax import main as invcoss_main  # noqa: E402  (defines --config and --workdir)

MODES = ("auto", "slurm", "tpu", "env", "none")
_DISTRIBUTED = flags.DEFINE_enum("distributed", "auto", MODES, "How the processes of the job find each other.")


def initialize_arguments(mode: str, environ: Mapping[str, str]) -> dict[str, Any] | None:
  """Keyword arguments for `jax.distributed.initialize` in `mode` given the environment, or None for a single
  process. Raises when `mode` asks for an environment that is not there."""
  if mode not in MODES:
    raise ValueError(f"--distributed={mode!r}: expected one of {list(MODES)}")
  if mode == "none":
    return None
  if mode == "auto":
    if int(environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in environ:
      mode = "slurm"
    elif environ.get("JAX_COORDINATOR_ADDRESS"):
      mode = "env"
    else:
      return None
  if mode == "slurm":
    missing = [v for v in ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
               if v not in environ]
    if missing:
      raise ValueError(f"--distributed=slurm needs SLURM's step variables {missing}: start the processes with "
                       "srun inside the allocation (see launch/slurm_multinode.sbatch)")
    return dict(cluster_detection_method="slurm")
  if mode == "tpu":
    return {}  # Cloud TPU: everything is read from the TPU VM's metadata.
  missing = [v for v in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID") if not environ.get(v)]
  if missing:
    raise ValueError(f"--distributed=env needs the environment variables {missing} (JAX_COORDINATOR_ADDRESS is "
                     "host:port of process 0, reachable from every process)")
  return dict(coordinator_address=environ["JAX_COORDINATOR_ADDRESS"],
              num_processes=int(environ["JAX_NUM_PROCESSES"]), process_id=int(environ["JAX_PROCESS_ID"]))


def main(argv):
  import jax  # Imported here so that nothing touches a backend before the runtime starts.

  kwargs = initialize_arguments(_DISTRIBUTED.value, os.environ)
  if kwargs is not None:
    jax.distributed.initialize(**kwargs)
  logging.info("process %d of %d: %d local / %d global devices (%s)", jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count(), jax.default_backend())
  invcoss_main.main(argv)


if __name__ == "__main__":
  app.run(main)
