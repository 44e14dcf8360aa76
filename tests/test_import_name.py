"""The Triton package's import name (engine/_kernels.py): PyPI's `kernels` is Hugging Face's, and
transformers imports it. In each way the engine is used — the editable install (the README's),
a plain `pip install .`, a checkout on PYTHONPATH without installing (the GPU machine) — and from
the checkout's root as from elsewhere, `import kernels` must be theirs, `gpt1_kernels` ours, and
transformers' OpenAI GPT must load what the engine saves, in one process."""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Runs in the subprocess: every module a user could mix, one process; prints where each came from.
PROBE = r"""
import json, os, sys, tempfile
import kernels as hf_kernels
from transformers import OpenAIGPTLMHeadModel
import torch
import engine
from engine import GPT1, GPT1Config
from engine._kernels import kernel_module

attention = kernel_module("attention")
config = GPT1Config(n_layer=1, n_embd=32, n_head=2, n_positions=16, vocab_size=50)
torch.manual_seed(0)
ours = GPT1(config, fused=True).eval()  # GPT1_CPU_KERNELS=triton: the fused path runs gpt1_kernels
ids = torch.randint(0, 50, (2, 9))
with tempfile.TemporaryDirectory() as d:
    ours.save_pretrained(d)
    theirs = OpenAIGPTLMHeadModel.from_pretrained(d).eval()
    with torch.no_grad():
        err = (ours(ids).logits - theirs(ids).logits).abs().max().item()
print(json.dumps({"hf_kernels": hf_kernels.__file__, "engine": engine.__file__,
                  "gpt1_kernels": attention.__file__, "logits_err": err}))
"""


def _probe(cwd: Path, *, path: list[Path] | None = None) -> dict:
    """PROBE's answer, run from `cwd`. With `path`, Python starts without site (-S: no .pth files,
    so not the editable install's finder) and sees only `path` and this interpreter's site-packages."""
    env = {**os.environ, "GPT1_CPU_KERNELS": "triton", "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-c", PROBE]
    if path is not None:
        env["PYTHONPATH"] = os.pathsep.join(map(str, [*path, *site.getsitepackages()]))
        cmd.insert(1, "-S")
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _check(found: dict, engine_dir: Path, kernels_dir: Path) -> None:
    assert Path(found["engine"]).parent == engine_dir, found
    assert Path(found["gpt1_kernels"]).parent == kernels_dir, found
    hf = Path(found["hf_kernels"]).parent  # Hugging Face's package, installed in site-packages
    assert str(hf.parent) in site.getsitepackages(), f"`import kernels` is not Hugging Face's: {hf}"
    assert found["logits_err"] < 1e-4, found


def _checkout_copy(dest: Path) -> Path:
    """The tracked files of this checkout (what a clone holds), at `dest`."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for rel in filter(None, files.decode().split("\0")):
        if (ROOT / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, dest / rel)
    return dest


def _editable_root() -> Path | None:
    """The checkout this environment's gpt1-engine is editable-installed from, if it is."""
    try:
        text = metadata.distribution("gpt1-engine").read_text("direct_url.json")
    except metadata.PackageNotFoundError:
        return None
    info = json.loads(text or "{}")
    if not info.get("dir_info", {}).get("editable"):
        return None
    return Path(info["url"].removeprefix("file://"))


def test_editable_install_from_the_root_and_elsewhere(tmp_path):
    root = _editable_root()
    if root is None:
        pytest.skip("gpt1-engine is not editable-installed here (the README's set-up installs it so)")
    for cwd in (root, tmp_path):
        _check(_probe(cwd), root / "engine", root / "kernels")


def test_plain_checkout_from_the_root_and_elsewhere(tmp_path):
    checkout = _checkout_copy(tmp_path / "checkout")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for cwd in (checkout, elsewhere):
        _check(_probe(cwd, path=[checkout]), checkout / "engine", checkout / "kernels")


@pytest.mark.slow
def test_pip_install_from_the_source_root_and_elsewhere(tmp_path):
    source = _checkout_copy(tmp_path / "source")
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--target",
            str(target),
            str(source),
        ],
        check=True,
        capture_output=True,
        timeout=900,
    )
    assert not (target / "kernels").exists(), "pip must not install a top-level `kernels`"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    _check(_probe(elsewhere, path=[target]), target / "engine", target / "gpt1_kernels")
    # From the source tree's root its engine/ comes first on sys.path (as any package's would), with
    # that tree's kernels; the kernels/ folder there must still not hide Hugging Face's.
    _check(_probe(source, path=[target]), source / "engine", source / "kernels")
