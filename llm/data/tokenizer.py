"""Tokenizers: load a `tokenizer.json`, or train a byte-level BPE on the training documents."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from llm.config import EOT  # separates documents, as in GPT-2
from llm.errors import ConfigError


def load_tokenizer(path: str | Path, eot_token: str = EOT) -> Tokenizer:
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"data.tokenizer={path}: no such file; give a tokenizer.json, or leave it empty to train one")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as exc:
        raise ConfigError(
            f"data.tokenizer={path}: not a Hugging Face tokenizer.json ({exc}); save one with tokenizer.save(...)"
        ) from exc
    if tok.token_to_id(eot_token) is None:
        raise ConfigError(
            f"data.tokenizer={path}: has no {eot_token!r} token to separate documents; set data.eot_token to one it has"
        )
    return tok


def tokenizer_vocab_size(path: str | Path, eot_token: str = EOT) -> int:
    """Vocabulary size including added tokens: ids run from 0 to this minus one."""
    return load_tokenizer(path, eot_token).get_vocab_size(with_added_tokens=True)


def ordinary(tokenizer: Tokenizer) -> Tokenizer:
    """The same tokenizer with its added tokens unmatched in text: a document that quotes
    `<|endoftext|>` is encoded as the characters it holds (as tiktoken's encode_ordinary does), so
    that the only end-of-text ids in the data are the ones written after each document."""
    spec = json.loads(tokenizer.to_str())
    spec["added_tokens"] = []  # the ids stay in the model's vocabulary; only the matching goes
    return Tokenizer.from_str(json.dumps(spec))


# A word no longer than this: BPE training slows with the length of the longest words, and a 2 MB
# line without white space (base64, minified code, a DNA sequence) did not finish in 5 minutes
MAX_WORD_CHARS = 64


def train_bpe(texts, vocab_size: int, num_texts: int | None = None, eot_token: str = EOT) -> Tokenizer:
    """A byte-level BPE (GPT-2's scheme: any byte sequence encodes, nothing is unknown), whose
    words are cut into pieces of at most MAX_WORD_CHARS characters."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(rf"\S{{{MAX_WORD_CHARS}}}"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[eot_token],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, seen or not
        show_progress=False,  # the preparation shows its own bar
    )
    tok.train_from_iterator(texts, trainer=trainer, length=num_texts)
    return tok
