"""`model.hf_model: DIR`: transformers' own causal-LM class, trained by moesys' trainer.

`HFCausalLM` wraps the `AutoModelForCausalLM` built from a transformers v5 checkpoint (safetensors
only, never remote code) and gives the trainer the interface of `MoETransformer`:
- `forward(input_ids, labels, return_logits=False)` -> `TransformerOutput` (loss = mean next-token
  cross-entropy over the model's own logits; labels are already shifted, as the data pipeline makes them);
- `moe_layers()`: one `HFMoESite` per MoE block, whose `router.update_bias(load_E)` is the
  aux-loss-free step on the block's `e_score_correction_bias` (DeepSeek-V3, GLM-4-MoE, ...) when
  `moe.router.aux_free_bias` is on, else nothing (transformers keeps that bias frozen too).
Every experts module of transformers' experts interface is replaced, once at load, by a moesys
`Experts` holding the same weights in moe_mlp's layout (`hf_experts_layout`), so the experts compute
through `moe_mlp` and `moesys.parallel.parallelize` can shard them like the moesys model's (it finds
them as the `experts` child of their MoE block). Everything else (attention, routing, shared experts,
norms) is transformers' code, unchanged: the architecture decides speed only.

The auxiliary loss is the class's own load-balancing loss (transformers' `aux_loss` output, computed
when the forward takes `output_router_logits`) times `moe.aux_loss_coef`; classes without one get 0.
Each MoE block's load (`MoEStats.tokens_per_expert`) is counted from the expert ids its experts
module receives (a forward pre-hook, attached to whichever module sits at `experts` at that time).

Legend: B batch, S sequence, V vocab, E experts, K top-k.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn as nn
import torch.nn.functional as F

from moesys.layers.moe import MoEStats
from moesys.layers.router import aux_free_bias_step
from moesys.models.hf_experts_layout import ExpertsLayout, find_hf_experts, moesys_experts
from moesys.models.transformer import TransformerOutput

BIAS_BUFFER = "e_score_correction_bias"


class HFRouterBias:
    """The trainer's `layer.router` for an HF MoE block: the aux-loss-free selection-bias update on
    the block's buffer `bias_name` (looked up per call: moving the model replaces buffer tensors)."""

    def __init__(self, holder: nn.Module, bias_name: str | None, enabled: bool, rate: float):
        self.holder, self.bias_name, self.enabled, self.rate = holder, bias_name, enabled, rate

    def update_bias(self, load_E: torch.Tensor) -> None:
        if self.enabled:
            aux_free_bias_step(self.holder.get_buffer(self.bias_name), load_E.float(), self.rate)


class HFMoESite:
    """One MoE block of the HF model: its name, the block, its router view and its load counter."""

    def __init__(self, name: str, holder: nn.Module, num_experts: int, router: HFRouterBias):
        self.name, self.holder, self.num_experts, self.router = name, holder, num_experts, router
        self._hooked: nn.Module | None = None
        self._handle = None
        self.counts_E: torch.Tensor | None = None

    @property
    def experts(self) -> nn.Module:
        return self.holder.experts

    def start_forward(self) -> None:
        """Reset the counter and make sure the module now at `holder.experts` reports to it (parallelize
        may have replaced the module since the last forward)."""
        self.counts_E = None
        if self._hooked is not self.holder.experts:
            if self._handle is not None:
                self._handle.remove()
            self._hooked = self.holder.experts
            self._handle = self._hooked.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kwargs):
        ids_TK = args[1] if len(args) > 1 else next(
            (kwargs[k] for k in ("top_k_index", "router_indices", "topk_ids_TK") if k in kwargs), None)
        if ids_TK is None:
            raise ValueError(f"{self.name}.experts was called without expert ids in its second argument; "
                             "moesys cannot count this block's load")
        # A compare-and-sum, as the moesys router counts (no contended scatter).
        counts_E = (ids_TK.reshape(-1, 1) == torch.arange(self.num_experts, device=ids_TK.device)).sum(0)
        self.counts_E = counts_E if self.counts_E is None else self.counts_E + counts_E

    def take_counts(self, device) -> torch.Tensor:
        if self.counts_E is None:
            raise RuntimeError(f"{self.name}: its experts were not called in this forward")
        counts, self.counts_E = self.counts_E, None
        return counts.to(device)


class HFCausalLM(nn.Module):
    """A transformers causal LM with moesys experts, behind `MoETransformer`'s training interface."""

    def __init__(self, hf: nn.Module, *, backend: str = "auto", aux_loss_coef: float = 0.0,
                 aux_free_bias: bool = False, bias_update_rate: float = 1e-3):
        super().__init__()
        self.hf = hf
        self.aux_loss_coef = aux_loss_coef
        self._hf_aux = "output_router_logits" in inspect.signature(hf.forward).parameters
        self.layouts: dict[str, ExpertsLayout] = {}   # holder name (inside `hf`) -> the source's layout
        sites = []
        for holder_name, holder, module in find_hf_experts(hf):
            experts, layout = moesys_experts(module, backend)
            holder.experts = experts
            self.layouts[holder_name] = layout
            bias = _find_buffer(holder, BIAS_BUFFER)
            if aux_free_bias and bias is None:
                raise ValueError(f"moe.router.aux_free_bias=true, but the MoE block {holder_name} "
                                 f"({type(holder).__name__}) has no {BIAS_BUFFER} to update; set it to false")
            sites.append(HFMoESite(f"hf.{holder_name}", holder, experts.num_experts,
                                   HFRouterBias(holder, bias, aux_free_bias, bias_update_rate)))
        if not sites:
            raise ValueError(f"hf_model: {type(hf).__name__} has no experts module of transformers' experts "
                             "interface, so it is not an MoE model moesys can train this way")
        self._sites = sites

    @property
    def config(self):
        return self.hf.config

    @property
    def embed(self) -> nn.Embedding:
        return self.hf.get_input_embeddings()

    @property
    def blocks(self) -> nn.ModuleList:
        """The decoder layers (the trainer's activation checkpointing wraps each one's forward)."""
        return decoder_layers(self.hf)

    def moe_layers(self) -> list[HFMoESite]:
        return list(self._sites)

    def forward(self, input_ids_BS: torch.Tensor, labels_BS: torch.Tensor | None = None,
                positions_S: torch.Tensor | None = None, return_logits: bool = True) -> TransformerOutput:
        for site in self._sites:
            site.start_forward()
        kwargs = {"use_cache": False}
        if positions_S is not None:
            kwargs["position_ids"] = positions_S.unsqueeze(0).expand(input_ids_BS.shape[0], -1)
        want_aux = self._hf_aux and self.aux_loss_coef != 0
        if want_aux:
            kwargs["output_router_logits"] = True
        out = self.hf(input_ids=input_ids_BS, **kwargs)
        logits_BSV = out.logits.float()
        loss = None
        if labels_BS is not None:
            loss = F.cross_entropy(logits_BSV.flatten(0, 1), labels_BS.flatten(), ignore_index=-100)
        zero = logits_BSV.new_zeros((), dtype=torch.float32)
        aux = zero
        if want_aux and getattr(out, "aux_loss", None) is not None:
            aux = self.aux_loss_coef * out.aux_loss.float()
        stats = [MoEStats(zero, zero, zero, s.take_counts(input_ids_BS.device), zero) for s in self._sites]
        return TransformerOutput(logits_BSV if return_logits or labels_BS is None else None, loss, aux, stats)

    def compile_parts(self, mode: str = "default", scope: str = "blocks") -> None:
        """torch.compile in place, as `MoETransformer.compile_parts`: scope="blocks" compiles each decoder
        layer (the embedding, final norm, head and loss stay eager); scope="model" the whole transformers
        forward. Not fullgraph: transformers' layers may graph-break (mask and cache helpers), and
        the experts' load hook runs eagerly at the break it makes."""
        if scope == "model":
            self.hf.compile(mode=mode)
            return
        for layer in decoder_layers(self.hf):
            layer.compile(mode=mode)

    def num_params(self, active: bool = False) -> int:
        """Total parameters, or those a token touches (top_k of E routed experts per MoE block)."""
        total = sum(p.numel() for p in self.parameters())
        if not active:
            return total
        top_k = self.config.num_experts_per_tok
        for site in self._sites:
            expert_params = sum(p.numel() for p in site.experts.parameters())
            total -= expert_params - expert_params * top_k // site.num_experts
        return total


def decoder_layers(hf: nn.Module) -> nn.ModuleList:
    layers = getattr(hf.base_model, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"{type(hf).__name__} keeps no decoder layers at base_model.layers; "
                         "train.activation_checkpointing needs them")
    return layers


def _find_buffer(module: nn.Module, name: str) -> str | None:
    """The path (inside `module`) of its first buffer called `name`, or None."""
    return next((path for path, _ in module.named_buffers() if path.rpartition(".")[2] == name), None)
