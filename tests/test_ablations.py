"""Ablations: interventions that must change nothing do change nothing, injection-off is the base
LLaVA, the batched engine equals the naive loop, and `cliviz ablate` end to end."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from cliviz.analyses import ablations as A
from cliviz.data import iter_samples
from cliviz.errors import CLIVizError

from conftest import EXAMPLES, assert_clean_error, build_tiny, run_main
from oracles import naive_knockout_grid

NUM = ["logprob_ref", "logprob_own", "logprob_ref_seq"]


@pytest.fixture(scope="module")
def data():
    samples = list(iter_samples(4, seed=5))
    refs = [s.answer for s in samples]
    refs[1] = "two red"  # a two-token reference: more than one answer position
    return [s.image for s in samples], [s.question for s in samples], refs, [s.qtype for s in samples]


@pytest.fixture(scope="module")
def cli_model():
    return build_tiny("cli", seed=1)


def deltas(frame: pd.DataFrame) -> pd.Series:
    """Largest |change vs the reference| per condition (log-probs of the reference and own answer)."""
    d = frame[["delta_logprob_ref", "delta_logprob_own"]].abs().max(axis=1)
    return d.groupby(frame["condition"], sort=False).max()


def test_knockout_of_a_vision_layer_with_zero_gate_changes_nothing(data):
    images, questions, refs, _ = data
    model, tok = build_tiny("cli", seed=2)
    dead = 2  # position in vision_layers whose gate is exactly 0 everywhere
    with torch.no_grad():
        for layer in model.agf:
            layer.gate.to_logits.bias[dead] = -1e4  # exp(-1e4) underflows: the softmax gives exactly 0
    v = model.config.vision_layers[dead]
    conditions = [
        None,
        A.Ablation("knockout", None, [v]),
        A.Ablation("knockout", [2], [v], tokens="answer"),
        A.Ablation("zero", [1, 3], [v]),
    ]
    frame = A.score_conditions(model, tok, images, questions, refs, conditions, max_batch=5)
    assert deltas(frame).max() < 1e-5 and not frame["flipped"].any()
    # ... and the same engine does see a live layer
    live = A.score_conditions(model, tok, images, questions, refs, [None, A.Ablation("knockout", None, [v + 1])])
    assert deltas(live).max() > 1e-4

    # shallow (static one-to-one) gates are one-hot: knocking out an unread layer is bit-exact
    shallow, tok = build_tiny("shallow", seed=2)
    unread = [k for pos, k in enumerate(shallow.config.vision_layers) if pos not in shallow.config.shallow_map()]
    frame = A.score_conditions(shallow, tok, images, questions, refs, [None, A.Ablation("knockout", None, unread)])
    assert deltas(frame).max() == 0.0


def test_uniform_ablation_on_uniform_gates_changes_nothing(data):
    images, questions, refs, _ = data
    model, tok = build_tiny("cli", seed=3)
    with torch.no_grad():
        for layer in model.agf:
            layer.gate.to_logits.weight.zero_()
            layer.gate.to_logits.bias.zero_()
    frame = A.score_conditions(
        model, tok, images, questions, refs, [None, A.Ablation("uniform"), A.Ablation("uniform", [2], tokens="image")]
    )
    assert deltas(frame).max() < 1e-6
    forced = A.score_conditions(model, tok, images, questions, refs, [None, A.Ablation("onehot", value=1)])
    assert deltas(forced).max() > 1e-4


def test_injection_off_everywhere_is_the_base_llava(cli_model, data):
    from cliviz.inference import prepare_inputs

    model, tok = cli_model
    images, questions, refs, _ = data
    frame = A.score_conditions(model, tok, images, questions, refs, [None, A.Ablation("injection_off")], max_batch=3)
    off = frame[frame["kind"] == "injection_off"].reset_index(drop=True)
    base = frame[frame["kind"] == "none"].reset_index(drop=True)
    suppress = [tok.pad_token_id, tok.convert_tokens_to_ids("<image>"), tok.bos_token_id]
    for i in range(len(questions)):  # the base LLaVA path, one unpadded sample at a time, no CLI hooks
        inputs = prepare_inputs(model, tok, [images[i]], [questions[i]])
        with torch.no_grad():
            lp = torch.log_softmax(model.base(**inputs).logits[0, -1].float(), -1)
        ref_id = tok(refs[i], add_special_tokens=False).input_ids[0]
        assert abs(lp[ref_id].item() - off.loc[i, "logprob_ref"]) < 1e-5
        masked = lp.clone()
        masked[suppress] = -float("inf")
        assert tok.convert_ids_to_tokens(int(masked.argmax())) == off.loc[i, "answer"]
    assert (off["logprob_ref"] - base["logprob_ref"]).abs().max() > 1e-4  # the injection mattered


@pytest.mark.parametrize("tokens", ["all", "answer"])
def test_batched_grid_equals_naive_loop(cli_model, data, tokens):
    model, tok = cli_model
    images, questions, refs, qtypes = data
    batched = A.knockout_grid(model, tok, images, questions, refs, qtypes=qtypes, max_batch=7, tokens=tokens)
    naive = naive_knockout_grid(model, tok, images, questions, refs, qtypes=qtypes, tokens=tokens)
    keys = ["condition", "qtype", "metric"]
    joined = batched.merge(naive, on=keys, suffixes=("_b", "_n"), validate="one_to_one")
    assert len(joined) == len(batched) == len(naive)
    for col in ("value", "ci_low", "ci_high"):
        assert (joined[f"{col}_b"] - joined[f"{col}_n"]).abs().max() < 1e-5, col
    cells = batched[batched["condition"] != A.REFERENCE]
    n_cells = len(model.config.injection_layers) * len(model.config.vision_layers)
    assert cells["condition"].nunique() == n_cells
    assert set(batched["metric"]) == set(A.GRID_METRICS) and set(batched["qtype"]) == {"all", *qtypes}
    assert (batched["ci_low"] <= batched["value"] + 1e-12).all() and (
        batched["value"] <= batched["ci_high"] + 1e-12
    ).all()
    mass = A.grid_matrix(batched, model.config, metric="gate_mass")
    assert mass.shape == (3, 6) and np.allclose(mass.sum(axis=1), 1.0, atol=1e-5)  # gates sum to 1 per layer


def test_prefix_sharing_matches_plain_batches_for_every_kind(cli_model, data):
    model, tok = cli_model
    images, questions, refs, qtypes = data
    conditions = [
        None,
        A.Ablation("injection_off", [2]),
        A.Ablation("mean"),
        A.Ablation("mean", [3], per_qtype=True),
        A.Ablation("patch", [2, 3]),
        A.Ablation("uniform", tokens="answer"),
        A.Ablation("onehot", [2], value=3),
        A.Ablation("zero", [3], [1, 2], tokens="image"),
        A.Ablation("knockout", [1, 3], [2], tokens="prompt"),
        A.Ablation("zero", name="all gates zero"),
    ]
    shared = A.score_conditions(model, tok, images, questions, refs, conditions, qtypes=qtypes, max_batch=16)
    plain = A.score_conditions(
        model, tok, images, questions, refs, conditions, qtypes=qtypes, max_batch=5, share_prefix=False
    )
    assert (shared[NUM] - plain[NUM]).abs().max().max() < 1e-5
    assert (shared["answer"] == plain["answer"]).all()
    d = deltas(shared)
    assert d[A.REFERENCE] == 0 and (d.drop(A.REFERENCE) > 0).all()  # every kind does something here
    # all gates zero injects nothing: the same numbers as switching every injection off
    off = A.score_conditions(model, tok, images, questions, refs, [A.Ablation("injection_off")])
    assert np.allclose(shared[shared["condition"] == "all gates zero"]["logprob_ref"], off["logprob_ref"], atol=1e-6)


def test_patch_from_itself_and_given_means(cli_model, data):
    model, tok = cli_model
    images, questions, refs, qtypes = data
    frame = A.score_conditions(model, tok, images[:1], questions[:1], refs[:1], [None, A.Ablation("patch")])
    assert deltas(frame).max() < 1e-5  # the only donor is the sample itself
    means = A.mean_gates(model, tok, images, questions, qtypes=qtypes)
    assert set(means) == set(qtypes) and all(m.shape == (3, 6) for m in means.values())
    given = A.score_conditions(
        model, tok, images, questions, refs, [A.Ablation("mean", means=means, per_qtype=True)], qtypes=qtypes
    )
    computed = A.score_conditions(
        model, tok, images, questions, refs, [A.Ablation("mean", per_qtype=True)], qtypes=qtypes
    )
    assert np.allclose(given["logprob_ref"], computed["logprob_ref"], atol=1e-5)


def test_single_cell_is_complete(cli_model, data):
    """Its speed (the app's click-to-ablate) is measured in benchmarks/bench_app.py, not here."""
    model, tok = cli_model
    images, questions, _, _ = data
    out = A.single_cell(model, tok, images[0], questions[0], 2, 3)
    assert {"answer", "prob", "base_answer", "base_prob", "delta_logprob"} <= set(out)
    assert 0 < out["prob"] <= 1 and 0 < out["base_prob"] <= 1 and out["delta_logprob"] != 0
    off = A.single_cell(model, tok, images[0], questions[0], 3, None, kind="injection_off")
    assert off["base_answer"] == out["base_answer"]


def test_faithfulness_ranks_cells():
    vision, llm = [1, 2, 3], [1, 2]
    mass = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]])
    rows = []
    for qtype, sign in (("all", 1.0), ("a", 1.0), ("b", -1.0)):
        for i, li in enumerate(llm):
            for k, vk in enumerate(vision):
                for metric, value in (
                    ("delta_logprob_ref", -sign * mass[i, k]),
                    ("flip_rate", sign * mass[i, k] / 2),
                    ("gate_mass", mass[i, k]),
                ):
                    rows.append(
                        {
                            "condition": f"knockout L{li} V{vk}",
                            "llm_layer": li,
                            "vision_layer": vk,
                            "qtype": qtype,
                            "metric": metric,
                            "value": value,
                            "ci_low": value,
                            "ci_high": value,
                        }
                    )
    grid = pd.DataFrame(rows)
    grid["llm_layer"] = grid["llm_layer"].astype("Int64")
    grid["vision_layer"] = grid["vision_layer"].astype("Int64")
    out = A.faithfulness(grid).set_index(["qtype", "effect"])
    assert out.loc[("all", "drop_logprob_ref"), "rho"] == pytest.approx(1.0)
    assert out.loc[("a", "flip_rate"), "rho"] == pytest.approx(1.0)
    assert out.loc[("b", "drop_logprob_ref"), "rho"] == pytest.approx(-1.0)
    assert (out["n_cells"] == 6).all()
    # an external gate-mass frame (e.g. heatmaps.gate_matrix_frame) works the same way
    from cliviz.analyses.heatmaps import gate_matrix_frame

    external = A.faithfulness(grid, gate_matrix_frame(mass, vision, llm))
    assert external.set_index(["qtype", "effect"]).loc[("all", "drop_logprob_ref"), "rho"] == pytest.approx(1.0)


def test_bad_ablations_are_one_line_errors(cli_model):
    model, tok = cli_model
    image = next(iter_samples(1, seed=0)).image
    with pytest.raises(CLIVizError, match="unknown ablation kind"):
        A.Ablation("melt")
    with pytest.raises(CLIVizError, match="token set"):
        A.Ablation("zero", tokens="middle")
    with pytest.raises(CLIVizError, match="vision layer"):
        A.Ablation("knockout", [1])
    with pytest.raises(CLIVizError, match="LLM layer 0 is not in this model"):
        A.score_conditions(model, tok, [image], ["what shape is the red object ?"], None, [A.Ablation("zero", [0])])
    with pytest.raises(CLIVizError, match="vision layer 9"):
        A.single_cell(model, tok, image, "what shape is the red object ?", 1, 9)
    projector, tok = build_tiny("projector")
    with pytest.raises(CLIVizError, match="no gates"):
        A.knockout_grid(projector, tok, [image], ["what shape is the red object ?"], None)


# ------------------------------------------------------------------------------- command line


def test_cli_single_image_grid_and_json(random_model_dir, tmp_path):
    out = tmp_path / "grid.parquet"
    proc = run_main(
        "ablate",
        str(EXAMPLES / "color.png"),
        "what color is the triangle ?",
        "--grid",
        "--model",
        str(random_model_dir),
        "--out",
        str(out),
        "--json",
    )
    assert proc.returncode == 0, proc.stderr
    payload = json.loads(proc.stdout)
    n_cells = 1 + 3 * 6  # reference + L x K knockouts of the tiny model (3 injection layers, 6 vision layers)
    assert payload["n_conditions"] == n_cells + 3 and payload["reference_accuracy"] == 1.0  # + injection off per layer
    assert len(payload["largest_effects"]) == 10 and payload["faithfulness"]
    frame = pd.read_parquet(out)  # plain pandas
    assert {"condition", "llm_layer", "vision_layer", "qtype", "metric", "value", "ci_low", "ci_high"} <= set(
        frame.columns
    )
    assert frame["condition"].nunique() == n_cells + 3
    assert len(payload["off_explains"]) == 3 and payload["per_type"]
    page = (tmp_path / "grid.html").read_text()
    assert "Plotly.newPlot" in page and "flip rate" in page
    assert "renormalises the remaining gates" in page and "what color is the triangle ?" in page  # note, question
    assert "<title>Knockout grid" in page and "injection off explains" in page
    report = pd.read_csv(tmp_path / "grid.faithfulness.csv")
    assert list(report.columns) == ["qtype", "effect", "rho", "p_value", "p_holm", "n_cells"]
    from cliviz.intervals import holm

    np.testing.assert_allclose(report["p_holm"], holm(report["p_value"]), equal_nan=True)
    assert (report["p_holm"].dropna() >= report["p_value"].dropna()).all()
    assert not list(tmp_path.glob(".*tmp*"))  # atomic writes leave no temp files


def test_cli_data_rich_summary(random_model_dir, tmp_path):
    from cliviz.data import write_dataset

    write_dataset(tmp_path / "d", 6, seed=4)
    out = tmp_path / "off.parquet"
    proc = run_main(
        "ablate",
        "--data",
        str(tmp_path / "d"),
        "--kind",
        "injection_off",
        "--llm-layers",
        "1,2",
        "--limit",
        "4",
        "--model",
        str(random_model_dir),
        "--out",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr
    assert "injection_off L1,2" in proc.stdout and "largest effects" in proc.stdout
    assert "per question type" in proc.stdout  # flips and Δ log-prob per type, no pandas pivot needed
    frame = pd.read_parquet(out)
    assert set(frame["condition"]) == {"reference", "injection_off L1,2"} and (frame["n"] <= 4).all()


@pytest.mark.parametrize(
    "args, needle",
    [
        (("--data", "{tmp}/none", "--out", "{tmp}/a.parquet", "--kind", "melt"), "unknown --kind"),
        (("--out", "{tmp}/a.parquet"), "no data"),
        (("{img}", "what color is the triangle ?", "--out", "{tmp}/missing/a.parquet"), "does not exist"),
        (
            (
                "{img}",
                "what color is the triangle ?",
                "--out",
                "{tmp}/a.parquet",
                "--model",
                "{model}",
                "--vision-layers",
                "9",
            ),
            "vision layer 9",
        ),
    ],
)
def test_cli_bad_inputs(args, needle, tmp_path, random_model_dir):
    filled = [a.format(img=EXAMPLES / "color.png", tmp=tmp_path, model=random_model_dir) for a in args]
    assert_clean_error(run_main("ablate", *filled), needle)
    assert not (tmp_path / "a.parquet").exists()


# ------------------------------------------------------------------ one study as one call (run_grid)


def test_run_grid_is_the_knockout_grid_with_its_faithfulness(cli_model, data, tmp_path):
    model, tok = cli_model
    images, questions, refs, qtypes = data
    samples = A.StudySamples(images, questions, refs, qtypes)
    report = A.run_grid(model, tok, samples, max_batch=7, seed=3)
    grid = A.knockout_grid(model, tok, images, questions, refs, qtypes=qtypes, max_batch=7, seed=3)
    cells = report.effects[report.effects["vision_layer"].notna() | (report.effects["condition"] == A.REFERENCE)]
    pd.testing.assert_frame_equal(cells.reset_index(drop=True), grid)  # the grid cells are the knockout grid's
    pd.testing.assert_frame_equal(report.faithfulness, A.faithfulness(grid))
    assert report.is_grid and report.n_samples == 4 and len(report.conditions) == 19 + 3
    top = report.largest_effects(5)
    assert len(top) == 5 and top["delta_logprob_ref"].abs().is_monotonic_decreasing
    assert not report.has_ci and top[["ci_low", "ci_high"]].isna().all().all()  # 4 < MIN_CI_SAMPLES
    paths = report.write(tmp_path / "g.parquet")
    assert sorted(p.name for p in paths.values()) == ["g.faithfulness.csv", "g.html", "g.parquet"]
    pd.testing.assert_frame_equal(pd.read_parquet(paths["effects"]), report.effects)


def test_off_explains_is_the_injection_off_harm_over_the_cell_harm(cli_model, data):
    """On the bundled staged model, whose glyph answers need the injection (README: L3 x V1)."""
    from cliviz.analyses.ablations.report import HARM_FLOOR
    from cliviz.model.loading import load_model

    model, tok = load_model("cli-staged-tiny", device="cpu", dtype="float32")
    glyphs = [s for s in iter_samples(60, seed=11) if s.qtype == "glyph"][:4]
    samples = A.StudySamples([s.image for s in glyphs], [s.question for s in glyphs], [s.answer for s in glyphs])
    report = A.run_grid(model, tok, samples, max_batch=32)
    share = report.off_explains()
    cells = A.grid_matrix(report.effects, model.config, metric="delta_logprob_ref")
    off = report.off_rows()
    assert share.shape == cells.shape and len(off) == len(model.config.injection_layers)
    for i, layer in enumerate(model.config.injection_layers):
        for k in range(cells.shape[1]):
            if -cells[i, k] > HARM_FLOOR:
                assert share[i, k] == pytest.approx(min(max(off[layer] / cells[i, k], 0.0), 1.0))
            else:
                assert np.isnan(share[i, k])
    assert np.isfinite(share).any()  # some knockout harms the glyph answers


def test_per_type_and_presets(cli_model, data):
    model, tok = cli_model
    samples = A.StudySamples(*data)
    report = A.run_injection_off(model, tok, samples)
    per = report.per_type()
    assert set(per["qtype"]) == {A.ALL, *data[3]} and per["qtype"].iloc[0] == A.ALL
    scores = report.scores[report.scores["condition"] != A.REFERENCE]
    for q, rows in scores.groupby("qtype"):
        row = per[per["qtype"] == q].iloc[0]
        assert row["flip_rate"] == pytest.approx(rows["flipped"].mean())
        assert row["delta_logprob_ref"] == pytest.approx(rows["delta_logprob_ref"].mean())
    assert not report.is_grid and report.off_explains() is None
    same = A.run_study(model, tok, samples, [None, A.Ablation("injection_off")])
    pd.testing.assert_frame_equal(same.effects, report.effects)
    assert "Ablation study" in report._repr_html_()
