"""Hub ids against a Hugging Face cache that huggingface_hub itself fills in a temp dir, downloading from a
fake hub on 127.0.0.1 (tests/_fake_hub.py; no network): the online path of resolve_model_dir (safetensors
and JSON only, the hub's refusals, the cache when the hub is down), then offline: resolve_model_dir,
`moesys upcycle org/name`, `moesys generate org/name --token-ids` without a tokenizer, and training
configs naming org/name."""

from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
huggingface_hub = pytest.importorskip("huggingface_hub")

from huggingface_hub import constants, scan_cache_dir  # noqa: E402

from moesys.cli import main  # noqa: E402
from moesys.hub import looks_like_hub_id, resolve_model_dir  # noqa: E402
from tests._fake_hub import COMMIT, FakeHub  # noqa: E402

REPOS = ("test-org/tiny-llama", "test-org/tiny-mixtral")


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """A fake hub serving tiny random `test-org/tiny-llama` (dense) and `test-org/tiny-mixtral`, each with
    a pickle beside its safetensors; huggingface_hub pointed at it and at an empty cache, online."""
    torch.manual_seed(0)
    common = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**common)).save_pretrained(tmp_path / "llama")
    transformers.MixtralForCausalLM(transformers.MixtralConfig(**common, num_local_experts=4, num_experts_per_tok=2)
                                    ).save_pretrained(tmp_path / "mixtral")
    for name in ("llama", "mixtral"):
        (tmp_path / name / "pytorch_model.bin").write_bytes(b"a pickle moesys must never download")
    with FakeHub({REPOS[0]: tmp_path / "llama", REPOS[1]: tmp_path / "mixtral"}) as hub:
        monkeypatch.setattr(constants, "ENDPOINT", hub.endpoint)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                            hub.endpoint + "/{repo_id}/resolve/{revision}/{filename}")
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        yield hub


@pytest.fixture
def hub_cache(fake_hub, tmp_path, monkeypatch):
    """The cache after resolve_model_dir downloaded both repositories through huggingface_hub; offline."""
    snapshots = {repo: resolve_model_dir(repo) for repo in REPOS}
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    fake_hub.stop()  # offline means offline: nothing may be asked of the hub from here on
    # huggingface_hub reads the cache it wrote: both repositories at the hub's commit.
    assert {(r.repo_id, next(iter(r.revisions)).commit_hash) for r in scan_cache_dir(tmp_path / "hub").repos} == \
        {(repo, COMMIT) for repo in REPOS}
    return snapshots


def test_online_download_takes_safetensors_and_json_only(fake_hub, tmp_path):
    snapshot = resolve_model_dir("test-org/tiny-mixtral")
    assert snapshot == tmp_path / "hub" / "models--test-org--tiny-mixtral" / "snapshots" / COMMIT
    assert sorted(p.name for p in snapshot.iterdir()) == ["config.json", "generation_config.json",
                                                          "model.safetensors"]
    fetched = {path.rsplit("/", 1)[1] for method, path in fake_hub.requests if method == "GET" and "/resolve/" in path}
    assert fetched == {"config.json", "generation_config.json", "model.safetensors"}  # never the pickle
    assert (snapshot / "model.safetensors").read_bytes() == (tmp_path / "mixtral" / "model.safetensors").read_bytes()


def test_online_errors_name_the_repository_and_the_cache_serves_when_the_hub_is_down(fake_hub, tmp_path):
    with pytest.raises(ValueError, match=r"model 'test-org/absent' is not a directory, and the hub refused it: "
                                         r".*404"):
        resolve_model_dir("test-org/absent")
    snapshot = resolve_model_dir("test-org/tiny-llama")
    fake_hub.stop()  # online, but the hub cannot be reached: the cached snapshot, as huggingface_hub falls back
    assert resolve_model_dir("test-org/tiny-llama") == snapshot
    with pytest.raises(ValueError, match=r"'test-org/tiny-mixtral' is not a directory and not in the Hugging Face "
                                         r"cache.*the hub could not be reached"):
        resolve_model_dir("test-org/tiny-mixtral")


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
