"""Downstream metrics against hand-computed values (and scipy where it is installed)."""

import numpy as np
import pytest

from bert_jax.finetune import scores


def test_classification_metrics():
  y = np.array([1, 1, 1, 0, 0, 0, 1, 0])
  p = np.array([1, 0, 1, 0, 1, 0, 1, 0])
  assert scores.accuracy(p, y) == 6 / 8
  # tp=3 fp=1 fn=1
  assert scores.binary_f1(p, y) == pytest.approx(0.75)
  # mcc = (tp*tn - fp*fn) / sqrt((tp+fp)(tp+fn)(tn+fp)(tn+fn)) = (9 - 1) / 16
  assert scores.matthews(p, y) == pytest.approx(0.5)
  assert scores.matthews(np.zeros(4, int), np.array([0, 1, 0, 1])) == 0.0  # undefined
  assert scores.macro_f1(p, y, 2) == pytest.approx(0.75)
  # three classes: R_K equals the two-class formula's generalisation; perfect and inverse
  y3 = np.array([0, 1, 2, 0, 1, 2])
  assert scores.matthews(y3, y3, 3) == pytest.approx(1.0)
  assert scores.classification_scores(y3, y3, 3, ["accuracy", "f1", "mcc"]) == {
      "accuracy": 1.0, "f1": 1.0, "mcc": pytest.approx(1.0)}
  with pytest.raises(ValueError, match="unknown classification metric"):
    scores.classification_scores(y3, y3, 3, ["acc"])


def test_correlations_with_ties():
  rng = np.random.default_rng(0)
  x = rng.integers(0, 5, 50).astype(float)  # many ties
  y = x + rng.normal(0, 1, 50)
  np.testing.assert_allclose(scores.average_ranks([10, 20, 20, 5]), [2, 3.5, 3.5, 1])
  assert scores.pearson(x, 2 * x + 1) == pytest.approx(1.0)
  assert scores.spearman(x, x ** 3) == pytest.approx(1.0)
  from scipy import stats
  assert scores.pearson(x, y) == pytest.approx(stats.pearsonr(x, y)[0], abs=1e-12)
  assert scores.spearman(x, y) == pytest.approx(stats.spearmanr(x, y)[0], abs=1e-12)


def test_entity_spans_follow_conlleval():
  tags = ["B-PER", "I-PER", "O", "I-LOC", "I-LOC", "B-LOC", "I-ORG", "O", "B-MISC"]
  assert scores.entity_spans(tags) == {("PER", 0, 1), ("LOC", 3, 4), ("LOC", 5, 5),
                                       ("ORG", 6, 6), ("MISC", 8, 8)}
  assert scores.entity_spans(["S-PER", "B-LOC", "E-LOC", "O"]) == {("PER", 0, 0),
                                                                   ("LOC", 1, 2)}
  gold = [["B-PER", "I-PER", "O", "B-LOC"], ["O", "B-ORG"]]
  pred = [["B-PER", "I-PER", "O", "O"], ["O", "B-LOC"]]
  s = scores.entity_scores(gold, pred)  # 1 of 2 predicted right, 1 of 3 found
  assert s["entity_precision"] == pytest.approx(0.5)
  assert s["entity_recall"] == pytest.approx(1 / 3)
  assert s["entity_f1"] == pytest.approx(0.4)


def test_squad_metrics():
  assert scores.normalize_answer("The  Ark, of the Covenant!") == "ark of covenant"
  assert scores.exact_match("the ark", "Ark") == 1.0
  assert scores.token_f1("ark of god", "the ark of the covenant") == pytest.approx(
      2 * (2 / 3) * (2 / 3) / (4 / 3))
  golds = {"a": ["Moses", "moses the prophet"], "b": [], "c": ["Egypt"]}
  preds = {"a": "Moses", "b": "", "c": "Canaan"}
  s = scores.squad_scores(preds, golds)
  assert s["exact_match"] == pytest.approx(200 / 3)
  assert s["f1"] == pytest.approx(200 / 3)
  assert s["no_answer_f1"] == 100.0 and s["has_answer_f1"] == 50.0
  assert scores.squad_scores({"b": "Aaron"}, {"b": []})["exact_match"] == 0.0
