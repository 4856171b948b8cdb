"""Tokenizers: train a byte-level BPE on the training split, or reuse an existing Hugging Face tokenizer.

A newly trained tokenizer always carries ``<|endoftext|>`` (bos and eos), ``<|pad|>`` and the chat
tokens ``<|system|>``, ``<|user|>``, ``<|assistant|>``, ``<|end|>`` with a chat template that uses them,
so the tokenizer trained for pretraining serves the instruction data later with the same vocabulary.
An existing tokenizer without a chat template gets :data:`PLAIN_CHAT_TEMPLATE`, which adds no tokens
(new tokens would change the vocabulary the model was trained with).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from kubellm.config.data import TokenizerConfig
from kubellm.data.format import MANIFEST, TOKENIZER_DIR
from kubellm.errors import DataError
from kubellm.fsutil import user_path

EOS = "<|endoftext|>"
PAD = "<|pad|>"
CHAT_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
SPECIAL_TOKENS = (EOS, PAD, *CHAT_TOKENS)
END_OF_TURN = "<|end|>"
#: What ``PreTrainedTokenizerFast.from_pretrained`` reads (and so what a tokenizer's identity is made of).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)

#: Every turn is ``<|role|>content<|end|>``, with no whitespace around the special tokens: text between
#: two special tokens is tokenized on its own, so a rendered conversation tokenizes identically in
#: training and at inference, and the prompt/answer boundary falls exactly on a token boundary.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + message['role']) }}{% endif %}"
    "<|{{ message['role'] }}|>{{ message['content'] }}<|end|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

#: For existing tokenizers without a template: plain-text markers, the answer closed by the eos token.
PLAIN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}\n\n"
    "{% elif message['role'] == 'user' %}### Instruction:\n{{ message['content'] }}\n\n"
    "{% else %}### Response:\n{{ message['content'] }}{{ eos_token }}\n\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}### Response:\n{% endif %}"
)


def train_tokenizer(
    texts: Iterable[str], cfg: TokenizerConfig, *, length: int | None = None, where: str = "data"
) -> Any:
    """Train a byte-level BPE on ``texts`` and wrap it as a ``PreTrainedTokenizerFast``.

    Raises :class:`DataError` when the data cannot fill ``cfg.vocab_size`` (too little text for that
    many merges at ``min_frequency``), since a silently smaller vocabulary would break model configs;
    ``where`` names the data in that message.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # trim_offsets=False: offsets stay exact character spans, which instruction masking relies on.
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=length)
    got = tok.get_vocab_size()
    if got < cfg.vocab_size:
        raise DataError(
            f"{where}: tokenizer.vocab_size {cfg.vocab_size}: the training split supports only {got} tokens "
            f"(pairs seen at least {cfg.min_frequency} times); lower "
            "tokenizer.vocab_size or add data"
        )
    return wrap(tok)


def wrap(tok: Any) -> Any:
    """A ``tokenizers.Tokenizer`` trained here, as a Hugging Face tokenizer with our special tokens."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=None,
        extra_special_tokens=list(CHAT_TOKENS),
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )


def tokenizer_source(path: str | Path) -> Path:
    """The tokenizer directory for ``path``: a tokenizer directory, or a prepared dataset's ``tokenizer/``."""
    p = user_path(path)
    if (p / MANIFEST).is_file() and (p / TOKENIZER_DIR).is_dir():
        p = p / TOKENIZER_DIR
    if not p.is_dir():
        raise DataError(f"tokenizer.path {str(path)!r}: no such directory")
    if not any((p / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json")):
        raise DataError(f"tokenizer.path {str(p)!r}: not a Hugging Face tokenizer directory (no tokenizer.json)")
    return p


def load_tokenizer(path: str | Path) -> Any:
    """Load an existing fast tokenizer from a local directory (never the Hub), completing it for prep:
    an eos token is required, pad falls back to eos, and a missing chat template gets the plain one."""
    # The generic fast class, not AutoTokenizer: AutoTokenizer imports torch (+3 s per process) and we
    # only need tokenizer.json, the special tokens and the chat template.
    from transformers import PreTrainedTokenizerFast

    p = tokenizer_source(path)
    if not (p / "tokenizer.json").is_file():
        raise DataError(f"tokenizer.path {str(p)!r}: no tokenizer.json (kubellm needs a fast tokenizer)")
    try:
        tok = PreTrainedTokenizerFast.from_pretrained(str(p), local_files_only=True)
    except Exception as err:  # noqa: BLE001 - any load failure is a bad directory for the user
        raise DataError(
            f"tokenizer.path {str(p)!r}: cannot load ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''})"
        ) from None
    if tok.eos_token_id is None:
        raise DataError(f"tokenizer.path {str(p)!r}: the tokenizer has no eos token (needed between documents)")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token  # no new token: that would change the vocabulary
    if not tok.chat_template:
        tok.chat_template = PLAIN_CHAT_TEMPLATE
    return tok


def backend(tok: Any) -> Any:
    """The raw Rust tokenizer, with any truncation or padding turned off (we pack ourselves)."""
    from tokenizers import Tokenizer

    raw = Tokenizer.from_str(tok.backend_tokenizer.to_str())
    raw.no_truncation()
    raw.no_padding()
    return raw


def vocab_size(tok: Any) -> int:
    """Size of the embedding the model needs: the largest id + 1 (added tokens included)."""
    return len(tok)


def stop_token_ids(tok: Any) -> list[int]:
    """Tokens that end a generated answer: eos, plus ``<|end|>`` where the template uses it."""
    ids = [tok.eos_token_id]
    uses_end = END_OF_TURN in (tok.chat_template or "") and END_OF_TURN in tok.get_vocab()
    end = tok.convert_tokens_to_ids(END_OF_TURN) if uses_end else None
    if end is not None and end not in ids:
        ids.append(end)
    return ids
