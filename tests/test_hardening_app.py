"""Issue 18, items 7 and 10 on the dashboard: bounded memory per upload, forged requests answered
cleanly, and a model without gates shown as such. The 20-client load test with timings and peak
memory is `benchmarks/bench_app_load.py`; here the bound itself is checked, untimed.
"""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import textwrap

import pytest
from PIL import Image

from conftest import REPO, build_tiny

SIDE = 6300  # 39.7 MP: just under the loader's 40 MP limit


def worst_case_url(mode: str = "RGB") -> str:
    buf = io.BytesIO()
    Image.new(mode, (SIDE, SIDE), (200, 30, 30, 255)[: len(mode)]).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


@pytest.fixture(scope="module")
def app_and_backend():
    from cliviz.app.backend import Backend, load_examples
    from cliviz.app.factory import build_app

    model, tok = build_tiny("cli")
    backend = Backend(model=model, tokenizer=tok, examples=load_examples(), model_label="tiny")
    return build_app(backend), backend


# ----------------------------------------------------------------------------------------- item 7


@pytest.mark.parametrize("mode", ["RGB", "RGBA"])
def test_large_upload_is_shrunk_on_arrival(mode):
    from cliviz.app.state import MAX_SIDE, decode_upload, image_from_payload, image_payload

    raw, image = decode_upload(worst_case_url(mode), "big.png")
    assert image.mode == "RGB" and max(image.size) == MAX_SIDE and image.size[0] == image.size[1]
    assert image.getpixel((500, 500)) == (200, 30, 30)
    kept = Image.open(io.BytesIO(raw))
    assert kept.size == image.size  # what the browser keeps, and sends back, is the small picture
    again = image_from_payload(image_payload("big.png", raw, image))
    assert again.size == image.size and again.tobytes() == image.tobytes()


DECODER = textwrap.dedent("""
    import base64, io, os, sys, threading
    from PIL import Image
    from cliviz.app.state import DECODE_SLOTS, decode_upload

    def rss(field):
        with open(f"/proc/{{os.getpid()}}/status") as fh:
            return next(int(line.split()[1]) * 1024 for line in fh if line.startswith(field + ":"))

    buf = io.BytesIO()
    Image.new("RGB", ({side}, {side}), (200, 30, 30)).save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    base = rss("VmRSS")
    threads = [threading.Thread(target=decode_upload, args=(url, f"{{i}}.png")) for i in range({n})]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(DECODE_SLOTS, rss("VmHWM") - base)
""")


def test_concurrent_uploads_are_decoded_under_a_bound():
    """Eight users uploading a 40 MP picture at once took ~3 GB (each decoded in full, in parallel)."""
    n = 8
    proc = subprocess.run(
        [sys.executable, "-c", DECODER.format(side=SIDE, n=n)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr
    slots, grown = map(int, proc.stdout.split())
    decoded = SIDE * SIDE * 4  # Pillow keeps RGB at 4 bytes a pixel
    assert slots < n
    assert grown < (slots + 2) * decoded, f"peak grew by {grown / 1e6:.0f} MB for {n} concurrent uploads"


def _outputs_of(key: str):
    parts = key[2:-2].split("...") if key.startswith("..") else [key]
    specs = []
    for part in parts:
        ident, prop = part.rsplit(".", 1)
        specs.append([] if ident.startswith("{") else {"id": ident, "property": prop.split("@")[0]})
    return specs if key.startswith("..") else specs[0]


def _input(spec: dict, value):
    ident = spec["id"]
    if isinstance(ident, str) and ident.startswith("{"):
        pattern = json.loads(ident)
        concrete = {k: ("x" if isinstance(v, list) else v) for k, v in pattern.items()}
        return [{"id": concrete, "property": spec["property"], "value": value}]
    return {"id": ident, "property": spec["property"], "value": value}


FORGED = [
    123,
    -1,
    1e308,
    True,
    None,
    "plain",
    "data:image/png;base64,AAAA",
    ["x", 1],
    [[1, 2]],
    {"a": 1},
    {"points": [{"x": {}, "y": []}]},
    {"points": [{"x": "V1", "y": "L99"}]},
    {"trace": {"meta": 5}},
    {"trace": {"meta": {}}, "image": {"data": 7}},
    {"data": ["x"], "name": {"n": 1}},
    {"trace": {"meta": {"question": 1}, "token_ids": [10**30]}},
]


def test_forged_callback_inputs_get_a_clean_answer(app_and_backend):
    """Every server callback, every input and state replaced by a value of the wrong type: never HTTP 500."""
    app, _ = app_and_backend
    client = app.server.test_client()
    callbacks = {k: cb for k, cb in app.callback_map.items() if cb.get("callback") is not None}
    assert len(callbacks) >= 9
    failures = []
    for key, cb in callbacks.items():
        for value in FORGED:
            body = {
                "output": key,
                "outputs": _outputs_of(key),
                "inputs": [_input(s, value) for s in cb["inputs"]],
                "state": [_input(s, value) for s in cb.get("state", [])],
                "changedPropIds": [f"{cb['inputs'][0]['id']}.{cb['inputs'][0]['property']}"],
            }
            response = client.post("/_dash-update-component", json=body)
            if response.status_code >= 500 or b"Traceback" in response.data:
                failures.append((key[:60], repr(value)[:40], response.status_code))
    assert not failures, failures


def test_forged_question_is_reported_on_the_page(app_and_backend):
    from cliviz.app import callbacks_explore, callbacks_image

    _, backend = app_and_backend
    image, *_ = callbacks_image.from_example(backend, "color")
    *_, message = callbacks_explore.ask(backend, {"q": "what color ?"}, image)
    assert "the question must be text" in message.children
    *_, message = callbacks_image.from_upload(12345, ["not", "a", "name"])
    assert "Cannot use this file" in message.children


# ----------------------------------------------------------------------------------------- item 10


def test_model_without_gates_shows_its_answer():
    """`cliviz dash --model projector-tiny` said "the stored answer is malformed" in every panel."""
    from cliviz.app import callbacks_explore, callbacks_image
    from cliviz.app.backend import Backend, load_examples
    from cliviz.app.state import trace_from_dict
    from cliviz.model.loading import load_model

    model, tok = load_model("projector-tiny", device="cpu")
    backend = Backend(model=model, tokenizer=tok, examples=load_examples(), model_label="projector-tiny")
    image, *_ = callbacks_image.from_example(backend, "color")
    store, _, _, message = callbacks_explore.ask(backend, "what color is the triangle ?", image)
    assert message == ""
    store = json.loads(json.dumps(store))  # as the browser sends it back
    trace = trace_from_dict(store["trace"])
    assert trace.gates.shape == (0, trace.n_tokens, len(model.config.vision_layers))
    panel = str(callbacks_explore.render_answer(store))
    assert "malformed" not in panel and "blue" in panel
    figure, caption, tag = callbacks_explore.render_heatmap(store, "answer", None)
    text = figure.layout.annotations[0].text
    assert "has no gates" in text and "projector" in text and tag == "none"


# ----------------------------------------------------------------------------------------- issue 29, item 7


def _body(key: str, cb: dict, value=None) -> dict:
    return {
        "output": key,
        "outputs": _outputs_of(key),
        "inputs": [_input(s, value) for s in cb["inputs"]],
        "state": [_input(s, value) for s in cb.get("state", [])],
        "changedPropIds": [f"{cb['inputs'][0]['id']}.{cb['inputs'][0]['property']}"],
    }


def _nested(depth: int, kind: str = "list") -> str:
    return "[" * depth + "]" * depth if kind == "list" else '{"a":' * depth + "1" + "}" * depth


def test_forged_callback_bodies_get_400(app_and_backend):
    """Dash answered these with 500 (RecursionError, KeyError: callback not found, AttributeError)."""
    from cliviz.app.guard import MAX_BODY_DEPTH

    app, _ = app_and_backend
    client = app.server.test_client()
    key, cb = next((k, cb) for k, cb in app.callback_map.items() if k == "answer-panel.children")
    too_deep = _body(key, cb)
    too_deep["inputs"][0]["value"] = json.loads(_nested(MAX_BODY_DEPTH))  # valid JSON, past the limit
    wrong_count = _body(key, cb)
    wrong_count["inputs"].append({"id": "x", "property": "y", "value": 1})
    forged = {
        "list nested 100,000 deep": _nested(100_000),
        "object nested 5,000 deep": _nested(5_000, "dict"),
        "a store nested past the limit": json.dumps(too_deep),
        "an unknown output": json.dumps({**_body(key, cb), "output": "no-such-component.children"}),
        "no output": json.dumps({k: v for k, v in _body(key, cb).items() if k != "output"}),
        "a list body": json.dumps([_body(key, cb)]),
        "a number body": "5",
        "inputs not a list": json.dumps({**_body(key, cb), "inputs": {"id": "trace-store"}}),
        "one input too many": json.dumps(wrong_count),
        "an input without a property": json.dumps({**_body(key, cb), "inputs": [{"id": "trace-store", "value": 1}]}),
        "changedPropIds not strings": json.dumps({**_body(key, cb), "changedPropIds": [[1]]}),
        "outputs of numbers": json.dumps({**_body(key, cb), "outputs": [1, 2]}),
    }
    for what, data in forged.items():
        response = client.post("/_dash-update-component", data=data, content_type="application/json")
        text = response.get_data(as_text=True)
        assert response.status_code == 400, (what, response.status_code)
        assert text.startswith("bad callback request: ") and text.count("\n") == 1 and "Traceback" not in text, what


def test_well_formed_callback_requests_pass_the_guard(app_and_backend):
    """The checks refuse only malformed bodies: every callback of the app, asked as the page asks, is dispatched."""
    app, _ = app_and_backend
    client = app.server.test_client()
    callbacks = {k: cb for k, cb in app.callback_map.items() if cb.get("callback") is not None}
    statuses = {
        key: client.post("/_dash-update-component", json=_body(key, cb)).status_code for key, cb in callbacks.items()
    }
    assert set(statuses.values()) <= {200, 204}, statuses


def _raw_get(port: int, path: str) -> tuple[int, bytes]:
    """GET `path` byte for byte (an HTTP client library would normalise `..` away before sending)."""
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode("latin-1"))
        data = b""
        while chunk := sock.recv(1 << 16):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


TRAVERSALS = [
    "/_dash-component-suites/../../../../etc/passwd",
    "/_dash-component-suites/dash/../../../../../../etc/passwd",
    "/_dash-component-suites/dash/deps/../../../../../../etc/passwd",
    "/_dash-component-suites/dash/deps/../dash.py",  # a real file of the package, but not a registered asset
    "/_dash-component-suites/dash/deps/%2e%2e/dash.py",
    "/_dash-component-suites/dash/..%2f..%2f..%2fetc%2fpasswd",
    "/_dash-component-suites/dash/deps%5c..%5c..%5cdash.py",
    "/_dash-component-suites/dash//etc/passwd",
    "/_dash-component-suites/dash/./deps/react@18.3.1.min.js",
    "/_dash-component-suites/dash/dash.py",
    "/_dash-component-suites/dash/__init__.py",
    "/_dash-component-suites/cliviz/app/backend.py",
    "/_dash-component-suites/os/os.py",
    "/_dash-component-suites/dash/nosuch.js",
    "/assets/../guard.py",
    "/assets/..%2f..%2fcliviz%2ferrors.py",
]


def test_nothing_outside_the_registered_assets_is_served(app_and_backend):
    """Path traversal under /_dash-component-suites/ answered 500; now 404, against the real server
    (werkzeug in a thread, raw requests), and every asset it does serve is a registered package file."""
    import pkgutil
    import threading

    from werkzeug.serving import make_server

    app, _ = app_and_backend
    server = make_server("127.0.0.1", 0, app.server, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        for path in TRAVERSALS:
            status, body = _raw_get(server.server_port, path)
            assert status == 404, (path, status)
            assert b"root:" not in body and b"import " not in body and b"Traceback" not in body, path
        served = missing = 0
        for package, files in app.registered_paths.items():
            for name in sorted(files):
                status, body = _raw_get(server.server_port, f"/_dash-component-suites/{package}/{name}")
                try:
                    expected = pkgutil.get_data(package, name)
                except FileNotFoundError:  # registered by dash, not shipped by the installed package
                    assert status == 404, (package, name)
                    missing += 1
                    continue
                assert status == 200 and body == expected, (package, name)
                served += 1
        assert served >= 10
    finally:
        server.shutdown()
        thread.join()
