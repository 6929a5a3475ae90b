"""Corpora, tokenizers and the token cache behind every run.

A corpus is a list of documents, each with a stable key (a relative path, a file block, a dataset
row). The key alone decides the split (a hash, so the split never moves when documents are added
or removed), and a fingerprint of keys and file stats (read without opening any text) names the
token cache: the first run tokenizes each split once into a memory-mapped ``.npy``; later runs map
it and read no text at all.

Quality is measured in bits per byte: every token carries the number of text bytes it stands for,
so a byte-level run and a BPE run report comparable ``val/bpb``.
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
from torch.utils.data import DataLoader, IterableDataset

from components.registry import require, spec_error

SPLITS = ("train", "val", "test")
CACHE_FORMAT = 1


class DataError(ValueError):
    """A data problem the user must fix (bad path, empty corpus); one line, names the key."""


@dataclass(frozen=True)
class Document:
    key: str  # stable identity: decides the split
    read: Callable[[], bytes]
    stamp: str  # cheap change detector (size + mtime), part of the cache fingerprint


def split_of(key: str, val_fraction: float, test_fraction: float) -> str:
    """'train', 'val' or 'test' from a hash of ``key`` alone, so a document never changes split."""
    u = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64
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


def text_documents(path: str, block_bytes: int = 4096) -> list[Document]:
    """A folder of text files (one document each) or one file (cut into blocks so it can split)."""
    if not path:
        raise DataError("data.path is empty; set data.path=FILE_OR_FOLDER")
    root = Path(path).expanduser()
    if not root.exists():
        raise DataError(f"data.path='{path}' does not exist")
    if root.is_dir():
        files = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
        docs = [_file_document(p, p.relative_to(root).as_posix()) for p in files if p.stat().st_size > 0]
    else:
        st = root.stat()
        n_blocks = math.ceil(st.st_size / block_bytes)

        def block(i: int) -> Callable[[], bytes]:
            def read() -> bytes:
                with open(root, "rb") as f:
                    f.seek(i * block_bytes)
                    return f.read(block_bytes)

            return read

        stamp = f"{st.st_size}:{st.st_mtime_ns}"
        docs = [Document(f"{root.name}#{i}", block(i), stamp) for i in range(n_blocks)]
    if not docs:
        raise DataError(f"data.path='{path}' holds no text (no non-empty files)")
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


class BPETokenizer:
    """Byte-level BPE trained with the ``tokenizers`` library on the training split."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.vocab_size = tokenizer.get_vocab_size()
        self.name = f"bpe{self.vocab_size}"

    @classmethod
    def train(cls, texts: Iterator[bytes], vocab_size: int, path: Path) -> BPETokenizer:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
        )
        tok.train_from_iterator((t.decode("utf-8", errors="replace") for t in texts), trainer)
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
        return np.asarray(self.tokenizer.encode(data.decode("utf-8", errors="replace")).ids, dtype=np.uint32)

    def token_bytes(self) -> np.ndarray:
        # ByteLevel maps each byte to one printable character, so a token's length is its byte count.
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


def tokenize_corpus(data_cfg: Any, log: Callable[[str], None] = print) -> TokenizedCorpus:
    """Load (or build once) the token arrays for ``data_cfg``; see ``conf/data/*.yaml``."""
    source = data_cfg.source
    if source == "stdlib":
        docs = stdlib_documents()
    elif source == "text":
        docs = text_documents(data_cfg.path)
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
    for split in ("train", "val"):
        if not by_split[split]:
            where = data_cfg.get("path") or data_cfg.get("name") or source
            raise DataError(
                f"data: the corpus at '{where}' has {len(docs)} documents and none fell in the {split} "
                f"split; give it more text or raise data.val_fraction"
            )

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
    return TokenizedCorpus(tokens, tokenizer.token_bytes(), tokenizer.vocab_size, cache)


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
