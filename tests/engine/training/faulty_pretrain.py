"""`python -m engine.pretrain` with one fault injected into one torchrun worker, for the tests here.

GPT1_TEST_FAULT="raise RANK STEP": that rank raises RuntimeError("injected fault") before update
STEP + 1. "kill RANK STEP": in torchrun's first round, that rank kills itself (kill -9) right after
the checkpoint at update STEP is written (later rounds run undisturbed)."""

import os
import runpy
import signal
import sys

from engine.training.trainer import Trainer

kind, rank, step = os.environ["GPT1_TEST_FAULT"].split()
if os.environ["RANK"] == rank and kind == "raise":
    train_step = Trainer.train_step

    def failing_step(self, micro_batches):
        if self.step == int(step):
            raise RuntimeError("injected fault")
        return train_step(self, micro_batches)

    Trainer.train_step = failing_step
if os.environ["RANK"] == rank and kind == "kill" and os.environ["TORCHELASTIC_RESTART_COUNT"] == "0":
    save = Trainer.save_checkpoint

    def save_then_die(self):
        path = save(self)
        if self.step == int(step):
            os.kill(os.getpid(), signal.SIGKILL)
        return path

    Trainer.save_checkpoint = save_then_die
sys.argv[0] = "engine.pretrain"
runpy.run_module("engine.pretrain", run_name="__main__")
