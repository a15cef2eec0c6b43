"""A small decoder-only MoE transformer, single-device (parallelism is applied from outside).

Spec, one screen:
- tokens -> embedding [B, S, H] -> L blocks -> RMSNorm -> lm_head (optionally tied to the embedding);
- block: h = x + Attn(RMSNorm(x)); out = h + FFN(RMSNorm(h)), where FFN is an `MoELayer` on the
  layers `MoEConfig.is_moe_layer` picks (sparse step `every`, `first_dense` leading dense layers) and a
  dense gated MLP elsewhere;
- attention: grouped-query (num_kv_heads <= num_heads), optional q/k/v and output biases, RoPE in
  the rotate-half convention of transformers' Llama/Mixtral/Qwen (so exported weights give the same
  logits) with optional "linear"/"llama3" frequency scaling, optional RMSNorm on queries and keys
  per head (Qwen3) or over all heads before the split (OLMoE), causal `scaled_dot_product_attention`,
  limited to a sliding window on the layers configured for one (Mistral/Qwen2);
- the forward returns logits, the mean next-token cross-entropy when labels are given, and the MoE
  auxiliary loss (coefficients from MoEConfig, summed over MoE layers) plus each layer's MoEStats.

Legend: B batch, S sequence, H hidden, N heads, G kv heads, D head dim, V vocab.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from moesys.config import Config, ModelConfig, MoEConfig, RopeScalingConfig
from moesys.layers.experts import DenseMLP
from moesys.layers.moe import MoELayer, MoEStats


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScalingConfig | None = None) -> torch.Tensor:
    """RoPE's inverse frequencies [D/2], fp32, as transformers computes them for rope_type "default",
    "linear" (all divided by the factor) and "llama3" (long wavelengths divided by the factor, short
    ones kept, the band between interpolated)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    if scaling is None or scaling.rope_type == "default":
        return inv_freq
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor
    factor, low, high = scaling.factor, scaling.low_freq_factor, scaling.high_freq_factor
    old_len = scaling.original_max_position_embeddings
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
    return torch.where(medium, smoothed, scaled)


def rope_cos_sin(positions_S: torch.Tensor, head_dim: int, theta: float, inv_freq: torch.Tensor | None = None):
    if inv_freq is None:
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions_S.device, dtype=torch.float32) / head_dim))
    angles_SD = torch.outer(positions_S.float(), inv_freq).repeat(1, 2)
    return angles_SD.cos(), angles_SD.sin()


def window_mask(positions_S: torch.Tensor, window: int) -> torch.Tensor:
    """[S, S] bool, True where query i may attend to key j: causal and fewer than `window` positions back
    (transformers' sliding-window mask)."""
    q_S1, k_1S = positions_S[:, None], positions_S[None, :]
    return (k_1S <= q_S1) & (k_1S > q_S1 - window)


def apply_rope(x_BNSD: torch.Tensor, cos_SD: torch.Tensor, sin_SD: torch.Tensor) -> torch.Tensor:
    x1, x2 = x_BNSD.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (x_BNSD.float() * cos_SD + rotated.float() * sin_SD).to(x_BNSD.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int = 0):
        super().__init__()
        self.num_heads, self.num_kv_heads = cfg.num_heads, cfg.num_kv_heads
        self.head_dim = cfg.head_dim or cfg.hidden_size // cfg.num_heads
        self.rope_theta = cfg.rope_theta
        self.q_proj = nn.Linear(cfg.hidden_size, self.num_heads * self.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, cfg.hidden_size, bias=cfg.o_bias)
        self.norm_all_heads = cfg.qk_norm and cfg.qk_norm_span == "all"
        q_norm_dim = self.num_heads * self.head_dim if self.norm_all_heads else self.head_dim
        k_norm_dim = self.num_kv_heads * self.head_dim if self.norm_all_heads else self.head_dim
        self.q_norm = RMSNorm(q_norm_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(k_norm_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.window = cfg.sliding_window if cfg.uses_window(layer) else None
        # None keeps the default frequencies computed in rope_cos_sin (the path every run took before
        # RoPE scaling existed); a scaled RoPE precomputes its frequencies once
        inv_freq = None
        if cfg.rope_scaling.rope_type != "default":  # a buffer, so model.to() moves it; not saved
            inv_freq = rope_inv_freq(self.head_dim, cfg.rope_theta, cfg.rope_scaling)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, x_BSH: torch.Tensor, positions_S: torch.Tensor) -> torch.Tensor:
        B, S, _ = x_BSH.shape
        q_BSX, k_BSX = self.q_proj(x_BSH), self.k_proj(x_BSH)
        if self.norm_all_heads:  # OLMoE: one norm over all heads' features, before the head split
            q_BSX, k_BSX = self.q_norm(q_BSX), self.k_norm(k_BSX)
        q_BNSD = q_BSX.view(B, S, self.num_heads, self.head_dim).transpose(1, 2)
        k_BGSD = k_BSX.view(B, S, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v_BGSD = self.v_proj(x_BSH).view(B, S, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None and not self.norm_all_heads:
            q_BNSD, k_BGSD = self.q_norm(q_BNSD), self.k_norm(k_BGSD)
        cos_SD, sin_SD = rope_cos_sin(positions_S, self.head_dim, self.rope_theta, self.inv_freq)
        q_BNSD, k_BGSD = apply_rope(q_BNSD, cos_SD, sin_SD), apply_rope(k_BGSD, cos_SD, sin_SD)
        gqa = self.num_kv_heads != self.num_heads
        if self.window is None:
            out_BNSD = F.scaled_dot_product_attention(q_BNSD, k_BGSD, v_BGSD, is_causal=True, enable_gqa=gqa)
        else:
            out_BNSD = F.scaled_dot_product_attention(q_BNSD, k_BGSD, v_BGSD, enable_gqa=gqa,
                                                      attn_mask=window_mask(positions_S, self.window))
        return self.o_proj(out_BNSD.transpose(1, 2).reshape(B, S, -1))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, moe: MoEConfig, layer: int):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.attn = Attention(cfg, layer)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.is_moe = moe.is_moe_layer(layer)
        if self.is_moe:
            r = moe.router
            self.ffn = MoELayer(cfg.hidden_size, moe.num_experts, moe.top_k, moe.ffn_size,
                                activation=moe.activation, expert_bias=moe.expert_bias,
                                shared_ffn_size=moe.shared_ffn_size, shared_gate=moe.shared_gate,
                                backend=moe.backend, init_std=cfg.init_std, score_func=r.score_func,
                                renormalize=r.renormalize, n_groups=r.n_groups, topk_groups=r.topk_groups,
                                aux_free_bias=r.aux_free_bias, bias_update_rate=r.bias_update_rate,
                                scale=r.scale, jitter=r.jitter, capacity_factor=moe.capacity_factor)
        else:
            self.ffn = DenseMLP(cfg.hidden_size, cfg.ffn_size, activation=moe.activation)

    def forward(self, x_BSH: torch.Tensor, positions_S: torch.Tensor) -> tuple[torch.Tensor, MoEStats | None]:
        h_BSH = x_BSH + self.attn(self.attn_norm(x_BSH), positions_S)
        if self.is_moe:
            ffn_BSH, stats = self.ffn(self.ffn_norm(h_BSH))
        else:
            ffn_BSH, stats = self.ffn(self.ffn_norm(h_BSH)), None
        return h_BSH + ffn_BSH, stats


@dataclass
class TransformerOutput:
    logits: torch.Tensor | None          # [B, S, V] fp32 (None when the call asked for the loss only)
    loss: torch.Tensor | None            # next-token cross-entropy (None without labels)
    aux_loss: torch.Tensor               # weighted MoE losses summed over MoE layers
    moe_stats: list[MoEStats] = field(default_factory=list)  # one per MoE layer, in layer order


class MoETransformer(nn.Module):
    def __init__(self, model: ModelConfig, moe: MoEConfig):
        super().__init__()
        self.model_config, self.moe_config = model, moe
        self.embed = nn.Embedding(model.vocab_size, model.hidden_size)
        self.blocks = nn.ModuleList(Block(model, moe, i) for i in range(model.num_layers))
        self.norm = RMSNorm(model.hidden_size, model.norm_eps)
        self.lm_head = nn.Linear(model.hidden_size, model.vocab_size, bias=False)
        self._init_weights(model.init_std)
        if model.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    @classmethod
    def from_config(cls, config: Config) -> "MoETransformer":
        return cls(config.model, config.moe)

    def _init_weights(self, std: float) -> None:
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)

    def moe_layers(self) -> list[MoELayer]:
        return [b.ffn for b in self.blocks if b.is_moe]

    def forward(self, input_ids_BS: torch.Tensor, labels_BS: torch.Tensor | None = None,
                positions_S: torch.Tensor | None = None, return_logits: bool = True) -> TransformerOutput:
        """`return_logits=False` (with labels; the trainer's call) returns the loss without the [B, S, V]
        fp32 logits, so the compiled head never writes them out (16384 x 32000 fp32 = 2 GB per step)."""
        if positions_S is None:
            positions_S = torch.arange(input_ids_BS.shape[1], device=input_ids_BS.device)
        x_BSH = self.embed(input_ids_BS)
        stats: list[MoEStats] = []
        for block in self.blocks:
            x_BSH, layer_stats = block(x_BSH, positions_S)
            if layer_stats is not None:
                stats.append(layer_stats)
        logits_BSV, loss = self._head(x_BSH, labels_BS, return_logits or labels_BS is None)
        m = self.moe_config
        aux = sum((s.weighted_loss(m.aux_loss_coef, m.seq_aux_loss_coef, m.z_loss_coef) for s in stats),
                  x_BSH.new_zeros((), dtype=torch.float32))
        return TransformerOutput(logits_BSV, loss, aux, stats)

    def _head(self, x_BSH: torch.Tensor, labels_BS: torch.Tensor | None, return_logits: bool = True):
        """Final norm, fp32 logits (or None) and the mean next-token cross-entropy (None without labels)."""
        logits_BSV = self.lm_head(self.norm(x_BSH)).float()
        loss = None
        if labels_BS is not None:
            loss = F.cross_entropy(logits_BSV.flatten(0, 1), labels_BS.flatten(), ignore_index=-100)
        return (logits_BSV if return_logits else None), loss

    def compile_parts(self, mode: str = "default", scope: str = "blocks") -> None:
        """torch.compile each block and the head (norm, logits, loss), in place: one compiled graph serves
        every layer, and the trainer's Python loop stays eager. scope="model" compiles the whole forward
        as one graph instead."""
        if scope == "model":
            self.compile(mode=mode)
            return
        for block in self.blocks:
            block.compile(mode=mode)
        self._head = torch.compile(self._head, mode=mode)

    def num_params(self, active: bool = False) -> int:
        """Total parameters, or those a token touches (top_k of num_experts routed experts per MoE layer)."""
        total = sum(p.numel() for p in self.parameters())
        if not active:
            return total
        m = self.moe_config
        for layer in self.moe_layers():
            expert_params = sum(p.numel() for p in layer.experts.parameters())
            total -= expert_params - expert_params * m.top_k // m.num_experts
        return total
