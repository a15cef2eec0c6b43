"""Glue (moesys peer harness): transformers 5.25's ModelTesterMixin on a tiny Phimoe model."""

import unittest

from transformers import PhimoeConfig, PhimoeForCausalLM, PhimoeModel

from ...moe_tester import MoEModelTester
from ...test_modeling_common import ModelTesterMixin


class PhimoeModelTest(ModelTesterMixin, unittest.TestCase):
    all_model_classes = (PhimoeModel, PhimoeForCausalLM)

    def setUp(self):
        self.model_tester = MoEModelTester(self, PhimoeConfig, dict(num_local_experts=4,num_experts_per_tok=2))
