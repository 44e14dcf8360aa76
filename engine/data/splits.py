"""A task's examples by split, encoded by the input transformation, and the fine-tuning
batches drawn from them (what engine.data.windows is to pretraining)."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from torch import Tensor

from engine.data.records import Example
from engine.data.tasks import Task
from engine.data.transforms import Encoded, InputTransform, collate


@dataclass
class Split:
    """One named set of examples and its encoding."""

    name: str
    examples: list[Example]
    encoded: list[Encoded]

    @property
    def labelled(self) -> bool:
        return all(e.label is not None for e in self.examples)

    @property
    def mean_tokens(self) -> float:
        """Tokens per example, all its sequences counted."""
        return sum(sum(len(s) for s in e.sequences) for e in self.encoded) / len(self.encoded)


def load_splits(task: Task, data_dir: Path | None, split: str, transform: InputTransform) -> list[Split]:
    """Every set of `split` ('train', 'dev' or 'test'; MNLI has two dev sets), encoded."""
    return [Split(name, ex, transform(ex)) for name, ex in task.load(data_dir, split).items()]


class ExampleBatches:
    """The trainer's batches(step, start, count): the examples of update `step` are the next
    batch_size of a sequence of epoch-wise shuffles, right-padded with `pad_id`; a pure
    function of its arguments (engine.training.trainer.Job)."""

    def __init__(self, examples: Sequence[Encoded], batch_size: int, seed: int, pad_id: int) -> None:
        self.examples, self.batch_size, self.seed, self.pad_id = examples, batch_size, seed, pad_id
        self._orders: dict[int, list[int]] = {}

    def order(self, epoch: int) -> list[int]:
        """The examples' order in `epoch`, seeded by (seed, epoch)."""
        if epoch not in self._orders:
            order = list(range(len(self.examples)))
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
            self._orders[epoch] = order
        return self._orders[epoch]

    def __call__(self, step: int, start: int, count: int) -> dict[str, Tensor]:
        first = step * self.batch_size + start
        items = [
            self.examples[self.order(i // len(self.examples))[i % len(self.examples)]]
            for i in range(first, first + count)
        ]
        return collate(items, self.pad_id).as_dict()
