"""Our task heads and losses against transformers' BertFor* heads on the same weights.

Tiny random transformers models (no download), every parameter perturbed; the encoder
(and pooler) come in through bert_jax.hf's import, the task layers are mapped here:
classifier.{weight,bias} -> params["task"]["classifier"]["dense"], qa_outputs ->
params["task"]["qa_outputs"]["dense"]. Logits agree within 1e-4, and `task_loss` with
transformers' `out.loss` given the same labels within 1e-5 (fp32).

Label conventions mapped onto transformers': tagging ignores labels < 0 (ours) where
transformers ignores -100, so the ignored tokens carry -100 in both; regression is
`num_labels=1` (transformers' problem_type "regression", MSE); our QA loss masks padded
logits and transformers' does not, so the QA loss is compared on unpadded inputs.
"""

import jax
import numpy as np
import pytest

import torch
import transformers

from bert_jax import hf  # noqa: E402
from bert_jax.finetune.tasks import TaskObjective  # noqa: E402
from bert_jax.model import PretrainModel  # noqa: E402

VOCAB = 99
CONFIG = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              intermediate_size=64, max_position_embeddings=40, hidden_dropout_prob=0.0,
              attention_probs_dropout_prob=0.0, attn_implementation="eager", num_labels=3)
LOSS_TOL = 1e-5

# our kind -> (transformers class, number of outputs, HF head module name, ours)
HEADS = {
    "classification": ("BertForSequenceClassification", 3, "classifier", "classifier"),
    "regression": ("BertForSequenceClassification", 1, "classifier", "classifier"),
    "tagging": ("BertForTokenClassification", 3, "classifier", "classifier"),
    "qa": ("BertForQuestionAnswering", 2, "qa_outputs", "qa_outputs"),
    "multiple_choice": ("BertForMultipleChoice", 3, "classifier", "classifier"),
}


def inputs(shape, seed=0, padded=True):
  rng = np.random.RandomState(seed)
  *lead, length = shape
  ids = rng.randint(5, VOCAB, shape)
  lengths = rng.randint(length // 2, length + 1, lead) if padded else np.full(lead, length)
  mask = (np.arange(length) < lengths[..., None]).astype(np.int64)
  segments = ((np.arange(length) >= lengths[..., None] // 2) & (mask > 0)).astype(np.int64)
  ids[..., 0] = 2
  ids[mask == 0] = 0
  return ids, segments, mask


def labels_for(kind, n_out, mask, seed=1):
  """(our batch's label entries, transformers' label kwargs) for the same targets."""
  rng = np.random.RandomState(seed)
  batch = mask.shape[0]
  if kind in ("classification", "multiple_choice"):
    y = rng.randint(0, n_out, batch)
    return {"label": y.astype(np.int32)}, {"labels": torch.tensor(y)}
  if kind == "regression":
    y = rng.randn(batch).astype(np.float32)
    return {"label": y}, {"labels": torch.tensor(y)}
  if kind == "tagging":  # padding, [CLS] and some word pieces ignored (-100 in both)
    y = rng.randint(0, n_out, mask.shape)
    y[(mask == 0) | (rng.rand(*mask.shape) < 0.25)] = -100
    y[:, 0] = -100
    assert (y >= 0).any() and (y == -100).any()
    return {"token_labels": y.astype(np.int32)}, {"labels": torch.tensor(y)}
  if kind == "qa":
    length = mask.shape[-1]
    start = rng.randint(0, length, batch)
    end = np.minimum(start + rng.randint(0, 4, batch), length - 1)
    return ({"start_position": start.astype(np.int32), "end_position": end.astype(np.int32)},
            {"start_positions": torch.tensor(start), "end_positions": torch.tensor(end)})
  raise ValueError(kind)


def subset(hf_labels, rows):
  return {k: v[rows] for k, v in hf_labels.items()}


@pytest.mark.parametrize("kind", sorted(HEADS))
def test_task_logits_and_loss_match_transformers(kind, tmp_path):
  cls_name, n_out, hf_head, our_head = HEADS[kind]
  torch.manual_seed(0)
  config = transformers.BertConfig(**dict(CONFIG, num_labels=n_out))
  model = getattr(transformers, cls_name)(config).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  model.save_pretrained(tmp_path)
  imported = hf.load(str(tmp_path))  # encoder (+ pooler) through the interop import
  state = {k: v.numpy() for k, v in model.state_dict().items()}
  task = {our_head: {"dense": {"kernel": state[f"{hf_head}.weight"].T,
                               "bias": state[f"{hf_head}.bias"]}}}
  if kind in ("classification", "regression", "multiple_choice"):
    task["pooler"] = imported.params["pooler"]
  params = {"encoder": imported.params["encoder"], "task": task}

  objective = TaskObjective(kind, n_out)
  ours_model = PretrainModel(imported.config, (objective,))
  forward = jax.jit(lambda p, b: ours_model.apply({"params": p}, b, deterministic=True))
  loss_fn = jax.jit(objective.loss)
  shape = (3, 4, 12) if kind == "multiple_choice" else (4, 12)

  def run_both(padded):
    ids, segments, mask = inputs(shape, padded=padded)
    ours_labels, hf_labels = labels_for(kind, n_out, mask)
    batch = {"input_ids": ids.astype(np.int32), "segment_ids": segments.astype(np.int32),
             "attention_mask": mask.astype(np.int32), **ours_labels}
    ours = forward(params, batch)["task"]
    hf_inputs = dict(input_ids=torch.tensor(ids), token_type_ids=torch.tensor(segments),
                     attention_mask=torch.tensor(mask))
    with torch.no_grad():
      ref = model(**hf_inputs, **hf_labels)
      # The last example as evaluation padding (weight 0): the loss of the other rows.
      ref_sub = model(**{k: v[:-1] for k, v in hf_inputs.items()},
                      **subset(hf_labels, slice(None, -1)))
    return batch, ours, ref, ref_sub

  batch, ours, ref, ref_sub = run_both(padded=True)
  if kind == "qa":
    pairs = [(ours["start"], ref.start_logits), (ours["end"], ref.end_logits)]
  elif kind == "regression":
    pairs = [(ours, ref.logits[:, 0])]
  else:
    pairs = [(ours, ref.logits)]
  for a, b in pairs:
    a, b = np.asarray(a), b.numpy()
    assert a.shape == b.shape
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=0)

  if kind == "qa":  # our loss masks padded logits; transformers' softmax runs over them
    batch, ours, ref, ref_sub = run_both(padded=False)
  n = batch["input_ids"].shape[0]
  loss, metrics = loss_fn(ours, dict(batch, example_weight=np.ones(n, np.float32)))
  assert abs(float(loss) - float(ref.loss)) < LOSS_TOL, (float(loss), float(ref.loss))
  total, count = (float(x) for x in metrics["loss"])
  assert abs(total / count - float(ref.loss)) < LOSS_TOL
  weights = np.ones(n, np.float32)
  weights[-1] = 0.0
  loss, _ = loss_fn(ours, dict(batch, example_weight=weights))
  assert abs(float(loss) - float(ref_sub.loss)) < LOSS_TOL, (float(loss), float(ref_sub.loss))
  assert abs(float(ref_sub.loss) - float(ref.loss)) > 1e-3  # the weight did change the loss
