"""Several train steps per dispatch (`train.steps_per_dispatch`, core.jit_block): the same steps, logs,
saves, hooks and stops as the one-step loop."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from invcoss_jax.parallel import mesh as mesh_lib
from invcoss_jax.train import core


def _setup():
  mesh = mesh_lib.make_mesh({"axes": [("data", -1)]})
  tx = optax.adam(0.05)

  def loss_fn(params, batch, consts, rng):
    noise = jax.random.normal(rng, params["w"].shape) * 0.01  # the step's key: folded from state.step
    pred = batch["x"] @ (params["w"] + noise)
    loss = jnp.mean((pred - batch["y"]) ** 2) + (0.0 if consts is None else consts["l2"] * jnp.sum(params["w"] ** 2))
    return loss, {"pred_mean": jnp.mean(pred)}

  step = core.make_step(loss_fn, tx, optax.constant_schedule(0.05))
  init = lambda rng: {"w": jax.random.normal(rng, (3, 2))}  # noqa: E731
  state, shardings = core.create_train_state(init, tx, jax.random.PRNGKey(0), mesh)
  rng = np.random.default_rng(0)
  data = [{"x": rng.normal(size=(8, 3)).astype(np.float32), "y": rng.normal(size=(8, 2)).astype(np.float32)}
          for _ in range(40)]
  return mesh, step, state, shardings, data


def _run(k: int, end: int = 37, stop_at=None, consts=None, hook_steps=(11,)):
  mesh, step, state, shardings, data = _setup()
  csh = None if consts is None else jax.tree.map(lambda _: mesh_lib.replicated(mesh), consts)
  step_fn = core.jit_step(step, shardings, mesh, csh)
  block_fn = core.jit_block(step, shardings, mesh, csh) if k > 1 else None
  drawn, saved, hooked = [], {}, []

  def next_batch(s):
    drawn.append(s)
    return mesh_lib.put_batch(mesh, data[s % len(data)])

  def hook(s, st, co):
    hooked.append(s)
    if s in hook_steps:  # a hook that changes the state at its step, as PackNet's pruning does
      st = st.replace(params=jax.tree.map(lambda w: w * 0.5, st.params))
    return st, co

  loop = core.Loop(step_fn=step_fn, next_batch=next_batch, what="t", log_every=10,
                   save=lambda s, st: saved.__setitem__(s, jax.device_get(st.params)),
                   should_save=lambda s: s % 15 == 0, after_step=[hook], hook_at=lambda s: s in hook_steps,
                   steps_per_dispatch=k, block_fn=block_fn)
  state, _, losses, stopped = loop.run(state, consts, 0, end, stop_at=stop_at)
  return jax.device_get(state.params), losses, saved, drawn, hooked, stopped


@pytest.mark.parametrize("k", [4, 8])
def test_blocks_run_the_same_steps_saves_and_hooks_as_one_step_at_a_time(k):
  ref_params, ref_losses, ref_saved, ref_drawn, _, _ = _run(1)
  params, losses, saved, drawn, hooked, stopped = _run(k)
  assert drawn == ref_drawn == list(range(1, 38))  # every batch drawn once, in order
  assert sorted(losses) == sorted(ref_losses) == list(range(1, 38))  # every step's loss is fetched
  np.testing.assert_allclose([losses[s] for s in range(1, 38)], [ref_losses[s] for s in range(1, 38)], rtol=1e-6)
  assert sorted(saved) == sorted(ref_saved) == [15, 30, 37]
  for s in saved:  # each save sees the state after exactly its step
    np.testing.assert_allclose(saved[s]["w"], ref_saved[s]["w"], rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(params["w"], ref_params["w"], rtol=1e-6, atol=1e-7)
  assert 11 in hooked and not stopped  # the hook's step ended a block, so the hook halved the right state


def test_blocks_stop_where_asked_and_carry_constants():
  consts = {"l2": jnp.float32(0.01)}
  ref = _run(1, stop_at=22, consts=consts)
  got = _run(4, stop_at=22, consts=consts)
  assert got[5] and ref[5] and max(got[1]) == 22 and got[3] == ref[3] == list(range(1, 23))
  np.testing.assert_allclose(got[0]["w"], ref[0]["w"], rtol=1e-6, atol=1e-7)
  assert sorted(got[2]) == [15, 22]


def test_a_block_is_one_dispatch_of_several_steps():
  mesh, step, state, shardings, data = _setup()
  block = core.jit_block(step, shardings, mesh)
  batches = jax.device_put(jax.tree.map(lambda *xs: np.stack(xs), *data[1:5]), block.batch_sharding)
  new, metrics = block(state, batches)
  assert int(new.step) == 4 and metrics["loss"].shape == (4,) and metrics["pred_mean"].shape == (4,)


@pytest.mark.parametrize("ahead", [1, 2, 3])
def test_the_host_runs_at_most_max_dispatches_ahead_of_the_devices(monkeypatch, ahead):
  """Between logs the loop waits for the loss of the dispatch `ahead` back before it goes on (unbounded
  run-ahead deadlocked XLA:CPU collectives on 4 devices); every step is still run once, in order."""
  events = []

  def step_fn(state, batch):
    events.append(("dispatch", batch))
    return state + 1, {"loss": np.float32(batch)}

  def block_until_ready(x):
    events.append(("wait", int(x)))
    return x

  monkeypatch.setattr(core.jax, "block_until_ready", block_until_ready)
  loop = core.Loop(step_fn=step_fn, next_batch=lambda s: s, what="t", log_every=100, max_dispatches_ahead=ahead)
  state, _, losses, _ = loop.run(0, None, 0, 20)
  assert state == 20 and losses == {s: float(s) for s in range(1, 21)}
  assert [e[1] for e in events if e[0] == "dispatch"] == list(range(1, 21))
  outstanding, waited = [], []
  for kind, s in events:
    if kind == "dispatch":
      outstanding.append(s)
      assert len(outstanding) <= ahead + 1, events  # the newest, plus at most `ahead` not waited for
    else:
      assert s == outstanding.pop(0), events  # oldest first
      waited.append(s)
      assert len(outstanding) == ahead
  assert waited == list(range(1, 21 - ahead))
