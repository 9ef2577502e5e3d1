"""Terminal views (rich): the answer with probabilities and a shaded vision x LLM gate table."""

from __future__ import annotations

import math

import numpy as np
from rich.console import Console
from rich.table import Table
from rich.text import Text

from cliviz.tracing.schema import Trace


def keep_words_whole(table: Table) -> Table:
    """Widen `table` to its title's and caption's longest word (a model or data path): rich wraps a
    title at the table's width and would cut a path in the middle. A terminal narrower still folds."""
    words = f"{table.title or ''} {table.caption or ''}".split()
    longest = max((len(w) for w in words), default=0)
    table.min_width = max(table.min_width or 0, longest + 2)
    return table


def _shade(value: float) -> str:
    """Cividis-like ramp from dark blue to yellow for a value in [0, 1]."""
    v = min(max(value, 0.0), 1.0)
    r, g, b = int(0 + 255 * v), int(32 + 200 * v), int(77 - 40 * v)
    return f"rgb({r},{g},{b})"


CLI_CHECK_HINT = "run `cliviz trace` without --no-causal-check"  # the note's advice in the terminal's terms
PER_TOKEN_LIMIT = 16  # longer answers are shown as text with a probability summary


def answer_line(trace: Trace) -> Text:
    """Short answers token by token with probabilities; long ones (real checkpoints) as their text."""
    text = Text("answer: ", style="bold")
    if len(trace.answer_texts) > PER_TOKEN_LIMIT:
        probs = np.exp(trace.answer_logprobs)
        text.append(trace.meta.answer, style="bold green")
        text.append(
            f"\n  ({len(probs)} tokens; probability mean {probs.mean():.2f}, lowest {probs.min():.2f})", style="dim"
        )
        return text
    for word, lp in zip(trace.answer_texts, trace.answer_logprobs):
        text.append(f"{word}", style="bold green" if word != "<eos>" else "dim")
        text.append(f" ({math.exp(lp):.2f})  ", style="dim")
    return text


WIDE_TABLE = 12  # more vision layers than this (real models: 25-27) get one shaded strip per LLM layer


def gate_table(trace: Trace, matrix: np.ndarray, title: str) -> Table:
    """One row per LLM layer: a shaded cell per vision layer with its gate, and the top vision layer.
    A real model's 25-27 vision layers do not fit a terminal as numbers: each row is then a strip of
    shaded blocks (one per vision layer, in order) and its three largest gates as text."""
    vision = trace.meta.vision_layers
    table = Table(title=title, show_lines=False, pad_edge=False)
    table.add_column("LLM layer", justify="right")
    wide = len(vision) > WIDE_TABLE
    if wide:
        table.add_column(f"V{vision[0]} … V{vision[-1]}", justify="left", no_wrap=True)
        table.add_column("top vision layers (gate)", justify="left", no_wrap=True)
    else:
        for k in vision:
            table.add_column(f"V{k}", justify="center")
        table.add_column("top", justify="left")
    for i, row in zip(trace.meta.injection_layers, matrix):
        if wide:
            scale = max(float(row.max()), 1e-9)  # the strip shades each row from 0 to its largest gate
            strip = Text()
            for v in row:
                strip.append("█", style=_shade(float(v) / scale))
            top = np.argsort(row)[::-1][:3]
            table.add_row(f"L{i}", strip, "  ".join(f"V{vision[j]} {row[j]:.2f}" for j in top))
            continue
        cells = [Text(f"{v:.2f}", style=f"{'black' if v > 0.55 else 'white'} on {_shade(v)}") for v in row]
        best = int(np.argmax(row))
        table.add_row(f"L{i}", *cells, f"V{vision[best]} ({row[best]:.2f})")
    return table


def print_trace(trace: Trace, matrix: np.ndarray, console: Console) -> None:
    """Answer, gate table, and beside it what the map is and whether its injection matters here."""
    console.print(f"[dim]question:[/] {trace.meta.question}")
    console.print(answer_line(trace))
    from cliviz.analyses.untrained import untrained_note

    untrained = untrained_note(trace)
    if untrained:
        console.print(Text(f"warning: {untrained}", style="bold yellow"))
    if trace.has_gates:
        from cliviz.analyses.reductions import selection_note

        console.print(gate_table(trace, matrix, f"gates over vision layers, {selection_note('answer')}"))
    check = trace.causal
    for note in trace.map_notes(CLI_CHECK_HINT):
        quiet = check is not None and not check.matters and note.startswith("injection off")
        console.print(Text(note, style="yellow" if (quiet or not trace.has_gates) else ""))
