"""Glue (moesys peer harness, not transformers' code): a tiny model tester for a decoder-only MoE model.

It supplies only what transformers' ModelTesterMixin (tests/test_modeling_common.py of the 5.25.0 sdist)
asks of a model tester: a tiny config and inputs. The tests themselves are ModelTesterMixin's."""

import torch

from .test_modeling_common import ids_tensor


class MoEModelTester:
    def __init__(self, parent, config_class, config_kwargs, batch_size=13, seq_length=7, vocab_size=99,
                 num_hidden_layers=2):
        self.parent = parent
        self.config_class = config_class
        self.batch_size = batch_size
        self.seq_length = seq_length
        self.vocab_size = vocab_size
        self.hidden_size = 32
        # A hybrid pattern may need more layers to hold every block kind (Nemotron-H: Mamba, MoE, attention);
        # the mixin reads this count (hidden states, attentions), so it must be the model's.
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = 2
        self.is_training = True
        self.config_kwargs = dict(
            vocab_size=vocab_size, hidden_size=32, num_hidden_layers=num_hidden_layers, num_attention_heads=2,
            num_key_value_heads=2, intermediate_size=64, max_position_embeddings=512, pad_token_id=0,
            bos_token_id=1, eos_token_id=2, **config_kwargs)

    def get_config(self):
        return self.config_class(**self.config_kwargs)

    def prepare_config_and_inputs_for_common(self):
        input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size)
        attention_mask = torch.tril(torch.ones_like(input_ids))
        return self.get_config(), {"input_ids": input_ids, "attention_mask": attention_mask}
