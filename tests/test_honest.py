"""A researcher is never misled: intervals and corrections, untrained-gate warnings, schedule warnings,
cheap checks before torch, and the small honesty items of the command line."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from cliviz.intervals import benjamini_hochberg, format_interval, holm, wilson_interval

from conftest import EXAMPLES, REPO

# ------------------------------------------------------------------ intervals and corrections


def test_wilson_interval_matches_its_formula_and_covers():
    lo, hi = wilson_interval(8, 10)
    assert (round(lo, 3), round(hi, 3)) == (0.490, 0.943)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == 1.0
    assert np.isnan(wilson_interval(0, 0)).all() and format_interval(*wilson_interval(0, 0)) == "n/a"
    # coverage: about 95% of intervals from Binomial(n, p) draws hold p
    rng = np.random.default_rng(0)
    hits = [lo <= 0.7 <= hi for lo, hi in (wilson_interval(k, 40) for k in rng.binomial(40, 0.7, size=2000))]
    assert 0.93 < np.mean(hits) < 0.97


def test_corrections_agree_with_scipy_and_by_hand():
    from scipy.stats import false_discovery_control

    p = np.array([0.01, 0.04, 0.03, 0.5, 0.002])
    np.testing.assert_allclose(benjamini_hochberg(p), false_discovery_control(p))
    np.testing.assert_allclose(holm([0.01, 0.04, 0.03]), [0.03, 0.06, 0.06])
    out = holm([0.01, float("nan"), 0.03])  # NaN stays NaN and is not counted in the family
    assert np.isnan(out[1]) and out[0] == pytest.approx(0.02) and out[2] == pytest.approx(0.03)
    assert (holm(p) >= p).all() and (holm(p) <= 1).all()


# ------------------------------------------------------------------ untrained gates


@pytest.fixture(scope="module")
def bundled_traces():
    from cliviz.inputs import load_image
    from cliviz.model.loading import load_model
    from cliviz.tracing import trace

    image = load_image(EXAMPLES / "color.png")
    out = {}
    for name in ("cli-attached-tiny", "cli-staged-tiny"):
        model, tok = load_model(name, device="cpu", dtype="float32")
        out[name] = (model, trace(model, tok, image, "what color is the triangle ?", causal_check=False))
    return out


def test_untrained_gates_are_named_on_the_model_the_trace_and_the_terminal(bundled_traces):
    from rich.console import Console

    from cliviz.analyses.heatmaps import gate_matrix
    from cliviz.analyses.untrained import untrained_note, untrained_note_from_model
    from cliviz.cli.render import print_trace

    attached_model, attached = bundled_traces["cli-attached-tiny"]
    trained_model, trained = bundled_traces["cli-staged-tiny"]
    assert "untrained" in untrained_note(attached) and "untrained" in untrained_note_from_model(attached_model)
    assert untrained_note(trained) is None and untrained_note_from_model(trained_model) is None
    for tr, expected in ((attached, True), (trained, False)):
        console = Console(record=True, width=200)
        print_trace(tr, gate_matrix(tr, "answer"), console)
        assert ("warning: these gates are untrained" in console.export_text()) is expected


def test_untrained_gates_are_named_on_attribution_maps(tmp_path):
    from cliviz.analyses.attributions import attribute
    from cliviz.inputs import load_image
    from cliviz.model.loading import load_model

    model, tok = load_model("cli-attached-tiny", device="cpu", dtype="float32")
    image = load_image(EXAMPLES / "color.png")
    r = attribute(model, tok, image, "what color is the triangle ?", method="gxi")
    assert r.general_warnings() and "untrained" in r.warnings()[0]
    page = r.write_html(image, tmp_path / "a.html").read_text()
    assert "these gates are untrained" in page


def test_train_warns_when_warmup_or_log_interval_reach_the_steps(tmp_path, monkeypatch, capsys):
    from cliviz.cli.main import main

    argv = ["cliviz", "train", "--steps", "1", "--batch-size", "2", "--threads", "1", "--out", str(tmp_path / "m")]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as done:
        main()
    err = capsys.readouterr().err
    assert done.value.code == 0, err
    assert "--warmup 200 >= --steps 1" in err and "--log-every 25 >= --steps 1" in err
    monkeypatch.setattr(
        sys, "argv", [*argv[:-1], str(tmp_path / "m2"), "--steps", "2", "--warmup", "1", "--log-every", "1"]
    )
    with pytest.raises(SystemExit):
        main()
    assert "warning: --" not in capsys.readouterr().err


# ------------------------------------------------------------------ cheap checks, before torch

_PROBE = """
import sys
from cliviz.cli.main import main
sys.argv = ["cliviz", *{args!r}]
try:
    main()
except SystemExit as done:
    print("torch" in sys.modules or "plotly" in sys.modules, done.code)
"""


@pytest.mark.parametrize(
    "args, needle",
    [
        (["attribute", "nope.png", "what color is the triangle ?"], "image not found"),
        (["attribute", str(EXAMPLES / "color.png"), "what ?", "--method", "saliency"], "unknown attribution method"),
        (["attribute", str(EXAMPLES / "color.png"), "what ?", "--model", "no/such/folder"], "model folder not found"),
        (["ablate", str(EXAMPLES / "color.png"), "what ?", "--kind", "melt"], "unknown --kind"),
        (["ablate", "nope.png", "what ?"], "image not found"),
        (["compare", "--data", "nodata", "--models", "no/such/folder"], "model folder not found"),
        (["probe-layers", "--model", "no/such/folder"], "model folder not found"),
        (["probe-layers", "--out", "{tmp}/p"], "BROWSER_PATH=/no/such/chromium is not an executable"),
        (["figures", str(EXAMPLES), "--out", "{tmp}/f"], "BROWSER_PATH=/no/such/chromium is not an executable"),
        (["figures", "nope.parquet", "--out", "{tmp}/f"], "does not exist"),
    ],
)
def test_inputs_checked_before_torch_is_imported(args, needle, tmp_path):
    """The error comes before torch or plotly is imported (the seconds of start-up a mistyped path or a
    bad BROWSER_PATH used to cost: 35 s in `figures`)."""
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    env = {**os.environ, "BROWSER_PATH": "/no/such/chromium"}
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE.format(args=args)], capture_output=True, text=True, cwd=REPO, timeout=120, env=env
    )
    assert proc.stdout.split() == ["False", "2"], (proc.stdout, proc.stderr)
    assert needle in proc.stderr and "Traceback" not in proc.stderr


def test_version_and_flags_without_metavar(monkeypatch, capsys):
    from cliviz._version import __version__
    from cliviz.cli.main import main

    for argv, check in (
        (["cliviz", "--version"], lambda out: out.strip() == f"cliviz {__version__}"),
        (["cliviz", "ablate", "--help"], lambda out: "<bool>" not in out and "--grid" in out and "--json" in out),
        (["cliviz", "compare", "--help"], lambda out: "gate maps are compared" in " ".join(out.split())),
    ):
        monkeypatch.setattr(sys, "argv", argv)
        monkeypatch.setenv("COLUMNS", "160")
        with pytest.raises(SystemExit) as done:
            main()
        out = capsys.readouterr().out
        assert done.value.code == 0 and check(out), out


def test_cli_kind_and_token_lists_are_the_engines():
    from cliviz.analyses.ablations import KINDS, TOKEN_SETS
    from cliviz.cli.ablate_cmd import CLI_KINDS, CLI_TOKENS

    assert tuple(CLI_KINDS) == tuple(KINDS) and set(CLI_TOKENS) == set(TOKEN_SETS)


def test_one_notation_per_column():
    from cliviz.analyses.ablations.display import column_style, num

    mixed = [1.2e-5, 0.25, 0.0]
    assert not column_style(mixed) and [num(x, scientific=False) for x in mixed] == ["+0.000", "+0.250", "+0.000"]
    tiny = [1.2e-5, -3e-6, 0.0]
    assert column_style(tiny) and [num(x, scientific=True) for x in tiny] == ["+1.2e-05", "-3.0e-06", "+0.0e+00"]
