"""Glue (moesys peer harness): transformers 5.25's ModelTesterMixin on a tiny Qwen3Next model."""

import unittest

from transformers import Qwen3NextConfig, Qwen3NextForCausalLM, Qwen3NextModel

from ...moe_tester import MoEModelTester
from ...test_modeling_common import ModelTesterMixin


class Qwen3NextModelTest(ModelTesterMixin, unittest.TestCase):
    all_model_classes = (Qwen3NextModel, Qwen3NextForCausalLM)

    def setUp(self):
        self.model_tester = MoEModelTester(self, Qwen3NextConfig, dict(num_experts=8,num_experts_per_tok=2,moe_intermediate_size=16,shared_expert_intermediate_size=32,head_dim=16,linear_key_head_dim=16,linear_value_head_dim=16,linear_num_key_heads=2,linear_num_value_heads=4,layer_types=['linear_attention','full_attention']))
