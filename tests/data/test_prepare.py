"""`prepare`: text, JSONL and Parquet text become token datasets that decode back to the input."""

import argparse
import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stalwart.data.dataset import TokenDataset
from stalwart.data.prepare import add_prepare_arguments, iter_documents, prepare, run_prepare
from stalwart.data.tokenizer import ByteTokenizer, load_tokenizer


def documents_of(path, tokenizer=None):
    """The documents stored in a token Parquet file, decoded."""
    tokenizer = tokenizer or ByteTokenizer()
    column = pq.read_table(path).column("tokens").to_pylist()
    return [tokenizer.decode(ids) for ids in column]


def test_text_files_one_document_per_file_survive_byte_for_byte(tmp_path):
    texts = ["First file.\n\nStill the first.\n", "Ünïcödé ✓ and\ttabs\r\n", ""]
    for index, text in enumerate(texts):
        (tmp_path / f"doc{index}.txt").write_bytes(text.encode())
    summary = prepare(
        [tmp_path / "doc0.txt", tmp_path / "doc1.txt", tmp_path / "doc2.txt"],
        tmp_path / "out.parquet",
    )
    assert documents_of(tmp_path / "out.parquet") == texts[:2]
    assert summary.num_documents == 2 and summary.num_skipped_empty == 1
    assert summary.num_tokens == sum(len(t.encode()) for t in texts)
    # Packed, the stream is each document followed by EOS.
    dataset = TokenDataset(tmp_path / "out.parquet", 4)
    stream = dataset.get_batch([0]).tolist()[0]
    assert stream == list(texts[0].encode()[:5])


def test_text_paragraph_mode_splits_on_blank_lines(tmp_path):
    (tmp_path / "a.txt").write_text("One para\nsame para.\n\n  Two.  \n \t\n\n\nThree\r\n\r\nFour")
    prepare([tmp_path / "a.txt"], tmp_path / "out.parquet", text_documents="paragraph")
    assert documents_of(tmp_path / "out.parquet") == [
        "One para\nsame para.",
        "Two.",
        "Three",
        "Four",
    ]


def test_jsonl_with_a_chosen_field_plain_and_gzipped(tmp_path):
    records = [{"body": "alpha", "id": 1}, {"body": "beta"}, {"body": ""}, {"body": "gamma δ"}]
    lines = "\n".join(json.dumps(r) for r in records) + "\n\n"
    (tmp_path / "a.jsonl").write_text(lines)
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as handle:
        handle.write(lines)
    summary = prepare(
        [tmp_path / "a.jsonl", tmp_path / "b.jsonl.gz"], tmp_path / "out.parquet", text_field="body"
    )
    assert documents_of(tmp_path / "out.parquet") == ["alpha", "beta", "gamma δ"] * 2
    assert summary.num_skipped_empty == 2


def test_jsonl_errors_name_file_line_and_field_and_leave_no_output(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"content": "x"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: no field 'text'.*--text-field"):
        prepare([tmp_path / "bad.jsonl"], tmp_path / "out.parquet")
    (tmp_path / "broken.jsonl").write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(ValueError, match=r"broken.jsonl:2: not valid JSON"):
        prepare([tmp_path / "broken.jsonl"], tmp_path / "out.parquet")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "broken.jsonl"]


def test_parquet_text_column_and_directory_inputs(tmp_path):
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    pq.write_table(pa.table({"text": ["p1", None, "p2"]}), corpus / "a.parquet")
    (corpus / "sub" / "b.txt").write_text("t1")
    (corpus / ".hidden.txt").write_text("ignored")
    prepare([corpus], tmp_path / "out.parquet")
    assert documents_of(tmp_path / "out.parquet") == ["p1", "p2", "t1"]
    with pytest.raises(ValueError, match="no column 'content'"):
        prepare([corpus / "a.parquet"], tmp_path / "x.parquet", text_field="content")


def test_row_groups_follow_rows_and_tokens_limits(tmp_path):
    (tmp_path / "a.jsonl").write_text(
        "".join(json.dumps({"text": "x" * 10}) + "\n" for _ in range(25))
    )
    prepare([tmp_path / "a.jsonl"], tmp_path / "rows.parquet", rows_per_group=10)
    assert pq.ParquetFile(tmp_path / "rows.parquet").metadata.num_row_groups == 3
    prepare([tmp_path / "a.jsonl"], tmp_path / "tokens.parquet", tokens_per_group=50)
    assert pq.ParquetFile(tmp_path / "tokens.parquet").metadata.num_row_groups == 5


def test_hugging_face_tokenizer(tmp_path, hf_tokenizer_dir):
    (tmp_path / "a.txt").write_text("hello world\n\nthe lazy dog")
    summary = prepare(
        [tmp_path / "a.txt"],
        tmp_path / "out.parquet",
        tokenizer=str(hf_tokenizer_dir),
        text_documents="paragraph",
    )
    tokenizer = load_tokenizer(str(hf_tokenizer_dir))
    assert documents_of(tmp_path / "out.parquet", tokenizer) == ["hello world", "the lazy dog"]
    dataset = TokenDataset(tmp_path / "out.parquet", 2, vocab_size=tokenizer.vocab_size)
    assert dataset.eos_id == tokenizer.eos_id
    assert dataset.tokenizer_name == str(hf_tokenizer_dir)
    assert summary.num_tokens < len("hello worldthe lazy dog")


def test_command_line_entry_points(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("some text")
    parser = add_prepare_arguments(argparse.ArgumentParser())
    args = parser.parse_args(
        [str(tmp_path / "a.txt"), "-o", str(tmp_path / "out.parquet"), "--compression", "zstd"]
    )
    assert run_prepare(args) == 0
    assert "wrote" in capsys.readouterr().out
    assert documents_of(tmp_path / "out.parquet") == ["some text"]
    assert (
        pq.ParquetFile(tmp_path / "out.parquet").metadata.row_group(0).column(0).compression
        == "ZSTD"
    )


def test_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        prepare([tmp_path / "nope.txt"], tmp_path / "out.parquet")
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(ValueError, match="not UTF-8"):
        prepare([tmp_path / "latin1.txt"], tmp_path / "out.parquet")
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="no non-empty documents"):
        prepare([tmp_path / "empty.txt"], tmp_path / "out.parquet")
    assert not (tmp_path / "out.parquet").exists()
    with pytest.raises(ValueError, match="text_documents must be one of"):
        list(iter_documents([tmp_path / "empty.txt"], text_documents="line"))
