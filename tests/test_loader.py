"""The training stream: a real DataLoader with worker processes, rows sharded over workers and ranks,
a seeded order, exact and cheap resume, bad-row counts summed over batches."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conversation_data import llava_dataset, word_level, write_jsonl

from cliviz.data.collate import collator_for_model
from cliviz.data.loader import ConversationStream, DataSummary, make_loader
from cliviz.data.sources import ArrowSource, LlavaJsonSource, ShapesSceneSource
from cliviz.errors import CLIVizError

N = 20


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The same 20 good rows as JSONL, as a JSON list and as Parquet (row groups of 6)."""
    root = tmp_path_factory.mktemp("stream")
    rows, images = llava_dataset(root, N)
    write_jsonl(root / "d.jsonl", rows)
    (root / "d.json").write_text(json.dumps(rows))
    table = pa.table(
        {
            "id": [r["id"] for r in rows],
            "image": [r["image"] for r in rows],
            "conversations": [json.dumps(r["conversations"]) for r in rows],
        }
    )
    pq.write_table(table, root / "d.parquet", row_group_size=6)
    return {"root": root, "images": images, "ids": {r["id"] for r in rows}}


@pytest.fixture(scope="module")
def collator():
    tok, config = word_level()
    return collator_for_model(config, tok)


class CountingJsonSource(LlavaJsonSource):
    """A real JSONL source that also counts the rows it parses (what resuming must not redo)."""

    parsed = 0

    def parse(self, raw, index):
        CountingJsonSource.parsed += 1
        return super().parse(raw, index)


def source(data, kind: str = "jsonl"):
    if kind == "parquet":
        return ArrowSource(data["root"] / "d.parquet", data["images"])
    return LlavaJsonSource(data["root"] / f"d.{kind}", data["images"])


def batches(stream, n: int | None = None, workers: int = 0) -> list:
    out = []
    for batch in make_loader(stream, num_workers=workers):
        out.append(batch)
        if n is not None and len(out) == n:
            break
    return out


def test_two_workers_see_disjoint_rows_whose_union_is_the_file(data, collator):
    stream = ConversationStream(source(data), collator, batch_size=3, seed=1, epochs=1)
    got = batches(stream, workers=2)
    assert [b.index for b in got] == list(range(7)) and [b.worker for b in got] == [i % 2 for i in range(7)]
    by_worker = [[i for b in got if b.worker == w for i in b.ids] for w in (0, 1)]
    assert not set(by_worker[0]) & set(by_worker[1])
    assert sorted(by_worker[0] + by_worker[1]) == sorted(data["ids"])
    summary = DataSummary()
    for b in got:
        summary.add(b)
    assert summary.samples == N and summary.label_tokens == 2 * N  # one-word answer + eos per row


def test_ranks_split_each_global_batch(data, collator):
    """Rank r's batch b is the r-th slice of one process's batch b of twice the size: DDP with 2
    ranks sees exactly the samples of a single process with the doubled batch, step by step."""
    single = batches(ConversationStream(source(data), collator, batch_size=6, seed=2, epochs=1))
    ranks = [
        batches(ConversationStream(source(data), collator, batch_size=3, seed=2, epochs=1, rank=r, world_size=2))
        for r in (0, 1)
    ]
    assert len(ranks[0]) == len(ranks[1]) == len(single) == 4  # rank 1 ends on an empty batch, in step
    for b, whole in enumerate(single):
        assert ranks[0][b].ids + ranks[1][b].ids == whole.ids
    assert ranks[1][3].size == 0 and ranks[1][3].inputs == {}
    every = [i for rank in ranks for b in rank for i in b.ids]
    assert sorted(every) == sorted(data["ids"])
    with pytest.raises(ValueError, match="bad stream layout"):
        ConversationStream(source(data), collator, batch_size=3, rank=2, world_size=2)


def test_order_is_seeded_windowed_and_reshuffled_per_epoch(data, collator):
    def order(seed, **kw):
        stream = ConversationStream(source(data), collator, batch_size=4, seed=seed, shuffle_window=8, epochs=2, **kw)
        return [i for b in batches(stream) for i in b.ids]

    first = order(0)
    assert first == order(0) and first != order(1)
    epoch0, epoch1 = first[:N], first[N:]
    assert sorted(epoch0) == sorted(epoch1) == sorted(data["ids"]) and epoch0 != epoch1
    assert sorted(epoch0[:8]) == sorted(f"row-{i}" for i in range(8))  # a shuffle window stays a window
    assert order(0, shuffle=False)[:N] == [f"row-{i}" for i in range(N)]


@pytest.mark.parametrize("kind", ["jsonl", "json", "parquet"])
def test_resume_gives_the_same_batches_whatever_the_workers(data, collator, kind):
    """Batches 7.. of a run started at batch 7 (in-process) equal those of the uninterrupted run
    (2 worker processes), across an epoch boundary (batch 7 starts at position 21 of 20 rows)."""
    layout = dict(batch_size=3, seed=5, shuffle_window=8)
    full = batches(ConversationStream(source(data, kind), collator, **layout), 12, workers=2)
    resumed = batches(ConversationStream(source(data, kind), collator, **layout, start_batch=7), 5)
    assert [b.index for b in resumed] == list(range(7, 12)) and resumed[0].epoch == 1
    for a, b in zip(full[7:], resumed):
        assert a.ids == b.ids and sorted(a.inputs) == sorted(b.inputs)
        assert all(torch.equal(a.inputs[k], b.inputs[k]) for k in a.inputs)


def test_resume_parses_only_what_it_trains_on(data, collator):
    CountingJsonSource.parsed = 0
    stream = ConversationStream(
        CountingJsonSource(data["root"] / "d.jsonl", data["images"]), collator, batch_size=3, seed=5, start_batch=30
    )
    got = batches(stream, 2)
    assert [b.index for b in got] == [30, 31] and CountingJsonSource.parsed == 6  # not 96


def test_tiny_trainer_stream_is_make_batch(collator):
    """ShapesVQA scenes through 2 workers, started at a step as the tiny trainer resumes:
    batch b is `make_batch` of scenes `offset + b * batch_size ...`."""
    from reference_batch import make_batch

    tok, config = word_level()
    stream = ConversationStream(ShapesSceneSource(11, offset=100), collator, batch_size=4, shuffle=False, start_batch=3)
    got = batches(stream, 3, workers=2)
    assert [b.index for b in got] == [3, 4, 5] and [b.worker for b in got] == [0, 1, 0]  # in order from the start
    for batch in got:
        want = make_batch(tok, config, 11, list(range(100 + 4 * batch.index, 104 + 4 * batch.index)))
        assert all(torch.equal(batch.inputs[k], want[k]) for k in want)


def test_summary_order_check_round_trip_and_reduce(data, collator):
    got = batches(ConversationStream(source(data), collator, batch_size=8, epochs=1))
    summary = DataSummary()
    with pytest.raises(RuntimeError, match="batch 1 arrived where batch 0 was due"):
        summary.add(got[1])
    summary.add(got[0])
    saved = summary.to_dict()
    assert DataSummary.from_dict(saved) == summary
    assert DataSummary.from_dict(saved, counts=False) == DataSummary(next_batch=1)
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        assert DataSummary.from_dict(saved).reduced() == summary
        stream = ConversationStream(source(data), collator, batch_size=8)
        assert (stream.rank, stream.world_size) == (0, 1)
    finally:
        dist.destroy_process_group()


def test_all_bad_data_stops_after_one_pass(tmp_path, collator):
    rows, images = llava_dataset(tmp_path, 0)
    write_jsonl(tmp_path / "d.jsonl", [dict(r, image="missing.png") for r in llava_dataset(tmp_path, 3)[0]])
    stream = ConversationStream(LlavaJsonSource(tmp_path / "d.jsonl", tmp_path / "images"), collator, batch_size=2)
    summary = DataSummary()
    with pytest.raises(CLIVizError, match="no usable sample in a whole pass"):
        for batch in make_loader(stream):
            assert batch.size == 0 and batch.inputs == {} and batch.tokens == 0
            summary.add(batch)
    assert summary.skipped == {"missing_image": 3}  # each bad row once, though the pass went into epoch 1
