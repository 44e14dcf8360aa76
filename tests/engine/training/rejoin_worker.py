"""A torchrun worker for test_distributed: joins the job (setup_distributed), all-reduces once and
says so. In torchrun's first round rank 1 then kills itself (kill -9), so that the agent restarts
every worker; in the next round rank 1 joins 2 seconds late, so that rank 0 reaches the rendezvous
first — where, sharing the agent's store, it read the address of rank 1's dead predecessor."""

import os
import signal
import time

import torch

from engine.training.distributed import setup_distributed, teardown_distributed

restart, rank = int(os.environ["TORCHELASTIC_RESTART_COUNT"]), int(os.environ["RANK"])
if restart and rank == 1:
    time.sleep(2)
setup_distributed("cpu")
total = torch.ones(1)
torch.distributed.all_reduce(total)
if restart == 0 and rank == 1:
    os.kill(os.getpid(), signal.SIGKILL)
print(f"round {restart} rank {rank}: {total.item():g}", flush=True)
teardown_distributed(sync=True)
