"""The shared training engine: schedule, weight-decay groups, accumulation, exact resume,
checkpoints, non-finite losses, metrics and the run-directory policy (CPU, tiny model)."""
import json
import math

import numpy as np
import pytest
import torch

from engine import GPT1, GPT1Config
from engine.data.windows import RandomWindows, eval_batches
from engine.checkpoint import TRAINER_STATE, clear_run_dir, list_checkpoints, load_trainer_state, prepare_run_dir
from engine.cli import UserError
from engine.train import Schedule, TrainConfig, Trainer, build_optimizer, build_scheduler, param_groups
from helpers import assert_close

MODEL = dict(n_layer=2, n_embd=32, n_head=2, n_positions=16, vocab_size=61)
SEQ = 12
TOKENS = np.random.default_rng(0).integers(0, 61, 4000).astype(np.uint16)


def loss_fn(model, batch):
    return model(batch[:, :-1], targets=batch[:, 1:]).loss


def make_trainer(tmp_path, dropout=0.1, loss=loss_fn, resume_from=None, init_seed=0, **overrides):
    cfg = TrainConfig(**{**dict(out=str(tmp_path), max_steps=6, batch_size=4, micro_batch_size=2, lr=1e-3,
                               warmup_steps=2, eval_every=0, checkpoint_every=0, log_every=1), **overrides})
    torch.manual_seed(init_seed)
    pdrop = dict(resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout)
    model = GPT1(GPT1Config(**MODEL, **pdrop), fused=False)

    def evaluate(trainer):
        return {"val_loss": trainer.eval_loss(eval_batches(TOKENS[:600], SEQ + 1, 4))}

    windows = RandomWindows(TOKENS, SEQ + 1, cfg.batch_size, cfg.seed)
    return Trainer(model, cfg, loss, windows, evaluate=evaluate, tokens_per_sample=SEQ, resume_from=resume_from, progress=False)


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


def test_scheduler_drives_the_optimizer_lr():
    model = torch.nn.Linear(3, 3)
    cfg = TrainConfig(max_steps=10, warmup_steps=4, lr=2.5e-4)
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg)
    seen = []
    for _ in range(10):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen[0] == pytest.approx(2.5e-4 / 4) and seen[3] == pytest.approx(2.5e-4) and seen[9] == pytest.approx(0.0)


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


@pytest.mark.parametrize("kwargs, match", [
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
])
def test_config_rejects_nonsense(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kwargs)


# ---- the loop -----------------------------------------------------------------------------


def weights(trainer):
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def test_exact_resume_is_bit_identical(tmp_path):
    """Interrupt after update 3 (checkpoint), resume in a fresh trainer built from different
    initial weights: the final weights and optimizer state equal an uninterrupted run's, bit
    for bit. Dropout on, so the restored RNG state matters."""
    full = make_trainer(tmp_path / "full")
    assert full.fit().status == "finished"
    part = make_trainer(tmp_path / "part")
    result = part.fit(stop_at=3)
    assert result.status == "stopped" and result.step == 3
    torch.manual_seed(1234)  # disturb every RNG before resuming
    np.random.seed(1234)
    resumed = make_trainer(tmp_path / "part", resume_from=result.checkpoint, init_seed=99)
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


def test_checkpoints_keep_the_last_k_and_load_safely(tmp_path):
    t = make_trainer(tmp_path, max_steps=7, checkpoint_every=2, keep_checkpoints=2)
    t.fit()
    ckpts = list_checkpoints(tmp_path)
    assert [p.name for p in ckpts] == ["step_00000006", "step_00000007"]
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]  # no temp dirs
    state = load_trainer_state(ckpts[-1])  # torch.load(weights_only=True)
    assert state["step"] == 7 and state["data"] == {"next_step": 7} and state["world_size"] == 1
    assert {"optimizer", "scheduler", "rng", "train_config", "bad_steps"} <= state.keys()
    assert {"python", "numpy", "torch"} <= state["rng"][0].keys()
    final = GPT1.from_pretrained(tmp_path, fused=False)  # the run dir's final weights
    ckpt = GPT1.from_pretrained(ckpts[-1], fused=False)
    for k, v in weights(t).items():
        assert torch.equal(final.state_dict()[k], v) and torch.equal(ckpt.state_dict()[k], v)


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


def test_consecutive_non_finite_losses_stop_with_the_good_checkpoint_intact(tmp_path):
    t = make_trainer(tmp_path, dropout=0.0, loss=nan_at({3, 4, 5, 6}), max_steps=8, checkpoint_every=2, max_bad_steps=3)
    result = t.fit()
    assert result.status == "diverged" and result.step == 5
    assert not (tmp_path / "model.safetensors").exists()  # no final weights from a diverged run
    two, four = list_checkpoints(tmp_path)  # update 4 was skipped: its checkpoint holds update 2's weights
    assert (two.name, four.name) == ("step_00000002", "step_00000004")
    good, same = (GPT1.from_pretrained(p, fused=False).state_dict() for p in (two, four))
    for k, v in good.items():
        assert torch.isfinite(v).all() and torch.equal(v, same[k])
    assert load_trainer_state(four)["bad_steps"] == 2


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


def test_tensorboard_scalars_when_installed(tmp_path, monkeypatch):
    import sys
    import types

    from engine.train import MetricsLog

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
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {"step": 3, "loss": 2.5, "note": "text is not a scalar"}
