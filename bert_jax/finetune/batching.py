"""Host-side batching: dynamic padding to a bounded set of lengths, length bucketing.

With `data.dynamic_padding`, a batch is padded to its longest sequence rounded up to a
multiple of `data.pad_multiple` (at most `data.seq_len`), so a run compiles at most
seq_len / pad_multiple step shapes. With `data.bucket`, each epoch's shuffled order is cut
into chunks of `bucket_batches` batches, each chunk sorted by length before it is cut into
batches, and the batches shuffled: batches of similar lengths, random batch order.
The order is a function of (seed, epoch) alone, so a resumed run replays it exactly.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

PAD_VALUES = {"input_ids": None, "segment_ids": 0, "attention_mask": 0, "token_labels": -1}


def feature_length(feature: dict[str, np.ndarray]) -> int:
  return int(feature["input_ids"].shape[-1])


def bucket_length(longest: int, seq_len: int, multiple: int, dynamic: bool) -> int:
  if not dynamic:
    return seq_len
  multiple = max(int(multiple), 1)
  return min(seq_len, -(-longest // multiple) * multiple)


def collate(features: Sequence[dict[str, np.ndarray]], length: int, batch_size: int,
            pad_id: int) -> dict[str, np.ndarray]:
  """Pads `features` to `length` and fills the batch up to `batch_size` with copies of the
  first feature of weight 0."""
  n = len(features)
  if n == 0 or n > batch_size:
    raise ValueError(f"cannot make a batch of {batch_size} from {n} features")
  rows = list(features) + [features[0]] * (batch_size - n)
  out: dict[str, np.ndarray] = {}
  keys = list(rows[0])
  if "attention_mask" not in keys:
    keys.append("attention_mask")
  for key in keys:
    if key in PAD_VALUES:
      fill = pad_id if key == "input_ids" else PAD_VALUES[key]
      lead = rows[0]["input_ids"].shape[:-1]
      arr = np.full((batch_size, *lead, length), fill, np.int32)
      for i, f in enumerate(rows):
        x = f[key] if key in f else np.ones_like(f["input_ids"])
        arr[i, ..., :x.shape[-1]] = x
      out[key] = arr
    else:
      out[key] = np.stack([np.asarray(f[key]) for f in rows])
  out["example_weight"] = (np.arange(batch_size) < n).astype(np.float32)
  return out


def padded_batch(features: Sequence[dict[str, np.ndarray]], batch_size: int, pad_id: int,
                 seq_len: int, multiple: int, dynamic: bool) -> dict[str, np.ndarray]:
  """`features` collated at their bucketed length (dynamic padding), as the dev
  evaluation batches them."""
  longest = max(feature_length(f) for f in features)
  return collate(features, bucket_length(longest, seq_len, multiple, dynamic), batch_size,
                 pad_id)


def epoch_batches(lengths: np.ndarray, batch_size: int, seed: int, epoch: int,
                  bucket: bool, bucket_batches: int = 50) -> list[np.ndarray]:
  """The index batches of one training epoch (the last partial batch dropped)."""
  rng = np.random.default_rng([seed, epoch])
  order = rng.permutation(len(lengths))
  if bucket:
    chunk = batch_size * max(bucket_batches, 1)
    order = np.concatenate([
        part[np.argsort(lengths[part], kind="stable")]
        for part in np.array_split(order, max(len(order) // chunk, 1))])
  n = len(order) // batch_size
  batches = [order[i * batch_size:(i + 1) * batch_size] for i in range(n)]
  if bucket:
    batches = [batches[i] for i in rng.permutation(n)]
  return batches


def eval_batches(lengths: np.ndarray, batch_size: int, sort: bool) -> list[np.ndarray]:
  """Every index once, in batches of at most batch_size (sorted by length if `sort`)."""
  order = np.argsort(lengths, kind="stable") if sort else np.arange(len(lengths))
  return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
