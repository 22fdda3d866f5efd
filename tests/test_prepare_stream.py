"""The streaming preparer: folders and globs, tiny tiktoken encodings (no network), the
by-document split, uint32 token files, chunked == one-shot, and the data module reading it all."""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import tiktoken

from ml_playground.configuration.loading import packaged_defaults
from ml_playground.data import GPTDataModule, require_artifacts
from ml_playground.errors import ConfigError, DataError
from ml_playground.prepare import (
    ArtifactWriter,
    PrepareConfig,
    TiktokenTokenizer,
    dataset_meta,
    iter_documents,
    load_tokens,
    prepare_corpus,
    read_meta,
    resolve_source,
    run_prepare,
    write_bin_and_meta,
)
from ml_playground.prepare import tokenizers as tokenizers_module
from ml_playground.prepare.stream import cut_pieces

EOT = "<|endoftext|>"


def data_module(folder: Path, batch_size: int, block_size: int) -> GPTDataModule:
    """The data module over `folder`, one validation batch, loading in-process."""
    settings = {"val_batches": 1, "num_workers": 0, "pin_memory": False}
    return GPTDataModule(
        dataset_dir=folder, batch_size=batch_size, block_size=block_size, seed=0, **settings
    )


def settings(source: Path | str, **changes: object) -> PrepareConfig:
    """The packaged [prepare] defaults for ``source``, no checksum, with ``changes``."""
    values = {**packaged_defaults()["prepare"], "source": str(source), "source_sha256": ""}
    return PrepareConfig(**{**values, **changes})


def tiny_encoding(eot_id: int = 265) -> tiktoken.Encoding:
    """A byte-level BPE with GPT-2's pre-tokenizer and a few merges; built here, no network."""
    ranks = {bytes([i]): i for i in range(256)}
    for merge in (b"th", b"he", b"the", b" t", b" the", b"in", b"ng", b"ing", b"\n\n"):
        ranks[merge] = len(ranks)
    return tiktoken.Encoding(
        name=f"tiny_bpe_{eot_id}",
        pat_str=r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""",
        mergeable_ranks=ranks,
        special_tokens={EOT: eot_id},
    )


def documents(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    words = ["the", "king", "thing", "sing", "ringing", "of", "war", "42", "don't", "héllo", "—"]
    docs = []
    for i in range(n):
        lines = [
            " ".join(rng.choice(words, size=int(rng.integers(3, 9)))) + rng.choice([".", "!", ""])
            for _ in range(int(rng.integers(2, 7)))
        ]
        docs.append(f"Doc {i}\n" + "\n".join(lines) + "\n" + "\n" * int(rng.integers(0, 3)))
    return docs


def write_folder(folder: Path, docs: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, doc in enumerate(docs):
        sub = folder / ("b" if i % 2 else "a")
        sub.mkdir(exist_ok=True)
        (sub / f"doc{i:03d}.txt").write_text(doc, encoding="utf-8")
    (folder / "ignored.md").write_text("not a .txt file", encoding="utf-8")
    return folder


def ids(folder: Path, split: str) -> list[int]:
    meta = read_meta(folder / "meta.pkl")
    return load_tokens(folder / f"{split}.bin", meta["dtype"]).tolist()


def artifacts(folder: Path) -> tuple[bytes, bytes, dict]:
    return (
        (folder / "train.bin").read_bytes(),
        (folder / "val.bin").read_bytes(),
        read_meta(folder / "meta.pkl"),
    )


# --- sources ------------------------------------------------------------------------------


def test_resolve_source_file_folder_glob(tmp_path: Path) -> None:
    folder = write_folder(tmp_path / "corpus", documents(4))
    files = resolve_source(folder, None)
    assert [p.name for p in files] == ["doc000.txt", "doc002.txt", "doc001.txt", "doc003.txt"]
    assert files == sorted(files)
    assert resolve_source(str(folder / "a" / "*.txt"), None) == files[:2]
    assert resolve_source(str(folder / "**" / "doc00[13].txt"), None) == files[2:]
    assert resolve_source(files[0], None) == [files[0]]
    with pytest.raises(DataError, match="no file matches"):
        resolve_source(str(folder / "*.csv"), None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(
        DataError, match=r"holds no \*\.txt, \*\.jsonl, \*\.jsonl\.gz or \*\.parquet files"
    ):
        resolve_source(tmp_path / "empty", None)
    with pytest.raises(ConfigError, match="single file"):
        resolve_source(folder, "0" * 64)
    with pytest.raises(DataError, match="does not exist"):
        resolve_source(tmp_path / "missing.txt", None)


def test_iter_documents_separator_across_chunks(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("one\n\n\ntwo two\n\n\n\n\n\nthree", encoding="utf-8")
    (tmp_path / "b.txt").write_text("four", encoding="utf-8")
    (tmp_path / "c.txt").write_text("", encoding="utf-8")
    files = [tmp_path / n for n in ("a.txt", "b.txt", "c.txt")]
    for chunk in (1, 2, 3, 5, 1000):
        docs: list[str] = []
        for new, text in iter_documents(files, "\n\n\n", chunk):
            if new:
                docs.append("")
            docs[-1] += text
        assert docs == ["one", "two two", "three", "four"], chunk
        whole = [t for _, t in iter_documents(files, "", chunk)]
        assert "".join(whole) == "one\n\n\ntwo two\n\n\n\n\n\nthreefour"


# --- tiny tiktoken encodings, folders, splits ----------------------------------------------


def test_prepare_folder_with_tiny_tiktoken_contiguous(tmp_path: Path) -> None:
    docs = documents(6)
    folder = write_folder(tmp_path / "corpus", docs)
    files = resolve_source(folder, None)
    enc = tiny_encoding()
    meta = prepare_corpus(files, TiktokenTokenizer(enc), tmp_path / "ds", settings(folder), seed=0)
    assert meta["vocab_size"] == 266 and meta["eot_token"] == 265 and meta["dtype"] == "uint16"
    assert meta["split"] == "contiguous" and meta["encoding"] == enc.name
    ordered = [Path(p).read_text(encoding="utf-8") for p in files]
    text = "".join(ordered)
    cut = int(len(text) * 0.9)
    # Documents are joined by <|endoftext|>; the split cuts the text where nanoGPT would.
    expected = enc.encode(EOT.join(ordered), allowed_special={EOT})
    got = ids(tmp_path / "ds", "train") + ids(tmp_path / "ds", "val")
    assert enc.decode(got) == EOT.join(ordered)
    assert got.count(265) == len(docs) - 1 == expected.count(265)
    pos = cut
    for doc in ordered:  # the cut lies inside the last document: train ends with its head
        if pos <= len(doc):
            head = doc[:pos]
            break
        pos -= len(doc)
    assert enc.decode(ids(tmp_path / "ds", "train")).endswith(head)
    assert EOT not in enc.decode(ids(tmp_path / "ds", "val"))


def test_by_document_split_is_reproducible_from_the_seed(tmp_path: Path) -> None:
    docs = documents(20, seed=3)
    folder = write_folder(tmp_path / "corpus", docs)
    files = resolve_source(folder, None)
    tok = TiktokenTokenizer(tiny_encoding())
    by_document = settings(folder, val_fraction=0.25, split="documents")

    def run(name: str, seed: int) -> tuple[bytes, bytes, dict]:
        prepare_corpus(files, tok, tmp_path / name, by_document, seed=seed)
        return artifacts(tmp_path / name)

    first, again, other = run("s1", 1), run("s1b", 1), run("s2", 2)
    assert first == again
    assert first[1] != other[1]
    meta = first[2]
    assert (meta["train_documents"], meta["val_documents"]) == (15, 5)
    assert meta["split"] == "documents" and meta["seed"] == 1
    ordered = [Path(p).read_text(encoding="utf-8") for p in files]
    val_docs = tok.decode(ids(tmp_path / "s1", "val")).split(EOT)
    train_docs = tok.decode(ids(tmp_path / "s1", "train")).split(EOT)
    assert len(val_docs) == 5 and sorted(val_docs + train_docs) == sorted(ordered)
    assert train_docs == [d for d in ordered if d not in val_docs]  # corpus order kept


def test_documents_split_needs_two_documents(tmp_path: Path) -> None:
    one = tmp_path / "one.txt"
    one.write_text("just one document\n" * 20, encoding="utf-8")
    with pytest.raises(DataError, match="document_separator"):
        run_prepare(settings(one, split="documents"), tmp_path / "ds", seed=0)
    lines = settings(one, val_fraction=0.5, split="documents", document_separator="\n")
    did, meta = run_prepare(lines, tmp_path / "ds", seed=0)
    assert did and meta["train_documents"] == meta["val_documents"] == 10
    with pytest.raises(DataError, match=r"split = 'documents'.*--force"):
        run_prepare(settings(one, val_fraction=0.5), tmp_path / "ds", seed=0)


@pytest.mark.parametrize("split", ["contiguous", "documents"])
@pytest.mark.parametrize("tokenizer", ["char", "bpe"])
def test_small_chunks_give_the_one_shot_artifacts(
    tmp_path: Path, split: str, tokenizer: str
) -> None:
    docs = documents(12, seed=5)
    folder = write_folder(tmp_path / "corpus", docs)
    files = resolve_source(folder, None)
    tok = "char" if tokenizer == "char" else TiktokenTokenizer(tiny_encoding())
    total = sum(p.size for p in files)
    results = []
    for chunk in (1 << 30, 64, 7):
        out = tmp_path / f"ds{chunk}"
        chunked = settings(folder, val_fraction=0.2, split=split, chunk_bytes=chunk, num_threads=2)
        prepare_corpus(files, tok, out, chunked, seed=9)
        results.append(artifacts(out))
    assert 7 < 64 < total < 1 << 30
    assert results[0] == results[1] == results[2]


class CountingTokenizer(TiktokenTokenizer):
    """A tiktoken tokenizer that records how many pieces each `encode_batch` call is given."""

    def __init__(self, encoding: tiktoken.Encoding) -> None:
        super().__init__(encoding)
        self.calls: list[int] = []

    def encode_batch(self, texts: Sequence[str], num_threads: int) -> list[np.ndarray]:
        self.calls.append(len(texts))
        return super().encode_batch(texts, num_threads)


def test_short_documents_share_a_batch_so_the_threads_share_the_work(tmp_path: Path) -> None:
    """Documents shorter than a chunk (most web pages) are encoded many to a call: one call per
    document gave every call a single piece, and a second thread nothing to do."""
    docs = documents(40, seed=7)
    folder = write_folder(tmp_path / "corpus", docs)
    files = resolve_source(folder, None)
    tok = CountingTokenizer(tiny_encoding())
    chunked = settings(folder, val_fraction=0.25, split="documents", chunk_bytes=2048)
    prepare_corpus(
        files, tok, tmp_path / "ds", chunked.model_copy(update={"num_threads": 2}), seed=0
    )
    assert sum(tok.calls) >= len(docs) and max(tok.calls) >= 8
    assert len(tok.calls) <= len(docs) // 4
    # The same tokens as one document per call (a chunk smaller than any document).
    prepare_corpus(
        files, tok, tmp_path / "one", chunked.model_copy(update={"chunk_bytes": 8}), seed=0
    )
    assert artifacts(tmp_path / "ds") == artifacts(tmp_path / "one")


def test_cut_pieces_only_cuts_where_tokens_do_not_change() -> None:
    enc = tiny_encoding()
    text = "".join(documents(8, seed=1)) + "wordwithoutspaces" * 20 + "  two  spaces \n\n x"
    for size in (1, 5, 40):
        pieces, rest = cut_pieces(text, size, final=True)
        assert "".join(pieces) == text and rest == ""
        joined = [i for p in pieces for i in enc.encode_ordinary(p)]
        assert joined == enc.encode_ordinary(text)


def test_char_tokenizer_folder_and_utf8_errors(tmp_path: Path) -> None:
    folder = write_folder(tmp_path / "corpus", ["héllo wörld\n" * 5, "naïve — text\n" * 5])
    did, meta = run_prepare(settings(folder, chunk_bytes=3), tmp_path / "ds", seed=0)
    text = "".join(Path(p).read_text(encoding="utf-8") for p in resolve_source(folder, None))
    assert did and meta["vocab_size"] == len(set(text))
    itos = meta["itos"]
    decoded = "".join(itos[i] for i in ids(tmp_path / "ds", "train") + ids(tmp_path / "ds", "val"))
    assert decoded == text
    (folder / "a" / "bad.txt").write_bytes(b"fine\n" * 10 + b"\xff\xfe")
    with pytest.raises(DataError, match=r"bad\.txt is not valid UTF-8 \(near byte 50"):
        run_prepare(settings(folder, chunk_bytes=4), tmp_path / "ds2", seed=0)
    assert not (tmp_path / "ds2").exists()  # found by the scan, before anything is written


def test_artifact_writer_leaves_nothing_behind_on_error(tmp_path: Path) -> None:
    write_bin_and_meta(tmp_path, np.arange(10), np.arange(5), {"vocab_size": 10})
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with (
        pytest.raises(DataError, match="outside the vocabulary"),
        ArtifactWriter(tmp_path, 10) as w,
    ):
        w.train.write(np.arange(5))
        w.val.write(np.array([3, 12]))
    # The failed write left the earlier artifacts exactly as they were, meta.pkl included.
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    with ArtifactWriter(tmp_path, 10) as w:
        w.train.write(np.arange(6))
        w.val.write([1, 2])
        meta = w.commit({"vocab_size": 10, "tokenizer": "char"})
    assert (meta["train_tokens"], meta["val_tokens"]) == (6, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["meta.pkl", "train.bin", "val.bin"]
    assert ids(tmp_path, "val") == [1, 2]


# --- uint32 ---------------------------------------------------------------------------------


def test_uint32_when_the_vocabulary_exceeds_uint16(tmp_path: Path) -> None:
    enc = tiny_encoding(eot_id=69_999)  # n_vocab 70,000: ids do not fit uint16
    folder = write_folder(tmp_path / "corpus", documents(6))
    files = resolve_source(folder, None)
    small = settings(folder, val_fraction=0.3, chunk_bytes=50)
    meta = prepare_corpus(files, TiktokenTokenizer(enc), tmp_path / "ds", small, seed=0)
    assert meta["vocab_size"] == 70_000 and meta["dtype"] == "uint32"
    train = ids(tmp_path / "ds", "train")
    assert 69_999 in train
    assert (tmp_path / "ds" / "train.bin").stat().st_size == 4 * len(train)
    dm = data_module(tmp_path / "ds", batch_size=64, block_size=8)
    assert dm.dtype == "uint32" and dm.vocab_size == 70_000
    x, y = next(iter(dm.train_dataloader()))
    assert int(torch_max(x, y)) == 69_999


def torch_max(*tensors: object) -> int:
    return max(int(t.max()) for t in tensors)  # type: ignore[attr-defined]


def test_data_module_reads_a_fake_uint32_vocabulary(tmp_path: Path) -> None:
    train = np.tile(np.array([69_999, 65_536, 1, 69_998]), 16)
    val = np.tile(np.array([69_997, 2]), 16)
    meta = write_bin_and_meta(tmp_path, train, val, {"vocab_size": 70_000})
    assert meta["dtype"] == "uint32"
    dm = data_module(tmp_path, batch_size=2, block_size=4)
    x, y, _ = next(iter(dm.val_dataloader()))
    assert set(x.flatten().tolist()) | set(y.flatten().tolist()) == {69_997, 2}
    x, _ = next(iter(dm.train_dataloader()))
    assert set(x.flatten().tolist()) <= {69_999, 65_536, 1, 69_998}


# --- nanoGPT folders --------------------------------------------------------------------------


def test_nanogpt_folder_without_meta_is_gpt2(tmp_path: Path) -> None:
    np.arange(100, dtype=np.uint16).tofile(tmp_path / "train.bin")
    np.arange(50, dtype=np.uint16).tofile(tmp_path / "val.bin")
    require_artifacts(tmp_path)
    meta = dataset_meta(tmp_path)
    assert (meta["vocab_size"], meta["encoding"], meta["dtype"]) == (50257, "gpt2", "uint16")
    dm = data_module(tmp_path, batch_size=2, block_size=8)
    assert dm.vocab_size == 50257
    # prepare leaves such a folder alone unless forced, and only for the GPT-2 tokenizer
    did, again = run_prepare(settings("unused.txt", tokenizer="tiktoken:gpt2"), tmp_path, seed=0)
    assert not did and again == meta
    with pytest.raises(DataError, match="--force"):
        run_prepare(settings("unused.txt"), tmp_path, seed=0)
    (tmp_path / "val.bin").unlink()
    with pytest.raises(DataError, match=r"missing meta\.pkl, val\.bin"):
        require_artifacts(tmp_path)


# --- errors and progress --------------------------------------------------------------------


def test_tiktoken_offline_error_names_url_and_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    class Request:
        url = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe"

    class ConnectionError(Exception):
        request = Request()

    def offline(name: str) -> tiktoken.Encoding:
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(tokenizers_module.tiktoken, "get_encoding", offline)
    with pytest.raises(DataError) as e:
        TiktokenTokenizer("gpt2")
    assert Request.url in str(e.value) and "TIKTOKEN_CACHE_DIR" in str(e.value)


def test_progress_only_when_asked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = write_folder(tmp_path / "c", documents(3))
    files = resolve_source(folder, None)
    prepare_corpus(files, "char", tmp_path / "quiet", settings(folder), seed=0)
    assert capsys.readouterr().err == ""
    meta = prepare_corpus(
        files, "char", tmp_path / "shown", settings(folder), seed=0, progress=True
    )
    err = capsys.readouterr().err
    tokens = meta["train_tokens"] + meta["val_tokens"]
    assert "prepare: scanning: 100%" in err and "prepare: tokenizing: 100%" in err
    assert f"{tokens:,} tokens" in err and "B/s" in err  # bytes are the unit


def test_meta_stays_plain_data(tmp_path: Path) -> None:
    folder = write_folder(tmp_path / "c", documents(3))
    files = resolve_source(folder, None)
    by_document = settings(folder, val_fraction=0.3, split="documents")
    prepare_corpus(files, "char", tmp_path / "ds", by_document, seed=4)
    raw = pickle.loads((tmp_path / "ds" / "meta.pkl").read_bytes())
    assert raw == read_meta(tmp_path / "ds" / "meta.pkl")
