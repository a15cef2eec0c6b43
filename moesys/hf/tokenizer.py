"""A byte-level Hugging Face tokenizer for runs trained on bytes (no `data.tokenizer`): token id = byte
value, exactly as moesys.data reads bytes, so `AutoTokenizer` on the exported model round-trips text.

It is GPT-2's byte-level BPE without merges: each byte is shown as GPT-2's printable character for
it (`bytes_to_unicode`), the vocabulary maps that character to the byte value, and the ByteLevel
decoder turns the characters back into bytes and the bytes into UTF-8 text. Byte 0, which moesys
puts between documents, is the end-of-sequence token.
"""

from __future__ import annotations

from pathlib import Path


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (what the ByteLevel pre-tokenizer and decoder use)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def save_byte_tokenizer(out_dir: str | Path, model_max_length: int | None = None) -> None:
    """Write tokenizer.json and tokenizer_config.json of the byte tokenizer into `out_dir`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = bytes_to_unicode()
    tok = Tokenizer(models.BPE(vocab={chars[b]: b for b in range(256)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    kwargs = {} if model_max_length is None else {"model_max_length": model_max_length}
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=chars[0], **kwargs)
    fast.save_pretrained(str(out_dir))
