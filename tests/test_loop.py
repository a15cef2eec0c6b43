"""The whole loop on a tiny Llama, as launch/upcycle_train_export.sh runs it (CPU, 2 gloo processes):
upcycle -> train with init_from at ep=2 -> export -> offloaded generation. Checked against the dense
model (step-1 loss on the same batch), itself (the loss falls) and plain transformers (the exported
model's greedy tokens under moesys.offload.load)."""

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from tests._train_helpers import QUIET, REPO, env, metrics


def _dense_llama(path):
    import transformers as T
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
    config = T.LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                           rope_parameters=rope, bos_token_id=None, eos_token_id=None)
    torch.manual_seed(0)
    model = T.LlamaForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.1 * torch.randn_like(p))
    model.save_pretrained(path)
    return model.eval()


def _dense_loss_on_step1_batch(dense, run_dir, world):
    """The dense model's mean cross-entropy on the sequences every rank trained on at step 1."""
    from moesys.config import load_config
    from moesys.data import build_data
    config = load_config(run_dir / "config.yaml")
    losses = []
    for rank in range(world):
        splits, sampler = build_data(config, rank, world)
        for micro in sampler.next_step():
            input_ids, labels = splits.sequences(micro)
            with torch.no_grad():
                logits = dense(input_ids).logits
            losses.append(F.cross_entropy(logits.flatten(0, 1), labels.flatten()))
    return torch.stack(losses).mean().item()


@pytest.mark.slow
def test_upcycle_train_ep2_export_generate(tmp_path):
    from transformers import AutoModelForCausalLM

    import moesys.offload as mo
    dense = _dense_llama(tmp_path / "dense")
    work = tmp_path / "work"
    items = [*QUIET, "train.steps=4", "log.every=1", "log.val_every=0", "data.batch_size=4", "train.lr=3e-3",
             "train.warmup_steps=1"]
    cmd = ["bash", str(REPO / "launch" / "upcycle_train_export.sh"), str(tmp_path / "dense"), str(work)]
    for item in items:
        cmd += ["--set", item]
    e = {**env(), "PYTHON": sys.executable, "NPROC": "2", "EP": "2", "NUM_EXPERTS": "4", "TOP_K": "2",
         "GPU_MEMORY": "1GiB", "MAX_NEW_TOKENS": "6", "PROMPT": "import os"}
    proc = subprocess.run(cmd, env=e, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]

    losses = [r["loss"] for r in metrics(work / "run")]
    assert len(losses) == 4
    # upcycling preserves the function and step 1's loss is taken before any update
    assert losses[0] == pytest.approx(_dense_loss_on_step1_batch(dense, work / "run", 2), rel=1e-5)
    assert losses[-1] < losses[0]

    out = work / "hf"
    assert (out / "tokenizer.json").is_file()  # byte-level run: a byte tokenizer
    prompt = torch.tensor([list(b"import os\n")])
    ref = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    want = ref.generate(prompt, max_new_tokens=8, do_sample=False)
    offloaded = mo.load(out, gpu_memory="1GiB", dtype=torch.float32, device="cpu")
    got = offloaded.generate(prompt, max_new_tokens=8, do_sample=False)
    assert torch.equal(got, want)
    assert proc.stdout.strip()  # moesys generate printed the continuation
