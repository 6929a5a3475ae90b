"""Corpora, tokenizers and the token cache behind every run.

A corpus is a list of documents, each with a stable key (a relative path, a file block, a dataset
row). The key alone decides the split (a hash, so the split never moves when documents are added
or removed), and a fingerprint of keys and file stats names the token cache: the first run
tokenizes each split once into a memory-mapped ``.npy``; later runs map it, reading no more text
than the first block of each file in a folder (to tell text from binary).

Quality is measured in bits per byte: every token carries the number of raw bytes it stands for
(invalid UTF-8 included), so a byte-level run and a BPE run report comparable ``val/bpb``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sysconfig
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_only
from torch.utils.data import DataLoader, IterableDataset

from components.registry import require, spec_error

SPLITS = ("train", "val", "test")
BLOCK_BYTES = 4096  # files larger than this are cut into blocks of it, for the split
CACHE_FORMAT = 2  # 2: block keys by index, invalid UTF-8 as byte tokens


class DataError(ValueError):
    """A data problem the user must fix (bad path, empty corpus); one line, names the key."""


@dataclass(frozen=True)
class Document:
    key: str  # stable identity: decides the split
    read: Callable[[], bytes]
    stamp: str  # cheap change detector (size + mtime), part of the cache fingerprint


def _position(key: str) -> float:
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64  # in [0, 1)


def split_of(key: str, val_fraction: float, test_fraction: float) -> str:
    """'train', 'val' or 'test' from a hash of ``key`` alone, so a document never changes split."""
    u = _position(key)
    return "val" if u < val_fraction else "test" if u < val_fraction + test_fraction else "train"


# --- corpora ---------------------------------------------------------------------------------


def _file_document(path: Path, key: str) -> Document:
    st = path.stat()
    return Document(key, path.read_bytes, f"{st.st_size}:{st.st_mtime_ns}")


def stdlib_documents() -> list[Document]:
    """The Python standard library's own ``.py`` sources: real text on every machine."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for folder, subdirs, files in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if d not in ("site-packages", "__pycache__"))
        for name in sorted(files):
            if name.endswith(".py"):
                path = Path(folder) / name
                docs.append(_file_document(path, path.relative_to(root).as_posix()))
    return docs


def _blocks(path: Path, key: str, block_bytes: int) -> list[Document]:
    """A file as one document, or, when larger than a block, as blocks keyed ``KEY#i`` by their
    index: a few large files still split, and a renamed single file keeps its val set."""
    st = path.stat()
    stamp = f"{st.st_size}:{st.st_mtime_ns}"
    if st.st_size <= block_bytes:
        return [Document(key, path.read_bytes, stamp)]

    def block(i: int) -> Callable[[], bytes]:
        def read() -> bytes:
            with open(path, "rb") as f:
                f.seek(i * block_bytes)
                return f.read(block_bytes)

        return read

    return [Document(f"{key}#{i}", block(i), stamp) for i in range(math.ceil(st.st_size / block_bytes))]


def _is_text(path: Path, block_bytes: int) -> bool:
    """No NUL byte in the first block: what git and grep call text."""
    with open(path, "rb") as f:
        return b"\0" not in f.read(block_bytes)


def text_documents(
    path: str, block_bytes: int = BLOCK_BYTES, log: Callable[[str], None] = print
) -> list[Document]:
    """A folder of text files or one file, each file cut into blocks of ``block_bytes`` when larger
    (so the split draws from every part of the corpus). In a folder, hidden paths (``.git/``) and
    files that are not text are skipped, and counted."""
    if not path:
        raise DataError("data.path is empty; set data.path=FILE_OR_FOLDER")
    root = Path(path).expanduser()
    if not root.exists():
        raise DataError(f"data.path='{path}' does not exist")
    if root.is_dir():
        found = sorted(p for p in root.rglob("*") if p.is_file() and p.stat().st_size > 0)
        visible = [p for p in found if not any(part.startswith(".") for part in p.relative_to(root).parts)]
        text = [p for p in visible if _is_text(p, block_bytes)]
        if len(text) < len(found):
            log(f"data.path='{path}': skipped {len(found) - len(visible)} hidden and "
                f"{len(visible) - len(text)} binary file(s) of {len(found)}")  # fmt: skip
        docs = [d for p in text for d in _blocks(p, p.relative_to(root).as_posix(), block_bytes)]
    else:
        docs = _blocks(root, "", block_bytes) if root.stat().st_size else []
    if not docs:
        raise DataError(f"data.path='{path}' holds no text (no non-empty text files)")
    return docs


def hf_documents(name: str, config: str | None, split: str, text_column: str) -> list[Document]:
    """Rows of a Hugging Face dataset (hub name or local directory) loaded with ``datasets``."""
    import datasets

    if not name:
        raise DataError("data.name is empty; set data.name=DATASET_OR_LOCAL_DIR")
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # the library raises many types; the user needs the one line
        raise DataError(f"data.name='{name}' could not be loaded: {' '.join(str(e).split())}") from e
    if text_column not in ds.column_names:
        raise spec_error("data.text_column", text_column, ds.column_names)
    # Rows are read lazily: a cached corpus never touches the text again.
    return [
        Document(f"row{i}", lambda i=i: (ds[i][text_column] or "").encode(), f"{ds._fingerprint}:{i}")
        for i in range(len(ds))
    ]


# --- tokenizers ------------------------------------------------------------------------------


class ByteTokenizer:
    """Bytes are tokens: 256 ids, each worth exactly one byte of text. Needs no training."""

    name = "byte"
    vocab_size = 256

    def encode(self, data: bytes) -> np.ndarray:
        return np.frombuffer(data, dtype=np.uint8)

    def token_bytes(self) -> np.ndarray:
        return np.ones(self.vocab_size, dtype=np.int64)

    def decode(self, ids: list[int]) -> bytes:
        return bytes(ids)


def _byte_chars() -> list[str]:
    """Byte-level BPE's alphabet (GPT-2's, which ``tokenizers``' ByteLevel uses): byte b -> one
    printable character, so a token of the vocabulary stands for as many bytes as it has characters."""
    # tokenizers exposes the alphabet as a set, not the mapping; the tests hold this against it.
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)}
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b], extra = chr(256 + extra), extra + 1
    return [chars[b] for b in range(256)]


def utf8_runs(data: bytes) -> Iterator[tuple[bool, bytes]]:
    """``data`` as alternating runs: (True, valid UTF-8) and (False, bytes that are not)."""
    pos = 0
    while pos < len(data):
        try:
            data[pos:].decode("utf-8")
        except UnicodeDecodeError as e:
            if e.start:
                yield True, data[pos : pos + e.start]
            yield False, data[pos + e.start : pos + e.end]
            pos += e.end
        else:
            yield True, data[pos:]
            return


class BPETokenizer:
    """Byte-level BPE trained with the ``tokenizers`` library on the training split.

    The library takes text, so bytes that are not valid UTF-8 never reach it: each becomes the
    alphabet's token for that byte. Decoded with replacement instead, an invalid byte would be a
    3-byte U+FFFD, and bits per byte would count bytes the text does not have."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.vocab_size = tokenizer.get_vocab_size()
        self.name = f"bpe{self.vocab_size}"
        vocab = tokenizer.get_vocab()
        self._byte_ids = np.array([vocab[c] for c in _byte_chars()], dtype=np.uint32)

    @classmethod
    def train(cls, texts: Iterator[bytes], vocab_size: int, path: Path) -> BPETokenizer:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
        )
        valid = (run.decode() for t in texts for ok, run in utf8_runs(t) if ok)
        tok.train_from_iterator(valid, trainer)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tok.save(str(tmp))
        tmp.replace(path)
        return cls(tok)

    @classmethod
    def load(cls, path: Path) -> BPETokenizer:
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_file(str(path)))

    def encode(self, data: bytes) -> np.ndarray:
        parts = [np.asarray(self.tokenizer.encode(run.decode()).ids, dtype=np.uint32) if ok
                 else self._byte_ids[np.frombuffer(run, dtype=np.uint8)]
                 for ok, run in utf8_runs(data)]  # fmt: skip
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint32)

    def decode(self, ids: list[int]) -> bytes:
        """The bytes ``ids`` stand for, each token's characters mapped back through the alphabet."""
        byte_of = {c: b for b, c in enumerate(_byte_chars())}
        return bytes(byte_of[c] for i in ids for c in self.tokenizer.id_to_token(i))

    def token_bytes(self) -> np.ndarray:
        # Each character of a token stands for one byte (``_byte_chars``).
        vocab = self.tokenizer.get_vocab()
        out = np.ones(self.vocab_size, dtype=np.int64)
        for token, i in vocab.items():
            out[i] = len(token)
        return out


# --- the token cache -------------------------------------------------------------------------


def _fingerprint(docs: list[Document], extra: dict[str, Any]) -> str:
    h = hashlib.sha256(json.dumps(extra, sort_keys=True).encode())
    for d in docs:
        h.update(f"{d.key}\0{d.stamp}\n".encode())
    return h.hexdigest()[:16]


def _write_tokens(path: Path, chunks: list[np.ndarray], dtype: np.dtype) -> None:
    total = sum(len(c) for c in chunks)
    tmp = path.with_suffix(f".{os.getpid()}.tmp.npy")  # parallel runs may build the same cache: each its own
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=(total,))
    pos = 0
    for c in chunks:
        out[pos : pos + len(c)] = c
        pos += len(c)
    out.flush()
    del out
    tmp.replace(path)


@dataclass
class TokenizedCorpus:
    tokens: dict[str, np.ndarray]  # split -> memory-mapped token ids
    token_bytes: np.ndarray  # id -> bytes of text it stands for
    vocab_size: int
    cache_dir: Path
    tokenizer: ByteTokenizer | BPETokenizer


def tokenize_corpus(data_cfg: Any, log: Callable[[str], None] = print) -> TokenizedCorpus:
    """Load (or build once) the token arrays for ``data_cfg``; see ``conf/data/*.yaml``."""
    source = data_cfg.source
    if source == "stdlib":
        docs = stdlib_documents()
    elif source == "text":
        docs = text_documents(data_cfg.path, log=log)
    elif source == "hf":
        docs = hf_documents(data_cfg.name, data_cfg.get("config"), data_cfg.split, data_cfg.text_column)
    else:
        raise spec_error("data.source", source, ["stdlib", "text", "hf"])
    require(data_cfg.tokenizer in ("byte", "bpe"), "data.tokenizer", data_cfg.tokenizer, "byte, bpe")
    val_f, test_f = float(data_cfg.val_fraction), float(data_cfg.test_fraction)
    require(
        val_f > 0 and test_f >= 0 and val_f + test_f < 1,
        "data.val_fraction",
        val_f,
        "0 < val, val + test < 1",
    )

    by_split: dict[str, list[Document]] = {s: [] for s in SPLITS}
    for d in docs:
        by_split[split_of(d.key, val_f, test_f)].append(d)
    where = data_cfg.get("path") or data_cfg.get("name") or source
    if len(docs) < 2:
        raise DataError(f"data: the corpus at '{where}' is one document; a val split needs two: give it "
                        f"more text (a file is cut into blocks of {BLOCK_BYTES} bytes)")  # fmt: skip
    if not by_split["val"] and len(by_split["train"]) > 1:
        # A small corpus the hash left without val (a 40-block book at val_fraction 0.02 is, one
        # time in three): its train document nearest the val range goes there. Still decided by the
        # keys alone; it returns to train once others fall in val.
        first = min(by_split["train"], key=lambda d: _position(d.key))
        by_split["train"].remove(first)
        by_split["val"].append(first)
    if not by_split["train"]:
        raise DataError(f"data: none of the {len(docs)} documents of '{where}' fell in the train split; "
                        f"lower data.val_fraction={val_f} and data.test_fraction={test_f}")  # fmt: skip

    corpus_id = _fingerprint(docs, {"source": source, "val": val_f, "test": test_f, "format": CACHE_FORMAT})
    cache = Path(os.path.expanduser(data_cfg.cache_dir)) / corpus_id
    if data_cfg.tokenizer == "byte":
        tokenizer: ByteTokenizer | BPETokenizer = ByteTokenizer()
    else:
        tok_path = cache / f"bpe{data_cfg.bpe_vocab_size}.json"
        if tok_path.exists():
            tokenizer = BPETokenizer.load(tok_path)
        else:
            log(f"training a {data_cfg.bpe_vocab_size}-token BPE on the training split -> {tok_path}")
            tokenizer = BPETokenizer.train(
                (d.read() for d in by_split["train"]), data_cfg.bpe_vocab_size, tok_path
            )
    dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32)

    tokens = {}
    for split, split_docs in by_split.items():
        path = cache / f"{tokenizer.name}-{split}.npy"
        if not path.exists():
            log(f"tokenizing the {split} split ({len(split_docs)} documents) -> {path}")
            cache.mkdir(parents=True, exist_ok=True)
            _write_tokens(path, [tokenizer.encode(d.read()) for d in split_docs], dtype)
        tokens[split] = np.load(path, mmap_mode="r")
    return TokenizedCorpus(tokens, tokenizer.token_bytes(), tokenizer.vocab_size, cache, tokenizer)


# --- batches ---------------------------------------------------------------------------------


class RandomWindows(IterableDataset):
    """Endless training batches [B, T+1]; batch ``s`` depends only on (seed, s), so a run resumed
    at step k sees exactly the batches k, k+1, ... that an uninterrupted run would. ``batch_size``
    is the global batch: rank r of ``world`` takes rows [r*B/world, (r+1)*B/world), so the ranks
    together see what one process would, whatever the number of GPUs."""

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int, start_step: int = 0,
                 rank: int = 0, world: int = 1):  # fmt: skip
        require(
            len(tokens) > seq_len + 1, "data.seq_len", seq_len, f"less than the {len(tokens)} training tokens"
        )
        require(batch_size % world == 0, "data.batch_size", batch_size,
                f"a multiple of the {world} processes (it is the global batch)")  # fmt: skip
        self.tokens, self.seq_len, self.batch_size = tokens, seq_len, batch_size
        self.seed, self.start_step = seed, start_step
        self.rows = slice(rank * batch_size // world, (rank + 1) * batch_size // world)

    def __iter__(self) -> Iterator[torch.Tensor]:
        step = self.start_step
        while True:
            rng = np.random.default_rng((self.seed, step))
            starts = rng.integers(0, len(self.tokens) - self.seq_len - 1, size=self.batch_size)[self.rows]
            yield torch.from_numpy(
                np.stack([self.tokens[s : s + self.seq_len + 1] for s in starts]).astype(np.int64)
            )
            step += 1


def eval_windows(tokens: np.ndarray, seq_len: int, batch_size: int, max_tokens: int) -> list[torch.Tensor]:
    """Consecutive windows from the start of a split (the same ones every evaluation)."""
    n = min(max(1, max_tokens // seq_len), (len(tokens) - 1) // seq_len)
    require(n >= 1, "data.seq_len", seq_len, f"at most {len(tokens) - 1} (the validation split's size)")
    windows = np.stack([tokens[i * seq_len : i * seq_len + seq_len + 1] for i in range(n)]).astype(np.int64)
    return list(torch.from_numpy(windows).split(batch_size))


class LMDataModule(L.LightningDataModule):
    def __init__(self, data_cfg: Any, seed: int):
        super().__init__()
        self.cfg, self.seed = data_cfg, seed
        self.corpus: TokenizedCorpus | None = None

    def prepare(self) -> TokenizedCorpus:
        if self.corpus is None:
            corpus = tokenize_corpus(self.cfg)
            # Checked here, before a run is recorded, rather than when fit builds the loaders.
            shortest = min(len(corpus.tokens["train"]) - 2, len(corpus.tokens["val"]) - 1)
            require(self.cfg.seq_len <= shortest, "data.seq_len", self.cfg.seq_len,
                    f"at most {shortest} (the train and validation splits' tokens)")  # fmt: skip
            held = (len(corpus.tokens["val"]) - 1) // self.cfg.seq_len * self.cfg.seq_len
            if self.cfg.val_tokens > held and rank_zero_only.rank == 0:
                print(f"data.val_tokens={self.cfg.val_tokens} is more than the val split holds: "
                      f"evaluating on all of it, {held} tokens")  # fmt: skip
            self.corpus = corpus
        return self.corpus

    def prepare_data(self) -> None:
        self.prepare()

    def train_dataloader(self) -> DataLoader:
        # Read the restored step here: Lightning builds the loaders after loading a checkpoint.
        t = self.trainer
        start = t.global_step * t.accumulate_grad_batches if t else 0
        rank, world = (t.global_rank, t.world_size) if t else (0, 1)
        c = self.prepare()
        windows = RandomWindows(c.tokens["train"], self.cfg.seq_len, self.cfg.batch_size, self.seed, start,
                                rank, world)  # fmt: skip
        return DataLoader(windows, batch_size=None)

    def val_dataloader(self) -> DataLoader:
        c = self.prepare()
        batches = eval_windows(c.tokens["val"], self.cfg.seq_len, self.cfg.batch_size, self.cfg.val_tokens)
        t = self.trainer
        if t and t.world_size > 1:  # each rank its share; the sums are all-reduced (LitLM)
            require(len(batches) >= t.world_size, "data.val_tokens", self.cfg.val_tokens,
                    f"enough for one batch on each of the {t.world_size} processes")  # fmt: skip
            batches = batches[t.global_rank :: t.world_size]
        return DataLoader(batches, batch_size=None)
