"""Data preparation (embedded, local files, hub sources faked offline) and the resumable sharded samplers."""

import json
import os
import sysconfig
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach the hub; fakes stand in for it

import adamhd_train.data as data_mod  # noqa: E402
from adamhd_train.data import TokenSampler, ValBatches, embedded_documents, prepare_data  # noqa: E402

CAP = 150_000
SMALL = dict(max_chars=CAP, vocab_size=400, progress=False)


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return cache, prepare_data("embedded", cache_dir=cache, **SMALL)


def segments(tokens, eos):
    """Token ids cut after every EOS (each document ends with one)."""
    ends = np.flatnonzero(np.asarray(tokens) == eos)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [np.asarray(tokens[s:e]) for s, e in zip(starts, ends)]


def decoded_documents(prepared):
    tok = prepared.load_tokenizer()
    return [tok.decode(seg.tolist()) for split in ("train", "val")
            for seg in segments(prepared.tokens(split), prepared.eos_id)]


# ----------------------------------------------------------------------------------------------- embedded

def test_embedded_documents_are_the_stdlib_files_and_topics_under_the_cap():
    from pydoc_data.topics import topics

    docs = embedded_documents(CAP)
    assert docs == embedded_documents(CAP)
    names = [n for n, _ in docs]
    assert names == sorted(names) and sum(len(t) for _, t in docs) <= CAP
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    kinds = Counter()
    for name, text in docs:
        if name.startswith("pydoc_data/topics/"):
            assert text == topics[name.rsplit("/", 1)[1]]
            kinds["topic"] += 1
        else:
            assert name.endswith(".py") and not {"test", "tests", "site-packages"} & set(name.split("/"))
            assert text == (stdlib / name).read_text(encoding="utf-8")
            kinds["py"] += 1
    assert kinds["topic"] >= 1 and kinds["py"] >= 10
    full = embedded_documents()
    assert len(full) > 500 and sum(len(t) for _, t in full) > 5_000_000


def test_embedded_tokens_decode_back_to_the_documents(embedded):
    _, d = embedded
    assert d.tokenizer == "local-bpe" and d.vocab_size == 400 and d.dtype == "uint16"
    assert d.train_path.stat().st_size == 2 * d.train_tokens and d.val_path.stat().st_size == 2 * d.val_tokens
    train, val = d.tokens("train"), d.tokens("val")
    assert int(train.max()) < d.vocab_size and int(val.max()) < d.vocab_size
    assert train[-1] == d.eos_id and val[-1] == d.eos_id
    expected = sorted(t for _, t in embedded_documents(CAP))
    assert sorted(decoded_documents(d)) == expected
    assert (d.train_docs, d.val_docs) == ((train == d.eos_id).sum(), (val == d.eos_id).sum())
    total = d.train_tokens + d.val_tokens
    assert 1 <= d.val_docs and 0 < d.val_tokens <= max(0.02 * total, min(len(s) for s in segments(val, d.eos_id)))


def test_manifest_and_meta_record_the_hashes(embedded):
    _, d = embedded
    m = d.manifest()
    json.dumps(m)
    meta = json.loads((d.folder / "meta.json").read_text())
    assert m["data_hash"] == meta["data_hash"] and len(m["data_hash"]) == 64
    import hashlib

    raw = hashlib.sha256(d.train_path.read_bytes() + d.val_path.read_bytes()).hexdigest()
    assert m["data_hash"] == raw
    assert m["tokenizer_hash"] == hashlib.sha256((d.tokenizer_folder / "tokenizer.json").read_bytes()).hexdigest()


def test_second_call_reads_the_cache(embedded, monkeypatch):
    cache, d = embedded

    def no_build(*a, **k):
        raise AssertionError("rebuilt a cached corpus")

    monkeypatch.setattr(data_mod, "_build_tokens", no_build)
    monkeypatch.setattr(data_mod, "_train_local_bpe", no_build)
    assert prepare_data("embedded", cache_dir=cache, **SMALL) == d
    assert prepare_data("embedded", cache_dir=cache, build=False, **SMALL) == d
    assert not list((cache / "tmp").glob("*")) and not list((cache / "tokens").glob(".*"))


def test_same_inputs_give_the_same_hashes_in_another_cache_and_with_worker_processes(embedded, tmp_path):
    _, d = embedded
    d2 = prepare_data("embedded", cache_dir=tmp_path, num_proc=2, **SMALL)
    assert (d2.tokenizer_hash, d2.data_hash, d2.corpus_hash) == (d.tokenizer_hash, d.data_hash, d.corpus_hash)
    d3 = prepare_data("embedded", cache_dir=tmp_path, seed=1, **SMALL)  # another validation choice
    assert d3.tokenizer_hash == d.tokenizer_hash and d3.data_hash != d.data_hash
    assert d3.train_tokens + d3.val_tokens == d.train_tokens + d.val_tokens


def test_build_false_on_an_empty_cache_says_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"build=True"):
        prepare_data("embedded", cache_dir=tmp_path, build=False, **SMALL)
    assert not (tmp_path / "tokens").exists()


def test_concurrent_callers_build_once(tmp_path, monkeypatch):
    calls = []
    real = data_mod._build_tokens

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(data_mod, "_build_tokens", counting)
    results, errors = [None, None], []

    def worker(i):
        try:
            results[i] = prepare_data("embedded", cache_dir=tmp_path, max_chars=40_000, vocab_size=300,
                                      progress=False)
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and results[0] == results[1] and len(calls) == 1


# ----------------------------------------------------------------------------------------------- local files

def test_local_folder_of_txt_and_jsonl(tmp_path):
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    texts = ["The quick brown fox jumps over the lazy dog.\n" * 20,
             "def f(x):\n    return x * 2\n" * 30,
             "Lorem ipsum dolor sit amet, consectetur adipiscing elit.\n" * 15,
             "ünïcödé text — with em dashes and 日本語.\n" * 10]
    (root / "a.txt").write_text(texts[0])
    (root / "sub" / "b.jsonl").write_text("\n".join(json.dumps({"body": t, "id": i})
                                                    for i, t in enumerate(texts[1:])) + "\n\n")
    (root / ".hidden.txt").write_text("must not be read")
    (root / "notes.md").write_text("not a supported suffix")
    d = prepare_data(root, text_field="body", cache_dir=tmp_path / "c", vocab_size=300, progress=False)
    assert d.source == str(root.resolve()) and d.train_docs + d.val_docs == 4
    assert sorted(decoded_documents(d)) == sorted(texts)


def test_single_txt_file_keeps_its_tail_for_validation(tmp_path):
    text = "".join(f"line {i}: the same words again and again\n" for i in range(400))
    path = tmp_path / "one.txt"
    path.write_text(text)
    d = prepare_data(path, cache_dir=tmp_path / "c", vocab_size=300, val_fraction=0.1, progress=False)
    train, val = d.tokens("train"), d.tokens("val")
    total = d.train_tokens + d.val_tokens
    assert d.val_tokens == round(0.1 * total)
    tok = d.load_tokenizer()
    joined = np.concatenate([train, val]).tolist()
    assert joined[-1] == d.eos_id and joined.count(d.eos_id) == 1
    assert tok.decode(joined[:-1]) == text


def test_long_txt_file_is_cut_at_blank_lines():
    text = ("paragraph " * 30 + "\n\n") * 20_000
    pieces = data_mod._split_txt(text, limit=100_000)
    assert "".join(pieces) == text
    assert all(len(p) <= 100_000 for p in pieces) and all(p.endswith("\n\n") for p in pieces)


@pytest.mark.parametrize("content,match", [
    ('{"text": "ok"}\n{"title": "no text"}\n', r"b\.jsonl:2: no string field 'text' \(text_field\)"),
    ('{"text": "ok"}\nnot json\n', r"b\.jsonl:2: not valid JSON"),
])
def test_bad_jsonl_line_is_named(tmp_path, content, match):
    path = tmp_path / "b.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match=match):
        prepare_data(path, cache_dir=tmp_path / "c", vocab_size=300, progress=False)


def test_missing_or_unsupported_local_paths(tmp_path):
    missing = tmp_path / "nowhere" / "corpus.txt"
    with pytest.raises(FileNotFoundError, match="nowhere/corpus.txt"):
        prepare_data(str(missing), cache_dir=tmp_path / "c", progress=False)
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        prepare_data("./data/train.jsonl", cache_dir=tmp_path / "c", progress=False)
    csv = tmp_path / "x.csv"
    csv.write_text("a,b\n")
    with pytest.raises(ValueError, match=r"unsupported file type '\.csv' \(allowed: \.txt, \.jsonl"):
        prepare_data(csv, cache_dir=tmp_path / "c", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no .txt or .jsonl files"):
        prepare_data(tmp_path / "empty", cache_dir=tmp_path / "c", progress=False)


# ----------------------------------------------------------------------------------------------- hub (faked)

HUB_TEXTS = [f"Document number {i} talks about topic {i % 7} at some length. " * (5 + i % 4) for i in range(40)]


def fake_hub_tokenizer(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<pad>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(HUB_TEXTS, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>")


def test_hub_dataset_and_tokenizer_are_loaded_only_through_their_clients(tmp_path, monkeypatch):
    import datasets
    import transformers

    seen = {}

    def load_dataset(name, config=None, split=None, revision=None, **kw):
        seen["dataset"] = (name, config, split, revision)
        return datasets.Dataset.from_dict({"content": HUB_TEXTS, "meta": list(range(len(HUB_TEXTS)))})

    hub_tok = fake_hub_tokenizer(tmp_path)

    def from_pretrained(name, *a, **k):
        seen.setdefault("tokenizer", name)
        return hub_tok if name == "org/tok" else real_from_pretrained(name, *a, **k)

    real_from_pretrained = transformers.AutoTokenizer.from_pretrained
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", from_pretrained)
    d = prepare_data("org/corpus", tokenizer="org/tok", text_field="content", hub_split="train",
                     hub_revision="abc123", cache_dir=tmp_path / "c", progress=False)
    assert seen == {"dataset": ("org/corpus", None, "train", "abc123"), "tokenizer": "org/tok"}
    assert d.source == "hub:org/corpus" and d.tokenizer == "org/tok"
    assert d.eos_id == hub_tok.convert_tokens_to_ids("</s>") and d.vocab_size == len(hub_tok)
    expected = Counter(tuple(hub_tok(t, add_special_tokens=False)["input_ids"]) + (d.eos_id,) for t in HUB_TEXTS)
    got = Counter(tuple(s.tolist()) + (d.eos_id,) for split in ("train", "val")
                  for s in segments(d.tokens(split), d.eos_id))
    assert got == expected
    # the tokenizer now lives in the cache: no hub call when loading it
    assert d.load_tokenizer().decode(d.tokens("train")[:20].tolist()) == hub_tok.decode(d.tokens("train")[:20].tolist())


def test_unreachable_hub_is_a_clear_error(tmp_path, monkeypatch):
    import datasets
    import transformers

    def offline(*a, **k):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", offline)
    with pytest.raises(ConnectionError) as err:
        prepare_data("openwebtext", cache_dir=tmp_path, progress=False)
    msg = str(err.value)
    assert "'openwebtext'" in msg and "couldn't connect" in msg and "embedded" in msg and "nothing exists at" in msg
    with pytest.raises(ConnectionError, match="tokenizer 'gpt2'.*local-bpe"):
        prepare_data("embedded", tokenizer="gpt2", cache_dir=tmp_path, max_chars=20_000, progress=False)


def test_hub_dataset_without_the_text_column(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets, "load_dataset",
                        lambda *a, **k: datasets.Dataset.from_dict({"content": ["x"], "url": ["u"]}))
    with pytest.raises(ValueError, match=r"no column 'text' \(text_field\); columns: \['content', 'url'\]"):
        prepare_data("hf:some/data", cache_dir=tmp_path, vocab_size=300, progress=False)


@pytest.mark.parametrize("kwargs,field", [
    (dict(val_fraction=0.0), "val_fraction"),
    (dict(val_fraction=0.9), "val_fraction"),
    (dict(vocab_size=100), "vocab_size"),
    (dict(tokenizer="gpt2", vocab_size=1000), "vocab_size"),
    (dict(tokenizer=""), "tokenizer"),
    (dict(seed=-1), "seed"),
    (dict(max_chars=0), "max_chars"),
    (dict(num_proc=0), "num_proc"),
    (dict(text_field=""), "text_field"),
    (dict(source=""), "source"),
    (dict(source="hf:"), "hf:"),
])
def test_bad_arguments_are_named_before_any_work(tmp_path, kwargs, field):
    kwargs = {"source": "embedded", **kwargs}
    with pytest.raises(ValueError, match=field):
        prepare_data(kwargs.pop("source"), cache_dir=tmp_path, progress=False, **kwargs)
    assert not (tmp_path / "tokens").exists() and not (tmp_path / "tokenizers").exists()


# ----------------------------------------------------------------------------------------------- sampling

N, L = 10_000, 16
ARANGE = np.arange(N, dtype=np.uint32)


def take(sampler, k):
    return [next(sampler) for _ in range(k)]


def test_windows_are_token_slices_and_an_epoch_covers_every_window_once():
    s = TokenSampler(ARANGE, seq_len=L, micro_batch=5, seed=3)
    assert s.num_windows == N // L - 1
    for batch, starts in ((next(s), s.window_starts(np.arange(5))),):
        assert batch.dtype == torch.int64 and batch.shape == (5, L + 1)
        assert torch.equal(batch, torch.from_numpy(starts[:, None] + np.arange(L + 1)))
    for epoch in (0, 1):
        starts = s.window_starts(np.arange(epoch * s.num_windows, (epoch + 1) * s.num_windows))
        offset = starts.min() % L
        assert len(set(starts.tolist())) == s.num_windows and set((starts - offset) % L) == {0}
        assert starts.min() >= 0 and starts.max() + L + 1 <= N
    e0, e1 = (s.window_starts(np.arange(e * s.num_windows, e * s.num_windows + 50)) for e in (0, 1))
    assert not np.array_equal(e0, e1)


def test_resume_after_k_batches_equals_the_uninterrupted_stream():
    for rank in (0, 1):
        full = TokenSampler(ARANGE, seq_len=L, micro_batch=3, rank=rank, world_size=2, seed=5)
        stream = take(full, 12)
        first = TokenSampler(ARANGE, seq_len=L, micro_batch=3, rank=rank, world_size=2, seed=5)
        take(first, 7)
        state = json.loads(json.dumps(first.state_dict()))
        resumed = TokenSampler(ARANGE, seq_len=L, micro_batch=3, rank=rank, world_size=2, seed=5)
        resumed.load_state_dict(state)
        assert all(torch.equal(a, b) for a, b in zip(take(resumed, 5), stream[7:]))
        started = TokenSampler(ARANGE, seq_len=L, micro_batch=3, rank=rank, world_size=2, seed=5,
                               consumed_samples=state["consumed_samples"])
        assert torch.equal(next(started), stream[7])


def test_ranks_are_disjoint_and_a_step_holds_the_same_samples_at_any_world_size():
    one = TokenSampler(ARANGE, seq_len=L, micro_batch=4, seed=9)
    two = [TokenSampler(ARANGE, seq_len=L, micro_batch=2, rank=r, world_size=2, seed=9) for r in range(2)]
    for _ in range(30):
        a, b = next(two[0]), next(two[1])
        starts_a, starts_b = set(a[:, 0].tolist()), set(b[:, 0].tolist())
        assert not starts_a & starts_b
        assert starts_a | starts_b == set(next(one)[:, 0].tolist())
    # a checkpoint taken at world size 2 resumes at world size 1 at the same global position
    resumed = TokenSampler(ARANGE, seq_len=L, micro_batch=4, seed=9)
    resumed.load_state_dict(two[0].state_dict())
    assert torch.equal(next(resumed), next(one))


def test_same_seed_same_batches_other_seed_other_batches():
    a, b, c = (TokenSampler(ARANGE, seq_len=L, micro_batch=4, seed=s) for s in (1, 1, 2))
    xa, xb, xc = take(a, 5), take(b, 5), take(c, 5)
    assert all(torch.equal(p, q) for p, q in zip(xa, xb))
    assert not all(torch.equal(p, q) for p, q in zip(xa, xc))


@pytest.mark.parametrize("kwargs,match", [
    (dict(seq_len=0), "seq_len"),
    (dict(micro_batch=0), "micro_batch"),
    (dict(rank=2, world_size=2), r"rank must be an integer in \[0, 1\]"),
    (dict(world_size=0), "world_size"),
    (dict(seed=-1), "seed"),
    (dict(seq_len=6000), r"2 x seq_len"),
])
def test_bad_sampler_arguments(kwargs, match):
    kwargs = {"seq_len": L, "micro_batch": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        TokenSampler(ARANGE, **kwargs)
    with pytest.raises(ValueError, match="1-D integer numpy array"):
        TokenSampler(ARANGE.astype(np.float32), seq_len=L, micro_batch=2)


def test_state_from_another_stream_is_refused():
    s = TokenSampler(ARANGE, seq_len=L, micro_batch=2, seed=1)
    for key, value in (("seq_len", 32), ("seed", 2), ("num_tokens", N - 1)):
        with pytest.raises(ValueError, match=key):
            s.load_state_dict({**s.state_dict(), key: value})
    with pytest.raises(ValueError, match="consumed_samples"):
        s.load_state_dict({**s.state_dict(), "consumed_samples": -4})


def test_validation_batches_are_fixed_and_split_across_ranks():
    val = np.arange(1000, dtype=np.uint16)
    one = ValBatches(val, seq_len=10, micro_batch=4)
    assert len(one) == 99 // 4
    assert [torch.equal(a, b) for a, b in zip(one, one)] == [True] * len(one)
    ranks = [ValBatches(val, seq_len=10, micro_batch=2, rank=r, world_size=2, max_batches=5) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 5
    for b, (x, y, z) in enumerate(zip(ranks[0], ranks[1], one)):
        assert not set(x[:, 0].tolist()) & set(y[:, 0].tolist())
        assert torch.equal(torch.cat([x, y]), z)
        assert torch.equal(z[:, 1:], z[:, :-1] + 1)
    with pytest.raises(ValueError, match=r"one batch needs micro_batch x world_size = 128"):
        ValBatches(val, seq_len=10, micro_batch=64, world_size=2)


def test_samplers_read_a_prepared_corpus(embedded):
    _, d = embedded
    s = TokenSampler(d, seq_len=64, micro_batch=4, seed=0)
    batch = next(s)
    starts = s.window_starts(np.arange(4))
    train = d.tokens("train")
    assert torch.equal(batch, torch.from_numpy(np.stack([train[i:i + 65] for i in starts]).astype(np.int64)))
    v = next(iter(ValBatches(d, seq_len=64, micro_batch=2)))
    assert torch.equal(v[0], torch.from_numpy(d.tokens("val")[:65].astype(np.int64)))


def test_publish_folder_is_one_rename_and_replaces_only_when_asked(tmp_path):
    """A folder appears complete or not at all; an existing one is kept (FileExistsError, the new one left as it
    was) unless replace=True, which swaps it out without leaving the aside copy behind."""
    from adamhd_dist.fsutil import publish_folder

    def folder(name, text):
        d = tmp_path / name
        (d / "sub").mkdir(parents=True)
        (d / "sub" / "f.txt").write_text(text)
        return d

    final = tmp_path / "out" / "step1"
    assert publish_folder(folder("a", "first"), final) == final
    assert (final / "sub" / "f.txt").read_text() == "first" and not (tmp_path / "a").exists()
    b = folder("b", "second")
    with pytest.raises(FileExistsError):
        publish_folder(b, final)
    assert (final / "sub" / "f.txt").read_text() == "first" and (b / "sub" / "f.txt").read_text() == "second"
    publish_folder(b, final, replace=True)
    assert (final / "sub" / "f.txt").read_text() == "second"
    assert sorted(p.name for p in final.parent.iterdir()) == ["step1"]
