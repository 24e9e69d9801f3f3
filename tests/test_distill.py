"""Distillation: the loss terms against PyTorch on transformers' forward passes, a frozen
teacher (no update, no optimizer state), student-from-teacher initialisation, the
progressive schedule, and a short run from a teacher pretrained by our own loop.

The teacher and students are tiny random BertForMaskedLM models built here (no
downloads), imported with bert_jax.hf; the teacher goes through an imported workdir.
"""

from __future__ import annotations

import functools
import os
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

import torch
import transformers
F = torch.nn.functional

from bert_jax import checkpoint, hf, train  # noqa: E402
from bert_jax.encoder import EncoderConfig  # noqa: E402
from objectives import distill  # noqa: E402
from objectives.base import SpecialIds  # noqa: E402
from tests.conftest import flat_inputs, tiny_config  # noqa: E402

VOCAB, B, L = 99, 8, 12
SPECIAL = SpecialIds(pad=0, unk=1, cls=2, sep=3, mask=4, first_regular=5, vocab_size=VOCAB)
COMMON = dict(vocab_size=VOCAB, max_position_embeddings=40, hidden_dropout_prob=0.0,
              attention_probs_dropout_prob=0.0, attn_implementation="eager")
TEACHER = dict(COMMON, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
               intermediate_size=64)
STUDENT = dict(TEACHER, num_hidden_layers=2)  # DistilBERT-style: half the depth
# Layer-wise: a shallower teacher and a student of its depth at half its width (projected).
TEACHER3 = dict(TEACHER, num_hidden_layers=3)
THIN = dict(TEACHER3, hidden_size=16, intermediate_size=32)


def build_hf(cfg: dict, path: str, seed: int):
  torch.manual_seed(seed)
  model = transformers.BertForMaskedLM(transformers.BertConfig(**cfg)).eval()
  with torch.no_grad():  # LayerNorms and biases away from their trivial initial values
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  model.save_pretrained(path)
  return model


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  root = tmp_path_factory.mktemp("distill")
  out = types.SimpleNamespace()
  for name, cfg, seed in (("teacher", TEACHER, 0), ("student", STUDENT, 1),
                          ("teacher3", TEACHER3, 2), ("thin", THIN, 3)):
    path = str(root / name)
    setattr(out, name, build_hf(cfg, path, seed))
    setattr(out, name + "_imported", hf.load(path))
    if name.startswith("teacher"):
      setattr(out, name + "_wd", str(root / (name + "_wd")))
      hf.import_to_workdir(path, str(root / (name + "_wd")))
  return out


def distill_config(teacher_wd: str, student: EncoderConfig, **distill_fields):
  c = tiny_config("unused")
  c.objectives = "distill:1.0"
  c.model.update({k: v for k, v in student.to_dict().items() if k in c.model})
  c.data.seq_len = L
  c.mlm.update(dict(max_predictions=4, rate=0.25))
  c.optim.warmup_steps = 0  # a real update at the first step
  c.mesh.data = 1  # one device: sharding is tested elsewhere, compiles are cheaper
  c.distill.teacher = teacher_wd
  c.distill.update(distill_fields)
  return c


def make_batch(seed: int = 0):
  rng = np.random.default_rng(seed)
  lengths = rng.integers(L // 2, L + 1, size=B)
  lengths[0] = L
  mask = (np.arange(L)[None] < lengths[:, None]).astype(np.int32)
  ids = rng.integers(5, VOCAB, size=(B, L)).astype(np.int32) * mask
  ids[:, 0] = 2
  word_ids = np.where(mask == 1, np.arange(L)[None], -1).astype(np.int32)
  word_ids[:, 0] = -1
  return {"input_ids": ids, "segment_ids": np.zeros_like(ids), "attention_mask": mask,
          "word_ids": word_ids, "example_id": np.arange(B, dtype=np.int32),
          "epoch": np.zeros(B, np.int32)}


def fresh_params(setup, objective, batch, student=None):
  """Initialised params with the teacher loaded; the student replaced by `student`."""
  init = jax.jit(lambda b: nn.meta.unbox(setup.model.init(
      {"params": jax.random.PRNGKey(0), "dropout": jax.random.PRNGKey(0)},
      train.corrupt(setup, b.get("clean", b), jax.random.PRNGKey(0)), deterministic=True)["params"]))
  params = objective.initialize(init(batch))
  if student is not None:
    params = dict(params, encoder=student.params["encoder"], mlm=student.params["mlm"])
  return params


def torch_forward(model, batch):
  batch = flat_inputs(batch)
  with torch.no_grad():
    return model(input_ids=torch.tensor(np.asarray(batch["input_ids"]), dtype=torch.long),
                 token_type_ids=torch.tensor(np.asarray(batch["segment_ids"]), dtype=torch.long),
                 attention_mask=torch.tensor(np.asarray(batch["attention_mask"])),
                 output_hidden_states=True, output_attentions=True)


def at_masked(x, batch):
  """[B, L, ...] torch tensor -> [N, ...] at the masked positions with weight 1."""
  batch = flat_inputs(batch)
  pos, w = np.asarray(batch["mlm_positions"]), np.asarray(batch["mlm_weights"]) > 0
  rows = np.repeat(np.arange(B)[:, None], pos.shape[1], 1)
  return x[torch.tensor(rows[w]), torch.tensor(pos[w])]


def mean(metrics, key):
  total, count = metrics[key]
  return float(total) / float(count)


def equal(a, b) -> bool:
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  return len(la) == len(lb) and all(np.array_equal(x, y) for x, y in zip(la, lb))


@pytest.mark.parametrize("kl_positions", ["all", "masked"])
def test_init_from_teacher_and_distilbert_terms_match_torch(models, kl_positions):
  c = distill_config(models.teacher_wd, models.student_imported.config)  # layers 0, 2 of 4
  c.distill.kl_positions = kl_positions  # DistilBERT's restrict_ce_to_mask off / on
  setup = train.build_setup(c, SPECIAL)
  obj = setup.objectives[0].objective
  assert not obj.project and obj.frozen_paths() == (("distill", "teacher"),)
  assert obj.student_layers == (0, 2)
  loss_fn = jax.jit(lambda p, b: train.compute_loss(p, setup, b, jax.random.PRNGKey(0), True))
  batch = jax.jit(lambda b: train.corrupt(setup, b, jax.random.PRNGKey(3)))(make_batch())

  # The teacher loaded as is; the student's embeddings, layers 0 and 2 and MLM head from it.
  params = jax.device_get(fresh_params(setup, obj, batch))
  teacher = models.teacher_imported.params
  assert equal(params["distill"]["teacher"], {"encoder": teacher["encoder"], "mlm": teacher["mlm"]})
  assert equal(params["encoder"]["embeddings"], teacher["encoder"]["embeddings"])
  assert equal(params["encoder"]["layer_0"], teacher["encoder"]["layer_0"])
  assert equal(params["encoder"]["layer_1"], teacher["encoder"]["layer_2"])
  assert not equal(params["encoder"]["layer_1"], teacher["encoder"]["layer_1"])
  assert equal(params["mlm"], teacher["mlm"]) and set(params["distill"]) == {"teacher"}
  assert sorted(params["encoder"]) == ["embeddings", "layer_0", "layer_1"]

  # With the imported student in place: every term against PyTorch.
  params = dict(params, encoder=models.student_imported.params["encoder"],
                mlm=models.student_imported.params["mlm"])
  loss, m = loss_fn(params, batch)

  t, s = torch_forward(models.teacher, batch), torch_forward(models.student, batch)
  T = 2.0
  s_logits, t_logits = at_masked(s.logits, batch), at_masked(t.logits, batch)
  keep = torch.tensor(np.asarray(flat_inputs(batch)["attention_mask"]) > 0)
  s_kl, t_kl = (s.logits[keep], t.logits[keep]) if kl_positions == "all" else (s_logits, t_logits)
  assert s_kl.shape[0] == float(m["distill/kl_loss"][1]) > 0
  if kl_positions == "all":
    assert s_kl.shape[0] > 2 * s_logits.shape[0]
  kl = F.kl_div(F.log_softmax(s_kl / T, -1), F.softmax(t_kl / T, -1),
                reduction="batchmean") * T ** 2
  ids = torch.tensor(np.asarray(flat_inputs(batch)["mlm_ids"])[np.asarray(flat_inputs(batch)["mlm_weights"]) > 0])
  ce = F.cross_entropy(s_logits, ids.long())
  s_h, t_h = s.hidden_states[-1][keep], t.hidden_states[-1][keep]
  cos = F.cosine_embedding_loss(s_h, t_h, torch.ones(s_h.shape[0]))
  np.testing.assert_allclose(mean(m, "distill/kl_loss"), kl.item(), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(mean(m, "distill/mlm_loss"), ce.item(), rtol=1e-4)
  np.testing.assert_allclose(mean(m, "distill/cos_loss"), cos.item(), rtol=1e-4, atol=1e-6)
  acc = (s_logits.argmax(-1) == ids).float().mean().item()
  np.testing.assert_allclose(mean(m, "distill/accuracy"), acc, atol=1e-6)
  np.testing.assert_allclose(float(loss), 5 * kl.item() + 2 * ce.item() + cos.item(),
                             rtol=1e-4)


def test_layerwise_terms_match_torch_and_progressive_cuts_gradients(models):
  stage_steps = 5
  c = distill_config(models.teacher3_wd, models.thin_imported.config, mode="layerwise",
                     init_student=False, stage_steps=stage_steps, alpha_hidden=1.0,
                     alpha_attention=3.0)
  setup = train.build_setup(c, SPECIAL)
  obj = setup.objectives[0].objective
  assert obj.project and obj.runs_encoder
  stage = 1
  batch = dict(make_batch(1), step=np.full((B,), stage * stage_steps + 2, np.int32))
  batch = jax.jit(lambda b: train.corrupt(setup, b, jax.random.PRNGKey(4)))(batch)
  params = fresh_params(setup, obj, batch, models.thin_imported)
  grad_fn = jax.jit(jax.value_and_grad(
      lambda p, b: train.compute_loss(p, setup, b, jax.random.PRNGKey(0), True), has_aux=True))
  (loss, m), grads = grad_fn(params, batch)

  t, s = torch_forward(models.teacher3, batch), torch_forward(models.thin, batch)
  proj = params["distill"]["projection"]
  kernel, bias = (torch.tensor(np.asarray(proj[k])) for k in ("kernel", "bias"))
  keep = torch.tensor(np.asarray(flat_inputs(batch)["attention_mask"]) > 0)
  mse, att = [], []
  for layer in range(3):
    s_h = s.hidden_states[layer + 1] @ kernel + bias
    mse.append(F.mse_loss(s_h[keep], t.hidden_states[layer + 1][keep]).item())
    # [B, heads, Lq, Lk] -> the non-pad queries' rows [N, heads, Lk]
    s_a, t_a = (x.attentions[layer].permute(0, 2, 1, 3)[keep] for x in (s, t))
    kl = F.kl_div(torch.log(s_a.clamp_min(1e-30)), t_a, reduction="sum") / (s_a.shape[0] * 4)
    att.append(kl.item())
  np.testing.assert_allclose(mean(m, "distill/hidden_loss"), np.mean(mse), rtol=1e-4)
  np.testing.assert_allclose(mean(m, "distill/attention_loss"), np.mean(att), rtol=1e-4,
                             atol=1e-6)
  # Stage 1 of progressive transfer: layer 1's terms alone, no pretraining distillation.
  assert mean(m, "distill/stage") == stage
  np.testing.assert_allclose(float(loss), mse[stage] + 3.0 * att[stage], rtol=1e-4)

  def norm(tree):
    return float(sum(jnp.sum(jnp.abs(x)) for x in jax.tree.leaves(tree)))

  enc = grads["encoder"]
  assert norm(enc["embeddings"]) == norm(enc["layer_0"]) == 0.0  # cut below the stage
  assert norm(enc["layer_2"]) == 0.0  # no loss above it
  assert norm(enc["layer_1"]) > 0 and norm(grads["distill"]["projection"]) > 0
  assert norm(grads["mlm"]) == 0.0 and norm(grads["distill"]["teacher"]) == 0.0


def test_transfer_schedule():
  ts = functools.partial(distill.transfer_schedule, num_layers=3, stage_steps=10)
  w, pd, stage, cut = ts(25, schedule="progressive")
  np.testing.assert_array_equal(w, [0, 0, 1])
  assert (float(pd), int(stage), int(cut)) == (0.0, 2, 2)
  w, pd, stage, cut = ts(30, schedule="progressive")  # then pretraining distillation
  np.testing.assert_array_equal(w, [0, 0, 0])
  assert (float(pd), int(stage), int(cut)) == (1.0, 3, -1)
  w, pd, _, cut = ts(29, schedule="all_at_once")
  np.testing.assert_allclose(w, [1 / 3] * 3)
  assert (float(pd), int(cut)) == (0.0, -1)
  w, pd, _, _ = ts(30, schedule="all_at_once")
  assert float(pd) == 1.0 and not np.any(w)
  w, pd, _, cut = ts(0, schedule="auxiliary")
  np.testing.assert_allclose(w, [1 / 3] * 3)
  assert (float(pd), int(cut)) == (1.0, -1)


def test_padded_vocabulary_rows_are_out_of_the_kl():
  from objectives.mlm import mask_padded_vocab
  s, t = (jax.random.normal(jax.random.PRNGKey(i), (2, 3, 10)) for i in (0, 1))
  w = jnp.ones((2, 3))
  padded = lambda s: distill.soft_kl(mask_padded_vocab(s, 7), mask_padded_vocab(t, 7), w, 1.0)[0]  # noqa: E731
  np.testing.assert_allclose(padded(s), distill.soft_kl(s[..., :7], t[..., :7], w, 1.0)[0],
                             rtol=1e-6)
  grad = jax.grad(padded)(s)
  assert np.all(np.isfinite(grad)) and not np.any(grad[..., 7:])


def test_student_from_teacher_copies_the_named_layers():
  rng = np.random.default_rng(0)

  def tree(n_layers, types=True):
    dense = lambda: {"kernel": rng.normal(size=(4, 4)), "bias": rng.normal(size=4)}  # noqa: E731
    emb = {"word_embeddings": {"embedding": rng.normal(size=(10, 4))},
           "position_embeddings": {"embedding": rng.normal(size=(6, 4))},
           "layer_norm": {"norm": {"scale": rng.normal(size=4), "bias": rng.normal(size=4)}}}
    if types:
      emb["token_type_embeddings"] = {"embedding": rng.normal(size=(2, 4))}
    enc = {"embeddings": emb, **{f"layer_{i}": {"ffn": dense()} for i in range(n_layers)}}
    return enc, {"head": {"transform": dense(), "bias": rng.normal(size=10)}}

  t_enc, t_mlm = tree(4)
  s_enc, s_mlm = tree(2)
  cfg = EncoderConfig(vocab_size=10, hidden_size=4, num_layers=4, num_heads=1)
  enc, mlm = distill.student_from_teacher(s_enc, s_mlm, t_enc, t_mlm, (3, 1), cfg)
  eq = equal
  assert eq(enc["layer_0"], t_enc["layer_3"]) and eq(enc["layer_1"], t_enc["layer_1"])
  assert not eq(enc["layer_0"], t_enc["layer_0"]) and not eq(enc["layer_1"], t_enc["layer_2"])
  assert eq(enc["embeddings"], t_enc["embeddings"]) and eq(mlm, t_mlm)
  assert sorted(enc) == ["embeddings", "layer_0", "layer_1"]
  # A student without token types (DistilBERT): type 0 folded into the positions.
  s_enc, _ = tree(2, types=False)
  enc, _ = distill.student_from_teacher(s_enc, s_mlm, t_enc, t_mlm, (0, 2), cfg)
  assert "token_type_embeddings" not in enc["embeddings"]
  np.testing.assert_array_equal(
      enc["embeddings"]["position_embeddings"]["embedding"],
      t_enc["embeddings"]["position_embeddings"]["embedding"]
      + t_enc["embeddings"]["token_type_embeddings"]["embedding"][0])
  assert distill.parse_layers("", 12, 6) == (0, 2, 4, 6, 8, 10)
  assert distill.parse_layers("0,2,4,7,9,11", 12, 6) == (0, 2, 4, 7, 9, 11)
  with pytest.raises(ValueError, match="names 2 teacher layers for a student of 3"):
    distill.parse_layers("0,1", 4, 3)


def test_config_errors(models):
  thin = models.thin_imported.config
  with pytest.raises(ValueError, match="student's hidden_size 16 differs from the teacher's 32"):
    train.build_setup(distill_config(models.teacher_wd, thin), SPECIAL)
  with pytest.raises(ValueError, match="num_layers 2 must equal the teacher's 4"):
    train.build_setup(distill_config(models.teacher_wd, models.student_imported.config,
                                     mode="layerwise", init_student=False), SPECIAL)
  c = distill_config(models.teacher_wd, models.student_imported.config)
  c.objectives = "mlm:1.0,distill:1.0"
  with pytest.raises(ValueError, match=r"both train params\['mlm'\]"):
    train.build_setup(c, SPECIAL)
  c = distill_config(models.teacher_wd, models.student_imported.config)
  c.data.tokenizer = ""
  with pytest.raises(ValueError, match="reads the teacher's tokenizer"):
    train.build_setup(c, SPECIAL)
  with pytest.raises(ValueError, match="distill.teacher: give the teacher's workdir"):
    train.build_setup(distill_config("", thin), SPECIAL)


def test_two_step_run_from_a_pretrained_teacher(bundled_tokenizer, tmp_path):
  cache = str(tmp_path / "cache")
  common = dict(steps=2, batch_size=8, eval_every=2, checkpoint_every=2, eval_batches=1)

  def config(**kw):
    c = tiny_config(bundled_tokenizer, cache)
    c.data.seq_len = 32
    c.mesh.data = 1
    c.train.update(common)
    c.model.update(kw)
    return c

  teacher = config()
  summary = train.train_and_evaluate(teacher, str(tmp_path / "teacher"))
  assert summary.last_eval is not None

  c = config(num_layers=1)
  c.objectives = "distill:1.0"
  c.distill.update(dict(teacher=str(tmp_path / "teacher"), student_layers="1"))
  summary = train.train_and_evaluate(c, str(tmp_path / "student"))
  ev = summary.last_eval
  for k in ("kl_loss", "mlm_loss", "cos_loss", "accuracy"):
    assert np.isfinite(ev[f"distill/{k}"]), k
  # After two updates the teacher is bit-identical to the teacher run's checkpoint ...
  t_params, _ = checkpoint.restore_params(str(tmp_path / "teacher"))
  s_params, step = checkpoint.restore_params(str(tmp_path / "student"))
  assert step == 2
  assert equal(s_params["distill"]["teacher"],
               {"encoder": t_params["encoder"], "mlm": t_params["mlm"]})
  assert not equal(s_params["encoder"]["layer_0"], t_params["encoder"]["layer_1"])  # trained
  # ... and the checkpointed optimizer state holds nothing for it (optax.MaskedNode under
  # "train", EmptyState under "frozen"): AdamW's two moments cover the student alone.
  manager = ocp.CheckpointManager(os.path.join(str(tmp_path / "student"), "checkpoints"),
                                  options=ocp.CheckpointManagerOptions(read_only=True))
  state = manager.restore(2, args=ocp.args.Composite(
      state=ocp.args.PyTreeRestore(restore_args=None)))["state"]
  manager.close()
  opt = jax.tree_util.tree_flatten_with_path(state["opt_state"])[0]
  assert not [jax.tree_util.keystr(p) for p, _ in opt if "teacher" in jax.tree_util.keystr(p)]
  assert not jax.tree.leaves(state["opt_state"]["inner_states"].get("frozen", {}))
  student = train.count_params(s_params) - train.count_params(s_params["distill"]["teacher"])
  assert sum(np.size(x) for _, x in opt if np.ndim(x) > 0) == 2 * student


def test_launch_config_completes_the_students_tokenizer(tmp_path):
  """`objectives.complete_config` (train_and_evaluate and the ablation run it): an empty
  data.tokenizer of a student becomes its teacher's, on a copy."""
  import objectives
  from configs.pretrain import get_config
  c = get_config("distilbert,tiny")
  c.distill.teacher = str(tmp_path / "teacher")
  done = objectives.complete_config(c)
  assert done.data.tokenizer == str(tmp_path / "teacher" / "tokenizer.model")
  assert c.data.tokenizer == ""  # the caller's config is unchanged
  c.data.tokenizer = "/elsewhere/tok.model"  # a tokenizer given explicitly is kept
  assert objectives.complete_config(c).data.tokenizer == "/elsewhere/tok.model"


def test_smoothed_masking_draws_rare_tokens_by_count_to_the_minus_0_7():
  """DistilBERT's mlm_smoothing: with a budget of one position, position i is drawn with
  probability w_i / sum(w), w = count^-0.7 (a weighted draw without replacement)."""
  from objectives.masking import MaskingConfig, select_positions
  counts = np.array([0, 1, 10, 100, 1000, 5, 0, 0])  # [CLS], 5 tokens, [SEP], [PAD]
  words = np.array([-1, 0, 1, 2, 3, 4, -1, -1])
  attn = np.array([1, 1, 1, 1, 1, 1, 1, 0])
  cfg = MaskingConfig(rate=0.01, smoothing=0.7)  # budget max(1, round(7 * 0.01)) = 1
  pick = jax.jit(jax.vmap(lambda k: select_positions(k, words, attn, cfg, counts)))
  chosen = np.asarray(pick(jax.random.split(jax.random.PRNGKey(0), 20000)))
  assert (chosen.sum(1) == 1).all() and not chosen[:, [0, 6, 7]].any()
  w = np.maximum(counts[1:6], 1) ** -0.7
  np.testing.assert_allclose(chosen[:, 1:6].mean(0), w / w.sum(), atol=0.012)
  # The full budget (uniform without smoothing) and the tokens' counts from the corpus.
  full = MaskingConfig(rate=0.4, smoothing=0.7)
  many = np.asarray(jax.vmap(lambda k: select_positions(k, words, attn, full, counts))(
      jax.random.split(jax.random.PRNGKey(1), 2000)))
  assert (many.sum(1) == round(7 * 0.4)).all()
  assert many[:, 1].mean() > many[:, 4].mean() * 3  # count 1 far likelier than 1000
  with pytest.raises(ValueError, match="smoothing"):
    MaskingConfig(smoothing=0.7, whole_word=True)
  from bert_jax.data import corpus as corpus_lib, examples as examples_lib
  from objectives import mlm
  corp = corpus_lib.TokenizedCorpus(np.array([7, 7, 7, 9, 5], np.int32), np.ones(5, bool),
                                    np.array([0, 5]), np.array([0, 1]))
  make = mlm.TOKEN_COUNTS.prepare(examples_lib.FeatureContext(corp, None))
  ex = {"input_ids": np.array([2, 7, 9, 11, 3, 0])}
  np.testing.assert_array_equal(make(ex, np.array([-1, 0, 3, 4, -1, -1])), [0, 3, 1, 0, 0, 0])


def test_distilbert_preset_masks_with_smoothing_and_takes_the_kl_everywhere(models):
  from configs.pretrain import get_config
  c = get_config("distilbert,tiny")
  assert c.mlm.smoothing == 0.7 and c.distill.kl_positions == "all"
  c = distill_config(models.teacher_wd, models.student_imported.config)
  c.mlm.smoothing = 0.7
  setup = train.build_setup(c, SPECIAL)
  assert [f.name for f in setup.objectives.example_kind.features] == ["token_counts"]
