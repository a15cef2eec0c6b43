"""moesys.hf: start training from Hugging Face MoE checkpoints and write them back.

- `families`: config.json -> the moesys model config (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE), refusals;
- `resolve`: `model.init_from` folded into a run's config (shape from config.json, tokenizer default);
- `names`: the templated tensor-name map between moesys checkpoint names and HF on-disk names;
- `load`: checks a checkpoint's tensor names and shapes, then reads only what this rank owns;
- `tokenizer`: the run's tokenizer for export, including a byte-level one for byte runs.
"""
