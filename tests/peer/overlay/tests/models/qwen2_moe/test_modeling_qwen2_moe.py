"""Glue (moesys peer harness): transformers 5.25's ModelTesterMixin on a tiny Qwen2Moe model."""

import unittest

from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM, Qwen2MoeModel

from ...moe_tester import MoEModelTester
from ...test_modeling_common import ModelTesterMixin


class Qwen2MoeModelTest(ModelTesterMixin, unittest.TestCase):
    all_model_classes = (Qwen2MoeModel, Qwen2MoeForCausalLM)

    def setUp(self):
        self.model_tester = MoEModelTester(self, Qwen2MoeConfig, dict(num_experts=8,num_experts_per_tok=2,moe_intermediate_size=16,shared_expert_intermediate_size=32))
