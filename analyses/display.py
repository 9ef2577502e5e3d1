"""Rich display in Jupyter: the HTML that `Trace`, `TraceSet`, attribution and ablation results show.

Each `*_html` function returns one self-contained HTML fragment: a short header (question, answer,
probabilities), the notes that belong next to the map (its kind, its causal check, warnings), and
the plotly figure built by the same builders as the command line and the dashboard
(`analyses.heatmaps`, `AttributionResult.*_figure`). No new plotting code lives here.

plotly.js (about 4.8 MB) is inlined into the first figure a Python process (a notebook's kernel)
displays; later figures carry only their JSON and the `Plotly.newPlot` call plotly writes with
`fig.to_html(include_plotlyjs=False)`, which draws with the `window.Plotly` the first output loaded —
what plotly's own "notebook" renderer does (`init_notebook_mode(connected=False)`), so a notebook
stays small (a 31 x 25 layer trace: ~32 kB per later display), works offline (no CDN), and its HTML
export renders (the first output holds the library). A later figure that finds no `window.Plotly`
(the output that carried it was cleared, or re-run in the same kernel) says how to get it back:
`cliviz.reset_notebook()` (`reset_plotlyjs()` here) inlines it again in the next figure. Google
Colab shows every output in its own frame, so there every figure carries the library.
"""

from __future__ import annotations

import html
import math
import sys
import uuid
from typing import Any

_state = {"plotlyjs_sent": False}  # display-only: whether this process has emitted plotly.js yet

ROLE_COLOURS = {"image": "#eef1f5", "prompt": "#f3f4f6", "answer": "#dbeafe"}

# What a later figure shows in place of its plot when the page has no plotly.js (its div id goes in
# `{div_id}`): the figure's own `Plotly.newPlot` call then fails quietly (a console error only).
MISSING_PLOTLYJS = (
    "plotly.js is not loaded on this page: the output that carried it was cleared or re-run. "
    "Run cliviz.reset_notebook() and re-run this cell (or restart the kernel and run all)."
)
_MISSING_SCRIPT = (
    '<script>if (!window.Plotly) {{ var d = document.getElementById("{div_id}"); '
    'if (d) {{ d.style.height = "auto"; d.style.color = "#D55E00"; d.textContent = "{text}"; }} }}</script>'
)


def reset_plotlyjs() -> None:
    """Inline plotly.js again in the next displayed figure (public as `cliviz.reset_notebook`)."""
    _state["plotlyjs_sent"] = False


def _outputs_share_a_page() -> bool:
    """Whether a notebook's outputs share one page (one `window.Plotly`): not in Google Colab, which
    draws each output in its own frame."""
    return "google.colab" not in sys.modules


def figure_html(fig: Any) -> str:
    """A plotly figure as an HTML fragment: plotly.js inlined the first time in a process only, later
    figures draw with the `window.Plotly` it loaded (or say it is missing)."""
    inline = not _state["plotlyjs_sent"] or not _outputs_share_a_page()
    _state["plotlyjs_sent"] = True
    div_id = f"cliviz-{uuid.uuid4().hex}"
    out = fig.to_html(full_html=False, include_plotlyjs=inline, div_id=div_id, config={"displaylogo": False})
    return out if inline else out + _MISSING_SCRIPT.format(div_id=div_id, text=MISSING_PLOTLYJS)


def esc(text: Any) -> str:
    return html.escape(str(text))


def notes_html(notes: list[str], warn: bool = False) -> str:
    colour = "#D55E00" if warn else "#444"
    return "".join(f"<div style='color:{colour};font-size:12.5px;margin:2px 0'>{esc(n)}</div>" for n in notes)


def token_strip_html(trace) -> str:
    """Prompt words, `[N image tokens]`, then each answer token with its probability."""
    n_image = sum(r == "image" for r in trace.token_roles)
    chip = "display:inline-block;padding:2px 6px;margin:1px;border-radius:4px;font-family:monospace;font-size:12px;"
    parts = [f"<span style='{chip}background:{ROLE_COLOURS['image']};color:#667085'>[{n_image} image tokens]</span>"]
    for text, role in zip(trace.token_texts, trace.token_roles):
        if role == "prompt" and not (text.startswith("<") and text.endswith(">")):
            parts.append(f"<span style='{chip}background:{ROLE_COLOURS['prompt']}'>{esc(text)}</span>")
    parts.append("<span style='margin:0 4px;color:#667085'>→</span>")
    for s, (word, lp) in enumerate(zip(trace.answer_texts, trace.answer_logprobs)):
        alts = ", ".join(f"{t} {math.exp(v):.2f}" for t, v in zip(trace.topk_texts[s], trace.topk_logprobs[s]))
        parts.append(
            f"<span title='step {s}; top-k: {esc(alts)}' style='{chip}background:{ROLE_COLOURS['answer']}'>"
            f"{esc(word)} <small style='opacity:.7'>{math.exp(float(lp)):.2f}</small></span>"
        )
    return "<div style='margin:4px 0'>" + "".join(parts) + "</div>"


def header_html(trace) -> str:
    m = trace.meta
    model = m.model.rstrip("/").split("/")[-1] or "model"
    return (
        f"<div style='font-family:sans-serif'><b>Q</b> {esc(m.question)} &nbsp; <b>A</b> "
        f"<b style='color:#0072B2'>{esc(m.answer or '(empty)')}</b> "
        f"<span style='color:#667085;font-size:12px'>({esc(model)}, fusion {esc(m.fusion)})</span></div>"
    )


def trace_html(trace) -> str:
    """`Trace._repr_html_`: header, token strip, the map's notes and the gate heatmap."""
    from cliviz.tracing.causal import map_kind_note

    body = [header_html(trace), token_strip_html(trace)]
    if not trace.has_gates:
        body.append(notes_html([map_kind_note(trace.meta.fusion) or "this trace has no gates"]))
        return "<div>" + "".join(body) + "</div>"
    check = trace.causal
    body.append(notes_html(trace.map_notes(), warn=check is not None and not check.matters))
    fig = trace.heatmap()
    fig.update_layout(title={"subtitle": {"text": ""}}, margin={"t": 50})  # the notes are just above, as text
    body.append(figure_html(fig))
    return "<div>" + "".join(body) + "</div>"


def traceset_html(ts) -> str:
    """`TraceSet._repr_html_`: counts per question type, accuracy where references are stored, how
    often switching the injection off changes the answer (where measured), and the mean map."""
    meta = ts.meta_frame()
    where = f" from {esc(ts.path)}" if ts.path else ""
    head = [
        f"<div style='font-family:sans-serif'><b>TraceSet</b>: {len(ts)} traces{where}; models: "
        f"{esc(', '.join(sorted(set(meta['model'].str.rstrip('/').str.split('/').str[-1]))))}; fusion: "
        f"{esc(', '.join(sorted(set(meta['fusion']))))}</div>"
    ]
    if len(meta):
        head.append(summary_table_html(meta))
    try:
        fig = ts.heatmap()
    except Exception as err:  # noqa: BLE001 - e.g. no gates at all (projector traces): say so instead of a figure
        return "".join(head) + notes_html([str(err)])
    return "".join(head) + figure_html(fig)


def summary_table_html(meta) -> str:
    meta = meta.assign(qtype=meta["qtype"].fillna("unknown"))
    has_ref = meta["reference_answer"].notna()
    correct = (meta["answer"].str.strip() == meta["reference_answer"].fillna("").str.strip()) & has_ref
    changed = meta["injection_off_changed"]
    rows = []
    for qtype, group in meta.groupby("qtype", sort=True):
        refs = int(has_ref[group.index].sum())
        acc = f"{correct[group.index].sum() / refs:.0%}" if refs else "—"
        measured = changed[group.index].dropna()
        flips = f"{measured.astype(bool).mean():.0%} of {len(measured)}" if len(measured) else "not measured"
        rows.append(f"<tr><td>{esc(qtype)}</td><td>{len(group)}</td><td>{acc}</td><td>{flips}</td></tr>")
    cell = "style='padding:2px 10px;text-align:left'"
    return (
        f"<table style='border-collapse:collapse;font-size:12.5px'><thead><tr><th {cell}>question type</th>"
        f"<th {cell}>traces</th><th {cell}>accuracy</th><th {cell}>answer changes with injection off</th>"
        "</tr></thead><tbody>" + "".join(rows) + "</tbody></table>"
    )


def attribution_html(result) -> str:
    """`AttributionResult._repr_html_`: header, what was attributed (method, target, baseline),
    saturation warnings, completeness, the token strip and the gate-cell map of answer token 0."""
    body = [header_html(result.trace), notes_html([result.description()])]
    warnings = result.warnings()
    if warnings:
        body.append(notes_html(warnings, warn=True))
    if result.method == "ig":
        body.append(notes_html(result.completeness_lines()))
    body.append(figure_html(result.token_strip_figure()))
    body.append(figure_html(result.cell_heatmap_figure(0)))
    return "<div>" + "".join(body) + "</div>"
