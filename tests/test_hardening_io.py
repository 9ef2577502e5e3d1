"""Issue 18, items 5, 6 and 9: concurrent writers lose nothing, Ctrl-C is one line and exit 130,
every output path is checked before any model work, and figure export survives a lost tab.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from cliviz.errors import CLIVizError

from conftest import BUNDLED, EXAMPLES, REPO, main_outcome, one_error_line

IMAGE = EXAMPLES / "color.png"
ENV = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    from cliviz.data import write_dataset

    out = tmp_path_factory.mktemp("hardening-data")
    write_dataset(out, 12, seed=5)
    return out


# ----------------------------------------------------------------------------------------- item 5

APPENDER = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    from corpus import good_trace
    from cliviz.tracing.traceset import TraceSet
    worker, rounds, path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    for r in range(rounds):
        trace = good_trace(seed=r)
        trace.meta.sample_id = f"w{{worker}}-r{{r}}"
        TraceSet.append(path, [trace])
""")


@pytest.mark.slow
def test_concurrent_appends_from_many_processes_lose_nothing(tmp_path):
    """Read + extend + replace by several processes used to drop rows (392 of 400 survived)."""
    from cliviz.tracing.traceset import TraceSet

    script = tmp_path / "append.py"
    script.write_text(APPENDER.format(tests=str(REPO / "tests")))
    path = tmp_path / "shared.parquet"
    workers, rounds = 4, 12
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(w), str(rounds), str(path)], env=ENV, stderr=subprocess.PIPE, text=True
        )
        for w in range(workers)
    ]
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stderr.read()
    ids = [t.meta.sample_id for t in TraceSet.read(path)]
    assert sorted(ids) == sorted(f"w{w}-r{r}" for w in range(workers) for r in range(rounds))
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".shared.parquet")]  # no lock or temp left


HOLDER = textwrap.dedent("""
    import sys, time
    from cliviz.atomic import exclusive_writer
    with exclusive_writer(sys.argv[1], "trace file"):
        print("held", flush=True)
        sys.stdin.readline()
""")


def test_second_sweep_into_the_same_output_is_refused(data_dir, tmp_path, monkeypatch, capsys):
    """Two sweeps into one --out both exited 0 and interleaved their chunks: now the second is refused."""
    out = tmp_path / "t.parquet"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(out)], env=ENV, text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )  # another process writing `out`
    try:
        assert holder.stdout.readline().strip() == "held"
        code, _, err = main_outcome(
            "sweep",
            "--data",
            str(data_dir),
            "--out",
            str(out),
            "--device",
            "cpu",
            "--model",
            str(tmp_path / "no-model"),
        )
        one_error_line(code, err, f"{out} is being written by another cliviz process")  # before the model
        code, _, err = main_outcome("sweep", "--data", str(data_dir), "--out", str(out), "--device", "cpu", "--resume")
        one_error_line(code, err, "being written by another cliviz process")
    finally:
        holder.communicate("done\n", timeout=60)
    assert holder.returncode == 0 and not out.exists()
    code, _, err = main_outcome(
        "sweep",
        "--data",
        str(data_dir),
        "--out",
        str(out),
        "--device",
        "cpu",
        "--max-new-tokens",
        "2",
    )
    assert code == 0, err  # the lock went with the process that held it


def test_resume_removes_temporaries_left_by_a_kill(data_dir, tmp_path, monkeypatch, capsys):
    from cliviz.atomic import stale_temporaries
    from cliviz.tracing.traceset import TraceSet

    out = tmp_path / "t.parquet"
    code, _, err = main_outcome(
        "sweep",
        "--data",
        str(data_dir),
        "--out",
        str(out),
        "--device",
        "cpu",
        "--batch-size",
        "4",
        "--chunk-size",
        "4",
        "--max-new-tokens",
        "2",
    )
    assert code == 0, err
    full = TraceSet.read(out)
    for part in sorted(out.glob("part-*.parquet"))[1:]:
        part.unlink()  # a sweep killed after its first chunk (one part of 4 traces) ...
    for hexname in ("0123456789ab", "deadbeef0042"):  # ... and during the write of the next one
        (out / f".part-00000002.parquet.{hexname}.tmp").write_bytes(b"PAR1 half a file")
    (tmp_path / ".t.parquet.0123456789ab.tmp").write_bytes(b"PAR1 half a file")  # a single-file write's
    assert len(stale_temporaries(out)) == 1 and len(TraceSet.read(out)) == 4
    code, out_text, err = main_outcome(
        "sweep",
        "--data",
        str(data_dir),
        "--out",
        str(out),
        "--device",
        "cpu",
        "--batch-size",
        "4",
        "--chunk-size",
        "4",
        "--max-new-tokens",
        "2",
        "--resume",
    )
    assert code == 0, err
    assert stale_temporaries(out) == [] and not list(out.glob(".*"))
    assert [t.meta.sample_id for t in TraceSet.read(out)] == [t.meta.sample_id for t in full]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.parquet"]


# ----------------------------------------------------------------------------------------- item 6


def _interrupt(args: list[str], when, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `cliviz ARGS`, send SIGINT once `when(pid)` is true, return the finished process."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "cliviz", *args],
        cwd=REPO,
        env=ENV,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.time() + timeout
    while not when(proc.pid) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _cpu_seconds(pid: int) -> float:
    """CPU time a process has used (user + system, from /proc): unlike wall time, it does not
    stretch when other processes load the machine."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("inf")  # already gone
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.fixture(scope="module")
def cpu_to_reach_cliviz() -> float:
    """CPU seconds a process needs to start Python and import `cliviz.cli.main`, which installs the
    Ctrl-C handler first thing; a Ctrl-C before that meets Python's own start-up, not cliviz."""
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run([sys.executable, "-c", "import cliviz.cli.main"], cwd=REPO, env=ENV, check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def test_ctrl_c_on_a_sweep_exits_130_and_says_what_was_kept(data_dir, tmp_path):
    from cliviz.tracing.traceset import TraceSet

    out = tmp_path / "t.parquet"
    proc = _interrupt(
        [
            "sweep",
            "--data",
            str(data_dir),
            "--out",
            str(out),
            "--device",
            "cpu",
            "--batch-size",
            "2",
            "--chunk-size",
            "2",
            "--max-new-tokens",
            "4",
        ],
        when=lambda _: out.exists(),
    )
    assert proc.returncode == 130, (proc.returncode, proc.stderr)
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert "Traceback" not in proc.stderr and len(lines) == 1, proc.stderr
    kept = len(TraceSet.read(out))  # the file is whole and readable
    assert 2 <= kept < 12
    assert lines[0] == f"interrupted; the {kept} trace(s) already written stay in {out}; finish with --resume"


@pytest.mark.parametrize("delay", [0.3, 0.8, 1.5, 2.5, 4.0])
def test_ctrl_c_during_start_up_is_one_line(delay, cpu_to_reach_cliviz):
    """Start-up (imports of torch, transformers, the model load) used to print a KeyboardInterrupt
    traceback. The Ctrl-C comes `delay` s after the start, and never before the process has had the
    CPU time to reach cliviz's code (on a loaded machine 0.3 s of wall time can end inside Python's
    own start-up, where no program can catch it)."""
    start = time.time()
    ready = 1.5 * cpu_to_reach_cliviz

    def now(pid: int) -> bool:
        return time.time() - start > delay and _cpu_seconds(pid) >= ready

    proc = _interrupt(["ask", str(IMAGE), "what color is the circle ?", "--device", "cpu"], when=now)
    assert proc.returncode == 130, (proc.returncode, proc.stderr)
    assert proc.stderr.strip().splitlines() == ["interrupted; files written before the interrupt are kept"]
    assert proc.stdout == ""


# A Ctrl-C sent from inside torch's C++ start-up, at the moment `torch._C._c10d_init` (C++) calls
# back into Python to import a module: the place where CI once saw the process abort.
CTRL_C_INSIDE_TORCH_INIT = textwrap.dedent("""
    import os, signal, sys
    from cliviz.cli.main import entry

    inside = []

    def send_ctrl_c_inside(frame, event, arg):
        if event == "c_call" and getattr(arg, "__name__", "") == "_c10d_init":
            inside.append(arg)
        elif event == "call" and inside:  # _c10d_init (C++) calls back into Python
            sys.setprofile(None)
            print("SIGINT sent inside torch._C._c10d_init", file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGINT)  # the handler runs here, under the C++ frames

    sys.setprofile(send_ctrl_c_inside)
    sys.argv = ["cliviz", "ask", {image!r}, "what color is the circle ?", "--device", "cpu"]
    entry()
""")


def test_ctrl_c_inside_torchs_native_start_up_waits_for_the_import():
    """An exception raised in a Python callback of torch's C++ init used to abort the process
    ("terminate called after throwing an instance of 'python_error'", exit -6); the interrupt now
    waits until the import has finished and ends as the usual one line and 130."""
    proc = subprocess.run(
        [sys.executable, "-c", CTRL_C_INSIDE_TORCH_INIT.format(image=str(IMAGE))],
        cwd=REPO, env=ENV, text=True, capture_output=True, timeout=300,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    lines = proc.stderr.strip().splitlines()
    assert lines[:1] == ["SIGINT sent inside torch._C._c10d_init"], proc.stderr  # the hook really fired
    assert proc.returncode == 130, (proc.returncode, proc.stderr)
    assert lines[1:] == ["interrupted; files written before the interrupt are kept"]
    assert proc.stdout == ""


def test_a_ctrl_c_in_torchs_import_lands_after_it_and_elsewhere_at_once(tmp_path):
    """The rule: inside an import of a torch module the module's own code runs to its end, then the
    interrupt; inside any other import (no C++ frames to cross) the interrupt is raised at once."""
    (tmp_path / "slow_module.py").write_text(
        textwrap.dedent("""
        import os, signal
        os.kill(os.getpid(), signal.SIGINT)
        total = sum(range(200_000))  # bytecode enough for a handler to run mid-import
        print("import finished", flush=True)
    """)
    )
    script = textwrap.dedent(f"""
        import sys, time
        import torch
        torch.__path__.append({str(tmp_path)!r})  # so that `torch.slow_module` is a torch module
        sys.path.insert(0, {str(tmp_path)!r})
        from cliviz.cli.main import _watch_interrupts, importing_torch_now
        _watch_interrupts()
        for name in ("torch.slow_module", "slow_module"):
            try:
                __import__(name)
                time.sleep(5)  # a held-back interrupt arrives here
                print("never interrupted")
            except KeyboardInterrupt:
                print(name, "interrupted;", "torch still importing:", importing_torch_now())
    """)
    proc = subprocess.run([sys.executable, "-c", script], env=ENV, text=True, capture_output=True, timeout=60)
    assert proc.stdout.splitlines() == [
        "import finished",
        "torch.slow_module interrupted; torch still importing: False",
        "slow_module interrupted; torch still importing: False",
    ], proc.stderr


def test_typer_exit_codes_are_not_dropped(monkeypatch, capsys):
    """typer returns Ctrl-C's 130 (and any `typer.Exit(n)`) in non-standalone mode; main() used to exit 0."""
    import typer

    import cliviz.cli.main as cli_main

    def app_raising(exc):
        def build():
            app = typer.Typer()

            @app.command()
            def boom() -> None:
                raise exc

            return app

        return build

    for exc, code, line in (
        (KeyboardInterrupt(), 130, "interrupted; files written before the interrupt are kept"),
        (typer.Exit(3), 3, None),
    ):
        monkeypatch.setattr(cli_main, "build_app", app_raising(exc))
        got, _, err = main_outcome()
        assert got == code
        assert err.strip().splitlines() == ([line] if line else [])


# ----------------------------------------------------------------------------------------- item 9


@pytest.mark.parametrize(
    "args",
    [
        ["trace", str(IMAGE), "what color is the circle ?", "--html", "{blocker}/x.html"],
        ["trace", str(IMAGE), "what color is the circle ?", "--out", "{blocker}/t.parquet"],
        ["attribute", str(IMAGE), "what color is the circle ?", "--html", "{blocker}/sub/x.html"],
        ["sweep", "--data", "{data}", "--out", "{blocker}/t.parquet"],
        ["ablate", str(IMAGE), "what color is the circle ?", "--out", "{blocker}/a.parquet"],
        ["compare", "--models", "{nomodel}", "--data", "{data}", "--out", "{blocker}/cmp"],
        ["data", "--out", "{blocker}/d", "--n", "3"],
        ["train", "--out", "{blocker}/m", "--steps", "1"],
        ["attach", "--base", str(BUNDLED), "--out", "{blocker}/m"],
    ],
    ids=["trace-html", "trace-out", "attribute-html", "sweep", "ablate", "compare", "data", "train", "attach"],
)
def test_output_under_a_file_is_refused_before_any_model_work(args, data_dir, tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "file.png"
    blocker.write_bytes(b"not a folder")
    # A model folder that exists (the cheap checks pass it) but holds no loadable model: any model work
    # would fail on it, so the error below can only come from checking the output first.
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "cliviz_cli"}')
    argv = [a.format(blocker=blocker, data=data_dir, nomodel=broken) for a in args]
    if args[0] not in ("data", "train", "attach", "compare"):
        argv += ["--model", str(broken)]
    code, _, err = main_outcome(*argv)
    one_error_line(code, err, f"{blocker} is a file, not a folder")
    assert blocker.read_bytes() == b"not a folder"


def test_read_only_file_system_is_not_called_permission_denied(tmp_path):
    """A read-only mount was reported as "permission denied"; the real reason is named now."""
    probe = subprocess.run(["unshare", "-rm", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("this system allows no private mount namespace (unshare -rm), so no read-only mount here")
    ro = tmp_path / "ro"
    ro.mkdir()
    script = (
        f"mount -t tmpfs -o ro tmpfs {ro} && exec {sys.executable} -m cliviz trace {IMAGE} 'what color ?' "
        f"--out {ro}/t.parquet --model {tmp_path / 'no-model'}"
    )
    proc = subprocess.run(
        ["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, cwd=REPO, env=ENV, timeout=300
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines() == [f"error: cannot write trace file {ro}/t.parquet: read-only file system"]


def test_unwritable_folder_is_found_by_a_real_write(tmp_path):
    """`os.access` says yes to root everywhere; the check now tries a write, as the command will."""
    from cliviz.cli.preflight import check_output_folder, check_writable

    check_writable(tmp_path / "ok.parquet", "trace file")
    check_output_folder(tmp_path / "new" / "deeper", "--out folder")
    assert sorted(os.listdir(tmp_path)) == []  # the probes leave nothing behind
    with pytest.raises(CLIVizError, match="folder .* does not exist"):
        check_writable(tmp_path / "missing" / "x.parquet", "trace file")


# ----------------------------------------------------------------------------------------- item 9: figures


def test_a_tab_that_lost_kaleidos_page_fails_for_the_whole_session():
    """Why `cliviz figures` restarts its browser once on "kaleido_scopes is not defined".

    A tab whose page is not kaleido's (here: sent to about:blank, as a tab whose first navigation lost
    to its own initial about:blank load is left) fails every later render: kaleido reloads a tab after
    each render, and reloading about:blank gives about:blank again. A fresh session renders.
    """
    import asyncio
    import concurrent.futures

    import kaleido
    import plotly.graph_objects as go

    from cliviz.analyses.figures import NOT_ON_KALEIDO_PAGE, find_chromium

    find_chromium()
    fig = go.Figure(go.Heatmap(z=[[1, 2], [3, 4]]))

    async def session(lose_page: bool) -> list[str]:
        outcomes = []
        async with kaleido.Kaleido(n=1, mathjax=False) as k:
            if lose_page:
                tab = await k._get_kaleido_tab()
                await tab.tab.send_command("Page.navigate", params={"url": "about:blank"})
                await asyncio.sleep(0.5)
                await tab.reload()
                await k.tabs_ready.put(tab)
            for _ in range(3):
                try:
                    data = await k.calc_fig(fig, opts={"format": "png", "width": 100, "height": 100})
                    outcomes.append("png" if data[:4] == b"\x89PNG" else "other")
                except Exception as err:  # noqa: BLE001 - the error text is what is compared
                    outcomes.append("lost" if NOT_ON_KALEIDO_PAGE in str(err) else type(err).__name__)
        return outcomes

    def run(lose_page: bool) -> list[str]:
        # in a thread of its own, as cliviz runs kaleido: an earlier test's browser fixture (Playwright's
        # sync API) may hold a running event loop in this thread, where asyncio.run refuses to start
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            return pool.submit(asyncio.run, session(lose_page)).result()

    assert run(lose_page=True) == ["lost", "lost", "lost"]
    assert run(lose_page=False) == ["png", "png", "png"]
