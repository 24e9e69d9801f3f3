"""Offline preparation into ArrayRecord shards (Apache Beam, DirectRunner) and the grain
reader of prepared data: same examples as the in-memory pipeline on the bundled corpus,
text ranges, determinism, resume, manifest checks, tfds input, two-host reads."""

from __future__ import annotations

import gzip
import json
import os
import pathlib

import numpy as np
import pytest

from bert_jax.data import arrayrecord, bundled, pipeline, prepare, sources
from bert_jax.data import tokenizer as tokenizer_lib
import objectives

SEQ_LEN = 64


@pytest.fixture(scope="module")
def kjv_docs():
    docs, _ = bundled.read_documents(bundled.corpus_path("validation"))
    return docs


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory, kjv_docs) -> str:
    out = tmp_path_factory.mktemp("tok")
    return str(tokenizer_lib.train_tokenizer((s for d in kjv_docs for s in d), out, vocab_size=400))


def make_config(tok_path, objectives_spec="mlm:1.0,nsp:1.0", **data):
    from configs.pretrain import get_config
    c = get_config("bert,tiny")
    c.objectives = objectives_spec
    c.data.update({**dict(seq_len=SEQ_LEN, tokenizer=tok_path, vocab_size=400), **data})
    return c


def in_memory():
    return prepare.pipeline_options(running_mode="in_memory", num_workers=1)


def kind_of(config, tok):
    from bert_jax import train
    return objectives.build(config, train.special_ids(tok)).example_kind


def render(docs):
    return "\n\n".join("\n".join(d) for d in docs) + "\n"


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory, kjv_docs) -> pathlib.Path:
    """Two text files in the "sentences" format (one gzipped) and an eval file."""
    root = tmp_path_factory.mktemp("text")
    (root / "a.txt").write_text(render(kjv_docs[:20]), encoding="utf-8")
    with gzip.open(root / "b.txt.gz", "wt", encoding="utf-8") as f:
        f.write(render(kjv_docs[20:30]))
    (root / "eval.txt").write_text(render(kjv_docs[30:]), encoding="utf-8")
    return root


def text_config(tok_path, text_dir, **kw):
    return make_config(tok_path, source="text", train_files=f"{text_dir}/a.txt,{text_dir}/b.txt.gz",
                       eval_files=f"{text_dir}/eval.txt", **kw)


def all_examples(ds):
    return [ds[i] for i in range(len(ds))]


def assert_same_examples(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert sorted(x) == sorted(y)
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


# ------------------------------------------------------------------------- tests


@pytest.mark.parametrize("spec", ["mlm:1.0", "mlm:1.0,nsp:1.0", "mlm:1.0,sop:1.0"])
def test_bundled_gives_the_in_memory_examples(tmp_path, tok_path, spec):
    config = make_config(tok_path, spec, dupe_factor=2)
    tok = tokenizer_lib.load_tokenizer(tok_path)
    kind = kind_of(config, tok)
    manifest = prepare.prepare(config, tmp_path / "p", splits=("eval",), options=in_memory(),
                               log=lambda s: None)
    assert manifest["example_kind"]["name"] == kind.name
    assert manifest["tokenizer"]["fingerprint"] == tok.fingerprint
    memory = pipeline.build_dataset(config.data, tok, "eval", seed=config.seed + 1,
                                    example_kind=kind, workdir=tmp_path / "w")
    config.data.prepared = str(tmp_path / "p")
    prepared = pipeline.build_dataset(config.data, tok, "eval", seed=config.seed + 1,
                                      example_kind=kind, workdir=tmp_path / "w")
    assert manifest["splits"]["eval"]["examples"] == len(memory) > 0
    assert_same_examples(all_examples(memory), all_examples(prepared))


def per_example_batches(ds, seed, batch, process_index=0, process_count=1, count=5):
    """The reference: grain's per-example chain (shuffle, repeat, epoch, host slice, batch)
    that train_iterator's batched read replaces."""
    import grain
    n = len(ds)
    # (The per-example chain hands a prepared dataset indices past n after the first
    # epoch; example_id is the record's index, taken modulo n.)
    stream = ds.shuffle(seed=seed).repeat().map_with_index(
        lambda i, e: {**e, "epoch": np.asarray(i // n, np.int32),
                      "example_id": np.asarray(e["example_id"] % n, np.int32)})
    it = iter(stream[process_index::process_count].batch(batch, drop_remainder=True)
              .to_iter_dataset(grain.ReadOptions(num_threads=1)))
    return [next(it) for _ in range(count)]


def test_batched_reads_give_the_per_example_batches(tmp_path, tok_path):
    config = make_config(tok_path, "mlm:1.0,nsp:1.0")
    tok = tokenizer_lib.load_tokenizer(tok_path)
    kind = kind_of(config, tok)
    prepare.prepare(config, tmp_path / "p", splits=("eval",), options=in_memory(),
                    log=lambda s: None)
    memory = pipeline.build_dataset(config.data, tok, "eval", seed=config.seed + 1,
                                    example_kind=kind, workdir=tmp_path / "w")
    config.data.prepared = str(tmp_path / "p")
    prepared = pipeline.build_dataset(config.data, tok, "eval", seed=config.seed + 1,
                                      example_kind=kind, workdir=tmp_path / "w")
    assert hasattr(prepared, "read_batch") and not hasattr(memory, "read_batch")
    n = len(prepared)
    batch = 8
    count = n // batch + 3  # past the end of the first epoch: the second is reshuffled
    for ds in (prepared, memory):
        for p, procs in ((0, 1), (1, 2)):
            want = per_example_batches(ds, 7, batch, p, procs, count)
            it = pipeline.train_iterator(ds, batch_size_per_host=batch, seed=7,
                                         process_index=p, process_count=procs)
            got = [next(it) for _ in range(count)]
            for w, g in zip(want, got):
                assert sorted(w) == sorted(g)
                for k in w:
                    np.testing.assert_array_equal(w[k], g[k], err_msg=k)
            assert got[-1]["epoch"].max() >= 1 and got[-1]["example_id"].max() < n


@pytest.mark.parametrize("fmt", ["sentences", "lines"])
def test_text_ranges_cover_the_file_once(tmp_path, kjv_docs, fmt):
    """Byte ranges of a file, read one by one, give what reading the whole file gives."""
    text = render(kjv_docs[:12]).replace("\n\n", "\n\n\n", 3)  # Runs of blank lines too.
    if fmt == "lines":
        text = "\n".join(" ".join(d) for d in kjv_docs[:12]) + "\n\n"
    raw = "\ufeff".encode() + text.encode() + b"A bad \xff line.\nlast line\n"
    path = tmp_path / "t.txt"
    path.write_bytes(raw)
    cfg = make_config("", source="text", train_files=str(path), text_format=fmt).data
    whole = sources.load_documents(cfg, "train")
    for shard_bytes in (37, 500, 4096, len(raw)):
        units = prepare.enumerate_units(cfg, "train", shard_bytes=shard_bytes)
        docs, skipped = [], 0
        for u in units:
            d, st = prepare.read_unit(u)
            docs += d
            skipped += st.skipped_non_utf8
        assert docs == whole.documents, shard_bytes
        assert skipped == whole.skipped_non_utf8 == 1


def test_two_workers_deterministic_and_resumable(tmp_path, tok_path, text_dir):
    """DirectRunner with 2 processes == in_memory, byte for byte; a killed job (a shard
    lost, a temp file left) resumes without redoing the finished shards."""
    config = text_config(tok_path, text_dir)
    a, b = tmp_path / "a", tmp_path / "b"
    m_a = prepare.prepare(config, a, shard_bytes=6000,
                          options=prepare.pipeline_options(num_workers=2), log=lambda s: None)
    m_b = prepare.prepare(config, b, shard_bytes=6000, options=in_memory(), log=lambda s: None)
    shards = sorted(p.name for p in a.glob("*.arrayrecord"))
    assert len(m_a["splits"]["train"]["shards"]) >= 4 and len(shards) >= 5
    for name in shards:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    timing = ("seconds", "cpu_seconds")
    strip = lambda m: {**m, "prepare_seconds_last_run": 0, "data_config": 0,
                       "splits": {s: {**{k: x for k, x in v.items() if k not in timing},
                                      "shards": [{k: x for k, x in e.items() if k not in timing}
                                                 for e in v["shards"]]}
                                  for s, v in m["splits"].items()}}
    assert strip(m_a) == strip(m_b)

    # Kill simulation: one shard gone, a partial temp file left, the manifest not written.
    lost = shards[1]
    kept = {n: (a / n).stat().st_mtime_ns for n in shards if n != lost}
    lost_bytes = (a / lost).read_bytes()
    (a / lost).unlink()
    (a / f"{shards[2]}.tmp-deadbeef").write_bytes(b"partial")
    (a / "manifest.json").unlink()
    lines = []
    m_c = prepare.prepare(config, a, shard_bytes=6000, options=in_memory(), log=lines.append)
    assert f"{len(shards) - 1} already done, 1 to build" in lines[0]
    assert (a / lost).read_bytes() == lost_bytes
    assert {n: (a / n).stat().st_mtime_ns for n in kept} == kept
    assert not list(a.glob("*.tmp-*"))
    assert strip(m_c)["splits"] == strip(m_a)["splits"]

    # Another job into the same directory is refused, naming what differs.
    with pytest.raises(ValueError, match="another job.*examples"):
        prepare.prepare(text_config(tok_path, text_dir, seq_len=32), a, shard_bytes=6000,
                        options=in_memory(), log=lambda s: None)


def test_manifest_mismatch_refused(tmp_path, tok_path, kjv_docs):
    config = make_config(tok_path, "mlm:1.0")
    prepare.prepare(config, tmp_path / "p", splits=("eval",), options=in_memory(), log=lambda s: None)
    tok = tokenizer_lib.load_tokenizer(tok_path)

    def build(cfg, tok=tok, kind=None):
        cfg.data.prepared = str(tmp_path / "p")
        return pipeline.build_dataset(cfg.data, tok, "eval", seed=0, workdir=tmp_path / "w",
                                      example_kind=kind or kind_of(cfg, tok))

    assert len(build(make_config(tok_path, "mlm:1.0"))) > 0
    with pytest.raises(ValueError, match=r"data.seq_len=64 \(prepared\) != 32"):
        build(make_config(tok_path, "mlm:1.0", seq_len=32))
    with pytest.raises(ValueError, match=r"example kind 'single' \(prepared\) != 'nsp'"):
        build(make_config(tok_path, "mlm:1.0,nsp:1.0"))
    with pytest.raises(ValueError, match=r"data.packing='full_sentences' \(prepared\) != 'doc_sentences'"):
        build(make_config(tok_path, "mlm:1.0", packing="doc_sentences"))
    other_dir = tmp_path / "tok2"
    other = tokenizer_lib.load_tokenizer(tokenizer_lib.train_tokenizer(
        (s for d in kjv_docs[:20] for s in d), other_dir, vocab_size=300))
    with pytest.raises(ValueError, match="tokenizer fingerprint"):
        build(make_config(tok_path, "mlm:1.0"), tok=other)
    with pytest.raises(ValueError, match="no 'train' split"):
        cfg = make_config(tok_path, "mlm:1.0", prepared=str(tmp_path / "p"))
        pipeline.build_dataset(cfg.data, tok, "train", seed=0, workdir=tmp_path / "w",
                               example_kind=kind_of(cfg, tok))
    with pytest.raises(ValueError, match="holds no manifest.json"):
        cfg = make_config(tok_path, "mlm:1.0", prepared=str(tmp_path))
        pipeline.build_dataset(cfg.data, tok, "eval", seed=0, workdir=tmp_path / "w",
                               example_kind=kind_of(cfg, tok))
    # Without data.tokenizer a run takes the prepared directory's tokenizer.
    cfg = make_config("", "mlm:1.0", prepared=str(tmp_path / "p"))
    assert tokenizer_lib.ensure_tokenizer(cfg.data, tmp_path / "w2").fingerprint == tok.fingerprint


@pytest.mark.parametrize("spec,mlm,what", [("mlm:1.0", {"pmi": True}, "pmi_units"),
                                            ("mlm:1.0,tdr:1.0", {}, "tdr_labels"),
                                            ("mlm:1.0,sso:1.0", {}, "planner")])
def test_kinds_the_records_cannot_hold_are_refused(tmp_path, tok_path, spec, mlm, what):
    config = make_config(tok_path, spec)
    config.mlm.update(mlm)
    with pytest.raises(ValueError, match=what):
        prepare.prepare(config, tmp_path / "p", splits=("eval",), options=in_memory(),
                        log=lambda s: None)
    assert not list((tmp_path / "p").glob("*.arrayrecord"))


def test_tfds_source_mock_data(tmp_path, tok_path):
    import tensorflow_datasets as tfds

    config = make_config(tok_path, "mlm:1.0,sop:1.0", source="tfds", tfds_name="wikipedia/20230601.en",
                         train_split="train", eval_split="train")
    with tfds.testing.mock_data(policy=tfds.testing.MockPolicy.USE_CODE, num_examples=9):
        m = prepare.prepare(config, tmp_path / "p", splits=("train",), tfds_docs_per_shard=4,
                            options=in_memory(), log=lambda s: None)
    info = m["splits"]["train"]
    assert len(info["shards"]) == 3 and info["documents"] + info["empty_documents_skipped"] == 9
    assert info["examples"] > 0
    tok = tokenizer_lib.load_tokenizer(tok_path)
    config.data.prepared = str(tmp_path / "p")
    ds = pipeline.build_dataset(config.data, tok, "train", seed=0, workdir=tmp_path / "w",
                                example_kind=kind_of(config, tok))
    ex = ds[len(ds) - 1]
    assert ex["input_ids"].shape == (SEQ_LEN,) and int(ex["example_id"]) == len(ds) - 1


def test_two_processes_read_disjoint_halves_of_each_global_batch(tmp_path, tok_path, text_dir):
    config = text_config(tok_path, text_dir, prepared=str(tmp_path / "p"))
    prepare.prepare(config, tmp_path / "p", splits=("train",), shard_bytes=6000,
                    options=in_memory(), log=lambda s: None)
    tok = tokenizer_lib.load_tokenizer(tok_path)
    ds = pipeline.build_dataset(config.data, tok, "train", seed=0, workdir=tmp_path / "w",
                                example_kind=kind_of(config, tok), global_batch_size=8)
    assert len(arrayrecord.read_manifest(tmp_path / "p")["splits"]["train"]["shards"]) >= 4
    steps = (len(ds) // 8) + 3  # Past one epoch.
    one = pipeline.train_iterator(ds, batch_size_per_host=8, seed=5, num_threads=2)
    hosts = [pipeline.train_iterator(ds, batch_size_per_host=4, seed=5, process_index=p,
                                     process_count=2, num_threads=2) for p in (0, 1)]
    state = None
    for step in range(steps):
        g = next(one)
        h0, h1 = next(hosts[0]), next(hosts[1])
        ids0, ids1 = set(h0["example_id"].tolist()), set(h1["example_id"].tolist())
        assert not ids0 & ids1
        assert ids0 | ids1 == set(g["example_id"].tolist())
        both = {k: np.concatenate([h0[k], h1[k]]) for k in g}
        order = np.argsort(both["example_id"])
        gorder = np.argsort(g["example_id"])
        for k in g:
            np.testing.assert_array_equal(both[k][order], g[k][gorder])
        if step == 2:
            state = hosts[1].get_state()
            expected = [next(hosts[1]) for _ in range(3)]
            hosts = [hosts[0], None]
            break
    # Exact resume of a host from its iterator state.
    resumed = pipeline.train_iterator(ds, batch_size_per_host=4, seed=5, process_index=1,
                                      process_count=2, num_threads=2)
    resumed.set_state(state)
    for want in expected:
        got = next(resumed)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])
    assert int(np.max(got["epoch"])) >= 0


def test_record_codec_roundtrip():
    ex = {
        "input_ids": np.array([2, 10, 11, 3, 12, 3, 0, 0], np.int32),
        "segment_ids": np.array([0, 0, 0, 0, 1, 1, 0, 0], np.int32),
        "attention_mask": np.array([1, 1, 1, 1, 1, 1, 0, 0], np.int32),
        "word_ids": np.array([-1, 0, 0, -1, 1, -1, -1, -1], np.int32),
        "sentence_label": np.asarray(1, np.int32),
    }
    for dtype in ("uint16", "int32"):
        got = arrayrecord.decode(arrayrecord.encode(ex, dtype), 7, seq_len=8, id_dtype=dtype,
                                 pad_id=0, pairs=True)
        assert int(got.pop("example_id")) == 7
        assert_same_examples([ex], [got])
