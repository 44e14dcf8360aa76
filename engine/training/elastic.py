"""Elastic restarts: under `torchrun --max-restarts N`, a round torchrun restarts continues its run.

When a worker dies, torchrun stops the others and starts every worker again with the same command
(TORCHELASTIC_RESTART_COUNT counts the rounds). That command names --out, which now holds the run,
and a rerun there is refused (or, with --overwrite, would erase it). `restart_flags` gives the
program the run flags of a restarted round instead: continue from the run's newest good checkpoint
with its saved settings, exactly as --resume does (or start it again when it has none yet), said in
one line. The program calls it once its flags are parsed, before it resolves its settings, and
saves `record()` in train_config.json under SECTION.

Which run is the job's: train_config.json records the torchrun job (TORCHELASTIC_RUN_ID: a new id
for each --standalone job, --rdzv-id on several nodes). A run another job left keeps today's
protection, in a restarted round too (a first round that refused it exits non-zero, and torchrun
restarts that as well). The job's own run continues even where this node counts no restart:
torchrun counts per node, and a node restarted for another node's failure counts none
(pytorch#108158). torchrun's default --rdzv-id "none" names no job; there this node's count decides.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from engine.training.checkpoint import RUN_CONFIG, latest_checkpoint

SECTION = "elastic"  # train_config.json: {"job": TORCHELASTIC_RUN_ID, or None outside torchrun}
NO_JOB = "none"  # torchrun's --rdzv-id when none is given


def restart_count() -> int:
    """Restarts of this node's workers so far (0: the first round, or not under torchrun)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def job() -> str | None:
    """The torchrun job this process belongs to, or None outside torchrun."""
    return os.environ.get("TORCHELASTIC_RUN_ID")


def record() -> dict[str, Any]:
    """What train_config.json keeps under SECTION: the job that (re)started the run."""
    return {"job": job()}


def restart_flags(out: Path) -> dict[str, Any]:
    """The run flags of a restarted round of this job's run in `out`, which replace the command's:
    {"resume": out, "overwrite": False} when it has a good checkpoint, {"resume": None,
    "overwrite": True} when it has none yet; {} otherwise (the command applies as typed: not under
    torchrun, no restarts allowed, a first round, or `out` holds no run of this job). Rank 0 says
    which in one line."""
    current = job()
    if current is None or int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) == 0:
        return {}
    if _recorded_job(out) != current or (current == NO_JOB and restart_count() == 0):
        return {}
    checkpoint = latest_checkpoint(out)
    if checkpoint is None:
        _say(f"{out} has no good checkpoint yet: starting it again (as --overwrite)")
        return {"resume": None, "overwrite": True}
    _say(f"continuing {out} from {checkpoint.name} with the run's saved settings (as --resume {out})")
    return {"resume": str(out), "overwrite": False}


def _recorded_job(out: Path) -> str | None:
    try:
        saved = json.loads((out / RUN_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError):  # no run there, or not one this engine can read: nothing to continue
        return None
    section = saved.get(SECTION) if isinstance(saved, dict) else None
    return section.get("job") if isinstance(section, dict) else None


def _say(message: str) -> None:
    if os.environ.get("RANK", "0") == "0":
        print(f"torchrun restarted the workers (restart {restart_count()} on this node): {message}", flush=True)
