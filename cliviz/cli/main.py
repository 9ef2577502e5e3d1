"""The `cliviz` command line: one typer app, one module per subcommand.

Only the standard library is imported at module level: every command module (and with it torch and
transformers, seconds of start-up) is imported inside `main()`, so that a Ctrl-C or a bad input at
any moment of a run, start-up included, ends as one line on stderr and a known exit code.
"""

from __future__ import annotations

import _thread
import os
import signal
import sys
import threading

# Before transformers is imported anywhere: quiet loading, never reach for the hub.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C
INTERRUPTED_NOTE = "interrupted; files written before the interrupt are kept"


def build_app():
    """The typer app with every subcommand registered (imports every command module)."""
    import typer

    from cliviz.cli.ablate_cmd import ablate_cmd
    from cliviz.cli.attribute_cmd import attribute_cmd
    from cliviz.cli.compare_cmd import compare_cmd
    from cliviz.cli.dash_cmd import dash_cmd
    from cliviz.cli.figures_cmd import figures_cmd
    from cliviz.cli.model_cmds import ask, attach_cmd, data, eval_cmd, vocab
    from cliviz.cli.probe_cmd import probe_cmd
    from cliviz.cli.sweep_cmd import sweep_cmd
    from cliviz.cli.trace_cmd import trace_cmd
    from cliviz.cli.train_cmd import train

    app = typer.Typer(
        name="cliviz",
        help="See which vision layers a Cross-Layer-Injection VLM reads, when, and whether it matters.",
        no_args_is_help=True,
        pretty_exceptions_enable=False,
        add_completion=False,
    )

    def show_version(value: bool) -> None:
        if value:
            from cliviz._version import __version__

            typer.echo(f"cliviz {__version__}")
            raise typer.Exit()

    @app.callback()
    def _root(
        version: bool = typer.Option(
            False, "--version", is_eager=True, callback=show_version, help="Print the version and exit."
        ),
    ) -> None:
        """See which vision layers a Cross-Layer-Injection VLM reads, when, and whether it matters."""

    _flags_without_metavar()
    for name, command in (
        ("trace", trace_cmd),
        ("ask", ask),
        ("compare", compare_cmd),
        ("data", data),
        ("train", train),
        ("eval", eval_cmd),
        ("attach", attach_cmd),
        ("vocab", vocab),
        ("figures", figures_cmd),
        ("sweep", sweep_cmd),
        ("ablate", ablate_cmd),
        ("attribute", attribute_cmd),
        ("dash", dash_cmd),
        ("probe-layers", probe_cmd),
    ):
        app.command(name)(command)
    return app


def _flags_without_metavar() -> None:
    """Help shows `--json` alone, not `--json <bool>`: a flag takes no value, so it has no metavar.

    typer's rich help prints a type for every option, flags included; its own hook for that column
    (`display_type_rich`) is where a flag is told apart."""
    from typer.core import TyperOption

    if getattr(TyperOption.display_type_rich, "_cliviz_flags", False):
        return
    original = TyperOption.display_type_rich

    def display_type_rich(self, ctx):
        return None if self.is_flag else original(self, ctx)

    display_type_rich._cliviz_flags = True  # type: ignore[attr-defined]
    TyperOption.display_type_rich = display_type_rich  # type: ignore[method-assign]


def __getattr__(name: str):
    """`from cliviz.cli.main import app` still works; the app is built on first use."""
    if name == "app":
        return build_app()
    raise AttributeError(name)


def say(line: str) -> None:
    """One line on stderr, whatever the text holds (a question with undecodable bytes included)."""
    stream = sys.stderr
    encoding = getattr(stream, "encoding", None) or "utf-8"
    stream.write(line.encode(encoding, "backslashreplace").decode(encoding, "replace") + "\n")
    stream.flush()


def main() -> None:
    """Entry point: user errors become one line on stderr and exit code 2, Ctrl-C one line and 130,
    never a traceback."""
    try:
        code = _run()
    except KeyboardInterrupt:  # between typer's own handling and ours
        code = _interrupted(INTERRUPTED_NOTE)
    except Exception as err:
        if not (_INTERRUPT["seen"] or _caused_by_interrupt(err)):
            raise
        code = _interrupted(INTERRUPTED_NOTE)
    sys.exit(code)


# Set by `entry()`'s SIGINT handler. Python swallows a KeyboardInterrupt raised inside a `__del__`
# (and some libraries catch BaseException around imports), so a Ctrl-C can vanish and resurface as
# an odd error later; knowing it happened lets that error be reported as the interrupt it was.
_INTERRUPT = {"seen": False}


# How soon a Ctrl-C held back during torch's import is delivered again (the import is checked anew).
_RETRY_INTERRUPT_S = 0.01


def importing_torch_now() -> bool:
    """True while torch or one of its modules is still running its import.

    torch's C++ start-up (`torch._C._c10d_init` and others) calls back into Python to import modules;
    a KeyboardInterrupt raised inside such a callback cannot cross the C++ frames and aborts the
    whole process ("terminate called after throwing an instance of 'python_error'", exit -6). So a
    Ctrl-C that lands inside torch's import waits until that import has finished; anywhere else it
    is raised at once. `__spec__._initializing` is the flag CPython's own import system reads for the
    same question; a module's `__dict__` is read directly so that no module-level `__getattr__` runs
    inside a signal handler."""
    for name, module in list(sys.modules.items()):
        if name != "torch" and not name.startswith("torch."):
            continue
        spec = getattr(module, "__dict__", {}).get("__spec__")
        if getattr(spec, "_initializing", False):
            return True
    return False


def _deliver_interrupt_later() -> None:
    timer = threading.Timer(_RETRY_INTERRUPT_S, _thread.interrupt_main)  # runs our handler again
    timer.daemon = True
    timer.start()


def _watch_interrupts() -> None:
    def on_sigint(signum, frame):
        _INTERRUPT["seen"] = True
        if importing_torch_now():
            _deliver_interrupt_later()
            return
        raise KeyboardInterrupt

    def unraisable(info, default=sys.unraisablehook):
        if isinstance(info.exc_value, KeyboardInterrupt):
            # a Ctrl-C lost in a __del__: no "Exception ignored" traceback; deliver it again, from a
            # thread, so that it lands in the main thread's own code once this hook has returned
            _INTERRUPT["seen"] = True
            _deliver_interrupt_later()
            return
        default(info)

    signal.signal(signal.SIGINT, on_sigint)
    sys.unraisablehook = unraisable


def entry() -> None:
    """The process entry point (`cliviz`, `python -m cliviz`): `main()`, and after a Ctrl-C a hard exit.

    CPython remembers a Ctrl-C that crossed an exec() of a string (dataclasses and typing do that at
    import time) and, although we handled it, ends the process by SIGINT at shutdown: exit -2, not
    130. Our writers are closed by the time `main()` returns, so flush and leave with the code shells
    expect. (In-process callers use `main()`, which raises SystemExit as usual.)"""
    _watch_interrupts()
    try:
        main()
    except SystemExit as done:
        if done.code != EXIT_INTERRUPTED:
            raise
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_INTERRUPTED)


def _caused_by_interrupt(err: BaseException | None) -> bool:
    """Ctrl-C during a lazy import: transformers re-raises it as a ModuleNotFoundError `from` it."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, KeyboardInterrupt):
            return True
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return False


def _run() -> int:
    try:
        import typer

        from cliviz.cli.preflight import warnings_as_lines
        from cliviz.errors import CLIVizError, Interrupted

        try:
            with warnings_as_lines():
                result = build_app()(standalone_mode=False)
        except Interrupted as err:
            return _interrupted(f"interrupted; {err}")
        except CLIVizError as err:
            if _INTERRUPT["seen"]:  # e.g. a model load broken by a swallowed Ctrl-C
                return _interrupted(INTERRUPTED_NOTE)
            say(f"error: {err}")
            return EXIT_USAGE
        except typer.Exit as e:
            return int(e.exit_code or 0)
        except typer.Abort:
            return 1
        except typer.TyperException as err:  # usage errors: typer prints them itself
            err.show()  # type: ignore[attr-defined]  # typer raises its click-derived subclasses, which have show()
            return EXIT_USAGE
    except KeyboardInterrupt:
        return _interrupted(INTERRUPTED_NOTE)
    # In non-standalone mode typer turns Ctrl-C (and `raise typer.Exit(n)`) into a returned exit code.
    if result == EXIT_INTERRUPTED:
        return _interrupted(INTERRUPTED_NOTE)
    return result if isinstance(result, int) and not isinstance(result, bool) else 0


def _interrupted(line: str) -> int:
    """Print the interrupt line with a second Ctrl-C ignored, so it is never cut into a traceback."""
    try:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:  # not the main thread (an embedding caller): nothing to guard
        previous = None
    try:
        say(line)
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    return EXIT_INTERRUPTED
