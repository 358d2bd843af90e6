"""The text modality of the dimension-free ViT: token embedding, padding kept out of attention, the MLM head and
loss (against NumPy), whole-word masking and BERT's corruption."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from invcoss_jax import models
from invcoss_jax.models.vit_mae import ViTConfig
from invcoss_jax.train import mlm

VOCAB = 60
CFG = ViTConfig(width=32, depth=2, num_heads=2, decoder_width=32, decoder_depth=1, decoder_heads=2,
                patch_size_2d=(8, 8), vocab_size=VOCAB, text_max_len=32)


@pytest.fixture(scope="module")
def model_and_params():
  model = models.build_mae(CFG)
  return model, models.init_mae_params(model, jax.random.PRNGKey(0), [(16, 16, 3), (12,)])


def test_one_tree_holds_the_image_and_the_text_tokenizers(model_and_params):
  _, params = model_and_params
  for k in ("patch_embed_2d", "token_embed", "pos_embed_1d", "mlm_transform", "mlm_norm", "mlm_head", "encoder",
            "cls_token", "decoder_pred_2d"):
    assert k in params, sorted(params)
  assert params["token_embed"]["embedding"].shape == (VOCAB, 32)
  assert params["pos_embed_1d"].shape == (32, 32) and params["mlm_head"]["kernel"].shape == (32, VOCAB)


def test_padding_is_kept_out_of_attention(model_and_params):
  model, params = model_and_params
  rng = np.random.default_rng(0)
  tokens = rng.integers(5, VOCAB, (3, 12)).astype(np.int32)
  attn = np.ones((3, 12), np.int32)
  attn[0, 7:], attn[1, 3:] = 0, 0
  other = tokens.copy()
  other[attn == 0] = rng.integers(5, VOCAB, int((attn == 0).sum()))  # different ids at the padding only
  enc = lambda t, a: np.asarray(model.apply({"params": params}, jnp.asarray(t), attention_mask=a,
                                            method=model.encode)[0])
  a, b = enc(tokens, attn), enc(other, attn)
  real = np.concatenate([np.ones((3, 1), bool), attn > 0], axis=1)  # CLS + real tokens
  np.testing.assert_allclose(a[real], b[real], rtol=1e-5, atol=1e-5)
  # Without the mask the padding leaks into the real tokens: the test above can tell.
  assert not np.allclose(enc(tokens, None)[real], enc(other, None)[real], atol=1e-4)


def _np_mlm_loss(logits, labels, mask):
  z = logits - logits.max(-1, keepdims=True)
  logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
  nll = -np.take_along_axis(logp, labels[..., None], -1)[..., 0]
  return (nll * mask).sum() / mask.sum()


def test_mlm_loss_is_the_cross_entropy_of_the_masked_positions_only():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(4, 10, VOCAB)).astype(np.float32)
  labels = rng.integers(0, VOCAB, (4, 10))
  mask = (rng.random((4, 10)) < 0.3).astype(np.float32)
  got = float(mlm.mlm_loss(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(mask)))
  assert got == pytest.approx(_np_mlm_loss(logits.astype(np.float64), labels, mask), rel=1e-5)
  changed = logits.copy()
  changed[mask == 0] = rng.normal(size=(int((mask == 0).sum()), VOCAB))
  assert float(mlm.mlm_loss(jnp.asarray(changed), jnp.asarray(labels), jnp.asarray(mask))) == pytest.approx(got,
                                                                                                            rel=1e-6)


def _word_ids(lengths, words_per, L):
  """(B, L) word ids: [CLS] w0 w0 w1 ... [SEP] [PAD]...; word k has words_per[k % len] pieces."""
  out = -np.ones((len(lengths), L), np.int64)
  attn = np.zeros((len(lengths), L), np.int64)
  for b, n in enumerate(lengths):
    pos, w = 1, 0
    while pos < n - 1:
      for _ in range(words_per[w % len(words_per)]):
        if pos < n - 1:
          out[b, pos] = w
          pos += 1
      w += 1
    attn[b, :n] = 1
  return out, attn


def test_whole_word_masking_takes_whole_words_within_fifteen_percent():
  word_ids, attn = _word_ids([40, 100, 7, 112], (1, 2, 1, 3), 112)
  rng = np.random.default_rng(2)
  fractions = []
  for _ in range(50):
    m = mlm.whole_word_mask(word_ids, attn, rng)
    assert not m[word_ids < 0].any()  # never [CLS], [SEP] or padding
    for b in range(len(m)):
      budget = max(1, int(round(attn[b].sum() * 0.15)))
      assert 1 <= m[b].sum() <= budget
      for w in np.unique(word_ids[b][word_ids[b] >= 0]):
        assert len(set(m[b][word_ids[b] == w])) == 1  # a word is masked whole or not at all
      fractions.append(m[b].sum() / attn[b].sum())
  assert 0.14 < np.mean(fractions[1::4] + fractions[3::4]) <= 0.155  # the long examples reach round(0.15 L)


def test_corruption_is_eighty_ten_ten_and_touches_only_the_chosen_tokens():
  rng = np.random.default_rng(3)
  tokens = rng.integers(5, VOCAB, (64, 112)).astype(np.int32)
  chosen = rng.random(tokens.shape) < 0.15
  out = mlm.corrupt(tokens, chosen, rng, mask_id=4, vocab_size=VOCAB, keep_ids=(0, 1, 2, 3, 4))
  np.testing.assert_array_equal(out[~chosen], tokens[~chosen])
  c = out[chosen]
  n = chosen.sum()
  assert abs((c == 4).sum() / n - 0.8) < 0.02
  changed = (c != 4) & (c != tokens[chosen])
  assert 0.07 < changed.sum() / n < 0.11  # 10 % random (a few draw their own id again)
  assert not np.isin(c[c != 4], [0, 1, 2, 3]).any()


def test_a_few_mlm_steps_learn_the_masked_tokens(model_and_params):
  """On one fixed batch, the masked-token loss falls well below its start (log V at initialisation)."""
  model, params = model_and_params
  rng = np.random.default_rng(4)
  word_ids, attn = _word_ids([12] * 8, (1,), 12)
  tokens = np.where(word_ids >= 0, (np.arange(12)[None] * 3 + np.arange(8)[:, None]) % 50 + 5, 0).astype(np.int32)
  tokens[:, 0], tokens[:, 11] = 2, 3
  batch = mlm.mlm_inputs(dict(tokens=tokens, attention_mask=attn, word_ids=word_ids), rng, mask_id=4,
                         vocab_size=VOCAB, keep_ids=(0, 1, 2, 3, 4), probability=0.3)
  tx = optax.adam(3e-3)
  opt = tx.init(params)

  def loss_fn(p):
    return model.apply({"params": p}, batch["tokens"], batch["attention_mask"], batch["mlm_mask"],
                       batch["labels"], method=model.mlm)["loss"]

  @jax.jit
  def step(p, o):
    loss, g = jax.value_and_grad(loss_fn)(p)
    u, o = tx.update(g, o, p)
    return optax.apply_updates(p, u), o, loss

  first = None
  for _ in range(60):
    params, opt, loss = step(params, opt)
    first = float(loss) if first is None else first
  assert first == pytest.approx(np.log(VOCAB), rel=0.3)
  assert float(loss) < 0.3 * first


def test_the_gathered_mlm_head_scores_the_same_positions_as_the_full_one(model_and_params):
  """With `max_predictions` = the masker's budget of the padded length, the head sees only the corrupted
  positions: the loss and every gradient equal the full head's (every position through the vocabulary
  projection) to float tolerance, and the logits are the full logits at the gathered positions."""
  model, params = model_and_params
  rng = np.random.default_rng(5)
  word_ids, attn = _word_ids([9, 20, 32, 5], (1, 2, 1, 3), 32)
  tokens = np.where(attn > 0, rng.integers(5, VOCAB, attn.shape), 0).astype(np.int32)
  batch = mlm.mlm_inputs(dict(tokens=tokens, attention_mask=attn, word_ids=word_ids), rng, mask_id=4,
                         vocab_size=VOCAB, keep_ids=(0, 1, 2, 3, 4), probability=0.15)
  budget = mlm.prediction_budget(32, 0.15)
  assert budget < 32 and batch["mlm_mask"].sum(1).max() <= budget

  def run(p, k):
    return model.apply({"params": p}, batch["tokens"], batch["attention_mask"], batch["mlm_mask"],
                       batch["labels"], max_predictions=k, method=model.mlm)

  full, gathered = run(params, None), run(params, budget)
  assert gathered["logits"].shape == (4, budget, VOCAB)
  np.testing.assert_allclose(float(gathered["loss"]), float(full["loss"]), rtol=1e-6)
  pos, m = np.asarray(gathered["positions"]), np.asarray(gathered["mask"]) > 0
  np.testing.assert_array_equal(m.sum(1), batch["mlm_mask"].sum(1))  # every corrupted position is scored
  for b in range(4):
    np.testing.assert_array_equal(np.sort(pos[b][m[b]]), np.flatnonzero(batch["mlm_mask"][b]))
    np.testing.assert_allclose(np.asarray(gathered["logits"])[b][m[b]],
                               np.asarray(full["logits"])[b][pos[b][m[b]]], rtol=1e-5, atol=1e-5)
  g_full = jax.grad(lambda p: run(p, None)["loss"])(params)
  g_gathered = jax.grad(lambda p: run(p, budget)["loss"])(params)
  for a, b in zip(jax.tree_util.tree_leaves(g_full), jax.tree_util.tree_leaves(g_gathered)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
  # A budget below the corrupted count drops positions: the test above would see it.
  short = run(params, 1)
  assert np.asarray(short["mask"]).sum() < batch["mlm_mask"].sum()


def test_the_masker_never_chooses_more_than_the_prediction_budget():
  rng = np.random.default_rng(6)
  for length, p in ((12, 0.15), (112, 0.15), (40, 0.3), (7, 0.15)):
    lengths = list(rng.integers(1, length + 1, 16))
    word_ids, attn = _word_ids(lengths, (1, 2, 3), length)
    for _ in range(10):
      m = mlm.whole_word_mask(word_ids, attn, rng, p)
      assert m.sum(1).max() <= mlm.prediction_budget(length, p)
