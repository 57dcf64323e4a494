"""`make demo`'s first step on a fresh machine: every engine the config names but lacks
is exported from its `source` (quantized when the config asks for it), and an engine of
an older format or another quantization is exported again."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cosine import config
from cosine.demo import ensure_engines


def test_missing_engines_are_built_from_source(tiny_models, tmp_path: Path) -> None:
    (tmp_path / "data/train").mkdir(parents=True)
    (tmp_path / "data/train/code.txt").write_text("def f(x):\n    return x + 1\n" * 50)
    (tmp_path / "config.toml").write_text(f'''
[[models]]                # listed first: it still waits for the target's tokenizer
name = "ng"
role = "drafter"
kind = "ngram"
source = "data/train/code.txt"
engine = "engines/ngram-code"

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
    d_manifest = tmp_path / "engines/d-int4/manifest.json"
    assert json.loads(d_manifest.read_text())["quantization"]["mode"] == "int4"
    ng = json.loads((tmp_path / "engines/ngram-code/manifest.json").read_text())
    assert ng["kind"] == "ngram" and ng["tokens"] > 100
    # an engine of an older format is exported again (workers refuse it); a current one is kept
    t_manifest = tmp_path / "engines/t/manifest.json"
    old = json.loads(t_manifest.read_text())
    t_manifest.write_text(json.dumps({**old, "format_version": 2}))
    before = d_manifest.stat().st_mtime_ns
    ensure_engines(cfg)
    assert json.loads(t_manifest.read_text())["format_version"] == old["format_version"]
    assert d_manifest.stat().st_mtime_ns == before


def test_missing_ngram_corpus_builds_its_dataset_domain(monkeypatch, tmp_path: Path) -> None:
    """A missing DIR/train/DOMAIN.txt runs `cosine datasets build` for the config's n-gram
    domains in DIR (the build itself is tested in test_datasets.py); other paths are an error."""
    import cosine.datasets
    import cosine.export.ngram
    from cosine.demo import ensure_ngram

    calls = []
    monkeypatch.setattr(cosine.datasets, "build", lambda out, tok, domains, max_mb: calls.append((out, domains)))
    monkeypatch.setattr(cosine.export.ngram, "build_ngram", lambda corpus, tok, out: calls.append(corpus))
    (tmp_path / "config.toml").write_text('''
[[models]]
name = "t"
role = "target"
engine = "e"
[[models]]
name = "ng-prose"
role = "drafter"
kind = "ngram"
source = "data/train/prose.txt"
engine = "engines/ngram-prose"
[[models]]
name = "ng-german"
role = "drafter"
kind = "ngram"
source = "data/train/german.txt"
engine = "engines/ngram-german"
[[models]]
name = "ng-other"
role = "drafter"
kind = "ngram"
source = "corpus/mine.txt"
engine = "engines/ngram-mine"
[[workers]]
name = "v"
model = "t"
port = 5903
''')
    cfg = config.load(tmp_path / "config.toml", check_engines=False)
    ensure_ngram(cfg, cfg.model("ng-prose"))
    assert calls == [(tmp_path / "data", ("german", "prose")), [tmp_path / "data/train/prose.txt"]]
    with pytest.raises(SystemExit, match="does not exist"):
        ensure_ngram(cfg, cfg.model("ng-other"))


def test_engine_without_source_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_text('[[models]]\nname = "t"\nrole = "target"\nengine = "e"\n'
                                         '[[workers]]\nname = "v"\nmodel = "t"\nport = 5902\n')
    with pytest.raises(SystemExit, match="has no `source`"):
        ensure_engines(config.load(tmp_path / "config.toml", check_engines=False))


def test_a_quantized_target_exported_before_key_slots_is_exported_again(tmp_path: Path) -> None:
    """Its tree verifies would not be exact (cosine/keyslots.py); a drafter's are fine."""
    from cosine.demo import _current
    from cosine.workers.engine import FORMAT_VERSION

    (tmp_path / "model.onnx").write_bytes(b"")
    inputs = [{"name": "input_ids"}, {"name": "attention_mask"}]
    m = {"format_version": FORMAT_VERSION, "quantization": {"mode": "int4"}, "activations": "int8", "inputs": inputs}
    (tmp_path / "manifest.json").write_text(json.dumps(m))
    assert not _current(tmp_path, "int4", target=True)
    assert _current(tmp_path, "int4", target=False)
    (tmp_path / "manifest.json").write_text(json.dumps({**m, "inputs": inputs + [{"name": "key_slots"}]}))
    assert _current(tmp_path, "int4", target=True)
