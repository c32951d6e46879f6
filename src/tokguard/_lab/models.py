"""Tiny local models for the demo and the tests: no network, no model hub.

Every hazard in the docs' hang table needs a real tokenizer and, for the CrossEncoder rows,
a real (if tiny) transformer.  Downloading one would make the tests depend on
the network and on a cache, so this module builds both from generated text in
well under a second.

No heavy import at module level (tokenizers, transformers, torch and
sentence_transformers are imported inside the functions): unguarded baselines
import the lab through ``standalone.load()``, and importing it must start and
cost nothing.

Nothing here may leave a thread pool running in the caller's process: the
caller decides whether its process is fork-safe (see the notes on
``train_tokenizer`` and ``build_cross_encoder``).
"""

from __future__ import annotations

import os
from typing import Any

__all__ = [
    "SPECIAL_TOKENS",
    "build_cross_encoder",
    "corpus",
    "load_cross_encoder",
    "train_tokenizer",
]

#: BERT's special tokens, in BERT's order ([PAD] gets id 0, as BERT expects).
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")

_SUBJECTS = (
    "the tokenizer",
    "a worker",
    "the parent",
    "every child",
    "the model",
    "a server",
    "the pool",
    "this thread",
    "our master",
    "the request",
)
_VERBS = (
    "encodes",
    "forks",
    "waits for",
    "hangs on",
    "loads",
    "shares",
    "predicts",
    "restores",
    "warms up",
    "repairs",
)
_OBJECTS = (
    "a batch of texts",
    "the rayon pool",
    "an openmp barrier",
    "the cross encoder",
    "copy-on-write memory",
    "every sentence",
    "the global runtime",
    "two threads",
    "its own pool",
    "a tiny bert",
)
_TAILS = (
    "quickly.",
    "forever!",
    "again.",
    "in parallel.",
    "serially.",
    "after the fork.",
    "before the fork.",
    "without a lock.",
)


def corpus(lines: int = 400) -> list[str]:
    """Return ``lines`` deterministic English-like sentences.

    Index arithmetic instead of ``random`` keeps the text (and therefore the
    vocabulary and the model's ids) identical on every run and platform.
    """
    out = []
    for i in range(lines):
        out.append(
            f"{_SUBJECTS[i % 10]} {_VERBS[(i // 10) % 10]} "
            f"{_OBJECTS[(i * 7) % 10]} {_TAILS[(i * 3) % 8]} (item {i})"
        )
    return out


def train_tokenizer(lines: int = 400, rust_trainer: bool = False) -> Any:
    """Build a small BERT-style WordPiece ``tokenizers.Tokenizer`` from ``corpus``.

    By default the vocabulary is counted in Python (every word of the corpus,
    every character, and every character as a ``##`` continuation), using the
    tokenizer's own normalizer and pre-tokenizer, which run single-threaded.
    Why not ``tokenizer.train_from_iterator``: the Rust trainer runs on the
    rayon pool whenever ``TOKENIZERS_PARALLELISM`` is unset or true (measured:
    the process goes from 1 to 3 threads, and with the variable set to
    ``true`` a forked child's ``encode_batch`` then hangs, hang-table row 2).  A
    test fixture that silently starts the pool would poison every "safe"
    scenario, and flipping the environment variable around the training would
    race with other threads reading it.  So the default build is independent
    of ``TOKENIZERS_PARALLELISM`` and starts no thread at all.

    ``rust_trainer=True`` uses the real ``WordPieceTrainer`` instead (the
    caller decides the environment, and therefore whether training starts the
    pool); it exists to test "training starts the pool" as a hazard.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    texts = corpus(lines)
    normalizer = normalizers.BertNormalizer(lowercase=True)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()

    if rust_trainer:
        from tokenizers import trainers

        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizer
        tok.pre_tokenizer = pre_tokenizer
        trainer = trainers.WordPieceTrainer(
            vocab_size=1000, special_tokens=list(SPECIAL_TOKENS), show_progress=False
        )
        tok.train_from_iterator(texts, trainer=trainer)
    else:
        counts: dict[str, int] = {}
        for text in texts:
            for word, _span in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)):
                counts[word] = counts.get(word, 0) + 1
        chars = sorted({c for word in counts for c in word})
        vocab_list = list(SPECIAL_TOKENS) + chars + ["##" + c for c in chars]
        # Most frequent words first, ties alphabetical: deterministic ids.
        vocab_list += sorted(counts, key=lambda w: (-counts[w], w))
        vocab: dict[str, int] = {}
        for token in vocab_list:
            vocab.setdefault(token, len(vocab))
        tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
        tok.normalizer = normalizer
        tok.pre_tokenizer = pre_tokenizer

    tok.decoder = decoders.WordPiece(prefix="##")
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS]:0 $A:0 [SEP]:0",
        pair="[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    return tok


def build_cross_encoder(directory: str) -> str:
    """Save a tiny random BERT cross-encoder (1 label) to ``directory``; return it.

    The model (hidden 32, 2 layers, 2 heads, intermediate 64) is untrained:
    the scores are meaningless, but ``CrossEncoder.predict`` runs the real
    code path (transformers tokenizer -> ``encode_batch`` -> BERT forward on
    torch), which is all the fork hazards need.

    Why the build runs under ``torch.set_num_threads(1)``: the first torch op
    that goes parallel starts the GNU OpenMP intra-op pool, and after that no
    forked child can run a parallel torch op (hang-table row 4).  Building a model
    initialises its weights with torch ops; if that started the pool, merely
    building a fixture would make the caller's process fork-unsafe.  With one
    thread no pool is created (hang-table row 6), and the previous thread count is
    restored afterwards (setting it starts nothing, hang-table row 10).  The
    process only becomes unsafe if the caller itself warms the model.  The
    global torch RNG is forked too, so the caller's random state is untouched
    while the weights stay deterministic.
    """
    import importlib

    import torch

    # Typed as Any on purpose: transformers' annotations differ between
    # releases (v5 aliases BertTokenizerFast, BertConfig takes **kwargs), and
    # ``mypy --strict`` with ``warn_unused_ignores`` cannot be kept clean with
    # per-version ignores.
    transformers: Any = importlib.import_module("transformers")

    vocab = train_tokenizer().get_vocab()
    # transformers 5 builds BertTokenizerFast (an alias of the tokenizers-backed
    # BertTokenizer) from a vocab dict with the same BERT normalizer,
    # pre-tokenizer and [CLS]/[SEP] template as ``train_tokenizer``.
    hf_tokenizer = transformers.BertTokenizerFast(vocab=vocab, model_max_length=128)
    config = transformers.BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        num_labels=1,
    )
    os.makedirs(directory, exist_ok=True)
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = transformers.BertForSequenceClassification(config)
            model.eval()
            model.save_pretrained(directory)
    finally:
        torch.set_num_threads(previous)
    hf_tokenizer.save_pretrained(directory)
    return directory


def load_cross_encoder(path: str, **kwargs: Any) -> Any:
    """Load ``path`` (from ``build_cross_encoder``) as a ``sentence_transformers.CrossEncoder``.

    Loading starts no pool by itself; the first ``predict`` does (hang-table row 7).
    """
    from sentence_transformers import CrossEncoder

    kwargs.setdefault("local_files_only", True)
    return CrossEncoder(path, **kwargs)
