"""Model outputs on the dev features -> predictions per example, dev scores, JSONL rows;
on new data (no labels) -> prediction rows alone (`prediction_rows`, launch.predict).

QA decoding is original BERT's: for each window, the n-best start and end pieces inside
the context (end >= start, at most max_answer_len pieces, start in its max-context window)
scored by start + end logit; the best span over an example's windows gives the answer
text by character offsets. With SQuAD v2, the null score is the smallest [CLS] start + end
over the windows, and the answer is "" when null - best span > task.null_threshold.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from bert_jax.finetune import scores as scores_lib
from bert_jax.finetune.features import Featurized


def _softmax(x: np.ndarray) -> np.ndarray:
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def feature_output(kind: str, out: Any, j: int, n: int) -> Any:
  """Row j of a batch's task outputs as one feature's, float32 on the host: per-piece
  outputs (qa, tagging) cut back to the feature's n pieces."""
  if kind == "qa":
    return {k: np.asarray(v[j, :n], np.float32) for k, v in out.items()}
  if kind == "tagging":
    return np.asarray(out[j, :n], np.float32)
  return np.asarray(out[j], np.float32)


def best_span(start: np.ndarray, end: np.ndarray, meta: dict[str, Any], n_best: int,
              max_answer_len: int) -> tuple[float, int, int] | None:
  """(score, first context piece, last context piece) of the best span in one window."""
  offset, n = meta["offset"], len(meta["spans"])
  s_logits, e_logits = start[offset:offset + n], end[offset:offset + n]
  top_s = np.argsort(-s_logits, kind="stable")[:n_best]
  top_e = np.argsort(-e_logits, kind="stable")[:n_best]
  best = None
  for i in top_s:
    if not meta["max_context"][i]:
      continue
    for j in top_e:
      if j < i or j - i + 1 > max_answer_len:
        continue
      score = float(s_logits[i] + e_logits[j])
      if best is None or score > best[0]:
        best = (score, int(i), int(j))
  return best


def qa_answers(records, feats: Featurized, outputs: Sequence[dict[str, np.ndarray]],
               task: Any) -> list[tuple[str, float | None]]:
  """(answer text, score) per example: the best span and its start + end logit; with
  SQuAD v2's null answer, "" and the null score; ("", None) when no window has a span."""
  best: dict[int, tuple[float, str]] = {}
  null: dict[int, float] = {}
  for meta, out in zip(feats.meta, outputs):
    ex = meta["example"]
    null[ex] = min(null.get(ex, np.inf), float(out["start"][0] + out["end"][0]))
    span = best_span(out["start"], out["end"], meta, int(task.n_best),
                     int(task.max_answer_len))
    if span is not None and (ex not in best or span[0] > best[ex][0]):
      a, b = meta["spans"][span[1], 0], meta["spans"][span[2], 1]
      best[ex] = (span[0], records[ex]["context"][a:b])
  answers: list[tuple[str, float | None]] = []
  for ex in range(len(records)):
    score, text = best.get(ex, (None, ""))
    span_score = -np.inf if score is None else score
    if task.version_2 and null.get(ex, np.inf) - span_score > float(task.null_threshold):
      text, score = "", null.get(ex)
    answers.append((text, score))
  return answers


def qa_predictions(records, feats: Featurized, outputs: Sequence[dict[str, np.ndarray]],
                   task: Any) -> dict[str, str]:
  return {r["id"]: text
          for r, (text, _) in zip(records, qa_answers(records, feats, outputs, task))}


def word_tags(meta: dict[str, Any], out: np.ndarray, names: list[str]) -> np.ndarray:
  """The tag id of each word: the argmax on its first piece; words cut by seq_len are
  predicted "O" (they are the last words of the sentence)."""
  tags = np.full(meta["num_words"], names.index("O") if "O" in names else 0)
  kept = out[meta["first_pieces"]].argmax(-1)
  tags[:len(kept)] = kept
  return tags


def evaluate(kind: str, records, feats: Featurized, outputs: list[Any], task: Any,
             label_names: list[str] | None) -> tuple[dict[str, float], list[dict[str, Any]]]:
  """(dev scores, one prediction row per example)."""
  metric_names = [m.strip() for m in task.metrics.split(",") if m.strip()]
  rows: list[dict[str, Any]] = []
  if kind in ("classification", "multiple_choice"):
    logits = np.stack(outputs)
    preds, labels = logits.argmax(-1), np.asarray([r["label"] for r in records])
    k = logits.shape[-1]
    result = scores_lib.classification_scores(preds, labels, k, metric_names)
    probs = _softmax(logits.astype(np.float64))
    for i, r in enumerate(records):
      row = {"index": i, "label": int(labels[i]), "prediction": int(preds[i]),
             "probabilities": [round(float(p), 5) for p in probs[i]]}
      if kind == "classification":
        row = {"index": i, "text": r["text"], **({"text_pair": r["text_pair"]}
                                                 if r["text_pair"] is not None else {}),
               **{k_: v for k_, v in row.items() if k_ != "index"}}
        if label_names:
          row["label_name"] = label_names[row["label"]]
          row["predicted_name"] = label_names[row["prediction"]]
      rows.append(row)
    return result, rows
  if kind == "regression":
    preds = np.asarray(outputs, np.float64)
    labels = np.asarray([r["label"] for r in records], np.float64)
    result = scores_lib.regression_scores(preds, labels, metric_names)
    rows = [{"index": i, "text": r["text"], "text_pair": r["text_pair"],
             "label": float(labels[i]), "prediction": float(preds[i])}
            for i, r in enumerate(records)]
    return result, rows
  if kind == "tagging":
    names = label_names or []
    gold, pred, correct, total = [], [], 0, 0
    for r, meta, out in zip(records, feats.meta, outputs):
      tags = word_tags(meta, out, names)
      g = [names[t] for t in r["tags"]]
      p = [names[t] for t in tags]
      gold.append(g)
      pred.append(p)
      correct += int(np.sum(np.asarray(r["tags"]) == tags))
      total += len(g)
      rows.append({"index": meta["example"], "tokens": r["tokens"], "tags": g,
                   "predicted_tags": p})
    result = scores_lib.entity_scores(gold, pred)
    result["token_accuracy"] = correct / max(total, 1)
    return {k: v for k, v in result.items() if k in metric_names or k == "entity_f1"}, rows
  if kind == "qa":
    preds = qa_predictions(records, feats, outputs, task)
    golds = {r["id"]: [a["text"] for a in r["answers"]] for r in records}
    result = scores_lib.squad_scores(preds, golds)
    rows = [{"id": r["id"], "question": r["question"], "prediction": preds[r["id"]],
             "answers": golds[r["id"]]} for r in records]
    return result, rows
  raise ValueError(f"unknown task kind {kind!r}")


def prediction_rows(kind: str, records, feats: Featurized, outputs: list[Any], task: Any,
                    label_names: list[str] | None) -> list[dict[str, Any]]:
  """One row of predictions per record of new data (no labels), computed as `evaluate`
  computes them (the same softmax, rounding and decoding), so that a dev record predicts
  what predictions_dev.jsonl holds for it.

  classification {"label", "probabilities": {name: p}}; regression {"value"}; multiple
  choice {"choice", "choice_text", "probabilities": [p]}; qa {"answer", "score"}; tagging
  {"tags"} (one per word).
  """
  if kind in ("classification", "multiple_choice"):
    logits = np.stack(outputs)
    preds, probs = logits.argmax(-1), _softmax(logits.astype(np.float64))
    names = label_names or [str(i) for i in range(logits.shape[-1])]
    rows = []
    for r, k, p in zip(records, preds, probs):
      rounded = [round(float(x), 5) for x in p]
      if kind == "classification":
        rows.append({"label": names[k], "probabilities": dict(zip(names, rounded))})
      else:
        rows.append({"choice": int(k), "choice_text": r["choices"][k],
                     "probabilities": rounded})
    return rows
  if kind == "regression":
    return [{"value": float(v)} for v in np.asarray(outputs, np.float64)]
  if kind == "tagging":
    names = label_names or []
    return [{"tags": [names[t] for t in word_tags(meta, out, names)]}
            for meta, out in zip(feats.meta, outputs)]
  if kind == "qa":
    return [{"answer": text, "score": None if score is None else round(float(score), 5)}
            for text, score in qa_answers(records, feats, outputs, task)]
  raise ValueError(f"unknown task kind {kind!r}")
