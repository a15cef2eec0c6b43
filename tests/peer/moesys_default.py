"""pytest plugin (opt-in harness only): makes "moesys" transformers' default experts implementation.

Loaded by tests/peer/run.py with `-p moesys_default` for the moesys run of a transformers modeling test
file. At configure time it registers moesys's experts forward (moesys.integrations.transformers.register)
and wraps PreTrainedModel.get_correct_experts_implementation so that a model built without an explicit
`experts_implementation` gets "moesys" instead of transformers' default ("grouped_mm", or "eager" where
grouped_mm cannot dispatch). An explicit request (a test asking for "eager" or "grouped_mm") is honoured.
This patching happens only inside this harness, never when moesys is imported.
"""

from __future__ import annotations


def pytest_configure(config):
    from transformers import PreTrainedModel

    import moesys.integrations.transformers as mt

    name = mt.register()
    original = PreTrainedModel.get_correct_experts_implementation

    def get_correct_experts_implementation(self, requested_experts):
        # None means "whatever the default is": the default is now moesys.
        return original(self, name if requested_experts is None else requested_experts)

    PreTrainedModel.get_correct_experts_implementation = get_correct_experts_implementation
    config.addinivalue_line("markers", "moesys_default: run with moesys as the default experts implementation")


def pytest_report_header(config):
    return "experts_implementation default: moesys (tests/peer/moesys_default.py)"
