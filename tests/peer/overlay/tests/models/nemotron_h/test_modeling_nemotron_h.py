"""Glue (moesys peer harness): transformers 5.25's ModelTesterMixin on a tiny Nemotron-H model.

Nemotron-H has one block kind per layer, so the smallest pattern holding all three is 3 layers: Mamba-2,
MoE (non-gated relu2 experts + a shared expert), attention ("ME*"). The Mamba-2 mixer runs its slow
PyTorch path on CPU."""

import unittest

from transformers import NemotronHConfig, NemotronHForCausalLM, NemotronHModel

from ...moe_tester import MoEModelTester
from ...test_modeling_common import ModelTesterMixin


class NemotronHModelTest(ModelTesterMixin, unittest.TestCase):
    all_model_classes = (NemotronHModel, NemotronHForCausalLM)

    def setUp(self):
        self.model_tester = MoEModelTester(self, NemotronHConfig, dict(layers_block_type=['linear_attention','moe','full_attention'],n_routed_experts=8,num_experts_per_tok=2,moe_intermediate_size=16,moe_shared_expert_intermediate_size=32,head_dim=16,mamba_num_heads=8,mamba_head_dim=8,n_groups=1,ssm_state_size=16,chunk_size=16,n_group=1,topk_group=1), num_hidden_layers=3)
