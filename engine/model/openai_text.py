"""OpenAI's text pipeline for GPT-1 (finetune-transformer-lm's TextEncoder), before the BPE:

    ftfy.fix_text → text_standardize → spaCy's English tokenizer → lower-case each token

and then BPE over each token's characters with ``</w>`` on its last one. GPT-1 was pretrained
on text cut this way: ``don't`` → ``do n't``, ``café`` kept, curly quotes, dashes and ellipses
mapped to ASCII, a newline as its own token ``\\n</w>``. Hugging Face's fallback (BERT's
normaliser and pre-tokeniser) cuts differently, so OpenAI's weights see text they never saw.

ftfy and spaCy are optional (``pip install -e ".[openai]"``); ``spacy.blank("en")`` needs no
model download (the tokenizer is the language's rules, the same with or without a model).
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any

NEWLINE_TOKEN = "\n"

_PUNCT_RUNS = re.compile(r"""(-+|~+|!+|"+|;+|\?+|\++|,+|\)+|\(+|\\+|/+|\*+|\[+|\]+|}+|{+|\|+|_+)""")


def text_standardize(text: str) -> str:
    """OpenAI's clean-up for spaCy on BooksCorpus: dashes and ellipsis to ASCII, runs of
    punctuation set apart by spaces, every newline a lone ``\\n`` between spaces, other
    whitespace runs one space."""
    text = text.replace("—", "-").replace("–", "-").replace("―", "-")
    text = text.replace("…", "...").replace("´", "'")
    text = _PUNCT_RUNS.sub(r" \1 ", text)
    text = re.sub(r"\s*\n\s*", " \n ", text)
    text = re.sub(r"[^\S\n]+", " ", text)
    return text.strip()


@lru_cache(maxsize=1)
def _nlp() -> Any:
    try:
        import ftfy  # noqa: F401  (checked here so the error names both)
        import spacy
    except ImportError as e:
        raise ImportError(
            f"the OpenAI tokenisation (mode='openai') needs ftfy and spacy ({e.name} is missing): "
            "pip install -e '.[openai]'"
        ) from None
    return spacy.blank("en")


def words(text: str) -> list[str]:
    """The lower-cased tokens OpenAI's TextEncoder runs BPE on. spaCy keeps the space after a
    newline in its token (``"\\n "``); the TextEncoder's BPE turns that into ``\\n</w>``, so
    it is returned as ``"\\n"``."""
    import ftfy

    doc = _nlp()(text_standardize(ftfy.fix_text(text)))
    out = []
    for token in doc:
        w = token.text.lower()
        out.append(NEWLINE_TOKEN if w.strip(" ") == NEWLINE_TOKEN else w)
    return out
