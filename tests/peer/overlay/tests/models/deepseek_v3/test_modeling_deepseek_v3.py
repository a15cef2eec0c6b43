"""Glue (moesys peer harness): transformers 5.25's ModelTesterMixin on a tiny DeepseekV3 model."""

import unittest

from transformers import DeepseekV3Config, DeepseekV3ForCausalLM, DeepseekV3Model

from ...moe_tester import MoEModelTester
from ...test_modeling_common import ModelTesterMixin


class DeepseekV3ModelTest(ModelTesterMixin, unittest.TestCase):
    all_model_classes = (DeepseekV3Model, DeepseekV3ForCausalLM)

    def setUp(self):
        self.model_tester = MoEModelTester(self, DeepseekV3Config, dict(n_routed_experts=8,num_experts_per_tok=2,moe_intermediate_size=16,n_shared_experts=1,kv_lora_rank=16,q_lora_rank=32,qk_rope_head_dim=16,v_head_dim=16,qk_nope_head_dim=16,n_group=1,topk_group=1,first_k_dense_replace=1))
