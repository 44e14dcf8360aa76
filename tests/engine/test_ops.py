"""engine/ops.py as a package boundary: the fused path from a plain checkout (PYTHONPATH only,
no pip install), with and without a C++ compiler."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """
import warnings, torch
from engine import GPT1, GPT1Config
cfg = GPT1Config.from_name("gpt1-tiny", vocab_size=50)
torch.manual_seed(0)
ids = torch.randint(0, 50, (2, 8))
ref = GPT1(cfg, fused=False).eval()
print("reference", ref(ids, labels=ids).loss.item())
warnings.simplefilter("ignore")
fused = GPT1(cfg, fused=True).eval()
fused.load_state_dict(ref.state_dict())
try:
    print("fused", fused(ids, labels=ids).loss.item())
except RuntimeError as e:
    print("ERROR", e)
"""


def checkout_copy(tmp_path: Path) -> Path:
    """engine/ and csrc/ as a fresh checkout would have them: sources only, no built extension."""
    root = tmp_path / "checkout"
    for name in ("engine", "csrc"):
        shutil.copytree(ROOT / name, root / name, ignore=shutil.ignore_patterns("_C*.so", "__pycache__"))
    return root


def run(root: Path, tmp_path: Path, **env: str) -> str:
    full_env = {**os.environ, "PYTHONPATH": str(root), "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext"), **env}
    full_env.pop("GPT1_CPU_KERNELS", None)
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=root, env=full_env, capture_output=True, text=True, timeout=900
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_without_a_compiler_reference_works_and_fused_says_why(tmp_path):
    root = checkout_copy(tmp_path)
    out = run(root, tmp_path, CXX="/nonexistent/c++")
    assert "reference " in out
    error = next(line for line in out.splitlines() if line.startswith("ERROR"))
    assert "fused CPU kernels are unavailable" in error
    assert "/nonexistent/c++: not found" in error  # the compiler's own words, not a generic failure
    assert "fused=False" in error  # and what to do instead


@pytest.mark.slow
def test_plain_checkout_jit_builds_the_extension(tmp_path):
    """As on the GPU machine: no pip install, the C++ kernels are JIT-built from csrc/."""
    root = checkout_copy(tmp_path)
    out = run(root, tmp_path)
    values = dict(line.split(" ", 1) for line in out.splitlines() if line.split(" ", 1)[0] in ("reference", "fused"))
    assert set(values) == {"reference", "fused"}, out
    assert abs(float(values["reference"]) - float(values["fused"])) < 1e-5  # same weights, dropout off


TRITON_ON_CPU = """
import torch
from engine import GPT1, GPT1Config, ops
ops.load_cpu_kernels()
try:  # head_dim 24: the C++ kernel takes it, the Triton launcher refuses it by name
    torch.ops.gpt1.attention_fwd(torch.zeros(1, 4, 72), 1, 0.0, None)
except ValueError as e:
    print("REFUSED", e)
cfg = GPT1Config(
    n_layer=1, n_embd=32, n_head=2, n_positions=8, vocab_size=37, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0
)
torch.manual_seed(0)
ref = GPT1(cfg, fused=False)
fused = GPT1(cfg, fused=True)
fused.load_state_dict(ref.state_dict())
ids = torch.randint(0, 37, (2, 8))
losses = [m(ids, labels=ids).loss for m in (ref, fused)]
for loss in losses:
    loss.backward()
grad_err = max((a.grad - b.grad).abs().max().item() for a, b in zip(ref.parameters(), fused.parameters()))
print("ERR", abs(losses[0].item() - losses[1].item()), grad_err)
"""


def test_triton_launchers_serve_the_cpu_when_asked(tmp_path):
    """GPT1_CPU_KERNELS=triton (with TRITON_INTERPRET=1): the fused model runs the Triton launchers
    on the CPU (tests/ops runs each op that way in-process) and matches the reference path."""
    pytest.importorskip("triton")
    env = {**os.environ, "GPT1_CPU_KERNELS": "triton", "TRITON_INTERPRET": "1"}
    out = subprocess.run(
        [sys.executable, "-c", TRITON_ON_CPU], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "REFUSED attention_fwd: head_dim = C / n_head = 24 / 1 = 24" in out.stdout, out.stdout
    loss_err, grad_err = (float(v) for v in out.stdout.split("ERR ")[1].split())
    assert loss_err < 1e-5 and grad_err < 1e-5, out.stdout
