"""Pretraining presets: get_config("FAMILY,SIZE"), e.g. "bert,tiny" or "roberta,small".

Every field can be overridden on the command line (--config.optim.lr=1e-4); the config
is locked, so a misspelt field is an error. Sizes: tiny (CI, minutes on a CPU), small
(BERT-small, L4/H512), base (the published base configurations).
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

import objectives
from bert_jax.encoder import EncoderConfig
from objectives.base import section_defaults

SIZES = {
    #        layers hidden heads  ffn  batch  seq  steps   lr    warmup
    "tiny": (2, 128, 2, 512, 32, 128, 600, 1e-3, 60),
    "small": (4, 512, 8, 2048, 128, 128, 100_000, 5e-4, 10_000),
    "base": (12, 768, 12, 3072, 256, 512, 1_000_000, 1e-4, 10_000),
}


def section(fields: dict[str, tuple]) -> ml_collections.ConfigDict:
  """{field: (default, type, optional)} -> a ConfigDict; optional fields left at None are
  typed placeholders, so that every field can be set on the command line."""
  return ml_collections.ConfigDict({
      k: config_dict.placeholder(tp) if default is None and optional else default
      for k, (default, tp, optional) in fields.items()})


def encoder_fields(size: str) -> ml_collections.ConfigDict:
  """Every EncoderConfig field (its dataclass is the schema), sized for `size`."""
  layers, hidden, heads, ffn, *_ = SIZES[size]
  c = section(section_defaults(EncoderConfig))
  c.update(dict(vocab_size=8000 if size != "base" else 30522, hidden_size=hidden,
                num_layers=layers, num_heads=heads, intermediate_size=ffn))
  return c


def base_config(size: str) -> ml_collections.ConfigDict:
  _, _, _, _, batch, seq, steps, lr, warmup = SIZES[size]
  c = ml_collections.ConfigDict()
  c.family = "bert"
  c.size = size
  c.seed = 0
  # Continued pretraining (bert_jax/continued.py): a workdir (ours or launch.import_hf's)
  # whose architecture, tokenizer and weights this run starts from, with a new optimizer.
  c.init_from = ""
  c.init_which = "latest"  # latest | best (by eval loss) checkpoint of init_from
  # Weighted objectives, e.g. "mlm:1.0,nsp:1.0"; each reads its own section below.
  c.objectives = "mlm:1.0"
  c.model = encoder_fields(size)
  # One section per registered objective: its Config dataclass (objectives/*.py) is the
  # schema and holds the paper's defaults; here only the values that depend on the size.
  for name, fields in objectives.config_sections().items():
    c[name] = section(fields)
  c.mlm.max_predictions = max(20, round(seq * 0.15 + 0.5))
  c.rtd.max_predictions = c.mlm.max_predictions
  c.plm.max_predictions = max(20, round(seq / 6 + 0.5))
  c.distill.stage_steps = max(1, steps // 20)
  c.data = ml_collections.ConfigDict(dict(
      source="bundled", train_files="", eval_files="", text_format="sentences",
      tfds_name="", tfds_data_dir="", tfds_text_key="text", train_split="train",
      eval_split="validation", seq_len=seq, packing="full_sentences", short_seq_prob=0.1,
      dupe_factor=1, tokenizer="", vocab_size=c.model.vocab_size, tokenizer_type="unigram",
      num_threads=0, cache_dir="",
      # a directory of launch/prepare_data.py: read its ArrayRecord shards instead of the source
      prepared=""))
  c.train = ml_collections.ConfigDict(dict(
      batch_size=batch, steps=steps, grad_accum=1, log_every=20, eval_every=200,
      eval_batches=8, checkpoint_every=200, keep=3, keep_best=True, async_checkpoint=True,
      # nan_policy stop | skip; skip stops past max_nonfinite_steps skipped steps (-1: none)
      nan_policy="stop", max_nonfinite_steps=10,
      # every checkpoint unreadable: start over from step 0 instead of stopping
      restart_if_unreadable=False,
      # a resume may change train.steps (and so the learning-rate schedule's length)
      allow_schedule_change=False))
  c.optim = ml_collections.ConfigDict(dict(
      lr=lr, warmup_steps=warmup, schedule="linear", end_lr_ratio=0.0, b1=0.9, b2=0.999,
      eps=1e-6, weight_decay=0.01, clip_norm=1.0))
  # Mesh sizes over (data, fsdp, tensor); -1 takes the remaining devices.
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  # mode: data | fsdp | tensor (presets in bert_jax/sharding.py) or custom (rules below).
  c.sharding = ml_collections.ConfigDict(dict(mode="fsdp", rules=()))
  return c


def bert(c: ml_collections.ConfigDict) -> None:
  """BERT: MLM (80/10/10, 15%) + NSP on segment pairs, post-LN, token types.

  BERT masked statically (dupe_factor=10 copies made offline): --config.mlm.static=True.
  """
  c.family = "bert"
  c.objectives = "mlm:1.0,nsp:1.0"


def roberta(c: ml_collections.ConfigDict) -> None:
  """RoBERTa: dynamic MLM on FULL-SENTENCES packing, no NSP, one token type."""
  c.family = "roberta"
  c.objectives = "mlm:1.0"
  c.mlm.static = False
  c.data.packing = "full_sentences"
  c.model.type_vocab_size = 1
  c.model.layer_norm_eps = 1e-5
  c.optim.b2 = 0.98


def albert(c: ml_collections.ConfigDict) -> None:
  """ALBERT: n-gram MLM (n<=3, p(n) ~ 1/n) + SOP; factorized embeddings, all layers shared."""
  c.family = "albert"
  c.objectives = "mlm:1.0,sop:1.0"
  c.mlm.span = "ngram"
  c.mlm.max_ngram = 3
  c.mlm.truncate_spans = True  # ALBERT truncates an n-gram near the end instead of resampling
  c.model.embedding_size = min(128, c.model.hidden_size // 2)
  c.model.num_layer_groups = 1
  c.model.hidden_act = "gelu_new"
  c.model.hidden_dropout = 0.0  # ALBERT v2 dropped dropout
  c.model.attention_dropout = 0.0


def electra(c: ml_collections.ConfigDict) -> None:
  """ELECTRA: replaced-token detection; factorized embeddings shared with a 1/4 generator.

  small = ELECTRA-Small (H256, L12, 4 heads, FFN 1024, E128, seq 128, batch 128, lr 5e-4,
  10k warmup); tiny shrinks it for CI.
  """
  c.family = "electra"
  c.objectives = "rtd:1.0"
  if c.size == "small":
    c.model.update(dict(hidden_size=256, num_layers=12, num_heads=4, intermediate_size=1024))
    c.optim.update(dict(lr=5e-4, warmup_steps=10_000))
    c.train.steps = 1_000_000
  c.model.embedding_size = 128 if c.size != "tiny" else 64
  if c.size == "base":
    c.model.embedding_size = 768
    c.optim.lr = 2e-4
  c.optim.weight_decay = 0.01


def distilbert(c: ml_collections.ConfigDict) -> None:
  """DistilBERT: a 6-layer student of the teacher's width, initialised from every second
  teacher layer, trained on 5 * KL(T=2, every non-pad token) + 2 * MLM + 1 * cosine, with
  frequency-smoothed masking (count^-0.7); no token types.

  The teacher is required: --config.distill.teacher=WORKDIR (match model.* widths and the
  tokenizer to it; e.g. a bert,base teacher for distilbert,base).
  """
  c.family = "distilbert"
  c.objectives = "distill:1.0"
  c.model.num_layers = 6
  c.model.type_vocab_size = 0  # the teacher's type-0 vector is folded into the positions
  c.distill.mode = "distilbert"
  c.distill.kl_positions = "all"  # restrict_ce_to_mask off
  c.mlm.smoothing = 0.7  # mlm_smoothing: masked tokens drawn with weight count^-0.7


# MobileBERT's body by size: base is the published MobileBERT (24 layers, 512 between the
# blocks, 128 inside, 4 heads, FFN 512, 128-wide trigram embeddings); small and tiny shrink it.
MOBILEBERT_SIZES = {
    #        layers hidden embedding bottleneck heads ffn
    "tiny": (4, 128, 32, 32, 4, 128),
    "small": (12, 256, 64, 64, 4, 256),
    "base": (24, 512, 128, 128, 4, 512),
}


def mobilebert(c: ml_collections.ConfigDict) -> None:
  """MobileBERT: the real encoder (bottlenecks with a shared key/query bottleneck, 4 stacked
  FFNs, NoNorm, ReLU, trigram word inputs at embedding_size, no hidden dropout) trained by
  layer-wise transfer from a teacher: each block's output (feature-map MSE) and attention
  maps (KL) per layer, one stage per layer (progressive), then pretraining distillation
  0.5 * KL(T=1) + 0.5 * MLM. It exports as MobileBertForMaskedLM.

  The teacher is required: --config.distill.teacher=WORKDIR, with the student's num_layers
  and num_heads (else an error) and hidden_size (else the transfer goes through a learned
  projection, which MobileBERT has not): MobileBERT's IB-BERT (our encoder with an
  intra_bottleneck_size wider than hidden_size), or a plain BERT of that shape, e.g.
  bert,tiny --config.model.num_layers=4 --config.model.num_heads=4 for mobilebert,tiny.
  """
  layers, hidden, embedding, bottleneck, heads, ffn = MOBILEBERT_SIZES[c.size]
  c.family = "mobilebert"
  c.objectives = "distill:1.0"
  c.model.update(dict(num_layers=layers, hidden_size=hidden, embedding_size=embedding,
                      num_heads=heads, intermediate_size=ffn, hidden_act="relu",
                      hidden_dropout=0.0))
  c.model.intra_bottleneck_size = bottleneck
  c.model.use_bottleneck_attention = False
  c.model.key_query_shared_bottleneck = True
  c.model.num_feedforward_networks = 4
  c.model.normalization = "no_norm"
  c.model.project_word_embeddings = True
  c.model.trigram_input = True
  c.distill.update(dict(mode="layerwise", schedule="progressive", init_student=False,
                        temperature=1.0, alpha_ce=0.5, alpha_mlm=0.5, alpha_cos=0.0,
                        stage_steps=max(1, c.train.steps // (2 * layers))))


def xlnet(c: ml_collections.ConfigDict) -> None:
  """XLNet without memory: permutation LM (1/6 of the tokens, spans <= 5) with two-stream
  attention; relative sinusoidal positions and segment-relative attention, no absolute
  positions or token types, no embedding LayerNorm or attention biases; XLNet's head (tied
  embeddings + bias). base = XLNet-Base's shape (L12/H768, seq 512, 32k vocabulary).
  """
  c.family = "xlnet"
  c.objectives = "plm:1.0"
  c.model.update(dict(type_vocab_size=0, hidden_act="gelu", layer_norm_eps=1e-12))
  c.model.position_embedding = "relative"
  c.model.relative_segments = True
  c.model.embedding_norm = False
  c.model.attention_bias = False
  c.plm.head_transform = False
  if c.size == "base":
    c.model.vocab_size = 32000
    c.data.vocab_size = 32000


PRESETS = {"bert": bert, "roberta": roberta, "albert": albert, "electra": electra,
           "distilbert": distilbert, "mobilebert": mobilebert,
           "xlnet": xlnet}


def get_config(arg: str = "bert,tiny") -> ml_collections.ConfigDict:
  family, _, size = (arg or "bert,tiny").partition(",")
  size = size or "tiny"
  if family not in PRESETS:
    raise ValueError(f"unknown preset family {family!r}; available: {sorted(PRESETS)}")
  if size not in SIZES:
    raise ValueError(f"unknown size {size!r}; available: {sorted(SIZES)}")
  c = base_config(size)
  PRESETS[family](c)
  c.lock()
  return c
