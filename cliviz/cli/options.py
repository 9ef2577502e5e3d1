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
