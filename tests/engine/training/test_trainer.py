"""The shared training engine: schedule, weight-decay groups, accumulation, exact resume,
checkpoints, non-finite losses, metrics and the run-directory policy (CPU, tiny model)."""

import errno
import json
import math
import os
import signal
import stat
import sys

import numpy as np
import pytest
import torch

from engine import GPT1, GPT1Config
from engine.cli import UserError
from engine.data.windows import RandomWindows, eval_batches
from engine.training.checkpoint import (
    TRAINER_STATE,
    clear_run_dir,
    latest_checkpoint,
    list_checkpoints,
    load_trainer_state,
    prepare_run_dir,
)
from engine.training.config import TrainConfig
from engine.training.optim import Schedule, build_optimizer, param_groups
from engine.training.trainer import Job, Trainer
from helpers import assert_close, assert_fa_rule

MODEL = dict(n_layer=2, n_embd=32, n_head=2, n_positions=16, vocab_size=61)
SEQ = 12
TOKENS = np.random.default_rng(0).integers(0, 61, 4000).astype(np.uint16)


def loss_fn(model, batch):
    return model(batch[:, :-1], targets=batch[:, 1:]).loss


def make_trainer(tmp_path, dropout=0.1, loss=loss_fn, resume_from=None, init_seed=0, **overrides):
    """A tiny run; fp32 unless `precision` says otherwise (auto would be bf16 on AMX/AVX512-BF16 CPUs)."""
    cfg = TrainConfig(
        **{
            **dict(
                out=str(tmp_path),
                max_steps=6,
                batch_size=4,
                micro_batch_size=2,
                lr=1e-3,
                warmup_steps=2,
                eval_every=0,
                checkpoint_every=0,
                log_every=1,
                precision="fp32",
            ),
            **overrides,
        }
    )
    torch.manual_seed(init_seed)
    pdrop = dict(resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout)
    model = GPT1(GPT1Config(**MODEL, **pdrop), fused=False)

    def evaluate(trainer):
        return {"val_loss": trainer.eval_loss(eval_batches(TOKENS[:600], SEQ + 1, 4))}

    windows = RandomWindows(TOKENS, SEQ + 1, cfg.batch_size, cfg.seed)
    job = Job(loss, windows, evaluate=evaluate, tokens_per_sample=SEQ)
    return Trainer(model, cfg, job, resume_from=resume_from, progress=False)


# ---- schedule and optimiser ---------------------------------------------------------------


def test_schedule_warmup_peak_and_end():
    s = Schedule(warmup_steps=2000, max_steps=10000, kind="cosine")
    assert s(0) == pytest.approx(1 / 2000)
    assert s(999) == pytest.approx(0.5)
    assert s(1999) == 1.0  # peak at the last warm-up update
    assert s(1999 + 4000) == pytest.approx(0.5)  # half-way through the cosine
    assert s(9999) == pytest.approx(0.0, abs=1e-12)  # annealed to 0 at the last update
    values = [s(k) for k in range(10000)]
    assert max(values) == 1.0 and all(a <= b for a, b in zip(values[:2000], values[1:2000]))
    assert all(a >= b for a, b in zip(values[1999:], values[2000:]))
    lin = Schedule(10, 110, "linear")
    assert lin(9) == 1.0 and lin(59) == pytest.approx(0.5) and lin(109) == 0.0
    assert Schedule(10, 110, "constant")(100) == 1.0


def spy_lr(trainer, seen):
    """Records the lr AdamW reads at each update of `trainer`."""
    step = trainer.optimizer.step

    def spy(*args, **kwargs):
        seen.append([g["lr"] for g in trainer.optimizer.param_groups])
        return step(*args, **kwargs)

    trainer.optimizer.step = spy


def test_each_update_runs_at_lr_times_the_schedule_also_after_resume(tmp_path):
    """group["lr"] = lr · schedule(k) is set before update k, in a fresh and a resumed run."""
    schedule = Schedule(2, 6, "cosine")
    seen = []
    part = make_trainer(tmp_path, dropout=0.0)
    spy_lr(part, seen)
    ckpt = part.fit(stop_at=3).checkpoint
    resumed = make_trainer(tmp_path, dropout=0.0, resume_from=ckpt)
    for g in resumed.optimizer.param_groups:
        g["lr"] = 123.0  # a stale value (as restored from a checkpoint) must not reach the next update
    spy_lr(resumed, seen)
    resumed.fit()
    assert seen == [[1e-3 * schedule(k)] * 2 for k in range(6)]
    logged = [r["lr"] for r in resumed.metrics.records if "loss" in r]
    assert logged == [1e-3 * schedule(k) for k in range(6)]


def test_warmup_default_is_capped_at_a_tenth_of_the_run():
    assert TrainConfig(max_steps=100000).warmup_steps == 2000  # the paper's value
    assert TrainConfig(max_steps=300).warmup_steps == 30
    assert TrainConfig(max_steps=3).warmup_steps == 1


def test_weight_decay_groups():
    model = GPT1(GPT1Config(**MODEL), fused=False)
    decay, no_decay = param_groups(model, 0.01)
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    assert "tokens_embed.weight" in decay["names"] and "positions_embed.weight" in decay["names"]
    assert "h.0.attn.c_attn.weight" in decay["names"] and "h.1.mlp.c_proj.weight" in decay["names"]
    assert "h.0.attn.c_attn.bias" in no_decay["names"] and "h.0.ln_1.weight" in no_decay["names"]
    assert all(n.endswith(".bias") or ".ln_" in n for n in no_decay["names"])
    names = decay["names"] + no_decay["names"]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters()) and len(set(names)) == len(names)
    opt = build_optimizer(model, TrainConfig())
    assert [g["weight_decay"] for g in opt.param_groups] == [0.01, 0.0]
    assert opt.defaults["betas"] == (0.9, 0.999) and opt.defaults["eps"] == 1e-8
    assert opt.defaults["fused"]  # torch's fused AdamW exists on CPU in torch >= 2.4


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(lr=-1.0), "--lr must be a positive"),
        (dict(lr=float("nan")), "--lr must be a positive"),
        (dict(batch_size=0), "--batch-size must be positive"),
        (dict(max_steps=-5), "--max-steps must be positive"),
        (dict(warmup_steps=50, max_steps=10), "--warmup-steps .50. must not exceed --max-steps .10."),
        (dict(beta2=1.0), "--beta2 must be in"),
        (dict(weight_decay=-0.1), "--weight-decay"),
        (dict(schedule="step"), "--schedule must be one of"),
        (dict(micro_batch_size=0), "--micro-batch-size must be positive"),
        (dict(eval_every=-1), "--eval-every must be >= 0"),
    ],
)
def test_config_rejects_nonsense(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kwargs)


# ---- the loop -----------------------------------------------------------------------------


def weights(trainer):
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


@pytest.mark.parametrize("optimizer", ["adamw", "openai-adam"])
def test_exact_resume_is_bit_identical(tmp_path, optimizer):
    """Interrupt after update 3 (checkpoint), resume in a fresh trainer built from different
    initial weights: the final weights and optimizer state equal an uninterrupted run's, bit
    for bit. Dropout on, so the restored RNG state matters."""
    full = make_trainer(tmp_path / "full", optimizer=optimizer)
    assert full.fit().status == "finished"
    assert type(full.optimizer).__name__ == {"adamw": "AdamW", "openai-adam": "OpenAIAdam"}[optimizer]
    part = make_trainer(tmp_path / "part", optimizer=optimizer)
    result = part.fit(stop_at=3)
    assert result.status == "stopped" and result.step == 3
    torch.manual_seed(1234)  # disturb every RNG before resuming
    np.random.seed(1234)
    resumed = make_trainer(tmp_path / "part", resume_from=result.checkpoint, init_seed=99, optimizer=optimizer)
    assert resumed.step == 3
    assert resumed.fit().status == "finished"
    a, b = weights(full), weights(resumed)
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"
    sa, sb = full.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    for i in sa:
        assert torch.equal(sa[i]["exp_avg"], sb[i]["exp_avg"]) and torch.equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"])
    losses = lambda t: [r["loss"] for r in t.metrics.records if "loss" in r]  # noqa: E731
    assert losses(full) == losses(resumed)
    # The resumed run's metrics.jsonl has each step once.
    records = [json.loads(line) for line in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 7))


def test_accumulation_matches_the_full_batch(tmp_path):
    a = make_trainer(tmp_path / "a", dropout=0.0, micro_batch_size=1, max_steps=3)  # 4 accumulation steps
    b = make_trainer(tmp_path / "b", dropout=0.0, micro_batch_size=4, max_steps=3)  # one forward
    assert a.accum_steps == 4 and b.accum_steps == 1
    a.fit(), b.fit()
    wa, wb = weights(a), weights(b)
    for k in wa:
        assert_close(wa[k], wb[k], k)


def test_accumulation_under_bf16_autocast_keeps_bf16s_error(tmp_path):
    """Under bf16 autocast, the gradient of 4 accumulated micro-batches is as close to the fp32
    full-batch gradient as one bf16 forward's is (the FlashAttention rule). Gradients, not
    weights: Adam's first update is lr · sign(g) and would hide all but the signs."""
    grads = {}
    for name, kw in {
        "fp32": dict(micro_batch_size=4),
        "bf16": dict(micro_batch_size=4, precision="bf16"),
        "bf16_accum": dict(micro_batch_size=1, precision="bf16"),
    }.items():
        t = make_trainer(tmp_path / name, dropout=0.0, max_steps=1, warmup_steps=1, grad_clip=0.0, **kw)
        t.optimizer.register_step_pre_hook(
            lambda opt, *_, name=name, t=t: grads.update(
                {name: {k: p.grad.clone() for k, p in t.model.named_parameters()}}
            )
        )
        t.fit()
    assert t.autocast == torch.bfloat16 and t.accum_steps == 4
    for k, ref in grads["fp32"].items():
        assert_fa_rule(grads["bf16_accum"][k], ref, grads["bf16"][k], k, computed_in=torch.bfloat16)


def test_checkpoints_keep_the_last_k_and_load_safely(tmp_path):
    t = make_trainer(tmp_path, max_steps=7, checkpoint_every=2, keep_checkpoints=2)
    t.fit()
    ckpts = list_checkpoints(tmp_path)
    assert [p.name for p in ckpts] == ["step_00000006", "step_00000007"]
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]  # no temp dirs
    state = load_trainer_state(ckpts[-1])  # torch.load(weights_only=True)
    assert state["step"] == 7 and state["world_size"] == 1
    assert state["data"] == {"next_step": 7, "windows_consumed": 7 * 4}  # 4 windows per update
    assert {"optimizer", "rng", "train_config", "bad_steps", "extra"} <= state.keys()
    assert state.keys() == t.state_dict().keys()
    assert json.loads((ckpts[-1] / "checkpoint.json").read_text())["good"] is True
    assert {"python", "numpy", "torch"} <= state["rng"][0].keys()
    final = GPT1.from_pretrained(tmp_path, fused=False)  # the run dir's final weights
    ckpt = GPT1.from_pretrained(ckpts[-1], fused=False)
    for k, v in weights(t).items():
        assert torch.equal(final.state_dict()[k], v) and torch.equal(ckpt.state_dict()[k], v)


def test_every_file_of_a_run_honours_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        make_trainer(tmp_path / "run", max_steps=2, checkpoint_every=1).fit()
    finally:
        os.umask(old)
    paths = list((tmp_path / "run").rglob("*"))
    assert {p.name for p in paths} >= {
        "model.safetensors",
        "config.json",
        "trainer_state.pt",
        "checkpoint.json",
        "loss.png",
    }
    modes = {p.relative_to(tmp_path): stat.S_IMODE(p.stat().st_mode) for p in paths}
    assert modes == {p: 0o755 if (tmp_path / p).is_dir() else 0o644 for p in modes}


def test_metrics_and_plot(tmp_path):
    t = make_trainer(tmp_path, eval_every=3)
    t.fit()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    val = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in train] == list(range(1, 7))
    assert all(r["tokens_per_s"] > 0 and math.isfinite(r["loss"]) and "lr" in r for r in train)
    assert [r["step"] for r in val] == [3, 6]
    assert train[1]["lr"] == pytest.approx(1e-3)  # update 2 ends the warm-up
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def nan_at(steps):
    calls = {"n": 0}

    def loss(model, batch):
        calls["n"] += 1
        out = loss_fn(model, batch)
        step = (calls["n"] - 1) // 2 + 1  # two micro-batches per update
        return out * float("nan") if step in steps else out

    return loss


def test_non_finite_loss_skips_the_update(tmp_path, capsys):
    t = make_trainer(tmp_path, dropout=0.0, loss=nan_at({3}), max_steps=5, checkpoint_every=0)
    before = {}

    def snapshot(trainer):
        before[trainer.step] = weights(trainer)
        return {}

    t.evaluate = snapshot
    t.cfg.eval_every = 1
    result = t.fit()
    assert result.status == "finished" and result.step == 5
    for k in before[2]:
        assert torch.equal(before[2][k], before[3][k]), "update 3 (NaN loss) changed the weights"
    assert not torch.equal(before[3]["h.0.attn.c_attn.weight"], before[4]["h.0.attn.c_attn.weight"])
    assert "non-finite loss" in capsys.readouterr().err
    assert all(torch.isfinite(v).all() for v in weights(t).values())


def test_consecutive_non_finite_losses_stop_with_the_good_checkpoint_intact(tmp_path, capsys):
    t = make_trainer(tmp_path, dropout=0.0, loss=nan_at({3, 4, 5, 6}), max_steps=8, checkpoint_every=2, max_bad_steps=3)
    result = t.fit()
    assert result.status == "diverged" and result.step == 5
    assert not (tmp_path / "model.safetensors").exists()  # no final weights from a diverged run
    # Update 4 came inside the streak: no checkpoint of that state.
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000002"]
    assert result.checkpoint == tmp_path / "checkpoints" / "step_00000002"
    assert "The last good checkpoint is " + str(result.checkpoint) in capsys.readouterr().err
    assert all(
        torch.isfinite(v).all() for v in GPT1.from_pretrained(result.checkpoint, fused=False).state_dict().values()
    )


def test_a_run_ending_inside_a_short_streak_diverges_and_keeps_the_good_checkpoints(tmp_path, capsys):
    """A streak shorter than --max-bad-steps at the end: no final weights, no checkpoint of
    the bad state, the good ones not rotated out, and the last good one named."""
    t = make_trainer(
        tmp_path, dropout=0.0, loss=nan_at({5, 6}), max_steps=6, checkpoint_every=1, keep_checkpoints=2, max_bad_steps=5
    )
    result = t.fit()
    assert result.status == "diverged" and result.step == 6
    assert not (tmp_path / "model.safetensors").exists()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000003", "step_00000004"]
    assert result.checkpoint == tmp_path / "checkpoints" / "step_00000004"
    assert latest_checkpoint(tmp_path) == result.checkpoint
    assert f"The last good checkpoint is {result.checkpoint}" in capsys.readouterr().err


def test_stop_at_inside_a_streak_is_diverged_too(tmp_path):
    t = make_trainer(tmp_path, dropout=0.0, loss=nan_at({3}), max_steps=6, checkpoint_every=2)
    result = t.fit(stop_at=3)
    assert result.status == "diverged" and result.checkpoint.name == "step_00000002"
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000002"]


def test_an_interrupt_inside_a_streak_writes_nothing_from_the_bad_state(tmp_path):
    nan = nan_at({3})

    def signalled(model, batch):
        out = nan(model, batch)
        if not torch.isfinite(out):
            t._signal = signal.SIGTERM  # as the handler does
        return out

    t = make_trainer(tmp_path, dropout=0.0, loss=signalled, max_steps=6, checkpoint_every=2)
    result = t.fit()
    assert result.status == "interrupted" and result.step == 3
    assert result.checkpoint.name == "step_00000002" and [p.name for p in list_checkpoints(tmp_path)] == [
        "step_00000002"
    ]
    assert not (tmp_path / "model.safetensors").exists()


def test_resume_falls_back_from_a_corrupt_newest_checkpoint(tmp_path, capsys):
    """The newest checkpoint's weights are truncated: resuming says so in one line and
    continues from the one before, ending where an uninterrupted run does."""
    full = make_trainer(tmp_path / "full")
    full.fit()
    part = make_trainer(tmp_path / "part", checkpoint_every=2)
    part.fit(stop_at=4)
    newest = tmp_path / "part" / "checkpoints" / "step_00000004"
    weights_file = newest / "model.safetensors"
    weights_file.write_bytes(weights_file.read_bytes()[:100])
    capsys.readouterr()
    resumed = make_trainer(tmp_path / "part", resume_from=newest, init_seed=99)
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        len(err) == 1
        and "step_00000004" in err[0]
        and "resuming from" in err[0]
        and err[0].endswith("step_00000002, the newest that reads")
    )
    assert resumed.step == 2 and resumed.resumed_from.name == "step_00000002"
    resumed.fit()
    for k, v in weights(full).items():
        assert torch.equal(v, weights(resumed)[k]), f"{k} differs after the fallback resume"


def test_disk_full_while_checkpointing_loses_nothing(tmp_path):
    t = make_trainer(tmp_path, max_steps=4, checkpoint_every=2)
    save = t.weights.save
    calls = {"n": 0}

    def full_disk(model, path):
        calls["n"] += 1
        if calls["n"] == 2:  # the second checkpoint
            (path / "model.safetensors").write_bytes(b"half")
            raise OSError(errno.ENOSPC, "No space left on device")
        save(model, path)

    t.weights.save = full_disk
    with pytest.raises(OSError, match=r"No space left on device.*step_00000004") as info:
        t.fit()
    assert info.value.errno == errno.ENOSPC
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_00000002"]  # no temporaries
    GPT1.from_pretrained(tmp_path / "checkpoints" / "step_00000002", fused=False)  # still readable
    assert load_trainer_state(tmp_path / "checkpoints" / "step_00000002")["step"] == 2


def test_loader_errors_reach_the_training_thread(tmp_path):
    t = make_trainer(tmp_path)

    def broken(step, start, count):
        raise OSError("disk on fire")

    t.batches = broken
    with pytest.raises(OSError, match="disk on fire"):
        t.fit()


# ---- run directory --------------------------------------------------------------------------


def test_run_dir_policy(tmp_path):
    assert prepare_run_dir(tmp_path / "new", resume=False, overwrite=False) is None
    t = make_trainer(tmp_path / "run", max_steps=2)
    t.fit()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="already holds a run; pass --resume .* or --overwrite"):
        prepare_run_dir(tmp_path / "run", resume=False, overwrite=False)
    assert prepare_run_dir(tmp_path / "run", resume=True, overwrite=False).name == "step_00000002"
    with pytest.raises(UserError, match="contradict"):
        prepare_run_dir(tmp_path / "run", resume=True, overwrite=True)
    with pytest.raises(UserError, match="no checkpoint found"):
        prepare_run_dir(tmp_path / "new", resume=True, overwrite=False)
    assert prepare_run_dir(tmp_path / "run", resume=False, overwrite=True) is None
    clear_run_dir(tmp_path / "run")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["notes.txt"]  # only run files removed
    assert not list((tmp_path / "run").glob(f"**/{TRAINER_STATE}"))


# ---- progress -------------------------------------------------------------


def with_task_loss(model, batch):
    loss = loss_fn(model, batch)
    return loss, {"task_loss": 0.5 * loss.item()}


def test_progress_is_one_plain_line_per_log_when_stderr_is_not_a_terminal(tmp_path, capsys):
    t = make_trainer(tmp_path, loss=with_task_loss, max_steps=4, log_every=2)
    t.progress = True
    t.fit()
    err = capsys.readouterr().err
    assert "\r" not in err  # no tqdm bar
    lines = err.strip().splitlines()
    assert [line.split()[:2] for line in lines] == [["update", "2/4"], ["update", "4/4"], ["update", "4:"]]
    assert all("loss " in line and "task_loss " in line and "lr " in line and "tok/s " in line for line in lines[:2])
    assert lines[2].startswith("update 4: val_loss ")  # the evaluation at the end


def test_the_bar_on_a_terminal_shows_the_extra_losses(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    t = make_trainer(tmp_path, loss=with_task_loss, max_steps=2, log_every=1)
    t.progress = True
    t.fit()
    err = capsys.readouterr().err
    assert "\r" in err and "task_loss=" in err and "2/2" in err
    assert "update 1/2 loss" not in err  # no plain lines beside the bar
