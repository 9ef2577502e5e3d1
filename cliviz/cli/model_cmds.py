"""`cliviz ask`, `cliviz eval`, `cliviz data`, `cliviz attach`, `cliviz vocab`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from cliviz.cli.options import DeviceOpt, DtypeOpt, JsonOpt, MaxNewTokensOpt, ModelOpt, SeedOpt, int_list
from cliviz.cli.preflight import check_output_folder, load_checked, prepare_question
from cliviz.errors import CLIVizError

console = Console()


def ask(
    image: Annotated[Path, typer.Argument(help="Image file (any format PIL reads).")],
    question: Annotated[str, typer.Argument(help="Question in the model's vocabulary.")],
    model: ModelOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    max_new_tokens: MaxNewTokensOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Answer a question about an image."""
    import math

    from cliviz.inference import answer

    img, net, tok, q = prepare_question(image, question, model, device, dtype)
    ans = answer(net, tok, [img], [q], max_new_tokens=max_new_tokens)[0]
    prob = math.exp(ans.logprobs[0]) if ans.logprobs else float("nan")
    if as_json:
        typer.echo(json.dumps({"question": q, "answer": ans.text, "probability": prob, "model": str(net.name_or_path)}))
    else:
        console.print(f"[bold]{ans.text}[/]  [dim](p={prob:.3f})[/]")


def eval_cmd(
    data: Annotated[Path, typer.Option("--data", help="Folder with samples.jsonl, or a .jsonl file.")],
    model: ModelOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    batch_size: Annotated[
        int | None, typer.Option("--batch-size", min=1, help="Rows per batch (default: what fits free memory).")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Accuracy overall and per question type."""
    from cliviz.cli.render import keep_words_whole
    from cliviz.data.samples import read_jsonl
    from cliviz.evaluation import evaluate
    from cliviz.intervals import format_interval

    dataset = read_jsonl(data)
    net, tok = load_checked(model, device, dtype)
    with Progress(console=Console(stderr=True), transient=True, disable=as_json) as progress:
        task = progress.add_task("evaluating", total=len(dataset.records))
        result = evaluate(net, tok, dataset, batch_size, on_batch=lambda n: progress.advance(task, n))
    result["model"] = str(net.name_or_path)
    if as_json:
        typer.echo(json.dumps(result))
        return
    free_text = "reference_logprob" in result  # real checkpoints: exact match, then how likely the reference is
    title = f"{Path(str(net.name_or_path)).name} on {data}" + (" (exact match after normalising)" if free_text else "")
    table = Table(title=title, caption=f"model {net.name_or_path}; 95% CI: Wilson interval")  # names wrap whole
    table.add_column("question type")
    table.add_column("accuracy", justify="right")
    table.add_column("95% CI", justify="right")
    table.add_column("n", justify="right")
    ci = result["accuracy_ci"]
    if free_text:
        table.add_column("reference log-prob", justify="right")
        table.add_column("per token", justify="right")
    sums, means = result.get("reference_logprob", {}), result.get("reference_logprob_mean", {})
    for qtype, acc in result["per_type"].items():
        extra = [f"{sums['per_type'][qtype]:.2f}", f"{means['per_type'][qtype]:.3f}"] if free_text else []
        table.add_row(
            qtype, f"{acc:.3f}", format_interval(*ci["per_type"][qtype]), str(result["n_per_type"][qtype]), *extra
        )
    extra = [f"[bold]{sums['overall']:.2f}", f"[bold]{means['overall']:.3f}"] if free_text else []
    table.add_row(
        "[bold]overall", f"[bold]{result['overall']:.3f}", format_interval(*ci["overall"]), str(result["n"]), *extra
    )
    console.print(keep_words_whole(table))
    for reason, count in result["skipped"].items():
        console.print(f"[yellow]skipped {count} rows: {reason}[/]")


def data(
    out: Annotated[Path, typer.Option("--out", help="Folder to write images/ and samples.jsonl to.")],
    n: Annotated[int, typer.Option("--n", min=1, max=1_000_000, help="Number of samples.")] = 700,
    seed: SeedOpt = 1,
) -> None:
    """Write a ShapesVQA set (balanced over question types) as PNG + JSONL."""
    from cliviz.data import write_dataset

    if out.exists() and not out.is_dir():
        raise CLIVizError(f"--out exists and is not a folder: {out}")
    check_output_folder(out, "--out folder")
    try:
        target = write_dataset(out, n, seed)
    except PermissionError:
        raise CLIVizError(f"cannot write to {out} (permission denied)") from None
    typer.echo(f"wrote {n} samples to {target}")


def attach_cmd(
    base: Annotated[Path, typer.Option("--base", help="Local LLaVA / LLaVA-OneVision model folder (safetensors).")],
    out: Annotated[Path, typer.Option("--out", help="Folder for the CLI model.")],
    fusion: Annotated[str, typer.Option("--fusion")] = "cli",
    vision_layers: Annotated[
        str | None, typer.Option("--vision-layers", help="Comma-separated hidden_states indices.")
    ] = None,
    injection_layers: Annotated[
        str | None, typer.Option("--injection-layers", help="Comma-separated LLM layers.")
    ] = None,
    lora_rank: Annotated[int, typer.Option("--lora-rank", min=1)] = 8,
    temperature: Annotated[float, typer.Option("--temperature", min=1e-3)] = 1.0,
    read_width: Annotated[
        int | None,
        typer.Option("--read-width", min=1, help="Width r of AGF's light read (default: 32 per 1,024 LLM channels)."),
    ] = None,
    read_heads: Annotated[
        int | None, typer.Option("--read-heads", min=1, help="Heads of the read (default: one per 32 channels of r).")
    ] = None,
    position_code: Annotated[
        bool,
        typer.Option(
            "--position-code/--no-position-code",
            help="Add a fixed 2-D sin-cos code of each memory token's place before the read (docs/design.md §1).",
        ),
    ] = True,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace the model --out already holds (refused otherwise).")
    ] = False,
) -> None:
    """Turn a LLaVA checkpoint (or a cliviz projector model) into a CLI model that equals the base at init."""
    from cliviz.model.attach import attach_folder, carried_files
    from cliviz.model.loading import resolve_model_dir
    from cliviz.model.safety import refuse_remote_code
    from cliviz.outputs import check_replaceable, output_lock, refuse_out_over_inputs

    vision = int_list(vision_layers, "--vision-layers")
    injection = int_list(injection_layers, "--injection-layers")
    base = resolve_model_dir(base)  # a bundled name (llava-tiny-base, projector-staged-tiny) works as --model does
    if not (base / "config.json").is_file():  # what the base is comes first: a typo in --base is named as such
        raise CLIVizError(f"base model folder {base} has no config.json")
    refuse_out_over_inputs(out, {"--base": base})
    check_replaceable(out, overwrite)
    if base.is_dir():
        refuse_remote_code(base)  # attach loads the base's tokenizer through AutoTokenizer
    check_output_folder(out, "--out folder")

    with output_lock(out, "cliviz attach"):
        check_replaceable(out, overwrite)  # again, now that no other process can write here
        attach_folder(
            base,
            out,
            fusion=fusion,
            vision_layers=vision,
            injection_layers=injection,
            lora_rank=lora_rank,
            gate_temperature=temperature,
            read_width=read_width,
            read_heads=read_heads,
            read_position_code=position_code,
        )
    carried = carried_files(out)
    note = (
        f"; carried {', '.join(carried)}"
        if carried
        else "; the base folder has no tokenizer: add one before `cliviz ask`"
    )
    typer.echo(f"wrote CLI model ({fusion}) to {out}{note}")


def vocab(model: ModelOpt = None) -> None:
    """List the words the model understands."""
    from cliviz.model.loading import check_model_dir, load_tokenizer, resolve_model_dir

    folder = resolve_model_dir(model)
    tok = load_tokenizer(folder, check_model_dir(folder))
    words = [w for w, _ in sorted(tok.get_vocab().items(), key=lambda kv: kv[1]) if w not in tok.all_special_tokens]
    typer.echo(" ".join(words))
