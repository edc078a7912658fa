"""Pre-training data: a tokenized, memory-mapped token file per split, and deterministic resumable sampling.

Sources (``prepare_data(source=...)``):

- ``"embedded"`` (default, no network): the Python standard library's own ``.py`` sources (tests excluded) and its
  pydoc topics (``pydoc_data.topics``), about 12 MB of text on CPython 3.11; a deterministic subset when capped
  by ``max_chars``. The corpus, and so every hash, depends on the Python version.
- a local ``.txt`` or ``.jsonl`` file, or a folder searched recursively for both: a ``.txt`` file is one document
  (files over 1M characters are cut at blank lines into documents of about that size); a ``.jsonl`` line is one
  document, its text under ``text_field``. Files are read as UTF-8 (a .txt file's invalid bytes become U+FFFD).
- a Hugging Face hub dataset name (``"openwebtext"``, ``"Skylion007/openwebtext"``; ``"hf:NAME"`` forces the hub),
  loaded with ``datasets.load_dataset`` only when its tokens are not cached yet.

Tokenizers (``tokenizer=...``): ``"local-bpe"`` trains a byte-level BPE with ``tokenizers`` on the corpus itself
(``<|endoftext|>`` is id 0 and separates documents); any other value is a hub tokenizer name (``"gpt2"``),
loaded with ``transformers.AutoTokenizer`` and saved into the cache so later runs need no network.

Cache layout under ``cache_dir`` (default ``$ADAMHD_DATA_CACHE`` or ``~/.cache/adamhd_dist``)::

    tokenizers/<key>/tokenizer.json ...   a transformers-loadable tokenizer folder + meta.json
    tokens/<key>/train.bin, val.bin      flat uint16 (vocab <= 65536) or uint32 token ids, EOS after every document
    tokens/<key>/meta.json               counts, dtype, hashes: what a run manifest records (PreparedData.manifest())

A folder appears under its final name only when complete (built in a temporary folder, files fsync'ed, renamed).

Multi-process runs: building takes a file lock per source, so ranks that all call ``prepare_data`` build once and
the others wait for the lock and then read the cache. Where a collective would time out while rank 0 builds, or on a
filesystem without ``flock``, build first and load after a barrier::

    if rank == 0:
        data = prepare_data("embedded")
    dist.barrier()
    if rank != 0:
        data = prepare_data("embedded", build=False)   # FileNotFoundError instead of building

Sampling: :class:`TokenSampler` draws ``(micro_batch, seq_len + 1)`` windows for a rank; its position is one
integer (samples consumed by all ranks together), saved by ``state_dict()``. :class:`ValBatches` iterates a fixed
set of validation windows.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import numpy as np
import torch
from tqdm import tqdm

from adamhd_dist.fsutil import publish_folder

# datasets, tokenizers and transformers are imported inside the functions that build a token cache or load a
# tokenizer: every rank of a run whose cache is built reads it with numpy alone, without their seconds of import.

__all__ = [
    "EMBEDDED",
    "LOCAL_BPE",
    "EOS_TOKEN",
    "PreparedData",
    "prepare_data",
    "embedded_documents",
    "default_cache_dir",
    "TokenSampler",
    "ValBatches",
    "looks_like_path",
]

EMBEDDED = "embedded"
LOCAL_BPE = "local-bpe"
EOS_TOKEN = "<|endoftext|>"
LOCAL_SUFFIXES = (".txt", ".jsonl")
FORMAT_VERSION = 1
_TXT_DOC_CHARS = 1 << 20
_SKIP_STDLIB_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}


def default_cache_dir() -> Path:
    """``$ADAMHD_DATA_CACHE`` if set, else ``~/.cache/adamhd_dist``."""
    env = os.environ.get("ADAMHD_DATA_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "adamhd_dist"


def _sha256(*parts: Any) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(json.dumps(p, sort_keys=True, default=str).encode() + b"\0")
    return h.hexdigest()


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------------- sources

def _stdlib_candidates() -> list[tuple[str, Union[Path, str], int]]:
    """(name, file path or topic key, size) for every document the embedded corpus can hold."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out: list[tuple[str, Union[Path, str], int]] = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in _SKIP_STDLIB_DIRS]
        for fname in files:
            path = Path(folder, fname)
            if fname.endswith(".py") and path.is_file():
                out.append((path.relative_to(root).as_posix(), path, path.stat().st_size))
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip pydoc_data
        topics = {}
    out.extend((f"pydoc_data/topics/{key}", key, len(text)) for key, text in topics.items())
    return out


def embedded_documents(max_chars: Optional[int] = None, *, progress: bool = False) -> list[tuple[str, str]]:
    """The embedded corpus as ``[(name, text), ...]`` sorted by name: standard-library ``.py`` files (outside test
    folders, valid UTF-8) named by their path under the stdlib folder, and pydoc topics named
    ``pydoc_data/topics/<topic>``.

    ``max_chars`` caps the total: documents are considered in the order of the SHA-1 of their names (a fixed,
    well-mixed order) and each is kept if it still fits, so a cap gives a spread of modules, not the first ones
    alphabetically. ``None`` keeps everything.
    """
    if max_chars is not None:
        _check_int("max_chars", max_chars, minimum=1)
    candidates = _stdlib_candidates()
    if max_chars is not None:
        candidates.sort(key=lambda c: hashlib.sha1(c[0].encode()).hexdigest())
    try:
        from pydoc_data.topics import topics
    except ImportError:
        topics = {}
    docs, total = [], 0
    for name, where, size in tqdm(candidates, desc="embedded corpus", unit="file", disable=not progress):
        if max_chars is not None and total + size > max_chars:
            continue
        if isinstance(where, Path):
            try:
                text = where.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
        else:
            text = topics[where]
        if not text.strip() or (max_chars is not None and total + len(text) > max_chars):
            continue
        docs.append((name, text))
        total += len(text)
    docs.sort(key=lambda d: d[0])
    return docs


def _split_txt(text: str, limit: int = _TXT_DOC_CHARS) -> list[str]:
    """Cut a long text at blank lines (else newlines, else anywhere) into pieces of at most ``limit`` chars."""
    pieces = []
    while len(text) > limit:
        cut = text.rfind("\n\n", limit // 2, limit)
        cut = text.rfind("\n", limit // 2, limit) if cut < 0 else cut + 2
        cut = limit if cut <= 0 else cut
        pieces.append(text[:cut])
        text = text[cut:]
    if text:
        pieces.append(text)
    return pieces


def _local_files(path: Path) -> list[Path]:
    if path.is_file():
        if path.suffix.lower() not in LOCAL_SUFFIXES:
            raise ValueError(f"source {str(path)!r}: unsupported file type {path.suffix or '(none)'!r} "
                             f"(allowed: {', '.join(LOCAL_SUFFIXES)}, or a folder of such files)")
        return [path]
    files = sorted((p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in LOCAL_SUFFIXES
                    and not any(part.startswith(".") for part in p.relative_to(path).parts)),
                   key=lambda p: p.relative_to(path).as_posix())
    if not files:
        raise ValueError(f"source {str(path)!r}: no {' or '.join(LOCAL_SUFFIXES)} files in this folder")
    return files


def _local_documents(files: list[str], text_field: str, max_chars: Optional[int]) -> Iterator[dict]:
    """Generator for ``datasets.Dataset.from_generator``: one ``{"text": ...}`` per document."""
    total = 0
    for name in files:
        path = Path(name)
        if path.suffix.lower() == ".txt":
            docs = _split_txt(path.read_text(encoding="utf-8", errors="replace"))
        else:
            docs = []
            with open(path, encoding="utf-8") as fh:
                for lineno, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
                    text = record.get(text_field) if isinstance(record, dict) else None
                    if not isinstance(text, str):
                        keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                        raise ValueError(f"{path}:{lineno}: no string field {text_field!r} (text_field); "
                                         f"the line has: {keys}")
                    docs.append(text)
        for text in docs:
            if not text:
                continue
            if max_chars is not None and total > 0 and total + len(text) > max_chars:
                return
            total += len(text)
            yield {"text": text}


@dataclass
class _Source:
    kind: str  # "embedded" | "local" | "hub"
    description: str
    key: str  # identifies the corpus (and caps/fields) for the cache
    docs: Optional[list[tuple[str, str]]] = None  # embedded
    files: Optional[list[str]] = None  # local
    hub: Optional[dict] = None  # hub: name, config, split, revision
    text_field: str = "text"
    max_chars: Optional[int] = None
    corpus_hash: Optional[str] = None

    def load(self, work_dir: Path, progress: bool):
        """The corpus as a ``datasets.Dataset`` with one ``text`` column."""
        import datasets

        features = datasets.Features({"text": datasets.Value("string")})
        if self.kind == "embedded":
            return datasets.Dataset.from_dict({"text": [t for _, t in self.docs]}, features=features)
        if self.kind == "local":
            try:
                ds = datasets.Dataset.from_generator(
                    _local_documents, features=features, cache_dir=str(work_dir / "hf"),
                    gen_kwargs={"files": self.files, "text_field": self.text_field, "max_chars": self.max_chars})
            except datasets.exceptions.DatasetGenerationError as e:
                if isinstance(e.__cause__, (ValueError, OSError)):  # a bad file: report it, not the wrapper
                    raise e.__cause__ from None
                raise
            if len(ds) == 0:
                raise ValueError(f"source {self.description!r}: no non-empty documents")
            return ds
        return _load_hub_dataset(self)


def _load_hub_dataset(src: _Source):
    import datasets
    import pyarrow.compute as pc

    h = src.hub
    try:
        ds = datasets.load_dataset(h["name"], h["config"], split=h["split"], revision=h["revision"])
    except Exception as e:  # network, auth, unknown name: the hub raises many types
        local = Path(h["name"]).expanduser().absolute()
        raise ConnectionError(
            f"could not load hub dataset {h['name']!r} (config={h['config']!r}, split={h['split']!r}): "
            f"{type(e).__name__}: {e}. The hub may be unreachable or the name wrong; for a local file or folder "
            f"give its path (nothing exists at {str(local)!r}); source='embedded' needs no network.") from e
    if isinstance(ds, datasets.DatasetDict):
        raise ValueError(f"hub dataset {h['name']!r}: give a split (hub_split), one of {sorted(ds)}")
    if src.text_field not in ds.column_names:
        raise ValueError(f"hub dataset {h['name']!r} has no column {src.text_field!r} (text_field); "
                         f"columns: {ds.column_names}")
    ds = ds.select_columns([src.text_field])
    if src.text_field != "text":
        ds = ds.rename_column(src.text_field, "text")
    if src.max_chars is not None:
        keep, total = 0, 0
        for batch in ds.with_format("arrow").iter(batch_size=10_000):
            lengths = pc.utf8_length(batch.column("text")).to_numpy(zero_copy_only=False)
            cum = total + np.cumsum(lengths)
            fits = int(np.searchsorted(cum, src.max_chars, side="right"))
            keep += fits
            if fits < len(lengths):
                break
            total = int(cum[-1])
        ds = ds.select(range(max(keep, 1)))
    return ds


def looks_like_path(source: str) -> bool:
    """Whether a ``--data`` value names a local file or folder (rather than a hub dataset)."""
    return (source.startswith(("/", ".", "~"))
            or (os.sep in source and os.path.splitext(source)[1] != "")
            or source.lower().endswith(LOCAL_SUFFIXES + (".json", ".csv", ".parquet")))


def _resolve_source(source, *, text_field, max_chars, hub_config, hub_split, hub_revision, progress) -> _Source:
    if not isinstance(source, (str, os.PathLike)) or not str(source):
        raise ValueError(f"source must be 'embedded', a path, or a hub dataset name, got {source!r}")
    text = os.fspath(source)
    if text == EMBEDDED:
        docs = embedded_documents(max_chars, progress=progress)
        if not docs:
            raise ValueError(f"the embedded corpus is empty under max_chars={max_chars}")
        h = hashlib.sha256()
        for name, body in docs:
            h.update(name.encode() + b"\0" + body.encode() + b"\0")
        corpus_hash = h.hexdigest()
        desc = f"embedded: Python {sys.version_info.major}.{sys.version_info.minor} standard library + pydoc topics"
        return _Source("embedded", desc, _sha256("embedded", corpus_hash), docs=docs, max_chars=max_chars,
                       corpus_hash=corpus_hash)
    force_hub = text.startswith("hf:")
    path = Path(text).expanduser()
    if not force_hub and path.exists():
        path = path.resolve()
        files = _local_files(path)
        stats = [(f.relative_to(path).as_posix() if path.is_dir() else f.name, f.stat().st_size,
                  f.stat().st_mtime_ns) for f in files]
        return _Source("local", str(path), _sha256("local", str(path), stats, text_field, max_chars),
                       files=[str(f) for f in files], text_field=text_field, max_chars=max_chars)
    if not force_hub and looks_like_path(text):
        raise FileNotFoundError(f"source {text!r}: no such file or folder ({str(path.absolute())!r})")
    name = text[3:] if force_hub else text
    if not name:
        raise ValueError("source 'hf:' needs a dataset name after the prefix, e.g. 'hf:openwebtext'")
    hub = {"name": name, "config": hub_config, "split": hub_split, "revision": hub_revision}
    return _Source("hub", f"hub:{name}", _sha256("hub", hub, text_field, max_chars), hub=hub,
                   text_field=text_field, max_chars=max_chars)


# ------------------------------------------------------------------------------------------------- tokenizers

def _complete(folder: Path) -> bool:
    return (folder / "meta.json").is_file()


def _read_meta(folder: Path) -> dict:
    return json.loads((folder / "meta.json").read_text())


def _publish(tmp: Path, final: Path) -> None:
    """Make ``tmp`` visible as ``final`` in one rename (:func:`~adamhd_dist.fsutil.publish_folder`); when another
    process published the same content first, ``tmp`` is dropped."""
    try:
        publish_folder(tmp, final)
    except FileExistsError:
        if not _complete(final):
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def _text_batches(ds, max_chars: int, batch_size: int = 1000) -> Iterator[list[str]]:
    total = 0
    for start in range(0, len(ds), batch_size):
        texts = ds[start:start + batch_size]["text"]
        yield texts
        total += sum(map(len, texts))
        if total >= max_chars:
            return


def _train_local_bpe(ds, vocab_size: int, train_chars: int, out: Path, progress: bool) -> str:
    """Train a byte-level BPE on the first ``train_chars`` characters of ``ds``, save it to ``out``; its EOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=progress)
    tok.train_from_iterator(_text_batches(ds, train_chars), trainer=trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN,
                            unk_token=EOS_TOKEN).save_pretrained(str(out))
    return EOS_TOKEN


def _fetch_hub_tokenizer(name: str, out: Path) -> str:
    """Load a hub tokenizer with ``AutoTokenizer`` and save it to ``out``; its EOS."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(name)
    except Exception as e:
        raise ConnectionError(f"could not load tokenizer {name!r} from the Hugging Face hub: {type(e).__name__}: "
                              f"{e}. The hub may be unreachable or the name wrong; tokenizer='{LOCAL_BPE}' "
                              f"trains one locally.") from e
    if getattr(tok, "backend_tokenizer", None) is None:
        raise ValueError(f"tokenizer {name!r} has no fast (Rust) backend; a tokenizers-backed one is needed")
    if tok.eos_token is None:
        raise ValueError(f"tokenizer {name!r} has no EOS token to separate documents")
    tok.save_pretrained(str(out))
    return tok.eos_token


def _tokenizer_folder(cache: Path, src: _Source, tokenizer: str, vocab_size: int, bpe_train_chars: int,
                      build: bool, progress: bool, corpus) -> Path:
    import tokenizers

    if tokenizer == LOCAL_BPE:
        key = _sha256(FORMAT_VERSION, LOCAL_BPE, src.key, vocab_size, bpe_train_chars, tokenizers.__version__)
    else:
        key = _sha256(FORMAT_VERSION, "hub", tokenizer)
    folder = cache / "tokenizers" / key[:24]
    if _complete(folder):
        return folder
    if not build:
        raise FileNotFoundError(f"tokenizer {tokenizer!r} for source {src.description!r} is not cached in "
                                f"{str(folder)!r}; call prepare_data(..., build=True) on one process first")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        t0 = time.perf_counter()
        if tokenizer == LOCAL_BPE:
            eos = _train_local_bpe(corpus(), vocab_size, bpe_train_chars, tmp, progress)
        else:
            eos = _fetch_hub_tokenizer(tokenizer, tmp)
        from tokenizers import Tokenizer

        backend = Tokenizer.from_file(str(tmp / "tokenizer.json"))
        eos_id = backend.token_to_id(eos)
        if eos_id is None:
            raise ValueError(f"tokenizer {tokenizer!r}: its EOS token {eos!r} is not in its vocabulary")
        meta = {"tokenizer": tokenizer, "vocab_size": backend.get_vocab_size(with_added_tokens=True),
                "eos_id": eos_id, "tokenizer_hash": _file_sha256(tmp / "tokenizer.json"),
                "seconds": round(time.perf_counter() - t0, 2), "tokenizers_version": tokenizers.__version__}
        if tokenizer == LOCAL_BPE:
            meta.update(trained_on=src.description, bpe_train_chars=bpe_train_chars)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        _publish(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


# ------------------------------------------------------------------------------------------------ token files

class _Encoder:
    """``datasets.map`` function: token ids of each document followed by EOS (a picklable callable)."""

    def __init__(self, tokenizer_json: str, eos_id: int):
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_str(tokenizer_json)
        self.eos_id = eos_id

    def __call__(self, batch: dict) -> dict:
        encode = getattr(self.tokenizer, "encode_batch_fast", self.tokenizer.encode_batch)
        ids = [e.ids + [self.eos_id] for e in encode(batch["text"], add_special_tokens=False)]
        return {"ids": ids, "n": [len(x) for x in ids]}


def _choose_val_docs(lengths: np.ndarray, val_fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of validation documents: documents in a seeded random order are taken while they keep the
    validation split within twice its target of ``val_fraction`` of all tokens, until the target is reached."""
    n = len(lengths)
    target = val_fraction * float(lengths.sum())
    mask = np.zeros(n, dtype=bool)
    taken = 0
    for i in np.random.default_rng(seed).permutation(n):
        if taken >= target:
            break
        if taken + lengths[i] <= 2 * target:
            mask[i] = True
            taken += int(lengths[i])
    if not mask.any():
        mask[int(np.argmin(lengths))] = True
    if mask.all():
        raise ValueError(f"cannot split {n} document(s) into train and validation with val_fraction={val_fraction}")
    return mask


def _write_tokens(path: Path, chunks: Iterator[np.ndarray], total: int, dtype, hasher, desc: str,
                  progress: bool) -> None:
    arr = np.memmap(path, dtype=dtype, mode="w+", shape=(total,))
    pos = 0
    with tqdm(total=total, desc=desc, unit="tok", unit_scale=True, disable=not progress) as bar:
        for chunk in chunks:
            chunk = chunk.astype(dtype, copy=False)
            arr[pos:pos + len(chunk)] = chunk
            hasher.update(chunk.tobytes())
            pos += len(chunk)
            bar.update(len(chunk))
    if pos != total:
        raise RuntimeError(f"{path.name}: wrote {pos} tokens, expected {total}")
    arr.flush()
    del arr


def _arrow_chunks(table, mask: np.ndarray, batch_rows: int = 8192) -> Iterator[np.ndarray]:
    import pyarrow as pa
    import pyarrow.compute as pc

    row = 0
    for rb in table.to_batches(max_chunksize=batch_rows):
        m = mask[row:row + rb.num_rows]
        row += rb.num_rows
        if m.any():
            yield pc.list_flatten(rb.column("ids").filter(pa.array(m))).to_numpy(zero_copy_only=False)


def _build_tokens(folder: Path, corpus, src: _Source, tok_folder: Path, val_fraction: float, seed: int,
                  num_proc: Optional[int], progress: bool) -> None:
    import datasets

    tok_meta = _read_meta(tok_folder)
    vocab_size, eos_id = tok_meta["vocab_size"], tok_meta["eos_id"]
    dtype = np.uint16 if vocab_size <= 1 << 16 else np.uint32
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    t0 = time.perf_counter()
    try:
        ds = corpus()
        if num_proc is None:
            num_proc = 1 if len(ds) < 50_000 else max(1, min(8, os.cpu_count() or 1))
        encoder = _Encoder((tok_folder / "tokenizer.json").read_text(), eos_id)
        features = datasets.Features({"ids": datasets.List(datasets.Value(np.dtype(dtype).name)),
                                      "n": datasets.Value("int64")})
        env = {"TOKENIZERS_PARALLELISM": "false"} if num_proc > 1 else {}
        with _environ(env):
            tokenized = ds.map(encoder, batched=True, batch_size=256, remove_columns=ds.column_names,
                               features=features, num_proc=num_proc if num_proc > 1 else None,
                               cache_file_name=str(tmp / "tokenized.arrow"), desc="tokenizing")
        table = tokenized.data
        lengths = table.column("n").to_numpy()
        hasher = hashlib.sha256()
        if len(lengths) >= 2:
            is_val = _choose_val_docs(lengths, val_fraction, seed)
            splits = {"train": ~is_val, "val": is_val}
            counts = {k: int(lengths[m].sum()) for k, m in splits.items()}
            docs = {k: int(m.sum()) for k, m in splits.items()}
            for name, m in splits.items():
                _write_tokens(tmp / f"{name}.bin", _arrow_chunks(table, m), counts[name], dtype, hasher,
                              f"writing {name}", progress)
        else:  # one document: its last val_fraction of tokens is the validation split
            ids = next(_arrow_chunks(table, np.ones(1, dtype=bool)))
            n_val = max(1, int(round(val_fraction * len(ids))))
            if n_val >= len(ids):
                raise ValueError(f"source {src.description!r} has {len(ids)} tokens: too few to split")
            parts = {"train": ids[:-n_val], "val": ids[-n_val:]}
            counts = {k: len(v) for k, v in parts.items()}
            docs = {"train": 1, "val": 1}
            for name, arr in parts.items():
                _write_tokens(tmp / f"{name}.bin", iter([arr]), len(arr), dtype, hasher, f"writing {name}", progress)
        del table, tokenized, ds
        for leftover in list(tmp.iterdir()):
            if leftover.name not in ("train.bin", "val.bin"):
                shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
        meta = {
            "format_version": FORMAT_VERSION,
            "source": src.description,
            "source_kind": src.kind,
            "corpus_hash": src.corpus_hash,
            "tokenizer": tok_meta["tokenizer"],
            "tokenizer_hash": tok_meta["tokenizer_hash"],
            "vocab_size": vocab_size,
            "eos_id": eos_id,
            "dtype": np.dtype(dtype).name,
            "train_tokens": counts["train"],
            "val_tokens": counts["val"],
            "train_docs": docs["train"],
            "val_docs": docs["val"],
            "val_fraction": val_fraction,
            "seed": seed,
            "max_chars": src.max_chars,
            "data_hash": hasher.hexdigest(),
            "seconds": round(time.perf_counter() - t0, 2),
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        _publish(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def _environ(values: dict):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def _file_lock(path: Path):
    """Exclusive ``flock`` on ``path`` (no-op where ``fcntl`` does not exist)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


@contextlib.contextmanager
def _progress_bars(enabled: bool):
    import datasets

    was = datasets.is_progress_bar_enabled()
    (datasets.enable_progress_bars if enabled else datasets.disable_progress_bars)()
    try:
        yield
    finally:
        (datasets.enable_progress_bars if was else datasets.disable_progress_bars)()


# ----------------------------------------------------------------------------------------------- public API

@dataclass(frozen=True)
class PreparedData:
    """A prepared corpus: the token files of both splits, the tokenizer, and the numbers a run manifest records."""

    folder: Path
    """Folder holding ``train.bin``, ``val.bin`` and ``meta.json``."""
    tokenizer_folder: Path
    """transformers-loadable tokenizer folder (``AutoTokenizer.from_pretrained(tokenizer_folder)``)."""
    source: str
    """What the text was ("embedded: ...", a path, "hub:NAME")."""
    tokenizer: str
    """``"local-bpe"`` or the hub tokenizer's name."""
    vocab_size: int
    """Tokenizer vocabulary including special tokens; every id in the token files is below it."""
    eos_id: int
    """Id of the end-of-text token written after every document."""
    dtype: str
    """``"uint16"`` or ``"uint32"``: element type of the token files."""
    train_tokens: int
    val_tokens: int
    train_docs: int
    val_docs: int
    corpus_hash: Optional[str]
    """SHA-256 of the source text (embedded corpus only; local and hub corpora are identified by data_hash)."""
    tokenizer_hash: str
    """SHA-256 of ``tokenizer.json``."""
    data_hash: str
    """SHA-256 of the train then validation token bytes: identifies exactly what a run trained on."""

    @property
    def train_path(self) -> Path:
        """The training split's token file."""
        return self.folder / "train.bin"

    @property
    def val_path(self) -> Path:
        """The validation split's token file."""
        return self.folder / "val.bin"

    def tokens(self, split: str = "train") -> np.memmap:
        """Read-only memory map of a split's token ids (``"train"`` or ``"val"``)."""
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        n = self.train_tokens if split == "train" else self.val_tokens
        path = self.train_path if split == "train" else self.val_path
        return np.memmap(path, dtype=np.dtype(self.dtype), mode="r", shape=(n,))

    def load_tokenizer(self):
        """The tokenizer as a ``transformers`` fast tokenizer (from the cache; no network)."""
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(self.tokenizer_folder))

    def manifest(self) -> dict:
        """JSON-able description for a run manifest: source, tokenizer, counts, hashes, paths."""
        out = dataclasses.asdict(self)
        out["folder"], out["tokenizer_folder"] = str(self.folder), str(self.tokenizer_folder)
        return out

    def describe(self) -> str:
        """One line for the run log."""
        return (f"data: {self.source}; tokenizer {self.tokenizer} (vocab {self.vocab_size:,}); "
                f"{self.train_tokens:,} train / {self.val_tokens:,} val tokens in {self.folder}")

    @classmethod
    def from_folder(cls, folder: Union[str, os.PathLike], tokenizer_folder: Union[str, os.PathLike]) -> "PreparedData":
        """Open a complete token folder written by :func:`prepare_data`."""
        folder = Path(folder)
        meta = _read_meta(folder)
        names = {f.name for f in dataclasses.fields(cls)} - {"folder", "tokenizer_folder"}
        return cls(folder=folder, tokenizer_folder=Path(tokenizer_folder), **{k: meta[k] for k in names})


def _check_int(label: str, value, minimum: int, maximum: Optional[int] = None) -> int:
    if (not isinstance(value, int) or isinstance(value, bool) or value < minimum
            or (maximum is not None and value > maximum)):
        rng = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ValueError(f"{label} must be an integer {rng}, got {value!r}")
    return value


def prepare_data(
    source: Union[str, os.PathLike] = EMBEDDED,
    *,
    tokenizer: str = LOCAL_BPE,
    vocab_size: Optional[int] = None,
    cache_dir: Union[str, os.PathLike, None] = None,
    val_fraction: float = 0.01,
    seed: int = 0,
    max_chars: Optional[int] = None,
    text_field: str = "text",
    hub_config: Optional[str] = None,
    hub_split: str = "train",
    hub_revision: Optional[str] = None,
    bpe_train_chars: int = 200_000_000,
    num_proc: Optional[int] = None,
    build: bool = True,
    progress: bool = True,
) -> PreparedData:
    """Tokenize a corpus once into memory-mapped train/validation token files (cached), and describe them.

    Args:
        source: ``"embedded"``, a ``.txt``/``.jsonl`` file or a folder of them, or a hub dataset name
            (``"hf:"`` prefix to force the hub). A path-like source that does not exist is a FileNotFoundError.
        tokenizer: ``"local-bpe"`` (byte-level BPE trained on this corpus) or a hub tokenizer name (``"gpt2"``).
        vocab_size: size of the local BPE vocabulary, default 8192 (only with ``"local-bpe"``).
        cache_dir: cache root, default :func:`default_cache_dir`.
        val_fraction: share of the tokens held out for validation, in (0, 0.5]; whole documents are held out
            (chosen by ``seed``), except for a one-document corpus whose tail is.
        seed: seed of the validation choice.
        max_chars: cap on the source text in characters (``None``: all). The embedded corpus keeps a fixed
            well-mixed subset (:func:`embedded_documents`); other sources keep their first documents.
        text_field: the text column of a ``.jsonl`` file or hub dataset.
        hub_config, hub_split, hub_revision: passed to ``datasets.load_dataset`` for a hub source; the cache is
            keyed by these values, so pin ``hub_revision`` for a dataset that may change.
        bpe_train_chars: the local BPE trains on the first documents up to this many characters.
        num_proc: processes for tokenization; default 1 below 50k documents (the Rust tokenizer is already
            multi-threaded), else up to 8.
        build: ``False`` only opens the cache and raises FileNotFoundError when it is not built (for ranks that
            wait for rank 0, see the module docstring).
        progress: show progress bars.
    Returns:
        :class:`PreparedData` with the paths, vocabulary size, token counts and hashes.
    """
    if not isinstance(tokenizer, str) or not tokenizer:
        raise ValueError(f"tokenizer must be '{LOCAL_BPE}' or a hub tokenizer name, got {tokenizer!r}")
    if tokenizer == LOCAL_BPE:
        vocab_size = 8192 if vocab_size is None else _check_int("vocab_size", vocab_size, 258, (1 << 32) - 1)
    elif vocab_size is not None:
        raise ValueError(f"vocab_size applies to tokenizer='{LOCAL_BPE}' only; the hub tokenizer {tokenizer!r} "
                         f"has its own vocabulary (got vocab_size={vocab_size!r})")
    if not (isinstance(val_fraction, (int, float)) and not isinstance(val_fraction, bool)
            and 0.0 < val_fraction <= 0.5):
        raise ValueError(f"val_fraction must be in (0, 0.5], got {val_fraction!r}")
    _check_int("seed", seed, 0)
    if max_chars is not None:
        _check_int("max_chars", max_chars, 1)
    _check_int("bpe_train_chars", bpe_train_chars, 1)
    if num_proc is not None:
        _check_int("num_proc", num_proc, 1)
    if not isinstance(text_field, str) or not text_field:
        raise ValueError(f"text_field must be a non-empty string, got {text_field!r}")
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    if cache.exists() and not cache.is_dir():
        raise ValueError(f"cache_dir {str(cache)!r} exists and is not a folder")

    src = _resolve_source(source, text_field=text_field, max_chars=max_chars, hub_config=hub_config,
                          hub_split=hub_split, hub_revision=hub_revision, progress=progress)
    loaded: dict = {}

    def corpus():
        if "ds" not in loaded:
            (cache / "tmp").mkdir(parents=True, exist_ok=True)
            loaded["work"] = Path(tempfile.mkdtemp(prefix="corpus.", dir=cache / "tmp"))
            loaded["ds"] = src.load(loaded["work"], progress)
        return loaded["ds"]

    lock = _file_lock(cache / "locks" / f"{src.key[:24]}.lock") if build else contextlib.nullcontext()
    try:
        with lock, _progress_bars(progress):
            tok_folder = _tokenizer_folder(cache, src, tokenizer, vocab_size, bpe_train_chars, build, progress,
                                           corpus)
            tok_hash = _read_meta(tok_folder)["tokenizer_hash"]
            key = _sha256(FORMAT_VERSION, src.key, tok_hash, val_fraction, seed)
            folder = cache / "tokens" / key[:24]
            if not _complete(folder):
                if not build:
                    raise FileNotFoundError(f"tokens of {src.description!r} are not cached in {str(folder)!r}; "
                                            f"call prepare_data(..., build=True) on one process first")
                _build_tokens(folder, corpus, src, tok_folder, val_fraction, seed, num_proc, progress)
    finally:
        loaded.pop("ds", None)
        if "work" in loaded:
            shutil.rmtree(loaded["work"], ignore_errors=True)
    return PreparedData.from_folder(folder, tok_folder)


# ------------------------------------------------------------------------------------------------- sampling

def _as_tokens(tokens, split: str) -> np.ndarray:
    if isinstance(tokens, PreparedData):
        return tokens.tokens(split)
    if isinstance(tokens, np.ndarray) and tokens.ndim == 1 and np.issubdtype(tokens.dtype, np.integer):
        return tokens
    raise ValueError(f"tokens must be a PreparedData or a 1-D integer numpy array, got "
                     f"{type(tokens).__name__}{getattr(tokens, 'shape', '')}")


def _windows(tokens: np.ndarray, starts: np.ndarray, length: int) -> torch.Tensor:
    out = np.empty((len(starts), length), dtype=np.int64)
    for row, s in enumerate(starts):
        out[row] = tokens[s:s + length]
    return torch.from_numpy(out)


class TokenSampler:
    """Deterministic, sharded, resumable sampling of training windows.

    The train tokens are cut into ``W = N // seq_len - 1`` non-overlapping windows of ``seq_len + 1`` tokens
    (inputs plus the next-token targets). Epoch ``e`` shifts all window starts by an offset in ``[0, seq_len)``
    and visits the windows in a random order, both drawn from ``numpy.random.default_rng([seed, e])``, so every
    window is seen once per epoch. Global sample ``s`` is window ``perm_e[s mod W]`` of epoch ``e = s // W``.

    All ranks walk one global stream: micro-batch ``k`` of rank ``r`` holds samples
    ``consumed + r·micro_batch + j`` (``j < micro_batch``), then ``consumed`` grows by ``micro_batch·world_size``.
    Ranks therefore get disjoint samples, and the samples of one optimizer step (a contiguous range of the stream)
    are the same for every world size and micro-batch with the same global batch. The position is one integer,
    ``consumed_samples``: :meth:`state_dict` / :meth:`load_state_dict` resume exactly, at any world size.

    Iterating yields ``torch.int64`` tensors of shape ``(micro_batch, seq_len + 1)``: ``x = w[:, :-1]``,
    ``y = w[:, 1:]``.

    Args:
        tokens: a :class:`PreparedData` (its train split) or a 1-D integer numpy array / memmap.
        seq_len: tokens per input sequence. micro_batch: sequences per rank per call.
        rank, world_size: this rank and the number of data-parallel ranks.
        seed: fixes the window order and offsets.
        consumed_samples: global start position (e.g. ``optimizer steps × global batch in sequences``).
    """

    def __init__(self, tokens, *, seq_len: int, micro_batch: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, consumed_samples: int = 0):
        self.tokens = _as_tokens(tokens, "train")
        self.seq_len = _check_int("seq_len", seq_len, 1)
        self.micro_batch = _check_int("micro_batch", micro_batch, 1)
        self.world_size = _check_int("world_size", world_size, 1)
        self.rank = _check_int("rank", rank, 0, world_size - 1)
        self.seed = _check_int("seed", seed, 0)
        self.consumed_samples = _check_int("consumed_samples", consumed_samples, 0)
        n = len(self.tokens)
        self.num_windows = n // seq_len - 1
        if self.num_windows < 1:
            raise ValueError(f"the train split has {n:,} tokens; seq_len={seq_len} needs at least "
                             f"{2 * seq_len:,} (2 x seq_len)")
        self._epoch_cache: tuple[int, int, np.ndarray] = (-1, 0, np.empty(0, dtype=np.int64))

    def _epoch(self, epoch: int) -> tuple[int, np.ndarray]:
        if self._epoch_cache[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            offset = int(rng.integers(self.seq_len))
            self._epoch_cache = (epoch, offset, rng.permutation(self.num_windows))
        return self._epoch_cache[1], self._epoch_cache[2]

    def window_starts(self, samples) -> np.ndarray:
        """Token offsets of the windows of global sample indices ``samples``."""
        samples = np.asarray(samples, dtype=np.int64)
        if samples.size and samples.min() < 0:
            raise ValueError("sample indices must be >= 0")
        out = np.empty(samples.shape, dtype=np.int64)
        for i, s in np.ndenumerate(samples):
            offset, perm = self._epoch(int(s) // self.num_windows)
            out[i] = offset + perm[int(s) % self.num_windows] * self.seq_len
        return out

    def next_samples(self) -> np.ndarray:
        """Global sample indices of this rank's next micro-batch (without advancing)."""
        first = self.consumed_samples + self.rank * self.micro_batch
        return np.arange(first, first + self.micro_batch, dtype=np.int64)

    def __iter__(self) -> "TokenSampler":
        return self

    def __next__(self) -> torch.Tensor:
        batch = _windows(self.tokens, self.window_starts(self.next_samples()), self.seq_len + 1)
        self.consumed_samples += self.micro_batch * self.world_size
        return batch

    def state_dict(self) -> dict:
        """``{"consumed_samples", "seed", "seq_len", "num_tokens"}``: the position plus what must not change."""
        return {"consumed_samples": self.consumed_samples, "seed": self.seed, "seq_len": self.seq_len,
                "num_tokens": int(len(self.tokens))}

    def load_state_dict(self, state: dict) -> None:
        """Continue at a saved position. ``seed``, ``seq_len`` and the token count must match (else a different
        stream would silently follow); world size and micro-batch may differ."""
        for key, mine in (("seed", self.seed), ("seq_len", self.seq_len), ("num_tokens", len(self.tokens))):
            if key not in state:
                raise ValueError(f"sampler state has no {key!r} (keys: {sorted(state)})")
            if state[key] != mine:
                raise ValueError(f"sampler state {key}={state[key]!r} does not match this sampler's {key}={mine!r}")
        self.consumed_samples = _check_int("consumed_samples", state.get("consumed_samples"), 0)


class ValBatches:
    """The validation split as a fixed sequence of batches, the same on every pass.

    Windows of ``seq_len + 1`` tokens start at multiples of ``seq_len`` from the first token. Batch ``b`` of rank
    ``r`` holds windows ``b·micro_batch·world_size + r·micro_batch + j``: ranks are disjoint and all ranks get
    ``len(self)`` batches (trailing windows that do not fill a batch on every rank are left out). ``max_batches``
    keeps the first batches only. ``tokens``: a :class:`PreparedData` (its validation split) or a 1-D integer array.
    """

    def __init__(self, tokens, *, seq_len: int, micro_batch: int, rank: int = 0, world_size: int = 1,
                 max_batches: Optional[int] = None):
        self.tokens = _as_tokens(tokens, "val")
        self.seq_len = _check_int("seq_len", seq_len, 1)
        self.micro_batch = _check_int("micro_batch", micro_batch, 1)
        self.world_size = _check_int("world_size", world_size, 1)
        self.rank = _check_int("rank", rank, 0, world_size - 1)
        if max_batches is not None:
            _check_int("max_batches", max_batches, 1)
        windows = (len(self.tokens) - 1) // seq_len
        per_batch = micro_batch * world_size
        self.num_batches = windows // per_batch
        if max_batches is not None:
            self.num_batches = min(self.num_batches, max_batches)
        if self.num_batches < 1:
            raise ValueError(f"the validation split has {len(self.tokens):,} tokens = {max(windows, 0)} window(s) of "
                             f"seq_len+1={seq_len + 1}; one batch needs micro_batch x world_size = {per_batch}")

    def __len__(self) -> int:
        return self.num_batches

    def window_starts(self, batch: int) -> np.ndarray:
        """Token offsets of this rank's windows in batch ``batch``."""
        first = batch * self.micro_batch * self.world_size + self.rank * self.micro_batch
        return np.arange(first, first + self.micro_batch, dtype=np.int64) * self.seq_len

    def __iter__(self) -> Iterator[torch.Tensor]:
        for b in range(self.num_batches):
            yield _windows(self.tokens, self.window_starts(b), self.seq_len + 1)
