"""`cliviz sweep` / `run_sweep`: batched, chunked, resumable sweeps into one trace set (a folder of
part files), and torchrun ranks writing their own parts."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import REPO, assert_clean_error, run_main

N_SAMPLES = 16
BATCH, CHUNK = 4, 8
GEN = ["--max-new-tokens", "2", "--device", "cpu", "--batch-size", str(BATCH), "--chunk-size", str(CHUNK)]


class Interrupted(Exception):
    pass


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """16 good rows, plus a malformed line (line 3) and a row whose image is missing (line 9)."""
    from cliviz.data import write_dataset

    out = tmp_path_factory.mktemp("sweep-data")
    write_dataset(out, N_SAMPLES, seed=3)
    lines = (out / "samples.jsonl").read_text().splitlines()
    lines.insert(2, '{"image": "images/broken.png", "question": ')
    lines.insert(
        8,
        json.dumps(
            {"image": "images/missing.png", "question": "what color is the circle ?", "answer": "red", "qtype": "color"}
        ),
    )
    (out / "samples.jsonl").write_text("\n".join(lines) + "\n")
    return out


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, data_dir, random_model_dir):
    """One uninterrupted single-process sweep through the command line."""
    out = tmp_path_factory.mktemp("sweep-base") / "traces.parquet"
    proc = run_main("sweep", "--data", str(data_dir), "--out", str(out), "--model", str(random_model_dir), *GEN)
    assert proc.returncode == 0, proc.stderr
    return out, proc


def _rows(path: Path) -> list[dict]:
    from cliviz.tracing.traceset import TraceSet

    return [
        {
            "sample_id": t.meta.sample_id,
            "qtype": t.meta.qtype,
            "reference": t.meta.reference_answer,
            "answer": t.meta.answer,
            "gates": t.gates,
            "norm": t.injection_norm,
            "ids": t.token_ids.tolist(),
            "answer_ids": t.answer_ids.tolist(),
        }
        for t in TraceSet.read(path)
    ]


def _snapshot(path: Path) -> dict[str, bytes]:
    """Every file of a set (folder or file), by name: to show that nothing was touched."""
    if path.is_file():
        return {path.name: path.read_bytes()}
    return {q.name: q.read_bytes() for q in sorted(path.iterdir())}


def _assert_same_set(a: Path, b: Path, atol: float = 1e-6, *, any_order: bool = False) -> None:
    ra, rb = _rows(a), _rows(b)
    if any_order:
        ra, rb = sorted(ra, key=lambda r: r["sample_id"]), sorted(rb, key=lambda r: r["sample_id"])
    assert [r["sample_id"] for r in ra] == [r["sample_id"] for r in rb]
    for x, y in zip(ra, rb):
        assert (x["qtype"], x["reference"], x["answer"], x["ids"], x["answer_ids"]) == (
            y["qtype"],
            y["reference"],
            y["answer"],
            y["ids"],
            y["answer_ids"],
        ), x["sample_id"]
        assert x["gates"].shape == y["gates"].shape
        np.testing.assert_allclose(x["gates"], y["gates"], rtol=0, atol=atol)
        np.testing.assert_allclose(x["norm"], y["norm"], rtol=0, atol=atol)


def _main(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """Run the real `main()` in this process (saves an interpreter start per error case)."""
    from cliviz.cli.main import main

    monkeypatch.setattr(sys, "argv", ["cliviz", *args])
    code = 0
    try:
        main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _one_error_line(code: int, err: str, needle: str) -> None:
    assert code == 2, err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert needle.lower() in lines[0].lower(), lines[0]


def test_sweep_writes_one_row_per_sample(baseline, data_dir):
    out, proc = baseline
    rows = _rows(out)
    good = [
        json.loads(line)
        for n, line in enumerate((data_dir / "samples.jsonl").read_text().splitlines(), 1)
        if n not in (3, 9)
    ]
    assert len(rows) == N_SAMPLES
    expected_ids = [
        f"line{n}:{json.loads(line)['image']}"
        for n, line in enumerate((data_dir / "samples.jsonl").read_text().splitlines(), 1)
        if n not in (3, 9)
    ]
    assert [r["sample_id"] for r in rows] == expected_ids
    assert [r["qtype"] for r in rows] == [g["qtype"] for g in good]
    assert [r["reference"] for r in rows] == [g["answer"] for g in good]
    assert all(r["gates"].ndim == 3 and np.allclose(r["gates"].sum(-1), 1, atol=1e-5) for r in rows)
    # skipped rows are counted, not silently dropped
    assert "skipped 1 sample(s): malformed line" in proc.stderr
    assert "skipped 1 sample(s): missing image" in proc.stderr
    assert f"{N_SAMPLES} traces" in proc.stdout
    # plain Parquet, readable without cliviz; one part per chunk
    assert pq.read_table(out).num_rows == N_SAMPLES
    assert sorted(p.name for p in out.glob("*.parquet")) == ["part-00000001.parquet", "part-00000002.parquet"]


def test_interrupted_sweep_resumes_to_the_same_set(baseline, data_dir, random_model_dir, tmp_path):
    from cliviz.data.samples import read_jsonl
    from cliviz.model.loading import load_model
    from cliviz.tracing.sweep import plan_sweep, trace_items

    out = tmp_path / "traces.parquet"
    model, tok = load_model(random_model_dir, device="cpu")
    items = plan_sweep(read_jsonl(data_dir), data_dir)

    def crash(written: int) -> None:  # a kill right after the first chunk reached the disk
        raise Interrupted

    with pytest.raises(Interrupted):
        trace_items(model, tok, items, out, batch_size=BATCH, chunk_size=CHUNK, max_new_tokens=2, on_chunk=crash)
    assert [r["sample_id"] for r in _rows(out)] == [it.sample_id for it in items[:CHUNK]]
    assert not list(tmp_path.glob(".*.tmp")) and not list(out.glob(".*"))  # no temporary file left behind
    (out / ".part-00000002.parquet.0123456789ab.tmp").write_bytes(b"half a part")  # a kill mid-append

    proc = run_main(
        "sweep", "--data", str(data_dir), "--out", str(out), "--model", str(random_model_dir), *GEN, "--resume"
    )
    assert proc.returncode == 0, proc.stderr
    assert f"{N_SAMPLES - CHUNK} traced now, {CHUNK} already there" in proc.stdout
    _assert_same_set(baseline[0], out)
    assert not list(out.glob(".*"))  # the temporary of the killed append was removed

    # resuming a finished sweep does nothing (no model work) and leaves the set as it is
    before = _snapshot(out)
    proc = run_main("sweep", "--data", str(data_dir), "--out", str(out), "--model", "no/such/model", *GEN, "--resume")
    assert proc.returncode == 0, proc.stderr
    assert "0 traced now" in proc.stdout
    assert _snapshot(out) == before


def test_resume_refuses_corrupt_and_other_schema_files(
    baseline, data_dir, random_model_dir, tmp_path, monkeypatch, capsys
):
    corrupt = tmp_path / "corrupt.parquet"
    shutil.copytree(baseline[0], corrupt)
    first = corrupt / "part-00000001.parquet"
    first.write_bytes(first.read_bytes()[:300])
    before = _snapshot(corrupt)
    proc = run_main(
        "sweep", "--data", str(data_dir), "--out", str(corrupt), "--model", str(random_model_dir), *GEN, "--resume"
    )
    assert_clean_error(proc, "not a readable Parquet file")
    assert _snapshot(corrupt) == before

    other = tmp_path / "v99.parquet"
    table = pq.read_table(baseline[0] / "part-00000001.parquet")
    meta = dict(table.schema.metadata)
    meta[b"cliviz.schema_version"] = b"99"
    pq.write_table(table.replace_schema_metadata(meta), other)
    before = other.read_bytes()
    code, _, err = _main(
        monkeypatch,
        capsys,
        "sweep",
        "--data",
        str(data_dir),
        "--out",
        str(other),
        "--model",
        str(random_model_dir),
        *GEN,
        "--resume",
    )
    _one_error_line(code, err, "schema version 99")
    assert other.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corrupt.parquet", "v99.parquet"]


def test_existing_output_and_bad_paths_are_refused_before_model_work(baseline, data_dir, tmp_path, monkeypatch, capsys):
    existing = tmp_path / "done.parquet"
    shutil.copytree(baseline[0], existing)
    before = _snapshot(existing)
    # --model names nothing: each error below must come before the model is even looked at
    args = ("--data", str(data_dir), "--model", str(tmp_path / "no-model"), *GEN)
    code, _, err = _main(monkeypatch, capsys, "sweep", "--out", str(existing), *args)
    _one_error_line(code, err, "already exists")
    assert _snapshot(existing) == before

    code, _, err = _main(monkeypatch, capsys, "sweep", "--out", str(tmp_path / "nowhere" / "t.parquet"), *args)
    _one_error_line(code, err, "does not exist")
    code, _, err = _main(monkeypatch, capsys, "sweep", "--out", str(tmp_path), *args)
    _one_error_line(code, err, "is a folder that is not a trace set")
    code, _, err = _main(monkeypatch, capsys, "sweep", "--out", str(tmp_path / "t.parquet"), *args, "--gates", "int8")
    _one_error_line(code, err, "unknown gate dtype")
    # --resume of a finished sweep: nothing to do (no model needed); into a file of other samples: refused
    code, out, err = _main(
        monkeypatch,
        capsys,
        "sweep",
        "--out",
        str(existing),
        "--data",
        str(data_dir),
        "--model",
        str(tmp_path / "no-model"),
        "--resume",
    )
    assert code == 0 and "0 traced now" in out, err
    other_data = tmp_path / "other.jsonl"
    lines = (data_dir / "samples.jsonl").read_text().splitlines()
    other_data.write_text("\n".join([lines[0]] * 2) + "\n")
    shutil.copytree(data_dir / "images", tmp_path / "images")  # a symlink out of the folder is refused now
    code, _, err = _main(
        monkeypatch,
        capsys,
        "sweep",
        "--out",
        str(existing),
        "--data",
        str(other_data),
        "--model",
        str(tmp_path / "no-model"),
        "--resume",
    )
    _one_error_line(code, err, "not samples of this data set")
    assert _snapshot(existing) == before


def test_compact_sweep_through_the_library(baseline, data_dir, random_model_dir, tmp_path):
    """`run_sweep` is the command's whole job: float16 answer-only traces, recorded in the set, and a
    resume that follows the set's own choice."""
    from cliviz.tracing.compact import Compact
    from cliviz.tracing.sweep import run_sweep
    from cliviz.tracing.traceset import TraceSet

    out = tmp_path / "compact.parquet"
    small = Compact("float16", "answer")
    seen: list[int] = []
    result = run_sweep(
        data_dir, out, model=random_model_dir, device="cpu", batch_size=BATCH, chunk_size=CHUNK, max_new_tokens=2,
        compact=small, on_start=seen.append,
    )  # fmt: skip
    assert (result.total, result.traced, result.usable, result.compact) == (N_SAMPLES, N_SAMPLES, N_SAMPLES, small)
    assert seen == [N_SAMPLES] and result.skipped == {"malformed line": 1, "missing image": 1}
    ts = TraceSet.read(out)
    assert ts.compaction == small
    assert pq.read_schema(out / "part-00000001.parquet").field("gates").type.value_type == "halffloat"
    full = {t.meta.sample_id: t for t in TraceSet.read(baseline[0])}
    for t in ts:
        ref = full[t.meta.sample_id]
        np.testing.assert_array_equal(t.gate_positions, ref.answer_positions)
        np.testing.assert_allclose(t.answer_gates(), ref.answer_gates(), atol=1e-3)  # float16: 3 digits
    again = run_sweep(data_dir, out, model="no/such/model", resume=True)  # nothing left: no model needed
    assert (again.traced, again.already, again.compact) == (0, N_SAMPLES, small)


@pytest.mark.slow
def test_torchrun_two_processes_match_single_process(baseline, data_dir, random_model_dir, tmp_path):
    out = tmp_path / "traces.parquet"
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "cliviz",
            "sweep",
            "--data",
            str(data_dir),
            "--out",
            str(out),
            "--model",
            str(random_model_dir),
            *GEN,
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 processes" in proc.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["traces.parquet"]
    parts = sorted(p.name for p in out.glob("*.parquet"))  # each rank wrote its own parts, nothing merged
    assert parts == ["part-00000001-r0.parquet", "part-00000001-r1.parquet"]
    _assert_same_set(baseline[0], out, atol=1e-6, any_order=True)
