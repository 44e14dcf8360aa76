"""`python -m engine.pretrain`: GPT-1 language-model pretraining (the paper's §3.1 objective).

    python -m engine.pretrain --fused                      # embedded Shakespeare, ~5 min on 2 CPU cores
    python -m engine.pretrain --data books/ --preset gpt1 --out runs/books
    python -m engine.pretrain --resume runs/books          # continue exactly where it stopped
    python -m engine.pretrain --init runs/books --data new.txt --out runs/more   # a model on new text
    torchrun --nproc_per_node=8 -m engine.pretrain --data books/ --out runs/books

Without --data it trains on Shakespeare's works shipped by the `shakespeare` package (whole
works held out for validation), with a BPE tokenizer trained on the training works and
cached. On a CPU-only machine the defaults (preset, vocabulary, batch, steps, learning
rate: see CPU_DEFAULTS for the measurements behind them) are sized to finish in about five
minutes on two cores; on CUDA they train the paper's model with the paper's optimisation
(gpt1 preset, 64 × 512-token batches, lr 2.5e-4). Every default can be overridden; --help
lists them. --init starts a NEW run from a model (a run directory of ours or a Hugging Face
openai-gpt directory): its tokenizer and config, a fresh optimizer and schedule. The run's
lifecycle (lock, saved config, resume policy, exit codes) is engine.training.run's.
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

from engine.cli import (
    ArgumentParser,
    UserError,
    add_dataclass_args,
    dataclass_kwargs,
    flag_name,
    run_cli,
)
from engine.data.prepare import Corpus as _Corpus  # noqa: F401 (_load_tokenizer: imported from here by callers)
from engine.data.prepare import prepare
from engine.training import memory, run
from engine.training.checkpoint import (
    LOSS_PLOT,
    METRICS,
    clear_run_dir,
    prepare_run_dir,
)
from engine.training.config import TrainConfig
from engine.training.distributed import batch_layout, resolve_device


@dataclass(frozen=True)
class DevicePreset:
    """Every pretraining default that depends on the device, as one named whole."""

    name: str
    preset: str
    vocab_size: int
    seq_len: int
    batch_size: int
    max_steps: int
    lr: float
    eval_every: int
    checkpoint_every: int
    eval_windows: int
    final_eval_windows: int | None

    def pretrain_defaults(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("preset", "vocab_size", "seq_len", "eval_windows", "final_eval_windows")}

    def train_defaults(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("batch_size", "max_steps", "lr", "eval_every", "checkpoint_every")}


# CUDA: the paper's model, batch (64 x 512 tokens) and learning rate, a 8192-token BPE.
CUDA_DEFAULTS = DevicePreset(
    "cuda",
    preset="gpt1",
    vocab_size=8192,
    seq_len=512,
    batch_size=64,
    max_steps=400,
    lr=2.5e-4,
    eval_every=50,
    checkpoint_every=200,
    eval_windows=256,
    final_eval_windows=None,
)
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
CPU_DEFAULTS = DevicePreset(
    "cpu",
    preset="gpt1-small",
    vocab_size=2048,
    seq_len=128,
    batch_size=16,
    max_steps=800,
    lr=6e-4,
    eval_every=100,
    checkpoint_every=200,
    eval_windows=64,
    final_eval_windows=512,
)
DEVICE_PRESETS = {p.name: p for p in (CPU_DEFAULTS, CUDA_DEFAULTS)}
# What --init brings with it: a model's tokenizer and shape cannot be chosen as well.
INIT_EXCLUDES = ("preset", "tokenizer", "vocab_size")


@dataclass
class PretrainConfig:
    """Data, tokenizer and model."""

    data: list[str] | None = field(
        default=None,
        metadata={
            "help": "text files (.txt/.md), .jsonl files, directories or globs (default: the embedded Shakespeare corpus)"
        },
    )
    val_data: list[str] | None = field(
        default=None,
        metadata={
            "help": "validation files (default: held out from --data: whole documents, or paragraphs when there are few)"
        },
    )
    text_field: str = field(default="text", metadata={"help": "JSONL field holding the text"})
    val_fraction: float = field(
        default=0.05, metadata={"help": "share of --data held out for validation when --val-data is not given"}
    )
    init: str | None = field(
        default=None,
        metadata={
            "help": "start a new run from this model: a run directory or a Hugging Face openai-gpt directory (config.json + weights + tokenizer); its tokenizer and config are used, the optimizer and schedule start fresh (default: random weights)"
        },
    )
    tokenizer: list[str] | None = field(
        default=None,
        metadata={
            "help": "a tokenizer.json, or GPT-1's encoder_bpe_40000.json and vocab_40000.bpe (two paths or their directory) (default: train a BPE on the training split, cached)"
        },
    )
    vocab_size: int | None = field(
        default=None,
        metadata={
            "help": "vocabulary of the BPE trained when --tokenizer is not given (default: 8192 on CUDA, 2048 on CPU)"
        },
    )
    tokenizer_mode: str = field(
        default="hf",
        metadata={
            "help": "how text is cut into words before GPT-1's original BPE files (--tokenizer encoder_bpe_40000.json vocab_40000.bpe, or an --init directory holding them): hf (transformers' BERT-style cut) or openai (OpenAI's TextEncoder: ftfy + spaCy, pip install -e '.[openai]'); a tokenizer.json keeps its own",
            "choices": ("hf", "openai"),
        },
    )
    epochs: float | None = field(
        default=None,
        metadata={
            "help": "train in epochs: each visits every (seq_len+1)-token window of the training split once, in a seeded order, and sets --max-steps (the paper: 100) (default: windows drawn at random, --max-steps updates)"
        },
    )
    cache_dir: str | None = field(
        default=None,
        metadata={
            "help": "where tokenizers and token shards are cached (default: $GPT1_CACHE_DIR or ~/.cache/gpt1-engine)"
        },
    )
    preset: str | None = field(
        default=None,
        metadata={
            "help": "model size: gpt1 (the paper's), gpt1-medium, gpt1-small, gpt1-tiny (default: gpt1 on CUDA, gpt1-small on CPU)"
        },
    )
    seq_len: int | None = field(
        default=None,
        metadata={
            "help": "tokens per training sequence (n_ctx), at most the preset's n_positions (default: 512 on CUDA, 128 on CPU)"
        },
    )
    dropout: float | None = field(
        default=None,
        metadata={"help": "residual, embedding and attention dropout (default: the preset's, 0.1 as the paper)"},
    )
    eval_windows: int | None = field(
        default=None,
        metadata={
            "help": "validation windows per periodic evaluation, spread over the split (default: 256 on CUDA, 64 on CPU)"
        },
    )
    final_eval_windows: int | None = field(
        default=None, metadata={"help": "validation windows of the final evaluation (default: all on CUDA, 512 on CPU)"}
    )
    sample_tokens: int = field(
        default=60, metadata={"help": "tokens sampled from the trained model at the end (0: none)"}
    )
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
            from engine.model.config import PRESETS

            if self.preset not in PRESETS:
                raise ValueError(f"unknown --preset {self.preset!r}; expected one of {', '.join(PRESETS)}")
        if self.tokenizer_mode not in ("hf", "openai"):
            raise ValueError(f"--tokenizer-mode must be hf or openai, got {self.tokenizer_mode!r}")
        if self.tokenizer_mode == "openai" and self.tokenizer is None and self.init is None:
            raise ValueError(
                "--tokenizer-mode openai cuts words for GPT-1's original vocabulary: pass --tokenizer "
                "encoder_bpe_40000.json vocab_40000.bpe (or --init a directory holding them)"
            )
        if self.epochs is not None and (
            isinstance(self.epochs, bool) or not isinstance(self.epochs, (int, float)) or not 0 < self.epochs < math.inf
        ):
            raise ValueError(f"--epochs must be a positive number, got {self.epochs!r}")


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="python -m engine.pretrain",
        description="Pretrain GPT-1 (next-token prediction) on text: the embedded Shakespeare corpus by default.",
    )
    add_dataclass_args(parser, PretrainConfig)
    add_dataclass_args(
        parser,
        TrainConfig,
        defaults={"out": "runs/pretrain"},
        helps={
            name: f"{TrainConfig.__dataclass_fields__[name].metadata['help']} "
            f"(default: {getattr(CUDA_DEFAULTS, name)} on CUDA, {getattr(CPU_DEFAULTS, name)} on CPU)"
            for name in CPU_DEFAULTS.train_defaults()
        },
    )
    group = parser.add_argument_group("run")
    group.add_argument(
        "--resume",
        metavar="DIR",
        help="continue the run in DIR from its latest checkpoint (its saved settings, tokenizer and kernels apply)",
    )
    group.add_argument("--overwrite", action="store_true", help="replace the run already in --out")
    group.add_argument(
        "--stop-at",
        type=int,
        metavar="STEP",
        help="checkpoint and exit after update STEP without changing the schedule (split a run into sessions)",
    )
    group.add_argument(
        "--prepare-only",
        action="store_true",
        help="build (or find) the tokenizer and token shards in the cache, print where they are and exit; a run with the same data and tokenizer flags reuses them",
    )
    return parser


def resolve_configs(argv: list[str] | None) -> tuple[PretrainConfig, TrainConfig, Any]:
    """Parses argv and fills every 'auto' value: the configs as this run will use them. On
    --resume, the saved model config is in the namespace's `saved_model`."""
    ns = build_parser().parse_args(argv)
    given_p, given_t = dataclass_kwargs(PretrainConfig, ns), dataclass_kwargs(TrainConfig, ns)
    ns.saved_model, ns.given_train = None, set(given_t)
    if "epochs" in given_p and "max_steps" in given_t:
        raise UserError("--epochs and --max-steps both set the run's length; pass one")
    if ns.stop_at is not None and ns.stop_at <= 0:
        raise ValueError(f"--stop-at must be a positive update number, got {ns.stop_at}")
    if ns.resume:
        out = Path(ns.resume)
        if "out" in given_t and Path(given_t["out"]) != out:
            raise UserError(f"--out {given_t['out']} differs from --resume {out}; a resumed run stays in its directory")
        built, saved = run.resume_sections(
            out,
            "pretrain",
            {"pretrain": given_p, "train": {**given_t, "out": str(out)}},
            {"pretrain": PretrainConfig, "train": TrainConfig},
        )
        ns.saved_model = saved.get("model")
        return built["pretrain"], built["train"], ns
    device = resolve_device(given_t.get("device", "auto"))
    defaults = CUDA_DEFAULTS if device.type == "cuda" else CPU_DEFAULTS
    p_defaults = defaults.pretrain_defaults()
    if "init" in given_p:
        clash = [flag_name(k) for k in INIT_EXCLUDES if k in given_p]
        if clash:
            raise UserError(f"--init {given_p['init']} brings its own tokenizer and config; drop {', '.join(clash)}")
        p_defaults.update(preset=None, vocab_size=None)
    pcfg = PretrainConfig(**{**p_defaults, **given_p})
    if pcfg.init is not None and not (Path(pcfg.init) / "config.json").is_file():
        raise FileNotFoundError(
            f"--init {pcfg.init}: no config.json there (expected a run directory or a "
            "Hugging Face openai-gpt directory)"
        )
    n_positions = _n_positions(pcfg)
    if "seq_len" not in given_p:
        pcfg.seq_len = min(pcfg.seq_len, n_positions)
    if pcfg.seq_len > n_positions:
        source = f"--init {pcfg.init}" if pcfg.init else f"the {pcfg.preset} preset"
        raise ValueError(f"--seq-len {pcfg.seq_len} exceeds {source}'s n_positions ({n_positions})")
    tcfg = TrainConfig(**{"out": "runs/pretrain", **defaults.train_defaults(), **given_t})
    return pcfg, tcfg, ns


def _n_positions(pcfg: PretrainConfig) -> int:
    from engine.model.config import GPT1Config

    if pcfg.init is not None:
        return GPT1Config.from_json_file(Path(pcfg.init) / "config.json").n_positions
    return GPT1Config.from_name(pcfg.preset).n_positions


def main(argv: list[str] | None = None) -> int:
    pcfg, tcfg, ns = resolve_configs(argv)
    if ns.prepare_only:  # the data this run would read, and nothing of a run
        from engine.data.shards import default_cache_dir

        given = (
            (run.load_tokenizer_file(Path(ns.resume) / "tokenizer.json"), f"the run's own ({ns.resume})")
            if ns.resume
            else (run.load_tokenizer(Path(pcfg.init), mode=pcfg.tokenizer_mode), f"--init {pcfg.init}'s")
            if pcfg.init
            else None
        )
        return prepare(
            pcfg,
            Path(pcfg.cache_dir) if pcfg.cache_dir else default_cache_dir(),
            lambda *a: print(*a, flush=True),
            given,
        )
    with run.distributed(tcfg.device) as dist, run.locked_run_dir(Path(tcfg.out), dist):
        return _pretrain(pcfg, tcfg, ns, dist)


def _pretrain(pcfg: PretrainConfig, tcfg: TrainConfig, ns: Any, dist: Any) -> int:
    out = Path(tcfg.out)
    resume_from = prepare_run_dir(out, resume=bool(ns.resume), overwrite=ns.overwrite)
    say = (lambda *a: print(*a, flush=True)) if dist.is_main else (lambda *a: None)
    if resume_from is not None and (done := run.finished_step(resume_from, tcfg.max_steps, out / "model.safetensors")):
        say(
            f"{out} already finished at update {done} of {tcfg.max_steps}: nothing to do (raise --max-steps to train further)"
        )
        return 0
    run.check_fused(tcfg.fused, dist.device)
    micro, accum = batch_layout(tcfg, dist.world_size)
    corpus, tokenizer, tok_note, shards, built = _data(pcfg, out, resume_from is not None, dist, say)
    if pcfg.epochs is not None and resume_from is None:
        tcfg = _epoch_steps(pcfg, tcfg, shards, ns.given_train)
    model = _model(pcfg, tcfg, tokenizer, ns.saved_model if resume_from else None)
    memory.check_model(model, tcfg, pcfg.seq_len, dist)  # a step beyond the device's memory: one line, now

    # The run directory is written only now that every input checked out.
    if dist.is_main:
        if ns.overwrite:
            clear_run_dir(out)
        run.save_run_config(out, "pretrain", {"pretrain": pcfg, "train": tcfg, "model": model.config})
        if resume_from is None:
            tokenizer.save(out / "tokenizer.json")
    dist.barrier()
    say(
        _describe(
            pcfg,
            tcfg,
            model.config,
            dist,
            _n_params(model),
            corpus,
            shards,
            tok_note,
            built,
            resume_from,
            (micro, accum),
        )
    )
    return _train(pcfg, tcfg, ns, dist, model, tokenizer, shards, resume_from, micro, say)


def _epoch_steps(pcfg: PretrainConfig, tcfg: TrainConfig, shards: Any, given: set[str]) -> TrainConfig:
    """The train config with --max-steps covering --epochs passes over the training windows
    (and its default warm-up recomputed for that length)."""
    from engine.data.windows import EpochWindows

    steps = EpochWindows(shards.train, pcfg.seq_len + 1, tcfg.batch_size, tcfg.seed).steps(pcfg.epochs)
    fields = {**dataclasses.asdict(tcfg), "max_steps": steps}
    if "warmup_steps" not in given:
        fields["warmup_steps"] = None
    return TrainConfig(**fields)


def _n_params(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())


def _data(pcfg: PretrainConfig, out: Path, resuming: bool, dist: Any, say: Any) -> tuple[Any, Any, str, Any, bool]:
    """(corpus, tokenizer, where it came from, token shards, whether they were built now):
    prepared by rank 0 into the cache, read by every rank. A resumed run's tokenizer is its
    own tokenizer.json, never one trained or cached anew (BPE ids could differ)."""
    from engine.data.shards import default_cache_dir
    from engine.data.windows import check_length

    cache = Path(pcfg.cache_dir) if pcfg.cache_dir else default_cache_dir()
    corpus = _Corpus(pcfg)
    if not dist.is_main:
        dist.barrier()
    try:
        if resuming:
            tokenizer, tok_note = (
                run.load_tokenizer_file(out / "tokenizer.json"),
                f"the run's own ({out / 'tokenizer.json'})",
            )
        elif pcfg.init is not None:
            tokenizer, tok_note = run.load_tokenizer(Path(pcfg.init), mode=pcfg.tokenizer_mode), f"--init {pcfg.init}'s"
        else:
            tokenizer, tok_note = corpus.tokenizer(cache, say)
        shards, built = corpus.shards(cache, tokenizer, say)
        check_length(shards.train, pcfg.seq_len + 1, "training")
        check_length(shards.val, pcfg.seq_len + 1, "validation")
    finally:
        if dist.is_main:
            dist.barrier()
    return corpus, tokenizer, tok_note, shards, built


def _model(pcfg: PretrainConfig, tcfg: TrainConfig, tokenizer: Any, saved_model: dict[str, Any] | None) -> Any:
    """The model: the saved config on resume (weights come from the checkpoint), --init's
    config and weights, or the preset with random weights (the same on every rank)."""
    import torch

    from engine.model.config import GPT1Config
    from engine.model.gpt1 import GPT1

    state = None
    if saved_model is not None:
        mcfg = run.build_section(GPT1Config, saved_model, Path(tcfg.out) / "train_config.json", "model")
    elif pcfg.init is not None:
        from engine.model.hf import load_pretrained

        mcfg, state = load_pretrained(pcfg.init)
    else:
        mcfg = GPT1Config.from_name(pcfg.preset, vocab_size=tokenizer.vocab_size)
    if pcfg.dropout is not None:
        mcfg = dataclasses.replace(mcfg, resid_pdrop=pcfg.dropout, embd_pdrop=pcfg.dropout, attn_pdrop=pcfg.dropout)
    if tokenizer.vocab_size > mcfg.vocab_size:
        raise ValueError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but the model only {mcfg.vocab_size} embedding rows"
        )
    torch.manual_seed(tcfg.seed)  # the same initial weights on every rank and every run
    model = GPT1(mcfg, fused=tcfg.fused)
    if state is not None:
        model.load_state_dict(state)
    return model


def _train(
    pcfg: PretrainConfig,
    tcfg: TrainConfig,
    ns: Any,
    dist: Any,
    model: Any,
    tokenizer: Any,
    shards: Any,
    resume_from: Path | None,
    micro: int,
    say: Any,
) -> int:
    import torch

    from engine.data.windows import EpochWindows, RandomWindows, eval_batches
    from engine.training.flops import flops_per_token
    from engine.training.trainer import Trainer

    out, window = Path(tcfg.out), pcfg.seq_len + 1
    V = shards.meta["vocab_size"]  # an id at or past it names its shard file (a file changed after opening)

    def loss_fn(m: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
        return m(batch[:, :-1], targets=batch[:, 1:]).loss

    def evaluate(
        trainer: Trainer, max_windows: int | None = pcfg.eval_windows, prefix: str = "val"
    ) -> dict[str, float]:
        batches = eval_batches(
            shards.val,
            window,
            micro,
            rank=dist.rank,
            world_size=dist.world_size,
            max_windows=max_windows,
            vocab_size=V,
        )
        loss = trainer.eval_loss(batches)
        return {f"{prefix}_loss": loss, f"{prefix}_ppl": math.exp(min(loss, 50.0))}

    mcfg, n_params = model.config, _n_params(model)
    trainer = Trainer(
        model,
        tcfg,
        loss_fn,
        (EpochWindows if pcfg.epochs is not None else RandomWindows)(
            shards.train, window, tcfg.batch_size, tcfg.seed, V
        ),
        evaluate=evaluate,
        dist=dist,
        tokens_per_sample=pcfg.seq_len,
        flops_per_token=flops_per_token(n_params, mcfg.n_layer, mcfg.n_embd, pcfg.seq_len),
        resume_from=resume_from,
    )
    t0 = time.perf_counter()
    result = trainer.fit(stop_at=ns.stop_at)
    wall = time.perf_counter() - t0
    code = run.exit_code(result, out, say)
    if code is not None:
        return code
    model.eval()
    with torch.no_grad():
        final = evaluate(trainer, pcfg.final_eval_windows, prefix="final_val")
    trainer.log(final)
    if dist.is_main:
        trainer.metrics.plot(
            out / LOSS_PLOT, hlines={f"unigram entropy ({shards.unigram_entropy:.2f})": shards.unigram_entropy}
        )
    sample = _sample(model, tokenizer, pcfg, tcfg, dist.device) if dist.is_main and pcfg.sample_tokens else None
    if sample is not None:
        from engine.fileio import atomic_write_text

        atomic_write_text(out / "samples.txt", sample + "\n")
    _summary(say, out, result, wall, final, shards, sample)
    return 0


def _summary(
    say: Any, out: Path, result: Any, wall: float, final: dict[str, float], shards: Any, sample: str | None
) -> None:
    tps = [r["tokens_per_s"] for r in result.metrics if "tokens_per_s" in r]
    say("")
    say(
        f"done: {result.step} updates in {wall:.0f} s"
        + (f", {sum(tps) / len(tps):,.0f} tokens/s on average" if tps else "")
    )
    say(
        f"validation loss {final['final_val_loss']:.4f} nats/token (perplexity {final['final_val_ppl']:.1f}) "
        f"vs the corpus' unigram entropy {shards.unigram_entropy:.4f} nats/token "
        f"(unigram model on validation: {shards.val_unigram_cross_entropy:.4f})"
    )
    if sample is not None:
        say(f"sample: {sample}")
    say(f"run directory: {out}/")
    say(f"  weights      {out}/config.json + model.safetensors   (GPT1.from_pretrained('{out}'))")
    say(f"  tokenizer    {out}/tokenizer.json                    (BPETokenizer.load)")
    say(f"  metrics      {out}/{METRICS}, {out}/{LOSS_PLOT}")
    say(f"  checkpoints  {result.checkpoint}   (resume: python -m engine.pretrain --resume {out})")
    if sample is not None:
        say(f"  sample       {out}/samples.txt")


def _describe(
    pcfg: PretrainConfig,
    tcfg: TrainConfig,
    mcfg: Any,
    dist: Any,
    n_params: int,
    corpus: _Corpus,
    shards: Any,
    tok_note: str,
    built: bool,
    resume_from: Path | None,
    layout: tuple[int, int],
) -> str:
    import torch

    from engine.training.precision import resolve_precision

    micro, accum = layout
    device = f"{dist.device}" + (
        f" ({torch.get_num_threads()} threads)"
        if dist.device.type == "cpu"
        else f" ({torch.cuda.get_device_name(dist.device)})"
    )
    lines = [
        "GPT-1 pretraining" + (f" — resuming {resume_from}" if resume_from else ""),
        f"  device      {device}, {dist.world_size} process(es), {'fused kernels' if tcfg.fused else 'reference ops (--no-fused)'}"
        + (", torch.compile" if tcfg.compile else ""),
        f"  model       {pcfg.preset or 'from --init ' + str(pcfg.init)}: {mcfg.n_layer} layers, n_embd {mcfg.n_embd}, {mcfg.n_head} heads, "
        f"n_positions {mcfg.n_positions}, vocab {mcfg.vocab_size}, dropout {mcfg.resid_pdrop} — {n_params / 1e6:.2f}M parameters",
        f"  corpus      {corpus.name}: {len(corpus.train_files)} train files, "
        + (
            f"held-out works {', '.join(corpus.split['held_out_works'])}"
            if "held_out_works" in corpus.split
            else f"validation {corpus.split}"
        ),
        f"  tokens      train {shards.meta['train_tokens']:,}, validation {shards.meta['val_tokens']:,} "
        f"({'tokenised now' if built else 'cached'}: {shards.directory})",
        f"  tokenizer   {tok_note}",
        f"  precision   {resolve_precision(tcfg.precision, dist.device)[1]}",
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
