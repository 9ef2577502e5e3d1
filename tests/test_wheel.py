"""A non-editable wheel install works: one `cliviz` namespace and the bundled model inside it."""

from __future__ import annotations

import os
import site
import subprocess
import sys
import zipfile

from conftest import REPO


def test_wheel_installs_and_answers_with_the_bundled_model(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path)],
        check=True, capture_output=True, cwd=tmp_path,
    )
    wheel = next(tmp_path.glob("cliviz-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for expected in ("cliviz/analyses/heatmaps.py", "cliviz/app/__init__.py", "cliviz/assets/models/cli-tiny/model.safetensors",
                     "cliviz/assets/examples/color.png", "cliviz/tracing/record.py", "cliviz/py.typed",
                     "cliviz/assets/models/llava-tiny-base/preprocessor_config.json"):
        assert expected in names, expected
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True, capture_output=True)
    # Dependencies come from the test environment (no downloads); a path added by a .pth line
    # does not run that folder's own .pth files, so the editable checkout stays invisible.
    target = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                            capture_output=True, text=True, check=True).stdout.strip()
    with open(os.path.join(target, "_deps.pth"), "w") as f:
        f.write("\n".join(site.getsitepackages()) + "\n")
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    where = subprocess.run([str(py), "-c", "import cliviz, cliviz.analyses, cliviz.app; cliviz.load_model; "
                                           "cliviz.ablate; print(cliviz.__file__)"],
                           capture_output=True, text=True, env=env, cwd=tmp_path)
    assert where.returncode == 0, where.stderr
    assert where.stdout.strip().startswith(str(venv)), where.stdout
    image = REPO / "assets" / "examples" / "color.png"
    proc = subprocess.run([str(venv / "bin" / "cliviz"), "ask", str(image), "what color is the triangle ?", "--json"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert '"answer"' in proc.stdout
