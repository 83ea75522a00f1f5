"""Tokenizers: a byte-level one that needs no files or network (the tiny models' default), and `as_tokenizer`."""

from __future__ import annotations

import os

from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
BYTE_VOCAB_SIZE = 259  # 256 bytes + pad/bos/eos


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """UTF-8 bytes as tokens 0-255, then <pad>=256, <bos>=257, <eos>=258. Round-trips any text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    # ByteLevel maps byte b to a printable character; order the vocab by byte value so ids are bytes.
    chars = sorted(alphabet, key=lambda c: _char_byte(c))
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({PAD: 256, BOS: 257, EOS: 258})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([PAD, BOS, EOS])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, model_max_length=1 << 30
    )


def as_tokenizer(tokenizer: str | os.PathLike | PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """A tokenizer object as given, or the one saved in a local directory (``AutoTokenizer.from_pretrained``).

    Python users pass the tokenizer they already hold; configs name a directory. Both arrive here, so every
    component that takes a ``tokenizer`` argument accepts either."""
    if isinstance(tokenizer, (str, os.PathLike)):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(os.fspath(tokenizer))
    return tokenizer


def _char_byte(char: str) -> int:
    """The byte a ByteLevel alphabet character stands for (GPT-2's printable byte mapping)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    code = ord(char)
    if code in printable:
        return code
    others = [b for b in range(256) if b not in printable]
    return others[code - 256]
