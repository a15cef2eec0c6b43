"""Glue (moesys peer harness): transformers 5.25's ModelTesterMixin on a tiny Jamba model.

2 layers: a Mamba layer then an attention layer (attn_layer_period 2, offset 1), both with a sparse MoE
feed-forward (expert_layer_period 1, offset 0) so the experts run after both mixer kinds. The Mamba mixer
runs its slow PyTorch path on CPU."""

import unittest

from transformers import JambaConfig, JambaForCausalLM, JambaModel

from ...moe_tester import MoEModelTester
from ...test_modeling_common import ModelTesterMixin


class JambaModelTest(ModelTesterMixin, unittest.TestCase):
    all_model_classes = (JambaModel, JambaForCausalLM)

    def setUp(self):
        self.model_tester = MoEModelTester(self, JambaConfig, dict(num_experts=4,num_experts_per_tok=2,attn_layer_period=2,attn_layer_offset=1,expert_layer_period=1,expert_layer_offset=0,mamba_d_state=16,mamba_d_conv=4,mamba_expand=2))
