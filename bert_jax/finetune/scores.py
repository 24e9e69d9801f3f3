"""Downstream metrics on host numpy arrays: the figures GLUE, CoNLL and SQuAD report.

From well-kept libraries: accuracy, F1 (binary on the positive class, or macro over
classes), Matthews correlation (CoLA; Gorodkin's R_K for more than two classes) and MSE
from sklearn.metrics; Pearson and Spearman (STS-B; ties share their mean rank) from
scipy.stats; entity-level precision/recall/F1 from seqeval: conlleval's chunking (its
default mode) for BIO/IOB1 tags, seqeval's strict IOBES scheme when the tags are IOBES
(ill-formed chunks, e.g. B- without E-, are no entity).

SQuAD exact match and F1 stay written here: they are the official evaluation script's
normalisation and max over gold answers, which none of these libraries provides (an
empty gold answer list means unanswerable, matched only by an empty prediction).

Edge cases: empty inputs give nan; an undefined MCC is 0 (sklearn's convention); Pearson
and Spearman are 0 when either side is constant (as this module always did; scipy says
nan); F1 of a class never seen nor predicted is 0 (zero_division=0), and macro F1
averages over all num_classes classes.
"""

from __future__ import annotations

import collections
import re
import string
import warnings
from typing import Iterable, Mapping, Sequence

import numpy as np
from scipy import stats
from seqeval import scheme as seqeval_scheme
from seqeval.metrics import sequence_labeling as seqeval_conll
from seqeval.metrics import v1 as seqeval_strict
from sklearn import metrics as skm

# metric name -> whether higher is better (all of ours are)
CLASSIFICATION_METRICS = ("accuracy", "f1", "macro_f1", "mcc")
REGRESSION_METRICS = ("pearson", "spearman", "mse")
TAGGING_METRICS = ("entity_f1", "entity_precision", "entity_recall", "token_accuracy")
QA_METRICS = ("exact_match", "f1", "has_answer_f1", "no_answer_f1")
LOWER_IS_BETTER = ("mse", "loss")

_NAN = float("nan")


def _pair(preds: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  return np.asarray(preds).ravel(), np.asarray(labels).ravel()


def accuracy(preds: np.ndarray, labels: np.ndarray) -> float:
  p, y = _pair(preds, labels)
  return float(skm.accuracy_score(y, p)) if y.size else _NAN


def binary_f1(preds: np.ndarray, labels: np.ndarray, positive: int = 1) -> float:
  """F1 of class `positive` against all others (0 when it is neither seen nor predicted)."""
  p, y = _pair(preds, labels)
  if not y.size:
    return _NAN
  return float(skm.f1_score(y, p, labels=[positive], average="macro", zero_division=0))


def macro_f1(preds: np.ndarray, labels: np.ndarray, num_classes: int) -> float:
  """Mean F1 over classes 0..num_classes-1, absent ones included (as 0)."""
  p, y = _pair(preds, labels)
  if not y.size:
    return _NAN
  return float(skm.f1_score(y, p, labels=list(range(num_classes)), average="macro",
                            zero_division=0))


def confusion(preds: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
  """[num_classes, num_classes] counts, rows the labels, columns the predictions."""
  p, y = _pair(preds, labels)
  if not y.size:
    return np.zeros((num_classes, num_classes), np.int64)
  return skm.confusion_matrix(y, p, labels=list(range(num_classes))).astype(np.int64)


def matthews(preds: np.ndarray, labels: np.ndarray, num_classes: int | None = None) -> float:
  """Matthews correlation (Gorodkin's R_K for more than two classes); 0 when undefined.

  num_classes does not change the figure (a class nobody saw or predicted adds nothing);
  it is kept for the callers."""
  del num_classes
  p, y = _pair(preds, labels)
  if not y.size:
    return _NAN
  with warnings.catch_warnings():  # one class in all: sklearn warns, then says 0
    warnings.filterwarnings("ignore", "A single label was found", UserWarning)
    return float(skm.matthews_corrcoef(y, p))


def _constant(x: np.ndarray) -> bool:
  return bool(np.all(x == x[0]))


def _correlation(name: str, fn, x: np.ndarray, y: np.ndarray) -> float:
  """scipy's coefficient `fn`; 0 when either side is constant, nan when empty."""
  x, y = (np.asarray(v, np.float64).ravel() for v in (x, y))
  if len(x) != len(y):
    raise ValueError(f"{name}: {len(x)} predictions for {len(y)} labels")
  if not x.size:
    return _NAN
  return 0.0 if _constant(x) or _constant(y) else float(fn(x, y).statistic)


def pearson(x: np.ndarray, y: np.ndarray) -> float:
  """Pearson's r; 0 when either side is constant, nan when empty."""
  return _correlation("pearson", stats.pearsonr, x, y)


def average_ranks(x: np.ndarray) -> np.ndarray:
  """1-based ranks, tied values sharing their average rank."""
  return stats.rankdata(np.asarray(x), method="average").astype(np.float64)


def spearman(x: np.ndarray, y: np.ndarray) -> float:
  """Spearman's rho (Pearson on average ranks); 0 when either side is constant."""
  return _correlation("spearman", stats.spearmanr, x, y)


def mse(preds: np.ndarray, labels: np.ndarray) -> float:
  p, y = (np.asarray(v, np.float64).ravel() for v in (preds, labels))
  return float(skm.mean_squared_error(y, p)) if y.size else _NAN


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
  fns = {"pearson": pearson, "spearman": spearman, "mse": mse}
  unknown = [n for n in names if n not in fns]
  if unknown:
    raise ValueError(f"unknown regression metrics {unknown}; valid: {REGRESSION_METRICS}")
  return {n: fns[n](preds, labels) for n in names}


# ----------------------------------------------------------------------------- entities

ENTITY_SCHEMES = ("IOB", "IOBES")  # conlleval's chunking (BIO, IOB1); strict IOBES
_PREFIXES = ("B", "I", "E", "S")


def _normalize_tag(tag: str | None) -> str:
  """The tag seqeval reads: O for "O", "" or None; I-X for a bare type X (inside, as
  conlleval -r reads it); the prefix upper-cased; a prefix other than B/I/E/S refused."""
  if tag in ("O", "", None):
    return "O"
  prefix, sep, kind = tag.partition("-")
  if not sep:
    return f"I-{tag}"
  if prefix.upper() not in _PREFIXES:
    raise ValueError(f"entity tag {tag!r}: prefix {prefix!r} is not one of "
                     f"{', '.join(_PREFIXES)} (supported schemes: BIO/IOB1, IOBES)")
  return f"{prefix.upper()}-{kind}"


def _infer_scheme(sentences: Iterable[Sequence[str]]) -> str:
  """IOBES when an S- tag, or both B- and E- tags, occur; else IOB."""
  prefixes = {t[0] for s in sentences for t in s if t != "O"}
  return "IOBES" if "S" in prefixes or {"B", "E"} <= prefixes else "IOB"


def _prepare(sentences: Iterable[Sequence[str]]) -> list[list[str]]:
  return [[_normalize_tag(t) for t in s] for s in sentences]


def _check_scheme(scheme: str | None, *sentences: list[list[str]]) -> str:
  scheme = scheme or _infer_scheme([s for group in sentences for s in group])
  if scheme not in ENTITY_SCHEMES:
    raise ValueError(f"entity scheme {scheme!r} is not one of {ENTITY_SCHEMES}")
  return scheme


def entity_spans(tags: Sequence[str], scheme: str | None = None
                 ) -> set[tuple[str, int, int]]:
  """{(type, first, last)} of the entities in one tag sequence (seqeval's chunking; the
  scheme inferred from the tags when None)."""
  seq = _prepare([tags])
  if _check_scheme(scheme, seq) == "IOB":
    return set(seqeval_conll.get_entities(seq[0]))
  return {(e.tag, e.start, e.end - 1)  # seqeval's end is exclusive
          for e in seqeval_scheme.Tokens(seq[0], seqeval_scheme.IOBES).entities}


def entity_scores(gold: Iterable[Sequence[str]], pred: Iterable[Sequence[str]],
                  scheme: str | None = None) -> dict[str, float]:
  """Micro-averaged entity precision, recall and F1 over sentences of tags (seqeval).

  scheme: "IOB" (seqeval's default mode, conlleval-compatible) or "IOBES" (seqeval's
  strict mode); None infers it from the tags. 0 when there is no entity to divide by;
  nan for no sentences."""
  gold, pred = _prepare(gold), _prepare(pred)
  if len(gold) != len(pred) or any(len(g) != len(p) for g, p in zip(gold, pred)):
    raise ValueError(f"entity_scores: gold and predicted sentences differ in number or "
                     f"length ({len(gold)} vs {len(pred)} sentences)")
  if not gold:
    return {"entity_precision": _NAN, "entity_recall": _NAN, "entity_f1": _NAN}
  if _check_scheme(scheme, gold, pred) == "IOB":
    p, r, f, _ = seqeval_conll.precision_recall_fscore_support(
        gold, pred, average="micro", zero_division=0)
  else:
    p, r, f, _ = seqeval_strict.precision_recall_fscore_support(
        gold, pred, average="micro", zero_division=0, scheme=seqeval_scheme.IOBES)
  return {"entity_precision": float(p), "entity_recall": float(r), "entity_f1": float(f)}


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
