"""Glue (moesys peer harness): transformers 5.25's ModelTesterMixin on a tiny Mixtral model."""

import unittest

from transformers import MixtralConfig, MixtralForCausalLM, MixtralModel

from ...moe_tester import MoEModelTester
from ...test_modeling_common import ModelTesterMixin


class MixtralModelTest(ModelTesterMixin, unittest.TestCase):
    all_model_classes = (MixtralModel, MixtralForCausalLM)

    def setUp(self):
        self.model_tester = MoEModelTester(self, MixtralConfig, dict(num_local_experts=4,num_experts_per_tok=2))
