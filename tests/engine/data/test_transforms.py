"""The paper's input transformations: exact token layouts, truncation, tokenisation, padding."""

import random

import pytest
import torch

from engine.data.records import Example
from engine.data.transforms import (
    InputTransform,
    collate,
    transform,
    truncate_longest_first,
)
from engine.model.tokenizer import BPETokenizer, SpecialTokens

SP = SpecialTokens(start=100, delimiter=101, classify=102, pad=103)
S, D, E = SP.start, SP.delimiter, SP.classify


def seq(n: int, base: int = 0) -> list[int]:
    return list(range(base, base + n))


def test_classification_layout():
    assert transform("classification", [[1, 2, 3]], [], SP, 16) == [[S, 1, 2, 3, E]]


def test_entailment_layout():
    assert transform("entailment", [[1, 2], [7, 8, 9]], [], SP, 16) == [[S, 1, 2, D, 7, 8, 9, E]]


@pytest.mark.parametrize("kind", ["similarity", "regression"])
def test_similarity_both_orders(kind):
    assert transform(kind, [[1, 2], [7]], [], SP, 16) == [[S, 1, 2, D, 7, E], [S, 7, D, 1, 2, E]]


def test_multiple_choice_one_sequence_per_choice():
    out = transform("multiple_choice", [[1, 2, 3]], [[7], [8, 9]], SP, 16)
    assert out == [[S, 1, 2, 3, D, 7, E], [S, 1, 2, 3, D, 8, 9, E]]
    # RACE: article and question both go before the delimiter, with no token between them
    out = transform("multiple_choice", [[1, 2], [5, 6]], [[7], [8]], SP, 16)
    assert out == [[S, 1, 2, 5, 6, D, 7, E], [S, 1, 2, 5, 6, D, 8, E]]


def test_truncation_classification_keeps_specials():
    assert transform("classification", [seq(10)], [], SP, 5) == [[S, 0, 1, 2, E]]


def test_truncation_longest_segment_first():
    # budget 10 - 3 = 7: the 10-token premise loses 6, the 3-token hypothesis nothing
    assert transform("entailment", [seq(10), seq(3, 50)], [], SP, 10) == [[S, 0, 1, 2, 3, D, 50, 51, 52, E]]
    # a tie: the earlier segment loses first (5 + 5 -> 3 + 4)
    assert transform("entailment", [seq(5), seq(5, 50)], [], SP, 10) == [[S, 0, 1, 2, D, 50, 51, 52, 53, E]]
    # similarity truncates once and builds both orders from the same pieces
    out = transform("similarity", [seq(6), seq(2, 50)], [], SP, 8)
    assert out == [[S, 0, 1, 2, D, 50, 51, E], [S, 50, 51, D, 0, 1, 2, E]]


def test_truncation_multiple_choice_keeps_question_and_answer():
    # budget 16 - 3 = 13 over article 20, question 5, answer 3: only the article is cut (to 5)
    out = transform("multiple_choice", [seq(20), seq(5, 60)], [seq(3, 90)], SP, 16)
    assert out == [[S, *seq(5), *seq(5, 60), D, *seq(3, 90), E]]
    assert all(len(s) <= 16 for s in out)
    # each choice is truncated on its own: a longer answer leaves less of the context
    out = transform("multiple_choice", [seq(10)], [seq(2, 90), seq(8, 70)], SP, 13)
    assert out == [[S, *seq(8), D, 90, 91, E], [S, *seq(5), D, *seq(5, 70), E]]


def test_truncate_matches_one_token_at_a_time():
    def naive(segs, budget):
        lengths = [len(s) for s in segs]
        while sum(lengths) > budget:
            i = max(range(len(lengths)), key=lambda j: (lengths[j], -j))  # longest, earliest on ties
            lengths[i] -= 1
        return [s[:n] for s, n in zip(segs, lengths)]

    rng = random.Random(0)
    for _ in range(3000):
        segs = [seq(rng.randint(0, 15), 100 * k) for k in range(rng.randint(1, 4))]
        budget = rng.randint(0, 45)
        assert truncate_longest_first(segs, budget) == naive(segs, budget), (segs, budget)


def test_bad_inputs():
    with pytest.raises(ValueError, match="max_len 3 leaves no room for text after 3 special tokens"):
        transform("entailment", [[1], [2]], [], SP, 3)
    assert transform("entailment", [[1], [2]], [], SP, 4) == [
        [S, D, 2, E]
    ]  # the smallest that fits; a tie: the first loses
    with pytest.raises(ValueError, match="unknown task kind 'ranking'"):
        transform("ranking", [[1]], [], SP, 8)
    with pytest.raises(ValueError, match="entailment example has 2 text segment"):
        transform("entailment", [[1]], [], SP, 8)
    with pytest.raises(ValueError, match="needs context segments and at least one choice"):
        transform("multiple_choice", [[1]], [], SP, 8)


@pytest.fixture(scope="module")
def tokenizer():
    tok = BPETokenizer.train(texts=["the cat sat on the mat", "a dog ran far away", "is it so"] * 20, vocab_size=80)
    tok.add_special_tokens()
    return tok


def test_input_transform_tokenises_then_transforms(tokenizer):
    sp = tokenizer.special_tokens()
    ex = Example("x", ("the cat sat", "a dog"), label=1)
    (enc,) = InputTransform(tokenizer, "similarity", 64)([ex])
    a, b = tokenizer.encode("the cat sat"), tokenizer.encode("a dog")
    assert enc.label == 1
    assert enc.sequences == (
        tuple([sp.start, *a, sp.delimiter, *b, sp.classify]),
        tuple([sp.start, *b, sp.delimiter, *a, sp.classify]),
    )
    mc = Example("y", ("the cat", "is it"), ("so", "far away"), 0)
    (enc,) = InputTransform(tokenizer, "multiple_choice", 64)([mc])
    ctx = tokenizer.encode("the cat") + tokenizer.encode("is it")
    assert enc.sequences[1] == tuple([sp.start, *ctx, sp.delimiter, *tokenizer.encode("far away"), sp.classify])


def test_input_transform_needs_special_tokens():
    tok = BPETokenizer.train(texts=["a b c"] * 5, vocab_size=30)
    with pytest.raises(ValueError, match="add_special_tokens"):
        InputTransform(tok, "classification", 16)


def test_collate_pads_right_and_masks_lm_labels():
    from engine.data.transforms import Encoded

    items = [Encoded(((S, 1, 2, E), (S, 3, E)), 1), Encoded(((S, 4, E), (S, 5, 6, 7, E)), 0)]
    b = collate(items, SP.pad)
    P = SP.pad
    assert b.input_ids.tolist() == [[[S, 1, 2, E, P], [S, 3, E, P, P]], [[S, 4, E, P, P], [S, 5, 6, 7, E]]]
    assert b.lm_labels.tolist() == [
        [[S, 1, 2, E, -100], [S, 3, E, -100, -100]],
        [[S, 4, E, -100, -100], [S, 5, 6, 7, E]],
    ]
    assert b.extract.tolist() == [[3, 2], [2, 4]]
    assert b.labels.dtype == torch.long and b.labels.tolist() == [1, 0]
    scores = collate([Encoded(((S, E),), 2.5), Encoded(((S, E),), 1)], SP.pad).labels
    assert scores.dtype == torch.float32 and scores.tolist() == [2.5, 1.0]
    assert collate([Encoded(((S, E),), None)], SP.pad).labels is None
    with pytest.raises(ValueError, match="same number of sequences"):
        collate([Encoded(((S, E),), 0), Encoded(((S, E), (S, E)), 0)], SP.pad)
