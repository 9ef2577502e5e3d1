"""Option definitions shared by every subcommand (declared once, like Inseq's typed args)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

ModelOpt = Annotated[
    Path | None,
    typer.Option("--model", "-m", help="Model folder (config.json + model.safetensors). Default: bundled cli-tiny."),
]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto | cpu | cuda[:N]. auto picks a GPU when present.")]
DtypeOpt = Annotated[
    str, typer.Option("--dtype", help="auto | float32 | bfloat16 | float16. auto: bf16 on GPU, fp32 on CPU.")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of the rich view.")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Random seed.")]


def _max_new_tokens(value: int | None) -> int | None:
    """The API's own check (`cliviz.arguments`), so a bad value reads the same on both surfaces."""
    from cliviz.arguments import check_max_new_tokens

    return check_max_new_tokens(value, "--max-new-tokens")


MaxNewTokensOpt = Annotated[
    int | None,
    typer.Option(
        "--max-new-tokens",
        callback=_max_new_tokens,
        metavar="1..1024",
        help="Answer length limit in tokens (generation stops at eos). Default: 4 for the bundled "
        "word-level models, 256 for real checkpoints.",
    ),
]


# ---------------------------------------------------------------- checks that need no torch
# A command runs these before importing torch (seconds), so that a mistyped path answers at once;
# the library repeats them with the same words when it loads the file.


def check_image_path(path: Path | None) -> None:
    """`image not found` / `not a file`, as `cliviz.inputs.load_image` says it."""
    from cliviz.errors import CLIVizError

    if path is None:
        return
    if not Path(path).exists():
        raise CLIVizError(f"image not found: {path}")
    if not Path(path).is_file():
        raise CLIVizError(f"not a file: {path}")


def check_model_path(path: Path | None) -> None:
    """`model folder not found` / `not a folder`, as `cliviz.model.loading` says it; a bare bundled
    name (`cli-staged-tiny`) is a model too."""
    from importlib import resources

    from cliviz.errors import CLIVizError

    if path is None:
        return
    path = Path(path)
    if not path.exists():
        bundled = Path(str(resources.files("cliviz.assets"))) / "models" / path.name
        if len(path.parts) == 1 and bundled.exists():
            return
        raise CLIVizError(f"model folder not found: {path}")
    if not path.is_dir():
        raise CLIVizError(f"model path is not a folder: {path}")


def check_choice(value: str | None, choices: tuple[str, ...], option: str) -> None:
    """`unknown --kind 'x'; use one of ...` for a value outside `choices` (None passes)."""
    from cliviz.errors import CLIVizError

    if value is not None and value not in choices:
        raise CLIVizError(f"unknown {option} {value!r}; use one of {', '.join(choices)}")


def int_list(text: str | None, option: str) -> list[int] | None:
    """`1,2, 5` as [1, 2, 5] for every layer-list option; None or blank means "the default"."""
    from cliviz.errors import CLIVizError

    if text is None or not text.strip():
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise CLIVizError(f"{option} wants comma-separated integers, e.g. 1,2; got {text!r}") from None


def check_browser_env() -> None:
    """A `BROWSER_PATH` that is not an executable file, refused before any heavy import, with the
    words of `analyses.figures.find_chromium` (which still searches for a browser when none is set)."""
    import os

    from cliviz.errors import CLIVizError

    env = os.environ.get("BROWSER_PATH")
    if env and not (os.path.isfile(env) and os.access(env, os.X_OK)):
        raise CLIVizError(
            f"BROWSER_PATH={env} is not an executable Chromium; install Debian's chromium (apt-get install -y "
            "--no-install-recommends chromium fonts-liberation) or point BROWSER_PATH at a Chromium/Chrome executable"
        )
