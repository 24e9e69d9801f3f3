"""Our task heads against transformers' BertFor* heads on the same weights (1e-4, fp32).

Tiny random transformers models (no download), every parameter perturbed; the encoder
(and pooler) come in through bert_jax.hf's import, the task layers are mapped here:
classifier.{weight,bias} -> params["task"]["classifier"]["dense"], qa_outputs ->
params["task"]["qa_outputs"]["dense"].
"""

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from bert_jax import hf  # noqa: E402
from bert_jax.finetune.tasks import TaskObjective  # noqa: E402
from bert_jax.model import PretrainModel  # noqa: E402

VOCAB = 99
CONFIG = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              intermediate_size=64, max_position_embeddings=40, hidden_dropout_prob=0.0,
              attention_probs_dropout_prob=0.0, attn_implementation="eager", num_labels=3)

# transformers class -> (our kind, number of outputs, HF head module name, ours)
HEADS = {
    "BertForSequenceClassification": ("classification", 3, "classifier", "classifier"),
    "BertForTokenClassification": ("tagging", 3, "classifier", "classifier"),
    "BertForQuestionAnswering": ("qa", 2, "qa_outputs", "qa_outputs"),
    "BertForMultipleChoice": ("multiple_choice", 3, "classifier", "classifier"),
}


def inputs(shape, seed=0):
  rng = np.random.RandomState(seed)
  *lead, length = shape
  ids = rng.randint(5, VOCAB, shape)
  lengths = rng.randint(length // 2, length + 1, lead)
  mask = (np.arange(length) < lengths[..., None]).astype(np.int64)
  segments = ((np.arange(length) >= lengths[..., None] // 2) & (mask > 0)).astype(np.int64)
  ids[..., 0] = 2
  ids[mask == 0] = 0
  return ids, segments, mask


@pytest.mark.parametrize("cls_name", sorted(HEADS))
def test_task_logits_match_transformers(cls_name, tmp_path):
  kind, n_out, hf_head, our_head = HEADS[cls_name]
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
  if kind in ("classification", "multiple_choice"):
    task["pooler"] = imported.params["pooler"]
  params = {"encoder": imported.params["encoder"], "task": task}

  shape = (3, 4, 12) if kind == "multiple_choice" else (4, 12)
  ids, segments, mask = inputs(shape)
  ours_model = PretrainModel(imported.config, (TaskObjective(kind, n_out),))
  forward = jax.jit(lambda p, b: ours_model.apply({"params": p}, b, deterministic=True))
  ours = forward(params, {"input_ids": ids.astype(np.int32),
                          "segment_ids": segments.astype(np.int32),
                          "attention_mask": mask.astype(np.int32)})["task"]
  with torch.no_grad():
    ref = model(input_ids=torch.tensor(ids), token_type_ids=torch.tensor(segments),
                attention_mask=torch.tensor(mask))
  if kind == "qa":
    pairs = [(ours["start"], ref.start_logits), (ours["end"], ref.end_logits)]
  else:
    pairs = [(ours, ref.logits)]
  for a, b in pairs:
    a, b = np.asarray(a), b.numpy()
    assert a.shape == b.shape
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=0)
