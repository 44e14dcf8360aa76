"""`python -m engine.pretrain`: GPT-1 language-model pretraining (the paper's §3.1 objective).

    python -m engine.pretrain --fused                      # embedded Shakespeare, ~5 min on 2 CPU cores
    python -m engine.pretrain --data books/ --preset gpt1 --out runs/books
    python -m engine.pretrain --resume runs/books          # continue exactly where it stopped
    torchrun --nproc_per_node=8 -m engine.pretrain --data books/ --out runs/books

Without --data it trains on Shakespeare's works shipped by the `shakespeare` package (whole
works held out for validation), with a BPE tokenizer trained on the training works and
cached. On a CPU-only machine the defaults (preset, vocabulary, batch, steps, learning
rate: see CPU_DEFAULTS for the measurements behind them) are sized to finish in about five
minutes on two cores; on CUDA they train the paper's model with the paper's optimisation
(gpt1 preset, 64 × 512-token batches, lr 2.5e-4). Every default can be overridden; --help
lists them.
"""
from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .checkpoint import LOSS_PLOT, METRICS, RUN_CONFIG, clear_run_dir, prepare_run_dir
from .cli import ArgumentParser, UserError, add_dataclass_args, dataclass_kwargs, run_cli
from .data.prepare import Corpus as _Corpus, load_tokenizer as _load_tokenizer, prepare  # noqa: F401 (_load_tokenizer: imported from here by callers)
from .train import TrainConfig, batch_layout, resolve_device

# Defaults that depend on the device.
# CUDA: the paper's model, batch (64 x 512 tokens) and learning rate, a 8192-token BPE.
# CPU (about 5 minutes on 2 free cores, 1.6M tokens seen, ~1.2 epochs): gpt1-small (4
# layers, 256 wide), 16 x 128-token batches, 800 updates. Three choices make that budget show
# learning, each measured on the embedded corpus (final val loss vs the unigram entropy):
# * warm-up 10% of the run (80 updates): the paper's 2000 is longer than the whole run;
# * lr 6e-4 (GPT-3's value for its smallest, 125M model; smaller models take larger rates):
#   at the paper's 2.5e-4 the model was still on the unigram plateau when a 300 x 16 x 128
#   run ended (6.29 vs 6.34); 1e-3 left the plateau later than 6e-4;
# * a 2048-token BPE: every embedding row gets 4x the updates, sub-word continuations are
#   predictable, steps are cheaper: 600 x 8 x 128 reached 5.41 vs 6.19 with it, against
#   5.95 vs 6.34 with 8192 tokens. The defaults reach ~4.85 vs 6.19.
CPU_DEFAULTS: dict[str, Any] = dict(
    preset="gpt1-small", vocab_size=2048, seq_len=128, batch_size=16, max_steps=800, lr=6e-4, eval_every=100,
    checkpoint_every=200, eval_windows=64, final_eval_windows=512,
)
CUDA_DEFAULTS: dict[str, Any] = dict(
    preset="gpt1", vocab_size=8192, seq_len=512, batch_size=64, max_steps=400, lr=2.5e-4, eval_every=50,
    checkpoint_every=200, eval_windows=256, final_eval_windows=None,
)
# What --resume may change; anything else would silently make a different run.
RESUME_OVERRIDES = {
    "max_steps", "eval_every", "checkpoint_every", "keep_checkpoints", "log_every", "prefetch", "compile",
    "fused", "device", "peak_tflops", "eval_windows", "final_eval_windows", "sample_tokens", "prompt", "cache_dir",
    "max_bad_steps",
}


@dataclass
class PretrainConfig:
    """Data, tokenizer and model."""

    data: list[str] | None = field(default=None, metadata={"help": "text files (.txt/.md), .jsonl files, directories or globs (default: the embedded Shakespeare corpus)"})
    val_data: list[str] | None = field(default=None, metadata={"help": "validation files (default: held out from --data: whole documents, or paragraphs when there are few)"})
    text_field: str = field(default="text", metadata={"help": "JSONL field holding the text"})
    val_fraction: float = field(default=0.05, metadata={"help": "share of --data held out for validation when --val-data is not given"})
    tokenizer: list[str] | None = field(default=None, metadata={"help": "a tokenizer.json, or GPT-1's encoder_bpe_40000.json and vocab_40000.bpe (two paths or their directory) (default: train a BPE on the training split, cached)"})
    vocab_size: int | None = field(default=None, metadata={"help": "vocabulary of the BPE trained when --tokenizer is not given (default: 8192 on CUDA, 2048 on CPU)"})
    cache_dir: str | None = field(default=None, metadata={"help": "where tokenizers and token shards are cached (default: $GPT1_CACHE_DIR or ~/.cache/gpt1-engine)"})
    preset: str | None = field(default=None, metadata={"help": "model size: gpt1 (the paper's), gpt1-medium, gpt1-small, gpt1-tiny (default: gpt1 on CUDA, gpt1-small on CPU)"})
    seq_len: int | None = field(default=None, metadata={"help": "tokens per training sequence (n_ctx), at most the preset's n_positions (default: 512 on CUDA, 128 on CPU)"})
    dropout: float | None = field(default=None, metadata={"help": "residual, embedding and attention dropout (default: the preset's, 0.1 as the paper)"})
    eval_windows: int | None = field(default=None, metadata={"help": "validation windows per periodic evaluation, spread over the split (default: 256 on CUDA, 64 on CPU)"})
    final_eval_windows: int | None = field(default=None, metadata={"help": "validation windows of the final evaluation (default: all on CUDA, 512 on CPU)"})
    sample_tokens: int = field(default=60, metadata={"help": "tokens sampled from the trained model at the end (0: none)"})
    prompt: str = field(default="to be, or not to be", metadata={"help": "the sample's prompt"})

    def __post_init__(self) -> None:
        for name in ("vocab_size", "seq_len", "eval_windows", "final_eval_windows"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
        if self.vocab_size is not None and self.vocab_size < 2:
            raise ValueError(f"--vocab-size must be at least 2, got {self.vocab_size}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"--val-fraction must be in (0, 1), got {self.val_fraction!r}")
        if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"--dropout must be in [0, 1), got {self.dropout!r}")
        if self.sample_tokens < 0:
            raise ValueError(f"--sample-tokens must be >= 0, got {self.sample_tokens}")
        if self.tokenizer is not None and not 1 <= len(self.tokenizer) <= 2:
            raise ValueError(f"--tokenizer takes one or two paths, got {len(self.tokenizer)}")
        if self.preset is not None:
            from .config import PRESETS

            if self.preset not in PRESETS:
                raise ValueError(f"unknown --preset {self.preset!r}; expected one of {', '.join(PRESETS)}")


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="python -m engine.pretrain",
        description="Pretrain GPT-1 (next-token prediction) on text: the embedded Shakespeare corpus by default.",
    )
    add_dataclass_args(parser, PretrainConfig)
    add_dataclass_args(
        parser, TrainConfig,
        defaults={"out": "runs/pretrain"},
        helps={
            name: f"{TrainConfig.__dataclass_fields__[name].metadata['help']} "
                  f"(default: {CUDA_DEFAULTS[name]} on CUDA, {CPU_DEFAULTS[name]} on CPU)"
            for name in ("max_steps", "batch_size", "lr", "eval_every", "checkpoint_every")
        },
    )
    run = parser.add_argument_group("run")
    run.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its latest checkpoint (its saved settings apply)")
    run.add_argument("--overwrite", action="store_true", help="replace the run already in --out")
    run.add_argument("--stop-at", type=int, metavar="STEP", help="checkpoint and exit after update STEP without changing the schedule (split a run into sessions)")
    run.add_argument("--prepare-only", action="store_true", help="build (or find) the tokenizer and token shards in the cache, print where they are and exit; a run with the same data and tokenizer flags reuses them")
    return parser


def resolve_configs(argv: list[str] | None) -> tuple[PretrainConfig, TrainConfig, Any]:
    """Parses argv and fills every 'auto' value: the configs as this run will use them."""
    ns = build_parser().parse_args(argv)
    given_p, given_t = dataclass_kwargs(PretrainConfig, ns), dataclass_kwargs(TrainConfig, ns)
    if ns.stop_at is not None and ns.stop_at <= 0:
        raise ValueError(f"--stop-at must be a positive update number, got {ns.stop_at}")
    if ns.resume:
        run = Path(ns.resume)
        if "out" in given_t and Path(given_t["out"]) != run:
            raise UserError(f"--out {given_t['out']} differs from --resume {run}; a resumed run stays in its directory")
        saved_path = run / RUN_CONFIG
        if not saved_path.is_file():
            raise UserError(f"--resume {run}: no {RUN_CONFIG} there (not a run directory)")
        saved = json.loads(saved_path.read_text())
        changed = sorted(k for k, v in {**given_p, **given_t}.items() if k not in RESUME_OVERRIDES
                         and {**saved["pretrain"], **saved["train"]}.get(k, v) != v)
        if changed:
            raise UserError(f"--resume cannot change {', '.join('--' + c.replace('_', '-') for c in changed)} "
                            f"(only run-control flags such as --max-steps); start a new run instead")
        pcfg = PretrainConfig(**{**saved["pretrain"], **given_p})
        tcfg = TrainConfig(**{**saved["train"], **given_t, "out": str(run)})
        return pcfg, tcfg, ns
    device = resolve_device(given_t.get("device", "auto"))
    defaults = CUDA_DEFAULTS if device.type == "cuda" else CPU_DEFAULTS
    p_names = {f.name for f in dataclasses.fields(PretrainConfig)}
    t_names = {f.name for f in dataclasses.fields(TrainConfig)}
    pcfg = PretrainConfig(**{**{k: v for k, v in defaults.items() if k in p_names}, **given_p})
    from .config import PRESETS

    n_positions = PRESETS[pcfg.preset].get("n_positions", 512)
    if "seq_len" not in given_p:
        pcfg.seq_len = min(pcfg.seq_len, n_positions)
    tcfg = TrainConfig(**{"out": "runs/pretrain", **{k: v for k, v in defaults.items() if k in t_names}, **given_t})
    return pcfg, tcfg, ns


def main(argv: list[str] | None = None) -> int:
    pcfg, tcfg, ns = resolve_configs(argv)
    if ns.prepare_only:
        from .data.shards import default_cache_dir

        return prepare(pcfg, Path(pcfg.cache_dir) if pcfg.cache_dir else default_cache_dir(), lambda *a: print(*a, flush=True))
    from .train import setup_distributed, teardown_distributed

    dist = setup_distributed(tcfg.device)
    try:
        code = _pretrain(pcfg, tcfg, ns, dist)
    except BaseException:
        teardown_distributed()
        raise
    teardown_distributed(sync=True)
    return code


def _pretrain(pcfg: PretrainConfig, tcfg: TrainConfig, ns: Any, dist: Any) -> int:
    import torch

    from .config import GPT1Config
    from .data.shards import default_cache_dir
    from .data.windows import RandomWindows, check_length, eval_batches
    from .model import GPT1
    from .train import Trainer, flops_per_token

    n_positions = GPT1Config.from_name(pcfg.preset).n_positions
    if pcfg.seq_len > n_positions:
        raise ValueError(f"--seq-len {pcfg.seq_len} exceeds the {pcfg.preset} preset's n_positions ({n_positions})")
    out = Path(tcfg.out)
    resume_from = prepare_run_dir(out, resume=bool(ns.resume), overwrite=ns.overwrite)
    micro, accum = batch_layout(tcfg, dist.world_size)
    say = (lambda *a: print(*a, flush=True)) if dist.is_main else (lambda *a: None)

    # ---- data and tokenizer: prepared by rank 0 into the cache, read by every rank ------
    cache = Path(pcfg.cache_dir) if pcfg.cache_dir else default_cache_dir()
    corpus = _Corpus(pcfg)
    if not dist.is_main:
        dist.barrier()
    try:
        tokenizer, tok_note = corpus.tokenizer(cache, say)
        shards, built = corpus.shards(cache, tokenizer, say)
    finally:
        if dist.is_main:
            dist.barrier()

    # ---- model --------------------------------------------------------------------------
    overrides: dict[str, Any] = {"vocab_size": tokenizer.vocab_size}
    if pcfg.dropout is not None:
        overrides.update(resid_pdrop=pcfg.dropout, embd_pdrop=pcfg.dropout, attn_pdrop=pcfg.dropout)
    mcfg = GPT1Config.from_name(pcfg.preset, **overrides)
    window = pcfg.seq_len + 1
    check_length(shards.train, window, "training")
    check_length(shards.val, window, "validation")
    if tcfg.fused and dist.device.type == "cpu":
        from . import ops

        reason = ops.cpu_kernels_error()
        if reason is not None:
            raise UserError(f"--fused: {reason}")
    torch.manual_seed(tcfg.seed)  # the same initial weights on every rank and every run
    model = GPT1(mcfg, fused=tcfg.fused)

    # ---- the run directory: written only now that every input checked out ---------------
    if dist.is_main:
        if ns.overwrite:
            clear_run_dir(out)
        out.mkdir(parents=True, exist_ok=True)
        from .fileio import atomic_write_text

        atomic_write_text(out / RUN_CONFIG, json.dumps({"pretrain": dataclasses.asdict(pcfg), "train": dataclasses.asdict(tcfg)}, indent=2) + "\n")
        tokenizer.save(out / "tokenizer.json")
    dist.barrier()

    n_params = sum(p.numel() for p in model.parameters())
    say(_describe(pcfg, tcfg, mcfg, dist, n_params, corpus, shards, tok_note, built, resume_from, (micro, accum)))

    # ---- train --------------------------------------------------------------------------
    def loss_fn(m: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
        return m(batch[:, :-1], targets=batch[:, 1:]).loss

    def evaluate(trainer: Trainer, max_windows: int | None = pcfg.eval_windows, prefix: str = "val") -> dict[str, float]:
        batches = eval_batches(shards.val, window, micro, rank=dist.rank, world_size=dist.world_size, max_windows=max_windows)
        loss = trainer.eval_loss(batches)
        return {f"{prefix}_loss": loss, f"{prefix}_ppl": math.exp(min(loss, 50.0))}

    trainer = Trainer(
        model, tcfg, loss_fn, RandomWindows(shards.train, window, tcfg.batch_size, tcfg.seed),
        evaluate=evaluate, dist=dist, tokens_per_sample=pcfg.seq_len,
        flops_per_token=flops_per_token(n_params, mcfg.n_layer, mcfg.n_embd, pcfg.seq_len),
        resume_from=resume_from,
    )
    t0 = time.perf_counter()
    result = trainer.fit(stop_at=ns.stop_at)
    wall = time.perf_counter() - t0
    if result.status == "diverged":
        return 1
    if result.status == "interrupted":
        return 128 + (result.signal or 0)
    if result.status == "stopped":
        say(f"stopped at update {result.step} (--stop-at); checkpoint {result.checkpoint}; continue with --resume {out}")
        return 0

    # ---- final evaluation, sample, summary ----------------------------------------------
    model.eval()
    with torch.no_grad():
        final = evaluate(trainer, pcfg.final_eval_windows, prefix="final_val")
    trainer.log(final)
    if dist.is_main:
        trainer.metrics.plot(out / LOSS_PLOT, {f"unigram entropy ({shards.unigram_entropy:.2f})": shards.unigram_entropy})
    sample = _sample(model, tokenizer, pcfg, tcfg, dist.device) if dist.is_main and pcfg.sample_tokens else None
    if sample is not None:
        from .fileio import atomic_write_text

        atomic_write_text(out / "samples.txt", sample + "\n")
    tps = [r["tokens_per_s"] for r in result.metrics if "tokens_per_s" in r]
    say("")
    say(f"done: {result.step} updates in {wall:.0f} s" + (f", {sum(tps) / len(tps):,.0f} tokens/s on average" if tps else ""))
    say(f"validation loss {final['final_val_loss']:.4f} nats/token (perplexity {final['final_val_ppl']:.1f}) "
        f"vs the corpus' unigram entropy {shards.unigram_entropy:.4f} nats/token "
        f"(unigram model on validation: {shards.val_unigram_cross_entropy:.4f})")
    if sample is not None:
        say(f"sample: {sample}")
    say(f"run directory: {out}/")
    say(f"  weights      {out}/config.json + model.safetensors   (GPT1.from_pretrained('{out}'))")
    say(f"  tokenizer    {out}/tokenizer.json                    (BPETokenizer.load)")
    say(f"  metrics      {out}/{METRICS}, {out}/{LOSS_PLOT}")
    say(f"  checkpoints  {result.checkpoint}   (resume: python -m engine.pretrain --resume {out})")
    if sample is not None:
        say(f"  sample       {out}/samples.txt")
    return 0


def _describe(pcfg: PretrainConfig, tcfg: TrainConfig, mcfg: Any, dist: Any, n_params: int, corpus: _Corpus,
              shards: Any, tok_note: str, built: bool, resume_from: Path | None, layout: tuple[int, int]) -> str:
    import torch

    micro, accum = layout
    device = f"{dist.device}" + (f" ({torch.get_num_threads()} threads)" if dist.device.type == "cpu" else f" ({torch.cuda.get_device_name(dist.device)})")
    lines = [
        "GPT-1 pretraining" + (f" — resuming {resume_from}" if resume_from else ""),
        f"  device      {device}, {dist.world_size} process(es), {'fused kernels' if tcfg.fused else 'reference ops (--no-fused)'}"
        + (", torch.compile" if tcfg.compile else ""),
        f"  model       {pcfg.preset}: {mcfg.n_layer} layers, n_embd {mcfg.n_embd}, {mcfg.n_head} heads, "
        f"n_positions {mcfg.n_positions}, vocab {mcfg.vocab_size}, dropout {mcfg.resid_pdrop} — {n_params / 1e6:.2f}M parameters",
        f"  corpus      {corpus.name}: {len(corpus.train_files)} train files, "
        + (f"held-out works {', '.join(corpus.split['held_out_works'])}" if "held_out_works" in corpus.split else f"validation {corpus.split}"),
        f"  tokens      train {shards.meta['train_tokens']:,}, validation {shards.meta['val_tokens']:,} "
        f"({'tokenised now' if built else 'cached'}: {shards.directory})",
        f"  tokenizer   {tok_note}",
        f"  batch       {tcfg.batch_size} × {pcfg.seq_len} tokens = {tcfg.batch_size * pcfg.seq_len:,} tokens/update "
        f"({micro} per forward × {accum} accumulation × {dist.world_size} process(es))",
        f"  schedule    AdamW lr {tcfg.lr:g}, betas ({tcfg.beta1}, {tcfg.beta2}), eps {tcfg.eps:g}, weight decay {tcfg.weight_decay}, "
        f"clip {tcfg.grad_clip}; warm-up {tcfg.warmup_steps} then {tcfg.schedule} over {tcfg.max_steps} updates",
        "  config      " + json.dumps({**dataclasses.asdict(pcfg), **dataclasses.asdict(tcfg)}),
    ]
    return "\n".join(lines)


def _sample(model: Any, tokenizer: Any, pcfg: PretrainConfig, tcfg: TrainConfig, device: Any) -> str | None:
    import torch

    ids = tokenizer.encode(pcfg.prompt) or [0]
    room = model.config.n_positions - len(ids)
    if room <= 0:
        return None
    gen = torch.Generator(device=device).manual_seed(tcfg.seed)
    prompt = torch.tensor([ids], device=device)
    out = model.generate(prompt, min(pcfg.sample_tokens, room), temperature=0.8, top_k=40, generator=gen)
    return tokenizer.decode(out[0].tolist())


if __name__ == "__main__":
    sys.exit(run_cli(main))
