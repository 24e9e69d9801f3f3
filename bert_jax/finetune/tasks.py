"""The fine-tuning task as an objective: its head on the shared encoder and its loss.

A task plugs into `bert_jax.train` exactly like a pretraining objective (corrupt, head,
loss; see objectives/base.py), so fine-tuning runs the same sharded, jitted
`train.train_step` (gradient accumulation included). Its parameters live at
params["task"]: {"pooler", "classifier"} for the kinds that read the pooled [CLS]
(classification, regression, multiple choice), {"classifier"} for tagging and
{"qa_outputs"} for extractive QA: the layout of transformers' BertFor* heads.

Batches always carry "example_weight" [B] (0 for the padding examples that fill the last
evaluation batch); the losses and metrics are weighted sums with their counts.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from bert_jax import heads
from bert_jax.finetune import pooling
from objectives.base import Objective

KINDS = ("classification", "regression", "tagging", "qa", "multiple_choice")
POOLED_KINDS = ("classification", "regression", "multiple_choice")


class TaskHead(nn.Module):
  """Runs the encoder (flattening multiple-choice inputs) and the task's output layer.

  Returns logits: [B, num_labels] (classification), [B] (regression), [B, L, num_labels]
  (tagging), {"start", "end"} each [B, L] (qa), [B, num_choices] (multiple choice).
  """

  cfg: Any
  kind: str
  num_outputs: int
  dropout: float | None = None  # None: the encoder's hidden dropout (as transformers)
  pooling: str = "pooler"  # bert_jax.finetune.pooling (the pooled kinds)
  pool_layers: int = 4  # the layers "concat" and "weighted" read
  multi_sample_dropout: int = 1  # training logits: the mean over this many dropout masks

  @nn.compact
  def __call__(self, encoded, batch, encoder, *, deterministic: bool):
    del encoded  # the task runs the encoder itself (multiple choice reshapes its input)
    ids, seg, mask = batch["input_ids"], batch["segment_ids"], batch["attention_mask"]
    lead = ids.shape[:-1]
    if self.kind == "multiple_choice":
      ids, seg, mask = (x.reshape(-1, x.shape[-1]) for x in (ids, seg, mask))
    pooled_kind = self.kind in POOLED_KINDS
    states = encoder(ids, seg, mask, deterministic=deterministic,
                     output_hidden_states=pooled_kind and self.pooling in pooling.NEEDS_LAYERS)
    hidden = states["hidden_states"]
    if pooled_kind:
      pooled = pooling.POOLINGS[self.pooling](self, states, mask)
      n = 1 if self.kind in ("regression", "multiple_choice") else self.num_outputs
      classifier = heads.Classifier(self.cfg, n, self.dropout, name="classifier")
      samples = 1 if deterministic else self.multi_sample_dropout
      # One classifier, `samples` dropout masks (each call draws its own): Multi-Sample
      # Dropout (Inoue 2019), the mean of the logits.
      logits = sum(classifier(pooled, deterministic=deterministic)
                   for _ in range(samples)) / samples
      if self.kind == "classification":
        return logits
      return logits[:, 0] if self.kind == "regression" else logits.reshape(lead)
    if self.kind == "tagging":
      return heads.Classifier(self.cfg, self.num_outputs, self.dropout, name="classifier")(
          hidden, deterministic=deterministic)
    if self.kind == "qa":  # transformers' BertForQuestionAnswering: no dropout here
      logits = heads.Classifier(self.cfg, 2, 0.0, name="qa_outputs")(
          hidden, deterministic=deterministic)
      return {"start": logits[..., 0], "end": logits[..., 1]}
    raise ValueError(f"unknown task kind {self.kind!r}; valid: {KINDS}")


def _weighted(values, weights):
  return heads.metric(jnp.sum(values * weights), jnp.sum(weights))


def _masked_logits(logits, mask):
  return jnp.where(mask > 0, logits, jnp.finfo(jnp.float32).min)


def task_loss(kind: str, outputs, batch) -> tuple[jax.Array, dict]:
  """(head outputs, batch) -> (weighted mean loss, metrics as (sum, count))."""
  w = batch["example_weight"].astype(jnp.float32)
  if kind in ("classification", "multiple_choice"):
    labels = batch["label"]
    ce = heads.softmax_cross_entropy(outputs, labels)
    correct = (jnp.argmax(outputs, -1) == labels).astype(jnp.float32)
    metrics = {"loss": _weighted(ce, w), "accuracy": _weighted(correct, w)}
  elif kind == "regression":
    ce = jnp.square(outputs - batch["label"].astype(jnp.float32))
    metrics = {"loss": _weighted(ce, w)}
  elif kind == "tagging":
    labels = batch["token_labels"]
    tw = (labels >= 0).astype(jnp.float32) * w[:, None]
    tok_ce = heads.softmax_cross_entropy(outputs, jnp.maximum(labels, 0))
    correct = (jnp.argmax(outputs, -1) == labels).astype(jnp.float32)
    metrics = {"loss": _weighted(tok_ce, tw), "token_accuracy": _weighted(correct, tw)}
    return jnp.sum(tok_ce * tw) / jnp.maximum(jnp.sum(tw), 1.0), metrics
  elif kind == "qa":
    mask = batch["attention_mask"]
    ce_s = heads.softmax_cross_entropy(_masked_logits(outputs["start"], mask),
                                       batch["start_position"])
    ce_e = heads.softmax_cross_entropy(_masked_logits(outputs["end"], mask),
                                       batch["end_position"])
    ce = (ce_s + ce_e) / 2
    metrics = {"loss": _weighted(ce, w)}
  else:
    raise ValueError(f"unknown task kind {kind!r}; valid: {KINDS}")
  return jnp.sum(ce * w) / jnp.maximum(jnp.sum(w), 1.0), metrics


@dataclasses.dataclass(frozen=True)
class TaskObjective(Objective):
  """A fine-tuning task behind the objective contract of objectives/base.py."""

  kind: str
  num_outputs: int  # labels (classification, tagging), choices (multiple choice), 1 or 2
  dropout: float | None = None
  pooling: str = "pooler"
  pool_layers: int = 4
  multi_sample_dropout: int = 1

  name: ClassVar[str] = "task"
  runs_encoder: ClassVar[bool] = True  # multiple choice flattens its inputs first

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"task.kind: {self.kind!r} is not one of {KINDS}")
    pooling.check(self.pooling)
    if self.multi_sample_dropout < 1:
      raise ValueError(f"head.multi_sample_dropout={self.multi_sample_dropout} must be >= 1")

  @classmethod
  def from_config(cls, config, special):
    del config, special
    raise TypeError("a fine-tuning task is not a registered pretraining objective: "
                    "bert_jax.finetune.loop.build makes it (its outputs come from the data)")

  def head(self, encoder_config, name):
    return TaskHead(encoder_config, self.kind, self.num_outputs, self.dropout, self.pooling,
                    self.pool_layers, self.multi_sample_dropout, name=name)

  def loss(self, outputs, batch):
    return task_loss(self.kind, outputs, batch)
