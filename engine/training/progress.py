"""Progress on stderr: a tqdm bar on a terminal, one plain line per logged update elsewhere."""

from __future__ import annotations

import sys
from typing import Any


class Progress:
    """Progress on stderr: a tqdm bar on a terminal; elsewhere (a log file, a pipe) one plain
    line per logged update, since a bar written to a file is one endless line. Off: silent,
    except for `write` (warnings)."""

    def __init__(self, total: int, initial: int, enabled: bool) -> None:
        self.total, self.enabled, self.bar = total, enabled, None
        if enabled and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=total, initial=initial, unit="step", dynamic_ncols=True, file=sys.stderr, mininterval=0.5
            )

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def show(self, step: int, record: dict[str, Any]) -> None:
        """A logged update's numbers: the bar's postfix, or one line."""
        fields = _postfix(record)
        if self.bar is not None:
            self.bar.set_postfix(fields, refresh=False)
        elif self.enabled:
            print(
                f"update {step}/{self.total} " + " ".join(f"{k} {v}" for k, v in fields.items()),
                file=sys.stderr,
                flush=True,
            )

    def write(self, message: str) -> None:
        if self.bar is not None:
            self.bar.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


_RATES = ("loss", "lr", "grad_norm", "tokens_per_s", "mfu", "s_per_step", "step")


def _postfix(rec: dict[str, Any]) -> dict[str, str]:
    """The numbers a logged update shows: the loss, the extra ones loss_fn returned (e.g.
    task_loss), throughput, lr."""
    out = {"loss": f"{rec['loss']:.3f}"}
    out.update({k: f"{v:.3f}" for k, v in rec.items() if k not in _RATES and isinstance(v, (int, float))})
    if "tokens_per_s" in rec:
        out["tok/s"] = f"{rec['tokens_per_s']:,.0f}"
    if "mfu" in rec:
        out["mfu"] = f"{100 * rec['mfu']:.1f}%"
    out["lr"] = f"{rec['lr']:.2e}"
    return out
