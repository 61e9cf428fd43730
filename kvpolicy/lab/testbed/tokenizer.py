"""Word-level tokenizer of the testbed, built in code (no downloads).

The vocabulary is small and typed, so every task is plain token-level retrieval:

* special tokens ``<pad> <bos> <eos> <unk> <repeat> <q> <shift>``; ``<repeat>`` is the KVzip repeat
  instruction, ``<q>`` opens a question, ``<shift>`` marks an auxiliary training sequence (see
  :func:`kvpolicy.lab.testbed.tasks.training_sequence`);
* ``.`` (ends a needle), ``k0 … k{N_KEYS-1}`` keys / variables, ``v0 … v{N_VALUES-1}`` values and
  ``w0 … w{N_FILLER-1}`` filler words.

Text is words separated by single spaces; decoding joins tokens with spaces, so encode/decode round-trips.
"""

from __future__ import annotations

from pathlib import Path

PAD, BOS, EOS, UNK, REPEAT, QUESTION = "<pad>", "<bos>", "<eos>", "<unk>", "<repeat>", "<q>"
SHIFT = "<shift>"   # training only: marks an auxiliary "say the previous token" sequence
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK, REPEAT, QUESTION, SHIFT)
DOT = "."
N_KEYS = 128
N_VALUES = 128
N_FILLER = 512

KEYS = tuple(f"k{i}" for i in range(N_KEYS))
VALUES = tuple(f"v{i}" for i in range(N_VALUES))
FILLER = tuple(f"w{i}" for i in range(N_FILLER))


def vocabulary() -> list[str]:
    """All tokens in id order: id = index in this list."""
    return [*SPECIAL_TOKENS, DOT, *KEYS, *VALUES, *FILLER]


def build_tokenizer():
    """A ``PreTrainedTokenizerFast`` over :func:`vocabulary` (WordLevel model, whitespace pre-tokenizer).

    ``add_special_tokens=True`` (the default when calling it) prepends ``<bos>``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(vocabulary())}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with single spaces
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        additional_special_tokens=[REPEAT, QUESTION, SHIFT],
        padding_side="left",
        clean_up_tokenization_spaces=False,
        model_max_length=1 << 16,
    )


class Vocab:
    """Integer ids of the typed token groups (no tokenizer object needed by the task generators)."""

    def __init__(self) -> None:
        ids = {tok: i for i, tok in enumerate(vocabulary())}
        self.size = len(ids)
        self.pad, self.bos, self.eos, self.unk = ids[PAD], ids[BOS], ids[EOS], ids[UNK]
        self.repeat, self.question, self.shift, self.dot = ids[REPEAT], ids[QUESTION], ids[SHIFT], ids[DOT]
        self.keys = [ids[t] for t in KEYS]
        self.values = [ids[t] for t in VALUES]
        self.filler = [ids[t] for t in FILLER]


VOCAB = Vocab()


def save_tokenizer(directory: str | Path) -> None:
    build_tokenizer().save_pretrained(str(directory))
