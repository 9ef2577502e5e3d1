"""Where conversations come from: LLaVA JSON/JSONL, Parquet/Arrow tables, ShapesVQA folders and scenes.

Every source splits reading in two so that sharding and resuming stay cheap:
`raw_rows(start)` walks the rows in file order without parsing them (a JSONL line, a reference
into an Arrow record batch, a scene index) and can begin at row `start`; `parse(raw, index)` turns
one raw row into a `Conversation` or raises `BadRow`. A loader worker reads every raw row but
parses only the rows it owns. Nothing reads a whole file into memory:

- a JSONL file is read line by line;
- a top-level JSON list is parsed incrementally with `ijson` (the `datasets` JSON builder, even
  with `streaming=True`, loads a file that starts with `[` in one piece);
- Parquet and Arrow files are scanned record batch by record batch with pyarrow, the same files
  `datasets` writes (`to_parquet`, `save_to_disk`) and the hub serves. pyarrow rather than
  `datasets.load_dataset(..., streaming=True)` because the loader needs row-level sharding (the
  `datasets` streaming split by worker is per file: one file, one busy worker), a cheap start at
  row N (row-group metadata says where it lies) and images decoded by the project's safe loader
  (`cliviz.inputs.load_image`) rather than by `datasets`' own `PIL.Image.open`.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ijson
import pyarrow as pa
import pyarrow.parquet as pq

from cliviz.data.conversations import (
    IMAGE_MARKER,
    BadRow,
    Conversation,
    ImageRef,
    checked_turns,
    conversation_from_llava_row,
)
from cliviz.data.rows import TooDeep, bounded_list_items, image_path, json_row, text
from cliviz.errors import CLIVizError

TABLE_SUFFIXES = {".parquet": "parquet", ".arrow": "arrow", ".feather": "arrow", ".ipc": "arrow"}


class ConversationSource:
    """Rows in a fixed order; subclasses define `raw_rows` and `parse`."""

    infinite = False  # a generated source never ends: the loader never counts its rows

    def num_rows(self) -> int | None:
        """The number of rows if known without reading them all (table metadata), else None."""
        return None

    def count_rows(self) -> int:
        known = self.num_rows()
        return known if known is not None else sum(1 for _ in self.raw_rows())

    def raw_rows(self, start: int = 0) -> Iterator[Any]:
        raise NotImplementedError

    def parse(self, raw: Any, index: int) -> Conversation:
        raise NotImplementedError

    def __iter__(self) -> Iterator[Conversation | BadRow]:
        """Every row once, parsed (a convenience for inspection; training goes through the loader)."""
        for index, raw in enumerate(self.raw_rows()):
            try:
                yield self.parse(raw, index)
            except BadRow as bad:
                yield bad


class _Malformed:
    """Stands for the unreadable rest of a JSON list: one bad row, after which the list ends."""

    def __init__(self, detail: str, reason: str = "malformed_json") -> None:
        self.detail = detail
        self.reason = reason


def _resolver(root: Path, allow_absolute: bool = False):
    """Image field -> ImageRef: a path inside `root` (see `rows.image_path`), bytes, or a `datasets`
    Image struct; None when the row names no image; `BadRow` for a name that leaves `root`."""

    def resolve(value: Any) -> ImageRef | None:
        if isinstance(value, dict):  # datasets' Image feature: {"bytes": ..., "path": ...}
            value = value.get("bytes") or value.get("path")
        if isinstance(value, (bytes, bytearray)):
            return bytes(value) if value else None
        if isinstance(value, str) and value.strip():
            return image_path(value, root, allow_absolute)
        if value is not None and not isinstance(value, str):
            raise BadRow("malformed_row", f"the image is {type(value).__name__}")
        return None

    return resolve


class LlavaJsonSource(ConversationSource):
    """LLaVA instruction data: a JSON list or JSONL of `{"id", "image", "conversations": [...]}`.

    `image` paths are relative to `image_folder` (LLaVA's `--image_folder`), by default the data
    file's own folder. Blank JSONL lines are not rows.
    """

    def __init__(self, path: str | Path, image_folder: str | Path | None = None, allow_absolute: bool = False) -> None:
        self.path = Path(path)
        self.resolve = _resolver(Path(image_folder) if image_folder else self.path.parent, allow_absolute)
        with open(self.path, "rb") as f:
            head = f.read(4096).removeprefix(b"\xef\xbb\xbf").lstrip()
        self.is_list = head.startswith(b"[")

    def raw_rows(self, start: int = 0) -> Iterator[Any]:
        rows = self._list_items() if self.is_list else self._lines()
        return itertools.islice(rows, start, None)

    def _list_items(self) -> Iterator[Any]:
        with open(self.path, "rb") as f:
            if f.read(3) != b"\xef\xbb\xbf":
                f.seek(0)
            try:
                yield from bounded_list_items(f)
            except (ijson.JSONError, ValueError) as err:  # nothing after a syntax error can be trusted
                yield _Malformed(str(err).splitlines()[0] if str(err) else type(err).__name__)

    def _lines(self) -> Iterator[bytes]:
        with open(self.path, "rb") as f:
            for line in f:
                if line.strip():
                    yield line

    def parse(self, raw: Any, index: int) -> Conversation:
        if isinstance(raw, _Malformed):
            raise BadRow("malformed_json", raw.detail)
        if isinstance(raw, TooDeep):
            raise BadRow("too_deep")
        if isinstance(raw, bytes):
            raw = json_row(raw)
        return conversation_from_llava_row(raw, f"{self.path.name}:{index}", self.resolve)


class ArrowSource(ConversationSource):
    """Parquet or Arrow IPC tables with LLaVA's columns: `conversations` (a list of `{from, value}`
    structs, or that list as a JSON string), `image` (a path, bytes, or a `datasets` Image struct)
    and optionally `id`.

    `path` is a file, a `datasets.save_to_disk` folder (its `state.json` lists the Arrow files in
    order) or a folder of `*.parquet` / `*.arrow` files (sorted by path, e.g. hub `data/train-*`).
    """

    COLUMNS = ("id", "image", "conversations")

    def __init__(
        self,
        path: str | Path,
        image_folder: str | Path | None = None,
        batch_rows: int = 256,
        allow_absolute: bool = False,
    ) -> None:
        self.path = Path(path)
        self.files = table_files(self.path)
        self.batch_rows = batch_rows
        names = self._schema(self.files[0]).names
        if "conversations" not in names:
            raise CLIVizError(f"{self.files[0]} has no 'conversations' column (columns: {', '.join(names)})")
        self.columns = [c for c in self.COLUMNS if c in names]
        root = Path(image_folder) if image_folder else (self.path if self.path.is_dir() else self.path.parent)
        self.resolve = _resolver(root, allow_absolute)
        self._sizes: list[int] | None = None

    def _schema(self, file: Path) -> pa.Schema:
        try:
            if file.suffix == ".parquet":
                return pq.ParquetFile(file).schema_arrow
            return _ipc_reader(file).schema
        except (pa.ArrowInvalid, OSError) as err:
            raise CLIVizError(f"not a readable {file.suffix[1:]} file: {file} ({err})") from None

    def file_sizes(self) -> list[int]:
        """Rows per file: Parquet metadata, or a pass over the memory-mapped Arrow batches (no copy)."""
        if self._sizes is None:
            self._sizes = [
                pq.ParquetFile(f).metadata.num_rows
                if f.suffix == ".parquet"
                else sum(b.num_rows for b in _ipc_batches(f))
                for f in self.files
            ]
        return self._sizes

    def num_rows(self) -> int:
        return sum(self.file_sizes())

    def raw_rows(self, start: int = 0) -> Iterator[tuple[pa.RecordBatch, int]]:
        for file, size in zip(self.files, self.file_sizes()):
            if start >= size:
                start -= size
                continue
            for batch in self._batches(file, start):
                for i in range(batch.num_rows):
                    yield batch, i  # a reference: the row is converted only if parsed
            start = 0

    def _batches(self, file: Path, start: int) -> Iterator[pa.RecordBatch]:
        """Record batches of `file` from row `start` on, skipping whole row groups / batches unread."""
        if file.suffix == ".parquet":
            pf = pq.ParquetFile(file)
            first = 0
            while first < pf.num_row_groups and start >= pf.metadata.row_group(first).num_rows:
                start -= pf.metadata.row_group(first).num_rows
                first += 1
            groups = list(range(first, pf.num_row_groups))
            batches = (
                pf.iter_batches(batch_size=self.batch_rows, row_groups=groups, columns=self.columns) if groups else []
            )
        else:
            batches = (b.select(self.columns) for b in _ipc_batches(file))
        for batch in batches:
            if start >= batch.num_rows:
                start -= batch.num_rows
                continue
            yield batch.slice(start) if start else batch
            start = 0

    def parse(self, raw: tuple[pa.RecordBatch, int], index: int) -> Conversation:
        batch, i = raw
        row = batch.slice(i, 1).to_pylist()[0]
        if isinstance(row.get("conversations"), str):
            row["conversations"] = json_row(row["conversations"])
        return conversation_from_llava_row(row, f"{self.path.name}:{index}", self.resolve)


def table_files(path: Path) -> list[Path]:
    """The Parquet/Arrow files behind `path`, in reading order."""
    if path.is_file():
        if path.suffix not in TABLE_SUFFIXES:
            raise CLIVizError(f"not a Parquet or Arrow file: {path}")
        return [path]
    state = path / "state.json"
    if state.is_file():  # datasets.save_to_disk
        try:
            return [path / f["filename"] for f in json.loads(state.read_text())["_data_files"]]
        except (ValueError, KeyError, TypeError):
            raise CLIVizError(f"cannot read the datasets state file {state}") from None
    for suffix in (".parquet", ".arrow"):
        files = sorted(path.rglob(f"*{suffix}"))
        if files:
            return files
    raise CLIVizError(f"no .parquet or .arrow files in {path}")


def _ipc_reader(file: Path):
    """Arrow IPC file format (random access) or stream format (what `datasets` writes), memory-mapped."""
    source = pa.memory_map(str(file))
    try:
        return pa.ipc.open_file(source)
    except pa.ArrowInvalid:
        return pa.ipc.open_stream(pa.memory_map(str(file)))


def _ipc_batches(file: Path) -> Iterator[pa.RecordBatch]:
    reader = _ipc_reader(file)
    if isinstance(reader, pa.ipc.RecordBatchFileReader):
        return (reader.get_batch(i) for i in range(reader.num_record_batches))
    return iter(reader)


class ShapesFolderSource(ConversationSource):
    """A `cliviz data` folder (`images/*.png` + `samples.jsonl`): one conversation per image, its
    questions as turns. Rows about the same image must be consecutive (as `cliviz data` writes them);
    a raw row is the group of lines about one image."""

    def __init__(self, folder: str | Path, allow_absolute: bool = False) -> None:
        self.folder = Path(folder)
        self.allow_absolute = allow_absolute
        self.samples = self.folder / "samples.jsonl"
        if not self.samples.is_file():
            raise CLIVizError(f"not a ShapesVQA folder (no samples.jsonl): {folder}")

    def raw_rows(self, start: int = 0) -> Iterator[list[Any]]:
        return itertools.islice(self._groups(), start, None)

    def _groups(self) -> Iterator[list[Any]]:
        group: list[Any] = []
        key: Any = None
        with open(self.samples, "rb") as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    row = json_row(line)
                    image = row.get("image") if isinstance(row, dict) else None
                except BadRow as bad:
                    row, image = _Malformed(str(bad), bad.reason), None
                if group and (image is None or image != key):
                    yield group
                    group = []
                group.append(row)
                key = image
        if group:
            yield group

    def parse(self, raw: list[Any], index: int) -> Conversation:
        bad = next((row for row in raw if isinstance(row, _Malformed)), None)
        if bad is not None:
            raise BadRow(bad.reason, bad.detail)
        turns = []
        for row in raw:
            if not isinstance(row, dict):
                raise BadRow("malformed_row", "a row is not an object")
            question, answer = text(row.get("question"), "question"), text(row.get("answer"), "answer")
            text(row.get("image"), "image")
            turns += [("user", question), ("assistant", answer)]
        turns[0] = ("user", f"{IMAGE_MARKER}\n{turns[0][1]}")
        image = image_path(raw[0]["image"], self.folder, self.allow_absolute)
        return Conversation(Path(raw[0]["image"]).stem, image, checked_turns(turns))


class ShapesSceneSource(ConversationSource):
    """Generated ShapesVQA scenes `offset, offset + 1, ...` of stream `seed`: the tiny trainer's data.

    Row i is scene `offset + i` with every question about it as turns (plus `extra_questions`
    per type, as `make_batch` adds them) and its per-patch labels in `extra`. `pool` cycles over
    that many scenes (epochs over a fixed set, whose frozen vision states a trainer can cache);
    `scene_labels` adds the image-level targets of a vision tower's semantic pretraining
    (`cliviz.data.scenes.scene_labels`).
    """

    infinite = True

    def __init__(
        self,
        seed: int,
        offset: int = 0,
        extra_questions: dict[str, int] | None = None,
        patch: int = 8,
        pool: int | None = None,
        scene_labels: bool = False,
    ) -> None:
        self.seed, self.offset, self.extra_questions, self.patch = seed, offset, extra_questions, patch
        self.pool, self.scene_labels = pool, scene_labels

    def raw_rows(self, start: int = 0) -> Iterator[int]:
        if self.pool:
            return (self.offset + i % self.pool for i in itertools.count(start))
        return itertools.count(self.offset + start)

    def parse(self, raw: int, index: int) -> Conversation:
        import numpy as np

        from cliviz.data.dataset import scene_with_questions
        from cliviz.data.scenes import patch_labels

        scene, qas = scene_with_questions(self.seed, raw)
        if self.extra_questions:
            from cliviz.data.questions import training_questions

            qas = training_questions(scene, qas, self.extra_questions, np.random.default_rng([self.seed, raw, 1]))
        turns = [turn for qa in qas for turn in (("user", qa.question), ("assistant", qa.answer))]
        extra = {name: grid.reshape(-1) for name, grid in patch_labels(scene, self.patch).items()}
        if self.scene_labels:
            from cliviz.data.scenes import scene_labels

            extra |= scene_labels(scene)
        return Conversation(f"{self.seed}-{raw:06d}", scene.image, tuple(turns), extra)


def open_source(
    data: str | Path, image_folder: str | Path | None = None, allow_absolute: bool = False
) -> ConversationSource:
    """The source for `--data` (and `--image-folder`): picked by what the path is.

    A folder with `samples.jsonl` is ShapesVQA; `.json`/`.jsonl` is LLaVA instruction data;
    `.parquet`/`.arrow` files or folders of them are tables. Raises `CLIVizError` otherwise.
    """
    path = Path(data)
    if not path.exists():
        raise CLIVizError(f"data not found: {path}")
    if path.is_file() and path.stat().st_size == 0:
        raise CLIVizError(f"the data file is empty: {path}")
    if image_folder is not None and not Path(image_folder).is_dir():
        raise CLIVizError(f"image folder not found: {image_folder}")
    if path.is_dir() and (path / "samples.jsonl").is_file():
        return ShapesFolderSource(path, allow_absolute)
    if path.is_file() and path.suffix.lower() in (".json", ".jsonl"):
        return LlavaJsonSource(path, image_folder, allow_absolute)
    if path.is_dir() or path.suffix in TABLE_SUFFIXES:
        return ArrowSource(path, image_folder, allow_absolute=allow_absolute)
    raise CLIVizError(f"unknown data format: {path} (want .json, .jsonl, .parquet, .arrow or a ShapesVQA folder)")
