"""The source checkpoint's files a run keeps for export: config.json, generation_config.json and the
tokenizer, copied into RUN_DIR/hf_source when training starts from `model.init_from`, so
`moesys export` writes the source's family even after the source directory is gone.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

SOURCE_DIR = "hf_source"
CONFIG_FILES = ("config.json", "generation_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")


def has_tokenizer(model_dir: str | Path) -> bool:
    model_dir = Path(model_dir)
    return any((model_dir / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "vocab.json"))


def copy_files(src: Path, dst: Path, names: tuple[str, ...]) -> list[str]:
    """Copy those of `names` that exist in `src` into `dst`; returns the names copied."""
    copied = []
    for name in names:
        if (Path(src) / name).is_file():
            shutil.copy2(Path(src) / name, Path(dst) / name)
            copied.append(name)
    return copied


def save_source(init_from: str | Path, run_dir: Path) -> Path:
    """RUN_DIR/hf_source with the source's config and tokenizer files (replaced whole, atomically)."""
    out = Path(run_dir) / SOURCE_DIR
    tmp = Path(tempfile.mkdtemp(prefix=f".{SOURCE_DIR}-", dir=run_dir))
    try:
        copy_files(Path(init_from), tmp, CONFIG_FILES + TOKENIZER_FILES)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def source_of(step_dir: Path) -> Path | None:
    """The hf_source of the run a checkpoint directory RUN_DIR/ckpt/step_N belongs to, if any."""
    candidate = Path(step_dir).resolve().parent.parent / SOURCE_DIR
    return candidate if (candidate / "config.json").is_file() else None
