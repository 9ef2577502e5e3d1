"""The dashboard's memory stays bounded however many uploads arrive: 50 uploads of 6300 x 6300 once
raised the server's peak from 601 MB to 2,052 MB (decodes spread over every request thread left
their freed memory in each thread's malloc arena)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

UPLOADS = textwrap.dedent("""
    import base64, io, os, sys, threading
    from PIL import Image
    from cliviz.app.state import DECODE_SLOTS, decode_upload

    def rss(field):
        with open(f"/proc/{os.getpid()}/status") as fh:
            return next(int(line.split()[1]) * 1024 for line in fh if line.startswith(field + ":"))

    buf = io.BytesIO()
    Image.new("RGB", (6300, 6300), (200, 30, 30)).save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    base = rss("VmRSS")
    threads = [threading.Thread(target=decode_upload, args=(url, f"{i}.png")) for i in range(50)]
    for t in threads:  # one thread per request, as the server's
        t.start()
    for t in threads:
        t.join()
    print(DECODE_SLOTS, base, rss("VmHWM"), rss("VmRSS"))
""")


@pytest.mark.slow
def test_fifty_large_uploads_keep_the_peak_bounded():
    proc = subprocess.run(
        [sys.executable, "-c", UPLOADS],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parents[1],
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr
    slots, base, peak, after = map(int, proc.stdout.split())
    decoded = 6300 * 6300 * 4  # Pillow keeps RGB at 4 bytes a pixel
    assert peak - base < (slots + 1) * decoded, f"peak grew by {(peak - base) / 1e6:.0f} MB"
    assert peak < 1.5 * 2**30
    assert after - base < decoded  # what the decodes freed does not stay with the process
