"""`cliviz dash`: serve the dashboard (localhost, debug off, unless asked)."""

from __future__ import annotations

import errno
import socket
from pathlib import Path
from typing import Annotated

import typer

from cliviz.cli.options import DeviceOpt, DtypeOpt, ModelOpt
from cliviz.errors import CLIVizError

LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}


def check_port_free(host: str, port: int) -> None:
    """Bind (host, port) once and release it: CLIVizError with one line if that is impossible."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        raise CLIVizError(f"cannot listen on host {host!r}: {err.strerror or err}") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server will: TIME_WAIT is fine
        try:
            sock.bind(address)
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                raise CLIVizError(
                    f"port {port} on {host} is already in use; stop the other server or pick another port with --port"
                ) from None
            if err.errno == errno.EACCES:
                raise CLIVizError(
                    f"no permission to listen on port {port} (ports below 1024 need privileges); "
                    "pick another with --port"
                ) from None
            raise CLIVizError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None


def dash_cmd(
    model: ModelOpt = None,
    traces: Annotated[Path | None, typer.Option("--traces", help="Parquet trace set for the Dataset tab.")] = None,
    host: Annotated[
        str, typer.Option("--host", help="Address to listen on. Default: this machine only.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=1, max=65535, help="TCP port.")] = 8050,
    debug: Annotated[
        bool, typer.Option("--debug", help="Dash debug mode (dev tools, tracebacks in the page).")
    ] = False,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
) -> None:
    """Serve the interactive dashboard: ask, see gates per token, ablate cells, browse a trace set."""
    check_port_free(host, port)
    from cliviz.app.factory import create_app

    app = create_app(model, traces, device=device, dtype=dtype)
    if host not in LOCAL_HOSTS:
        typer.echo(f"warning: listening on {host}: anyone who can reach this address can use the model", err=True)
    typer.echo(f"cliviz dashboard: http://{'[' + host + ']' if ':' in host else host}:{port}/  (Ctrl+C to stop)")
    app.run(host=host, port=port, debug=debug, use_reloader=False)
