"""Stand-in (moesys peer harness): transformers' tests/generation/test_utils.py is not in the 5.25.0 sdist.

An empty mixin: the generation tests are NOT run by this overlay (said in tests/peer/README.md)."""


class GenerationTesterMixin:
    pass
