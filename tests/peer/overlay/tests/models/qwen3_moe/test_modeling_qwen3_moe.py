"""Glue (moesys peer harness): transformers 5.25's ModelTesterMixin on a tiny Qwen3Moe model."""

import unittest

from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM, Qwen3MoeModel

from ...moe_tester import MoEModelTester
from ...test_modeling_common import ModelTesterMixin


class Qwen3MoeModelTest(ModelTesterMixin, unittest.TestCase):
    all_model_classes = (Qwen3MoeModel, Qwen3MoeForCausalLM)

    def setUp(self):
        self.model_tester = MoEModelTester(self, Qwen3MoeConfig, dict(num_experts=8,num_experts_per_tok=2,moe_intermediate_size=16))
