"""`model.init_from` folded into a run's config, before any process group or weight exists.

The model shape comes from the checkpoint's config.json (moesys.hf.families.derive). A key the user
set explicitly (YAML or --set) that disagrees is a ValueError naming both values; keys left at their
defaults are simply replaced. Text data defaults to the checkpoint's own tokenizer. The safetensors
headers are checked against the resolved shape here too, so a bad checkpoint fails at start-up.
"""

from __future__ import annotations

from typing import Any

from moesys.config import Config, config_from_dict
from moesys.hf.families import derive, read_hf_config
from moesys.hf.load import check_checkpoint
from moesys.hf.source import has_tokenizer
from moesys.hub import resolve_model_dir


def _explicit(config: Config, dotted: str) -> tuple[bool, Any]:
    """(whether the user set the key, its value)."""
    *path, leaf = dotted.split(".")
    section = config
    for part in path:
        section = getattr(section, part)
    return leaf in section.model_fields_set, getattr(section, leaf)


def _same(ours: Any, theirs: Any) -> bool:
    if hasattr(ours, "model_dump"):
        ours = ours.model_dump()
        return all(ours.get(k) == v for k, v in theirs.items())
    return ours == theirs


def resolve_init_from(config: Config) -> Config:
    """`config` with the model and moe shape taken from `model.init_from`'s config.json (unchanged when
    init_from is unset). Raises ValueError before anything else is read."""
    source = config.model.init_from
    if source is None:
        return config
    local = str(resolve_model_dir(source, what="model.init_from"))  # a hub id: its cached snapshot
    if local != source:
        config = config.model_copy(deep=True)
        config.model.init_from = source = local
    hf_config = read_hf_config(source)
    raw = config.model_dump(mode="json")
    for dotted, (value, hf_key) in derive(hf_config).items():
        explicit, ours = _explicit(config, dotted)
        if explicit and not _same(ours, value):
            raise ValueError(f"{dotted}={ours!r} contradicts {source}/config.json {hf_key}={value!r}; with "
                             "model.init_from the shape comes from the checkpoint: remove the key or make it agree")
        node = raw
        *path, leaf = dotted.split(".")
        for part in path:
            node = node[part]
        node[leaf] = value
    if config.data.tokenizer is None and "tokenizer" not in config.data.model_fields_set and has_tokenizer(source):
        raw["data"]["tokenizer"] = str(source)
    resolved = config_from_dict(raw, f"{source}/config.json with the run's config")
    check_checkpoint(source, resolved)  # tensor names and shapes, from the headers only
    return resolved
