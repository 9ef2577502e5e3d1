"""The dashboard in a real browser: headless system Chromium driven by Playwright.

One browser for the session; the app (random-weight model from `random_model_dir`, a small trace
set written by `write_traces`) is served in-process by werkzeug on a free port. Assertions read
what the page rendered (text, SVG titles, the heatmap's raster image), never `gd.data`.
Screenshots go to the pytest tmp folder, and a copy of each to `$CLIVIZ_SHOTS` when that is set.
The browser is the system Chromium found on PATH (`$BROWSER_PATH` overrides, as for kaleido).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
from playwright.sync_api import Page, expect
from werkzeug.serving import make_server

from conftest import EXAMPLES

pytestmark = pytest.mark.browser

TIMEOUT_MS = 60_000  # the box is shared with training jobs: be patient, not flaky
expect.set_options(timeout=TIMEOUT_MS)


def samples() -> list[dict]:
    return [json.loads(line) for line in (EXAMPLES / "samples.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture(scope="session")
def traces_file(random_model_dir, tmp_path_factory) -> Path:
    """One trace per bundled example, with question type and reference answer."""
    from cliviz.inputs import load_image
    from cliviz.model.loading import load_model
    from cliviz.tracing import trace
    from cliviz.tracing.traceset import write_traces

    model, tok = load_model(random_model_dir, device="cpu", dtype="float32")
    traces = [
        trace(model, tok, load_image(EXAMPLES / s["image"]), s["question"], qtype=s["qtype"], reference=s["answer"])
        for s in samples()
    ]
    return write_traces(tmp_path_factory.mktemp("traces") / "examples.parquet", traces)


@pytest.fixture(scope="session")
def served(random_model_dir, traces_file):
    """(base URL, app) of the dashboard served from a thread."""
    from cliviz.app import create_app

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per request in the test log
    app = create_app(random_model_dir, traces_file, device="cpu", dtype="float32")
    server = make_server("127.0.0.1", 0, app.server, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/", app
    server.shutdown()
    thread.join(timeout=10)


def open_page(browser, url: str) -> Page:
    context = browser.new_context(viewport={"width": 1440, "height": 1300})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(url)
    expect(page.locator("#upload")).to_be_visible()
    return page


@pytest.fixture
def page(browser, served):
    p = open_page(browser, served[0])
    yield p
    p.context.close()


def shot(page: Page, tmp_path: Path, name: str) -> Path:
    path = tmp_path / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    if os.environ.get("CLIVIZ_SHOTS"):  # a folder to keep the screenshots in, for a human to look at
        keep = Path(os.environ["CLIVIZ_SHOTS"])
        keep.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, keep / path.name)
    return path


def expected_trace(app, image_path: Path, question: str):
    """The answer the server's own model gives (greedy, deterministic)."""
    from cliviz.inputs import load_image

    return app.cliviz_backend.ask(load_image(image_path), question)


def upload(page: Page, path: Path, accepted: bool = True) -> None:
    """Choose `path` in the upload box; for a file the app accepts, wait until its round trip to the
    server has stored it (the caption names it), as a user sees the picture before pressing Ask."""
    page.locator("#upload input[type=file]").set_input_files(str(path))
    if accepted:
        expect(page.locator("#image-name")).to_contain_text(path.name)


def pick_example(page: Page, name: str) -> None:
    """Click a bundled example and wait until the server has stored it (the caption names it)."""
    page.locator("button.example").filter(has_text=name).click()
    expect(page.locator("#image-name")).to_have_text(f"example: {name}.png")


def ask(page: Page, question: str) -> None:
    page.locator("#question").fill(question)
    page.locator("#ask").click()


def heatmap_title(page: Page) -> str:
    return page.locator("#heatmap .gtitle").text_content()


def heatmap_raster(page: Page) -> str:
    """The heatmap as plotly rendered it: the data URL of its <image> (one pixel per cell)."""
    return page.locator("#heatmap .hm image").first.get_attribute("href")


def wait_raster(page: Page, href: str, same: bool) -> None:
    """Wait until the heatmap raster differs from (or equals) `href`: plotly draws asynchronously."""
    page.wait_for_function(
        """([href, same]) => { const i = document.querySelector('#heatmap .hm image');
                               return !!i && (i.getAttribute('href') === href) === same; }""",
        arg=[href, same],
    )


def answer_and_heatmap(page: Page, question: str, answer: str, n_answer: int) -> None:
    expect(page.locator("#answer-question")).to_have_text(question)
    expect(page.locator("#answer-text")).to_have_text(answer)
    expect(page.locator("#heatmap .gtitle")).to_contain_text(f"all {n_answer} answer tokens")
    expect(page.locator("#heatmap .hm image")).to_have_count(1)


# ------------------------------------------------------------------------------------------ tests


def test_upload_ask_shows_answer_heatmap_and_attributions(page, served, tmp_path):
    image, question = EXAMPLES / "color.png", "what color is the triangle ?"
    upload(page, image)
    expect(page.locator("#image-name")).to_contain_text("color.png")
    assert page.locator("#image-preview").get_attribute("src").startswith("data:image/png;base64,")
    ask(page, question)
    want = expected_trace(served[1], image, question)
    answer_and_heatmap(page, question, want.meta.answer or "(empty)", len(want.answer_texts))
    expect(page.locator("#heatmap-caption")).to_have_attribute("data-selection", "all")
    # the token strip: one button per answer step plus "all answer tokens"
    expect(page.locator("#token-strip button")).to_have_count(len(want.answer_texts) + 1)
    # attributions for the same answer arrive from their own callback
    expect(page.locator("#attr-caption")).to_contain_text("answer token 0")
    expect(page.locator("#attr-overlay .main-svg").first).to_be_visible()
    shot(page, tmp_path, "explore")


def test_token_click_redraws_heatmap(page, served, tmp_path):
    image, question = EXAMPLES / "count.png", "how many objects are there ?"
    pick_example(page, "count")
    expect(page.locator("#question")).to_have_value(question)
    page.locator("#ask").click()
    want = expected_trace(served[1], image, question)
    answer_and_heatmap(page, question, want.meta.answer or "(empty)", len(want.answer_texts))
    before_title, before_raster = heatmap_title(page), heatmap_raster(page)

    page.locator("#token-strip button").nth(0).click()
    expect(page.locator("#heatmap .gtitle")).to_contain_text(f"answer token 0: '{want.answer_texts[0]}'")
    expect(page.locator("#heatmap-caption")).to_have_attribute("data-selection", "step-0")
    expect(page.locator("#token-strip button").nth(0)).to_have_class("tok tok-answer selected")
    assert heatmap_title(page) != before_title
    expect(page.locator("#attr-caption")).to_contain_text("answer token 0")
    if len(want.answer_texts) > 1:  # another step: other gates, so another picture
        wait_raster(page, before_raster, same=False)  # one step differs from the mean over steps
        step0 = heatmap_raster(page)
        page.locator("#token-strip button").nth(1).click()
        expect(page.locator("#heatmap-caption")).to_have_attribute("data-selection", "step-1")
        expect(page.locator("#attr-caption")).to_contain_text("answer token 1")
        wait_raster(page, step0, same=False)
    page.locator("#token-strip button", has_text="all answer tokens").click()
    expect(page.locator("#heatmap-caption")).to_have_attribute("data-selection", "all")
    wait_raster(page, before_raster, same=True)  # back to the mean: the same picture as first drawn
    shot(page, tmp_path, "explore-token")


def click_cell(page: Page, row: int, col: int, n_rows: int, n_cols: int) -> None:
    """Click the centre of heatmap cell (row, col) on the plot area."""
    box = page.locator("#heatmap .nsewdrag").first.bounding_box()
    page.mouse.click(box["x"] + box["width"] * (col + 0.5) / n_cols, box["y"] + box["height"] * (row + 0.5) / n_rows)


def test_cell_click_ablates_and_reruns(page, served, tmp_path):
    image, question = EXAMPLES / "shape.png", "what shape is the purple object ?"
    pick_example(page, "shape")
    expect(page.locator("#question")).to_have_value(question)
    page.locator("#ask").click()
    want = expected_trace(served[1], image, question)
    answer_and_heatmap(page, question, want.meta.answer or "(empty)", len(want.answer_texts))
    llm, vision = want.meta.injection_layers, want.meta.vision_layers
    click_cell(page, 0, len(vision) - 1, len(llm), len(vision))  # first LLM layer, last vision layer
    expect(page.locator("#ablation-result .ablation")).to_have_attribute("data-cell", f"L{llm[0]}-V{vision[-1]}")
    expect(page.locator("#ablation-result thead")).to_contain_text(f"L{llm[0]} × V{vision[-1]} knocked out")
    # the original column is the stored answer's first token and its probability, re-measured
    expect(page.locator("#ablation-base-answer")).to_have_text(want.answer_texts[0])
    expect(page.locator("#ablation-base-prob")).to_have_text(f"{math.exp(want.answer_logprobs[0]):.3f}")
    for cell in ("#ablation-answer", "#ablation-prob", "#ablation-delta"):
        expect(page.locator(cell)).not_to_be_empty()
    assert 0.0 <= float(page.locator("#ablation-prob").text_content().strip()) <= 1.0
    expect(page.locator("#heatmap .shapelayer path")).to_have_count(1)  # the ablated cell is outlined
    shot(page, tmp_path, "explore-ablation")

    page.get_by_text("no injection in this LLM layer").click()  # another intervention, another cell
    click_cell(page, len(llm) - 1, 0, len(llm), len(vision))
    expect(page.locator("#ablation-result .ablation")).to_have_attribute("data-cell", f"L{llm[-1]}-V{vision[0]}")
    expect(page.locator("#ablation-result thead")).to_contain_text(f"L{llm[-1]} injection off")


def test_dataset_tab_renders_from_trace_set(page, served, tmp_path):
    pick_example(page, "glyph")
    page.locator("#ask").click()
    expect(page.locator("#answer-question")).to_have_text("what digit is in the corner ?")
    expect(page.locator("#answer-text")).to_have_text(re.compile(r"\S"))  # rendered, not just the question
    answer = page.locator("#answer-text").text_content().strip()  # inner_text is "" while a loading overlay hides it
    page.get_by_text("Dataset", exact=True).click()
    for s in samples():
        expect(page.locator("#dataset-heatmaps")).to_contain_text(f"{s['qtype']} (n=1)")
    expect(page.locator("#dataset-entropy")).to_contain_text("all traces (n=7)")
    expect(page.locator("#dataset-table tbody tr")).to_have_count(len(samples()))
    expect(page.locator("#dataset-heatmaps .gtitle")).to_contain_text("answer positions")
    page.get_by_text("image tokens", exact=True).click()
    expect(page.locator("#dataset-heatmaps .gtitle")).to_contain_text("image positions")
    shot(page, tmp_path, "dataset")
    page.get_by_text("Explore", exact=True).click()  # the answer is still there after a tab switch
    expect(page.locator("#answer-text")).to_have_text(answer)
    expect(page.locator("#heatmap .hm image")).to_have_count(1)


def test_bad_inputs_show_friendly_messages(page, tmp_path):
    page.locator("#ask").click()  # nothing chosen yet
    expect(page.locator("#ask-message")).to_contain_text("Choose an image first")
    fake = tmp_path / "notes.png"
    fake.write_text("these are my notes, not a picture\n")
    upload(page, fake, accepted=False)
    expect(page.locator("#upload-message")).to_contain_text("not a readable image")
    expect(page.locator("#upload-message")).to_contain_text("notes.png")
    shot(page, tmp_path, "bad-upload")
    big = tmp_path / "huge.png"
    big.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * (6 * 1024 * 1024))
    upload(page, big, accepted=False)
    expect(page.locator("#upload-message")).to_contain_text("too large")
    upload(page, EXAMPLES / "glyph.png")  # a good file clears the message
    expect(page.locator("#upload-message")).to_be_empty()
    ask(page, "what color is the zebra ?")
    expect(page.locator("#ask-message")).to_contain_text("not in the model's vocabulary")


def test_two_users_see_only_their_own_state(browser, served, tmp_path):
    url, app = served
    a, b = open_page(browser, url), open_page(browser, url)
    try:
        pick_example(a, "color")
        pick_example(b, "relation")
        qa, qb = "what color is the triangle ?", "is the red object above or below the yellow object ?"
        expect(a.locator("#question")).to_have_value(qa)
        expect(b.locator("#question")).to_have_value(qb)
        a.locator("#ask").click()
        b.locator("#ask").click()  # both in flight at once
        want_a = expected_trace(app, EXAMPLES / "color.png", qa)
        want_b = expected_trace(app, EXAMPLES / "relation.png", qb)
        answer_and_heatmap(a, qa, want_a.meta.answer or "(empty)", len(want_a.answer_texts))
        answer_and_heatmap(b, qb, want_b.meta.answer or "(empty)", len(want_b.answer_texts))
        b.locator("#token-strip button").nth(0).click()  # B's selection must not move A's heatmap
        expect(b.locator("#heatmap-caption")).to_have_attribute("data-selection", "step-0")
        a.wait_for_timeout(300)
        expect(a.locator("#heatmap-caption")).to_have_attribute("data-selection", "all")
        expect(a.locator("#image-name")).to_contain_text("color.png")
        expect(b.locator("#image-name")).to_contain_text("relation.png")
        shot(a, tmp_path, "user-a")
        shot(b, tmp_path, "user-b")
    finally:
        a.context.close()
        b.context.close()


# ------------------------------------------------------------------- causal check, world note, nits


def _boxes_overlap(a: dict, b: dict) -> bool:
    return not (
        a["x"] + a["width"] <= b["x"]
        or b["x"] + b["width"] <= a["x"]
        or a["y"] + a["height"] <= b["y"]
        or b["y"] + b["height"] <= a["y"]
    )


def test_map_carries_its_causal_check_and_photos_get_a_note(page, served, tmp_path):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    photo = tmp_path / "holiday.jpg"
    Image.fromarray(rng.integers(0, 255, (180, 240, 3), dtype=np.uint8)).save(photo)
    upload(page, photo)
    question = "what shape is the orange object ?"
    ask(page, question)
    want = expected_trace(served[1], photo, question)
    answer_and_heatmap(page, question, want.meta.answer or "(empty)", len(want.answer_texts))
    expect(page.locator("#world-warning")).to_contain_text("know only synthetic shape scenes")
    expect(page.locator("#world-warning")).to_contain_text("cliviz attach")
    expect(page.locator("#causal-check")).to_have_text(want.map_notes()[-1])
    expect(page.locator("#map-notes")).to_have_attribute("data-matters", "yes" if want.causal.matters else "no")
    shot(page, tmp_path, "explore-photo")
    pick_example(page, "color")  # a scene: no note
    page.locator("#ask").click()
    expect(page.locator("#answer-question")).to_have_text("what color is the triangle ?")
    expect(page.locator("#world-warning")).to_have_count(0)
    expect(page.locator("#causal-check")).to_contain_text("injection off (all layers)")


def test_attribution_target_and_readable_colour_bars(page, served, tmp_path):
    pick_example(page, "glyph")
    page.locator("#ask").click()
    # margin is the default target (it decides the answer and never saturates); log-prob is one click away
    expect(page.locator("#attr-description")).to_contain_text("margin: answer-token logit minus runner-up logit")
    expect(page.locator("#attr-caption")).to_contain_text("gradient × input (gxi)")
    page.get_by_text("log-prob (flat when p").click()
    expect(page.locator("#attr-description")).to_contain_text("log-prob of the answer token")
    page.get_by_text("margin over the runner-up").click()
    expect(page.locator("#attr-description")).to_contain_text("margin: answer-token logit minus runner-up logit")
    expect(page.locator("#attr-caption")).to_contain_text("target margin")
    title = page.locator("#attr-overlay .cbtitle text").first
    expect(title).to_contain_text("gxi, margin")  # the whole title, not "gra"
    graph = page.locator("#attr-overlay").bounding_box()
    box = title.bounding_box()
    assert graph["x"] <= box["x"] and box["x"] + box["width"] <= graph["x"] + graph["width"] + 1, (box, graph)
    assert "±" in page.locator("#attr-overlay .cbtitle").first.text_content()
    shot(page, tmp_path, "explore-attr-margin")


def test_dataset_small_multiples_label_every_column(page, served, tmp_path):
    page.get_by_text("Dataset", exact=True).click()
    expect(page.locator("#dataset-heatmaps .gtitle")).to_contain_text("answer positions")
    n_groups, cols, k = (
        len(samples()),
        3,
        len(expected_trace(served[1], EXAMPLES / "color.png", "what color is the triangle ?").meta.vision_layers),
    )
    assert n_groups % cols  # a short last row: the case that lost its labels
    ticks = page.locator("#dataset-heatmaps g[class^='x'][class$='tick'] text")  # xtick, x2tick, ...: x axes only
    expect(ticks).to_have_count(cols * k)  # each column's lowest panel labels its vision layers
    titles = page.locator("#dataset-heatmaps g[class^='g-x'][class$='title'] text", has_text="vision layer")
    expect(titles).to_have_count(cols)
    shot(page, tmp_path, "dataset-labels")


def test_trace_page_dropdown_clears_toolbar_and_notes(browser, served, tmp_path):
    from cliviz.analyses.heatmaps import write_trace_html

    want = expected_trace(served[1], EXAMPLES / "color.png", "what color is the triangle ?")
    path = tmp_path / "trace.html"
    write_trace_html(want, path)
    page = browser.new_context(viewport={"width": 900, "height": 700}).new_page()
    try:
        page.goto(path.as_uri())
        page.locator(".nsewdrag").first.hover()  # the toolbar shows on hover
        expect(page.locator(".modebar")).to_be_visible()
        menu = page.locator(".updatemenu-header").first.bounding_box()
        assert not _boxes_overlap(menu, page.locator(".modebar").bounding_box())
        subtitle = page.locator(".gtitle-subtitle, .gtitle").last
        for text in page.locator(".gtitle, .gtitle-subtitle").all():
            assert not _boxes_overlap(menu, text.bounding_box()), text.text_content()
        expect(subtitle).to_be_visible()
        assert "injection off (all layers)" in page.content()
        page.screenshot(path=str(tmp_path / "trace-page.png"))
    finally:
        page.context.close()


def long_answer_trace(base, steps: int = 512):
    """A real trace's prompt followed by `steps` answer tokens with their own gates: the shape of a
    real checkpoint's 512-token answer (rows of every gate a distribution, as recorded)."""
    from dataclasses import replace

    rng = np.random.default_rng(0)
    n_prompt = int(base.answer_positions[0]) + 1
    vocab = ["red", "green", "the", "triangle", "is", "left", "of", "a", "circle", "."]
    ids = np.concatenate([base.token_ids[:n_prompt], rng.integers(5, 20, steps - 1)]).astype(np.int64)
    layers, k = base.gates.shape[0], base.gates.shape[2]
    extra = rng.dirichlet(np.ones(k), size=(layers, steps - 1)).astype(np.float32)  # [L, steps-1, K]
    answer_ids = rng.integers(5, 20, steps).astype(np.int64)
    texts = [vocab[i % len(vocab)] for i in range(steps)]
    lp = np.log(rng.uniform(0.2, 1.0, steps)).astype(np.float32)
    long = replace(
        base,
        meta=replace(base.meta, answer=" ".join(texts)),
        token_ids=ids,
        token_texts=list(base.token_texts[:n_prompt]) + texts[:-1],
        token_roles=list(base.token_roles[:n_prompt]) + ["answer"] * (steps - 1),
        gates=np.concatenate([base.gates[:, :n_prompt], extra], axis=1),
        injection_norm=np.concatenate([base.injection_norm[:, :n_prompt], np.ones((layers, steps - 1), np.float32)], 1),
        answer_ids=answer_ids,
        answer_texts=texts,
        answer_positions=np.arange(n_prompt - 1, n_prompt - 1 + steps),
        answer_logprobs=lp,
        topk_ids=np.stack([answer_ids] * 2, 1),
        topk_texts=[[t, t] for t in texts],
        topk_logprobs=np.stack([lp, lp - 1], 1),
    )
    long.validate()
    return long


def test_a_512_token_trace_opens_in_the_trace_page(browser, served, tmp_path):
    """Long answers: the page's steps move to a slider (a 512-entry dropdown is unusable); moving it
    redraws the map, and the page stays small."""
    from cliviz.analyses.heatmaps import write_trace_html

    long = long_answer_trace(expected_trace(served[1], EXAMPLES / "color.png", "what color is the triangle ?"))
    path = tmp_path / "long.html"
    write_trace_html(long, path)
    assert path.stat().st_size < 8 * 2**20
    page = browser.new_context(viewport={"width": 1000, "height": 800}).new_page()
    try:
        page.goto(path.as_uri())
        expect(page.locator(".slider-container")).to_be_visible()
        current = page.locator(".slider-container .slider-label").first  # plotly's "current value" line
        expect(current).to_contain_text("answer step 0:")
        plot = page.locator(".heatmaplayer").first
        before = plot.screenshot()
        rail = page.locator(".slider-rail-rect").first.bounding_box()
        page.mouse.click(rail["x"] + rail["width"] * 0.6, rail["y"] + rail["height"] / 2)
        expect(current).not_to_contain_text("answer step 0:")
        assert plot.screenshot() != before  # another step's gates are drawn
        page.screenshot(path=str(tmp_path / "long-trace-page.png"))
    finally:
        page.context.close()


def test_a_512_token_trace_in_the_dashboard_callbacks(served):
    """The dashboard's answer card and heatmap on a 512-token trace: every step is a token button, and
    a late step's map is the recorded one."""
    from cliviz.analyses.heatmaps import gate_matrix
    from cliviz.app.callbacks_explore import render_answer, render_heatmap

    long = long_answer_trace(expected_trace(served[1], EXAMPLES / "color.png", "what color is the triangle ?"))
    store = {"trace": long.to_dict(), "image": None}
    card = render_answer(store)
    strip = [c for c in card.children if getattr(c, "id", None) == "token-strip"][0]
    steps = [b for b in strip.children if isinstance(getattr(b, "id", None), dict) and b.id.get("step", -1) >= 0]
    assert len(steps) == 512
    figure, _, _ = render_heatmap(store, 400, None)
    z = np.asarray(figure.data[0].z, dtype=np.float32)
    np.testing.assert_allclose(z, gate_matrix(long, int(long.answer_positions[400])), atol=1e-6)
