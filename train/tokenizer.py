"""The shared tokenizer: one byte-level BPE trained on every domain's training split.

All specialists and the generalist use the same tokenizer, so their perplexities are comparable
token for token and the router can hand any prompt to any of them. Byte-level BPE covers every
UTF-8 string, Japanese included, and decodes back to exactly the same text. It is saved in
Hugging Face format (`tokenizer.json` + config) beside every model, so vLLM and transformers
load it unchanged.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

if TYPE_CHECKING:  # transformers is imported where a wrapped tokenizer is made: packing tokens needs only `tokenizers`
    from transformers import PreTrainedTokenizerFast

EOS = "<|endoftext|>"
PAD = "<|pad|>"


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `texts` and wrap it for transformers/vLLM."""
    core = Tokenizer(models.BPE())
    # use_regex=False would merge across words; the GPT-2 regex keeps merges inside words and
    # still splits CJK runs sensibly because they have no spaces to split on.
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: nothing is ever unknown
        show_progress=False,
    )
    core.train_from_iterator(texts, trainer=trainer)
    return wrap(core)


def wrap(core: Tokenizer) -> PreTrainedTokenizerFast:
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=EOS,
        eos_token=EOS,
        pad_token=PAD,
        clean_up_tokenization_spaces=False,  # exact round trips
        model_max_length=1 << 20,
    )


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, directory: str | Path) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(directory)
    return directory


def load_tokenizer(directory: str | Path) -> PreTrainedTokenizerFast:
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(directory))


def encode_documents(tokenizer: PreTrainedTokenizerFast | Tokenizer, texts: list[str]) -> list[int]:
    """One token stream: each document followed by the end-of-text token. `tokenizer` is a wrapped
    one or the bare `tokenizers.Tokenizer` (`bare_tokenizer`): the same ids either way."""
    if isinstance(tokenizer, Tokenizer):
        eos, encoded = tokenizer.token_to_id(EOS), [e.ids for e in tokenizer.encode_batch(texts, add_special_tokens=False)]
    else:
        eos, encoded = tokenizer.eos_token_id, tokenizer(texts, add_special_tokens=False)["input_ids"]
    stream: list[int] = []
    for ids in encoded:
        stream.extend(ids)
        stream.append(eos)
    return stream


def bare_tokenizer(tokenizer_json: str) -> Tokenizer:
    """The tokenizer without transformers around it, set as the wrapped one encodes: no padding, no truncation."""
    core = Tokenizer.from_str(tokenizer_json)
    core.no_padding()
    core.no_truncation()
    return core
