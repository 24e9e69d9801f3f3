"""Fine-tuning presets by task: get_config("TASK"), e.g. "bundled", "sst2", "squad_v2".

  python -m launch.finetune --config configs/finetune.py:bundled \
      --config.init=runs/demo/pretrain --workdir runs/ft_bundled

Every field can be overridden on the command line; the config is locked, so a misspelt
field is an error. Tasks: the bundled KJV section task; GLUE (cola, sst2, mrpc, qqp, stsb,
mnli, qnli, rte, wnli), SQuAD v1.1 / v2.0, CoNLL-2003 and HellaSwag from tfds (prepared
as array_record); "files" (classification from local CSV/TSV/JSONL; any kind with
--config.task.kind) and "swag" (SWAG's CSV layout, local files). See docs/finetune.md.
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

GLUE = {
    #        text_key     text_pair_key  metrics            main       dev split
    "cola": ("sentence", "", "mcc,accuracy", "mcc", "validation"),
    "sst2": ("sentence", "", "accuracy", "accuracy", "validation"),
    "mrpc": ("sentence1", "sentence2", "accuracy,f1", "f1", "validation"),
    "qqp": ("question1", "question2", "accuracy,f1", "f1", "validation"),
    "stsb": ("sentence1", "sentence2", "pearson,spearman", "pearson", "validation"),
    "mnli": ("premise", "hypothesis", "accuracy", "accuracy", "validation_matched"),
    "qnli": ("question", "sentence", "accuracy", "accuracy", "validation"),
    "rte": ("sentence1", "sentence2", "accuracy", "accuracy", "validation"),
    "wnli": ("sentence1", "sentence2", "accuracy", "accuracy", "validation"),
}
OTHER = ("bundled", "files", "swag", "hellaswag", "squad_v1", "squad_v2", "conll2003")


def task_fields() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      name="bundled",
      # classification | regression | tagging | qa | multiple_choice
      kind="classification",
      source="bundled",  # bundled | files | tfds
      train_files="", dev_files="",  # comma-separated globs of .csv/.tsv/.jsonl(.gz)
      tfds_name="", tfds_data_dir="", train_split="train", dev_split="validation",
      # field names in the records
      text_key="text", text_pair_key="", label_key="label",
      tokens_key="tokens", tags_key="tags",
      question_key="question", context_key="context", answers_key="answers", id_key="id",
      impossible_key="is_impossible", choices_key="choices",
      label_names="",  # comma-separated; "" = from the source or sorted train labels
      num_choices=4,
      metrics="accuracy,macro_f1",  # computed on dev
      main_metric="accuracy",  # best checkpoint and early stopping
      # extractive QA
      max_query_len=64, doc_stride=128, max_answer_len=30, n_best=20, version_2=False,
      null_threshold=0.0,
      max_train_examples=0, max_dev_examples=0,  # 0 = all
      # records whose label is not in the label set (dev labels unseen in train): an error,
      # unless True (then dropped, with a console warning counting them)
      drop_unknown_labels=False))


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  # A pretraining workdir (ours or launch.import_hf's); "" = random init with `arch`.
  c.init = ""
  c.init_which = "latest"  # latest | best (by pretraining eval loss)
  c.init_step = -1  # a given checkpoint step; -1 = init_which
  c.init_weights = True  # False: init's architecture and tokenizer, random weights
  c.init_pooler = True  # reuse the NSP/SOP (or imported) pooler when there is one
  c.arch = "bert,tiny"  # configs/pretrain.py preset, used when init = ""
  c.tokenizer = ""  # default: the one saved with init
  c.reinit_layers = 0  # re-initialise the top k layer modules (init_pooler=False: pooler too)
  # EncoderConfig fields that fine-tuning may change; None keeps the checkpoint's.
  c.model = ml_collections.ConfigDict(dict(
      hidden_dropout=config_dict.placeholder(float),
      attention_dropout=config_dict.placeholder(float),
      classifier_dropout=config_dict.placeholder(float),  # None: hidden_dropout
      dtype=config_dict.placeholder(str), remat=config_dict.placeholder(str),
      attention_impl=config_dict.placeholder(str)))
  c.task = task_fields()
  c.data = ml_collections.ConfigDict(dict(
      seq_len=128, dynamic_padding=True, pad_multiple=16, bucket=True, bucket_batches=50))
  c.train = ml_collections.ConfigDict(dict(
      batch_size=32, eval_batch_size=64, epochs=3.0, steps=0,  # steps > 0 overrides epochs
      grad_accum=1, log_every=50, eval_every=0,  # 0 = once per epoch
      patience=0,  # early stopping: evaluations without a better main metric; 0 = off
      save_best=True, checkpoint=True,
      nan_policy="stop",  # stop | skip (drop the update of a non-finite step, count it)
      allow_schedule_change=False))  # a resume may change steps/epochs (the lr schedule)
  c.optim = ml_collections.ConfigDict(dict(
      lr=5e-5, warmup_ratio=0.1, warmup_steps=-1,  # warmup_steps >= 0 overrides the ratio
      schedule="linear", end_lr_ratio=0.0, b1=0.9, b2=0.999, eps=1e-6, weight_decay=0.01,
      clip_norm=1.0,
      layer_decay=1.0))  # lr of layer l (of L) x layer_decay^(L + 1 - l); 1.0 = off
  # Quantization-aware fine-tuning (qwix; bert_jax.compress.quantize): mode "qat"
  # fake-quantizes the encoder's dense layers to int8 weights (and act="int8": int8
  # activations, dynamic scales) in training and in the dev evaluations. "none": float.
  c.quant = ml_collections.ConfigDict(dict(mode="none", act="int8"))
  # The head over the encoder (classification, regression, multiple choice): pooling is
  # pooler (dense + tanh on [CLS], BERT's) | cls (the raw [CLS] state) | mean | max (over
  # the real tokens) | attention (a learned query over the tokens) | concat (the [CLS]
  # states of the last pool_layers layers, concatenated) | weighted (a learned softmax
  # mix of the last pool_layers layers' [CLS] states). multi_sample_dropout: the mean of
  # the classifier's logits over that many dropout masks (training; 1 = plain dropout).
  c.head = ml_collections.ConfigDict(dict(pooling="pooler", pool_layers=4,
                                          multi_sample_dropout=1))
  # Fine-tuning tricks (bert_jax/tricks.py), all off by default. Adversarial training on
  # the word embeddings: fgm (one step of norm epsilon) | pgd (steps of alpha, within the
  # epsilon ball); the step's loss adds the adversarial term.
  c.adversarial = ml_collections.ConfigDict(dict(mode="none", epsilon=1.0, steps=3,
                                                 alpha=0.3))
  # Weight averaging: ema (decay) | swa (a snapshot every `every` steps from step `start`).
  # Dev evaluation and the best checkpoint use the average.
  c.average = ml_collections.ConfigDict(dict(mode="none", decay=0.999, start=0, every=1))
  # Frozen parameters get no gradient and no optimizer state.
  c.freeze = ml_collections.ConfigDict(dict(embeddings=False, bottom_layers=0))
  # Mixout probability (Lee et al. 2020) on the encoder's dense kernels, mixing towards
  # the weights fine-tuning started from; usually with model.hidden_dropout=0.
  c.mixout = 0.0
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  c.sharding = ml_collections.ConfigDict(dict(mode="fsdp", rules=()))
  return c


# The tricks launch.finetune_tricks compares, each as overrides of one fine-tuning config
# (ablate's "field=value;..." syntax); "baseline" is the config as it is. The figures for
# the bundled task are in docs/finetune_tricks.md.
TRICKS = {
    "baseline": "",
    "fgm": "adversarial.mode=fgm;adversarial.epsilon=1.0",  # the Kaggle kits' BERT-base value
    "fgm_eps0.1": "adversarial.mode=fgm;adversarial.epsilon=0.1",  # for small tables
    "pgd": "adversarial.mode=pgd;adversarial.epsilon=1.0;adversarial.steps=3;"
           "adversarial.alpha=0.3",
    "pgd_eps0.1": "adversarial.mode=pgd;adversarial.epsilon=0.1;adversarial.steps=3;"
                  "adversarial.alpha=0.03",
    "ema": "average.mode=ema;average.decay=0.99",
    "swa": "average.mode=swa;average.start=90;average.every=10",  # the second half of 187
    "mixout": "mixout=0.1;model.hidden_dropout=0.0",
    "freeze_embeddings": "freeze.embeddings=True",
    "mean_pooling": "head.pooling=mean",
    "cls_pooling": "head.pooling=cls",  # raw [CLS], no dense + tanh
    "max_pooling": "head.pooling=max",
    "attention_pooling": "head.pooling=attention",
    "concat_last2": "head.pooling=concat;head.pool_layers=2",
    "weighted_layers": "head.pooling=weighted;head.pool_layers=2",
    "multi_sample_dropout": "head.multi_sample_dropout=5",
    "layer_decay": "optim.layer_decay=0.8",
    "reinit_top_layer": "reinit_layers=1",
}


def _glue(c, name):
  text, pair, metrics, main, dev = GLUE[name]
  c.task.update(dict(name=name, source="tfds", tfds_name=f"glue/{name}", text_key=text,
                     text_pair_key=pair, metrics=metrics, main_metric=main, dev_split=dev,
                     kind="regression" if name == "stsb" else "classification"))


def get_config(arg: str = "bundled") -> ml_collections.ConfigDict:
  task = (arg or "bundled").strip().lower().replace("glue/", "")
  c = base_config()
  t = c.task
  if task in GLUE:
    _glue(c, task)
  elif task == "bundled":
    # The bundled 6-class section task: small model defaults for a CPU.
    c.optim.lr = 1e-4
    c.data.seq_len = 64
  elif task == "files":
    t.update(dict(name="files", source="files"))
  elif task in ("squad_v1", "squad_v2"):
    v2 = task == "squad_v2"
    t.update(dict(name=task, kind="qa", source="tfds",
                  tfds_name="squad/v2.0" if v2 else "squad/v1.1", version_2=v2,
                  metrics="exact_match,f1", main_metric="f1"))
    c.data.seq_len = 384
    c.train.update(dict(batch_size=32, epochs=2.0))
  elif task == "conll2003":
    t.update(dict(name=task, kind="tagging", source="tfds", tfds_name="conll2003",
                  tokens_key="tokens", tags_key="ner", metrics="entity_f1,token_accuracy",
                  main_metric="entity_f1"))
  elif task == "hellaswag":
    t.update(dict(name=task, kind="multiple_choice", source="tfds", tfds_name="hellaswag",
                  context_key="context", question_key="", choices_key="endings",
                  num_choices=4, metrics="accuracy", main_metric="accuracy"))
  elif task == "swag":
    # SWAG's CSV files (train.csv / val.csv): sent1 is the context; sent2 starts every ending.
    t.update(dict(name=task, kind="multiple_choice", source="files", context_key="sent1",
                  question_key="sent2", choices_key="ending0,ending1,ending2,ending3",
                  num_choices=4, metrics="accuracy", main_metric="accuracy"))
  else:
    raise ValueError(f"unknown fine-tuning task {arg!r}; available: "
                     f"{', '.join(list(OTHER) + sorted(GLUE))}")
  c.lock()
  return c
