"""Batches of conversations for training: sharded over DataLoader workers and distributed ranks,
in a seeded order, resumable at any batch, with bad rows counted rather than fatal.

The stream of positions. Rows are read in file order, epoch after epoch; within each window of
`shuffle_window` consecutive rows the order is permuted by a generator seeded with
`(seed, epoch, window)`, so the order is a pure function of the data and the seed (a streaming
approximation of a full shuffle that needs memory for one window only). Global position g is the
g-th row of that stream, counting across epochs.

Who gets which position. Positions are dealt in global batches of `batch_size * world_size`:
global batch b holds positions `[b * batch_size * world_size, (b + 1) * batch_size * world_size)`
and rank r takes the r-th slice of `batch_size` of it, as its batch b. So every rank's batch b
together is exactly one batch of `batch_size * world_size` of a single process — the same samples
at every step whatever the number of ranks. On a rank, batch b is built by DataLoader worker
`(b - start_batch) % num_workers`; torch's DataLoader takes batches from its workers in turn, so the
trainer receives batches `start_batch, start_batch + 1, ...` in order (`DataSummary.add` checks).
Each worker reads every raw row (cheap: a JSONL line, an Arrow row reference) but parses, loads
and tokenises only the rows of its own batches.

Bad rows. A batch is the usable samples among its `batch_size` positions: a bad row leaves the
batch one smaller (a batch can be empty: `Batch.size == 0`) and is counted in `Batch.skipped` in the
first epoch only, so summing `Batch.skipped` over the batches a run consumed (`DataSummary`) counts
every bad row of the data once, however many epochs the run makes. `require_usable_rows` refuses,
before a run writes anything, data with no row at all or no usable one.

Resuming exactly. Batch b depends only on (data, seed, shuffle settings, batch_size, world_size,
max_length) and b — not on the number of workers, which may change between runs. Starting a
stream at `start_batch=b` yields the same batches b, b+1, ... as the uninterrupted run, bit for
bit, after skipping the first b batches cheaply: earlier shuffle windows are not read at all
(Parquet starts at the right row group; JSONL/JSON lines before the window are read but not
parsed); earlier positions in the window are read, not parsed. `DataSummary.next_batch` is the
number to save.
"""

from __future__ import annotations

import itertools
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from cliviz.data.collate import IGNORE, ConversationCollator
from cliviz.data.conversations import REASONS, BadRow
from cliviz.data.sources import ConversationSource
from cliviz.errors import CLIVizError


@dataclass
class Batch:
    """Batch `index` of this rank: model `inputs` (`input_ids`, `attention_mask`, `labels` `[B, T]`,
    the image encoder's tensors, `aux_*`), empty when none of its rows was usable."""

    index: int
    epoch: int  # epoch of the batch's first position
    worker: int  # the DataLoader worker that built it (0 in-process)
    inputs: dict[str, torch.Tensor]
    ids: list[str]
    skipped: dict[str, int]
    truncated: int

    @property
    def size(self) -> int:
        return len(self.ids)

    @property
    def tokens(self) -> int:
        """Non-padding tokens (for tokens/s)."""
        return int(self.inputs["attention_mask"].sum()) if self.inputs else 0

    @property
    def label_tokens(self) -> int:
        """Tokens the loss is computed on."""
        return int((self.inputs["labels"] != IGNORE).sum()) if self.inputs else 0

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        moved = {k: v.to(device, non_blocking=non_blocking) for k, v in self.inputs.items()}
        return Batch(self.index, self.epoch, self.worker, moved, self.ids, self.skipped, self.truncated)

    def pin_memory(self) -> Batch:
        """Called by the DataLoader's `pin_memory=True` (it pins any object with this method)."""
        pinned = {k: v.pin_memory() for k, v in self.inputs.items()}
        return Batch(self.index, self.epoch, self.worker, pinned, self.ids, self.skipped, self.truncated)


def distributed_rank() -> tuple[int, int]:
    """(rank, world size) of the initialised default process group, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class ConversationStream(IterableDataset):
    """Batches of collated conversations from `source` (see the module docstring for the layout).

    `epochs=None` goes on forever (a trainer stops after its steps; epoch e reshuffles with e).
    `rank`/`world_size` default to `torch.distributed`'s when it is initialised — read here, in the
    main process, so forked workers need no process group.

    Example (the bundled model on generated ShapesVQA scenes; `open_source("llava.json",
    image_folder="images/")` reads LLaVA instruction data the same way)::

        from cliviz.data.collate import collator_for_model
        from cliviz.data.sources import ShapesSceneSource

        source = ShapesSceneSource(seed=5)
        collator = collator_for_model(model.config, tokenizer, max_length=2048)
        summary = DataSummary()  # DataSummary.from_dict(saved) to resume
        stream = ConversationStream(source, collator, batch_size=4, seed=0, start_batch=summary.next_batch)
        for batch in itertools.islice(make_loader(stream, num_workers=0), 2):
            summary.add(batch)  # counts bad rows, checks the order, raises if nothing is usable
            if batch.size:  # a batch whose rows were all bad is empty
                inputs = batch.inputs  # input_ids, attention_mask, labels [B, T], pixel_values, ...
                logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                               pixel_values=inputs["pixel_values"]).logits
                # cross-entropy of logits[:, :-1] against inputs["labels"][:, 1:], ignore_index=-100
        print(summary.reduced().describe())
    """

    def __init__(
        self,
        source: ConversationSource,
        collator: ConversationCollator,
        batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        shuffle_window: int = 1024,
        epochs: int | None = None,
        start_batch: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        super().__init__()
        detected = distributed_rank()
        self.rank = detected[0] if rank is None else rank
        self.world_size = detected[1] if world_size is None else world_size
        if batch_size < 1 or shuffle_window < 1 or start_batch < 0 or not 0 <= self.rank < self.world_size:
            raise ValueError(
                f"bad stream layout: batch_size={batch_size}, shuffle_window={shuffle_window}, "
                f"start_batch={start_batch}, rank={self.rank}, world_size={self.world_size}"
            )
        self.source, self.collator, self.batch_size = source, collator, batch_size
        self.seed, self.shuffle, self.window = seed, shuffle, shuffle_window
        self.epochs, self.start_batch = epochs, start_batch

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        current, epoch, conversations, epochs = None, 0, [], []
        skipped: Counter[str] = Counter()
        end: dict[str, int] = {}
        for index, row_epoch, row, raw in self.positions(worker, n_workers, end):
            if current is not None and index != current:
                yield self._batch(current, epoch, worker, conversations, skipped, epochs)
                conversations, epochs, skipped = [], [], Counter()
            if index != current:
                current, epoch = index, row_epoch
            try:
                conversations.append(self.source.parse(raw, row))
                epochs.append(row_epoch)
            except BadRow as bad:
                if row_epoch == 0:  # a bad row is counted once, not once per epoch
                    skipped[bad.reason] += 1
        if current is not None:
            yield self._batch(current, epoch, worker, conversations, skipped, epochs)
        if "positions" in end:  # finite epochs: every rank ends on the same batch (DDP steps in lockstep)
            last = (end["positions"] - 1) // (self.batch_size * self.world_size)
            first = self.start_batch if current is None else current + 1
            for index in range(first, last + 1):
                if (index - self.start_batch) % n_workers == worker:
                    yield self._batch(index, end["epochs"] - 1, worker, [], Counter())

    def _batch(
        self, index: int, epoch: int, worker: int, conversations: list, skipped: Counter, epochs: list | None = None
    ) -> Batch:
        collated = self.collator(conversations) if conversations else None
        if collated is not None:
            first = (
                collated.skipped_rows if epochs is None else [(p, r) for p, r in collated.skipped_rows if not epochs[p]]
            )
            skipped = skipped + Counter(reason for _, reason in first)
        inputs = collated.inputs if collated is not None and collated.inputs is not None else {}
        ids, truncated = (collated.ids, collated.truncated) if collated is not None else ([], 0)
        return Batch(index, epoch, worker, inputs, ids, dict(skipped), truncated)

    def owner(self, g: int, worker: int, n_workers: int) -> int | None:
        """This rank's batch index for global position `g` if `worker` builds it, else None."""
        index, slot = divmod(g, self.batch_size * self.world_size)
        mine = slot // self.batch_size == self.rank and index >= self.start_batch
        if not mine or (index - self.start_batch) % n_workers != worker:
            return None
        return index

    def order(self, epoch: int, window: int, size: int) -> np.ndarray:
        """Row offsets within a window, in stream order."""
        if not self.shuffle:
            return np.arange(size)
        return np.random.default_rng([self.seed, epoch, window]).permutation(size)

    def positions(self, worker: int, n_workers: int, end: dict | None = None) -> Iterator[tuple[int, int, int, Any]]:
        """`(batch index, epoch, row index, raw row)` of every position `worker` owns, in stream order.

        When a finite stream ends, `end` receives its length in positions and epochs.
        """
        first = self.start_batch * self.batch_size * self.world_size
        n = None if self.source.infinite else self.source.num_rows()
        if n is None and first > 0 and not self.source.infinite:
            n = self.source.count_rows()  # one cheap pass to find the epoch to start in
        epoch, offset = divmod(first, n) if n else (0, first)
        while n != 0 and (self.epochs is None or epoch < self.epochs):
            base = epoch * n if n else 0  # global position of this epoch's first row
            window = offset // self.window
            rows = self.source.raw_rows(window * self.window)
            while n is None or window * self.window < n:
                start = window * self.window
                size = None if n is None else min(self.window, n - start)
                owned, n_read = self._window(rows, epoch, window, base + start, size, worker, n_workers)
                for index, row_offset, raw in owned:
                    yield index, epoch, start + row_offset, raw
                if n_read < (size or self.window):  # end of the file: now its length is known
                    n = start + n_read
                    break
                window += 1
            epoch, offset = epoch + 1, 0
        if end is not None and self.epochs is not None:
            end.update(positions=self.epochs * (n or 0), epochs=self.epochs)

    def _window(
        self, rows: Iterator, epoch: int, window: int, g0: int, size: int | None, worker: int, n_workers: int
    ) -> tuple[list[tuple[int, int, Any]], int]:
        """`(batch index, row offset, raw row)` owned in one window, in stream order, and the rows read.

        With the window's size known (table metadata, or after a first pass) only the owned raw rows
        are kept; otherwise the window is buffered whole (text rows: JSONL lines or JSON objects).
        """
        if size is None:
            raws = list(itertools.islice(rows, self.window))
            order = self.order(epoch, window, len(raws))
            owned = []
            for t in range(len(raws)):
                index = self.owner(g0 + t, worker, n_workers)
                if index is not None:
                    owned.append((index, int(order[t]), raws[int(order[t])]))
            return owned, len(raws)
        order = self.order(epoch, window, size)
        wanted = {}  # row offset -> (position in the window, batch index)
        for t in range(size):
            index = self.owner(g0 + t, worker, n_workers)
            if index is not None:
                wanted[int(order[t])] = (t, index)
        picked, n_read = {}, 0
        for j, raw in enumerate(itertools.islice(rows, size)):
            n_read += 1
            if j in wanted:
                picked[j] = raw
        return [(wanted[j][1], j, picked[j]) for j in sorted(picked, key=lambda j: wanted[j][0])], n_read


@dataclass
class DataSummary:
    """What a run's data did, summed over the batches it consumed; `next_batch` is where to resume.

    Feed it every batch in order (`add`); save `to_dict()` with the training state and rebuild it
    with `from_dict` to resume (start the stream at `next_batch`). Under DDP each rank keeps its
    own; `reduced()` sums them (a collective: every rank must call it).
    """

    next_batch: int = 0
    batches: int = 0
    samples: int = 0
    tokens: int = 0
    label_tokens: int = 0
    truncated: int = 0
    skipped: Counter = field(default_factory=Counter)

    def add(self, batch: Batch) -> None:
        if batch.index != self.next_batch:
            raise RuntimeError(f"data batch {batch.index} arrived where batch {self.next_batch} was due")
        self.next_batch += 1
        self.batches += 1
        self.samples += batch.size
        self.tokens += batch.tokens
        self.label_tokens += batch.label_tokens
        self.truncated += batch.truncated
        self.skipped.update(batch.skipped)
        if batch.epoch >= 1 and self.samples == 0:
            raise CLIVizError(f"no usable sample in a whole pass over the data ({self.describe()})")

    @property
    def skipped_total(self) -> int:
        return sum(self.skipped.values())

    def to_dict(self) -> dict:
        return asdict(self) | {"skipped": dict(sorted(self.skipped.items()))}

    @classmethod
    def from_dict(cls, data: dict, counts: bool = True) -> DataSummary:
        """A saved summary; `counts=False` keeps only `next_batch` (DDP ranks other than the one
        that saved the reduced totals, so that totals are not counted twice)."""
        if not counts:
            return cls(next_batch=int(data["next_batch"]))
        return cls(**{k: v for k, v in data.items() if k != "skipped"}, skipped=Counter(data.get("skipped", {})))

    def reduced(self) -> DataSummary:
        """Totals over all ranks when `torch.distributed` is initialised (else a copy)."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return DataSummary.from_dict(self.to_dict())
        names = ("batches", "samples", "tokens", "label_tokens", "truncated")
        counts = [getattr(self, n) for n in names] + [self.skipped.get(r, 0) for r in REASONS]
        values = torch.tensor(counts, dtype=torch.float64)
        torch.distributed.all_reduce(values)
        totals = [int(v) for v in values.tolist()]
        skipped = Counter({r: v for r, v in zip(REASONS, totals[len(names) :]) if v})
        batches, samples, tokens, label_tokens, truncated = totals[: len(names)]
        return DataSummary(self.next_batch, batches, samples, tokens, label_tokens, truncated, skipped=skipped)

    def describe(self) -> str:
        """One line for the end of a run, e.g. `data: 412 samples in 52 batches ...; skipped 3 rows (...)`."""
        text = f"data: {self.samples:,} samples in {self.batches:,} batches ({self.label_tokens:,} answer tokens)"
        if self.skipped:
            reasons = ", ".join(f"{name} {count:,}" for name, count in self.skipped.most_common())
            text += f"; skipped {self.skipped_total:,} rows ({reasons})"
        if self.truncated:
            text += f"; {self.truncated:,} conversations cut to the maximum length"
        return text


def require_usable_rows(source: ConversationSource, collator: ConversationCollator, what: str) -> None:
    """CLIVizError unless `source` holds a row that becomes a training sample: read in file order up to
    the first usable one (the first row, on good data), so a run on an empty file, a list `[]`, or
    rows whose images all lie elsewhere (a typo in the image folder) fails before it writes anything.
    The error names the commonest reasons the rows were skipped."""
    from cliviz.data.rows import reason_counts_text

    if source.infinite:
        return
    skipped: Counter = Counter()
    rows = 0
    for index, raw in enumerate(source.raw_rows()):
        rows += 1
        try:
            conversation = source.parse(raw, index)
        except BadRow as bad:
            skipped[bad.reason] += 1
            continue
        collated = collator([conversation])
        if collated.inputs is not None:
            return
        skipped.update(collated.skipped)
    if rows == 0:
        raise CLIVizError(f"no training rows in {what}: nothing to train on")
    raise CLIVizError(
        f"no usable training row in {what}: all {rows:,} rows skipped ({reason_counts_text(skipped)}); "
        "nothing was trained or written"
    )


def make_loader(
    stream: ConversationStream, num_workers: int = 0, pin_memory: bool = False, prefetch_factor: int = 2
) -> DataLoader:
    """A torch DataLoader over `stream` with `num_workers` worker processes (0: in-process).

    The stream yields whole batches (`batch_size=None` here). Workers are forked after the
    tokenizer may have been used, so the tokenizers library's own thread pool is turned off in
    them (it would warn and could deadlock otherwise).
    """
    if num_workers:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return DataLoader(
        stream,
        batch_size=None,
        num_workers=num_workers,
        pin_memory=pin_memory,
        prefetch_factor=prefetch_factor if num_workers else None,
        persistent_workers=False,
    )
