"""Glue (moesys peer harness): transformers 5.25's ModelTesterMixin on a tiny Glm4Moe model."""

import unittest

from transformers import Glm4MoeConfig, Glm4MoeForCausalLM, Glm4MoeModel

from ...moe_tester import MoEModelTester
from ...test_modeling_common import ModelTesterMixin


class Glm4MoeModelTest(ModelTesterMixin, unittest.TestCase):
    all_model_classes = (Glm4MoeModel, Glm4MoeForCausalLM)

    def setUp(self):
        self.model_tester = MoEModelTester(self, Glm4MoeConfig, dict(n_routed_experts=8,num_experts_per_tok=2,moe_intermediate_size=16,n_shared_experts=1,n_group=1,topk_group=1,first_k_dense_replace=1))
