"""Glue (moesys peer harness): transformers 5.25's ModelTesterMixin on a tiny GptOss model."""

import unittest

from transformers import GptOssConfig, GptOssForCausalLM, GptOssModel

from ...moe_tester import MoEModelTester
from ...test_modeling_common import ModelTesterMixin


class GptOssModelTest(ModelTesterMixin, unittest.TestCase):
    all_model_classes = (GptOssModel, GptOssForCausalLM)

    def setUp(self):
        self.model_tester = MoEModelTester(self, GptOssConfig, dict(num_local_experts=4,num_experts_per_tok=2,head_dim=16))
