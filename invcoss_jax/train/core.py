"""The trainer core: the one train step and the one loop behind pre-training, continual stages and fine-tuning.

A job describes its training by a loss function and a few callbacks:

  loss_fn(trainable, batch, consts, rng) -> (loss, {name: metric})

`trainable` is what the optimiser updates (`state.trainable`: the parameters, or for continual training the
MAE parameters and CaSSLe's predictor), `consts` what it reads but never updates (a frozen teacher, EWC's
anchor, PackNet's masks), `rng` the step's key, fold_in(state.rng, state.step), from which the loss derives
its masking and drop-path streams (so a resumed run draws the same ones). `make_step` turns it into the pure
step (state, batch, consts) -> (state, metrics); `jit_step` compiles it with explicit shardings; `Loop` runs
it with logging, the non-finite guard, checkpoints (state and data iterator), fault points and hooks.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from typing import Any, Callable, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from invcoss_jax import faults
from invcoss_jax.parallel import mesh as mesh_lib
from invcoss_jax.privacy import dp_sgd
from invcoss_jax.train.nonfinite import check_losses

LossFn = Callable[[Any, Any, Any, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]


class TrainState(flax.struct.PyTreeNode):
  """`step` counts train-step calls (micro-batches under gradient accumulation); `rng` is the run's base
  key, folded with `step` for each step's random streams."""
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array

  @property
  def trainable(self) -> Any:
    """What the optimiser updates (its state was initialised on this tree)."""
    return self.params

  def with_trainable(self, trainable: Any) -> "TrainState":
    return self.replace(params=trainable)


# --- the sharded state ---------------------------------------------------------------------------------------


def state_init(init: Callable[..., Any], args: tuple, mesh: jax.sharding.Mesh,
               rules: mesh_lib.LayoutRules | Any = None) -> tuple[Callable[..., Any], Any]:
  """(`init` compiled to build its state directly in its sharded layout, the shardings): the layout is
  `parallel.mesh.state_shardings(abstract state, mesh, rules)` (`rules`: a `LayoutRules` or `config.mesh`),
  so no device ever holds more than its share. `args` only give the argument shapes; the compiled function
  serves any arguments of those shapes (fine-tuning builds one state per seed with it)."""
  shardings = mesh_lib.state_shardings(jax.eval_shape(init, *args), mesh, rules)
  return jax.jit(init, out_shardings=shardings), shardings


def create_state(init: Callable[..., Any], args: tuple, mesh: jax.sharding.Mesh,
                 rules: mesh_lib.LayoutRules | Any = None) -> tuple[Any, Any]:
  """(state, its shardings): `init(*args)` run by `state_init`. Arguments committed to other devices than the
  layout's (e.g. an earlier stage's parameters on one device) are `device_put` to their layout by the caller
  first (continual.step.create_state)."""
  fn, shardings = state_init(init, args, mesh, rules)
  return fn(*args), shardings


def abstract_state(shapes: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs carrying the shardings: the target orbax restores a checkpoint into."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)


def train_state_init(tx: optax.GradientTransformation) -> Callable[[Any, jax.Array], TrainState]:
  """init(params, rng) -> the `TrainState` at step 0 of `params` (the optimiser state of `tx` on them)."""
  def init(params, rng):
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=rng)
  return init


def _train_state_init(init_params: Callable[[jax.Array], Any], tx: optax.GradientTransformation):
  def init(rng, params):
    init_rng, state_rng = jax.random.split(rng)
    p = init_params(init_rng) if params is None else params
    return train_state_init(tx)(p, state_rng)
  return init


def abstract_train_state(init_params: Callable[[jax.Array], Any], tx: optax.GradientTransformation,
                         rng: jax.Array, mesh: jax.sharding.Mesh, *, rules: mesh_lib.LayoutRules | Any = None,
                         params: Any | None = None) -> tuple[TrainState, Any]:
  """(ShapeDtypeStructs carrying their shardings, the shardings) of `create_train_state`'s state, without
  computing it."""
  shapes = jax.eval_shape(_train_state_init(init_params, tx), rng, params)
  shardings = mesh_lib.state_shardings(shapes, mesh, rules)
  return abstract_state(shapes, shardings), shardings


def create_train_state(init_params: Callable[[jax.Array], Any], tx: optax.GradientTransformation,
                       rng: jax.Array, mesh: jax.sharding.Mesh, *, rules: mesh_lib.LayoutRules | Any = None,
                       params: Any | None = None) -> tuple[TrainState, Any]:
  """A `TrainState` built in its sharded layout (`rules`: a `parallel.mesh.LayoutRules` or `config.mesh`;
  None replicates it); returns (state, state_shardings).

  `init_params(rng) -> params` creates float32 parameters from the first half of split(rng) (the second
  seeds the state's key); `params`, if given, replaces them (e.g. weights carried over from an earlier stage or
  a PyTorch checkpoint) and is resharded to the same layout."""
  return create_state(_train_state_init(init_params, tx), (rng, params), mesh, rules)


# --- the step ------------------------------------------------------------------------------------------------


def make_step(loss_fn: LossFn, tx: optax.GradientTransformation, schedule: optax.Schedule, *,
              grad_accum_steps: int = 1,
              mask_updates: Callable[[Any, Any], Any] | None = None,
              privacy: dp_sgd.Spec | None = None) -> Callable:
  """The pure step (state, batch, consts) -> (state, metrics).

  metrics: 'loss', 'grad_norm', 'learning_rate' (of the update the step belongs to) and the loss's own.
  `mask_updates(updates, consts)` may change the updates after the optimiser (PackNet freezes weights there,
  weight decay included).

  `privacy` (a `privacy.accounting.DpSgdPlan`, or None: the step as it always was) makes the step DP-SGD: the
  gradient is `privacy.dp_sgd.private_gradient` of the loss (per-example, clipped, noised; the batch carries
  `dp_sgd.PADDING_KEY`), with its metrics 'dp_clipped_fraction' and 'dp_batch_size'."""
  if privacy is not None:
    if grad_accum_steps != 1:
      raise ValueError(f"DP-SGD steps do not accumulate (grad_accum_steps={grad_accum_steps})")
    private_gradient = dp_sgd.private_gradient(loss_fn, privacy)

  def step(state: TrainState, batch: Any, consts: Any = None):
    rng = jax.random.fold_in(state.rng, state.step)
    trainable = state.trainable
    if privacy is None:
      (loss, extra), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable, batch, consts, rng)
    else:
      loss, extra, grads = private_gradient(trainable, batch, consts, rng)
    updates, opt_state = tx.update(grads, state.opt_state, trainable)
    if mask_updates is not None:
      updates = mask_updates(updates, consts)
    new = state.with_trainable(optax.apply_updates(trainable, updates))
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads),
               "learning_rate": schedule(state.step // grad_accum_steps), **extra}
    return new.replace(step=state.step + 1, opt_state=opt_state), metrics

  return step


def jit_step(step: Callable, state_shardings: Any, mesh: jax.sharding.Mesh, consts_shardings: Any = None
             ) -> Callable:
  """jit with explicit shardings (the batch split over the batch axes); the old state is donated (its buffers
  become the new state's). Call it as fn(state, batch, consts), or fn(state, batch) when `consts_shardings` is
  None (a step without constants)."""
  in_shardings = (state_shardings, mesh_lib.data_sharding(mesh))
  if consts_shardings is not None:
    in_shardings += (consts_shardings,)
  return jax.jit(step, in_shardings=in_shardings, out_shardings=(state_shardings, mesh_lib.replicated(mesh)),
                 donate_argnums=(0,))


def jit_block(step: Callable, state_shardings: Any, mesh: jax.sharding.Mesh, consts_shardings: Any = None
              ) -> Callable:
  """Several train steps in one dispatch: fn(state, batches[, consts]) -> (state, metrics), `step` scanned
  over the leading axis of `batches` (a block of batches stacked, each split over the batch axes as in
  `jit_step`), metrics stacked per step. Each scanned step is `step` itself (its key folded from
  state.step), so a block computes what as many `jit_step` calls would (to float rounding: XLA may fuse
  the loop body differently); `Loop(steps_per_dispatch=k)` uses it."""
  axes = mesh_lib.batch_axes(mesh)
  blocks = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, axes if axes else None))

  def block(state, batches, consts=None):
    return jax.lax.scan(lambda st, b: step(st, b, consts), state, batches)

  in_shardings = (state_shardings, blocks)
  if consts_shardings is not None:
    in_shardings += (consts_shardings,)
  fn = jax.jit(block, in_shardings=in_shardings, out_shardings=(state_shardings, mesh_lib.replicated(mesh)),
               donate_argnums=(0,))
  fn.batch_sharding = blocks
  return fn


# --- the loop ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Loop:
  """Runs train steps start+1 .. end of one run.

  - `next_batch(step)`: the step's device batch (the loop puts nothing on devices itself);
  - `log_every`: metrics are fetched (one device sync), checked for non-finite losses and written as
    `train/<name>` means (the learning rate: its last value) at these steps, the last and (`log_first`) the
    first;
  - `save(step, state)` at steps where `should_save(step)` and at the end, after the losses since the last
    check are checked, so no checkpoint keeps a non-finite state; `latest_checkpoint()` names the one a
    restart would resume from;
  - `after_step(step, state, consts) -> (state, consts)` hooks run after the step's save (e.g. PackNet's
    pruning boundary); `on_log(step, state, fetched)` after each fetch (e.g. validation);
  - `stop_at`: end after that step, as a preempted job would (with a checkpoint).
  Fault points `train_step:<what>:<step>` (see invcoss_jax.faults) follow each step's save.

  The host runs at most `max_dispatches_ahead` dispatches ahead of the devices (it waits for the loss of
  the dispatch that many back before it dispatches the next). Unbounded run-ahead between logs deadlocked
  XLA:CPU's multi-device collectives: with ~80 steps queued, one device's share of a later step took the
  device's in-flight slot before its share of the current step, whose all-reduce then waited forever
  (fine-tuning on 4 simulated CPU devices, 100 steps between logs). Two dispatches ahead keep an
  accelerator fed.

  With `steps_per_dispatch` k > 1 and a `block_fn` (`jit_block` of the same step), steps run k per dispatch
  in blocks that start at multiples of k and hold no step where something happens before its end: a log,
  a save, `stop_at`, the run's end or a step where `hook_at(step)` is true (the `after_step` hooks run at
  those steps only; the default, every step, keeps hooks exact and the loop at one step per dispatch). Steps
  around such points run one by one, so every log, save, hook and stop sees the state after exactly its
  step; the batches, metrics and fault points are those of the one-step loop.
  """
  step_fn: Callable
  next_batch: Callable[[int], Any]
  what: str
  log_every: int = 1
  writer: Any = None
  save: Callable[[int, Any], None] | None = None
  should_save: Callable[[int], bool] = lambda step: False
  latest_checkpoint: Callable[[], int | None] = lambda: None
  after_step: Sequence[Callable[[int, Any, Any], tuple[Any, Any]]] = ()
  on_log: Callable[[int, Any, list], None] | None = None
  progress: Callable[[int], None] | None = None
  fault_prefix: str = "train_step"
  log_first: bool = True
  nonfinite_hint: str = "Lower train.base_lr or check the data (data.nonfinite)"  # what a non-finite loss asks
  steps_per_dispatch: int = 1
  block_fn: Callable | None = None
  hook_at: Callable[[int], bool] = lambda step: True
  max_dispatches_ahead: int = 2

  def run(self, state: Any, consts: Any, start: int, end: int, stop_at: int | None = None
          ) -> tuple[Any, Any, dict[int, float], bool]:
    """(state, consts, {step: loss} of the steps run, stopped early)."""
    losses: dict[int, float] = {}
    pending: list[tuple[int, Any]] = []
    last_step, last_time = start, time.perf_counter()
    log_every = max(1, int(self.log_every))
    stopped = False
    in_flight: collections.deque = collections.deque()  # each recent dispatch's loss, oldest first

    def dispatched(metrics) -> None:
      in_flight.append(metrics["loss"])
      if len(in_flight) > max(1, int(self.max_dispatches_ahead)):
        jax.block_until_ready(in_flight.popleft())
    k = max(1, int(self.steps_per_dispatch)) if self.block_fn is not None else 1

    def logs(step: int) -> bool:
      return step % log_every == 0 or step == end or (self.log_first and step == start + 1)

    def eventful(step: int) -> bool:  # a step after which the loop must see the state
      return (logs(step) or step == stop_at or self.should_save(step) or
              (bool(self.after_step) and self.hook_at(step)))

    step = start
    while step < end:
      if k > 1 and step % k == 0 and step + k <= end and not any(eventful(s) for s in range(step + 1, step + k)):
        block = [self.next_batch(s) for s in range(step + 1, step + k + 1)]
        batches = jax.device_put(jax.tree.map(lambda *xs: jnp.stack(xs), *block), self.block_fn.batch_sharding)
        state, stacked = (self.block_fn(state, batches) if consts is None else
                          self.block_fn(state, batches, consts))
        pending.append((tuple(range(step + 1, step + k + 1)), stacked))  # split per step once fetched
        dispatched(stacked)
        if self.progress is not None:
          for s in range(step + 1, step + k + 1):
            self.progress(s)
        for s in range(step + 1, step + k):  # no save, log or hook falls before the block's last step
          faults.point(f"{self.fault_prefix}:{self.what}:{s}")
        step += k
      else:
        step += 1
        batch = self.next_batch(step)
        state, metrics = self.step_fn(state, batch) if consts is None else self.step_fn(state, batch, consts)
        pending.append((step, metrics))
        dispatched(metrics)
        if self.progress is not None:
          self.progress(step)
      stop_here = stop_at is not None and step == stop_at
      if logs(step) or stop_here:
        fetched = _per_step(jax.device_get(pending))
        pending = []
        now = time.perf_counter()
        losses.update({s: float(m["loss"]) for s, m in fetched})
        check_losses(fetched, what=self.what, latest_checkpoint=self.latest_checkpoint(), hint=self.nonfinite_hint)
        if self.writer is not None:
          self.writer.write_scalars(step, _scalars(fetched, (step - last_step) / max(now - last_time, 1e-9)))
        last_step, last_time = step, now
        if self.on_log is not None:
          self.on_log(step, state, fetched)
      if self.save is not None and (self.should_save(step) or step == end or stop_here):
        check_losses(_per_step(jax.device_get(pending)), what=self.what, latest_checkpoint=self.latest_checkpoint(), hint=self.nonfinite_hint)
        self.save(step, state)
      faults.point(f"{self.fault_prefix}:{self.what}:{step}")
      for hook in self.after_step:
        state, consts = hook(step, state, consts)
      if stop_here:
        stopped = True
        break
    return state, consts, losses, stopped


def _per_step(pending: list[tuple[Any, Any]]) -> list[tuple[int, Any]]:
  """[(step, metrics)] from the loop's pending entries: (step, metrics) of one step, or (steps, metrics
  stacked over them) of a block."""
  out = []
  for steps, metrics in pending:
    if isinstance(steps, tuple):
      out.extend((s, jax.tree.map(lambda x, i=i: x[i], metrics)) for i, s in enumerate(steps))
    else:
      out.append((steps, metrics))
  return out


def _scalars(fetched: list[tuple[int, dict]], steps_per_sec: float) -> dict[str, float]:
  """`train/<metric>` over the fetched steps: means, and the learning rate of the last step."""
  out = {f"train/{name}": float(np.mean([float(m[name]) for _, m in fetched])) for name in fetched[-1][1]}
  out["train/learning_rate"] = float(fetched[-1][1]["learning_rate"])
  out["train/steps_per_sec"] = steps_per_sec
  return out
