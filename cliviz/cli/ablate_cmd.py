"""`cliviz ablate`: intervene on the gates / injections and measure what the answer loses.

    cliviz ablate IMAGE QUESTION                       # knock out each vision layer in turn (all LLM layers)
    cliviz ablate IMAGE QUESTION --kind injection_off --llm-layers 2 --out a.parquet
    cliviz ablate --data shapes/ --grid --limit 200 --out grid.parquet   # + grid.html, grid.faithfulness.csv

The command parses, calls `cliviz.analyses.ablations.run_study` and prints. The tidy effects frame
(condition, llm_layer, vision_layer, qtype, metric, value, ci_low, ci_high, n) is written as
Parquet, atomically; without `--out` it goes to `<image or data name>.ablation.parquet` (grid:
`.grid.parquet`) in the current folder, never over an existing file. Without a reference answer
(IMAGE QUESTION, or data rows with no `answer`), the model's own unablated answer is the reference.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from cliviz.cli.options import (
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    ModelOpt,
    check_choice,
    check_image_path,
    check_model_path,
    int_list,
)
from cliviz.cli.preflight import check_writable
from cliviz.errors import CLIVizError

# Checked before torch is imported (importing the ablation package takes seconds); a test keeps
# them equal to `ablations.KINDS` and `TOKEN_SETS`.
CLI_KINDS = ("knockout", "zero", "uniform", "onehot", "mean", "injection_off", "patch")
CLI_TOKENS = ("all", "prompt", "image", "answer")


def _default_out(image: Path | None, data: Path | None, grid: bool) -> Path:
    """`<name>.ablation.parquet` / `<name>.grid.parquet` in the current folder; `-2`, `-3`... when
    that name (or a grid's html / faithfulness report) is taken: a default never overwrites."""
    from cliviz.analyses.ablations import report_paths

    source = image if image is not None else data
    assert source is not None  # the command refuses a run with neither IMAGE nor --data
    name = source.stem if source.suffix else source.name  # color.png -> color, shapes/ -> shapes
    what = "grid" if grid else "ablation"
    for i in range(1, 10_000):
        out = Path(f"{name}.{what}{'' if i == 1 else f'-{i}'}.parquet")
        if not any(p.exists() for p in report_paths(out, grid=grid).values()):
            return out
    raise CLIVizError(f"no free default output name for {name}; give --out")


def _inputs(image: Path | None, question: str | None, data: Path | None, limit: int | None, reference: str | None):
    """(images, questions, references, qtypes) from IMAGE QUESTION or --data."""
    from cliviz.inputs import check_question, load_image

    if data is not None and (image is not None or question is not None):
        raise CLIVizError("give either --data or IMAGE QUESTION, not both")
    if data is None:
        if image is None:
            raise CLIVizError("no data: give IMAGE QUESTION or --data DIR|JSONL")
        if question is None:
            raise CLIVizError("missing QUESTION after IMAGE")
        img = load_image(image)
        return [img], [check_question(question)], [reference], None
    if reference is not None:
        raise CLIVizError("--reference is for IMAGE QUESTION; --data rows carry their own answers")
    from cliviz.data.samples import read_jsonl

    records = read_jsonl(data).records
    if limit is not None:
        records = records[:limit]
    if not records:
        raise CLIVizError(f"no samples to ablate in {data}")
    images = [load_image(r.image_path) for r in records]
    qtypes = [r.qtype for r in records] if any(r.qtype for r in records) else None
    return images, [r.question for r in records], [r.answer for r in records], qtypes


def _effects_table(report, title: str, top: int) -> Table:
    """The largest effects; the CI column only when the samples allow one (see `MIN_CI_SAMPLES`)."""
    from cliviz.analyses.ablations.display import column_style, num

    top_rows = report.largest_effects(top)
    ref_sci = column_style([*top_rows["delta_logprob_ref"], *top_rows["ci_low"], *top_rows["ci_high"]])
    own_sci = column_style(top_rows["delta_logprob_own"])

    def _num(x: float, sci: bool = ref_sci) -> str:  # one notation per column
        return num(x, scientific=sci)

    show_ci = report.has_ci
    table = Table(title=title, pad_edge=False)
    columns = ["condition", "Δ logp ref"] + (["95% CI"] if show_ci else []) + ["Δ logp own", "flips", "acc"]
    for col in columns:
        table.add_column(col, justify="left" if col == "condition" else "right")
    for cond, row in top_rows.iterrows():
        d, lo, hi = row["delta_logprob_ref"], row["ci_low"], row["ci_high"]
        style = "red" if show_ci and d < 0 and hi < 0 else ("green" if show_ci and d > 0 and lo > 0 else "default")
        cells = [escape(str(cond)), f"[{style}]{_num(d)}[/]"] + ([f"[dim]{_num(lo)}..{_num(hi)}[/]"] if show_ci else [])
        own = _num(row["delta_logprob_own"], own_sci)
        table.add_row(*cells, own, f"{row['flip_rate']:.2f}", f"{row['accuracy']:.2f}")
    if not show_ci:
        from cliviz.analyses.ablations import MIN_CI_SAMPLES

        n = report.n_samples
        table.caption = f"no confidence intervals: {n} sample{'' if n == 1 else 's'}, fewer than {MIN_CI_SAMPLES}"
    return table


def _payload(report, paths: dict, model_name: str, single: bool) -> dict:
    """The `--json` object: outputs, sizes, reference accuracy, the largest effects, faithfulness."""
    wide = report.largest_effects(10)
    return {
        "out": str(paths["effects"]),
        "html": str(paths["html"]) if "html" in paths else None,
        "faithfulness_report": str(paths["faithfulness"]) if "faithfulness" in paths else None,
        "model": model_name,
        "n_samples": report.n_samples,
        "n_conditions": len(report.conditions),
        "reference_accuracy": report.reference_accuracy,
        "answers": report.reference["answer"].tolist() if single else None,
        "largest_effects": [
            {"condition": c, **{k: (None if v != v else float(v)) for k, v in row.items()}}
            for c, row in wide.iterrows()
        ],
        "faithfulness": report.faithfulness.to_dict(orient="records") if report.is_grid else None,
        "per_type": report.per_type().to_dict(orient="records"),
        "off_explains": None if report.off_explains() is None else _nan_none(report.off_explains().tolist()),
    }


def _nan_none(rows: list[list[float]]) -> list[list[float | None]]:
    return [[None if v != v else v for v in row] for row in rows]


def _print_report(report, paths: dict, questions: list[str], single: bool, defaulted: bool) -> None:
    console = Console()
    base = report.reference
    if single:
        console.print(
            f"[dim]question:[/] {escape(questions[0])}   [dim]reference:[/] "
            f"{escape(str(base['reference'].iloc[0]))}   [dim]answer:[/] "
            f"[bold]{escape(str(base['answer'].iloc[0]))}[/] ({base['prob'].iloc[0]:.3f})"
        )
        if not report.is_grid and len(report.conditions) == 2:
            row = report.scores.iloc[-1]
            console.print(
                f"[dim]under[/] {escape(row['condition'])}: [bold]{escape(str(row['answer']))}[/] "
                f"({row['prob']:.3f}){'  [red]flipped[/]' if row['flipped'] else ''}"
            )
    else:
        console.print(f"{report.n_samples} samples, reference accuracy {report.reference_accuracy:.3f}")
    console.print(_effects_table(report, "largest effects (all samples, vs the unablated run)", 10))
    for renderable in report.render(10):  # per-type flips and Δ log-prob; grid: cells with the note, faithfulness
        console.print(renderable)
    note = " (default --out; give --out to choose)" if defaulted else ""
    console.print(f"[dim]effects written to {escape(str(paths['effects']))}{note}[/]")
    if report.is_grid:
        console.print(
            f"[dim]grid heatmap page: {escape(str(paths['html']))}; "
            f"faithfulness report: {escape(str(paths['faithfulness']))}[/]"
        )


def ablate_cmd(
    image: Annotated[Path | None, typer.Argument(help="Image file (or use --data).")] = None,
    question: Annotated[str | None, typer.Argument(help="Question in the model's vocabulary.")] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            help="Parquet file for the tidy effects frame. Default: <image or data name>.ablation.parquet "
            "(grid: .grid.parquet) in the current folder, never overwriting a file.",
        ),
    ] = None,
    data: Annotated[Path | None, typer.Option("--data", help="Folder with samples.jsonl, or a .jsonl file.")] = None,
    kind: Annotated[
        str | None,
        typer.Option(
            "--kind",
            help=f"{' | '.join(CLI_KINDS)}. Default: knockout, each vision layer in turn unless "
            "--vision-layers names some.",
        ),
    ] = None,
    llm_layers: Annotated[
        str | None, typer.Option("--llm-layers", help="Comma-separated injection layers (real indices). Default: all.")
    ] = None,
    vision_layers: Annotated[
        str | None, typer.Option("--vision-layers", help="Comma-separated vision layers (hidden_states indices).")
    ] = None,
    tokens: Annotated[
        str, typer.Option("--tokens", help="all | prompt | image | answer: positions to ablate.")
    ] = "all",
    value: Annotated[
        int | None, typer.Option("--value", help="onehot: vision layer to force; patch: donor sample index.")
    ] = None,
    reference: Annotated[
        str | None, typer.Option("--reference", help="Reference answer for IMAGE QUESTION (default: the model's own).")
    ] = None,
    grid: Annotated[
        bool,
        typer.Option(
            "--grid",
            help="Knock out every (LLM layer, vision layer) cell; also writes a heatmap page and a "
            "faithfulness report.",
        ),
    ] = False,
    model: ModelOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    max_batch: Annotated[
        int | None,
        typer.Option(
            "--max-batch", min=1, help="Rows (samples x conditions) per forward (default: what fits free memory)."
        ),
    ] = None,
    limit: Annotated[int | None, typer.Option("--limit", min=1, help="Use the first N samples of --data.")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Bootstrap seed.")] = 0,
    as_json: JsonOpt = False,
) -> None:
    """Ablate gates or injections (batched, teacher-forced) and report the change in the answer."""
    check_choice(kind, CLI_KINDS, "--kind")  # the checks that need no torch come first: they answer at once
    if grid and kind not in (None, "knockout"):
        raise CLIVizError("--grid runs knockouts; drop --kind or use it without --grid")
    if grid and (llm_layers or vision_layers or value is not None):
        raise CLIVizError("--grid covers every layer; drop --llm-layers / --vision-layers / --value")
    check_choice(tokens, CLI_TOKENS, "--tokens")
    if data is None and image is None:
        raise CLIVizError("no data: give IMAGE QUESTION or --data DIR|JSONL")
    check_image_path(image)
    if data is not None and not data.exists():
        raise CLIVizError(f"data not found: {data} (give a folder holding samples.jsonl, or a .jsonl file)")
    check_model_path(model)
    llm = int_list(llm_layers, "--llm-layers")
    vis = int_list(vision_layers, "--vision-layers")

    from cliviz.analyses import ablations as A

    defaulted = out is None
    out = _default_out(image, data, grid) if out is None else out
    paths = A.report_paths(out, grid=grid)
    for path in paths.values():
        check_writable(path, "output file")
    sweep = kind in (None, "knockout") and vis is None  # one knockout per vision layer of the model
    if not grid and not sweep:
        A.Ablation(kind or "knockout", llm, vis, tokens=tokens, value=value)  # checked before the model loads
    images, questions, references, qtypes = _inputs(image, question, data, limit, reference)

    from cliviz.cli.preflight import checked_question, load_checked

    net, tok = load_checked(model, device, dtype)
    if data is None:
        questions = [checked_question(questions[0], tok)]
    conditions = (
        A.grid_study_conditions(net, tokens)
        if grid
        else A.study_conditions(net, kind or "knockout", llm, vis, tokens=tokens, value=value)
    )
    A.check_conditions(net, conditions)  # layers not in this model -> one-line error before any work

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    total = len(questions) * len(conditions)
    with Progress(
        TextColumn("ablating"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
        disable=as_json or total < 512,
    ) as progress:
        task = progress.add_task("ablating", total=total)
        from cliviz.memory import auto_batch_size, prompt_tokens_estimate, with_oom_retry

        rows = max_batch or auto_batch_size(net, prompt_tokens_estimate(net.config), 0, 8, cap=256)

        def study(batch: int):
            progress.reset(task)
            return A.run_study(
                net,
                tok,
                A.StudySamples(images, questions, references, qtypes),
                conditions,
                max_batch=batch,
                seed=seed,
                progress=lambda n: progress.advance(task, n),
            )

        report = with_oom_retry(study, rows)
    report.write(out)
    if as_json:
        typer.echo(json.dumps(_payload(report, paths, str(net.name_or_path), data is None), default=str))
        return
    _print_report(report, paths, questions, data is None, defaulted)
