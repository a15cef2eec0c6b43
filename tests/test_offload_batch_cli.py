"""`moesys generate --prompts IN.jsonl --out OUT.jsonl`: results equal generate_batch's (and each prompt
alone), streamed in finishing order, progress and throughput lines; bad prompt files give one-line errors
naming the line."""

import json
import re
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from moesys.cli import main
from moesys.offload.batch import generate_batch
from tests.test_offload import checkpoints  # noqa: F401  (the fixture: tiny random checkpoints per architecture)
from tests.test_offload_batch import prompts
from tests.test_offload_routing import strong_experts  # noqa: F401  (the fixture: routing decides tokens)


def _write(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def _generate(model_dir, tmp_path, *extra):
    out = tmp_path / "out.jsonl"
    return main(["generate", str(model_dir), "--gpu-memory", "1GiB", "--dtype", "float32", "--cuda-graph", "off",
                 "--max-new-tokens", "4", "--out", str(out), *extra]), out


@pytest.mark.slow
def test_prompts_file_of_token_ids(checkpoints, tmp_path, capsys):
    path = checkpoints["olmoe"]
    ps = prompts((5, 9, 3))
    news = [4, 2, 4]
    src = _write(tmp_path / "in.jsonl", [{"token_ids": ps[0], "id": "a"}, "", {"token_ids": ps[1], "max_new_tokens": 2},
                                          {"token_ids": ps[2], "id": 7}])
    rc, out = _generate(path, tmp_path, "--prompts", str(src), "--batch-size", "2")
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    want = [ref.generate(torch.tensor([p]), max_new_tokens=n, do_sample=False)[0, len(p):].tolist()
            for p, n in zip(ps, news)]
    # prompt 1 (2 tokens) finishes first; its id defaults to its line number (3: the blank line counts)
    assert [(r["id"], r["index"]) for r in lines] == [(3, 1), ("a", 0), (7, 2)]
    assert [r["token_ids"] for r in sorted(lines, key=lambda r: r["index"])] == want
    assert all(r["finish_reason"] == "length" and "text" not in r for r in lines)
    assert not (tmp_path / "out.jsonl.partial").exists()
    assert "3 sequences, 10 tokens" in captured.out and "tok/s at batch size 2" in captured.out
    assert "[moesys] 3/3 sequences" in captured.err  # plain progress lines: stderr is not a terminal


def test_text_prompts_use_the_tokenizer(checkpoints, tmp_path, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(101)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    model_dir = tmp_path / "m"
    shutil.copytree(checkpoints["qwen3_moe"], model_dir)
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0", pad_token="w0").save_pretrained(model_dir)
    src = _write(tmp_path / "in.jsonl", [{"prompt": "w5 w7 w9"}, {"token_ids": [5, 7, 9]}])
    rc, out = _generate(model_dir, tmp_path, "--prompts", str(src), "--batch-size", "auto")
    assert rc == 0, capsys.readouterr().err
    lines = sorted((json.loads(line) for line in out.read_text().splitlines()), key=lambda r: r["index"])
    assert lines[0]["token_ids"] == lines[1]["token_ids"]  # the same prompt, as text and as ids
    assert lines[0]["text"] == " ".join(f"w{i}" for i in lines[0]["token_ids"])


@pytest.mark.parametrize("line, msg", [
    ("{not json", "in.jsonl:2: not valid JSON"),
    ('["a"]', "in.jsonl:2: expected a JSON object"),
    ('{"token_ids": [1], "tokens": 3}', r"in.jsonl:2: unknown key\(s\) \['tokens'\]"),
    ('{"token_ids": [1], "prompt": "x"}', "in.jsonl:2: give exactly one of"),
    ('{"token_ids": [1, -2]}', "in.jsonl:2: \"token_ids\" must be a non-empty list"),
    ('{"token_ids": [1, 500]}', r"in.jsonl:2: token id 500 is outside the vocabulary \(vocab_size=101\)"),
    ('{"token_ids": [1], "max_new_tokens": 0}', "in.jsonl:2: \"max_new_tokens\" must be a positive integer"),
    ('{"prompt": "hello"}', "in.jsonl:2: a text \"prompt\" needs the checkpoint's tokenizer"),
])
def test_bad_prompt_lines_name_the_line(checkpoints, tmp_path, capsys, line, msg):
    src = _write(tmp_path / "in.jsonl", [{"token_ids": [3, 4]}, line])
    rc, out = _generate(checkpoints["olmoe"], tmp_path, "--prompts", str(src))
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert re.search(msg, err), err
    assert not out.exists()


@pytest.mark.parametrize("extra, msg", [(["--batch-size", "0"], "--batch-size '0'"), ([], "needs --out"),
                                        (["--routing", "trace"], "go together"),
                                        (["--batch-graph", "on", "--cuda-graph", "off"], "--cuda-graph off does not build"),
                                        (["--device", "cuda", "--routing", "uniform"], "add --cuda-graph off")])
def test_bad_batch_options(checkpoints, tmp_path, capsys, extra, msg):
    src = _write(tmp_path / "in.jsonl", [{"token_ids": [3, 4]}])
    args = ["generate", str(checkpoints["olmoe"]), "--gpu-memory", "1GiB", "--prompts", str(src), *extra]
    if msg != "needs --out":
        args += ["--out", str(tmp_path / "o.jsonl")]
    assert main(args) == 2
    assert msg in capsys.readouterr().err


@pytest.mark.parametrize("graph", ["auto", "off", "on", "device"])
def test_cli_results_equal_the_python_api(checkpoints, tmp_path, capsys, monkeypatch, graph):
    """--batch-graph on reaches generate_batch(graph=True) (with --cuda-graph on), off graph=False, the default
    graph="auto", --bookkeeping device generate_batch(bookkeeping="device"); tokens are the same."""
    import moesys.offload as mo
    from moesys.offload import batch_cli

    seen = []
    real = batch_cli.generate_batch
    monkeypatch.setattr(batch_cli, "generate_batch",
                        lambda *a, **kw: seen.append((kw["graph"], kw["bookkeeping"])) or real(*a, **kw))
    path = checkpoints["mixtral"]
    ps = prompts((4, 6, 8, 5))
    src = _write(tmp_path / "in.jsonl", [{"token_ids": p} for p in ps])
    extra = {"auto": [], "off": ["--batch-graph", "off"], "on": ["--batch-graph", "on", "--cuda-graph", "on"],
             "device": ["--bookkeeping", "device"]}
    rc, out = _generate(path, tmp_path, "--prompts", str(src), "--batch-size", "3", *extra[graph])
    assert rc == 0, capsys.readouterr().err
    assert seen == [({"on": True, "off": False}.get(graph, "auto"), "device" if graph == "device" else "auto")]
    model = mo.load(path, gpu_memory="1GiB", dtype=torch.float32, cuda_graph=False)
    want = [(r.index, r.token_ids) for r in generate_batch(model, ps, max_new_tokens=4, batch_size=3)]
    assert [(r["index"], r["token_ids"]) for r in map(json.loads, out.read_text().splitlines())] == want


@pytest.mark.slow
def test_routing_options_reach_the_model(strong_experts, tmp_path, capsys):
    """--routing uniform changes the tokens; --routing trace with a trace of the model's own routing (same
    prompts, same schedule) gives the model's tokens back."""
    from moesys.offload.routing import RoutingRecorder

    path = strong_experts
    ps = prompts((6, 4, 7))
    src = _write(tmp_path / "in.jsonl", [{"token_ids": p} for p in ps])
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    rec = RoutingRecorder(model)
    own = [(r.index, r.token_ids) for r in generate_batch(model, ps, max_new_tokens=4, batch_size=2)]
    rec.save(tmp_path / "trace.safetensors")

    def tokens(*extra):
        rc, out = _generate(path, tmp_path, "--prompts", str(src), "--batch-size", "2", *extra)
        assert rc == 0, capsys.readouterr().err
        return [(r["index"], r["token_ids"]) for r in map(json.loads, out.read_text().splitlines())]

    assert tokens() == own
    assert tokens("--routing", "trace", "--routing-trace", str(tmp_path / "trace.safetensors")) == own
    assert tokens("--routing", "uniform", "--routing-seed", "3") != own


def test_results_are_on_disk_as_they_finish(checkpoints, tmp_path, capsys, monkeypatch):
    """Each finished sequence is a whole line in OUT.partial before the next one is computed."""
    from moesys.offload import batch_cli

    seen = []
    update = batch_cli.Progress.update

    def check(self, run):
        seen.append(len((tmp_path / "out.jsonl.partial").read_text().splitlines()))
        update(self, run)

    monkeypatch.setattr(batch_cli.Progress, "update", check)
    src = _write(tmp_path / "in.jsonl", [{"token_ids": p, "max_new_tokens": n}
                                         for p, n in zip(prompts((3, 4, 5)), (1, 3, 2))])
    rc, out = _generate(checkpoints["olmoe"], tmp_path, "--prompts", str(src), "--batch-size", "1")
    assert rc == 0, capsys.readouterr().err
    assert seen == [1, 2, 3] and len(out.read_text().splitlines()) == 3


def test_kv_placement_options(checkpoints, tmp_path, capsys):
    """--kv host gives the device path's tokens; --batch-size auto --kv auto asks the performance model
    (before loading) and says what it chose; a device KV cache raises max_context to what the batch needs."""
    path = checkpoints["olmoe"]
    ps = prompts((4, 6, 8))
    src = _write(tmp_path / "in.jsonl", [{"token_ids": p} for p in ps])

    def tokens(*extra):
        rc, out = _generate(path, tmp_path, "--prompts", str(src), *extra)
        captured = capsys.readouterr()
        assert rc == 0, captured.err
        return sorted((r["index"], r["token_ids"]) for r in map(json.loads, out.read_text().splitlines())), captured

    device, _ = tokens("--batch-size", "3", "--max-context", "16")  # raised to 3 x 12 for the batch
    host, captured = tokens("--batch-size", "3", "--kv", "host", "--max-context", "16")
    assert host == device and "KV cache on the host" in captured.out
    auto, captured = tokens("--batch-size", "auto", "--kv", "auto")
    assert auto == device and "[moesys] performance model: batch size" in captured.err


@pytest.mark.parametrize("arch", ["olmoe", "gpt_oss"])
def test_max_context_leaves_the_decode_graph_room_for_a_joining_prompt(tmp_path, arch):
    """Where the batch's decode graph may run (--batch-graph on, or auto on a GPU, with the CUDA-graph step and a
    full-attention-only model), the max_context the CLI loads with holds the batch's rows and the longest prompt
    beside them (a joining group's prefill cache lives beside the fixed-shape rows until it is copied in); the
    eager steps need the rows alone, and so does a model whose cache the graph's batch cannot hold (GPT-OSS's
    sliding windows)."""
    import argparse

    from moesys.offload.batch import Request
    from moesys.offload.batch_cli import choose_batch
    from moesys.offload.cache_bytes import measure
    from moesys.offload.cli import add_arguments, resolve_cuda_graph
    from tests.test_offload_cache_bytes import config_of

    config = config_of(arch)
    requests = [Request(token_ids=p, id=i) for i, p in enumerate(prompts((5, 9, 3)))]
    rows = measure(config, torch.float32).context_for(3, 9 + 4)

    def chosen(device, *extra):
        parser = argparse.ArgumentParser()
        add_arguments(parser)
        args = parser.parse_args([str(tmp_path), "--prompts", "p.jsonl", "--out", "o.jsonl", "--batch-size", "3",
                                  "--max-context", "16", "--max-new-tokens", "4", "--gpu-memory", "1GiB", *extra])
        resolve_cuda_graph(args)  # as `moesys generate` does before choosing
        return choose_batch(args, config, torch.float32, requests, torch.device(device))[2]

    graph = rows + 9 if arch == "olmoe" else rows
    assert rows > 16 and chosen("cuda") == graph and chosen("cpu", "--batch-graph", "on") == graph
    assert chosen("cpu") == rows and chosen("cuda", "--batch-graph", "off") == rows
    assert chosen("cuda", "--cuda-graph", "off") == rows and chosen("cuda", "--exact") == rows
