"""Corpora as people keep them (prepare/sources.py): the same documents as text files, JSONL,
JSONL.gz and Parquet give the same token files; they stream; an fsspec URL stands for the hub;
every bad input is one line."""

from __future__ import annotations

import gzip
import json
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fsspec.implementations.dirfs import DirFileSystem
from fsspec.implementations.local import LocalFileSystem

from ml_playground import cli
from ml_playground.errors import DataError
from ml_playground.prepare import TiktokenTokenizer, prepare_corpus, resolve_source, run_prepare
from test_prepare_stream import documents, settings, tiny_encoding


def as_text_files(folder: Path, docs: list[str]) -> Path:
    folder.mkdir(parents=True)
    for i, doc in enumerate(docs):
        (folder / f"doc{i:03d}.txt").write_text(doc, encoding="utf-8")
    return folder


def as_jsonl(path: Path, docs: list[str], field: str = "text", gz: bool = False) -> Path:
    lines = "".join(json.dumps({"id": i, field: doc}) + "\n" for i, doc in enumerate(docs))
    path.write_bytes(gzip.compress(lines.encode()) if gz else lines.encode())
    return path


def as_parquet(path: Path, docs: list[str], rows_per_group: int = 3, field: str = "text") -> Path:
    table = pa.table({"id": list(range(len(docs))), field: docs})
    pq.write_table(table, path, row_group_size=rows_per_group)
    return path


def bins(folder: Path) -> tuple[bytes, bytes]:
    return (folder / "train.bin").read_bytes(), (folder / "val.bin").read_bytes()


@pytest.mark.parametrize("split", ["contiguous", "documents"])
@pytest.mark.parametrize("tokenizer", ["char", "bpe"])
def test_four_forms_of_the_same_documents_give_the_same_token_files(
    tmp_path: Path, tokenizer: str, split: str
) -> None:
    docs = documents(15, seed=3)
    forms = {
        "txt": as_text_files(tmp_path / "txt", docs),
        "jsonl": as_jsonl(tmp_path / "c.jsonl", docs),
        "jsonl.gz": as_jsonl(tmp_path / "c.jsonl.gz", docs, gz=True),
        "parquet": as_parquet(tmp_path / "c.parquet", docs),
    }
    tok = "char" if tokenizer == "char" else TiktokenTokenizer(tiny_encoding())
    results = {}
    for name, source in forms.items():
        out = tmp_path / f"out-{name}"
        chosen = settings(source, split=split, val_fraction=0.2, chunk_bytes=50, num_threads=1)
        prepare_corpus(resolve_source(source, None), tok, out, chosen, seed=4)
        results[name] = bins(out)
    assert len(set(results.values())) == 1, sorted(results)
    assert all(results["txt"])


def test_a_folder_mixes_the_forms_by_suffix_and_max_documents_stops_early(tmp_path: Path) -> None:
    docs = documents(9, seed=1)
    folder = tmp_path / "mixed"
    as_text_files(folder, docs[:3])
    as_jsonl(folder / "m1.jsonl", docs[3:6])
    as_parquet(folder / "p2.parquet", docs[6:])
    files = resolve_source(folder, None)
    assert [f.kind for f in files] == ["text", "text", "text", "jsonl", "parquet"]
    whole = as_jsonl(tmp_path / "all.jsonl", docs)
    for limit, expected in ((4, docs[:4]), (0, docs)):
        outs = []
        for source in (folder, whole):
            out = tmp_path / f"out-{limit}-{Path(source).name}"
            chosen = settings(source, max_documents=limit, chunk_bytes=40)
            meta = prepare_corpus(resolve_source(source, None), "char", out, chosen, seed=0)
            outs.append(bins(out))
        assert outs[0] == outs[1]
        assert meta["train_tokens"] + meta["val_tokens"] == len("".join(expected))


def test_text_field_names_the_key_or_column(tmp_path: Path) -> None:
    docs = documents(4)
    for source in (
        as_jsonl(tmp_path / "c.jsonl", docs, field="content"),
        as_parquet(tmp_path / "c.parquet", docs, field="content"),
    ):
        out = tmp_path / f"out-{source.suffix}"
        meta = prepare_corpus(
            resolve_source(source, None), "char", out, settings(source, text_field="content"),
            seed=0,
        )  # fmt: skip
        assert meta["train_tokens"] + meta["val_tokens"] == len("".join(docs))


@pytest.mark.parametrize("form", ["jsonl.gz", "parquet"])
def test_a_corpus_larger_than_chunk_bytes_streams_in_bounded_memory(
    tmp_path: Path, form: str
) -> None:
    """About 2 MB of text through 16 kB chunks (Parquet: row groups of 10 documents): Python's
    peak allocation and pyarrow's stay a small fraction of the corpus."""
    docs = [doc * 40 for doc in documents(400, seed=7)]
    size = len("".join(docs).encode())
    source = (
        as_jsonl(tmp_path / "big.jsonl.gz", docs, gz=True)
        if form == "jsonl.gz"
        else as_parquet(tmp_path / "big.parquet", docs, rows_per_group=10)
    )
    pool = pa.default_memory_pool()
    before = pool.max_memory() or 0
    tracemalloc.start()
    try:
        meta = prepare_corpus(
            resolve_source(source, None), "char", tmp_path / "out",
            settings(source, chunk_bytes=16_384), seed=0,
        )  # fmt: skip
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert size > 1_500_000 and meta["train_tokens"] + meta["val_tokens"] == len("".join(docs))
    assert peak < size / 4, (peak, size)
    assert (pool.max_memory() or 0) - before < size / 4


# --------------------------------------------------------------------------- hf:// and fsspec


class StandInHub(DirFileSystem):
    """A local folder answering for `hf://` (no network in tests): hf://datasets/o/n/x is
    ROOT/datasets/o/n/x."""

    protocol = "hf"
    cachable = False
    root = ""

    def __init__(self, **kwargs: object) -> None:
        super().__init__(path=self.root, fs=LocalFileSystem())


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv("ML_PLAYGROUND_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "hub"
    StandInHub.root = str(root)
    fsspec.register_implementation("hf", StandInHub, clobber=True)
    try:
        yield root
    finally:
        from huggingface_hub import HfFileSystem

        fsspec.register_implementation("hf", HfFileSystem, clobber=True)


def test_an_hf_glob_reads_like_the_same_local_files(tmp_path: Path, hub: Path) -> None:
    docs = documents(10, seed=2)
    folder = hub / "datasets" / "someone" / "corpus" / "sample"
    folder.mkdir(parents=True)
    as_parquet(folder / "000.parquet", docs[:6])
    as_parquet(folder / "001.parquet", docs[6:])
    url = "hf://datasets/someone/corpus/sample/*.parquet"
    files = resolve_source(url, None)
    assert [f.location for f in files] == [
        "hf://datasets/someone/corpus/sample/000.parquet",
        "hf://datasets/someone/corpus/sample/001.parquet",
    ]
    local = as_jsonl(tmp_path / "same.jsonl", docs)
    outs = []
    for source in (url, local):
        out = tmp_path / f"out{len(outs)}"
        run_prepare(settings(source, split="documents"), out, seed=3)
        outs.append(bins(out))
    assert outs[0] == outs[1]
    assert len(list((tmp_path / "cache" / "remote").iterdir())) == 2  # read once each
    with pytest.raises(DataError, match="no file matches hf://datasets/someone/corpus/none"):
        resolve_source("hf://datasets/someone/corpus/none/*.parquet", None)


# --------------------------------------------------------------------------- bad input


def prepare_line(
    tmp_path: Path, source: object, capsys: pytest.CaptureFixture[str], *flags: str
) -> tuple[int, str]:
    """`ml-playground prepare` in-process: its exit code and its one stderr line."""
    out = tmp_path / "data"
    code = cli.main(["prepare", "--prepare.source", str(source),
                     "--prepare.source_sha256", "", "--data.dataset_dir", str(out), *flags])  # fmt: skip
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("ml-playground: error: "), lines
    assert not out.exists() or not any(p.name in ("train.bin", "val.bin", "meta.pkl")
                                       for p in out.iterdir())  # fmt: skip
    return code, lines[0]


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


BAD_JSONL = {
    "not_json": (b'{"text": "a"}\n{"text": "b"\n', "bad.jsonl: line 2 is not JSON"),
    "no_field": (b'{"text": "a"}\n{"body": "b", "id": 2}\n',
                 "bad.jsonl: line 2 has no 'text' (its keys: body, id)"),
    "null_text": (b'{"text": null}\n', "bad.jsonl: line 1: 'text' is null, not text"),
    "number_text": (b'{"text": 3}\n', "bad.jsonl: line 1: 'text' is int, not text"),
    "not_an_object": (b'["text"]\n', "bad.jsonl: line 1 is not a JSON object"),
    "empty_texts": (b'{"text": ""}\n\n', "is empty; give a non-empty"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(BAD_JSONL))
def test_a_bad_jsonl_record_is_one_line(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    content, says = BAD_JSONL[case]
    code, line = prepare_line(tmp_path, write(tmp_path / "bad.jsonl", content), capsys)
    assert code == 1 and says in line, line


def test_a_parquet_file_without_the_column_names_its_columns(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    source = as_parquet(tmp_path / "c.parquet", ["a", "b"], field="body")
    code, line = prepare_line(tmp_path, source, capsys)
    assert code == 1 and "c.parquet has no column 'text' (its columns: id, body)" in line, line
    pq.write_table(pa.table({"text": ["a", None]}), tmp_path / "nulls.parquet")
    code, line = prepare_line(tmp_path, tmp_path / "nulls.parquet", capsys)
    assert code == 1 and "nulls.parquet: row 2: 'text' is null, not text" in line, line


def test_globs_and_hub_paths_that_match_nothing(
    tmp_path: Path, hub: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    code, line = prepare_line(tmp_path, tmp_path / "*.jsonl", capsys)
    assert code == 1 and "no file matches the pattern" in line, line
    (hub / "datasets" / "o" / "n").mkdir(parents=True)
    code, line = prepare_line(tmp_path, "hf://datasets/o/n/*.parquet", capsys)
    assert code == 1 and "no file matches hf://datasets/o/n/*.parquet" in line, line


def test_the_hub_while_offline_says_how_to_work_offline(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real HfFileSystem with HF_HUB_OFFLINE=1: it refuses before any connection."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    code, line = prepare_line(
        tmp_path, "hf://datasets/HuggingFaceFW/fineweb-edu/x/*.parquet", capsys
    )
    assert code == 1 and "cannot reach hf://datasets/HuggingFaceFW/fineweb-edu/x/*.parquet" in line
    assert "without network, download the files once" in line, line


def test_tokenizers_of_our_own_fail_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bpe: vocabulary the data cannot fill, a corrupted tokenizer.json, a bpe: too small."""
    monkeypatch.chdir(tmp_path)
    source = as_jsonl(tmp_path / "c.jsonl", ["the king and the queen"] * 3)
    code, line = prepare_line(tmp_path, source, capsys, "--prepare.tokenizer", "bpe:5000")
    assert code == 1 and "bpe:5000: the training split has only enough distinct text" in line
    (tmp_path / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab"', "utf-8")
    code, line = prepare_line(tmp_path, source, capsys, "--prepare.tokenizer", "hf:tokenizer.json")
    assert code == 1 and "not a readable tokenizer.json" in line, line
    code, line = prepare_line(tmp_path, source, capsys, "--prepare.tokenizer", "bpe:100")
    assert code == 2 and "bpe:100: a byte-level BPE has from 257 tokens" in line, line
