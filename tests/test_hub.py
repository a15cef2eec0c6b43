"""Hub ids against a Hugging Face cache that huggingface_hub itself laid out in a temp dir (no network):
resolve_model_dir, `moesys upcycle org/name`, and `moesys generate org/name --token-ids` without a tokenizer."""

import hashlib
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
huggingface_hub = pytest.importorskip("huggingface_hub")

from huggingface_hub import constants, scan_cache_dir  # noqa: E402
from huggingface_hub.file_download import (_cache_commit_hash_for_specific_revision, _create_symlink,  # noqa: E402
                                           _get_pointer_path, repo_folder_name)

from moesys.cli import main  # noqa: E402
from moesys.hub import looks_like_hub_id, resolve_model_dir  # noqa: E402

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def cache_repo(cache_dir: Path, repo_id: str, model_dir: Path) -> Path:
    """Put the files of `model_dir` into `cache_dir` as huggingface_hub's download does: blobs named by
    their hash, snapshot pointers made by its own symlink function, refs/main naming the commit."""
    storage = cache_dir / repo_folder_name(repo_id=repo_id, repo_type="model")
    for f in sorted(model_dir.iterdir()):
        blob = storage / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(f.read_bytes())
        pointer = Path(_get_pointer_path(str(storage), COMMIT, f.name))
        pointer.parent.mkdir(parents=True, exist_ok=True)
        _create_symlink(str(blob), str(pointer), new_blob=False)
    _cache_commit_hash_for_specific_revision(str(storage), "main", COMMIT)
    return storage / "snapshots" / COMMIT


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """A cache holding tiny random `test-org/tiny-llama` (dense) and `test-org/tiny-mixtral`, offline."""
    cache = tmp_path / "hub"
    torch.manual_seed(0)
    common = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**common)).save_pretrained(tmp_path / "llama")
    transformers.MixtralForCausalLM(transformers.MixtralConfig(**common, num_local_experts=4, num_experts_per_tok=2)
                                    ).save_pretrained(tmp_path / "mixtral")
    snapshots = {repo: cache_repo(cache, repo, tmp_path / name)
                 for repo, name in (("test-org/tiny-llama", "llama"), ("test-org/tiny-mixtral", "mixtral"))}
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    # huggingface_hub reads the cache this test built: it sees both repositories at the commit.
    assert {(r.repo_id, next(iter(r.revisions)).commit_hash) for r in scan_cache_dir(cache).repos} == \
        {("test-org/tiny-llama", COMMIT), ("test-org/tiny-mixtral", COMMIT)}
    return snapshots


def test_hub_ids_resolve_through_the_cache(hub_cache, tmp_path):
    assert resolve_model_dir("test-org/tiny-llama") == hub_cache["test-org/tiny-llama"]
    assert resolve_model_dir(tmp_path / "llama") == tmp_path / "llama"      # a directory wins
    with pytest.raises(ValueError, match=r"'test-org/absent' is not a directory and not in the Hugging Face "
                                         r"cache.*HF_HUB_OFFLINE"):
        resolve_model_dir("test-org/absent")
    with pytest.raises(ValueError, match="nor a hub id"):
        resolve_model_dir(tmp_path / "missing" / "dir" / "deeper")
    assert looks_like_hub_id("Qwen/Qwen3-30B-A3B") and not looks_like_hub_id("../x") and \
        not looks_like_hub_id("a/b/c") and not looks_like_hub_id("org/..")


def test_upcycle_and_generate_take_hub_ids(hub_cache, tmp_path, capsys):
    out = tmp_path / "moe"
    assert main(["upcycle", "test-org/tiny-llama", str(out), "--num-experts", "4", "--top-k", "2",
                 "--no-progress"]) == 0
    assert (out / "config.json").is_file()
    capsys.readouterr()
    args = ["generate", "test-org/tiny-mixtral", "--token-ids", "1,2,3", "--gpu-memory", "1GiB",
            "--max-new-tokens", "4", "--dtype", "float32", "--cuda-graph", "off"]
    assert main(args) == 0
    ids = capsys.readouterr().out.splitlines()[0]
    model = transformers.AutoModelForCausalLM.from_pretrained(hub_cache["test-org/tiny-mixtral"], dtype=torch.float32)
    want = model.generate(torch.tensor([[1, 2, 3]]), attention_mask=torch.ones(1, 3, dtype=torch.long),
                          max_new_tokens=4, do_sample=False)
    assert ids == ",".join(str(i) for i in want[0].tolist())


def test_generate_without_a_tokenizer_names_token_ids(hub_cache, capsys):
    args = ["generate", "test-org/tiny-mixtral", "--prompt", "hello", "--gpu-memory", "1GiB"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "has no tokenizer" in err and "--token-ids" in err
    assert main(args[:2] + ["--token-ids", "1,x", "--gpu-memory", "1GiB"]) == 2
    assert "'x' is not a token id" in capsys.readouterr().err
    assert main(args[:2] + ["--token-ids", "1,640", "--gpu-memory", "1GiB", "--dtype", "float32"]) == 2
    assert "outside the vocabulary (vocab_size=64)" in capsys.readouterr().err


@pytest.mark.parametrize("key", ["init_from", "hf_model"])
def test_training_checkpoints_take_hub_ids(hub_cache, key):
    """model.init_from / model.hf_model = org/name train from the cached snapshot: the config names the
    snapshot directory and takes its shape (hidden 32, 4 experts), as for a local directory."""
    from moesys.config import load_config
    from moesys.hf.resolve import resolve_init_from
    from moesys.models.hf_source import resolve_config

    finetune = Path(__file__).resolve().parent.parent / "configs" / "finetune.yaml"
    config = load_config(finetune, [f"model.{key}=test-org/tiny-mixtral"])
    resolved = (resolve_init_from if key == "init_from" else resolve_config)(config)
    assert getattr(resolved.model, key) == str(hub_cache["test-org/tiny-mixtral"])
    assert resolved.model.hidden_size == 32 and resolved.moe.num_experts == 4
    with pytest.raises(ValueError, match="not in the Hugging Face cache"):
        (resolve_init_from if key == "init_from" else resolve_config)(
            load_config(finetune, [f"model.{key}=test-org/absent"]))
