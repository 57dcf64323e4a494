"""config.toml loading: the checked-in file parses; every kind of mistake is a clear error."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from cosine import config
from cosine.config import ConfigError

REPO = Path(__file__).resolve().parents[1]
BASE = (REPO / "config.toml").read_text()


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "config.toml"
    p.write_text(text)
    return p


def test_checked_in_config_parses() -> None:
    cfg = config.load(REPO / "config.toml", check_engines=False)
    assert cfg.target_model().role == "target"
    assert cfg.verifier_workers() and cfg.drafter_workers()
    assert all(config.is_loopback(w.host) for w in cfg.workers)
    assert cfg.controller.mode in config.MODES


def test_missing_engine_names_the_fix(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"line \d+: engine for model 'qwen2.5-coder-1.5b' not found.*cosine-export"):
        config.load(write(tmp_path, BASE))


@pytest.mark.parametrize("old,new,pattern", [
    ('mode = "cosine"', 'mode = "turbo"', r"mode 'turbo'; use one of"),
    ("max_batch = 16", 'max_batch = "16"', r"max_batch must be int, got str"),
    ("port = 5602", "port = 5601", r"both use 127.0.0.1:5601; give each worker its own port"),
    ('level = "INFO"', 'level = "LOUD"', r"level 'LOUD'"),
    ("draft_len = 4", "draft_len = 40", r"min_draft_len <= draft_len <= max_draft_len"),
    ('provider = "cpu"', 'provider = "rocm"', r"provider 'rocm'"),
    ('role = "drafter"', 'role = "helper"', r"role 'helper'"),
    ('model = "qwen2.5-coder-0.5b"', 'model = "nope"', r"serves unknown model 'nope'"),
    ("max_batch = 16", "max_btach = 16", r"unknown key 'max_btach' in \[workers\]; known keys:"),
    ("[limits]", "[limitz]", r"unknown table \[limitz\]"),
    ("adaptive = true", "adaptive = 1", r"adaptive must be bool"),
    ('endpoint = "tcp://127.0.0.1:5600"', 'endpoint = "tcp://127.0.0.1:5601"', r"also a worker's port"),
    ("curve = false", "curve = true", r"curve = true needs server_secret_key"),
    ('pipeline = "auto"', 'pipeline = "yes"', r"pipeline 'yes'; use one of"),
    ("restart_backoff_s = 1.0", "restart_backoff_s = 40.0",
     r"line \d+: need 0 < restart_backoff_s <= restart_backoff_max_s"),
    ("crash_loop_restarts = 5", "crash_loop_restarts = 0", r"need crash_loop_restarts >= 1"),
    ("crash_loop_window_s = 60.0", "crash_loop_windows = 60.0", r"unknown key 'crash_loop_windows' in \[supervisor\]"),
    ('background_prefill = "auto"', 'background_prefill = "always"', r"background_prefill 'always'; use one of"),
    ("min_gain = 0.0", "min_gain = 1.5", r"line \d+: need 0 <= min_gain < 1, got 1.5"),
])
def test_bad_config_is_a_clear_error(tmp_path: Path, old: str, new: str, pattern: str) -> None:
    assert old in BASE
    with pytest.raises(ConfigError, match=pattern) as e:
        config.load(write(tmp_path, BASE.replace(old, new, 1)), check_engines=False)
    assert str(tmp_path / "config.toml") in str(e.value)


def test_error_points_at_the_line(tmp_path: Path) -> None:
    text = BASE.replace("max_batch = 16", "max_btach = 16", 1)
    line = next(i for i, l in enumerate(text.splitlines(), 1) if l.startswith("max_btach"))
    with pytest.raises(ConfigError, match=re.escape(f"line {line}:")):
        config.load(write(tmp_path, text), check_engines=False)


def test_not_toml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        config.load(write(tmp_path, "[[models]\nname="), check_engines=False)
    with pytest.raises(ConfigError, match="not found; pass --config"):
        config.load(tmp_path / "nope.toml")


def test_no_target_and_missing_required_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no model has role"):
        config.load(write(tmp_path, BASE.replace('role = "target"', 'role = "drafter"')), check_engines=False)
    with pytest.raises(ConfigError, match=r"model 'qwen2.5-coder-0.5b' \(kind neural\) needs `engine = \"DIR\"`"):
        config.load(write(tmp_path, re.sub(r'engine = "engines/qwen2.5-coder-0.5b-int4"\n', "", BASE)),
                    check_engines=False)


def test_relative_engine_paths_resolve_against_the_config(tmp_path: Path) -> None:
    cfg = config.load(write(tmp_path, BASE), check_engines=False)
    assert cfg.engine_dir(cfg.target_model()) == tmp_path / "engines" / "qwen2.5-coder-1.5b-gguf"


def test_missing_required_key_and_quantize_values(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="missing required key 'role'"):
        config.load(write(tmp_path, BASE.replace('role = "target"\n', "", 1)), check_engines=False)
    with pytest.raises(ConfigError, match="quantize must be one of gguf, int4, int8"):
        config.load(write(tmp_path, BASE.replace('quantize = "int4"', 'quantize = "int3"', 1)), check_engines=False)
    # a quantized target is allowed (the shipped one is)
    cfg = config.load(write(tmp_path, BASE), check_engines=False)
    assert cfg.target_model().quantize == "gguf" and cfg.target_model().role == "target"


@pytest.mark.parametrize("main", ["cosine.control.cluster", "cosine.control.serve", "cosine.demo", "cosine.bench.run"])
def test_commands_report_a_bad_config_in_one_line(main: str, tmp_path: Path, capsys) -> None:
    import importlib

    bad = write(tmp_path, BASE.replace("max_batch = 16", "max_btach = 16", 1))
    assert importlib.import_module(main).main(["--config", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown key 'max_btach'" in err[0]


def test_pipeline_auto_follows_where_the_workers_run(tmp_path: Path) -> None:
    """auto pipelines only when no drafter shares a host and device with a verifier."""
    local = config.load(write(tmp_path, BASE), check_engines=False)
    assert local.controller.pipeline == "auto" and not local.pipelined()  # the demo: one CPU
    text = re.sub(r'host = "127.0.0.1"\nport = (560[23])', r'host = "10.0.0.7"\nport = \1', BASE)
    text = re.sub(r'(?m)^port = (560[4-7])$', r'port = \1\nhost = "10.0.0.8"', text)
    assert text != BASE
    remote = config.load(write(tmp_path, text), check_engines=False)
    assert remote.pipelined() and remote.background_prefills()  # every drafter elsewhere
    assert not local.background_prefills()
    forced = config.load(write(tmp_path, BASE.replace('pipeline = "auto"', 'pipeline = "on"', 1)),
                         check_engines=False)
    assert forced.pipelined()
    # one host, but the verifier pinned to core 1 and every drafter to core 0: separate cores
    pins = re.sub(r'(?m)^(port = 560[2-7])$', r'\1\ncpus = [0]', BASE).replace("port = 5601", "port = 5601\ncpus = [1]", 1)
    assert pins.count("cpus = [0]") == 6
    assert config.load(write(tmp_path, pins), check_engines=False).pipelined()
    overlap = pins.replace("cpus = [1]", "cpus = [0, 1]", 1)
    assert not config.load(write(tmp_path, overlap), check_engines=False).pipelined()
    unpinned = pins.replace("cpus = [0]", "", 1)  # one drafter may run on any core
    assert not config.load(write(tmp_path, unpinned), check_engines=False).background_prefills()


def test_worker_cpus_cuda_graph_and_kv_arrays_are_checked(tmp_path: Path) -> None:
    def with_worker_keys(extra: str) -> Path:
        return write(tmp_path, BASE.replace("max_batch = 16", "max_batch = 16\n" + extra, 1))

    assert config.load(with_worker_keys("cpus = [0, 1]"), check_engines=False).workers[0].cpus == (0, 1)
    with pytest.raises(ConfigError, match="must be distinct core numbers"):
        config.load(with_worker_keys("cpus = [1, 1]"), check_engines=False)
    with pytest.raises(ConfigError, match="must be a list of int"):
        config.load(with_worker_keys('cpus = "0-1"'), check_engines=False)
    with pytest.raises(ConfigError, match='cuda_graph needs provider "cuda"'):
        config.load(with_worker_keys("cuda_graph = true"), check_engines=False)
    assert config.load(with_worker_keys('kv_arrays = "torch"'), check_engines=False).workers[0].kv_arrays == "torch"
    with pytest.raises(ConfigError, match="kv_arrays 'cupy'; use one of"):
        config.load(with_worker_keys('kv_arrays = "cupy"'), check_engines=False)
