"""A character-level tokenizer for the built-in tasks: one token per character, spaces and newlines included.

It is a real ``tokenizers`` WordLevel model wrapped as a ``transformers.PreTrainedTokenizerFast``, so it
saves and loads like any Hugging Face tokenizer (``save_pretrained`` / ``AutoTokenizer.from_pretrained``)
and the rest of the package never needs to know it is special.

Why a Split pre-tokenizer and a Fuse decoder: the obvious "split every character" setups
(``Whitespace``-style pre-tokenizers, or a WordLevel decoder) drop spaces and newlines when encoding and
put spaces between characters when decoding. Splitting on the regex ``[\s\S]`` (any one character) with behaviour
``isolated`` keeps every character, whitespace included, as its own token; ``Fuse`` joins the tokens
back with nothing in between, so ``decode(encode(s)) == s`` for any string over the alphabet.

>>> tok = make_char_tokenizer()
>>> tok.decode(tok("12+3= a\\nb")["input_ids"])
'12+3= a\\nb'
"""
from __future__ import annotations

import string

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

DEFAULT_ALPHABET = string.digits + string.ascii_letters + string.punctuation + " \n"
"""Digits, ASCII letters, ASCII punctuation, space and newline: 96 characters."""

PAD, EOS, BOS, UNK = "<pad>", "<eos>", "<bos>", "<unk>"
SPECIAL_TOKENS = (PAD, EOS, BOS, UNK)
"""Special tokens take ids 0..3 in this order; characters follow in alphabet order."""


def make_char_tokenizer(alphabet: str = DEFAULT_ALPHABET) -> PreTrainedTokenizerFast:
    """A character-level ``PreTrainedTokenizerFast`` over ``alphabet`` (ids: specials 0..3, then characters).

    Nothing is added around an encoded text (no BOS, no EOS): prompts and responses are concatenated
    by the caller, who appends ``eos_token_id`` where a response ends. Padding is on the left, as
    batched generation needs. Characters outside the alphabet encode to ``<unk>``.
    """
    chars = list(dict.fromkeys(alphabet))  # keep order, drop repeats
    if not chars:
        raise ValueError("alphabet must not be empty")
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for c in chars:
        if c in vocab:
            raise ValueError(f"alphabet character {c!r} collides with a special token")
        vocab[c] = len(vocab)

    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    # [\s\S] matches any one character, '\n' included (Oniguruma's '.' does not); every character
    # becomes its own pre-token, whitespace included
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()  # join tokens with "" (the default WordLevel decode puts spaces between)
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        eos_token=EOS,
        bos_token=BOS,
        unk_token=UNK,
        padding_side="left",
        clean_up_tokenization_spaces=False,  # " ," must stay " ,": this is a character vocab, not English
        model_max_length=1 << 20,
    )
