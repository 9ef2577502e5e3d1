"""The `cliviz` command line: one typer app, one module per subcommand."""

from __future__ import annotations

import os
import sys

# Before transformers is imported anywhere: quiet loading, never reach for the hub.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import typer  # noqa: E402

from cliviz.cli.dash_cmd import dash_cmd
from cliviz.cli.attribute_cmd import attribute_cmd
from cliviz.cli.ablate_cmd import ablate_cmd
from cliviz.cli.figures_cmd import figures_cmd
from cliviz.cli.compare_cmd import compare_cmd
from cliviz.cli.model_cmds import ask, attach_cmd, data, eval_cmd, vocab
from cliviz.cli.probe_cmd import probe_cmd
from cliviz.cli.sweep_cmd import sweep_cmd
from cliviz.cli.trace_cmd import trace_cmd
from cliviz.cli.train_cmd import train
from cliviz.errors import CLIVizError

app = typer.Typer(
    name="cliviz",
    help="See which vision layers a Cross-Layer-Injection VLM reads, when, and whether it matters.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def _root() -> None:
    """See which vision layers a Cross-Layer-Injection VLM reads, when, and whether it matters."""


app.command("trace")(trace_cmd)
app.command("ask")(ask)
app.command("compare")(compare_cmd)
app.command("data")(data)
app.command("train")(train)
app.command("eval")(eval_cmd)
app.command("attach")(attach_cmd)
app.command("vocab")(vocab)
app.command("figures")(figures_cmd)
app.command("sweep")(sweep_cmd)
app.command("ablate")(ablate_cmd)
app.command("attribute")(attribute_cmd)
app.command("dash")(dash_cmd)
app.command("probe-layers")(probe_cmd)


def main() -> None:
    """Entry point: user errors become one line on stderr and exit code 2, never a traceback."""
    try:
        app(standalone_mode=False)
    except CLIVizError as err:
        typer.echo(f"error: {err}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        sys.exit(1)
    except typer.TyperException as err:  # usage errors: typer prints them itself
        err.show()
        sys.exit(2)
