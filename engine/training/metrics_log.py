"""The run's metrics: metrics.jsonl (one JSON object per record, each with "step"),
TensorBoard scalars when the package is installed, and loss.png with one subplot per panel."""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import Any

from engine.fileio import atomic_write, atomic_write_text, with_path
from engine.training.checkpoint import METRICS

Panels = list[tuple[str, list[tuple[str, str]]]]
DEFAULT_PANELS: Panels = [("cross-entropy (nats/token)", [("loss", "train"), ("val_loss", "validation")])]


class MetricsLog:
    """metrics.jsonl (one object per record, each with "step"), TensorBoard scalars when the
    package is installed, and loss.png. Only the main process writes."""

    def __init__(self, run_dir: Path, enabled: bool) -> None:
        self.path = run_dir / METRICS
        self.enabled = enabled
        self.records: list[dict[str, Any]] = []
        self._tb = None
        if enabled:
            with contextlib.suppress(Exception):  # tensorboard absent or broken: JSONL only
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(run_dir / "tensorboard"))

    def resume(self, step: int) -> None:
        """Keeps the records up to `step` (later ones belong to work the checkpoint lost)."""
        if not self.path.is_file():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                rec = json.loads(line)
                if isinstance(rec, dict) and rec.get("step", 0) <= step:
                    kept.append(rec)
        self.records = kept
        if self.enabled:
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def log(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        if not self.enabled:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:  # a failed write() does not name its file
            raise with_path(e, self.path) from e
        if self._tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, record["step"])

    def plot(self, path: Path, *, panels: Panels | None = None, hlines: dict[str, float] | None = None) -> None:
        """Writes `figure(panels, hlines)` to `path` as a PNG (atomically)."""
        if not self.enabled:
            return
        import matplotlib.pyplot as plt

        fig = self.figure(panels, hlines)
        try:
            atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
        finally:
            plt.close(fig)

    def figure(self, panels: Panels | None = None, hlines: dict[str, float] | None = None) -> Any:
        """One subplot per panel, stacked over a shared update axis. A panel is (y-axis label,
        [(metrics key, legend label), ...]); the default plots train and validation loss.
        `hlines` adds labelled horizontal reference lines (e.g. the unigram entropy) to the
        first panel."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        panels = panels or DEFAULT_PANELS
        fig, axes = plt.subplots(len(panels), 1, figsize=(7, 1.3 + 3.2 * len(panels)), sharex=True, squeeze=False)
        for i, (ax, (ylabel, series)) in enumerate(zip(axes[:, 0], panels)):
            for key, label in series:
                pts = [(r["step"], r[key]) for r in self.records if isinstance(r.get(key), (int, float))]
                if pts:  # sparse series (evaluations) get markers
                    ax.plot(*zip(*pts), label=label, marker="o" if len(pts) <= 50 else None, markersize=3)
            for label, y in (hlines or {}).items() if i == 0 else ():
                if math.isfinite(y):
                    ax.axhline(y, color="gray", linestyle="--", linewidth=1, label=label)
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend()
        axes[-1, 0].set_xlabel("update")
        fig.tight_layout()
        return fig

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
