"""Benchmark the dashboard's server side: the token-select re-draw and a single-cell ablation.

    python benchmarks/bench_app.py [--model DIR] [--rounds 30] [--ablation-rounds 10] [--json OUT]

1. **Token select** (target: median < 100 ms). A click on an answer token sets the selection and
   the heatmap callback re-draws from the trace kept in the browser store — no model run. Timed
   two ways, both medians over `--rounds`, cycling through the answer steps and "all tokens":
   - `callback`: the callback functions called directly (`select_token` + `render_heatmap`, on
     the store as the server receives it: decoded JSON);
   - `http`: the same update as one POST to Dash's `/_dash-update-component` through the Flask
     test client: request decoding, dispatch, the callback, and JSON encoding of the figure.
2. **Single-cell ablation** (target: median < 1 s): the heatmap-click callback body
   (`callbacks_ablation.ablate`): decode the stored image, `analyses.ablations.single_cell`
   (knock out one gate cell, re-run, compare), and the result table; cycling through cells.

Model: `--model DIR`, else the bundled cli-tiny, else (checkout without weights) the same
architecture with random weights, as in tests/conftest.py. The machine's load average is printed
with the numbers: timings taken while other jobs run are upper bounds.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

TARGETS = {"token_select_s": 0.100, "ablation_s": 1.0}
QUESTION_EXAMPLE = "color"


def load(model_dir: str | None):
    """(model, tokenizer, label): `--model`, or the bundled cli-tiny."""
    from cliviz.model.loading import load_model

    model, tok = load_model(model_dir, device="cpu", dtype="float32")
    return model, tok, str(model.name_or_path)


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model folder (default: bundled cli-tiny)")
    parser.add_argument("--rounds", type=int, default=30, help="timed token-select rounds (per variant)")
    parser.add_argument("--ablation-rounds", type=int, default=10, help="timed ablation rounds")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from cliviz.app import callbacks_ablation, callbacks_explore, callbacks_image
    from cliviz.app.backend import Backend, load_examples
    from cliviz.app.factory import build_app

    model, tok, label = load(args.model)
    backend = Backend(model=model, tokenizer=tok, examples=load_examples(), model_label=label)
    app = build_app(backend)
    image, _, _, _, question = callbacks_image.from_example(backend, QUESTION_EXAMPLE)
    store, *_ = callbacks_explore.ask(backend, question, image)
    store = json.loads(json.dumps(store))  # what the server receives from the browser
    n_answer = len(store["trace"]["answer_texts"])
    selections = [*range(n_answer), -1]
    trace = store["trace"]
    print(
        f"model: {label}; answer {trace['meta']['answer']!r} ({n_answer} tokens, {len(trace['token_ids'])} positions, "
        f"gates {len(trace['gates'])}x{len(trace['gates'][0])}x{len(trace['gates'][0][0])}); "
        f"trace store {len(json.dumps(store)) / 1024:.0f} KiB"
    )

    def token_callback(step: int) -> None:
        selection = callbacks_explore.select_token({"type": "token", "step": step}, [1])
        callbacks_explore.render_heatmap(store, selection, None)

    client = app.server.test_client()
    outputs = [("heatmap", "figure"), ("heatmap-caption", "children"), ("heatmap-caption", "data-selection")]
    body_base = {
        "output": ".." + "...".join(f"{i}.{p}" for i, p in outputs) + "..",
        "outputs": [{"id": i, "property": p} for i, p in outputs],
        "changedPropIds": ["selection-store.data"],
        "state": [],
    }

    def token_http(step: int) -> None:
        selection = callbacks_explore.select_token({"type": "token", "step": step}, [1])
        body = dict(
            body_base,
            inputs=[
                {"id": "trace-store", "property": "data", "value": store},
                {"id": "selection-store", "property": "data", "value": selection},
                {"id": "ablation-store", "property": "data", "value": None},
            ],
        )
        resp = client.post("/_dash-update-component", json=body)
        if resp.status_code != 200:
            raise SystemExit(f"callback request failed: HTTP {resp.status_code} {resp.data[:200]!r}")

    cycle = itertools.cycle(selections)
    for _ in range(args.warmup):
        token_callback(next(cycle))
        token_http(next(cycle))
    direct, http = [], []
    for _ in range(args.rounds):  # interleaved A B A B
        step = next(cycle)
        direct.append(timed(lambda step=step: token_callback(step)))
        http.append(timed(lambda step=step: token_http(step)))

    llm, vision = model.config.injection_layers, model.config.vision_layers
    cells = itertools.cycle([{"points": [{"y": f"L{i}", "x": f"V{k}"}]} for i in llm for k in vision])
    callbacks_ablation.ablate(backend, next(cells), store, "knockout")  # warm-up
    ablation = []
    for _ in range(args.ablation_rounds):
        click = next(cells)
        ablation.append(timed(lambda click=click: callbacks_ablation.ablate(backend, click, store, "knockout")))

    load_avg = os.getloadavg()[0]
    results = {
        "model": label,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "load_avg_1min": load_avg,
        "token_select_callback_s": statistics.median(direct),
        "token_select_http_s": statistics.median(http),
        "ablation_s": statistics.median(ablation),
        "rounds": args.rounds,
        "ablation_rounds": args.ablation_rounds,
    }
    busy = load_avg > 0.8 * (os.cpu_count() or 1)
    note = f"  [UNDER LOAD: 1-min load average {load_avg:.1f} on {os.cpu_count()} CPUs]" if busy else ""
    print(
        f"token select, callback   median {results['token_select_callback_s'] * 1e3:7.1f} ms  "
        f"(target < {TARGETS['token_select_s'] * 1e3:.0f} ms){note}"
    )
    print(
        f"token select, HTTP       median {results['token_select_http_s'] * 1e3:7.1f} ms  "
        f"(target < {TARGETS['token_select_s'] * 1e3:.0f} ms){note}"
    )
    print(
        f"single-cell ablation     median {results['ablation_s'] * 1e3:7.1f} ms  "
        f"(target < {TARGETS['ablation_s'] * 1e3:.0f} ms){note}"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    ok = results["token_select_http_s"] < TARGETS["token_select_s"] and results["ablation_s"] < TARGETS["ablation_s"]
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
