"""Token Parquet datasets: packing round-trips the token stream, random access is exact,
errors name the problem."""

import pickle

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from stalwart.data.dataset import TokenDataset, TokenParquetWriter, write_token_parquet

EOS = 257


def random_documents(seed, num_documents, max_length=40):
    generator = np.random.default_rng(seed)
    lengths = generator.integers(0, max_length, num_documents)  # includes empty documents
    return [generator.integers(0, 256, length).astype(np.int32) for length in lengths]


def packed_stream(documents, eos=EOS):
    return np.concatenate([np.append(document, eos) for document in documents])


def unpack_windows(dataset):
    """The stream as the windows see it: window 0 whole, then each window minus its overlap."""
    windows = [dataset[index].numpy() for index in range(len(dataset))]
    return np.concatenate([windows[0]] + [window[1:] for window in windows[1:]])


@pytest.mark.parametrize("context_length", [1, 7, 64])
def test_windows_round_trip_the_packed_stream_across_files_and_row_groups(tmp_path, context_length):
    documents = random_documents(0, 120)
    # Three files, tiny row groups: windows straddle row groups and file boundaries.
    for part, chunk in enumerate(np.array_split(np.arange(len(documents)), 3)):
        write_token_parquet(
            tmp_path / f"part-{part}.parquet",
            [documents[i] for i in chunk],
            eos_id=EOS,
            vocab_size=259,
            rows_per_group=7,
        )
    stream = packed_stream(documents)
    dataset = TokenDataset(tmp_path, context_length)
    assert dataset.num_tokens == len(stream)
    assert dataset.num_documents == len(documents)
    assert len(dataset) == (len(stream) - 1) // context_length
    covered = unpack_windows(dataset)
    assert len(covered) == len(dataset) * context_length + 1
    np.testing.assert_array_equal(covered, stream[: len(covered)])
    window = dataset[3]
    assert window.dtype == torch.int64 and window.shape == (context_length + 1,)


def test_get_batch_equals_getitem_and_negative_indices(tmp_path):
    write_token_parquet(tmp_path / "d.parquet", random_documents(1, 50), eos_id=EOS, vocab_size=259)
    dataset = TokenDataset(tmp_path / "d.parquet", 16)
    indices = [5, 0, len(dataset) - 1, 5]
    batch = dataset.get_batch(indices)
    assert batch.shape == (4, 17)
    for row, index in enumerate(indices):
        torch.testing.assert_close(batch[row], dataset[index], rtol=0, atol=0)
    torch.testing.assert_close(dataset[-1], dataset[len(dataset) - 1], rtol=0, atol=0)
    with pytest.raises(IndexError):
        dataset[len(dataset)]


def test_row_group_cache_stays_within_budget_and_reads_stay_exact(tmp_path):
    documents = random_documents(2, 300)
    write_token_parquet(
        tmp_path / "d.parquet", documents, eos_id=EOS, vocab_size=259, rows_per_group=10
    )
    stream = packed_stream(documents)
    dataset = TokenDataset(tmp_path / "d.parquet", 8, cache_bytes=0)
    order = np.random.default_rng(0).permutation(len(dataset))
    for index in order[:200]:
        np.testing.assert_array_equal(
            dataset[int(index)].numpy(), stream[index * 8 : index * 8 + 9]
        )
    assert len(dataset._cache) == 1  # only the row group in use
    large = TokenDataset(tmp_path / "d.parquet", 8)
    for index in order:
        large[int(index)]
    assert len(large._cache) == pq.ParquetFile(tmp_path / "d.parquet").metadata.num_row_groups


def test_glob_and_list_of_paths(tmp_path):
    first, second = random_documents(3, 20), random_documents(4, 20)
    write_token_parquet(tmp_path / "b.parquet", second, eos_id=EOS, vocab_size=259)
    write_token_parquet(tmp_path / "a.parquet", first, eos_id=EOS, vocab_size=259)
    by_glob = TokenDataset(str(tmp_path / "*.parquet"), 4)
    by_list = TokenDataset([tmp_path / "a.parquet", tmp_path / "b.parquet"], 4)
    expected = packed_stream(first + second)  # sorted by name: a before b
    for dataset in (by_glob, by_list):
        np.testing.assert_array_equal(unpack_windows(dataset), expected[: len(dataset) * 4 + 1])


def test_files_written_elsewhere_need_an_eos_id_and_are_indexed_by_scanning(tmp_path):
    documents = random_documents(5, 30)
    table = pa.table(
        {
            "id": pa.array(range(len(documents))),
            "tokens": pa.array([d.astype(np.int64) for d in documents], pa.list_(pa.int64())),
        }
    )
    pq.write_table(table, tmp_path / "foreign.parquet", row_group_size=8)
    with pytest.raises(ValueError, match="pass eos_id"):
        TokenDataset(tmp_path / "foreign.parquet", 8)
    dataset = TokenDataset(tmp_path / "foreign.parquet", 8, eos_id=300, vocab_size=301)
    np.testing.assert_array_equal(
        unpack_windows(dataset), packed_stream(documents, eos=300)[: len(dataset) * 8 + 1]
    )


def test_clear_errors_for_missing_files_and_wrong_columns(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        TokenDataset(tmp_path / "missing.parquet", 8)
    with pytest.raises(FileNotFoundError, match="no \\*.parquet files"):
        TokenDataset(tmp_path, 8)
    with pytest.raises(FileNotFoundError, match="matches no files"):
        TokenDataset(str(tmp_path / "*.parquet"), 8)
    pq.write_table(pa.table({"text": ["a", "b"]}), tmp_path / "text.parquet")
    with pytest.raises(ValueError, match="no column 'tokens'.*stalwart data prepare"):
        TokenDataset(tmp_path / "text.parquet", 8)
    pq.write_table(pa.table({"tokens": [1, 2, 3]}), tmp_path / "flat.parquet")
    with pytest.raises(ValueError, match="has type int64, expected list<int32>"):
        TokenDataset(tmp_path / "flat.parquet", 8)
    pq.write_table(pa.table({"tokens": [["a"], ["b"]]}), tmp_path / "strings.parquet")
    with pytest.raises(ValueError, match="expected list<int32>"):
        TokenDataset(tmp_path / "strings.parquet", 8)


def test_vocabulary_eos_and_size_checks(tmp_path):
    write_token_parquet(tmp_path / "d.parquet", [[1, 2, 250]] * 10, eos_id=EOS, vocab_size=259)
    with pytest.raises(ValueError, match="model.vocab_size >= 259"):
        TokenDataset(tmp_path / "d.parquet", 4, vocab_size=100)
    with pytest.raises(ValueError, match="written with EOS id 257"):
        TokenDataset(tmp_path / "d.parquet", 4, eos_id=2)
    with pytest.raises(ValueError, match="cannot fill one window"):
        TokenDataset(tmp_path / "d.parquet", 40)
    assert TokenDataset(tmp_path / "d.parquet", 4, vocab_size=259).max_token_id == EOS


def test_writer_rejects_bad_documents_and_leaves_no_partial_file(tmp_path):
    target = tmp_path / "d.parquet"
    with pytest.raises(ValueError, match="document 1 holds token id 259, outside the vocabulary"):
        with TokenParquetWriter(target, eos_id=EOS, vocab_size=259) as writer:
            writer.add([1, 2, 3])
            writer.add([1, 259])
    with pytest.raises(ValueError, match="document 2 holds token id -1"):
        writer = TokenParquetWriter(target, eos_id=EOS, vocab_size=259, rows_per_group=1)
        writer.add_many([[1], [2], [-1], [3]])  # fails while flushing a full row group
    with pytest.raises(ValueError, match="token ids must be integers"):
        with TokenParquetWriter(target, eos_id=EOS, vocab_size=259) as writer:
            writer.add([1.5])
    assert list(tmp_path.iterdir()) == []


def test_dataset_pickles_without_its_memory_maps(tmp_path):
    write_token_parquet(tmp_path / "d.parquet", random_documents(6, 40), eos_id=EOS, vocab_size=259)
    dataset = TokenDataset(tmp_path / "d.parquet", 8)
    before = dataset.get_batch([0, 3, 9])
    clone = pickle.loads(pickle.dumps(dataset))
    assert not clone._cache
    torch.testing.assert_close(clone.get_batch([0, 3, 9]), before, rtol=0, atol=0)
