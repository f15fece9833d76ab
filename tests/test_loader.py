"""Data loaders: document packing, rank/accumulation splits, shard handling, validation, errors.

Every expectation is rebuilt here from the record's data rules with slow, direct code
(walk the documents one by one), never taken from the loader itself.
"""
import itertools
import math
import os
import time

import numpy as np
import pytest
import torch

import train_gpt
from conftest import CORPUS
from train_gpt import (BOS_ID, DataError, Hyperparameters, PRESETS, TrainLoader, bigram_hash,
                      check_config, cu_seqlens_length, find_shards, val_batches, write_shard)

TABLE = 50304 * 5  # bigram table rows of the speedrun model
WORLD_SIZES = (1, 2, 4, 8)


# ------------------------------------------------------------------------------------------------
# Independent restatements of the spec
# ------------------------------------------------------------------------------------------------

def spec_cu_length(T):
    """D = ceil((T // 300) / 128) * 128, at least 128 (buffers under 300 tokens)."""
    return max(128, math.ceil((T // 300) / 128) * 128)


def spec_bigram(ids, table_size):
    m = table_size - 1
    ids = [int(t) for t in ids]
    return [m] + [((36313 * ids[t]) ^ (27191 * ids[t - 1])) % m for t in range(1, len(ids))]


def documents_of(shards):
    """Every run of tokens from a BOS to the next BOS or the end of its shard, in stream order,
    with (shard index, start offset) for each; tokens before a shard's first BOS are skipped."""
    docs = []
    for k, tokens in enumerate(shards):
        tokens = np.asarray(tokens)
        starts = np.flatnonzero(tokens == BOS_ID).tolist()
        docs += [(k, a, tokens[a:b]) for a, b in zip(starts, starts[1:] + [len(tokens)])]
    return docs


def expected_chunks(shards, requests, epochs=1):
    """The rank chunks of the packing rule for a list of (T, max_len), one per chunk in the global
    order (step, micro-batch, rank): documents in order, each truncated to max_len, the last one
    of a chunk cut to fill T + 1 tokens. Returns chunks (lists of segments) and the documents'
    (epoch, shard, offset) each chunk touched."""
    docs = documents_of(shards)
    stream = ((e, k, i, toks) for e in range(epochs) for k, i, toks in docs)
    chunks, origins = [], []
    for T, max_len in requests:
        need, segments, where = T + 1, [], []
        while need:
            e, k, i, toks = next(stream)
            seg = toks[:min(len(toks), max_len, need)]
            segments.append(seg)
            where.append((e, k, i))
            need -= len(seg)
        chunks.append(segments)
        origins.append(where)
    return chunks, origins


def check_chunk(batch, segments, T):
    """A loader batch against the chunk made of `segments` (restated layout of the packing rule)."""
    flat = np.concatenate(segments)
    assert len(flat) == T + 1
    ends = list(itertools.accumulate(len(s) for s in segments))
    ends[-1] -= 1
    cu = [0] + ends
    cu += [T] * (spec_cu_length(T) - len(cu))
    assert batch.inputs.dtype == torch.int32 and batch.targets.dtype == torch.int64
    assert batch.cu_seqlens.dtype == torch.int32 and batch.bigram_ids.dtype == torch.int32
    assert batch.inputs.tolist() == flat[:-1].tolist()
    assert batch.targets.tolist() == flat[1:].tolist()
    assert batch.cu_seqlens.tolist() == cu
    assert batch.bigram_ids.tolist() == spec_bigram(flat[:-1], TABLE)
    assert batch.bigram_ids_cpu.dtype == np.int32
    assert batch.bigram_ids_cpu.tolist() == batch.bigram_ids.tolist()


def check_invariants(batch, T, max_len):
    """Layout properties that hold for any training batch."""
    cu = batch.cu_seqlens.tolist()
    inputs = batch.inputs.tolist()
    assert len(inputs) == T and len(batch.targets) == T
    assert len(cu) == spec_cu_length(T) and cu[0] == 0 and cu[-1] == T
    assert all(a <= b for a, b in zip(cu, cu[1:]))
    starts = [a for a, b in zip(cu, cu[1:]) if b > a]
    assert all(inputs[s] == BOS_ID for s in starts)           # every sequence starts with a BOS
    assert sum(b - a for a, b in zip(cu, cu[1:])) == T
    assert max(b - a for a, b in zip(cu, cu[1:])) <= max_len
    assert batch.targets[:-1].tolist() == inputs[1:]


# ------------------------------------------------------------------------------------------------
# Test data
# ------------------------------------------------------------------------------------------------

def random_documents(rng, count, max_len):
    return [np.concatenate(([BOS_ID], rng.integers(0, BOS_ID, size=n - 1)))
            for n in rng.integers(1, max_len + 1, size=count)]


def write_shards(directory, stream, cuts, name="train"):
    """Split a token stream at `cuts` (anywhere, also inside documents) into shard files."""
    bounds = [0, *cuts, len(stream)]
    paths = []
    for k, (a, b) in enumerate(zip(bounds, bounds[1:])):
        path = os.path.join(directory, f"{name}_{k:06d}.bin")
        write_shard(path, stream[a:b])
        paths.append(path)
    return paths, [stream[a:b] for a, b in zip(bounds, bounds[1:])]


def position_coded_stream(rng, count, max_len):
    """Documents whose non-BOS tokens equal their stream position (all below 50,000), so every
    handed-out token tells where it came from."""
    lengths = rng.integers(1, max_len + 1, size=count)
    stream = np.arange(int(lengths.sum()))
    assert len(stream) < 50_000
    stream[np.cumsum(lengths) - lengths] = BOS_ID
    return stream


# ------------------------------------------------------------------------------------------------
# Formulas and layout
# ------------------------------------------------------------------------------------------------

def test_bigram_hash_matches_formula():
    rng = np.random.default_rng(0)
    ids = np.concatenate(([BOS_ID, 50255, 0, 50256], rng.integers(0, BOS_ID + 1, size=2000)))
    for table in (TABLE, 50304):
        rows = bigram_hash(ids.astype(np.int32), table)
        assert rows.dtype == np.int32
        assert rows.tolist() == spec_bigram(ids, table)
        assert rows[0] == table - 1 and rows.max() < table and rows.min() >= 0


def test_cu_seqlens_length_matches_spec_values():
    assert [cu_seqlens_length(t) for t in (16_384, 32_768, 49_152, 262_144)] == [128, 128, 256, 896]
    for T in (1, 64, 299, 300, 38_400, 38_700, 100_000):
        assert cu_seqlens_length(T) == spec_cu_length(T)


def test_hand_worked_packing(tmp_path):
    """The packing rule applied by hand: T = 16, max_len = 10, one rank."""
    doc = lambda n, v: [BOS_ID] + [v] * (n - 1)
    tokens = doc(5, 1) + doc(30, 2) + doc(3, 3) + doc(12, 4) + doc(4, 5) + doc(20, 6)
    path = tmp_path / "train_000000.bin"
    write_shard(str(path), np.array(tokens))
    loader = TrainLoader([str(path)], 0, 1, "cpu", TABLE)
    first = loader.next_batch(16, 10, 1)
    # doc 1 whole (5), doc 2 truncated to 10, doc 3 cut to the 2 tokens left of the 17
    chunk = doc(5, 1) + doc(10, 2) + [BOS_ID, 3]
    assert first.inputs.tolist() == chunk[:-1] and first.targets.tolist() == chunk[1:]
    assert first.cu_seqlens.tolist() == [0, 5, 15, 16] + [16] * 124
    # next batch starts at doc 4 (doc 3's last token is skipped): 10 of doc 4, doc 5 (4), 3 of doc 6
    second = loader.next_batch(16, 10, 1)
    chunk = doc(10, 4) + doc(4, 5) + [BOS_ID, 6, 6]
    assert second.inputs.tolist() == chunk[:-1] and second.targets.tolist() == chunk[1:]
    assert second.cu_seqlens.tolist() == [0, 10, 14, 16] + [16] * 124


# ------------------------------------------------------------------------------------------------
# Ranks, accumulation, stage change, shard transitions
# ------------------------------------------------------------------------------------------------

STAGES = ((8 * 64, 40, 3), (8 * 96, 96, 3))  # (global batch, max_len, steps): T = 64, then 96


def run_ranks(paths, world_size, **loader_args):
    """All chunks in global order (step, micro-batch, rank) from one loader per simulated rank."""
    loaders = [TrainLoader(paths, r, world_size, "cpu", TABLE, **loader_args)
               for r in range(world_size)]
    accum = 8 // world_size
    out = []
    for batch_tokens, max_len, steps in STAGES:
        for _ in range(steps * accum):
            out += [(batch_tokens // 8, max_len, loader.next_batch(batch_tokens, max_len, accum))
                    for loader in loaders]
    return out


def test_ranks_and_accumulation_share_one_stream(tmp_path):
    rng = np.random.default_rng(1)
    stream = position_coded_stream(rng, 170, 150)
    cuts = [len(stream) // 5, len(stream) * 2 // 5]  # consumption crosses both borders
    paths, shards = write_shards(str(tmp_path), stream, cuts)
    requests = [(bt // 8, ml) for bt, ml, steps in STAGES for _ in range(steps * 8)]
    chunks, origins = expected_chunks(shards, requests)
    assert origins[-1][-1][1] == 2, "the test data should reach the third shard"
    doc_lengths = {(k, i): len(toks) for k, i, toks in documents_of(shards)}
    assert any(len(seg) == ml < doc_lengths[where[1:]]
               for (T, ml), chunk, wheres in zip(requests, chunks, origins)
               for seg, where in zip(chunk[:-1], wheres)), "some documents should be truncated"

    results = {}
    for world_size in WORLD_SIZES:
        got = run_ranks(paths, world_size, bos_prefix_tokens=300)
        assert len(got) == len(chunks)
        for (T, max_len, batch), segments in zip(got, chunks):
            check_chunk(batch, segments, T)
            check_invariants(batch, T, max_len)
        # content tokens are stream positions: strictly increasing = nothing handed out twice
        content = np.concatenate([np.append(b.inputs.numpy(), b.targets[-1].item())
                                  for _, _, b in got])
        content = content[content != BOS_ID]
        assert np.all(np.diff(content) > 0)
        results[world_size] = [np.append(b.inputs.numpy(), b.targets[-1].item()) for _, _, b in got]
    for world_size in WORLD_SIZES[1:]:  # same math on any world size
        assert all(np.array_equal(a, b) for a, b in zip(results[1], results[world_size]))


def test_full_bos_index_is_awaited_not_guessed(tmp_path, monkeypatch):
    """The background index is slow here; the partial one covers only 50 tokens per shard."""
    real = train_gpt._bos_positions

    def slow_bos_positions(tokens):
        if len(tokens) > 50:
            time.sleep(0.2)
        return real(tokens)

    monkeypatch.setattr(train_gpt, "_bos_positions", slow_bos_positions)
    rng = np.random.default_rng(2)
    stream = np.concatenate(random_documents(rng, 80, 60))
    paths, shards = write_shards(str(tmp_path), stream, [len(stream) // 3, len(stream) * 2 // 3])
    loader = TrainLoader(paths, 0, 1, "cpu", TABLE, bos_prefix_tokens=50)
    requests = [(128, 64)] * 12
    chunks, origins = expected_chunks(shards, requests)
    assert origins[-1][-1][1] == 2
    for (T, max_len), segments in zip(requests, chunks):
        check_chunk(loader.next_batch(T, max_len, 1), segments, T)


def test_next_shard_is_read_ahead(tmp_path, monkeypatch):
    reads = []
    real = train_gpt._read_tokens

    def recording_read(path):
        if path.startswith(str(tmp_path)):  # ignore stragglers of other tests' loaders
            reads.append(path)
        return real(path)

    monkeypatch.setattr(train_gpt, "_read_tokens", recording_read)
    rng = np.random.default_rng(3)
    stream = np.concatenate(random_documents(rng, 150, 40))
    paths, shards = write_shards(str(tmp_path), stream, [len(stream) // 3, len(stream) * 2 // 3])
    loader = TrainLoader(paths, 0, 1, "cpu", TABLE)
    deadline = time.time() + 10
    while len(reads) < 2 and time.time() < deadline:
        time.sleep(0.01)
    assert reads == paths[:2]  # the second shard is read before any batch was asked for
    requests = [(64, 64)] * 20
    chunks, origins = expected_chunks(shards, requests)
    stop = next(n for n, where in enumerate(origins) if where[-1][1] == 1)  # first use of shard 1
    for (T, _), segments in zip(requests[:stop + 1], chunks):
        check_chunk(loader.next_batch(T, 64, 1), segments, T)
    deadline = time.time() + 10
    while len(reads) < 3 and time.time() < deadline:
        time.sleep(0.01)
    assert reads == paths  # once shard 1 is current, shard 2 is read ahead


def test_shard_without_document_start_is_skipped(tmp_path):
    rng = np.random.default_rng(4)
    stream = np.concatenate(random_documents(rng, 10, 30)
                            + [np.concatenate(([BOS_ID], rng.integers(0, BOS_ID, size=400)))]
                            + random_documents(rng, 10, 30))
    long_doc = int(np.flatnonzero(stream == BOS_ID)[10])
    cuts = [long_doc + 100, long_doc + 250]  # the middle shard lies inside one long document
    paths, shards = write_shards(str(tmp_path), stream, cuts)
    assert BOS_ID not in shards[1]
    requests = [(32, 32)] * 8
    chunks, origins = expected_chunks(shards, requests)
    assert origins[-1][-1][1] == 2
    loader = TrainLoader(paths, 0, 1, "cpu", TABLE)
    for (T, max_len), segments in zip(requests, chunks):
        check_chunk(loader.next_batch(T, max_len, 1), segments, T)


def test_running_out_of_data_is_an_error(tmp_path):
    rng = np.random.default_rng(5)
    stream = np.concatenate(random_documents(rng, 30, 40))
    paths, shards = write_shards(str(tmp_path), stream, [len(stream) // 2])
    available = 0  # full chunks the data holds, by the restatement
    while True:
        try:
            expected_chunks(shards, [(64, 64)] * (available + 1))
        except StopIteration:
            break
        available += 1
    assert available >= 5
    loader = TrainLoader(paths, 0, 1, "cpu", TABLE)
    for _ in range(available):
        loader.next_batch(64, 64, 1)
    with pytest.raises(DataError) as error:
        loader.next_batch(64, 64, 1)
    message = str(error.value)
    assert f"ran out after {len(stream):,} tokens read from 2 shards" in message
    assert "--cycle_train_data=true" in message


def test_cycle_mode_wraps_and_logs(tmp_path):
    rng = np.random.default_rng(6)
    stream = np.concatenate(random_documents(rng, 12, 50))
    paths, shards = write_shards(str(tmp_path), stream, [len(stream) // 2])
    messages = []
    loader = TrainLoader(paths, 0, 1, "cpu", TABLE, cycle=True, log=messages.append)
    requests = [(64, 48)] * 12
    chunks, origins = expected_chunks(shards, requests, epochs=20)
    epochs_used = origins[-1][-1][0] + 1
    assert epochs_used >= 3
    for (T, max_len), segments in zip(requests, chunks):
        check_chunk(loader.next_batch(T, max_len, 1), segments, T)
    assert messages == [f"data: wrapped around to the first train shard (epoch {e})"
                        for e in range(2, epochs_used + 1)]


def test_cycle_mode_without_any_document_start_is_an_error(tmp_path):
    path = str(tmp_path / "train.bin")
    write_shard(path, np.arange(1, 500))  # no BOS: cycling would never find a document
    loader = TrainLoader([path], 0, 1, "cpu", TABLE, cycle=True, log=lambda message: None)
    with pytest.raises(DataError, match="no document start"):
        loader.next_batch(64, 64, 1)


# ------------------------------------------------------------------------------------------------
# Validation
# ------------------------------------------------------------------------------------------------

def test_validation_reads_the_first_tokens_in_rank_order(tmp_path):
    rng = np.random.default_rng(7)
    val_tokens, val_batch = 4 * 8 * 64, 8 * 64  # T = 64 per rank and micro-batch
    stream = np.concatenate(random_documents(rng, 90, 80))
    assert stream[0] == BOS_ID and len(stream) > val_tokens + 200
    paths, _ = write_shards(str(tmp_path), stream, [700], name="val")  # read across the border
    for world_size in WORLD_SIZES:
        accum = 8 // world_size
        per_rank = [list(val_batches(paths, val_tokens, val_batch, r, world_size, accum, "cpu",
                                     TABLE)) for r in range(world_size)]
        assert all(len(batches) == accum * val_tokens // val_batch for batches in per_rank)
        for step in range(len(per_rank[0])):
            for r in range(world_size):
                batch, T = per_rank[r][step], 64
                start = (step * world_size + r) * T
                inputs = stream[start:start + T]
                assert batch.inputs.dtype == torch.int32 and batch.targets.dtype == torch.int64
                assert batch.inputs.tolist() == inputs.tolist()
                assert batch.targets.tolist() == stream[start + 1:start + T + 1].tolist()
                cu = [0] + [i for i in range(T) if inputs[i] == BOS_ID]
                assert batch.cu_seqlens.tolist() == cu + [T] * (128 - len(cu))
                assert batch.bigram_ids.tolist() == spec_bigram(inputs, TABLE)
                assert batch.bigram_ids_cpu.tolist() == spec_bigram(inputs, TABLE)
        # all targets together are exactly stream[1 : val_tokens + 1], each once
        targets = sorted(((step * world_size + r), per_rank[r][step].targets.tolist())
                         for r in range(world_size) for step in range(len(per_rank[0])))
        assert sum((t for _, t in targets), []) == stream[1:val_tokens + 1].tolist()
    # the leading BOS of the stream gives an empty first sequence
    first = next(val_batches(paths, val_tokens, val_batch, 0, 8, 1, "cpu", TABLE))
    assert first.cu_seqlens.tolist()[:2] == [0, 0]


def test_validation_needs_val_tokens_plus_one(tmp_path):
    rng = np.random.default_rng(8)
    stream = np.concatenate(random_documents(rng, 60, 80))[:1025]
    paths, _ = write_shards(str(tmp_path), stream, [500], name="val")
    assert len(list(val_batches(paths, 1024, 512, 0, 1, 8, "cpu", TABLE))) == 16
    with pytest.raises(DataError, match=r"1,537 tokens .* hold only 1,025"):
        val_batches(paths, 1024 + 512, 512, 0, 1, 8, "cpu", TABLE)  # fails at once, not lazily
    with pytest.raises(DataError, match="1,025 tokens .* hold only 500"):
        val_batches(paths[:1], 1024, 512, 0, 1, 8, "cpu", TABLE)


# ------------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------------

def test_no_matching_files(tmp_path):
    pattern = str(tmp_path / "fineweb_train_*.bin")
    with pytest.raises(DataError, match="no files match"):
        find_shards(pattern)


def test_bad_shards_are_named(tmp_path):
    good = str(tmp_path / "good.bin")
    write_shard(good, np.array([BOS_ID, 1, 2, 3] * 50))
    missing = str(tmp_path / "missing.bin")
    with pytest.raises(DataError, match="missing.bin: cannot read shard"):
        TrainLoader([good, missing], 0, 1, "cpu", TABLE)  # checked up front, not when reached

    truncated = str(tmp_path / "truncated.bin")
    write_shard(truncated, np.arange(100))
    with open(truncated, "r+b") as f:
        f.truncate(1024 + 150)
    with pytest.raises(DataError, match=r"truncated.bin: header says 100 tokens .*\(truncated"):
        TrainLoader([good, truncated], 0, 1, "cpu", TABLE)

    short_header = str(tmp_path / "short_header.bin")
    with open(short_header, "wb") as f:
        f.write(b"\0" * 100)
    with pytest.raises(DataError, match="short_header.bin: truncated header"):
        TrainLoader([short_header], 0, 1, "cpu", TABLE)

    header = np.zeros(256, dtype="<i4")
    header[:3] = (20240520, 1, 4)
    for name, index, value, expected in (("foreign.bin", 0, 12345, "not a token shard"),
                                         ("version.bin", 1, 7, "unsupported shard version 7")):
        bad = header.copy()
        bad[index] = value
        path = tmp_path / name
        path.write_bytes(bad.tobytes() + np.arange(4, dtype="<u2").tobytes())
        with pytest.raises(DataError, match=f"{name}: {expected}"):
            TrainLoader([good, str(path)], 0, 1, "cpu", TABLE)
        with pytest.raises(DataError, match=f"{name}: {expected}"):
            val_batches([str(path)], 2, 2, 0, 1, 1, "cpu", TABLE)


def test_batch_settings_are_checked(tmp_path):
    path = str(tmp_path / "train.bin")
    write_shard(path, np.array([BOS_ID, 1, 2, 3] * 500))
    loader = TrainLoader([path], 1, 2, "cpu", TABLE)
    with pytest.raises(ValueError, match=r"batch_tokens=1000: .* world size 2 x grad-accum steps"):
        loader.next_batch(1000, 16, 8)
    loader.next_batch(1024, 64, 8)  # T = 64: a max length of T is fine, T + 1 is not
    with pytest.raises(ValueError, match="max_seq_len=65: expected 1 to 64"):
        loader.next_batch(1024, 65, 8)
    with pytest.raises(ValueError, match="rank 2"):
        TrainLoader([path], 2, 2, "cpu", TABLE)
    with pytest.raises(ValueError, match="val_batch_tokens=100"):
        val_batches([path], 1000, 100, 0, 2, 4, "cpu", TABLE)
    with pytest.raises(ValueError, match="val_tokens=1000"):
        val_batches([path], 1000, 64, 0, 2, 4, "cpu", TABLE)


def test_too_many_sequences_for_cu_seqlens(tmp_path):
    path = str(tmp_path / "tiny_docs.bin")
    write_shard(path, np.array([BOS_ID, 7] * 2000))  # 2-token documents
    loader = TrainLoader([path], 0, 1, "cpu", TABLE)
    # 513 tokens = 257 sequences, but D = 128 holds 127
    with pytest.raises(DataError, match="512-token batch holds 257 sequences .* room for 127"):
        loader.next_batch(512, 512, 1)
    with pytest.raises(DataError, match="512-token batch holds 257 sequences"):
        next(val_batches([path], 512, 512, 0, 1, 1, "cpu", TABLE))


@pytest.mark.parametrize("short_docs", [126, 127])
def test_cu_seqlens_capacity_boundary(tmp_path, short_docs):
    """T = 512, D = 128: 127 sequences fit (the last entry is still T), 128 do not."""
    tokens = np.array([BOS_ID, 1, 2, 3] * short_docs + [BOS_ID] + [9] * 99)
    path = str(tmp_path / "train.bin")
    write_shard(path, tokens)
    loader = TrainLoader([path], 0, 1, "cpu", TABLE)
    if short_docs + 1 > 127:
        with pytest.raises(DataError, match="512-token batch holds 128 sequences"):
            loader.next_batch(512, 512, 1)
        return
    (segments,), _ = expected_chunks([tokens], [(512, 512)])
    assert len(segments) == 127
    check_chunk(loader.next_batch(512, 512, 1), segments, 512)


def test_check_config():
    for world_size in WORLD_SIZES:
        assert check_config(Hyperparameters(), world_size) == 8 // world_size
    for world_size in (1, 2, 4):   # the smoke preset runs 4 micro-batches per step
        assert check_config(Hyperparameters(**PRESETS["smoke"]), world_size) == 4 // world_size
    with pytest.raises(ValueError, match="world size 8 does not divide 4; use 1, 2 or 4"):
        check_config(Hyperparameters(**PRESETS["smoke"]), 8)
    for world_size in (0, 3, 16):
        with pytest.raises(ValueError) as error:
            check_config(Hyperparameters(), world_size)
        assert str(error.value) == (f"world size {world_size} does not divide 8; "
                                    f"use 1, 2, 4 or 8 processes")
    rows = Hyperparameters().stages
    cases = [
        (dict(stages=(*rows[:2], rows[2]._replace(batch_tokens=393_220))),
         "stage 3 batch_tokens=393220: expected a positive multiple of micro_batches_per_step=8"),
        (dict(stages=(*rows[:2], rows[2]._replace(max_seq_len=50_000))),
         "stage 3 max_seq_len=50000: expected 1 to 49152"),
        (dict(stages=(rows[0]._replace(windows=(3, 1)), *rows[1:])), r"stage 1 windows=\(3, 1\)"),
        (dict(stages=(rows[0]._replace(mtp_weights=((1.0, 0.5), (1.0,))), *rows[1:])),
         r"stage 1 mtp_weights=.*expected \(start, end\) weight tuples"),
        (dict(stages=()), "stages: expected at least one stage"),
        (dict(val_tokens=1000), "val_tokens=1000"),
        (dict(val_tokens=0), "val_tokens=0"),
        (dict(val_batch_tokens=1001, val_tokens=1001), "val_batch_tokens=1001"),
    ]
    for overrides, message in cases:
        with pytest.raises(ValueError, match=message):
            check_config(Hyperparameters(**overrides), 8)


# ------------------------------------------------------------------------------------------------
# Real corpus and device
# ------------------------------------------------------------------------------------------------

CORPUS_SHARD = os.path.join(CORPUS, "corpus_train_000001.bin")


def test_real_corpus_stage1_step():
    """One speedrun stage-1 step on one rank: 8 micro-batches of 16,384 tokens, max_len 896."""
    if not os.path.exists(CORPUS_SHARD):
        pytest.skip(f"{CORPUS_SHARD} is absent")
    tokens = np.fromfile(CORPUS_SHARD, dtype="<u2", offset=1024)
    assert len(tokens) == 10_000_000
    shards = [tokens]
    requests = [(16_384, 896)] * 8
    chunks, _ = expected_chunks(shards, requests)
    loader = TrainLoader([CORPUS_SHARD], 0, 1, "cpu", TABLE)
    for (T, max_len), segments in zip(requests, chunks):
        batch = loader.next_batch(131_072, max_len, 8)
        check_invariants(batch, T, max_len)
        check_chunk(batch, segments, T)


@pytest.mark.gpu
def test_batches_land_on_the_gpu(tmp_path):
    rng = np.random.default_rng(9)
    stream = np.concatenate(random_documents(rng, 40, 60))
    paths, _ = write_shards(str(tmp_path), stream, [len(stream) // 2])
    on_cpu = TrainLoader(paths, 1, 2, "cpu", TABLE)
    on_gpu = TrainLoader(paths, 1, 2, "cuda", TABLE)
    for _ in range(4):
        expected, got = on_cpu.next_batch(512, 64, 4), on_gpu.next_batch(512, 64, 4)
        for name in ("inputs", "targets", "cu_seqlens", "bigram_ids"):
            assert getattr(got, name).is_cuda
            assert torch.equal(getattr(got, name).cpu(), getattr(expected, name))
    expected = next(val_batches(paths, 512, 256, 1, 2, 4, "cpu", TABLE))
    got = next(val_batches(paths, 512, 256, 1, 2, 4, "cuda", TABLE))
    assert got.inputs.is_cuda and torch.equal(got.targets.cpu(), expected.targets)
