"""`python -m engine.pretrain`: GPT-1 language-model pretraining (the paper's §3.1 objective).

    python -m engine.pretrain --fused                      # embedded Shakespeare, ~5 min on 2 CPU cores
    python -m engine.pretrain --data books/ --preset gpt1 --out runs/books
    python -m engine.pretrain --resume runs/books          # continue exactly where it stopped
    python -m engine.pretrain --init runs/books --data new.txt --out runs/more   # a model on new text
    torchrun --nproc_per_node=8 -m engine.pretrain --data books/ --out runs/books

Without --data it trains on Shakespeare's works shipped by the `shakespeare` package (whole
works held out for validation), with a BPE tokenizer trained on the training works and
cached. On a CPU-only machine the defaults (preset, vocabulary, batch, steps, learning
rate: CPU_DEFAULTS) are sized to finish in about five minutes on two cores; on CUDA they
train the paper's model with the paper's optimisation (gpt1 preset, 64 × 512-token batches,
lr 2.5e-4). Every default can be overridden; --help lists them. --init starts a NEW run from
a model (a run directory of ours or a Hugging Face openai-gpt directory): its tokenizer and
config, a fresh optimizer and schedule. The run's lifecycle (lock, saved config, resume
policy, exit codes) is engine.training.launch's; this file is the Pretraining recipe.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from engine.cli import ArgumentParser, UserError, add_dataclass_args, dataclass_kwargs, flag_name, run_cli
from engine.data.prepare import Corpus, prepare
from engine.data.shards import default_cache_dir
from engine.model.config import GPT1Config
from engine.model.gpt1 import GPT1, load_pretrained
from engine.model.tokenizer import BPETokenizer, load_tokenizer
from engine.training import memory
from engine.training.checkpoint import LOSS_PLOT, METRICS, RUN_CONFIG
from engine.training.config import TrainConfig
from engine.training.distributed import batch_layout, resolve_device
from engine.training.launch import Recipe, Run, RunArgs, add_run_args, launch, model_row
from engine.training.run import build_section, own_tokenizer, resume_sections
from engine.training.trainer import Job, Trainer, TrainResult

DEFAULT_OUT = "runs/pretrain"


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
# CPU: gpt1-small, 16 x 128-token batches, 800 updates, about 5 minutes on 2 cores; why each
# value: bench/results/cpu-defaults.md.
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
            "help": (
                "text files (.txt/.md), .jsonl files, directories or globs (default: the embedded Shakespeare corpus)"
            )
        },
    )
    val_data: list[str] | None = field(
        default=None,
        metadata={
            "help": (
                "validation files (default: held out from --data: whole documents, or paragraphs when there are few)"
            )
        },
    )
    text_field: str = field(default="text", metadata={"help": "JSONL field holding the text"})
    val_fraction: float = field(
        default=0.05, metadata={"help": "share of --data held out for validation when --val-data is not given"}
    )
    init: str | None = field(
        default=None,
        metadata={
            "help": (
                "start a new run from this model: a run directory or a Hugging Face openai-gpt directory (config.json"
                " + weights + tokenizer); its tokenizer and config are used, the optimizer and schedule start fresh "
                "(default: random weights)"
            )
        },
    )
    tokenizer: list[str] | None = field(
        default=None,
        metadata={
            "help": (
                "a tokenizer.json, or GPT-1's encoder_bpe_40000.json and vocab_40000.bpe (two paths or their "
                "directory) (default: train a BPE on the training split, cached)"
            )
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
            "help": (
                "how text is cut into words before GPT-1's original BPE files (--tokenizer encoder_bpe_40000.json "
                "vocab_40000.bpe, or an --init directory holding them): hf (transformers' BERT-style cut) or openai "
                "(OpenAI's TextEncoder: ftfy + spaCy, pip install -e '.[openai]'); a tokenizer.json keeps its own"
            ),
            "choices": ("hf", "openai"),
        },
    )
    epochs: float | None = field(
        default=None,
        metadata={
            "help": (
                "train in epochs: each visits every (seq_len+1)-token window of the training split once, in a seeded "
                "order, and sets --max-steps (the paper: 100) (default: windows drawn at random, --max-steps updates)"
            )
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
            "help": (
                "model size: gpt1 (the paper's), gpt1-medium, gpt1-small, gpt1-tiny (default: gpt1 on CUDA, "
                "gpt1-small on CPU)"
            )
        },
    )
    seq_len: int | None = field(
        default=None,
        metadata={
            "help": (
                "tokens per training sequence (n_ctx), at most the preset's n_positions (default: 512 on CUDA, 128 on"
                " CPU)"
            )
        },
    )
    dropout: float | None = field(
        default=None,
        metadata={"help": "residual, embedding and attention dropout (default: the preset's, 0.1 as the paper)"},
    )
    eval_windows: int | None = field(
        default=None,
        metadata={
            "help": (
                "validation windows per periodic evaluation, spread over the split (default: 256 on CUDA, 64 on CPU)"
            )
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
        helps={
            name: f"{TrainConfig.__dataclass_fields__[name].metadata['help']} "
            f"(default: {getattr(CUDA_DEFAULTS, name)} on CUDA, {getattr(CPU_DEFAULTS, name)} on CPU)"
            for name in CPU_DEFAULTS.train_defaults()
        },
        skip=("out",),
    )
    group = add_run_args(parser, f"run directory: checkpoints, metrics, final weights (default: {DEFAULT_OUT})")
    group.add_argument(
        "--prepare-only",
        action="store_true",
        help="build (or find) the tokenizer and token shards in the cache, print where they are and exit; "
        "a run with the same data and tokenizer flags reuses them",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    args = RunArgs(**dataclass_kwargs(RunArgs, ns)).restarted(DEFAULT_OUT)
    recipe = Pretraining.resolve(dataclass_kwargs(PretrainConfig, ns), dataclass_kwargs(TrainConfig, ns), args)
    return recipe.prepare_data(args) if ns.prepare_only else launch(recipe, args)


class Pretraining(Recipe):
    """Next-token prediction on a corpus: its data (tokenizer + token shards), model, loss,
    validation and final report (sample, summary), for engine.training.launch."""

    kind, title, done_file = "pretrain", "GPT-1 pretraining", "model.safetensors"

    def __init__(
        self,
        config: PretrainConfig,
        train: TrainConfig,
        saved_model: dict[str, Any] | None = None,
        given_train: frozenset[str] = frozenset(),
    ) -> None:
        self.config, self.train, self.out = config, train, Path(train.out)
        self.saved_model = saved_model  # a resumed run's model config (train_config.json's "model")
        self.given_train = given_train  # the train settings given: --epochs recomputes only a default warm-up

    @classmethod
    def resolve(cls, given: dict[str, Any], given_train: dict[str, Any], args: RunArgs) -> Pretraining:
        """The configs this run uses: the settings given, filled with the device's defaults
        (new run), or the run's saved ones under the one resume policy (--resume)."""
        if "epochs" in given and "max_steps" in given_train:
            raise UserError("--epochs and --max-steps both set the run's length; pass one")
        out = args.run_dir(DEFAULT_OUT)
        if args.resume_dir is not None:
            built, saved = resume_sections(
                out,
                cls.kind,
                {"pretrain": given, "train": {**given_train, "out": str(out)}},
                {"pretrain": PretrainConfig, "train": TrainConfig},
            )
            return cls(built["pretrain"], built["train"], saved.get("model"), frozenset(given_train))
        device = resolve_device(given_train.get("device", "auto"))
        defaults = DEVICE_PRESETS[device.type]
        p_defaults = defaults.pretrain_defaults()
        if "init" in given:
            clash = [flag_name(k) for k in INIT_EXCLUDES if k in given]
            if clash:
                raise UserError(f"--init {given['init']} brings its own tokenizer and config; drop {', '.join(clash)}")
            p_defaults.update(preset=None, vocab_size=None)
        config = PretrainConfig(**{**p_defaults, **given})
        if config.init is not None and not (Path(config.init) / "config.json").is_file():
            raise FileNotFoundError(
                f"--init {config.init}: no config.json there (expected a run directory or a "
                "Hugging Face openai-gpt directory)"
            )
        n_positions = _n_positions(config)
        if "seq_len" not in given:
            config.seq_len = min(config.seq_len, n_positions)
        if config.seq_len > n_positions:
            source = f"--init {config.init}" if config.init else f"the {config.preset} preset"
            raise ValueError(f"--seq-len {config.seq_len} exceeds {source}'s n_positions ({n_positions})")
        train = TrainConfig(**{**defaults.train_defaults(), **given_train, "out": str(out)})
        return cls(config, train, None, frozenset(given_train))

    @property
    def device(self) -> str:
        return self.train.device

    @property
    def fused(self) -> bool:
        return self.train.fused

    # ---- data and model ------------------------------------------------------------------------

    def prepare_data(self, args: RunArgs) -> int:
        """--prepare-only: the tokenizer and token shards this run would read, and nothing of a run."""
        given = self._given_tokenizer(args.resume_dir)
        return prepare(self.config, self._cache(), lambda *a: print(*a, flush=True), given)

    def build(self, run: Run) -> None:
        self.micro_batch, _ = batch_layout(self.train, run.dist.world_size)
        self._data(run)
        if self.config.epochs is not None and run.resume_from is None:
            self.train = self._epoch_train()
        self.model = self._model(run)

    def _cache(self) -> Path:
        return Path(self.config.cache_dir) if self.config.cache_dir else default_cache_dir()

    def _given_tokenizer(self, resumed: Path | None) -> tuple[BPETokenizer, str] | None:
        """(tokenizer, where it came from) when it is not the corpus's: a resumed run's own
        tokenizer.json (never one trained or cached anew: BPE ids could differ), --init's."""
        if resumed is not None:
            return own_tokenizer(resumed), f"the run's own ({resumed / 'tokenizer.json'})"
        if self.config.init is not None:
            init = self.config.init
            return load_tokenizer(init, self.config.tokenizer_mode, "--init"), f"--init {init}'s"
        return None

    def _data(self, run: Run) -> None:
        """The corpus, its tokenizer and token shards: prepared by rank 0 into the cache, read by every rank."""
        from engine.data.windows import check_length

        self.corpus = Corpus(self.config)
        window = self.config.seq_len + 1
        if not run.dist.is_main:
            run.dist.barrier()
        try:
            given = self._given_tokenizer(run.out if run.resume_from is not None else None)
            self.tokenizer, self.tokenizer_note = given or self.corpus.tokenizer(self._cache(), run.say)
            self.shards, self.shards_built = self.corpus.shards(self._cache(), self.tokenizer, run.say)
            check_length(self.shards.train, window, "training")
            check_length(self.shards.val, window, "validation")
        finally:
            if run.dist.is_main:
                run.dist.barrier()

    def _epoch_train(self) -> TrainConfig:
        """The train config with --max-steps covering --epochs passes over the training windows
        (and its default warm-up recomputed for that length)."""
        from engine.data.windows import EpochWindows

        windows = EpochWindows(self.shards.train, self.config.seq_len + 1, self.train.batch_size, self.train.seed)
        fields = {**dataclasses.asdict(self.train), "max_steps": windows.steps(self.config.epochs)}
        if "warmup_steps" not in self.given_train:
            fields["warmup_steps"] = None
        return TrainConfig(**fields)

    def _model(self, run: Run) -> GPT1:
        """The saved config on resume (weights come from the checkpoint), --init's config and
        weights, or the preset with random weights (the same on every rank)."""
        state = None
        if run.resume_from is not None:
            mcfg = build_section(GPT1Config, self.saved_model, run.out / RUN_CONFIG, "model")
        elif self.config.init is not None:
            mcfg, state = load_pretrained(self.config.init)
        else:
            mcfg = GPT1Config.from_name(self.config.preset, vocab_size=self.tokenizer.vocab_size)
        if self.config.dropout is not None:
            p = self.config.dropout
            mcfg = dataclasses.replace(mcfg, resid_pdrop=p, embd_pdrop=p, attn_pdrop=p)
        if self.tokenizer.vocab_size > mcfg.vocab_size:
            raise ValueError(
                f"the tokenizer has {self.tokenizer.vocab_size} tokens but the model only "
                f"{mcfg.vocab_size} embedding rows"
            )
        torch.manual_seed(self.train.seed)  # the same initial weights on every rank and every run
        model = GPT1(mcfg, fused=self.train.fused)
        if state is not None:
            model.load_state_dict(state)
        return model

    def sections(self) -> dict[str, Any]:
        return {"pretrain": self.config, "train": self.train, "model": self.model.config}

    def describe(self, run: Run) -> list[tuple[str, str]]:
        corpus, meta = self.corpus, self.shards.meta
        held_out = corpus.split.get("held_out_works")
        return [
            model_row(
                self.model.config, _n_params(self.model), self.config.preset or f"from --init {self.config.init}"
            ),
            (
                "corpus",
                f"{corpus.name}: {len(corpus.train_files)} train files, "
                + (f"held-out works {', '.join(held_out)}" if held_out else f"validation {corpus.split}"),
            ),
            (
                "tokens",
                f"train {meta['train_tokens']:,}, validation {meta['val_tokens']:,} "
                f"({'tokenised now' if self.shards_built else 'cached'}: {self.shards.directory})",
            ),
            ("tokenizer", self.tokenizer_note),
        ]

    # ---- training --------------------------------------------------------------------------------

    def job(self, run: Run) -> Job:
        from engine.data.windows import EpochWindows, RandomWindows
        from engine.training.flops import flops_per_token

        cfg, mcfg, seq = self.train, self.model.config, self.config.seq_len
        windows = (EpochWindows if self.config.epochs is not None else RandomWindows)(
            self.shards.train, seq + 1, cfg.batch_size, cfg.seed, self.vocab_size
        )
        flops = flops_per_token(_n_params(self.model), mcfg.n_layer, mcfg.n_embd, seq)
        return Job(self.loss, windows, evaluate=self.evaluate, tokens_per_sample=seq, flops_per_token=flops)

    @property
    def vocab_size(self) -> int:
        """The shards' vocabulary: a token id at or past it names its shard file and offset (a file
        changed after it was opened)."""
        return self.shards.meta["vocab_size"]

    def check_memory(self, run: Run) -> None:
        memory.check_model(self.model, self.train, self.config.seq_len, run.dist)

    @staticmethod
    def loss(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
        return model(batch[:, :-1], targets=batch[:, 1:]).loss

    def evaluate(self, trainer: Trainer) -> dict[str, float]:
        return self._val_loss(trainer, self.config.eval_windows, "val")

    def _val_loss(self, trainer: Trainer, max_windows: int | None, prefix: str) -> dict[str, float]:
        """Mean loss over validation windows spread over the split, each rank taking its share."""
        from engine.data.windows import eval_batches

        dist = trainer.dist
        batches = eval_batches(
            self.shards.val,
            self.config.seq_len + 1,
            self.micro_batch,
            rank=dist.rank,
            world_size=dist.world_size,
            max_windows=max_windows,
            vocab_size=self.vocab_size,
        )
        loss = trainer.eval_loss(batches)
        return {f"{prefix}_loss": loss, f"{prefix}_ppl": math.exp(min(loss, 50.0))}

    def finish(self, trainer: Trainer, result: TrainResult, seconds: float) -> int:
        """The final validation (all of it on CUDA), loss.png with the unigram baseline, a sample."""
        self.model.eval()
        with torch.no_grad():
            final = self._val_loss(trainer, self.config.final_eval_windows, "final_val")
        trainer.log(final)
        if not trainer.dist.is_main:
            return 0
        entropy = self.shards.unigram_entropy
        trainer.metrics.plot(self.out / LOSS_PLOT, hlines={f"unigram entropy ({entropy:.2f})": entropy})
        sample = self._sample(trainer.device) if self.config.sample_tokens else None
        if sample is not None:
            from engine.fileio import atomic_write_text

            atomic_write_text(self.out / "samples.txt", sample + "\n")
        print(self._summary(result, seconds, final, sample), flush=True)
        return 0

    def _sample(self, device: torch.device) -> str | None:
        ids = self.tokenizer.encode(self.config.prompt) or [0]
        room = self.model.config.n_positions - len(ids)
        if room <= 0:
            return None
        gen = torch.Generator(device=device).manual_seed(self.train.seed)
        prompt = torch.tensor([ids], device=device)
        out = self.model.generate(
            prompt, min(self.config.sample_tokens, room), temperature=0.8, top_k=40, generator=gen
        )
        return self.tokenizer.decode(out[0].tolist())

    def _summary(self, result: TrainResult, seconds: float, final: dict[str, float], sample: str | None) -> str:
        out, shards = self.out, self.shards
        tps = [r["tokens_per_s"] for r in result.metrics if "tokens_per_s" in r]
        lines = [
            "",
            f"done: {result.step} updates in {seconds:.0f} s"
            + (f", {sum(tps) / len(tps):,.0f} tokens/s on average" if tps else ""),
            f"validation loss {final['final_val_loss']:.4f} nats/token (perplexity {final['final_val_ppl']:.1f}) "
            f"vs the corpus' unigram entropy {shards.unigram_entropy:.4f} nats/token "
            f"(unigram model on validation: {shards.val_unigram_cross_entropy:.4f})",
            *([f"sample: {sample}"] if sample is not None else []),
            f"run directory: {out}/",
            f"  weights      {out}/config.json + model.safetensors   (GPT1.from_pretrained('{out}'))",
            f"  tokenizer    {out}/tokenizer.json                    (BPETokenizer.load)",
            f"  metrics      {out}/{METRICS}, {out}/{LOSS_PLOT}",
            f"  checkpoints  {result.checkpoint}   (resume: python -m engine.pretrain --resume {out})",
            *([f"  sample       {out}/samples.txt"] if sample is not None else []),
        ]
        return "\n".join(lines)


def _n_positions(config: PretrainConfig) -> int:
    if config.init is not None:
        return GPT1Config.from_json_file(Path(config.init) / "config.json").n_positions
    return GPT1Config.from_name(config.preset).n_positions


def _n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


if __name__ == "__main__":
    sys.exit(run_cli(main))
