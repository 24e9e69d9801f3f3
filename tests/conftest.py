"""Test setup: 8 simulated CPU devices (set before JAX is imported) and shared fixtures."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# Nothing is downloaded at test time: an accidental hub lookup fails instead.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
# Many tests compile the same small steps: share compiled executables between tests,
# processes (xdist workers, CLI subprocesses) and runs.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", ".pytest_cache", "jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import pathlib  # noqa: E402

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def bundled_tokenizer(tmp_path_factory) -> str:
  """A small sentencepiece model trained on part of the bundled corpus (shared by tests)."""
  from bert_jax.data import bundled, tokenizer
  docs, _ = bundled.read_documents(bundled.corpus_path("train"))
  sentences = [s for d in docs for s in d]
  out = tmp_path_factory.mktemp("tokenizer")
  path = tokenizer.train_tokenizer(sentences, out, vocab_size=512, max_sentences=8000)
  return str(path)


def tiny_config(tokenizer_path: str, cache_dir: str | None = None, **overrides):
  """The bert,tiny preset shrunk for tests: 2 layers of width 32, vocab 512, length 64."""
  from configs.pretrain import get_config
  c = get_config("bert,tiny")
  c.objectives = "mlm:1.0"
  c.model.update(dict(vocab_size=512, hidden_size=32, num_heads=4, intermediate_size=64,
                      num_layers=2, max_position_embeddings=64))
  c.data.update(dict(seq_len=64, tokenizer=tokenizer_path, vocab_size=512))
  if cache_dir:
    c.data.cache_dir = cache_dir
  c.mlm.max_predictions = 10
  c.train.update(dict(batch_size=16, steps=4, log_every=1, eval_every=2, eval_batches=2,
                      checkpoint_every=2, async_checkpoint=False))
  c.optim.warmup_steps = 1
  for key, value in overrides.items():
    if "__" in key:
      section, field = key.split("__")
      c[section][field] = value
    else:
      c[key] = value
  return c


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory, bundled_tokenizer):
  """An uninterrupted 6-step run (checkpoints at 2, 4, 6) to compare resumed runs with."""
  from bert_jax import train
  root = tmp_path_factory.mktemp("reference")
  config = tiny_config(bundled_tokenizer, str(root / "cache"), train__steps=6)
  train.train_and_evaluate(config, str(root / "run"))
  return config, str(root / "run")


def times_logged(workdir) -> dict[int, int]:
  """How often each train step was logged (raw rows: a resumed run redoes the steps after
  its checkpoint, a run that ignored its checkpoint would redo them all)."""
  import collections

  from bert_jax import metrics as metrics_lib
  rows = metrics_lib.read_metrics(workdir)
  return dict(collections.Counter(r["step"] for r in rows if r["split"] == "train"))


def train_losses(workdir) -> dict[int, float]:
  from bert_jax import metrics as metrics_lib
  rows = metrics_lib.latest_rows(metrics_lib.read_metrics(workdir))
  return {r["step"]: r["loss"] for r in rows if r["split"] == "train"}


def flat_inputs(batch):
  """A corrupted batch {"clean", "views", "own"} of ONE objective -> its flat inputs (what
  `Composition.inputs` gives it); a flat batch is returned as it is."""
  if "clean" not in batch:
    return batch
  own = list(batch["own"].values())
  return {**batch["clean"], "original_ids": batch["clean"]["input_ids"],
          **(batch["views"][0] if batch["views"] else {}), **(own[0] if own else {})}
