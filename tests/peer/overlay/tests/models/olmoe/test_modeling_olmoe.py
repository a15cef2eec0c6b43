"""Glue (moesys peer harness): transformers 5.25's ModelTesterMixin on a tiny Olmoe model."""

import unittest

from transformers import OlmoeConfig, OlmoeForCausalLM, OlmoeModel

from ...moe_tester import MoEModelTester
from ...test_modeling_common import ModelTesterMixin


class OlmoeModelTest(ModelTesterMixin, unittest.TestCase):
    all_model_classes = (OlmoeModel, OlmoeForCausalLM)

    def setUp(self):
        self.model_tester = MoEModelTester(self, OlmoeConfig, dict(num_experts=8,num_experts_per_tok=2))
