"""Downstream metrics on host numpy arrays: the figures GLUE, CoNLL and SQuAD report.

accuracy; F1 (binary on the positive class, or macro over classes); Matthews correlation
(CoLA; the multi-class R_K form, which is the usual MCC for two classes); Pearson and
Spearman (STS-B; Spearman is Pearson on average ranks, ties share their mean rank);
entity-level precision/recall/F1 on BIO/IOB/IOBES tags (conlleval's chunking rules);
SQuAD exact match and F1 (the official normalisation; an empty gold answer list means
unanswerable, matched only by an empty prediction).
"""

from __future__ import annotations

import collections
import re
import string
from typing import Iterable, Mapping, Sequence

import numpy as np

# metric name -> whether higher is better (all of ours are)
CLASSIFICATION_METRICS = ("accuracy", "f1", "macro_f1", "mcc")
REGRESSION_METRICS = ("pearson", "spearman", "mse")
TAGGING_METRICS = ("entity_f1", "entity_precision", "entity_recall", "token_accuracy")
QA_METRICS = ("exact_match", "f1", "has_answer_f1", "no_answer_f1")
LOWER_IS_BETTER = ("mse", "loss")


def accuracy(preds: np.ndarray, labels: np.ndarray) -> float:
  preds, labels = np.asarray(preds), np.asarray(labels)
  return float(np.mean(preds == labels)) if labels.size else float("nan")


def _f1(tp: float, fp: float, fn: float) -> float:
  return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0


def binary_f1(preds: np.ndarray, labels: np.ndarray, positive: int = 1) -> float:
  p, y = np.asarray(preds) == positive, np.asarray(labels) == positive
  return _f1(np.sum(p & y), np.sum(p & ~y), np.sum(~p & y))


def macro_f1(preds: np.ndarray, labels: np.ndarray, num_classes: int) -> float:
  return float(np.mean([binary_f1(preds, labels, c) for c in range(num_classes)]))


def confusion(preds: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
  m = np.zeros((num_classes, num_classes), np.int64)
  np.add.at(m, (np.asarray(labels), np.asarray(preds)), 1)
  return m


def matthews(preds: np.ndarray, labels: np.ndarray, num_classes: int | None = None) -> float:
  """Matthews correlation (Gorodkin's R_K for more than two classes); 0 when undefined."""
  preds, labels = np.asarray(preds, np.int64), np.asarray(labels, np.int64)
  k = num_classes or int(max(preds.max(initial=0), labels.max(initial=0)) + 1)
  c = confusion(preds, labels, k).astype(np.float64)
  t, p = c.sum(1), c.sum(0)  # true and predicted counts per class
  n, correct = c.sum(), np.trace(c)
  den = np.sqrt((n * n - p @ p) * (n * n - t @ t))
  return float((correct * n - t @ p) / den) if den > 0 else 0.0


def pearson(x: np.ndarray, y: np.ndarray) -> float:
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  x, y = x - x.mean(), y - y.mean()
  den = np.sqrt((x @ x) * (y @ y))
  return float(x @ y / den) if den > 0 else 0.0


def average_ranks(x: np.ndarray) -> np.ndarray:
  """1-based ranks, tied values sharing their average rank."""
  x = np.asarray(x)
  order = np.argsort(x, kind="stable")
  sorted_x = x[order]
  starts = np.r_[True, sorted_x[1:] != sorted_x[:-1]]
  group = np.cumsum(starts) - 1
  first = np.flatnonzero(starts)
  last = np.r_[first[1:], len(x)] - 1
  ranks = np.empty(len(x), np.float64)
  ranks[order] = (first[group] + last[group]) / 2 + 1
  return ranks


def spearman(x: np.ndarray, y: np.ndarray) -> float:
  return pearson(average_ranks(x), average_ranks(y))


def classification_scores(preds: np.ndarray, labels: np.ndarray, num_classes: int,
                          names: Sequence[str]) -> dict[str, float]:
  out = {}
  for name in names:
    if name == "accuracy":
      out[name] = accuracy(preds, labels)
    elif name == "f1":
      out[name] = (binary_f1(preds, labels) if num_classes == 2
                   else macro_f1(preds, labels, num_classes))
    elif name == "macro_f1":
      out[name] = macro_f1(preds, labels, num_classes)
    elif name == "mcc":
      out[name] = matthews(preds, labels, num_classes)
    else:
      raise ValueError(f"unknown classification metric {name!r}; valid: "
                       f"{CLASSIFICATION_METRICS}")
  return out


def regression_scores(preds: np.ndarray, labels: np.ndarray,
                      names: Sequence[str]) -> dict[str, float]:
  fns = {"pearson": pearson, "spearman": spearman,
         "mse": lambda p, y: float(np.mean((np.asarray(p) - np.asarray(y)) ** 2))}
  unknown = [n for n in names if n not in fns]
  if unknown:
    raise ValueError(f"unknown regression metrics {unknown}; valid: {REGRESSION_METRICS}")
  return {n: fns[n](preds, labels) for n in names}


# ----------------------------------------------------------------------------- entities


def _split_tag(tag: str) -> tuple[str, str]:
  if tag in ("O", "", None):
    return "O", ""
  prefix, sep, kind = tag.partition("-")
  if not sep:  # a bare type ("PER") reads as inside
    return "I", tag
  return prefix.upper(), kind


def _chunk_ends(prev: str, tag: str, prev_type: str, kind: str) -> bool:
  return (prev in ("E", "S") or (prev in ("B", "I") and tag in ("B", "S", "O"))
          or (prev != "O" and prev_type != kind))


def _chunk_starts(prev: str, tag: str, prev_type: str, kind: str) -> bool:
  return (tag in ("B", "S") or (prev in ("E", "S", "O") and tag in ("E", "I"))
          or (tag != "O" and prev_type != kind))


def entity_spans(tags: Sequence[str]) -> set[tuple[str, int, int]]:
  """{(type, first, last)} of the entities in one tag sequence (conlleval's rules)."""
  spans = set()
  prev, prev_type, start = "O", "", None
  for i, tag in enumerate(list(tags) + ["O"]):
    prefix, kind = _split_tag(tag)
    if start is not None and _chunk_ends(prev, prefix, prev_type, kind):
      spans.add((prev_type, start, i - 1))
      start = None
    if _chunk_starts(prev, prefix, prev_type, kind):
      start = i
    prev, prev_type = prefix, kind
  return spans


def entity_scores(gold: Iterable[Sequence[str]], pred: Iterable[Sequence[str]]
                  ) -> dict[str, float]:
  """Micro-averaged entity precision, recall and F1 over sentences of tags."""
  tp = n_gold = n_pred = 0
  for g, p in zip(gold, pred, strict=True):
    gs, ps = entity_spans(g), entity_spans(p)
    tp += len(gs & ps)
    n_gold += len(gs)
    n_pred += len(ps)
  precision = tp / n_pred if n_pred else 0.0
  recall = tp / n_gold if n_gold else 0.0
  f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
  return {"entity_precision": precision, "entity_recall": recall, "entity_f1": f1}


# ----------------------------------------------------------------------------- SQuAD

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCT = set(string.punctuation)


def normalize_answer(s: str) -> str:
  """SQuAD's normalisation: lower case, no punctuation, no articles, single spaces."""
  s = "".join(ch for ch in s.lower() if ch not in _PUNCT)
  return " ".join(_ARTICLES.sub(" ", s).split())


def exact_match(prediction: str, gold: str) -> float:
  return float(normalize_answer(prediction) == normalize_answer(gold))


def token_f1(prediction: str, gold: str) -> float:
  p, g = normalize_answer(prediction).split(), normalize_answer(gold).split()
  if not p or not g:  # unanswerable: both empty is a match
    return float(p == g)
  common = collections.Counter(p) & collections.Counter(g)
  same = sum(common.values())
  if same == 0:
    return 0.0
  precision, recall = same / len(p), same / len(g)
  return 2 * precision * recall / (precision + recall)


def squad_scores(predictions: Mapping[str, str], golds: Mapping[str, Sequence[str]]
                 ) -> dict[str, float]:
  """EM and F1 in percent, max over each question's gold answers; ids without a
  prediction count as wrong. Splits has/no-answer F1 when some questions are unanswerable."""
  em, f1, has, no = [], [], [], []
  for qid, answers in golds.items():
    answers = [a for a in answers if normalize_answer(a)] or [""]
    pred = predictions.get(qid, None)
    if pred is None:
      e = f = 0.0
    else:
      e = max(exact_match(pred, a) for a in answers)
      f = max(token_f1(pred, a) for a in answers)
    em.append(e)
    f1.append(f)
    (has if answers != [""] else no).append(f)
  out = {"exact_match": 100 * float(np.mean(em)) if em else float("nan"),
         "f1": 100 * float(np.mean(f1)) if f1 else float("nan")}
  if no:
    out["has_answer_f1"] = 100 * float(np.mean(has)) if has else float("nan")
    out["no_answer_f1"] = 100 * float(np.mean(no))
  return out


# The dev scores each task kind can report (besides "loss").
METRICS_BY_KIND = {
    "classification": CLASSIFICATION_METRICS, "multiple_choice": CLASSIFICATION_METRICS,
    "regression": REGRESSION_METRICS, "tagging": TAGGING_METRICS, "qa": QA_METRICS,
}


def check_metrics(task) -> None:
  """Refuses unknown task.metrics or a task.main_metric they do not give, before training
  (a ValueError naming the valid ones)."""
  kind = task.kind
  if kind not in METRICS_BY_KIND:
    raise ValueError(f"task.kind: {kind!r} is not one of {sorted(METRICS_BY_KIND)}")
  valid = METRICS_BY_KIND[kind]
  names = [m.strip() for m in (task.metrics or "").split(",") if m.strip()]
  unknown = [m for m in names if m not in valid]
  if unknown:
    raise ValueError(f"task.metrics: {', '.join(map(repr, unknown))} not a {kind} metric; "
                     f"valid: {', '.join(valid)}")
  reported = set(names) | {"loss"}
  if kind == "tagging":
    reported.add("entity_f1")
  if kind == "qa":
    reported |= {"exact_match", "f1"} | ({"has_answer_f1", "no_answer_f1"}
                                         if task.get("version_2") else set())
  if task.main_metric not in reported:
    raise ValueError(f"task.main_metric={task.main_metric!r} is not among the dev scores "
                     f"this task reports ({', '.join(sorted(reported))}); set "
                     "--config.task.main_metric to one of them or add it to task.metrics")
