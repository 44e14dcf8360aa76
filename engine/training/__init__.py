"""The training engine: the Trainer (one update, and the loop around it), the run lifecycle every
training program shares, checkpoints, the optimiser and schedule, precision, FLOPs and metrics."""
