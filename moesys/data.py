"""The training data pipeline: a token corpus, packed fixed-length sequences, a train/validation split
and a deterministic, resumable sampler sharded over data-parallel ranks.

Sources (`data.source`):
- "stdlib": the running Python's standard-library `.py` files as byte-level tokens (ids 0..255,
  byte 0 between files). Needs nothing downloaded; the default for tests and first runs.
- a path to a `.txt`, `.jsonl` (field `data.text_field`) or `.parquet` (column `data.text_field`)
  file, or a directory of them (read in sorted order); tokens are bytes unless `data.tokenizer`
  names a local Hugging Face tokenizer directory (documents are then joined with its EOS token).

Packing: the corpus is one token stream; sequence i is tokens[i*S : i*S + S + 1] (inputs and the
labels shifted by one), so no token is padding. The last `val_fraction` of the sequences are held
out for the validation loss.

Sampling: each epoch is a permutation of the training sequences seeded by (seed, epoch). Optimizer
step s consumes `global_batch = batch_size * world_size * grad_accum` consecutive entries of it;
micro-batch m of rank r takes entries [(m * world + r) * B, +B). So a run with 2 ranks and 1
micro-batch sees exactly the sequences of a run with 1 rank and 2 micro-batches, and the sampler's
whole state is (epoch, offset): a run resumes exactly, also with another world size.

Legend: B sequences per micro-batch, S sequence length.
"""

from __future__ import annotations

import importlib.util
import json
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

from moesys.config import Config, DataConfig

TEXT_SUFFIXES = (".txt", ".md", ".py", ".jsonl", ".parquet")


def validate_source(cfg: DataConfig) -> None:
    """Raise ValueError for a data source or tokenizer that does not exist; cheap, runs before any
    process group is created so a typo fails at once instead of hanging other ranks."""
    if cfg.source != "stdlib":
        path = Path(cfg.source)
        if not path.exists():
            raise ValueError(f"data.source={cfg.source!r} does not exist; give a .txt/.jsonl/.parquet file, "
                             "a directory of them, or 'stdlib' for the built-in corpus")
        if path.is_dir() and not _source_files(path):
            raise ValueError(f"data.source={cfg.source!r} is a directory without {'/'.join(TEXT_SUFFIXES)} files")
        if path.is_file() and path.suffix not in TEXT_SUFFIXES:
            raise ValueError(f"data.source={cfg.source!r} has suffix {path.suffix!r}; "
                             f"supported: {', '.join(TEXT_SUFFIXES)}")
        if importlib.util.find_spec("pyarrow") is None and any(p.suffix == ".parquet" for p in _source_files(path)):
            raise ValueError(f"data.source={cfg.source!r} holds parquet files but pyarrow is not installed; "
                             "pip install 'moesys[data]' (pyarrow)")
    if cfg.tokenizer is not None and not Path(cfg.tokenizer).is_dir():
        raise ValueError(f"data.tokenizer={cfg.tokenizer!r} is not a directory; give a local Hugging Face "
                         "tokenizer directory (with tokenizer.json) or leave it unset for byte tokens")
    if not 0.0 <= cfg.val_fraction < 1.0:
        raise ValueError(f"data.val_fraction={cfg.val_fraction} must be in [0, 1)")


def _source_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)


def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and "dist-packages" not in p.parts)


# A text file may hold a few bytes that are not UTF-8 (they become U+FFFD); above this fraction of its
# bytes it is not text (binary data, or another encoding whose every accent would become U+FFFD).
MAX_UNDECODABLE_FRACTION = 0.01


def _decode_text(path: Path, data: bytes) -> str:
    text = data.decode("utf-8", errors="replace")
    bad = text.count("\ufffd") - data.count("\ufffd".encode())  # U+FFFD written in the file is text
    if data and bad / len(data) > MAX_UNDECODABLE_FRACTION:
        raise ValueError(f"{path}: {bad} of its {len(data)} bytes ({bad / len(data):.0%}) are not valid UTF-8, "
                         f"above the {MAX_UNDECODABLE_FRACTION:.0%} a text file may have: it is binary or in "
                         "another encoding; remove it from data.source or convert it (iconv -t utf-8)")
    return text


def _documents(path: Path, text_field: str):
    """Yield the text documents of one file; bad records raise ValueError naming the file and line."""
    if path.suffix == ".jsonl":
        with path.open("rb") as f:
            for lineno, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                try:
                    record = json.loads(raw.decode("utf-8"))
                except UnicodeDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: not UTF-8 (byte {e.start + 1} of the line); fix or "
                                     "remove that line") from None
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg.removesuffix(' at')} at column {e.colno}); fix or "
                                     "remove that line") from None
                if not isinstance(record, dict):
                    raise ValueError(f"{path}:{lineno}: a JSON {type(record).__name__}, not an object with "
                                     f"a {text_field!r} field")
                if text_field not in record:
                    raise ValueError(f"{path}:{lineno}: no field {text_field!r}; set data.text_field to one "
                                     f"of {sorted(record)}")
                yield _text_value(record[text_field], f"{path}:{lineno}: field {text_field!r}")
    elif path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ValueError(f"data.source {path} is a parquet file but pyarrow is not installed; "
                             "pip install 'moesys[data]' (pyarrow)") from None
        columns = pq.read_schema(path).names
        if text_field not in columns:
            raise ValueError(f"{path}: no column {text_field!r}; its columns are {columns}: set "
                             "data.text_field to the one holding the text")
        table = pq.read_table(path, columns=[text_field])
        for row, value in enumerate(table.column(text_field).to_pylist()):
            yield _text_value(value, f"{path}: row {row} of column {text_field!r}")
    else:
        yield _decode_text(path, path.read_bytes())


def _text_value(value, where: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{where} is {type(value).__name__} {str(value)[:40]!r}, not a string; "
                         "data.text_field must name the field holding each document's text")
    return value


def load_tokens(cfg: DataConfig) -> torch.Tensor:
    """The whole corpus as one 1-D token tensor (uint8 for bytes, int32 for a tokenizer), at most
    `cfg.max_tokens` tokens, identical on every rank."""
    validate_source(cfg)
    budget = cfg.max_tokens
    if cfg.tokenizer is None:
        chunks, total = [], 0
        files = _stdlib_files() if cfg.source == "stdlib" else _source_files(Path(cfg.source))
        for path in files:
            docs = [path.read_bytes()] if cfg.source == "stdlib" else \
                [d.encode("utf-8") for d in _documents(path, cfg.text_field)]
            for doc in docs:
                chunks.append(doc + b"\0")
                total += len(doc) + 1
                if budget is not None and total >= budget:
                    break
            if budget is not None and total >= budget:
                break
        data = b"".join(chunks)[:budget]
        return torch.frombuffer(bytearray(data), dtype=torch.uint8)
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(cfg.tokenizer)
    sep = [tok.eos_token_id] if tok.eos_token_id is not None else []
    ids: list[int] = []
    files = _stdlib_files() if cfg.source == "stdlib" else _source_files(Path(cfg.source))
    for path in files:
        docs = [path.read_text(encoding="utf-8", errors="replace")] if cfg.source == "stdlib" else \
            _documents(path, cfg.text_field)
        for doc in docs:
            ids.extend(tok(doc, add_special_tokens=False)["input_ids"] + sep)
            if budget is not None and len(ids) >= budget:
                break
        if budget is not None and len(ids) >= budget:
            break
    return torch.tensor(ids[:budget], dtype=torch.int32)


@dataclass
class PackedSplits:
    """The packed token stream and which sequence indices are training and validation."""
    tokens: torch.Tensor
    seq_len: int
    num_train: int
    num_val: int

    def sequences(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids_BS, labels_BS) as int64 for the given global sequence indices."""
        S = self.seq_len
        rows = [self.tokens[i * S: i * S + S + 1] for i in indices]
        batch_BS1 = torch.stack(rows).long()
        return batch_BS1[:, :-1], batch_BS1[:, 1:]


def pack(tokens: torch.Tensor, seq_len: int, val_fraction: float) -> PackedSplits:
    n = (tokens.numel() - 1) // seq_len
    num_val = int(round(n * val_fraction))
    if val_fraction > 0:
        num_val = max(num_val, 1)
    if n - num_val < 1:
        raise ValueError(f"the corpus has {tokens.numel()} tokens: too few for one training sequence of "
                         f"data.seq_len={seq_len} after the validation split; lower data.seq_len or add data")
    return PackedSplits(tokens, seq_len, n - num_val, num_val)


def check_vocab(tokens: torch.Tensor, vocab_size: int) -> None:
    top = int(tokens.max()) if tokens.numel() else 0
    if top >= vocab_size:
        raise ValueError(f"the data has token id {top} but model.vocab_size={vocab_size}; "
                         f"set model.vocab_size >= {top + 1} (the tokenizer's vocabulary size)")


class ShardedSampler:
    """Deterministic, resumable sequence sampler sharded over data-parallel ranks (see module docstring)."""

    def __init__(self, num_sequences: int, batch_size: int, grad_accum: int, rank: int, world_size: int,
                 seed: int):
        self.num_sequences, self.batch_size, self.grad_accum = num_sequences, batch_size, grad_accum
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.global_batch = batch_size * world_size * grad_accum
        if self.global_batch > num_sequences:
            raise ValueError(f"a global batch of {self.global_batch} sequences (data.batch_size={batch_size} x "
                             f"{world_size} ranks x train.grad_accum={grad_accum}) exceeds the {num_sequences} "
                             "training sequences; lower data.batch_size or data.seq_len, or add data")
        self.epoch, self.offset = 0, 0
        self._perm = self._permutation(0)

    def _permutation(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_sequences, generator=g)

    def next_step(self) -> list[list[int]]:
        """The sequence indices of this rank's micro-batches for the next optimizer step."""
        if self.offset + self.global_batch > self.num_sequences:
            self.epoch, self.offset = self.epoch + 1, 0
            self._perm = self._permutation(self.epoch)
        B, W = self.batch_size, self.world_size
        out = []
        for m in range(self.grad_accum):
            start = self.offset + (m * W + self.rank) * B
            out.append(self._perm[start:start + B].tolist())
        self.offset += self.global_batch
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])
        self._perm = self._permutation(self.epoch)


def val_batches(splits: PackedSplits, batch_size: int, num_batches: int, rank: int, world_size: int):
    """This rank's validation micro-batches: the same held-out sequences at every evaluation."""
    first = splits.num_train
    per_step = batch_size * world_size
    for b in range(num_batches):
        start = b * per_step + rank * batch_size
        if b * per_step + per_step > splits.num_val:
            break
        yield splits.sequences(list(range(first + start, first + start + batch_size)))


def build_data(config: Config, rank: int, world_size: int) -> tuple[PackedSplits, ShardedSampler]:
    tokens = load_tokens(config.data)
    check_vocab(tokens, config.model.vocab_size)
    splits = pack(tokens, config.data.seq_len, config.data.val_fraction)
    sampler = ShardedSampler(splits.num_train, config.data.batch_size, config.train.grad_accum, rank,
                             world_size, config.train.seed)
    return splits, sampler
