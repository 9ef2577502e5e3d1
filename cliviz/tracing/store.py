"""Where trace sets live on disk: a Parquet dataset (a folder of part files) or one Parquet file.

A set that grows is a **folder** of part files, one per append (a sweep's chunk, a `cliviz trace
--out` call) and per rank, plus a small manifest ``_cliviz.json``::

    traces.parquet/                     (any folder name; ".parquet" keeps it recognisable)
        _cliviz.json                    schema version, the set's model (or "pooled") and compaction
        part-00000001.parquet           one append of one process
        part-00000002-r0.parquet        one chunk of rank 0 of a torchrun sweep
        part-00000002-r1.parquet        ... of rank 1

An append writes only its new rows, as a new part (a hidden temporary renamed into place), so its
cost does not depend on the size of the set and a kill loses at most the part in flight. Parts are
read in (sequence, rank) order. Names that start with "." or "_" are not data, as in Spark, DuckDB,
pyarrow and Polars, which all read the folder as one table (see the README). A single Parquet
file (`write_traces`) still reads and appends (appending to a single file rewrites it: keep single
files for a handful of traces).

Every read checks each part before using it: its schema version and compaction from the footer,
sizes declared in the footer bounded before anything is allocated (`MAX_ROW_GROUP_BYTES`,
`MAX_TEXT_BYTES_PER_ROW`), then each row group's rows (`table_checks.check_table`). Readers stream
row group by row group (`iter_tables`), so memory depends on the shapes of one row group, never on
the number of traces; a `Filter` (model, question type, sample ids) reads its few meta columns
first and skips row groups with no matching row without decoding their tensors.

One model per set: the first append records the model (`config_hash`) in the manifest, and traces of
another model are refused unless the set was started with ``pool=True``.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from cliviz import __version__
from cliviz.atomic import atomic_file, atomic_write_bytes, exclusive_writer
from cliviz.errors import CLIVizError
from cliviz.tracing.codec import ADDED_IN_2, ARROW_SCHEMA, COMPACT_KEY, META_TYPES, SCHEMA_VERSION_KEY
from cliviz.tracing.compact import Compact
from cliviz.tracing.schema import READABLE_SCHEMA_VERSIONS, SCHEMA_VERSION
from cliviz.tracing.table_checks import check_table

MANIFEST = "_cliviz.json"
APPEND_LOCK_WAIT_S = 120.0  # another process's append takes seconds; a running sweep holds its set far longer
ROW_GROUP_BYTES = 32 * 2**20  # target uncompressed size of a row group: a reader holds about one at a time
MAX_ROW_GROUP_ROWS = 512
MAX_ROW_GROUP_BYTES = 2**31  # a footer declaring more than this per row group is refused before reading
MAX_TEXT_BYTES_PER_ROW = 2**20  # meta text (question, answer, model...) over 1 MiB per trace is not a real trace
_META_TEXT = tuple(name for name, t in META_TYPES.items() if t == pa.string())
_PART = re.compile(r"^part-(\d+)(?:-r(\d+))?\.parquet$")


# ----------------------------------------------------------------------------------------- layout


def is_dataset(path: str | os.PathLike) -> bool:
    return Path(path).is_dir()


def part_files(path: str | os.PathLike) -> list[Path]:
    """The Parquet files that make up the set at `path`, in read order; CLIVizError when there is none."""
    p = Path(path)
    if not p.exists():
        raise CLIVizError(f"trace file {p} does not exist")
    if p.is_file():
        return [p]
    if not p.is_dir():
        raise CLIVizError(f"trace file {p} is not a file or folder")
    found = visible_parquet(p)
    if not found and not (p / MANIFEST).exists():
        raise CLIVizError(f"trace file {p} is not a file, nor a trace set folder (no part files, no {MANIFEST})")
    return sorted(found, key=_part_key)


def visible_parquet(folder: Path) -> list[Path]:
    """The Parquet files of a set folder, without hidden temporaries, locks or the manifest."""
    return [q for q in folder.iterdir() if q.suffix == ".parquet" and not q.name.startswith((".", "_")) and q.is_file()]


def _part_key(p: Path) -> tuple:
    m = _PART.match(p.name)
    return (0, int(m.group(1)), int(m.group(2) or -1), p.name) if m else (1, 0, 0, p.name)


def _next_part(folder: Path, rank: int | None) -> Path:
    """The next part name: one past the highest sequence number (of this rank, for a rank)."""
    seqs = [
        int(m.group(1))
        for q in folder.iterdir()
        if (m := _PART.match(q.name)) and (rank is None or m.group(2) is not None and int(m.group(2)) == rank)
    ]
    seq = max(seqs, default=0) + 1
    return folder / (f"part-{seq:08d}.parquet" if rank is None else f"part-{seq:08d}-r{rank}.parquet")


def check_writable_set(path: str | os.PathLike) -> None:
    """Before any model work: the set at `path` can take an append (an existing set folder or file, or
    a new path in an existing, writable folder); CLIVizError with one line otherwise."""
    p = Path(path)
    if p.is_dir():
        if not (p / MANIFEST).exists() and not any(p.glob("part-*.parquet")):
            raise CLIVizError(f"trace set {p} is a folder that is not a trace set; choose a new path for the set")
        if not os.access(p, os.W_OK):
            raise CLIVizError(f"cannot write trace set {p}: permission denied")
        return
    parent = p.absolute().parent
    if not parent.is_dir():
        raise CLIVizError(f"cannot write trace set {p}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise CLIVizError(f"cannot write trace set {p}: permission denied")


def remove_stale_parts(folder: str | os.PathLike) -> list[Path]:
    """Remove the hidden temporaries that a kill mid-append left in a set's folder (call while no one
    else writes to it, e.g. at the start of a sweep that holds the set's lock)."""
    f = Path(folder)
    if not f.is_dir():
        return []
    removed = []
    for q in f.iterdir():
        if q.name.startswith(".part-") and q.name.endswith(".tmp"):
            try:
                q.unlink()
                removed.append(q)
            except OSError:
                pass
    return removed


# --------------------------------------------------------------------------------------- manifest


@dataclass(frozen=True)
class Manifest:
    """What a set folder promises: its model (None when pooled) and its compaction."""

    compact: Compact
    config_hash: str | None
    model: str | None
    pooled: bool

    def to_bytes(self) -> bytes:
        data = {
            "format": "cliviz trace set (Parquet dataset)",
            "schema_version": SCHEMA_VERSION,
            "cliviz_version": __version__,
            "compact": json.loads(self.compact.to_json()),
            "pooled": self.pooled,
            "model": self.model,
            "config_hash": self.config_hash,
        }
        return (json.dumps(data, indent=2) + "\n").encode()


def read_manifest(folder: Path) -> Manifest | None:
    p = folder / MANIFEST
    if not p.exists():
        return None
    try:
        raw = p.read_bytes()[: 2**16]
        data = json.loads(raw)
        compact = Compact.from_json(json.dumps(data.get("compact")) if data.get("compact") else None, str(p))
        config_hash, model = data.get("config_hash"), data.get("model")
        if not isinstance(data.get("pooled", False), bool) or not all(
            isinstance(v, (str, type(None))) for v in (config_hash, model)
        ):
            raise ValueError
        return Manifest(compact, config_hash, model, bool(data.get("pooled", False)))
    except (ValueError, TypeError, AttributeError, OSError):
        raise CLIVizError(f"trace set {folder} has an unreadable manifest {MANIFEST}") from None


def _models(table: pa.Table) -> list[tuple[str, str]]:
    """(config_hash, model) pairs in `table`, in first-seen order."""
    pairs = zip(table.column("config_hash").to_pylist(), table.column("model").to_pylist())
    return list(dict.fromkeys(pairs))


def check_one_model(models: Sequence[tuple[str, str | None]], where: str) -> None:
    """CLIVizError when traces of more than one model would share a set that was not pooled."""
    hashes = list(dict.fromkeys(h for h, _ in models))
    if len(hashes) > 1:
        names = ", ".join(f"{m} ({h[:8]})" for h, m in list(dict.fromkeys(models))[:3])
        raise CLIVizError(
            f"{where} would mix traces of {len(hashes)} models ({names}); a trace set holds one model — "
            "write each model to its own set, or pool them on purpose (pool=True, --pool)"
        )


# ---------------------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class Filter:
    """Row selection pushed down to the files: only matching traces are decoded."""

    model: str | None = None  # matches meta.model or meta.config_hash
    qtype: str | Sequence[str] | None = None
    sample_ids: frozenset[str] | None = None

    @classmethod
    def of(cls, model=None, qtype=None, sample_ids=None) -> Filter | None:
        if model is None and qtype is None and sample_ids is None:
            return None
        return cls(model, qtype, frozenset(sample_ids) if sample_ids is not None else None)

    @property
    def columns(self) -> list[str]:
        cols = []
        if self.model is not None:
            cols += ["model", "config_hash"]
        if self.qtype is not None:
            cols.append("qtype")
        if self.sample_ids is not None:
            cols.append("sample_id")
        return cols

    def mask(self, table: pa.Table) -> np.ndarray:
        keep = np.ones(table.num_rows, dtype=bool)
        if self.model is not None:
            keep &= np.asarray(
                pc.fill_null(
                    pc.or_(
                        pc.equal(table.column("model"), self.model), pc.equal(table.column("config_hash"), self.model)
                    ),
                    False,
                ).to_numpy(zero_copy_only=False),
                dtype=bool,
            )
        if self.qtype is not None:
            wanted = [self.qtype] if isinstance(self.qtype, str) else list(self.qtype)
            keep &= np.asarray(
                pc.fill_null(pc.is_in(table.column("qtype"), value_set=pa.array(wanted, pa.string())), False).to_numpy(
                    zero_copy_only=False
                ),
                dtype=bool,
            )
        if self.sample_ids is not None:
            keep &= np.asarray(
                pc.fill_null(
                    pc.is_in(table.column("sample_id"), value_set=pa.array(sorted(self.sample_ids), pa.string())), False
                ).to_numpy(zero_copy_only=False),
                dtype=bool,
            )
        return keep


@dataclass(frozen=True)
class Part:
    """One checked Parquet file of a set: footer read, schema version and compaction known."""

    path: Path
    version: int
    compact: Compact
    num_rows: int
    row_group_rows: tuple[int, ...]
    uncompressed_bytes: int


def open_part(path: Path, verb: str = "reads") -> Part:
    """Read and check the footer of one part (nothing decoded yet)."""
    try:
        with pq.ParquetFile(path) as pf:
            md = pf.metadata
            metadata = pf.schema_arrow.metadata or {}
            names = pf.schema_arrow.names
    except (pa.ArrowException, OSError, ValueError):
        raise CLIVizError(f"trace file {path} is not a readable Parquet file") from None
    raw = metadata.get(SCHEMA_VERSION_KEY.encode())
    if raw is None:
        raise CLIVizError(f"{path} is not a cliviz trace file (no {SCHEMA_VERSION_KEY} in its Parquet metadata)")
    try:
        version = int(raw.decode())
    except (UnicodeDecodeError, ValueError):
        raise CLIVizError(f"trace file {path} has an unreadable schema version {raw!r}") from None
    if version not in READABLE_SCHEMA_VERSIONS:
        raise CLIVizError(f"trace file {path} has schema version {version}, this cliviz {verb} {SCHEMA_VERSION}")
    compact = Compact.from_json(metadata.get(COMPACT_KEY.encode()), f"trace file {path}")
    rows, total = [], 0
    for i in range(md.num_row_groups):
        rg = md.row_group(i)
        rows.append(rg.num_rows)
        total += rg.total_byte_size
        if rg.total_byte_size > MAX_ROW_GROUP_BYTES or rg.total_byte_size < 0:
            raise CLIVizError(
                f"trace file {path} is corrupt: row group {i} declares {rg.total_byte_size} bytes "
                f"(over the {MAX_ROW_GROUP_BYTES} a trace file may hold in one row group)"
            )
        for j in range(rg.num_columns):
            col = rg.column(j)
            name = col.path_in_schema.split(".")[0]
            if name in _META_TEXT and col.total_uncompressed_size > MAX_TEXT_BYTES_PER_ROW * max(rg.num_rows, 1):
                raise CLIVizError(
                    f"trace file {path} is corrupt: column {name} declares {col.total_uncompressed_size} bytes "
                    f"for {rg.num_rows} trace(s) (at most {MAX_TEXT_BYTES_PER_ROW} per trace)"
                )
    missing = [n for n in ARROW_SCHEMA.names if n not in names and not _added_later(n, version)]
    if missing:
        raise CLIVizError(f"trace file {path} is corrupt: missing column(s) {', '.join(missing)}")
    return Part(path, version, compact, md.num_rows, tuple(rows), total)


def _added_later(name: str, version: int) -> bool:
    return (name in ADDED_IN_2 and version < 2) or (name == "gate_positions" and version < 3)


def open_parts(path: str | os.PathLike, verb: str = "reads") -> list[Part]:
    """Every part of the set at `path`, footers checked; CLIVizError on the first bad one."""
    return [open_part(p, verb) for p in part_files(path)]


def conform(table: pa.Table, part: Part) -> pa.Table:
    """A part's rows in the current schema: columns added since its version as nulls, float16 gates
    back to float32, columns in schema order; CLIVizError naming the part when a column's type is wrong."""
    for name in ARROW_SCHEMA.names:
        if name not in table.column_names and _added_later(name, part.version):
            typ = ARROW_SCHEMA.field(name).type
            table = table.append_column(pa.field(name, typ), pa.nulls(table.num_rows, typ))
    try:
        return table.select(ARROW_SCHEMA.names).cast(ARROW_SCHEMA)
    except (pa.ArrowException, ValueError, KeyError) as e:
        raise CLIVizError(
            f"trace file {part.path} is corrupt: a column has the wrong type ({str(e).splitlines()[0]})"
        ) from None


def _read_group(pf: pq.ParquetFile, part: Part, i: int, columns: list[str] | None = None) -> pa.Table:
    try:
        return pf.read_row_group(i, columns=columns)
    except (pa.ArrowException, OSError, ValueError):
        raise CLIVizError(f"trace file {part.path} is not a readable Parquet file") from None


def iter_tables(parts: Sequence[Part], where: Filter | None = None) -> Iterator[pa.Table]:
    """The set's rows, one checked row group at a time (in the current schema, float32 gates)."""
    offset = 0  # row of the set where the row group starts (after filtering): errors name set rows
    for part in parts:
        try:
            pf = pq.ParquetFile(part.path)
        except (pa.ArrowException, OSError, ValueError):
            raise CLIVizError(f"trace file {part.path} is not a readable Parquet file") from None
        with pf:
            for i in range(len(part.row_group_rows)):
                keep = None
                if where is not None:
                    keep = where.mask(_read_group(pf, part, i, where.columns))
                    if not keep.any():
                        continue  # nothing here: the tensors of this row group are never decoded
                table = conform(_read_group(pf, part, i), part)
                if keep is not None and not keep.all():
                    table = table.filter(pa.array(keep))
                check_table(table, str(part.path), offset)
                offset += table.num_rows
                yield table


def read_columns(parts: Sequence[Part], names: Sequence[str], where: Filter | None = None) -> dict[str, list]:
    """Some (meta) columns of the whole set as Python lists, reading only those columns."""
    unknown = [n for n in names if n not in ARROW_SCHEMA.names]
    if unknown:
        raise CLIVizError(f"no column {unknown[0]!r} in a trace file")
    out: dict[str, list] = {n: [] for n in names}
    for part in parts:
        try:
            with pq.ParquetFile(part.path) as pf:
                present = [n for n in names if n in pf.schema_arrow.names]
                cols = list(dict.fromkeys(present + (where.columns if where else [])))
                for i in range(len(part.row_group_rows)):
                    t = _read_group(pf, part, i, cols)
                    keep = where.mask(t) if where is not None else None
                    for n in names:
                        values = t.column(n).to_pylist() if n in present else [None] * t.num_rows
                        out[n] += [v for v, k in zip(values, keep) if k] if keep is not None else values
        except (pa.ArrowException, OSError, ValueError):
            raise CLIVizError(f"trace file {part.path} is not a readable Parquet file") from None
    return out


def read_column(parts: Sequence[Part], name: str, where: Filter | None = None) -> list:
    """One (meta) column of the whole set as a Python list, reading only that column."""
    return read_columns(parts, [name], where)[name]


def read_all(path: str | os.PathLike, verb: str = "reads") -> pa.Table:
    """The whole set as one checked table (small sets; large ones stream through `iter_tables`)."""
    parts = open_parts(path, verb)
    tables = list(iter_tables(parts))
    return pa.concat_tables(tables) if tables else ARROW_SCHEMA.empty_table()


# ---------------------------------------------------------------------------------------- writing


def store_dtype(table: pa.Table, compact: Compact) -> pa.Table:
    """The table with its gates column in the stored dtype (float16 when asked)."""
    if compact.gates == "float32":
        return table
    half = pa.list_(pa.float16())
    i = table.schema.get_field_index("gates")
    return table.set_column(i, pa.field("gates", half), table.column("gates").cast(half))


def _row_group_rows(table: pa.Table) -> int:
    per_row = max(1, table.nbytes // max(table.num_rows, 1))
    return int(max(1, min(MAX_ROW_GROUP_ROWS, ROW_GROUP_BYTES // per_row)))


def write_part(table: pa.Table, path: Path, compact: Compact) -> Path:
    """Write `table` (already compacted by position) as one Parquet file, atomically."""
    meta = dict(ARROW_SCHEMA.metadata)
    meta[COMPACT_KEY.encode()] = compact.to_json().encode()
    stored = store_dtype(table, compact)
    with atomic_file(path, "trace file") as fh:
        pq.write_table(
            stored.replace_schema_metadata(meta), fh, compression="zstd", row_group_size=_row_group_rows(table)
        )
    return path


def _set_compaction(path: Path, asked: Compact | None, recorded: Compact | None) -> Compact:
    if recorded is None:
        return asked or Compact()
    if asked is not None and asked != recorded:
        raise CLIVizError(
            f"trace set {path} holds {recorded.describe()}; appending {asked.describe()} would mix them — "
            "append with the set's own choice, or write to another set"
        )
    return recorded


def append_table(
    path: str | os.PathLike,
    table: pa.Table,
    *,
    compact: Compact | None = None,
    pool: bool = False,
    rank: int | None = None,
) -> Path:
    """Append checked, position-compacted rows to the set at `path` (a folder is created when missing).

    Folders get one new part; a single file is rewritten with the new rows after the old ones. `rank`:
    a torchrun rank writing its own parts (its own lock, so ranks never wait for each other)."""
    p = Path(path)
    # a rank's lock sits beside the set, not inside it: a lock file inside would create the folder
    # before it is a set, and another rank would find a folder with neither parts nor manifest
    lock_target = p if rank is None else p.parent / f"{p.name}._rank{rank}"
    with exclusive_writer(lock_target, "trace set", wait=APPEND_LOCK_WAIT_S):
        if p.is_file():
            return _append_to_file(p, table, compact, pool)
        if p.exists() and not p.is_dir():
            raise CLIVizError(f"trace set {p} is not a file or folder")
        manifest = read_manifest(p) if p.is_dir() else None
        models = _models(table)
        pooled = manifest.pooled if manifest is not None else pool
        if not pooled:
            known = [(manifest.config_hash, manifest.model)] if manifest and manifest.config_hash else []
            check_one_model([*known, *models], f"appending to {p}")
        chosen = _set_compaction(p, compact, manifest.compact if manifest else None)
        if manifest is None:
            first = models[0] if models and not pool else (None, None)
            if _create_set(p, Manifest(chosen, first[0], first[1], pool), table, rank):
                return p
        if table.num_rows:
            write_part(table, _next_part(p, rank), chosen)
    return p


def _create_set(p: Path, manifest: Manifest, table: pa.Table, rank: int | None) -> bool:
    """Make `p` a set folder holding its manifest and the first rows, all at once: the folder is
    assembled under a hidden name beside `p` and renamed into place, so a kill never leaves a folder
    that is not a set, and a set that exists holds its first part. False when `p` was already a
    folder (then only the manifest is added and the caller writes the part)."""
    if p.is_dir():  # a set folder without a manifest (e.g. written by another tool): add one
        write_manifest(p, manifest)
        return False
    parent = p.absolute().parent
    tmp = parent / f".{p.name}.{secrets.token_hex(6)}.tmpdir"
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        (tmp / MANIFEST).write_bytes(manifest.to_bytes())
        if table.num_rows:
            write_part(table, _next_part(tmp, rank), manifest.compact)
        os.rename(tmp, p)
        return True
    except (OSError, CLIVizError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, CLIVizError):
            raise
        if not p.is_dir():
            raise CLIVizError(f"cannot create trace set folder {p}: {e.strerror or e}") from None
        return False  # another process made the set first: append to it


def write_manifest(folder: Path, manifest: Manifest) -> None:
    atomic_write_bytes(folder / MANIFEST, manifest.to_bytes(), "trace set manifest")


def _append_to_file(p: Path, table: pa.Table, compact: Compact | None, pool: bool) -> Path:
    parts = open_parts(p, "writes")
    old = read_all(p, "writes")
    chosen = _set_compaction(p, compact, parts[0].compact)
    if not pool:
        check_one_model(_models(old) + _models(table), f"appending to {p}")
    return write_part(pa.concat_tables([old, table]), p, chosen)


def write_file(path: str | os.PathLike, table: pa.Table, compact: Compact | None = None) -> Path:
    """Write `table` as a single Parquet file (replacing `path` atomically, under its lock)."""
    p = Path(path)
    if p.is_dir():
        raise CLIVizError(f"{p} is a trace set folder; append to it, or write the file elsewhere")
    with exclusive_writer(p, "trace file", wait=APPEND_LOCK_WAIT_S):
        return write_part(table, p, compact or Compact())


def count_rows(parts: Iterable[Part]) -> int:
    return sum(part.num_rows for part in parts)
