"""Predictions on new data: a fine-tuned workdir's task, or fill-mask with a pretraining
workdir's MLM head (what `launch.predict` runs).

A fine-tuned workdir (launch.finetune's, or launch.compress's: config.json with the task,
encoder_config.json, the tokenizer, labels.json, best/checkpoints/ and checkpoints/)
predicts its task on the rows of a CSV, TSV, JSONL or plain-text file. The rows are read
with the field names of the workdir's config.task, then featurized, batched (dynamic
length, in length order) and decoded by the functions of the dev evaluation, on the model
the loop evaluates (`loop.task_model`): a dev row predicts what predictions_dev.jsonl
holds for it.

A pretraining workdir (no encoder_config.json) whose objectives include one with an MLM
head fills masks: for each [MASK] (the tokenizer's mask token) of each input line, the
top-k tokens with their probabilities. The model is the run's own (`PretrainModel` with
that objective alone: its head at the masked positions), with the vocabulary past the
tokenizer's (a table padded to a multiple of 128) kept out of the softmax, as in its loss.

A row the model cannot read (malformed JSON, a missing field, an empty text, a CSV row
with the wrong number of columns, a fill-mask line without a mask) is a ValueError naming
its file and line, raised before any checkpoint is read.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from bert_jax import checkpoint as checkpoint_lib
from bert_jax import run_config
from bert_jax.compress import workdir as finetuned_lib
from bert_jax.data import tokenizer as tokenizer_lib
from bert_jax.encoder import EncoderConfig
from bert_jax.finetune import batching, features as features_lib, loop, predictions
from bert_jax.finetune import readers, restore
from bert_jax.model import PretrainModel

FINETUNED = "finetuned"
FILL_MASK = "fill_mask"
WHICH = ("best", "latest")
TABLE_EXTENSIONS = (".csv", ".tsv", ".jsonl", ".json")  # anything else: plain text
FILL_MASK_TEXT_KEY = "text"  # the field fill-mask reads from CSV/TSV/JSONL rows
FILL_MASK_PAD_MULTIPLE = 16  # dynamic padding of fill-mask batches
PLAIN_TEXT_KINDS = ("classification", "regression", "tagging")


@dataclasses.dataclass
class Example:
  line: int  # the input's line (a JSON list's item number)
  where: str  # "FILE:LINE", what messages name
  record: Any  # readers.input_record's dict; fill-mask: the line's text


@dataclasses.dataclass
class Result:
  mode: str  # FINETUNED | FILL_MASK
  kind: str  # the task kind, or "fill_mask"
  workdir: str
  step: int  # of the checkpoint used
  which: str
  out: str
  rows: list[dict[str, Any]]


# ----------------------------------------------------------------------------- inputs


def workdir_mode(workdir: str) -> str:
  """FINETUNED (encoder_config.json beside config.json) or FILL_MASK (a pretraining run)."""
  if not os.path.isfile(os.path.join(workdir, run_config.CONFIG_FILE)):
    raise ValueError(f"{workdir!r} is not a bert-jax workdir (no {run_config.CONFIG_FILE}): "
                     "give a fine-tuned workdir (launch.finetune) or a pretraining one with "
                     "an MLM head (launch.pretrain)")
  if os.path.isfile(os.path.join(workdir, restore.ENCODER_CONFIG_FILE)):
    return FINETUNED
  return FILL_MASK


def is_table(path: str) -> bool:
  base = path[:-3] if path.endswith(".gz") else path
  return os.path.splitext(base)[1].lower() in TABLE_EXTENSIONS


def _line_record(kind: str | None, line: str, where: str) -> Any:
  """A plain-text line as a record: the text (fill-mask, classification, regression) or
  its whitespace-split words (tagging)."""
  if not line.strip():
    raise ValueError(f"{where}: empty line (a plain-text input holds one example per line)")
  if kind is None:
    return line
  if kind == "tagging":
    return {"tokens": line.split()}
  return {"text": line, "text_pair": None}


def _table_record(kind: str | None, task: ml_collections.ConfigDict | None,
                  row: dict[str, Any], where: str) -> Any:
  if kind is not None:
    return readers.input_record(kind, task, row, where)
  if FILL_MASK_TEXT_KEY not in row:
    raise ValueError(f"{where}: no field {FILL_MASK_TEXT_KEY!r} (fill-mask reads it); the "
                     f"row has {sorted(row)}")
  text = str(row[FILL_MASK_TEXT_KEY] or "")
  if not text.strip():
    raise ValueError(f"{where}: empty text in field {FILL_MASK_TEXT_KEY!r}")
  return text


def read_examples(path: str, kind: str | None,
                  task: ml_collections.ConfigDict | None = None) -> list[Example]:
  """The examples of an input file: CSV/TSV/JSONL rows (fields named by `task`) or the
  lines of a plain-text file. kind None: fill-mask lines."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"input {path!r}: no such file")
  if kind is not None and not is_table(path):
    if kind not in PLAIN_TEXT_KINDS:
      raise ValueError(f"{path}: a plain-text input serves {', '.join(PLAIN_TEXT_KINDS)}; "
                       f"a {kind} task reads CSV, TSV or JSONL rows (fields "
                       f"{_fields(kind, task)})")
    if task.text_pair_key and kind != "tagging":
      raise ValueError(f"{path}: the task reads text pairs ({_fields(kind, task)}): give a "
                       "CSV, TSV or JSONL file with those fields")
  try:
    if is_table(path):
      examples = [Example(n, where, _table_record(kind, task, row, where))
                  for n, where, row in readers.numbered_rows(path, strict=True)]
    else:
      examples = [Example(n, f"{path}:{n}", _line_record(kind, line, f"{path}:{n}"))
                  for n, line in readers.numbered_lines(path)]
  except UnicodeDecodeError as e:
    raise ValueError(f"{path}: not UTF-8 text ({e})") from None
  if not examples:
    raise ValueError(f"{path}: no example in it")
  return examples


def _fields(kind: str, task: ml_collections.ConfigDict) -> str:
  names = {"classification": ("text_key", "text_pair_key"),
           "regression": ("text_key", "text_pair_key"), "tagging": ("tokens_key",),
           "qa": ("question_key", "context_key"),
           "multiple_choice": ("context_key", "question_key", "choices_key")}[kind]
  return ", ".join(f"task.{n}={task[n]!r}" for n in names if task[n])


# ----------------------------------------------------------------------------- batches


def run_batches(apply: Callable[[Any, dict], Any], params: Any,
                features: Sequence[dict[str, np.ndarray]], *, batch_size: int, pad_id: int,
                seq_len: int, multiple: int, dynamic: bool, progress: bool = False
                ) -> Iterator[tuple[np.ndarray, Any]]:
  """(feature indices, host outputs) per batch: the dev evaluation's batches (in length
  order with dynamic padding), at most batch_size features each."""
  from tqdm.auto import tqdm
  lengths = np.asarray([batching.feature_length(f) for f in features], np.int64)
  size = max(1, min(batch_size, len(features)))
  with tqdm(total=len(features), desc="predict", unit="seq", disable=not progress,
            dynamic_ncols=True) as bar:
    for idx in batching.eval_batches(lengths, size, sort=dynamic):
      batch = batching.padded_batch([features[i] for i in idx], size, pad_id, seq_len,
                                    multiple, dynamic)
      yield idx, jax.device_get(apply(params, batch))
      bar.update(len(idx))


# ----------------------------------------------------------------------------- tasks


def _echo(kind: str, record: dict[str, Any]) -> dict[str, Any]:
  """The input fields a prediction row repeats (so that it reads on its own)."""
  if kind in ("classification", "regression"):
    return {"text": record["text"],
            **({"text_pair": record["text_pair"]} if record["text_pair"] is not None else {})}
  if kind == "tagging":
    return {"tokens": record["tokens"]}
  if kind == "qa":
    return {**({"id": record["id"]} if "id" in record else {}),
            "question": record["question"]}
  return {}


def predict_task(ft: finetuned_lib.FineTuned, examples: Sequence[Example], *, batch_size: int = 64,
                 progress: bool = False) -> list[dict[str, Any]]:
  """Prediction rows {"line", the echoed input, predictions.prediction_rows' fields} of a
  fine-tuned workdir (`finetuned_lib.load_finetuned`) on `examples`."""
  c, kind = ft.config, ft.config.task.kind
  records = [e.record for e in examples]
  feats = features_lib.featurize(kind, records, ft.tokenizer, int(c.data.seq_len), c.task)
  model, _ = loop.task_model(c, ft.cfg, loop.num_outputs(c, ft.label_names))
  apply = jax.jit(lambda params, batch: model.apply({"params": params}, batch,
                                                    deterministic=True)["task"])
  outputs: list[Any] = [None] * len(feats.features)
  for idx, out in run_batches(apply, jax.device_put(ft.params), feats.features,
                              batch_size=batch_size, pad_id=ft.tokenizer.pad_id,
                              seq_len=int(c.data.seq_len), multiple=c.data.pad_multiple,
                              dynamic=c.data.dynamic_padding, progress=progress):
    for j, i in enumerate(idx):
      outputs[i] = predictions.feature_output(kind, out, j,
                                              batching.feature_length(feats.features[i]))
  rows = predictions.prediction_rows(kind, records, feats, outputs, c.task, ft.label_names)
  return [{"line": e.line, **_echo(kind, e.record), **row} for e, row in zip(examples, rows)]


# ----------------------------------------------------------------------------- fill-mask


@dataclasses.dataclass
class FillMaskModel:
  """A pretraining workdir's encoder and MLM head, and what fill-mask needs to run them."""

  workdir: str
  config: ml_collections.ConfigDict
  cfg: EncoderConfig
  tokenizer: Any
  head: str  # the MLM objective's name: its outputs' key and its parameters' group
  model: PretrainModel
  params: Any | None  # {"encoder", the head's groups}; None until `load_weights`
  step: int | None = None

  @property
  def seq_len(self) -> int:
    return min(int(self.config.data.seq_len),
               self.cfg.max_position_embeddings - self.cfg.position_offset)


def fill_mask_model(workdir: str) -> FillMaskModel:
  """The model of a pretraining workdir with an MLM head (weights: `load_weights`)."""
  import objectives as objectives_lib
  from bert_jax import train
  config = run_config.load(workdir)
  if not isinstance(config.get("objectives"), str) or "model" not in config:
    raise ValueError(f"{workdir!r} is neither a fine-tuned workdir (no "
                     f"{restore.ENCODER_CONFIG_FILE}) nor a pretraining one (its config "
                     "names no objectives)")
  tok = tokenizer_lib.load_tokenizer(restore.workdir_tokenizer_path(workdir, config))
  names = [n for n, _ in objectives_lib.parse_spec(config.objectives)]
  mlm = [n for n in names if objectives_lib.get(n).fills_masks]
  if not mlm:
    raise ValueError(f"{workdir!r} was pretrained without an MLM head (objectives "
                     f"{config.objectives!r}): fill-mask needs one (e.g. mlm); to predict a "
                     "task, fine-tune it first (launch.finetune)")
  objective = objectives_lib.get(mlm[0]).from_config(config, train.special_ids(tok))
  composition = objectives_lib.compose((objectives_lib.WeightedObjective(objective, 1.0),))
  cfg = EncoderConfig.from_dict(config.model.to_dict())
  return FillMaskModel(os.path.abspath(workdir), config, cfg, tok, objective.name,
                  PretrainModel(cfg, composition), None)


def load_weights(m: FillMaskModel, which: str = "best") -> FillMaskModel:
  """`m` with the encoder and head of its `which` checkpoint (best: by eval loss)."""
  try:
    params, step = checkpoint_lib.restore_params(m.workdir, None, which)
  except ValueError as e:
    if which != "best":
      raise
    raise ValueError(f"{m.workdir!r}: no checkpoint has an eval loss recorded, so none is "
                     "the best: use --which latest") from e
  groups = ("encoder", *m.model.composition[0].objective.param_groups())
  missing = [g for g in groups if g not in params]
  if missing:
    raise ValueError(f"the checkpoint of {m.workdir!r} (step {step}) has no {missing} "
                     f"parameters (it has {sorted(params)})")
  return dataclasses.replace(m, params={g: params[g] for g in groups}, step=step)


def mask_features(m: FillMaskModel, examples: Sequence[Example]) -> list[dict[str, np.ndarray]]:
  """[CLS] line [SEP] per example, with "mlm_positions" (its masks, padded with 0 to the
  most masks of any line). A line without a mask, or with one past seq_len, is an error."""
  tok, seq_len = m.tokenizer, m.seq_len
  mask_piece = tok.pieces()[tok.mask_id]
  out, positions = [], []
  for e, ids in zip(examples, tok.encode_batch([e.record for e in examples])):
    ids_L, seg_L = features_lib.layout(tok, ids[:seq_len - 2])
    found = np.flatnonzero(ids_L == tok.mask_id)
    if not found.size:
      raise ValueError(f"{e.where}: no {mask_piece} in the line (fill-mask predicts the "
                       f"token at each {mask_piece})")
    if found.size < ids.count(tok.mask_id):
      raise ValueError(f"{e.where}: a {mask_piece} lies past the model's {seq_len} pieces "
                       "(data.seq_len); shorten the line")
    out.append({"input_ids": ids_L, "segment_ids": seg_L})
    positions.append(found)
  width = max(len(p) for p in positions)
  for f, p in zip(out, positions):
    f["mlm_positions"] = np.pad(p, (0, width - len(p))).astype(np.int32)
  return out


def check_top_k(top_k: int, vocab_size: int) -> None:
  if not 1 <= top_k <= vocab_size:
    raise ValueError(f"top_k={top_k} must be in 1..{vocab_size} (the vocabulary)")


def fill_mask(m: FillMaskModel, examples: Sequence[Example], *, top_k: int = 5,
              batch_size: int = 64, progress: bool = False) -> list[dict[str, Any]]:
  """{"line", "text", "masks": [{"position" (its piece in [CLS] line [SEP]), "predictions":
  top_k of {"token", "piece", "id", "probability"}}]} per example."""
  tok, vocab = m.tokenizer, m.tokenizer.vocab_size
  check_top_k(top_k, vocab)
  if m.params is None:
    raise ValueError("fill_mask_model(...) has no weights yet: load_weights first")
  feats = mask_features(m, examples)
  head = m.head

  @jax.jit
  def apply(params, batch):
    logits = m.model.apply({"params": params}, batch, deterministic=True)[head]
    probs = jax.nn.softmax(logits[..., :vocab].astype(jnp.float32), axis=-1)
    return jax.lax.top_k(probs, top_k)

  pieces = tok.pieces()
  rows: list[dict[str, Any]] = [{} for _ in examples]
  for idx, (probs, ids) in run_batches(apply, jax.device_put(m.params), feats,
                                       batch_size=batch_size, pad_id=tok.pad_id,
                                       seq_len=m.seq_len, multiple=FILL_MASK_PAD_MULTIPLE,
                                       dynamic=True, progress=progress):
    for j, i in enumerate(idx):
      e, f = examples[i], feats[i]
      n = int(np.count_nonzero(f["input_ids"] == tok.mask_id))
      masks = [{"position": int(f["mlm_positions"][p]),
                "predictions": [{"token": tok.decode([int(t)]), "piece": pieces[int(t)],
                                 "id": int(t), "probability": round(float(q), 6)}
                                for q, t in zip(probs[j, p], ids[j, p])]}
               for p in range(n)]
      rows[i] = {"line": e.line, "text": e.record, "masks": masks}
  return rows


# ----------------------------------------------------------------------------- files


def write_jsonl(path: str, rows: Sequence[dict[str, Any]]) -> None:
  """Atomically: a run cut short leaves no half-written predictions."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    for r in rows:
      f.write(json.dumps(r, ensure_ascii=False) + "\n")
  os.replace(tmp, path)


def predict_file(workdir: str, input_path: str, out: str, *, which: str = "best",
                 batch_size: int = 64, top_k: int | None = None,
                 progress: bool = False) -> Result:
  """Predicts on every example of `input_path` with `workdir` and writes `out` (JSONL, one
  row per example in input order). The input is read and checked before the weights."""
  if which not in WHICH:
    raise ValueError(f"which={which!r} is not one of {WHICH}")
  if batch_size < 1:
    raise ValueError(f"batch_size={batch_size} must be >= 1")
  workdir = os.path.abspath(workdir)
  mode = workdir_mode(workdir)
  if mode == FINETUNED:
    if top_k is not None:
      raise ValueError(f"top_k is for fill-mask with a pretraining workdir; {workdir!r} is "
                       "fine-tuned (it predicts its task)")
    config = finetuned_lib.full_config(run_config.load(workdir))
    kind = config.task.kind
    examples = read_examples(input_path, kind, config.task)
    ft = finetuned_lib.load_finetuned(workdir, which)
    rows = predict_task(ft, examples, batch_size=batch_size, progress=progress)
    step = ft.step
  else:
    m = fill_mask_model(workdir)
    kind, top_k = FILL_MASK, 5 if top_k is None else top_k
    check_top_k(top_k, m.tokenizer.vocab_size)
    examples = read_examples(input_path, None)
    mask_features(m, examples)  # every line checked before the weights are read
    m = load_weights(m, which)
    rows = fill_mask(m, examples, top_k=top_k, batch_size=batch_size, progress=progress)
    step = m.step
  write_jsonl(out, rows)
  return Result(mode, kind, workdir, int(step), which, os.path.abspath(out), rows)
