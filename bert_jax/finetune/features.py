"""Records -> model inputs: tokenisation, [CLS]/[SEP] layout, truncation, labels.

A feature is a dict of numpy arrays of its own (unpadded) length:

  input_ids, segment_ids   [L] ([C, L] for multiple choice: one row per choice)
  label                    classification / multiple choice (int), regression (float)
  token_labels             tagging: [L], the word's tag on its first piece, -1 elsewhere
  start_position, end_position   qa: the answer's first and last piece (0, 0: [CLS])

plus host-side metadata kept next to it (`Featurized.meta`) to turn predictions back into
words (tagging) or answer text (qa). Sequences are `[CLS] a [SEP]` or `[CLS] a [SEP] b
[SEP]` with segment ids 0 then 1; pairs are truncated longest-first, as transformers does.
Long QA contexts are cut into windows `task.doc_stride` pieces apart (original BERT's
meaning of doc_stride), each window scored; a piece's score counts only in the window
where it has the most context on both sides. Unlabelled records (new data to predict on)
featurize alike, with placeholder labels (0; -1 for tags, ignored) that nothing reads.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import numpy as np

from bert_jax.data.tokenizer import Tokenizer


@dataclasses.dataclass
class Featurized:
  features: list[dict[str, np.ndarray]]
  meta: list[dict[str, Any]]  # one per feature
  num_examples: int
  stats: dict[str, int]


def truncate_pair(a: list[int], b: list[int], max_tokens: int) -> tuple[list[int], list[int]]:
  """Longest-first truncation from the end until len(a) + len(b) <= max_tokens."""
  a, b = list(a), list(b)
  while len(a) + len(b) > max_tokens:
    if len(a) >= len(b):
      a.pop()
    else:
      b.pop()
  return a, b


def layout(tok: Tokenizer, a: Sequence[int], b: Sequence[int] | None = None
           ) -> tuple[np.ndarray, np.ndarray]:
  ids = [tok.cls_id, *a, tok.sep_id]
  seg = [0] * len(ids)
  if b is not None:
    ids += [*b, tok.sep_id]
    seg += [1] * (len(b) + 1)
  return np.asarray(ids, np.int32), np.asarray(seg, np.int32)


def _seq_pair(tok, a, b, seq_len):
  if b is None:
    return layout(tok, a[:seq_len - 2])
  a, b = truncate_pair(a, b, seq_len - 3)
  return layout(tok, a, b)


# ----------------------------------------------------------------------------- offsets


@functools.lru_cache(maxsize=8)
def _sentencepiece(path: str):
  import sentencepiece as spm
  return spm.SentencePieceProcessor(model_file=path)


def encode_with_offsets(tok: Tokenizer, text: str) -> tuple[list[int], np.ndarray]:
  """(ids, [n, 2] character spans [begin, end) of each piece in `text`).

  Spans exclude the whitespace a piece's word-boundary marker stands for; a piece that is
  only that marker gets an empty span at the next word. The ids equal `tok.encode(text)`.
  """
  own = getattr(tok, "encode_with_offsets", None)
  if own is not None:  # a tokenizer that reports offsets itself (tokenizer.json)
    return own(text)
  path = getattr(tok, "path", None)
  if path is None:
    raise ValueError(f"{type(tok).__name__} gives no character offsets; extractive QA needs "
                     "a sentencepiece tokenizer")
  proto = _sentencepiece(str(path)).encode_as_immutable_proto(text)
  # The immutable proto's begin/end are character offsets already.
  char_of_byte = np.arange(len(text) + 1, dtype=np.int64)
  ids, spans = [], []
  for p in proto.pieces:
    b, e = char_of_byte[p.begin], char_of_byte[p.end]
    while b < e and text[b].isspace():
      b += 1
    ids.append(p.id)
    spans.append((b, e))
  return ids, np.asarray(spans, np.int64).reshape(-1, 2)


# ----------------------------------------------------------------------------- kinds


def sequence_features(records, tok: Tokenizer, seq_len: int, kind: str) -> Featurized:
  texts = tok.encode_batch([r["text"] for r in records])
  pairs = [None] * len(records)
  if any(r["text_pair"] is not None for r in records):
    pairs = tok.encode_batch([r["text_pair"] or "" for r in records])
  feats, meta, truncated = [], [], 0
  dtype = np.float32 if kind == "regression" else np.int32
  for i, (r, a, b) in enumerate(zip(records, texts, pairs)):
    ids, seg = _seq_pair(tok, a, b, seq_len)
    truncated += len(a) + (len(b) + 1 if b is not None else 0) + 2 > seq_len
    feats.append({"input_ids": ids, "segment_ids": seg,
                  "label": np.asarray(r.get("label", 0), dtype)})
    meta.append({"example": i})
  return Featurized(feats, meta, len(records), {"truncated": int(truncated)})


def choice_features(records, tok: Tokenizer, seq_len: int) -> Featurized:
  contexts = tok.encode_batch([r["context"] for r in records])
  flat_choices = tok.encode_batch([c for r in records for c in r["choices"]])
  feats, meta, k, truncated = [], [], 0, 0
  for i, (r, a) in enumerate(zip(records, contexts)):
    rows = []
    for _ in r["choices"]:
      b = flat_choices[k]
      k += 1
      truncated += len(a) + len(b) + 3 > seq_len
      rows.append(_seq_pair(tok, a, b, seq_len) if a else layout(tok, b[:seq_len - 2]))
    width = max(len(ids) for ids, _ in rows)
    ids = np.full((len(rows), width), tok.pad_id, np.int32)
    seg = np.zeros((len(rows), width), np.int32)
    mask = np.zeros((len(rows), width), np.int32)
    for j, (x, s) in enumerate(rows):
      ids[j, :len(x)], seg[j, :len(s)], mask[j, :len(x)] = x, s, 1
    feats.append({"input_ids": ids, "segment_ids": seg, "attention_mask": mask,
                  "label": np.asarray(r.get("label", 0), np.int32)})
    meta.append({"example": i})
  return Featurized(feats, meta, len(records), {"truncated": int(truncated)})


def tagging_features(records, tok: Tokenizer, seq_len: int) -> Featurized:
  """First-piece labelling: each word's tag on its first piece, -1 on the others."""
  words = [w for r in records for w in r["tokens"]]
  pieces = tok.encode_batch(words)
  feats, meta, k, truncated_words = [], [], 0, 0
  for i, r in enumerate(records):
    ids, labels, first = [], [], []
    for w, tag in zip(r["tokens"], r.get("tags") or [-1] * len(r["tokens"])):
      p = pieces[k] or [tok.unk_id]
      k += 1
      if len(ids) + len(p) > seq_len - 2:
        truncated_words += 1
        continue
      first.append(len(ids) + 1)  # +1: [CLS]
      ids += p
      labels += [tag] + [-1] * (len(p) - 1)
    x, seg = layout(tok, ids)
    feats.append({"input_ids": x, "segment_ids": seg,
                  "token_labels": np.asarray([-1, *labels, -1], np.int32)})
    meta.append({"example": i, "first_pieces": np.asarray(first, np.int64),
                 "num_words": len(r["tokens"])})
  return Featurized(feats, meta, len(records), {"truncated_words": int(truncated_words)})


def answer_char_span(context: str, answer: dict[str, Any]) -> tuple[int, int] | None:
  """[start, end) of the answer in the context: at its recorded start, else its first
  occurrence; None when the text is not in the context."""
  text, start = answer["text"], answer["start"]
  if 0 <= start and context[start:start + len(text)] == text:
    return start, start + len(text)
  found = context.find(text)
  return (found, found + len(text)) if found >= 0 else None


def qa_features(records, tok: Tokenizer, seq_len: int, *, max_query_len: int,
                doc_stride: int) -> Featurized:
  feats, meta = [], []
  stats = {"windows": 0, "answer_not_found": 0, "answer_outside_window": 0}
  questions = tok.encode_batch([r["question"] for r in records])
  for i, (r, q) in enumerate(zip(records, questions)):
    q = q[:max_query_len]
    ctx_ids, spans = encode_with_offsets(tok, r["context"])
    room = seq_len - len(q) - 3
    if room < 1:
      raise ValueError(f"seq_len={seq_len} leaves no room for the context after a question "
                       f"of {len(q)} pieces (task.max_query_len={max_query_len})")
    stride = min(doc_stride, room)
    starts = [0]  # window starts, as original BERT: until a window reaches the end
    while starts[-1] + room < len(ctx_ids):
      starts.append(starts[-1] + stride)
    target = None
    if r.get("answers"):
      span = answer_char_span(r["context"], r["answers"][0])
      if span is None:
        stats["answer_not_found"] += 1
      else:
        # pieces overlapping the answer's characters
        inside = np.flatnonzero((spans[:, 1] > span[0]) & (spans[:, 0] < span[1])
                                & (spans[:, 1] > spans[:, 0]))
        if inside.size:
          target = (int(inside[0]), int(inside[-1]))
    offset = len(q) + 2  # [CLS] q [SEP]
    for s in starts:
      window = ctx_ids[s:s + room]
      ids, seg = layout(tok, q, window)
      start_pos = end_pos = 0
      if target is not None and s <= target[0] and target[1] < s + len(window):
        start_pos, end_pos = target[0] - s + offset, target[1] - s + offset
      elif target is not None:
        stats["answer_outside_window"] += 1
      # max-context: a piece belongs to the window where min(left, right) context is largest
      n = len(window)
      max_ctx = np.zeros(n, bool)
      for j in range(n):
        pos = s + j
        score = min(j, n - 1 - j) + 0.01 * n
        best = max(min(pos - t, t + min(room, len(ctx_ids) - t) - 1 - pos)
                   + 0.01 * min(room, len(ctx_ids) - t)
                   for t in starts if t <= pos < t + room)
        max_ctx[j] = score >= best
      feats.append({"input_ids": ids, "segment_ids": seg,
                    "start_position": np.asarray(start_pos, np.int32),
                    "end_position": np.asarray(end_pos, np.int32)})
      meta.append({"example": i, "offset": offset, "spans": spans[s:s + n],
                   "max_context": max_ctx})
      stats["windows"] += 1
  return Featurized(feats, meta, len(records), stats)


def featurize(kind: str, records, tok: Tokenizer, seq_len: int, task: Any) -> Featurized:
  if kind in ("classification", "regression"):
    return sequence_features(records, tok, seq_len, kind)
  if kind == "multiple_choice":
    return choice_features(records, tok, seq_len)
  if kind == "tagging":
    return tagging_features(records, tok, seq_len)
  if kind == "qa":
    return qa_features(records, tok, seq_len, max_query_len=int(task.max_query_len),
                       doc_stride=int(task.doc_stride))
  raise ValueError(f"unknown task kind {kind!r}")
