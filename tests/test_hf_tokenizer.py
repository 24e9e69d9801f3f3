"""Imported checkpoints' tokenizer.json (WordPiece, byte-level BPE) in our pipeline: the ids
transformers' tokenizer gives, word starts from the tokenizer's own word ids, the special
ids, and an imported BERT workdir fine-tuned with its own WordPiece vocabulary."""

from __future__ import annotations

import numpy as np
import pytest

import transformers
from tokenizers import ByteLevelBPETokenizer  # noqa: E402
from tokenizers.implementations import BertWordPieceTokenizer  # noqa: E402

from bert_jax import hf, run_config, train  # noqa: E402
from bert_jax.data import bundled, corpus, pipeline  # noqa: E402
from bert_jax.data import tokenizer as tokenizer_lib  # noqa: E402
from bert_jax.finetune import loop  # noqa: E402
from tests.test_finetune_run import ft_config  # noqa: E402
from tests.test_hf_parity import VOCAB, build_hf  # noqa: E402

BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
ROBERTA_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]


@pytest.fixture(scope="module")
def verses():
  docs, _ = bundled.read_documents(bundled.corpus_path("train"))
  return [s for d in docs[:40] for s in d]


def train_json(kind: str, sentences, vocab_size: int, path) -> str:
  if kind == "wordpiece":  # BERT's: lower-casing normaliser, ## continuations
    tok = BertWordPieceTokenizer(lowercase=True)
    tok.train_from_iterator(sentences, vocab_size=vocab_size, special_tokens=BERT_SPECIALS)
  else:  # RoBERTa's byte-level BPE
    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(sentences, vocab_size=vocab_size, special_tokens=ROBERTA_SPECIALS)
  tok.save(str(path))
  return str(path)


@pytest.mark.parametrize("kind", ["wordpiece", "bpe"])
def test_tokenizer_json_encodes_like_transformers(kind, verses, tmp_path):
  path = train_json(kind, verses, 600, tmp_path / "tokenizer.json")
  ours = tokenizer_lib.load_tokenizer(tmp_path)  # a directory holding tokenizer.json
  assert isinstance(ours, tokenizer_lib.HFTokenizer)
  theirs = transformers.PreTrainedTokenizerFast(tokenizer_file=path)
  texts = verses[:200] + ["In the beginning GOD created... the heaven"]
  expected = [theirs(t, add_special_tokens=False)["input_ids"] for t in texts]
  assert ours.encode_batch(texts) == expected
  assert ours.encode(texts[-1]) == expected[-1]
  names = BERT_SPECIALS if kind == "wordpiece" else ROBERTA_SPECIALS
  by_name = dict(zip(("pad", "unk", "cls", "sep", "mask") if kind == "wordpiece"
                     else ("cls", "pad", "sep", "unk", "mask"), names))
  for role, name in by_name.items():
    assert getattr(ours, f"{role}_id") == theirs.convert_tokens_to_ids(name)
  assert ours.first_regular_id == 5 and ours.vocab_size == len(theirs)
  # Word starts from the ids alone: WordPiece's are the tokenizer's own word segmentation;
  # byte-level BPE's are fairseq's whole-word rule for RoBERTa (a piece whose text starts
  # with a space), so punctuation joins its word. The first piece of a sentence is a start
  # whatever its marker (the corpus sets it).
  for t in texts[:50]:
    enc = theirs(t, add_special_tokens=False)
    if kind == "wordpiece":
      words = enc.word_ids()
      truth = [i == 0 or words[i] != words[i - 1] for i in range(len(words))]
    else:
      truth = [i == 0 or theirs.decode([x]).startswith(" ")
               for i, x in enumerate(enc["input_ids"])]
    got = ours.word_starts(enc["input_ids"])
    got[0] = True
    assert got.tolist() == truth, t
  # Character spans for extractive QA: each piece's text (lower-cased for WordPiece).
  text = texts[0]
  ids, spans = ours.encode_with_offsets(text)
  assert ids == expected[0] and len(spans) == len(ids)
  for i, (b, e) in zip(ids, spans):
    piece = theirs.convert_ids_to_tokens(i).removeprefix("##").removeprefix("\u0120")
    if kind == "wordpiece":
      assert text[b:e].lower() == piece
    else:
      assert text[b:e] == theirs.convert_tokens_to_string([theirs.convert_ids_to_tokens(i)]).strip()
  tokenized = corpus.tokenize_documents([verses[:3], verses[3:5]], ours)
  assert tokenized.word_start[tokenized.sent_offsets[:-1]].all()


def test_imported_bert_fine_tunes_with_its_wordpiece_tokenizer(verses, tmp_path):
  src, wd = tmp_path / "hf", tmp_path / "run"
  build_hf("bert", str(src))
  path = train_json("wordpiece", verses, VOCAB, tmp_path / "wp.json")
  transformers.BertTokenizerFast(tokenizer_file=path).save_pretrained(str(src))
  hf.import_to_workdir(str(src), str(wd))
  with pytest.raises(ValueError, match="imported from Hugging Face.*launch.finetune"):
    train.train_and_evaluate(run_config.load(str(wd)), str(wd))
  assert (wd / "checkpoints" / "0").is_dir()  # refused, not moved aside
  c = ft_config(str(wd), steps=2)
  c.data.seq_len = 32  # the tiny model has 40 positions
  s = loop.finetune(c, str(tmp_path / "ft"), quiet=True)
  assert s.steps == 2 and np.isfinite(s.best["loss"])
  saved = tokenizer_lib.workdir_tokenizer(tmp_path / "ft")  # the fine-tuning run keeps it
  assert saved is not None and saved.name == "tokenizer.json"
  assert saved.read_bytes() == (wd / "hf" / "tokenizer.json").read_bytes()
  # Pretraining data through the same tokenizer: an example's word ids (what whole-word
  # masking groups by) follow transformers' word segmentation of the same text.
  tok = tokenizer_lib.load_tokenizer(saved)
  theirs = transformers.PreTrainedTokenizerFast(tokenizer_file=str(saved))
  examples = pipeline.build_examples(
      _data_cfg(str(saved), str(tmp_path / "cache")), tok, "train", seed=0,
      workdir=str(tmp_path / "pre"))
  ex = examples[0]
  n = int(ex["attention_mask"].sum())
  ids, word_ids = ex["input_ids"][1:n], ex["word_ids"][1:n]  # after [CLS]
  first = list(ids).index(tok.sep_id)  # the first sentence(s), up to the first [SEP]
  enc = theirs(theirs.decode(ids[:first].tolist()), add_special_tokens=False)
  assert enc["input_ids"] == ids[:first].tolist()
  new_word = [i == 0 or w != enc.word_ids()[i - 1] for i, w in enumerate(enc.word_ids())]
  ours_new = [i == 0 or word_ids[i] != word_ids[i - 1] for i in range(first)]
  assert ours_new == new_word


def _data_cfg(tokenizer: str, cache: str):
  from configs.pretrain import get_config
  c = get_config("bert,tiny")
  c.data.update(dict(tokenizer=tokenizer, seq_len=32, cache_dir=cache, vocab_size=VOCAB))
  return c.data
