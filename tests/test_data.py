import itertools
import json

import numpy as np
import pytest
from omegaconf import OmegaConf

from research.training import data as D
from research.training.data import DataError, RandomWindows, eval_windows, split_of, tokenize_corpus


def data_cfg(tmp_path, **kw):
    base = OmegaConf.load("research/conf/data/stdlib.yaml")
    base.cache_dir = str(tmp_path / "cache")
    return OmegaConf.merge(base, kw)


@pytest.fixture
def text_folder(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    for i in range(60):
        (folder / f"doc{i:02d}.txt").write_text(
            f"Document {i}. " + "Plain ASCII prose, repeated. " * (10 + i)
        )
    return folder


def test_split_depends_on_the_key_alone():
    keys = [f"pkg/module_{i}.py" for i in range(4000)]
    splits = [split_of(k, 0.05, 0.05) for k in keys]
    assert splits == [split_of(k, 0.05, 0.05) for k in reversed(keys)][::-1]  # order-free
    counts = {s: splits.count(s) for s in D.SPLITS}
    assert 100 < counts["val"] < 300 and 100 < counts["test"] < 300
    # adding documents never moves the existing ones
    more = keys + [f"new_{i}.py" for i in range(1000)]
    assert [split_of(k, 0.05, 0.05) for k in more][:4000] == splits


def test_stdlib_corpus_is_found_and_splits():
    docs = D.stdlib_documents()
    assert len(docs) > 200 and all(d.key.endswith(".py") for d in docs)
    assert {split_of(d.key, 0.02, 0.02) for d in docs} == set(D.SPLITS)


def test_token_cache_is_built_once_and_reused(tmp_path, text_folder, monkeypatch):
    cfg = data_cfg(tmp_path, source="text", path=str(text_folder), val_fraction=0.2, test_fraction=0.1)
    first = tokenize_corpus(cfg, log=lambda _: None)
    n_bytes = sum(p.stat().st_size for p in text_folder.iterdir())
    assert sum(len(t) for t in first.tokens.values()) == n_bytes  # byte-level: one token per byte

    def no_reading(self):
        raise AssertionError(f"the second load read {self}")

    monkeypatch.setattr(D.Path, "read_bytes", no_reading)
    second = tokenize_corpus(cfg, log=lambda _: None)
    for split in D.SPLITS:
        assert isinstance(second.tokens[split], np.memmap)
        np.testing.assert_array_equal(second.tokens[split], first.tokens[split])


def test_changed_text_gets_a_new_cache(tmp_path, text_folder):
    cfg = data_cfg(tmp_path, source="text", path=str(text_folder), val_fraction=0.2)
    first = tokenize_corpus(cfg, log=lambda _: None)
    (text_folder / "doc99.txt").write_text("a brand new document " * 50)
    assert tokenize_corpus(cfg, log=lambda _: None).cache_dir != first.cache_dir


def test_bpe_is_trained_once_and_counts_bytes_exactly(tmp_path, text_folder):
    cfg = data_cfg(tmp_path, source="text", path=str(text_folder), tokenizer="bpe", bpe_vocab_size=300,
                   val_fraction=0.2)  # fmt: skip
    corpus = tokenize_corpus(cfg, log=lambda _: None)
    assert corpus.vocab_size == 300 and (corpus.cache_dir / "bpe300.json").exists()
    val_bytes = sum(
        p.stat().st_size for p in text_folder.iterdir() if split_of(p.name, 0.2, cfg.test_fraction) == "val"
    )
    # bits per byte needs every token's byte count: they add up to the text's size
    assert corpus.token_bytes[corpus.tokens["val"]].sum() == val_bytes
    assert len(corpus.tokens["val"]) < val_bytes / 2  # and BPE really compresses


def test_single_file_is_cut_into_blocks(tmp_path):
    book = tmp_path / "book.txt"
    book.write_text("one long text. " * 20_000)
    corpus = tokenize_corpus(data_cfg(tmp_path, source="text", path=str(book)), log=lambda _: None)
    assert sum(len(t) for t in corpus.tokens.values()) == book.stat().st_size
    assert len(corpus.tokens["val"]) > 0


def test_large_files_of_a_folder_split_by_block_and_a_renamed_file_keeps_its_val_set(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "five"
    folder.mkdir()
    for i in range(5):  # a few large files: as whole documents, none would fall in val
        words = rng.choice(["tide", "flat", "heron", "mud", "salt", "reed"], size=40_000)
        (folder / f"part{i}.txt").write_text(" ".join(words))
    cfg = data_cfg(tmp_path, source="text", path=str(folder))
    corpus = tokenize_corpus(cfg, log=lambda _: None)
    assert len(corpus.tokens["val"]) > 0
    assert sum(len(t) for t in corpus.tokens.values()) == sum(p.stat().st_size for p in folder.iterdir())

    one, renamed = tmp_path / "book.txt", tmp_path / "copy of book.txt"
    one.write_text((folder / "part0.txt").read_text())
    renamed.write_text(one.read_text())
    val = [tokenize_corpus(data_cfg(tmp_path, source="text", path=str(p)), log=lambda _: None).tokens["val"]
           for p in (one, renamed)]  # fmt: skip
    np.testing.assert_array_equal(val[0], val[1])


def test_a_folder_skips_hidden_paths_and_binary_files_and_says_so(tmp_path, text_folder):
    (text_folder / ".git" / "objects").mkdir(parents=True)
    (text_folder / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (text_folder / ".git" / "objects" / "ab12").write_bytes(b"x\x01blob")
    (text_folder / "figure.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" * 10)
    said = []
    corpus = tokenize_corpus(
        data_cfg(tmp_path, source="text", path=str(text_folder), val_fraction=0.2), said.append
    )
    text_bytes = sum(p.stat().st_size for p in text_folder.glob("doc*.txt"))
    assert sum(len(t) for t in corpus.tokens.values()) == text_bytes
    assert f"data.path='{text_folder}': skipped 2 hidden and 1 binary file(s) of 63" in said


def test_bits_per_byte_count_the_raw_bytes_of_invalid_utf8_under_bpe(tmp_path, text_folder):
    cfg = data_cfg(tmp_path, source="text", path=str(text_folder), tokenizer="bpe", bpe_vocab_size=300,
                   val_fraction=0.2)  # fmt: skip
    tokenize_corpus(cfg, log=lambda _: None)
    tok = D.BPETokenizer.load(next((tmp_path / "cache").glob("*/bpe300.json")))
    raw = "Plain prose, é and ü. ".encode() + b"\xff\xfe\xc3(\x80abc\xe2\x82" + b" more prose."
    ids = tok.encode(raw)
    assert tok.token_bytes()[ids].sum() == len(raw)  # replaced by U+FFFD, 7 raw bytes would count 11
    chars = D._byte_chars()
    back = {c: b for b, c in enumerate(chars)}
    assert bytes(back[c] for i in ids for c in tok.tokenizer.id_to_token(int(i))) == raw  # lossless
    # The alphabet is the library's, byte for byte.
    from tokenizers import pre_tokenizers

    assert set(chars) == set(pre_tokenizers.ByteLevel.alphabet())
    text = "Plain prose, é and ü."
    assert "".join(tok.tokenizer.encode(text).tokens) == "".join(chars[b] for b in text.encode())


def test_hf_dataset_from_a_local_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    folder = tmp_path / "ds"
    folder.mkdir()
    rows = [{"body": f"row {i}: " + "some words here. " * 30} for i in range(100)]
    (folder / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    cfg = data_cfg(tmp_path, source="hf", name=str(folder), config=None, split="train", text_column="body")
    corpus = tokenize_corpus(cfg, log=lambda _: None)
    assert sum(len(t) for t in corpus.tokens.values()) == sum(len(r["body"]) for r in rows)
    with pytest.raises(ValueError, match=r"^data\.text_column='text'"):
        tokenize_corpus(OmegaConf.merge(cfg, {"text_column": "text"}), log=lambda _: None)


def test_bad_paths_and_empty_corpora_fail_in_one_line(tmp_path):
    cases = {
        "missing": (data_cfg(tmp_path, source="text", path=str(tmp_path / "nope")), "does not exist"),
        "empty": (data_cfg(tmp_path, source="text", path=str(tmp_path / "empty")), "holds no text"),
        "tiny": (
            data_cfg(tmp_path, source="text", path=str(tmp_path / "one")),
            "is one document; a val split",
        ),
        "source": (data_cfg(tmp_path, source="web"), "data.source='web'"),
    }
    (tmp_path / "empty").mkdir()
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "a.txt").write_text("hello")
    for name, (cfg, message) in cases.items():
        with pytest.raises(ValueError) as err:
            tokenize_corpus(cfg, log=lambda _: None)
        assert message in str(err.value) and "\n" not in str(err.value), name
    with pytest.raises(DataError, match=r"data\.path="):
        tokenize_corpus(cases["missing"][0], log=lambda _: None)


def test_training_batches_depend_only_on_seed_and_step():
    tokens = np.arange(10_000, dtype=np.uint16)
    from_start = list(itertools.islice(RandomWindows(tokens, 16, 4, seed=3), 6))
    resumed = list(itertools.islice(RandomWindows(tokens, 16, 4, seed=3, start_step=4), 2))
    for a, b in zip(from_start[4:], resumed, strict=True):
        assert (a == b).all()
    assert from_start[0].shape == (4, 17)
    assert (from_start[0][:, 1:] == from_start[0][:, :-1] + 1).all()  # windows are contiguous text
    other_seed = next(iter(RandomWindows(tokens, 16, 4, seed=4)))
    assert not (other_seed == from_start[0]).all()


def test_eval_windows_are_fixed_and_cover_the_split_start():
    tokens = np.arange(1000, dtype=np.uint16)
    batches = eval_windows(tokens, seq_len=10, batch_size=4, max_tokens=100)
    windows = np.concatenate([b.numpy() for b in batches])
    assert windows.shape == (10, 11) and windows[0, 0] == 0 and windows[1, 0] == 10


def test_val_tokens_beyond_the_val_split_are_capped_and_said_once(tmp_path, text_folder, capsys):
    cfg = data_cfg(tmp_path, source="text", path=str(text_folder), val_fraction=0.2, seq_len=32,
                   val_tokens=10**9)  # fmt: skip
    module = D.LMDataModule(cfg, seed=0)
    module.prepare()
    module.prepare()
    held = (len(module.corpus.tokens["val"]) - 1) // 32 * 32
    said = [line for line in capsys.readouterr().out.splitlines() if line.startswith("data.val_tokens")]
    assert said == [f"data.val_tokens=1000000000 is more than the val split holds: evaluating on all of it, "
                    f"{held} tokens"]  # fmt: skip
    assert sum(b.shape[0] for b in eval_windows(module.corpus.tokens["val"], 32, 2, 10**9)) * 32 == held
