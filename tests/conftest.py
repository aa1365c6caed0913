import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))  # for the TensorRT stand-in

# Tests never touch the network: the hub client must fail fast if asked.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def calib_dir():
    return REPO / "calibration"


def run_cli(*args, env=None, cwd=None, timeout=900):
    """Run the real console entry in a subprocess: exit code, stdout, stderr."""
    import subprocess
    full_env = {**os.environ, **(env or {})}
    p = subprocess.run([sys.executable, "-m", "vit_deploy.cli", *map(str, args)], capture_output=True,
                       text=True, env=full_env, cwd=cwd, timeout=timeout)
    return p.returncode, p.stdout, p.stderr


def assert_one_line_error(code, stderr, *needles):
    assert code == 2, f"exit {code}, stderr: {stderr}"
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip() and not ln.startswith("warning:")]
    assert len(lines) == 1, f"expected one line, got: {stderr}"
    assert "Traceback" not in stderr
    for n in needles:
        assert n.lower() in lines[0].lower(), f"{n!r} not in {lines[0]!r}"
    return lines[0]
