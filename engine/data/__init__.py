"""Data: pretraining corpora, token shards and windows (corpus, shards, windows); the
fine-tuning task readers and input transformations live beside them (tasks*)."""

from engine.data.corpus import (
    SHAKESPEARE_VALIDATION,
    Document,
    read_documents,
    resolve_files,
    shakespeare_files,
    shakespeare_split,
    split_documents,
    strip_gutenberg,
)
from engine.data.shards import TokenShards, default_cache_dir, load_or_build_shards
from engine.data.windows import RandomWindows, eval_batches

__all__ = [
    "SHAKESPEARE_VALIDATION",
    "Document",
    "RandomWindows",
    "TokenShards",
    "default_cache_dir",
    "eval_batches",
    "load_or_build_shards",
    "read_documents",
    "resolve_files",
    "shakespeare_files",
    "shakespeare_split",
    "split_documents",
    "strip_gutenberg",
]
