"""Static figure export through kaleido and the system Chromium: one module for every figure writer
(`cliviz figures`, the probe heatmaps).

Export goes through ONE persistent browser session for a whole set of figures
(`kaleido.start_sync_server(mathjax=False)` ... `stop_sync_server()`, about 10x faster than a browser
per figure); MathJax is off and nothing is downloaded. `find_chromium` fails fast, before any work,
when there is no browser. Files are written by the callers through `cliviz.atomic`.
"""

from __future__ import annotations

import os
import secrets
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import plotly.graph_objects as go

from cliviz.errors import CLIVizError

__all__ = ["FORMATS", "parse_formats", "prepare_out_dir", "find_chromium", "kaleido_session"]

FORMATS = ("pdf", "svg", "png")
NOT_ON_KALEIDO_PAGE = "kaleido_scopes is not defined"  # the ReferenceError of a render in a page without kaleido
RENDER_TIMEOUT_S = 180.0  # one figure, first one includes the browser start; generous for a loaded machine


def parse_formats(spec: str | Sequence[str]) -> list[str]:
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out = []
    for f in (x.strip().lower().lstrip(".") for x in items):
        if not f:
            continue
        if f not in FORMATS:
            raise CLIVizError(f"unknown figure format {f!r}; use a comma-separated list of {', '.join(FORMATS)}")
        if f not in out:
            out.append(f)
    if not out:
        raise CLIVizError(f"no figure format given; use a comma-separated list of {', '.join(FORMATS)}")
    return out


def prepare_out_dir(out: str | os.PathLike) -> Path:
    """Create `out` (and parents) and check that files can be written in it."""
    p = Path(out)
    if p.exists() and not p.is_dir():
        raise CLIVizError(f"output folder {p} is a file")
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CLIVizError(f"cannot create output folder {p}: {e.strerror or e}") from None
    probe = p / f".cliviz-write-test-{secrets.token_hex(4)}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise CLIVizError(f"cannot write in output folder {p}: {e.strerror or e}") from None
    return p


def find_chromium() -> str:
    """Path of the Chromium that kaleido will use; CLIVizError when there is none."""
    env = os.environ.get("BROWSER_PATH")
    hint = (
        "install Debian's chromium (apt-get install -y --no-install-recommends chromium fonts-liberation) "
        "or point BROWSER_PATH at a Chromium/Chrome executable"
    )
    if env:
        if not (os.path.isfile(env) and os.access(env, os.X_OK)):
            raise CLIVizError(f"BROWSER_PATH={env} is not an executable Chromium; {hint}")
        return env
    try:
        from choreographer.browsers.chromium import Chromium

        path = Chromium.find_browser(skip_local=False)
    except Exception:  # noqa: BLE001 - fall back to a PATH search
        import shutil

        path = next(
            (p for p in (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome", "chrome")) if p),
            None,
        )
    if not path:
        raise CLIVizError(f"figure export needs Chromium and none was found; {hint}")
    return str(path)


class kaleido_session:  # noqa: N801 - used as a context manager
    """One persistent kaleido browser session (MathJax off) for many exports; reuses a session the
    caller already started and then leaves it running."""

    def __enter__(self) -> kaleido_session:
        self._browser = find_chromium()
        import kaleido

        server = getattr(kaleido, "_global_server", None)
        self._owned = not (server is not None and server.is_running())
        self._server_error: BaseException | None = None
        self._prev_hook = threading.excepthook

        def hook(args: threading.ExceptHookArgs) -> None:  # keep a failed browser start off stderr
            if args.thread is getattr(server, "_thread", None):
                self._server_error = args.exc_value
                return
            self._prev_hook(args)

        threading.excepthook = hook
        if self._owned:
            kaleido.start_sync_server(mathjax=False, silence_warnings=True)
        self._kaleido = kaleido
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if self._owned:
                self._kaleido.stop_sync_server(silence_warnings=True)
        finally:
            threading.excepthook = self._prev_hook

    def _server_alive(self) -> bool:
        thread = getattr(getattr(self._kaleido, "_global_server", None), "_thread", None)
        return thread is None or thread.is_alive()

    def _dead_browser_error(self) -> CLIVizError:
        err = self._server_error
        why = ""
        if err is not None:
            first = err.args[0] if err.args else type(err).__name__
            why = f": {str(first).splitlines()[0]}"
        return CLIVizError(
            f"Chromium at {self._browser} failed during figure export{why} (check that "
            f"`{self._browser} --headless --no-sandbox --dump-dom about:blank` works; on Debian install "
            "the chromium package)"
        )

    def render(self, fig: go.Figure, fmt: str, width: int, height: int, scale: float = 1.0) -> bytes:
        """Figure -> bytes through the running session; a fresh browser once when its tab lost kaleido's page.

        "kaleido_scopes is not defined" means the render ran in a page without kaleido's script. kaleido
        opens a tab with `url=""` and then navigates it to its page; it takes the tab's JavaScript context
        from the first `Runtime.executionContextCreated` after `Runtime.enable` (which replays contexts
        that already exist) and waits for the first `Page.loadEventFired` after `Page.enable`. On a
        loaded machine the tab's own `about:blank` load can satisfy both before kaleido's navigation
        commits, or cancel it, and the tab stays on `about:blank`. Reloading a tab after a render, as
        kaleido does, reloads `about:blank`, so every later render in that session fails the same way:
        only a new browser session recovers. This one is ours, so it is restarted once and the figure
        rendered again.
        """
        try:
            return self._render_once(fig, fmt, width, height, scale)
        except CLIVizError as err:
            if NOT_ON_KALEIDO_PAGE not in str(err) or not self._owned:
                raise
        self._kaleido.stop_sync_server(silence_warnings=True)
        self._kaleido.start_sync_server(mathjax=False, silence_warnings=True)
        return self._render_once(fig, fmt, width, height, scale)

    def _render_once(self, fig: go.Figure, fmt: str, width: int, height: int, scale: float) -> bytes:
        """Figure -> bytes through the running session, with a watchdog against a dead browser."""
        box: dict[str, object] = {}
        spec = fig.to_dict()
        opts = {"format": fmt, "width": width, "height": height, "scale": scale}

        def work() -> None:
            try:
                box["data"] = self._kaleido.calc_fig_sync(spec, opts=opts)
            except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
                box["error"] = e

        th = threading.Thread(target=work, daemon=True)
        th.start()
        deadline = time.monotonic() + RENDER_TIMEOUT_S
        while th.is_alive():
            th.join(0.1)
            if th.is_alive() and not self._server_alive():
                raise self._dead_browser_error()
            if th.is_alive() and time.monotonic() > deadline:
                raise CLIVizError(
                    f"Chromium at {self._browser} did not answer within {RENDER_TIMEOUT_S:.0f} s during figure export"
                )
        if "error" in box:
            e = box["error"]
            text = str(e)
            first = text.splitlines()[0] if text else type(e).__name__
            lost = NOT_ON_KALEIDO_PAGE in text and NOT_ON_KALEIDO_PAGE not in first
            raise CLIVizError(f"figure export failed: {first}" + (f" ({NOT_ON_KALEIDO_PAGE})" if lost else ""))
        data = box.get("data")
        if not isinstance(data, (bytes, bytearray)) or not data:
            raise CLIVizError("figure export returned no data")
        return bytes(data)
