"""A researcher is never misled, the details (issue 26): untrained gates named on every map (the trace
page, the dashboard's gate map and data-set maps, a set's figures), accuracy intervals in the app, and
the small wording and layout items of the command line, pages and notebook."""

from __future__ import annotations

import json
import logging
import re
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from cliviz.intervals import format_interval, wilson_interval

from conftest import EXAMPLES, REPO, run_main
from factories import build_tiny, good_trace, hand_trace, synthetic_traces

QUESTION = "what color is the triangle ?"
UNTRAINED = "these gates are untrained"


def texts(component: Any) -> list[str]:
    """Every string inside a Dash component tree (children, recursively), in order."""
    if component is None:
        return []
    if isinstance(component, str):
        return [component]
    if isinstance(component, (list, tuple)):
        return [t for c in component for t in texts(c)]
    return texts(getattr(component, "children", None))


def find(component: Any, id_: str) -> Any:
    """The component with `id_` inside a Dash tree, or None."""
    if isinstance(component, (list, tuple)):
        return next((f for c in component if (f := find(c, id_)) is not None), None)
    if getattr(component, "id", None) == id_:
        return component
    children = getattr(component, "children", None)
    return None if children is None or isinstance(children, str) else find(children, id_)


def untrained_set(n: int = 14, qtypes: tuple[str, ...] = ("colour", "count")) -> list:
    """Synthetic traces whose injection adds nothing (norms 0.01, as after `cliviz attach`)."""
    traces = synthetic_traces(n, qtypes=qtypes)
    for t in traces:
        t.injection_norm = np.full_like(t.injection_norm, 0.01)
    return traces


# ------------------------------------------------------------------ (a) untrained gates on every map


@pytest.mark.parametrize("model, untrained", [("cli-attached-tiny", True), ("cli-tiny", False)])
def test_trace_page_and_terminal_name_untrained_gates(model, untrained, tmp_path, monkeypatch):
    """`cliviz trace --html` writes the same untrained-gates warning as the terminal, only for the
    freshly attached model; with --no-causal-check the note gives the flag, not the Python keyword."""
    monkeypatch.setenv("COLUMNS", "250")
    page = tmp_path / "trace.html"
    args = ("trace", str(EXAMPLES / "color.png"), QUESTION, "--model", model, "--html", str(page))
    proc = run_main(*args, "--no-causal-check")
    assert proc.returncode == 0, proc.stderr
    html = page.read_text(encoding="utf-8")
    assert (UNTRAINED in html) is untrained and (f"warning: {UNTRAINED}" in proc.stdout) is untrained
    hint = "run `cliviz trace` without --no-causal-check"
    assert hint in proc.stdout and hint in html and "causal_check=True" not in proc.stdout + html
    as_json = json.loads(run_main(*args[:-2], "--no-causal-check", "--json").stdout)
    assert any(hint in note for note in as_json["map_notes"])


def test_python_notes_keep_the_keyword():
    """The API's own note still names the keyword a Python user passes."""
    t = good_trace()
    assert t.causal is None and "trace it with causal_check=True" in t.map_notes()[-1]


def test_dashboard_gate_map_names_untrained_gates():
    """The Explore tab's caption carries the warning above the map's notes, for gates that inject
    nothing (alpha = 0) and not for the trained bundled model."""
    from cliviz.app import callbacks_explore, callbacks_image
    from cliviz.app.backend import Backend, load_examples
    from cliviz.app.state import ALL_TOKENS
    from cliviz.model.loading import load_model

    closed = build_tiny("cli", open_alpha=0.0)
    trained = load_model("cli-tiny", device="cpu", dtype="float32")
    for (model, tok), untrained in ((closed, True), (trained, False)):
        backend = Backend(model=model, tokenizer=tok, examples=load_examples(), model_label="tiny")
        image, *_, question = callbacks_image.from_example(backend, "color")
        store, *_ = callbacks_explore.ask(backend, question, image)
        _, caption, _ = callbacks_explore.render_heatmap(json.loads(json.dumps(store)), ALL_TOKENS, None)
        note = find(caption, "untrained-note")
        assert (note is not None) is untrained
        if untrained:
            assert UNTRAINED in note.children and "warning" in note.className
            assert texts(find(caption, "map-notes"))[0] == note.children  # first, above the causal check


def test_trace_set_maps_name_untrained_gates():
    """A set's summary note (the data-set tab's and `cliviz figures`' captions) and its mean map say
    so when no trace injected anything; a set with real injections does not."""
    from cliviz.analyses.heatmaps import traceset_heatmap_figure
    from cliviz.analyses.summary import summarize
    from cliviz.tracing.traceset import TraceSet

    closed, open_ = TraceSet(untrained_set()), TraceSet(synthetic_traces(14, qtypes=("colour", "count")))
    assert UNTRAINED in summarize(closed).note and summarize(closed).max_injection_norm == pytest.approx(0.01)
    assert UNTRAINED not in summarize(open_).note and summarize(open_).untrained_note is None
    subtitle = traceset_heatmap_figure(closed).layout.title.subtitle.text
    assert UNTRAINED in subtitle and UNTRAINED not in traceset_heatmap_figure(open_).layout.title.subtitle.text


def test_dataset_tab_names_untrained_gates():
    """The data-set tab shows the warning above its table and in the maps' title."""
    from cliviz.app.backend import Backend
    from cliviz.app.callbacks_dataset import render_dataset
    from cliviz.tracing.traceset import TraceSet

    for traces, untrained in ((untrained_set(), True), (synthetic_traces(14, qtypes=("colour", "count")), False)):
        backend = Backend(model=None, tokenizer=None, traces=TraceSet(traces))
        heat, _, summary, message = render_dataset(backend, "answer")
        assert message == ""
        assert (find(summary, "dataset-untrained") is not None) is untrained
        assert (UNTRAINED in heat.layout.title.text) is untrained


# ------------------------------------------------------------------ (b) accuracy intervals in the app


def test_dataset_table_shows_wilson_intervals():
    """Every accuracy of the data-set tab comes with its 95% Wilson interval, per type and overall."""
    from cliviz.app.backend import Backend
    from cliviz.app.callbacks_dataset import summary_table
    from cliviz.tracing.traceset import TraceSet

    traces = synthetic_traces(14, qtypes=("colour", "count"))  # 7 per type, all answering "red"
    for t in traces[:5]:
        t.meta.answer = "blue"  # traces 0, 2, 4 are colour, 1, 3 count: colour 4/7, count 5/7 right
    table = summary_table(Backend(model=None, tokenizer=None, traces=TraceSet(traces)))
    header, body, foot = table.children
    assert texts(header) == ["question type", "traces", "accuracy", "95% CI"]
    rows = [texts(row) for row in body.children]
    assert rows == [
        ["colour", "7", "4/7 = 0.57", format_interval(*wilson_interval(4, 7))],
        ["count", "7", "5/7 = 0.71", format_interval(*wilson_interval(5, 7))],
    ]
    assert texts(foot) == ["all types", "14", "9/14 = 0.64", format_interval(*wilson_interval(9, 14))]
    assert "Wilson" in table.title


def test_dataset_table_without_references_shows_no_accuracy():
    from cliviz.app.backend import Backend
    from cliviz.app.callbacks_dataset import summary_table
    from cliviz.tracing.traceset import TraceSet

    traces = synthetic_traces(4, qtypes=("colour",))
    for t in traces:
        t.meta.reference_answer = None
    _, body, foot = summary_table(Backend(model=None, tokenizer=None, traces=TraceSet(traces))).children
    assert texts(body) == ["colour", "4", "—", "—"] and texts(foot) == ["all types", "4", "—", "—"]


# ------------------------------------------------------------------ (c) the smalls


def test_no_flag_shows_a_bool_metavar_in_any_help(monkeypatch):
    """Every command's help: flags stand alone (`--json`, not `--json <bool>`)."""
    from cliviz.cli.main import build_app

    monkeypatch.setenv("COLUMNS", "200")
    names = [c.name for c in build_app().registered_commands]
    assert len(names) == 14
    for name in names:
        proc = run_main(name, "--help")
        assert proc.returncode == 0 and "Usage" in proc.stdout, (name, proc.stderr)
        assert "<bool>" not in proc.stdout and "BOOLEAN" not in proc.stdout, name


def test_eval_title_keeps_paths_whole(tmp_path, monkeypatch):
    """A data path longer than the accuracy table is printed whole on one line, not cut mid-word."""
    monkeypatch.setenv("COLUMNS", "100")
    data = Path("a_rather_long_folder_name_for_the_held_out_data") / "examples_data_folder"
    (tmp_path / data.parent).mkdir()
    (tmp_path / data).symlink_to(EXAMPLES, target_is_directory=True)
    proc = run_main("eval", "--data", str(data), "--model", "cli-tiny", "--device", "cpu", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert any(str(data) in line for line in proc.stdout.splitlines()), proc.stdout
    assert "0.65–1.00" in proc.stdout  # 7 of 7 right, with its interval


def test_keep_words_whole_widens_only_to_the_longest_word():
    from rich.table import Table

    from cliviz.cli.render import keep_words_whole

    table = keep_words_whole(Table(title="m on /a/very/long/path/to/some/data", caption="short words"))
    assert table.min_width == len("/a/very/long/path/to/some/data") + 2
    assert keep_words_whole(Table(title="a b", min_width=30)).min_width == 30


def test_compare_page_title_names_models_and_counts():
    """compare.html is titled by its models, data set and question count; so is its chart."""
    import pandas as pd

    from cliviz.analyses.compare import comparison_page

    rows = [
        (m, q, acc, n)
        for m in ("cli-a", "cli-b")
        for q, acc, n in (("color", 1.0, 3), ("overall", 0.5, 6), ("count", 0.0, 3))
    ]
    table = pd.DataFrame(rows, columns=["model", "qtype", "accuracy", "n"]).assign(fusion="cli")
    table["ci_low"] = [wilson_interval(a * n, n)[0] for a, n in zip(table.accuracy, table.n)]
    table["ci_high"] = [wilson_interval(a * n, n)[1] for a, n in zip(table.accuracy, table.n)]
    page = comparison_page(table, pd.DataFrame(), data="held-out")
    assert "<title>Comparison of cli-a, cli-b on held-out (6 questions each)</title>" in page
    chart = json.loads(re.search(r'"title":\{"text":("accuracy of [^"]*")', page).group(1))
    assert "cli-a, cli-b" in chart and "6 questions each" in chart and "Wilson" in chart


def test_entropy_plot_has_one_dark_line_and_distinct_colours():
    """Seven question types and the all-traces line: eight colours, only the all-traces line dark."""
    from cliviz.analyses.summary import summarize
    from cliviz.app.callbacks_dataset import entropy_figure
    from cliviz.tracing.traceset import TraceSet

    qtypes = ("color", "count", "glyph", "position", "relation", "shape", "size")
    fig = entropy_figure(summarize(TraceSet(synthetic_traces(21, qtypes=qtypes)), pool=True, variance=False))
    colours = [tr.line.color for tr in fig.data]
    assert len(colours) == 8 and len(set(colours)) == 8

    def dark(colour: str) -> bool:  # every channel below 0x70: black or dark grey
        hex_ = colour.lstrip("#")
        hex_ = "".join(c * 2 for c in hex_) if len(hex_) == 3 else hex_
        return max(int(hex_[i : i + 2], 16) for i in (0, 2, 4)) < 0x70

    assert [fig.data[i].name.split(" (")[0] for i, c in enumerate(colours) if dark(c)] == ["all traces"]


def test_trace_set_note_ends_with_one_period():
    """'routing, not importance.' once, not '..'."""
    from cliviz.analyses.heatmaps import traceset_notes
    from cliviz.tracing.traceset import TraceSet

    traces = synthetic_traces(4, qtypes=("colour",))
    for t in traces:
        t.meta.injection_off_answer, t.meta.injection_off_changed = "red", False
        t.meta.injection_off_delta_logprob = 0.0  # the injection does not matter for these answers
    note = traceset_notes(TraceSet(traces))[-1]
    assert note.endswith("routing, not importance.") and ".." not in note


def test_all_black_image_message_reads_sensibly():
    """An all-black picture is dark, just not the scenes' background colour: the line says which colour."""
    from cliviz.scene_check import scene_mismatch

    black = scene_mismatch(Image.new("RGB", (64, 64)))
    assert black.startswith("none of its pixels has the scenes' background colour RGB 24, 24, 28")
    assert "only 0%" not in black and "dark background" not in black
    half = Image.new("RGB", (64, 64), (200, 200, 200))
    half.paste(Image.new("RGB", (64, 16), (24, 24, 28)))
    assert scene_mismatch(half).startswith("only 25% of its pixels have the scenes' background colour")


def test_trace_repr_is_a_short_summary():
    t = hand_trace(np.full((2, 5, 3), 1 / 3), [3, 4])
    text = repr(t)
    assert text.startswith("Trace('what colour is the square?' -> 'red'") and "gates 2x5x3" in text
    assert "array" not in text and "\n" not in text and len(text) < 200


def test_plain_progress_bars_outside_a_kernel_change_nothing():
    from cliviz.progress_bars import plain_bars_without_widgets

    assert plain_bars_without_widgets() is False  # pytest is not a Jupyter kernel


def test_notebook_kernel_shows_no_ipywidgets_warning():
    """In a Jupyter kernel, importing cliviz and then transformers (which imports `tqdm.auto`) prints
    no `TqdmWarning: IProgress not found` (the quickstart's first cell showed it)."""
    import nbformat
    from nbclient import NotebookClient

    cell = "import cliviz\nimport transformers\nimport tqdm.auto\nprint('bar', tqdm.auto.tqdm.__module__)"
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(cell)])
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}).execute()
    streams = [o.get("text", "") for o in nb.cells[0].outputs if o.get("output_type") == "stream"]
    assert any(s.startswith("bar tqdm.") for s in streams), streams
    assert not any("IProgress" in s or "TqdmWarning" in s for s in streams), streams


# ------------------------------------------------------------------ the served dashboard


@pytest.fixture(scope="module")
def attached_dashboard(tmp_path_factory):
    """The dashboard served for the bundled, freshly attached model and a trace set it wrote: (URL, the
    number of traces answered right, of how many)."""
    from werkzeug.serving import make_server

    from cliviz.app import create_app
    from cliviz.inputs import load_image
    from cliviz.model.loading import load_model
    from cliviz.tracing import trace
    from cliviz.tracing.traceset import write_traces

    model, tok = load_model("cli-attached-tiny", device="cpu", dtype="float32")
    samples = [json.loads(line) for line in (EXAMPLES / "samples.jsonl").read_text().splitlines() if line.strip()]
    traces = [
        trace(model, tok, load_image(EXAMPLES / s["image"]), s["question"], qtype=s["qtype"], reference=s["answer"])
        for s in samples
    ]
    path = tmp_path_factory.mktemp("attached-traces") / "traces.parquet"
    write_traces(path, traces)
    right = sum(t.meta.answer.strip() == t.meta.reference_answer.strip() for t in traces)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    app = create_app(REPO / "assets" / "models" / "cli-attached-tiny", path, device="cpu", dtype="float32")
    server = make_server("127.0.0.1", 0, app.server, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/", right, len(traces)
    server.shutdown()
    thread.join(timeout=10)


@pytest.mark.browser
def test_served_dashboard_names_untrained_gates_and_intervals(browser, attached_dashboard):
    """In the browser: the Explore map's warning, the data-set tab's warning and its accuracy interval."""
    from playwright.sync_api import expect

    url, right, n = attached_dashboard
    context = browser.new_context(viewport={"width": 1440, "height": 1300})
    try:
        page = context.new_page()
        page.set_default_timeout(60_000)
        page.goto(url)
        page.locator("button.example").filter(has_text="color").click()
        expect(page.locator("#image-name")).to_have_text("example: color.png")  # stored before Ask
        page.locator("#ask").click()
        expect(page.locator("#untrained-note")).to_contain_text(UNTRAINED)
        expect(page.locator("#untrained-note")).to_be_visible()
        page.get_by_text("Dataset", exact=True).click()
        expect(page.locator("#dataset-untrained")).to_contain_text(UNTRAINED)
        expect(page.locator("#dataset-heatmaps .gtitle")).to_contain_text("untrained")
        expect(page.locator("#dataset-total")).to_contain_text(format_interval(*wilson_interval(right, n)))
        expect(page.locator("#dataset-table thead")).to_contain_text("95% CI")
    finally:
        context.close()
