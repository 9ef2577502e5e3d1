"""The token selections every analysis takes (heatmaps, ablations, the trace file's views).

A selection is the positions of one role — for "answer", those whose output is an answer token —
or all of them. Kept apart from the trace schema and the intervention engine so that both (and the
analyses above them) name the same sets without importing each other.
"""

TOKEN_SETS = ("answer", "image", "prompt", "all")
