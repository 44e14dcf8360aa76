"""setup.py where torch cannot be imported (pip's isolated build environment): one sentence
saying what to run instead, no traceback."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# sys.modules["torch"] = None makes `import torch` fail exactly as in an environment without it.
HIDE_TORCH = (
    "import sys, runpy; sys.modules['torch'] = None; sys.argv = ['setup.py', 'egg_info'];"
    " runpy.run_path('setup.py', run_name='__main__')"
)


def test_setup_without_torch_says_what_to_run_instead():
    proc = subprocess.run([sys.executable, "-c", HIDE_TORCH], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "pip install --no-build-isolation -e ." in lines[0] and "torch" in lines[0]
