"""MetricsLog: metrics.jsonl, TensorBoard scalars, loss.png panels."""

import json
import sys
import types

import pytest

from engine.training.metrics_log import MetricsLog


def test_loss_plot_has_one_subplot_per_panel(tmp_path):
    log = MetricsLog(tmp_path, enabled=True)
    for step in (1, 2, 3):
        log.log({"step": step, "loss": 3.0 / step, "task_loss": 1.0 / step, "lm_loss": 2.0 / step})
    log.log({"step": 3, "val_loss": 1.5, "dev_accuracy": 0.6})
    default = log.figure(hlines={"unigram entropy": 2.0})
    (ax,) = default.axes
    assert ax.get_ylabel() == "cross-entropy (nats/token)" and ax.get_xlabel() == "update"
    assert ax.get_legend_handles_labels()[1] == ["train", "validation", "unigram entropy"]
    panels = [
        ("loss (nats)", [("loss", "L3 = L2 + λ·L1"), ("task_loss", "task loss"), ("lm_loss", "LM loss")]),
        ("dev accuracy", [("dev_accuracy", "dev")]),
    ]
    fig = log.figure(panels, hlines={"chance": 0.5})
    top, bottom = fig.axes
    assert (top.get_ylabel(), bottom.get_ylabel()) == ("loss (nats)", "dev accuracy")
    assert top.get_legend_handles_labels()[1] == ["L3 = L2 + λ·L1", "task loss", "LM loss", "chance"]
    assert bottom.get_legend_handles_labels()[1] == ["dev"] and bottom.get_xlabel() == "update"
    log.plot(tmp_path / "loss.png", panels=panels)
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tensorboard_scalars_when_installed(tmp_path, monkeypatch):
    calls = []

    class FakeWriter:  # stands in for torch.utils.tensorboard.SummaryWriter (not installed here)
        def __init__(self, logdir):
            calls.append(("init", logdir))

        def add_scalar(self, tag, value, step):
            calls.append((tag, value, step))

        def close(self):
            calls.append(("close",))

    fake = types.ModuleType("torch.utils.tensorboard")
    fake.SummaryWriter = FakeWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    log = MetricsLog(tmp_path, enabled=True)
    log.log({"step": 3, "loss": 2.5, "note": "text is not a scalar"})
    log.close()
    assert calls == [("init", str(tmp_path / "tensorboard")), ("loss", 2.5, 3), ("close",)]
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {
        "step": 3,
        "loss": 2.5,
        "note": "text is not a scalar",
    }


def test_a_full_disk_names_metrics_jsonl(tmp_path, monkeypatch):
    import errno

    import engine.training.metrics_log

    class Full:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(engine.training.metrics_log, "open", lambda *a, **k: Full(), raising=False)
    log = MetricsLog(tmp_path, enabled=True)
    with pytest.raises(OSError, match="No space left on device.*metrics.jsonl") as info:
        log.log({"step": 1, "loss": 2.0})
    assert info.value.errno == errno.ENOSPC
