"""The dashboard's server side without a browser: store payloads, upload checks, callback bodies."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
from dash import no_update

from cliviz.app import callbacks_ablation, callbacks_explore, callbacks_image
from cliviz.app.backend import Backend, load_examples
from cliviz.app.state import (
    ALL_TOKENS,
    MAX_UPLOAD_BYTES,
    decode_upload,
    image_from_payload,
    parse_cell,
    parse_selection,
    safe_name,
    trace_from_dict,
)
from cliviz.errors import CLIVizError

from conftest import EXAMPLES


def data_url(raw: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(raw).decode("ascii")


@pytest.fixture(scope="module")
def backend(tiny_cli):
    model, tok = tiny_cli
    return Backend(model=model, tokenizer=tok, examples=load_examples(), model_label="tiny")


@pytest.fixture(scope="module")
def asked(backend):
    """(trace-store as the browser sends it back, the Trace the server recorded)."""
    image, *_, question = callbacks_image.from_example(backend, "color")
    store, selection, cell, message = callbacks_explore.ask(backend, question, image)
    assert message == "" and selection == ALL_TOKENS and cell is None
    return json.loads(json.dumps(store)), trace_from_dict(store["trace"])


def test_upload_is_validated_and_size_limited():
    raw = (EXAMPLES / "glyph.png").read_bytes()
    got, image = decode_upload(data_url(raw), "glyph.png")
    assert got == raw and image.mode == "RGB" and image.size == (64, 64)
    with pytest.raises(CLIVizError, match="not a readable image: notes.png"):
        decode_upload(data_url(b"plain text, not a picture", "text/plain"), "notes.png")
    with pytest.raises(CLIVizError, match="too large"):
        decode_upload(data_url(b"\0" * (MAX_UPLOAD_BYTES + 10)), "big.png")
    with pytest.raises(CLIVizError, match="empty"):
        decode_upload("data:image/png;base64,", "e.png")
    with pytest.raises(CLIVizError, match="base64"):
        decode_upload("data:image/png;base64,@@@@", "x.png")
    with pytest.raises(CLIVizError, match="data URL"):
        decode_upload("/etc/passwd", "x.png")  # a path is never opened
    assert (
        safe_name("../../etc/passwd") == "passwd"
        and safe_name("C:\\x\\a.png") == "a.png"
        and safe_name(None) == "upload"
    )


def test_upload_callback_reports_errors_on_the_page():
    store, preview, name, message = callbacks_image.from_upload(data_url(b"nope"), "fake.png")
    assert store is no_update and "Cannot use this file" in message.children and "fake.png" in message.children
    store, preview, name, message = callbacks_image.from_upload(
        data_url((EXAMPLES / "count.png").read_bytes()), "c.png"
    )
    assert message == "" and preview.startswith("data:image/png;base64,") and name == "c.png (64x64)"
    assert image_from_payload(store).size == (64, 64)


def test_examples_are_chosen_by_name_only(backend):
    assert set(backend.examples) == {"color", "shape", "count", "position", "relation", "glyph", "size"}
    *_, question = callbacks_image.from_example(backend, "glyph")
    assert question == "what digit is in the corner ?"
    out = callbacks_image.from_example(backend, "../../cliviz/errors")
    assert out[0] is no_update and "Unknown example" in out[3].children


def test_questions_outside_the_vocabulary_are_refused(backend, asked):
    store, _ = asked
    *_, message = callbacks_explore.ask(backend, "what color is the zebra ?", store["image"])
    assert "'zebra'" in message.children  # the tokenizer would have turned it into [UNK] silently
    *_, message = callbacks_explore.ask(backend, "   ", store["image"])
    assert "empty" in message.children
    *_, message = callbacks_explore.ask(backend, "what color is the triangle ?", None)
    assert "Choose an image" in message.children


def test_trace_survives_the_browser_store(asked):
    store, trace = asked
    back = trace_from_dict(store["trace"])
    for name in ("gates", "injection_norm", "answer_positions", "answer_logprobs", "topk_ids", "token_ids"):
        np.testing.assert_array_equal(getattr(back, name), getattr(trace, name))
    assert back.meta == trace.meta and back.token_texts == trace.token_texts
    broken = dict(store["trace"], gates=[[1.0, 2.0]])
    with pytest.raises(CLIVizError, match="ask again"):
        trace_from_dict(broken)


def test_token_selection_redraws_from_the_store(asked):
    from cliviz.analyses.heatmaps import gate_matrix

    store, trace = asked
    fig_all, _, tag_all = callbacks_explore.render_heatmap(store, ALL_TOKENS, None)
    assert tag_all == "all" and "all" in fig_all.layout.title.text
    np.testing.assert_allclose(fig_all.data[0].z, gate_matrix(trace, "answer"), rtol=1e-6)
    step = callbacks_explore.select_token({"type": "token", "step": 0}, [1])
    fig0, _, tag0 = callbacks_explore.render_heatmap(
        store, step, {"llm_layer": trace.meta.injection_layers[0], "vision_layer": trace.meta.vision_layers[-1]}
    )
    assert step == 0 and tag0 == "step-0" and repr(trace.answer_texts[0]) in fig0.layout.title.text
    np.testing.assert_allclose(fig0.data[0].z, gate_matrix(trace, int(trace.answer_positions[0])), rtol=1e-6)
    assert len(fig0.layout.shapes) == 1  # the ablated cell is outlined
    assert callbacks_explore.select_token({"type": "token", "step": -1}, [3]) == ALL_TOKENS
    assert callbacks_explore.select_token({"type": "token", "step": 1}, [None]) is no_update  # re-render, no click
    assert (
        parse_selection(99, 2) == ALL_TOKENS and parse_selection(True, 2) == ALL_TOKENS and parse_selection(1, 2) == 1
    )


def test_cell_click_runs_single_cell_ablation(backend, asked):
    store, trace = asked
    assert parse_cell({"points": [{"x": "V4", "y": "L2"}]}) == (2, 4)
    assert parse_cell({"points": [{"x": 3, "y": 1}]}) is None and parse_cell(None) is None
    llm, vision = trace.meta.injection_layers[1], trace.meta.vision_layers[2]
    table, cell = callbacks_ablation.ablate(
        backend, {"points": [{"x": f"V{vision}", "y": f"L{llm}"}]}, store, "knockout"
    )
    assert cell == {"llm_layer": llm, "vision_layer": vision}
    text = json.dumps(table.to_plotly_json(), default=str)
    assert f"L{llm} \\u00d7 V{vision} knocked out" in text and trace.answer_texts[0] in text
    assert "renormalises the remaining gates" in text  # a knockout cell is not a layer's importance
    bad, cell = callbacks_ablation.ablate(backend, {"points": [{"x": "V99", "y": f"L{llm}"}]}, store, "knockout")
    assert cell is no_update and "not a gate cell" in bad.children


def test_static_maps_say_what_they_are_next_to_the_heatmap():
    from cliviz.tracing.causal import map_kind_note

    from conftest import build_tiny

    model, tok = build_tiny("deepstack")
    deep = Backend(model=model, tokenizer=tok, examples=load_examples(), model_label="deepstack")
    image, *_, question = callbacks_image.from_example(deep, "color")
    store, *_ = callbacks_explore.ask(deep, question, image)
    fig, caption, _ = callbacks_explore.render_heatmap(json.loads(json.dumps(store)), ALL_TOKENS, None)
    text = json.dumps([c.to_plotly_json() for c in caption], default=str, ensure_ascii=False)
    assert fig.data[0].z.shape == (len(model.config.injection_layers), 1)  # the 3 x 1 map of ones ...
    note = map_kind_note("deepstack", model.config.injection_layers, model.config.vision_layers)
    assert note in text  # ... explained
    assert "injection off (all layers)" in text and "causal-check" in text


def test_attribution_panel_names_method_target_and_saturation():
    from cliviz.app import callbacks_attribution
    from cliviz.model.loading import load_model

    model, tok = load_model("cli-tiny", device="cpu", dtype="float32")
    bundled = Backend(model=model, tokenizer=tok, examples=load_examples(), model_label="cli-tiny")
    image, *_, question = callbacks_image.from_example(bundled, "glyph")
    store, *_ = callbacks_explore.ask(bundled, question, image)
    saturated = callbacks_attribution.attribution_figures(bundled, store, "logprob")
    assert saturated["method"] == "gradient × input (gxi), target logprob"
    notes = json.dumps(
        [n.to_plotly_json() for n in callbacks_attribution.attribution_notes(saturated)],
        default=str,
        ensure_ascii=False,
    )
    assert "saturated answer" in notes and "margin" in notes
    margin = callbacks_attribution.attribution_figures(bundled, store, "margin")
    assert margin["warnings"] == [] and margin["step_warnings"] == [[]] * len(margin["words"])
    assert "runner-up" in margin["description"]
    assert callbacks_attribution.attribution_figures(bundled, store, "bogus")["method"].endswith("target margin")
    assert callbacks_attribution.attribution_figures(bundled, store)["method"].endswith("target margin")  # default


def test_attribution_warnings_are_judged_per_answer_token():
    """A saturated `<eos>` (step 1) does not mark the content token's (step 0) maps."""
    from cliviz.app import callbacks_attribution

    payload = {"description": "d", "warnings": ["untrained"], "step_warnings": [[], ["eos saturated"]]}

    def shown(selection):
        return [n.children for n in callbacks_attribution.attribution_notes(payload, selection)][1:]

    assert shown(0) == ["untrained"]
    assert shown(1) == ["untrained", "eos saturated"]
    assert shown("answer") == ["untrained", "eos saturated"]  # all tokens: every token's warnings


def test_bad_model_or_trace_file_is_one_clear_error(tmp_path, random_model_dir):
    from cliviz.app.factory import create_app

    with pytest.raises(CLIVizError, match="not found"):
        create_app(tmp_path / "no-such-model")
    bad = tmp_path / "t.parquet"
    bad.write_text("not parquet")
    with pytest.raises(CLIVizError, match="Parquet"):
        create_app(random_model_dir, bad)


def test_port_check(tmp_path):
    import socket

    from cliviz.cli.dash_cmd import check_port_free

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(CLIVizError, match=f"port {port} on 127.0.0.1 is already in use"):
            check_port_free("127.0.0.1", port)
    check_port_free("127.0.0.1", port)  # free again
    with pytest.raises(CLIVizError, match="cannot listen on host"):
        check_port_free("no-such-host.invalid", 8050)
