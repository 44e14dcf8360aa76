"""The paper's input transformations: exact token layouts, truncation, tokenisation, padding."""

import random

import pytest
import torch

from engine.data.records import Example
from engine.data.transforms import (
    InputReport,
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


def test_each_encoded_example_says_how_many_tokens_were_cut(tokenizer):
    """Issue 23, item 5: truncation to max_len was silent."""
    long_text = " ".join(["the cat sat on the mat"] * 20)
    n = len(tokenizer.encode(long_text))
    examples = [Example("short", ("the cat",), label=0), Example("long", (long_text,), label=1)]
    short, cut = InputTransform(tokenizer, "classification", 16)(examples)
    assert short.truncated == 0 and cut.truncated == n - (16 - 2) and len(cut.sequences[0]) == 16
    # similarity: both orders lose the same tokens; multiple choice: the most any choice lost
    (pair,) = InputTransform(tokenizer, "similarity", 16)([Example("p", (long_text, "a dog"))])
    assert pair.truncated == n + len(tokenizer.encode("a dog")) - (16 - 3)
    mc = Example("m", (long_text,), ("so", "far away"), 0)
    (enc,) = InputTransform(tokenizer, "multiple_choice", 16)([mc])
    assert enc.truncated == n + len(tokenizer.encode("far away")) - (16 - 3)


def test_the_input_report_counts_cut_and_empty_examples(tokenizer):
    long_text = " ".join(["the cat sat on the mat"] * 20)
    examples = [
        Example("train.tsv:2", ("the cat",), label=0),
        Example("train.tsv:3", (long_text,), label=1),
        Example("train.tsv:4", ("  ",), label=0),
        Example("train.tsv:5", (long_text + " so",), label=1),
    ]
    encoded = InputTransform(tokenizer, "classification", 16)(examples)
    report = InputReport.of(examples, [e.truncated for e in encoded])
    cut = [e.truncated for e in encoded]
    assert report.as_dict() == {
        "examples": 4,
        "truncated": 2,
        "tokens_cut": cut[1] + cut[3],
        "most_cut": cut[3],
        "empty": 1,
    }
    assert report.note("train examples", 16) == (
        f"2 of 4 train examples are longer than max_len 16 and were cut to it (by up to {cut[3]:,} tokens, "
        f"{cut[1] + cut[3]:,} in all; the end of the longest text goes first); "
        "1 of 4 train examples has an empty text (train.tsv:4): kept, read from the special tokens alone"
    )
    assert InputReport.of(examples[:1], [0]).note("inputs", 16) is None
    many = [Example(f"f:{i}", ("",), ("a", " ")) for i in range(5)]  # an empty choice counts too
    assert (
        InputReport.of(many, [0] * 5)
        .note("inputs", 16)
        .endswith("(f:0, f:1, f:2, ...): kept, read from the special tokens alone")
    )
