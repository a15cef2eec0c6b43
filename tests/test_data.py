"""Checks the data pipeline against hand-computed expectations: packing, the held-out split, the sharded
sampler's determinism, rank/accumulation equivalence and resumption, and early errors for bad sources."""

import json

import pytest
import torch

from moesys.config import DataConfig
from moesys.data import ShardedSampler, load_tokens, pack, val_batches, validate_source


def test_pack_shifts_labels_and_holds_out_the_tail():
    tokens = torch.arange(101, dtype=torch.int32)
    splits = pack(tokens, seq_len=10, val_fraction=0.2)
    assert (splits.num_train, splits.num_val) == (8, 2)
    x, y = splits.sequences([0, 3])
    assert x.tolist()[1] == list(range(30, 40)) and y.tolist()[1] == list(range(31, 41))
    (vx, _), = list(val_batches(splits, batch_size=2, num_batches=3, rank=0, world_size=1))
    assert vx[:, 0].tolist() == [80, 90]


def test_sampler_is_deterministic_and_resumable():
    a = ShardedSampler(50, batch_size=4, grad_accum=1, rank=0, world_size=1, seed=3)
    steps = [a.next_step() for _ in range(30)]        # crosses epoch boundaries
    b = ShardedSampler(50, batch_size=4, grad_accum=1, rank=0, world_size=1, seed=3)
    for _ in range(11):
        b.next_step()
    c = ShardedSampler(50, batch_size=4, grad_accum=1, rank=0, world_size=1, seed=3)
    c.load_state_dict(json.loads(json.dumps(b.state_dict())))
    assert [c.next_step() for _ in range(19)] == steps[11:]


def test_two_ranks_see_what_one_rank_with_two_micro_batches_sees():
    one = ShardedSampler(64, batch_size=4, grad_accum=2, rank=0, world_size=1, seed=0)
    r0 = ShardedSampler(64, batch_size=4, grad_accum=1, rank=0, world_size=2, seed=0)
    r1 = ShardedSampler(64, batch_size=4, grad_accum=1, rank=1, world_size=2, seed=0)
    for _ in range(20):
        m0, m1 = one.next_step()
        assert r0.next_step() == [m0] and r1.next_step() == [m1]
        assert not set(m0) & set(m1)


def test_stdlib_corpus_is_bytes_and_capped():
    tokens = load_tokens(DataConfig(max_tokens=10_000))
    assert tokens.dtype == torch.uint8 and tokens.numel() == 10_000


def test_jsonl_source(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"text": "hello"}) + "\n" + json.dumps({"text": "world"}) + "\n")
    assert bytes(load_tokens(DataConfig(source=str(f))).tolist()) == b"hello\0world\0"
    with pytest.raises(ValueError, match="data.text_field"):
        load_tokens(DataConfig(source=str(f), text_field="body"))


def test_bad_sources_name_the_value(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        validate_source(DataConfig(source=str(tmp_path / "missing.txt")))
    with pytest.raises(ValueError, match="data.tokenizer"):
        validate_source(DataConfig(tokenizer=str(tmp_path / "no-tokenizer")))
    with pytest.raises(ValueError, match="exceeds"):
        ShardedSampler(10, batch_size=8, grad_accum=1, rank=0, world_size=2, seed=0)


def _tiny_tokenizer(path):
    """A word-level tokenizer saved as a local HF tokenizer directory (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {"[UNK]": 0, "</s>": 1, "hello": 2, "world": 3, "moe": 4}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="</s>").save_pretrained(path)
    return str(path)


def test_tokenizer_and_parquet_sources(tmp_path):
    tok = _tiny_tokenizer(tmp_path / "tok")
    (tmp_path / "a.txt").write_text("hello world")
    ids = load_tokens(DataConfig(source=str(tmp_path / "a.txt"), tokenizer=tok))
    assert ids.dtype == torch.int32 and ids.tolist() == [2, 3, 1]
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa
    pq.write_table(pa.table({"text": ["moe hello", "world"]}), tmp_path / "d.parquet")
    assert load_tokens(DataConfig(source=str(tmp_path / "d.parquet"), tokenizer=tok)).tolist() == [4, 2, 1, 3, 1]


def test_bad_records_name_the_file_line_and_field(tmp_path):
    f = tmp_path / "d.jsonl"
    good = [json.dumps({"text": f"doc {i}"}) for i in range(100)]
    f.write_text("\n".join(good + ['{"text": "tab\there"}']) + "\n")   # a raw control character: line 101
    with pytest.raises(ValueError, match=rf"{f}:101: not valid JSON \(Invalid control character at column 14\)"):
        load_tokens(DataConfig(source=str(f)))
    f.write_text("\n".join(good[:2] + [json.dumps({"text": 7})]) + "\n")
    with pytest.raises(ValueError, match=rf"{f}:3: field 'text' is int '7', not a string"):
        load_tokens(DataConfig(source=str(f)))
    f.write_bytes(b'{"text": "ok"}\n{"text": "\xff\xfe"}\n')
    with pytest.raises(ValueError, match=rf"{f}:2: not UTF-8"):
        load_tokens(DataConfig(source=str(f)))
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa
    pq.write_table(pa.table({"body": ["a"], "id": [1]}), tmp_path / "d.parquet")
    with pytest.raises(ValueError, match=r"d.parquet: no column 'text'; its columns are \['body', 'id'\]"):
        load_tokens(DataConfig(source=str(tmp_path / "d.parquet")))


def test_binary_renamed_txt_is_refused_above_the_stated_fraction(tmp_path):
    from moesys.data import MAX_UNDECODABLE_FRACTION
    g = torch.Generator().manual_seed(0)
    f = tmp_path / "random.txt"
    f.write_bytes(bytes(torch.randint(0, 256, (20_000,), generator=g, dtype=torch.uint8).tolist()))
    with pytest.raises(ValueError, match=rf"{f}: \d+ of its 20000 bytes \(\d+%\) are not valid UTF-8, above the 1%"):
        load_tokens(DataConfig(source=str(f)))
    # Text with a few stray bytes (at the stated fraction) still loads; one byte more is refused.
    n = int(1000 * MAX_UNDECODABLE_FRACTION)
    f.write_bytes(b"a" * (1000 - n) + b"\xff" * n)
    assert load_tokens(DataConfig(source=str(f))).numel() == 1000 - n + 3 * n + 1  # U+FFFD is 3 bytes
    f.write_bytes(b"a" * (999 - n) + b"\xff" * (n + 1))
    with pytest.raises(ValueError, match="not valid UTF-8"):
        load_tokens(DataConfig(source=str(f)))


def test_a_job_failing_on_its_data_leaves_no_run_dir(tmp_path, capsys):
    from tests._train_helpers import train_inproc
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"text": "x" * 5000}) + "\n{broken\n")
    run = tmp_path / "run"
    assert train_inproc(run, f"data.source={f}", "train.steps=1", "train.device=cpu") == 2
    assert f"{f}:2: not valid JSON" in capsys.readouterr().err
    assert not run.exists()
