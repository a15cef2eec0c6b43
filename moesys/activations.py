"""Expert activations: what `moe_mlp` applies between its two projections, as a spec (`Activation`) and by name.

An activation maps a routed row's gate/up projection h to the down projection's input a:
  plain (non-gated):  h is [I],  a = f(h)
  gated (GLU):        h is [2I], a = f(min(gate, limit)) * (clamp(up, -limit, limit) + up_shift)
                      with gate, up = h[:I], h[I:] (concatenated, transformers v5's layout) or
                      h[0::2], h[1::2] (interleaved, GPT-OSS's); no clamp when limit is None.
f is one of FUNCTIONS; "silu" takes `alpha`: f(x) = x * sigmoid(alpha * x) (alpha = 1.702 is quick GELU).
GPT-OSS's clamped SwiGLU is `clamped_swiglu()`: silu, alpha 1.702, limit 7, up_shift 1, interleaved.

Names (`ACTIVATIONS`): "silu" and "gelu_tanh" are gated, "gelu" and "relu" plain (moe_mlp's historical
names); every function also as "gated_<f>" and "plain_<f>" (e.g. "gated_gelu", "plain_silu", "gated_relu2").
The Triton kernels get an activation as `Activation.key`, a string `from_key` reads back.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

FUNCTIONS = ("silu", "gelu_tanh", "gelu", "relu", "relu2", "sigmoid", "mish")


@dataclass(frozen=True)
class Activation:
    fn: str
    gated: bool
    alpha: float = 1.0
    limit: float | None = None
    up_shift: float = 0.0
    interleaved: bool = False
    key: str = field(init=False, compare=False, repr=False)

    def __post_init__(self):
        if self.fn not in FUNCTIONS:
            raise ValueError(f"Activation: fn={self.fn!r} is unknown; use one of {list(FUNCTIONS)}")
        if self.alpha != 1.0 and self.fn != "silu":
            raise ValueError(f"Activation: alpha={self.alpha} applies to fn='silu' only, not {self.fn!r}")
        if not self.gated and (self.limit is not None or self.up_shift != 0.0 or self.interleaved):
            raise ValueError("Activation: limit, up_shift and interleaved describe a gated activation's two halves; "
                             "set gated=True or leave them at None, 0.0 and False")
        if self.limit is not None and not self.limit > 0:
            raise ValueError(f"Activation: limit={self.limit} must be positive (or None for no clamp)")
        # Computed once here: the kernels' custom ops take it, and torch.compile then reads a constant.
        key = (f"{self.fn}|{int(self.gated)}|{self.alpha!r}|{self.limit!r}|{self.up_shift!r}|"
               f"{int(self.interleaved)}")
        object.__setattr__(self, "key", key)

    @classmethod
    def from_key(cls, key: str) -> Activation:
        fn, gated, alpha, limit, up_shift, interleaved = key.split("|")
        return cls(fn, gated == "1", float(alpha), None if limit == "None" else float(limit), float(up_shift),
                   interleaved == "1")


def clamped_swiglu(alpha: float = 1.702, limit: float = 7.0, up_shift: float = 1.0,
                   interleaved: bool = True) -> Activation:
    """GPT-OSS's clamped SwiGLU (transformers' GptOssExperts._apply_gate): gate = min(gate, limit),
    up = clamp(up, -limit, limit), a = (up + 1) * gate * sigmoid(alpha * gate), gate/up interleaved."""
    return Activation("silu", True, alpha=alpha, limit=limit, up_shift=up_shift, interleaved=interleaved)


def _names() -> dict[str, Activation]:
    table = {"silu": Activation("silu", True), "gelu_tanh": Activation("gelu_tanh", True),
             "gelu": Activation("gelu", False), "relu": Activation("relu", False)}
    for gated in (True, False):
        prefix = "gated_" if gated else "plain_"
        for fn in FUNCTIONS:
            table[prefix + fn] = Activation(fn, gated)
        table[prefix + "quick_gelu"] = Activation("silu", gated, alpha=1.702)
    return table


ACTIVATIONS: dict[str, Activation] = _names()


def resolve_activation(activation: str | Activation) -> Activation:
    """The spec of a name in ACTIVATIONS, a key, or an Activation (returned as is)."""
    if isinstance(activation, Activation):
        return activation
    if not isinstance(activation, str):
        raise TypeError(f"activation must be a name or a moesys.activations.Activation, got {type(activation).__name__}")
    spec = ACTIVATIONS.get(activation)
    if spec is not None:
        return spec
    if activation.count("|") == 5:
        try:
            return Activation.from_key(activation)
        except ValueError:
            pass
    raise ValueError(f"activation={activation!r} is not supported; use one of {sorted(ACTIVATIONS)} "
                     "or a moesys.activations.Activation")


def is_gated(activation: str | Activation) -> bool:
    return resolve_activation(activation).gated


def elementwise(x: torch.Tensor, fn: str, alpha: float = 1.0) -> torch.Tensor:
    """f(x) for one of FUNCTIONS."""
    if fn == "silu":
        # transformers writes the alpha form as gate * sigmoid(gate * alpha) (GPT-OSS): the same order here
        return F.silu(x) if alpha == 1.0 else x * torch.sigmoid(x * alpha)
    if fn == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    if fn == "gelu":
        return F.gelu(x)
    if fn == "relu":
        return F.relu(x)
    if fn == "relu2":
        return torch.square(F.relu(x))
    if fn == "sigmoid":
        return torch.sigmoid(x)
    return F.mish(x)


def activation_fn(activation: str | Activation):
    """x -> f(x), the elementwise function of an activation (without its gating)."""
    spec = resolve_activation(activation)
    return lambda x: elementwise(x, spec.fn, spec.alpha)


def split_gate_up(h_NF: torch.Tensor, activation: str | Activation) -> tuple[torch.Tensor, torch.Tensor]:
    """The gate and up halves of a gated activation's input (views, no copy)."""
    if resolve_activation(activation).interleaved:
        return h_NF[..., 0::2], h_NF[..., 1::2]
    gate, up = h_NF.chunk(2, dim=-1)
    return gate, up


def apply_activation(h_NF: torch.Tensor, activation: str | Activation) -> torch.Tensor:
    """h_NF holds the gate and up columns for gated activations (F = 2I), the up projection otherwise (F = I)."""
    spec = resolve_activation(activation)
    if not spec.gated:
        return elementwise(h_NF, spec.fn, spec.alpha)
    gate, up = split_gate_up(h_NF, spec)
    if spec.limit is not None:
        gate = gate.clamp(min=None, max=spec.limit)
        up = up.clamp(min=-spec.limit, max=spec.limit)
    if spec.up_shift != 0.0:
        up = up + spec.up_shift
    return elementwise(gate, spec.fn, spec.alpha) * up
