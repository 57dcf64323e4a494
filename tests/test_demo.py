"""`make demo`'s first step on a fresh machine: every engine the config names but lacks
is exported from its `source` (and quantized when the drafter asks for it)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cosine import config
from cosine.demo import ensure_engines


def test_missing_engines_are_built_from_source(tiny_models, tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_text(f'''
[[models]]
name = "t"
role = "target"
source = "{tiny_models['llama']}"
engine = "engines/t"

[[models]]
name = "d"
role = "drafter"
source = "{tiny_models['llama']}"
engine = "engines/d-int4"
quantize = "int4"

[[models]]
name = "lookup"
role = "drafter"
kind = "lookup"

[[workers]]
name = "v"
model = "t"
port = 5901
''')
    cfg = config.load(tmp_path / "config.toml", check_engines=False)
    ensure_engines(cfg)
    config.load(tmp_path / "config.toml")  # every engine now exists
    assert json.loads((tmp_path / "engines/d-int4/manifest.json").read_text())["quantization"]["mode"] == "int4"
    assert (tmp_path / "engines/d-int4-float/manifest.json").is_file()


def test_engine_without_source_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_text('[[models]]\nname = "t"\nrole = "target"\nengine = "e"\n'
                                         '[[workers]]\nname = "v"\nmodel = "t"\nport = 5902\n')
    with pytest.raises(SystemExit, match="has no `source`"):
        ensure_engines(config.load(tmp_path / "config.toml", check_engines=False))
