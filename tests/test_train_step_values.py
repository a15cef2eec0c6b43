"""Checks the packed step statistics against hand-written values: each named field lands in its own part
of the one packed tensor, and the host reads back the loss, aux loss, SIGTERM flag and gradient norm
(as means over micro-batches x ranks) under their own names."""

from types import SimpleNamespace

import pytest
import torch

from moesys.train_step_values import PendingStepValues, StepStats, TrainingStopped


def _out(loss, aux, dropped_L, load_LE):
    stats = [SimpleNamespace(dropped_fraction=torch.tensor(d), tokens_per_expert=torch.tensor(row))
             for d, row in zip(dropped_L, load_LE)]
    return SimpleNamespace(loss=torch.tensor(loss), aux_loss=torch.tensor(aux), moe_stats=stats)


def _two_micro_batches() -> StepStats:
    stats = StepStats(num_layers=2, num_experts=3, device=torch.device("cpu"))
    stats.add_micro_batch(_out(2.0, 0.5, [0.25, 0.0], [[1, 2, 3], [4, 5, 6]]))
    stats.add_micro_batch(_out(4.0, 1.5, [0.75, 0.5], [[10, 20, 30], [40, 50, 60]]))
    stats.set_sigterm(True)
    return stats


def test_fields_are_disjoint_parts_of_the_packed_tensor():
    stats = _two_micro_batches()
    assert stats.packed.tolist() == [6.0, 2.0, 1.0, 1.0, 0.5, 11, 22, 33, 44, 55, 66]
    assert stats.load_LE.tolist() == [[11, 22, 33], [44, 55, 66]] and stats.dropped_L.tolist() == [1.0, 0.5]
    stats.packed.mul_(2)  # what the all-reduce does, in place: the named views see it
    assert stats.loss_sum.item() == 12.0 and stats.load_LE[1, 2].item() == 132


def test_the_host_reads_each_value_under_its_name():
    pending = PendingStepValues(divisor=2)
    pending.push(7, _two_micro_batches(), torch.tensor(0.125))
    pending.read_through(7, None)
    assert pending.sigterm and tuple(pending.latest) == (7, 3.0, 1.0, 0.125)


def test_a_non_finite_gradient_norm_is_named():
    pending = PendingStepValues(divisor=2)
    pending.push(3, _two_micro_batches(), torch.tensor(float("inf")))
    with pytest.raises(TrainingStopped, match="non-finite gradient norm .* at step 3"):
        pending.read_through(3, None)
