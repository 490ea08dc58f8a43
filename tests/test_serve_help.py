"""``i2v serve -h`` answers without torch or the web stack (the serve extra need not even be installed)."""

from __future__ import annotations

import subprocess
import sys


def test_serve_help_loads_neither_torch_nor_the_web_stack():
    code = (
        "import sys\nfrom i2v_cli.cli import cli\n"
        "try:\n    cli(['serve', '-h'], prog_name='i2v')\nexcept SystemExit:\n    pass\n"
        "print([m for m in ('torch', 'onnxruntime', 'fastapi', 'uvicorn', 'starlette') if m in sys.modules])"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.stdout.strip().splitlines()[-1] == "[]", proc.stderr
    assert "--token" in proc.stdout and "--max-batch" in proc.stdout and "--max-wait-ms" in proc.stdout
