"""Downstream metrics against hand-computed values and independent numpy formulas (the
module calls sklearn, scipy and seqeval; the references here do not)."""

import warnings

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
  # references: numpy's correlation matrix, on ranks counted pairwise for Spearman
  assert scores.pearson(x, y) == pytest.approx(np.corrcoef(x, y)[0, 1], abs=1e-12)
  assert scores.spearman(x, y) == pytest.approx(
      np.corrcoef(_pairwise_ranks(x), _pairwise_ranks(y))[0, 1], abs=1e-12)


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


# ----------------------------------------------------------------------------- references


def _pairwise_ranks(x: np.ndarray) -> np.ndarray:
  """1-based average ranks by counting: #smaller + (#equal + 1) / 2."""
  x = np.asarray(x)
  return (x[None, :] < x[:, None]).sum(1) + ((x[None, :] == x[:, None]).sum(1) + 1) / 2


def _counts(p: np.ndarray, y: np.ndarray, c: int) -> tuple[int, int, int]:
  return int(np.sum((p == c) & (y == c))), int(np.sum((p == c) & (y != c))), int(
      np.sum((p != c) & (y == c)))


def _f1_ref(p: np.ndarray, y: np.ndarray, c: int) -> float:
  tp, fp, fn = _counts(p, y, c)
  return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0


def _rk_ref(p: np.ndarray, y: np.ndarray, k: int) -> float:
  """Gorodkin's R_K from the confusion matrix (counted with bincount)."""
  c = np.bincount(y * k + p, minlength=k * k).reshape(k, k).astype(np.float64)
  t, q, n = c.sum(1), c.sum(0), c.sum()
  den = np.sqrt((n * n - q @ q) * (n * n - t @ t))
  return float((np.trace(c) * n - t @ q) / den) if den > 0 else 0.0


# ----------------------------------------------------------------------------- random inputs


@pytest.mark.parametrize("k", [2, 3, 5])
def test_classification_matches_numpy_on_random_inputs(k):
  rng = np.random.default_rng(k)
  for trial in range(20):
    n = int(rng.integers(1, 60))
    y = rng.integers(0, k, n)
    # some trials predict from a subset of the classes (absent ones count as F1 0)
    p = np.where(rng.random(n) < 0.6, y, rng.integers(0, max(1, k - trial % 2), n))
    assert scores.accuracy(p, y) == pytest.approx(np.sum(p == y) / n)
    assert scores.binary_f1(p, y) == pytest.approx(_f1_ref(p, y, 1))
    assert scores.macro_f1(p, y, k + 1) == pytest.approx(  # class k never occurs
        np.mean([_f1_ref(p, y, c) for c in range(k + 1)]))
    assert scores.matthews(p, y, k) == pytest.approx(_rk_ref(p, y, k), abs=1e-12)
    np.testing.assert_array_equal(
        scores.confusion(p, y, k), np.bincount(y * k + p, minlength=k * k).reshape(k, k))
    if k == 2:  # the textbook two-class MCC
      tp, fp, fn = _counts(p, y, 1)
      tn = n - tp - fp - fn
      den = np.sqrt(float((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)))
      ref = (tp * tn - fp * fn) / den if den else 0.0
      assert scores.matthews(p, y) == pytest.approx(ref, abs=1e-12)


def test_classification_edge_cases():
  y = np.array([0, 1, 0, 1])
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # zero divisions are settled, not warned about
    assert scores.matthews(np.zeros(4, int), y) == 0.0  # constant predictions: undefined
    assert scores.matthews(y, np.zeros(4, int)) == 0.0
    assert scores.matthews(np.ones(3, int), np.ones(3, int)) == 0.0  # one class in all
    assert scores.binary_f1(np.zeros(4, int), np.zeros(4, int)) == 0.0  # no positive at all
    assert scores.macro_f1(y, y, 4) == pytest.approx(0.5)  # classes 2, 3: F1 0
    for f in (scores.accuracy, scores.binary_f1, scores.matthews):
      assert np.isnan(f(np.array([], int), np.array([], int)))
    assert np.isnan(scores.macro_f1(np.array([], int), np.array([], int), 3))
  np.testing.assert_array_equal(scores.confusion([], [], 2), np.zeros((2, 2)))
  # R_K on a 3-class example by hand: c = [[2,0,0],[0,1,1],[0,1,1]], n=6, trace 4,
  # t = q = (2,2,2): (4*6 - 12) / sqrt((36-12)(36-12)) = 12/24
  y3, p3 = np.array([0, 0, 1, 1, 2, 2]), np.array([0, 0, 1, 2, 1, 2])
  assert scores.matthews(p3, y3, 3) == pytest.approx(0.5)


def test_correlations_match_numpy_on_random_inputs():
  rng = np.random.default_rng(1)
  for _ in range(20):
    n = int(rng.integers(3, 80))
    x = rng.normal(size=n)
    if rng.random() < 0.5:
      x = np.round(x)  # ties
    y = x * rng.normal() + rng.normal(size=n)
    assert scores.pearson(x, y) == pytest.approx(np.corrcoef(x, y)[0, 1], abs=1e-10)
    assert scores.spearman(x, y) == pytest.approx(
        np.corrcoef(_pairwise_ranks(x), _pairwise_ranks(y))[0, 1], abs=1e-10)
    np.testing.assert_allclose(scores.average_ranks(x), _pairwise_ranks(x))
    assert scores.regression_scores(x, y, ["mse"])["mse"] == pytest.approx(
        np.mean((x - y) ** 2))


def test_correlation_edge_cases():
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    # constant predictions: 0 (the earlier hand-written figure; scipy would say nan)
    assert scores.pearson(np.ones(5), np.arange(5.0)) == 0.0
    assert scores.spearman(np.arange(5.0), np.full(5, 2.0)) == 0.0
    assert scores.pearson([1.0], [2.0]) == 0.0  # one pair is constant too
    assert np.isnan(scores.pearson([], []))
    assert np.isnan(scores.spearman([], []))
    assert np.isnan(scores.mse([], []))
  assert np.isnan(scores.pearson([1.0, np.nan, 3.0], [1.0, 2.0, 3.0]))  # diverged outputs
  with pytest.raises(ValueError, match="3 predictions for 2 labels"):
    scores.pearson([1.0, 2.0, 3.0], [1.0, 2.0])
  with pytest.raises(ValueError, match="unknown regression metrics"):
    scores.regression_scores([1.0], [1.0], ["r2"])


# ----------------------------------------------------------------------------- entities


def _prf(tp: int, n_pred: int, n_gold: int) -> tuple[float, float, float]:
  p = tp / n_pred if n_pred else 0.0
  r = tp / n_gold if n_gold else 0.0
  return p, r, 2 * p * r / (p + r) if p + r else 0.0


def test_entity_scores_on_a_hand_checked_conll_example():
  # IOB2 and IOB1 (I- opening a chunk, conlleval's reading)
  gold = [["B-PER", "I-PER", "O", "B-LOC", "O", "B-ORG", "I-ORG", "I-ORG"],
          ["I-MISC", "O", "B-LOC", "B-LOC", "B-PER", "I-LOC"]]
  pred = [["B-PER", "I-PER", "O", "B-ORG", "O", "B-ORG", "I-ORG", "O"],
          ["I-MISC", "O", "B-LOC", "I-LOC", "B-PER", "I-LOC"]]
  # gold: PER(0,1) LOC(3) ORG(5,7) | MISC(0) LOC(2) LOC(3) PER(4) LOC(5)  -> 8
  # pred: PER(0,1)+ ORG(3) ORG(5,6) | MISC(0)+ LOC(2,3) PER(4)+ LOC(5)+   -> 7, 4 right
  assert scores.entity_spans(gold[1]) == {("MISC", 0, 0), ("LOC", 2, 2), ("LOC", 3, 3),
                                          ("PER", 4, 4), ("LOC", 5, 5)}
  s = scores.entity_scores(gold, pred)
  p, r, f = _prf(4, 7, 8)
  assert (s["entity_precision"], s["entity_recall"], s["entity_f1"]) == pytest.approx(
      (p, r, f))
  assert s["entity_f1"] == pytest.approx(8 / 15)  # 2 tp / (n_gold + n_pred)


def test_iobes_is_scored_strictly():
  gold = [["S-PER", "O", "B-LOC", "I-LOC", "E-LOC", "O", "B-ORG", "E-ORG"]]
  pred = [["S-PER", "O", "B-LOC", "I-LOC", "O", "O", "I-ORG", "E-ORG"]]
  # strict IOBES: B-LOC I-LOC without E- and I-ORG E-ORG without B- are no entities,
  # so pred holds PER(0) only: 1 of 1 right, 1 of 3 found
  assert scores.entity_spans(pred[0]) == {("PER", 0, 0)}
  s = scores.entity_scores(gold, pred)  # IOBES inferred from the S- tag
  assert (s["entity_precision"], s["entity_recall"], s["entity_f1"]) == pytest.approx(
      (1.0, 1 / 3, 0.5))
  assert s == scores.entity_scores(gold, pred, scheme="IOBES")
  # conlleval's lenient chunking reads LOC(2,3) and ORG(6,7): 2 of 3 right, 2 of 3 found
  c = scores.entity_scores(gold, pred, scheme="IOB")
  assert (c["entity_precision"], c["entity_recall"], c["entity_f1"]) == pytest.approx(
      (2 / 3, 2 / 3, 2 / 3))
  assert scores.entity_spans(pred[0], scheme="IOB") == {("PER", 0, 0), ("LOC", 2, 3),
                                                        ("ORG", 6, 7)}
  # an S- tag alone makes it IOBES (a stray I- after it opens nothing), and so do B- and
  # E- without S-; I- and E- alone (IOE) keep conlleval's reading
  assert scores.entity_spans(["S-X", "I-X"]) == {("X", 0, 0)}
  assert scores.entity_spans(["B-X", "E-X", "B-Y", "I-Y"]) == {("X", 0, 1)}
  assert scores.entity_spans(["I-X", "E-X", "I-X"]) == {("X", 0, 1), ("X", 2, 2)}


def _random_spans(rng, n: int, types: tuple[str, ...]) -> set[tuple[str, int, int]]:
  spans, i = set(), int(rng.integers(0, 3))
  while i < n:
    length = int(min(rng.integers(1, 4), n - i))
    spans.add((str(rng.choice(types)), i, i + length - 1))
    i += length + int(rng.integers(0, 3))  # 0: the next entity starts right after
  return spans


def _encode(spans, n: int, scheme: str) -> list[str]:
  tags = ["O"] * n
  for kind, a, b in spans:
    if scheme == "IOBES" and a == b:
      tags[a] = f"S-{kind}"
      continue
    tags[a] = f"B-{kind}"
    for i in range(a + 1, b + 1):
      tags[i] = f"I-{kind}"
    if scheme == "IOBES":
      tags[b] = f"E-{kind}"
  return tags


def _perturb(rng, spans, types):
  out = set()
  for kind, a, b in spans:
    u = rng.random()
    if u < 0.5:
      out.add((kind, a, b))
    elif u < 0.65:
      out.add((str(rng.choice(types)), a, b))  # maybe another type
    elif u < 0.8 and b > a:
      out.add((kind, a, b - 1))  # one word short
    # else: missed
  return out


@pytest.mark.parametrize("scheme", ["IOB", "IOBES"])
def test_entity_scores_match_counts_on_random_sentences(scheme):
  """Well-formed random sentences whose entities are known by construction: the
  micro-averaged figures from counting those sets."""
  rng = np.random.default_rng(3 if scheme == "IOB" else 4)
  types = ("PER", "LOC", "ORG")
  gold, pred, tp, n_gold, n_pred = [], [], 0, 0, 0
  for _ in range(200):
    n = int(rng.integers(1, 16))
    gs = _random_spans(rng, n, types)
    ps = _perturb(rng, gs, types)
    g, p = _encode(gs, n, scheme), _encode(ps, n, scheme)
    assert scores.entity_spans(g) == gs
    gold.append(g)
    pred.append(p)
    tp, n_gold, n_pred = tp + len(gs & ps), n_gold + len(gs), n_pred + len(ps)
  s = scores.entity_scores(gold, pred)
  assert (s["entity_precision"], s["entity_recall"], s["entity_f1"]) == pytest.approx(
      _prf(tp, n_pred, n_gold))


def test_entity_tags_and_edge_cases():
  # bare types read as inside, "" as outside, prefixes in any case
  assert scores.entity_spans(["PER", "PER", "", "b-LOC", "i-LOC"]) == {("PER", 0, 1),
                                                                       ("LOC", 3, 4)}
  with pytest.raises(ValueError, match="prefix 'U' is not one of"):
    scores.entity_spans(["U-PER"])
  with pytest.raises(ValueError, match="not one of"):
    scores.entity_scores([["B-X"]], [["B-X"]], scheme="BILOU")
  with pytest.raises(ValueError, match="differ in number or length"):
    scores.entity_scores([["O", "B-X"]], [["O"]])
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    none = scores.entity_scores([["O", "O"]], [["O", "O"]])  # nothing to find: 0
    assert none == {"entity_precision": 0.0, "entity_recall": 0.0, "entity_f1": 0.0}
    s = scores.entity_scores([["O", "O"]], [["B-X", "O"]])  # all predictions wrong
    assert s == {"entity_precision": 0.0, "entity_recall": 0.0, "entity_f1": 0.0}
  assert all(np.isnan(v) for v in scores.entity_scores([], []).values())
