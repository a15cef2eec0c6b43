"""MoE building blocks: Router, Experts, DenseMLP, MoELayer."""

from moesys.layers.experts import DenseMLP, Experts
from moesys.layers.moe import MoELayer, MoEStats
from moesys.layers.router import Router, RouterOutput

__all__ = ["DenseMLP", "Experts", "MoELayer", "MoEStats", "Router", "RouterOutput"]
