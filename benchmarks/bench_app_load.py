"""Load test of the dashboard server: N clients upload a worst-case legal image at once; peak server RSS.

    python benchmarks/bench_app_load.py [--clients 20] [--kinds rgb,rgba] [--side 6300] \
        [--flow upload,ask,attribute] [--json OUT]

The server is a real `cliviz.app.create_app()` (bundled cli-tiny, CPU) served by werkzeug's threaded
server in a child process, as `cliviz dash` serves it; the clients are threads posting the same JSON
the browser posts to `/_dash-update-component` (the callback ids come from `/_dash-dependencies`),
all released together by a barrier. Per image kind the script reports the server's peak resident
memory (`VmHWM` from /proc, the kernel's own high-water mark, so no sample can miss the peak), its
resident memory before the first request, and how many requests of each step succeeded.

"Worst-case legal" images are just under the upload and pixel limits: a `--side` x `--side` picture
(6300 x 6300 = 39.7 MP; the loader's limit is 40 MP) in one flat colour, so that the PNG is a few KB
on the wire and 119 MB (`rgb`), 159 MB (`rgba`) or 79 MB (`i16`, 16-bit grey) once decoded.

Target (issue 18): 20 clients uploading such images keep the server under 1.5 GB. To measure the code
before a change, point PYTHONPATH at an export of it (a folder whose `cliviz/` holds `app/`,
`analyses/` and `assets/` as in the installed wheel); the script prints which `cliviz` it served.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request

KINDS = ("rgb", "rgba", "i16")
TARGET_PEAK_BYTES = 1.5e9


def worst_case_png(kind: str, side: int) -> bytes:
    """A `side` x `side` flat-colour PNG: tiny on the wire, the most pixels the loader accepts."""
    import numpy as np
    from PIL import Image

    if kind == "i16":
        image = Image.fromarray(np.full((side, side), 1234, dtype=np.uint16))
    else:
        image = Image.new(kind.upper(), (side, side), (200, 30, 30, 255)[: len(kind)])
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


# ----------------------------------------------------------------------------------------- server


def serve(port_file: str) -> None:
    """Child process: load the app, serve it threaded on a free port, write the port, serve forever."""
    from werkzeug.serving import make_server

    import cliviz
    from cliviz.app.factory import create_app

    app = create_app(None, device="cpu", dtype="float32")
    server = make_server("127.0.0.1", 0, app.server, threaded=True)
    with open(port_file, "w") as fh:
        fh.write(f"{server.server_port} {os.path.dirname(cliviz.__file__)}")
    server.serve_forever()


def rss_bytes(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} for pid {pid}")


# ----------------------------------------------------------------------------------------- clients


class Client:
    """Posts callback requests as the browser does (ids from `/_dash-dependencies`)."""

    def __init__(self, base: str):
        self.base = base
        with urllib.request.urlopen(base + "/_dash-dependencies", timeout=60) as r:
            deps = json.loads(r.read())
        self.upload = next(d for d in deps if d["output"].startswith("..image-store.data"))
        self.ask = next(d for d in deps if d["output"].startswith("..trace-store.data"))
        self.attribute = next(d for d in deps if d["output"] == "attr-store.data")

    def post(self, dep: dict, inputs: list, state: list, changed: str) -> dict:
        outputs = [self._spec(part) for part in self._parts(dep["output"])]
        body = {
            "output": dep["output"],
            "outputs": outputs if dep["output"].startswith("..") else outputs[0],
            "inputs": inputs,
            "state": state,
            "changedPropIds": [changed],
        }
        req = urllib.request.Request(
            self.base + "/_dash-update-component",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=600) as r:
            return json.loads(r.read())

    @staticmethod
    def _parts(output: str) -> list[str]:
        return output[2:-2].split("...") if output.startswith("..") else [output]

    @staticmethod
    def _spec(part: str) -> dict:
        ident, prop = part.rsplit(".", 1)
        return {"id": ident, "property": prop.split("@")[0]}

    def run(self, data_url: str, name: str, flow: list[str]) -> dict[str, bool]:
        done = {step: False for step in flow}
        got = self.post(
            self.upload,
            [{"id": "upload", "property": "contents", "value": data_url}, []],
            [{"id": "upload", "property": "filename", "value": name}],
            "upload.contents",
        )
        image = got["response"].get("image-store", {}).get("data")
        done["upload"] = isinstance(image, dict)
        if "ask" not in flow or not done["upload"]:
            return done
        got = self.post(
            self.ask,
            [
                {"id": "ask", "property": "n_clicks", "value": 1},
                {"id": "question", "property": "n_submit", "value": None},
            ],
            [
                {"id": "question", "property": "value", "value": "what color is the circle ?"},
                {"id": "image-store", "property": "data", "value": image},
            ],
            "ask.n_clicks",
        )
        store = got["response"].get("trace-store", {}).get("data")
        done["ask"] = isinstance(store, dict)
        if "attribute" in flow and done["ask"]:
            got = self.post(
                self.attribute, [{"id": "trace-store", "property": "data", "value": store}], [], "trace-store.data"
            )
            payload = got["response"].get("attr-store", {}).get("data")
            done["attribute"] = isinstance(payload, dict) and "error" not in payload
        return done


def load_round(base: str, png: bytes, clients: int, flow: list[str]) -> dict:
    client = Client(base)
    data_url = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
    barrier = threading.Barrier(clients)
    results: list[dict] = []
    errors: list[str] = []

    def one(k: int) -> None:
        barrier.wait()
        try:
            results.append(client.run(data_url, f"big-{k}.png", flow))
        except Exception as err:  # noqa: BLE001 - counted and reported
            errors.append(f"{type(err).__name__}: {err}")

    threads = [threading.Thread(target=one, args=(k,)) for k in range(clients)]
    t0 = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    ok = {step: sum(r.get(step, False) for r in results) for step in flow}
    return {"wall_s": time.perf_counter() - t0, "ok": ok, "errors": errors[:3], "n_errors": len(errors)}


def measure(kind: str, args) -> dict:
    png = worst_case_png(kind, args.side)
    port_file = f"/tmp/cliviz-bench-load-{os.getpid()}-{kind}"
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.Popen(
        [sys.executable, __file__, "--serve", port_file],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + 300
        while not (os.path.exists(port_file) and os.path.getsize(port_file)):
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"server did not start: {proc.stderr.read()[-2000:] if proc.stderr else ''}")
            time.sleep(0.2)
        port, served = open(port_file).read().split(" ", 1)
        base = f"http://127.0.0.1:{port}"
        idle = rss_bytes(proc.pid, "VmRSS")
        result = load_round(base, png, args.clients, args.flow)
        alive = proc.poll() is None
        peak = rss_bytes(proc.pid, "VmHWM") if alive else None
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=30)
        if os.path.exists(port_file):
            os.unlink(port_file)
    return {
        "kind": kind,
        "png_bytes": len(png),
        "side": args.side,
        "clients": args.clients,
        "served": served,
        "idle_rss_mb": idle / 1e6,
        "peak_rss_mb": None if peak is None else peak / 1e6,
        "server_alive": alive,
        "under_target": peak is not None and peak < TARGET_PEAK_BYTES,
        **result,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--kinds", default="rgb,rgba", help=f"comma-separated, of {', '.join(KINDS)}")
    parser.add_argument("--side", type=int, default=6300)
    parser.add_argument("--flow", default="upload,ask", help="steps per client: upload[,ask[,attribute]]")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--serve", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve)
        return
    args.flow = [s for s in args.flow.split(",") if s]
    rows = [measure(kind, args) for kind in args.kinds.split(",") if kind]
    print(f"load average {os.getloadavg()[0]:.2f}; cliviz served from {rows[0]['served'] if rows else '?'}")
    print(f"{'kind':6} {'png KB':>7} {'idle MB':>8} {'peak MB':>8} {'<1.5GB':>7} {'wall s':>7}  ok per step")
    for r in rows:
        peak = f"{r['peak_rss_mb']:.0f}" if r["peak_rss_mb"] is not None else "died"
        print(
            f"{r['kind']:6} {r['png_bytes'] / 1e3:7.1f} {r['idle_rss_mb']:8.0f} {peak:>8} "
            f"{str(r['under_target']):>7} {r['wall_s']:7.1f}  {r['ok']} errors={r['n_errors']} {r['errors'][:1]}"
        )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)


if __name__ == "__main__":
    main()
