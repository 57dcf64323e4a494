"""config.toml -> typed, validated objects, once, before any process starts.

Every error names the file, the table and key (with its line where it can be found) and
says how to fix it. Unknown keys are errors: a typo must not silently become a default.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

MODES = ("autoregressive", "speculative", "specinfer", "cosine")
QUANTIZE = ("gguf", "int4", "int8")  # cosine-export --quantize (export/weights.py), without "none"
MATMUL = ("gguf", "nbits")  # cosine-export --matmul, without "auto"
ROLES = ("target", "drafter")
KV_ARRAYS = ("auto", "numpy", "torch")
GATES = ("measured", "model", "off")
CLASSIFIERS = ("ngram", "keyword")
PIPELINE = ("auto", "on", "off")
PROVIDERS = ("cpu", "cuda", "tensorrt")
MODEL_KINDS = ("neural", "ngram", "lookup")


class ConfigError(ValueError):
    """A config.toml problem; the message says where and how to fix it."""


@dataclass(frozen=True)
class LoggingConfig:
    level: str = "INFO"
    file: str = ""  # empty: stderr only


@dataclass(frozen=True)
class SecurityConfig:
    """[security]: CurveZMQ on every TCP socket (docs/security.md). Files are written by
    `cosine keys generate`; relative paths are resolved against config.toml's directory
    when loading, so every path here is absolute once loaded."""

    curve: bool = False
    server_secret_key: str = ""    # workers and cosine-serve: their keypair (a .key_secret file)
    server_public_key: str = ""    # clients (cosine-serve included): the servers' public key (.key)
    client_secret_key: str = ""    # this deployment's client keypair: serve -> workers, `cosine generate`
    authorized_keys_dir: str = ""  # servers accept only the client public keys (*.key) in here

    FILES = ("server_secret_key", "server_public_key", "client_secret_key")


@dataclass(frozen=True)
class HttpConfig:
    """[http]: the OpenAI-compatible HTTP gateway, `cosine-http` (docs/http.md). `cosine up`
    starts it when the table is present."""

    host: str = "127.0.0.1"
    port: int = 8000
    # Bearer tokens accepted in `Authorization: Bearer KEY` (compared in constant time);
    # empty: no authentication (keep host on loopback then).
    api_keys: tuple[str, ...] = ()
    # The model id that /v1/models lists and requests name; empty: the target model's name.
    model_name: str = ""
    # Seconds a client may take to send its request body; slower ones get 408.
    body_timeout_s: float = 30.0
    # Seconds the gateway waits for cosine-serve's next reply (first token, next chunk)
    # before answering 504 and cancelling the request.
    request_timeout_s: float = 600.0


@dataclass(frozen=True)
class LimitsConfig:
    max_prompt_tokens: int = 2048
    max_new_tokens: int = 1024
    max_tree_nodes: int = 64
    max_message_bytes: int = 64 * 1024 * 1024


@dataclass(frozen=True)
class ModelConfig:
    name: str
    role: str
    engine: str = ""  # engine directory made by cosine-export (relative to config.toml); none for lookup
    kind: str = "neural"
    source: str = ""  # `cosine models fetch` name or a path; used by `make demo` to export
    domains: tuple[str, ...] = ()
    dtype: str = "float32"
    # How `make demo` builds the engine (cosine-export --quantize): "gguf" (the GGUF file's own
    # blocks, exactly), "int4"/"int8" (symmetric blocks from the float weights), "" = float.
    # Any role: every mode's output is the target *engine's* autoregressive output.
    quantize: str = ""
    # Which operator computes the quantized products (cosine-export --matmul): "gguf" (cosine's
    # CPU kernel over the GGUF file's own rows), "nbits" (ONNX Runtime's MatMulNBits, any
    # provider), "" = auto: gguf for quantize = "gguf" where the kernel builds.
    matmul: str = ""
    # Drafters only: prefill at most this many of the prompt's last tokens (0 = all). The
    # drafter's prompt prefill is paid before a request's first speculative round; a
    # window caps it, and a small model drafts from the recent context about as well.
    draft_context: int = 0
    # Targets only: another engine of the same model (cosine-export without --quantize)
    # through which prompt tokens are prefilled; decoding and verification stay on
    # ``engine``. On a CPU a float32 prefill beats the int8 path (1.39x for the 1.5B on
    # 2 cores) for about 4x the memory (docs/workers.md, "Behaviour worth knowing").
    prefill_engine: str = ""


@dataclass(frozen=True)
class WorkerConfig:
    name: str
    model: str
    host: str = "127.0.0.1"
    port: int = 0
    device: str = "cpu"
    provider: str = "cpu"
    max_batch: int = 16
    kv_budget_tokens: int = 65536
    idle_timeout_s: float = 600.0
    threads: int = 0  # ONNX Runtime intra-op threads; 0 = its default
    # Let idle ONNX Runtime threads spin for work. Off by default: on a host shared by
    # several workers a spinning verifier steals the cores a drafter needs (measured on
    # 2 CPU cores: 0.5B draft step 50 -> 40 ms, 1.5B verify 0.30 -> 0.26 s without it).
    spin: bool = False
    # Pin the worker process to these CPU cores (os.sched_setaffinity; empty = no pinning),
    # so a drafter and the verifier on one host can run truly in parallel on their own cores.
    # With no `threads`, ONNX Runtime then uses one intra-op thread per pinned core.
    cpus: tuple[int, ...] = ()
    # CUDA graphs (provider "cuda" only): capture each decode/verify shape bucket once and
    # replay it (ONNX Runtime's enable_cuda_graph + gpu_graph_id; docs/gpu.md).
    cuda_graph: bool = False
    # Where the KV cache lives (workers/arrays.py): "auto" = host memory (numpy) on the CPU,
    # torch tensors on the GPU; "torch" on the CPU runs the GPU code path (for tests);
    # "numpy" on a GPU works without torch, but the cache then crosses the bus every step.
    kv_arrays: str = "auto"

    @property
    def endpoint(self) -> str:
        return f"tcp://{self.host}:{self.port}"


@dataclass(frozen=True)
class SpeculationConfig:
    draft_len: int = 4
    min_draft_len: int = 1
    max_draft_len: int = 8
    tree_width: int = 1  # top-k siblings per draft step (expansion trees)
    adaptive: bool = True
    # Speculation is turned off for a request whose measured goodput falls below this
    # fraction of plain decoding's. 1.0: never slower by the cost model (0.9 let cosine run
    # at 0.92x autoregressive once the GGUF kernel made plain decoding 1.7x faster).
    disable_below_ratio: float = 1.0
    # Batch-level switch between speculation and plain batched decoding: "model" trusts the
    # start-up cost profile, "measured" learns from the goodput of real rounds per batch
    # size (experimental: it under-measures speculation, see docs/algorithms.md), "off"
    # always speculates.
    gate: str = "model"
    gate_window: int = 8          # ticks per measurement window
    gate_explore_every: int = 8   # every n-th window plays the regime that looks worse
    # Cosine mode, adaptive: stop fused drafting, and drop tree nodes before verification,
    # once a node's chance of acceptance is worth less than what it costs (greedy only drops).
    prune: bool = True
    # ... and a floor under that (expected tokens): a node less likely than this to be accepted
    # is never verified, even where the verifier's extra node looks free (0 = cost only).
    min_gain: float = 0.0


@dataclass(frozen=True)
class RoutingConfig:
    max_drafters_per_request: int = 2
    ema: float = 0.8
    explore_threshold: float = 1.5  # mean accepted length below which the router explores
    explore_prob: float = 0.0    # random exploration on top of the low-accepted-length trigger
    # A drafter already tried on a request is dropped from its rounds while its score is
    # below this fraction of the best drafter's (0 = always use max_drafters_per_request).
    min_score_ratio: float = 0.75
    # A model drafter (one that must prefill each prompt) is engaged for a request only when
    # the time it saves over the tokens left pays for that prefill, judged from per-domain
    # goodput with and without it (docs/algorithms.md, "Engaging model drafters").
    engage_by_cost: bool = True
    # The best-scoring engaged model drafter drafts every round of its request and the
    # router fills the other slots (and explores) among the rest: a weight-free drafter
    # with nothing to propose then never displaces the model's chain.
    anchor_model: bool = True
    # Prompt -> domain for the per-domain priors: "ngram" (naive Bayes over the corpora the
    # domain n-gram drafters were counted from; "keyword" when none is on disk) or "keyword".
    classifier: str = "ngram"


@dataclass(frozen=True)
class FusionConfig:
    rule: str = "max"
    min_confidence: float = 0.0
    # Compare calibrated confidences: P(the target agrees | drafter, domain, its stated
    # probability), learned from every verified candidate (docs/algorithms.md, "Fusion").
    calibrate: bool = True
    # Also scale each confidence by the router's per-request score (off by default: the
    # score moves with a handful of rounds, calibration with every candidate).
    weight_by_router: bool = False
    # Guided drafting (greedy): a weight-free drafter's chain that the fused path is likely
    # to follow is fed to the model drafters as forced tokens, which they score in one
    # forward instead of one forward per step (docs/algorithms.md, "Guided drafting").
    # Chain tokens are used while the calibrated chance of reaching them stays above
    # guide_min_reach: a wrong guide costs one wider forward.
    guide: bool = True
    guide_min_reach: float = 0.25
    # Greedy: each drafter's top-`siblings` tokens per fused step enter the tree (the
    # runners-up as leaves), so a round whose fused token misses can still accept the
    # drafter's second guess. Pruning keeps only those worth their verify cost.
    siblings: int = 1


@dataclass(frozen=True)
class SchedulingConfig:
    max_batch: int = 8
    max_verify_tokens: int = 256
    latency_weight: float = 0.5
    latency_bound_ms: float = 0.0  # 0 = no bound
    max_prefill_tokens: int = 512  # prompt tokens per admission prefill op (at least one request)


@dataclass(frozen=True)
class ControllerConfig:
    endpoint: str = "tcp://127.0.0.1:5600"
    mode: str = "cosine"
    target: str = ""  # model name of the target; default: the one model with role target
    request_timeout_s: float = 600.0
    worker_timeout_s: float = 30.0
    # A request whose verifier died (or restarted and lost its cache) is parked and prefilled
    # again from its committed tokens on a verifier that answers; it fails with
    # `unavailable` if none does within this many seconds (docs/reliability.md).
    verifier_grace_s: float = 120.0
    max_pending_requests: int = 256
    temperature: float = 0.0
    seed: int = 0
    # CoSine's pipelining (drafting one group of requests while the verifier verifies the
    # other) only pays when drafters and verifiers run on different hardware. "auto" turns
    # it off when some drafter shares a host and device with a verifier (one CPU, one GPU;
    # on a CPU, workers pinned to disjoint `cpus` do not share): there the two groups would
    # only take turns on the same cores and split the batch.
    pipeline: str = "auto"
    # cosine: a model drafter prefills a new request's prompt in the background while the
    # target verifies its first rounds with the other drafters (or plainly), instead of
    # holding up the request's first round for the prefill. Like pipelining it only pays
    # on separate hardware: "auto" = on when no drafter shares a host and device with a
    # verifier (on 2 shared CPU cores the overlap slowed verification 2.3x).
    background_prefill: str = "auto"
    speculation: SpeculationConfig = field(default_factory=SpeculationConfig)
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    scheduling: SchedulingConfig = field(default_factory=SchedulingConfig)


@dataclass(frozen=True)
class SupervisorConfig:
    """[supervisor]: how `cosine up` restarts a child (worker, serve, gateway) that exits
    unexpectedly (control/restart.py, docs/reliability.md "Supervision")."""

    restart_backoff_s: float = 1.0       # wait before the first restart; doubles per crash inside the window
    restart_backoff_max_s: float = 30.0  # ... up to this
    crash_loop_restarts: int = 5         # this many restarts within crash_loop_window_s: left down
    crash_loop_window_s: float = 60.0


@dataclass(frozen=True)
class Config:
    path: Path
    models: tuple[ModelConfig, ...]
    workers: tuple[WorkerConfig, ...]
    controller: ControllerConfig = field(default_factory=ControllerConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    http: HttpConfig | None = None  # None: no [http] table, no gateway
    supervisor: SupervisorConfig = field(default_factory=SupervisorConfig)

    def model(self, name: str) -> ModelConfig:
        for m in self.models:
            if m.name == name:
                return m
        raise ConfigError(f"{self.path}: no model named {name!r}; models: {[m.name for m in self.models]}")

    def shares_hardware(self) -> bool:
        """Does some drafter worker share a host and device with a verifier worker? On a CPU,
        workers pinned to disjoint `cpus` do not share (an unpinned worker may run anywhere)."""
        local = {"127.0.0.1", "localhost", "::1"}
        place = lambda w: ("local" if w.host in local else w.host, w.device)  # noqa: E731

        def share(d: WorkerConfig, v: WorkerConfig) -> bool:
            if place(d) != place(v):
                return False
            return d.device != "cpu" or not d.cpus or not v.cpus or bool(set(d.cpus) & set(v.cpus))
        return any(share(d, v) for d in self.drafter_workers() for v in self.verifier_workers())

    def pipelined(self) -> bool:
        """Does cosine mode pipeline (see ControllerConfig.pipeline)?"""
        if self.controller.pipeline != "auto":
            return self.controller.pipeline == "on"
        return not self.shares_hardware()

    def background_prefills(self) -> bool:
        """Do model drafters prefill in the background (ControllerConfig.background_prefill)?"""
        if self.controller.background_prefill != "auto":
            return self.controller.background_prefill == "on"
        return not self.shares_hardware()

    def worker(self, name: str) -> WorkerConfig:
        for w in self.workers:
            if w.name == name:
                return w
        raise ConfigError(f"{self.path}: no worker named {name!r}; workers: {[w.name for w in self.workers]}")

    def engine_dir(self, model: str | ModelConfig) -> Path:
        m = model if isinstance(model, ModelConfig) else self.model(model)
        p = Path(m.engine).expanduser()
        return p if p.is_absolute() else (self.path.parent / p).resolve()

    def prefill_engine_dir(self, model: str | ModelConfig) -> Path | None:
        m = model if isinstance(model, ModelConfig) else self.model(model)
        if not m.prefill_engine:
            return None
        p = Path(m.prefill_engine).expanduser()
        return p if p.is_absolute() else (self.path.parent / p).resolve()

    def target_model(self) -> ModelConfig:
        return self.model(self.controller.target) if self.controller.target else \
            next(m for m in self.models if m.role == "target")

    def workers_of(self, model: str) -> list[WorkerConfig]:
        return [w for w in self.workers if w.model == model]

    def drafter_workers(self) -> list[WorkerConfig]:
        return [w for w in self.workers if self.model(w.model).role == "drafter"]

    def model_drafters(self) -> set[str]:
        """Names of the drafter workers that run a neural model (a forward per draft step)."""
        return {w.name for w in self.drafter_workers() if self.model(w.model).kind == "neural"}

    def domain_corpora(self) -> dict[str, list[Path]]:
        """domain -> the text files its n-gram drafters were counted from (those on disk)."""
        out: dict[str, list[Path]] = {}
        for m in self.models:
            if m.role != "drafter" or m.kind != "ngram" or not m.source:
                continue
            p = Path(m.source).expanduser()
            p = p if p.is_absolute() else (self.path.parent / p).resolve()
            if p.is_file():
                for d in m.domains:
                    out.setdefault(d, []).append(p)
        return out

    def verifier_workers(self) -> list[WorkerConfig]:
        return self.workers_of(self.target_model().name)


def _line_of(text: str, table: str, key: str | None) -> str:
    """Best-effort 'line N' for a key inside a table, for error messages."""
    lines = text.splitlines()
    want_table = table.split("[")[0]
    in_table = want_table == ""
    for i, line in enumerate(lines, 1):
        s = line.strip()
        m = re.match(r"^\[\[?\s*([\w.\-]+)\s*\]\]?", s)
        if m:
            in_table = m.group(1) == want_table
            if key is None and in_table:
                return f"line {i}"
            continue
        if in_table and key is not None and re.match(rf"^{re.escape(key)}\s*=", s):
            return f"line {i}"
    return "line ?"


def _build(cls: type, data: Any, where: str, ctx: tuple[Path, str]) -> Any:
    """Strictly build dataclass ``cls`` from a TOML table."""
    path, text = ctx
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: [{where}] must be a table, got {type(data).__name__}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "path"}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        k = unknown[0]
        raise ConfigError(f"{path} {_line_of(text, where, k)}: unknown key {k!r} in [{where}]; "
                          f"known keys: {', '.join(sorted(fields))}")
    kwargs = {}
    for name, f in fields.items():
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{path} {_line_of(text, where, None)}: [{where}] is missing required key {name!r}")
            continue
        kwargs[name] = _convert(hints[name], data[name], f"{where}.{name}", ctx)
    return cls(**kwargs)


def _convert(tp: Any, value: Any, where: str, ctx: tuple[Path, str]) -> Any:
    path, text = ctx
    table, _, key = where.rpartition(".")
    loc = f"{path} {_line_of(text, table, key)}"
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where, ctx)
    if get_origin(tp) is tuple:
        (inner, _) = get_args(tp)
        if not isinstance(value, list) or not all(isinstance(v, inner) for v in value):
            raise ConfigError(f"{loc}: {where} must be a list of {inner.__name__}, got {value!r}")
        return tuple(value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is bool and not isinstance(value, bool) or tp is not bool and (
            isinstance(value, bool) or not isinstance(value, tp)):
        raise ConfigError(f"{loc}: {where} must be {tp.__name__}, got {type(value).__name__} {value!r}")
    return value


def _check(cfg: Config, text: str, check_engines: bool) -> None:
    p = cfg.path
    where = lambda table, key: f"{p} {_line_of(text, table, key)}"  # noqa: E731
    names = [m.name for m in cfg.models]
    for m in cfg.models:
        if names.count(m.name) > 1:
            raise ConfigError(f"{where('models', 'name')}: model name {m.name!r} is used twice; names must be unique")
        if m.role not in ROLES:
            raise ConfigError(f"{where('models', 'role')}: model {m.name!r} has role {m.role!r}; use one of {ROLES}")
        if m.kind not in MODEL_KINDS:
            raise ConfigError(f"{where('models', 'kind')}: model {m.name!r} has kind {m.kind!r}; use one of {MODEL_KINDS}")
        if m.kind != "lookup" and not m.engine:
            raise ConfigError(f"{where('models', 'name')}: model {m.name!r} (kind {m.kind}) needs `engine = \"DIR\"`")
        if m.quantize and m.quantize not in QUANTIZE:
            raise ConfigError(f"{where('models', 'quantize')}: model {m.name!r}: quantize must be one of "
                              f"{', '.join(QUANTIZE)} (or left out for float weights), got {m.quantize!r}")
        if m.matmul and m.matmul not in MATMUL:
            raise ConfigError(f"{where('models', 'matmul')}: model {m.name!r}: matmul must be one of "
                              f"{', '.join(MATMUL)} (or left out for auto), got {m.matmul!r}")
        if m.prefill_engine and (m.role != "target" or m.kind != "neural"):
            raise ConfigError(f"{where('models', 'prefill_engine')}: model {m.name!r}: prefill_engine is for a neural "
                              f"target (its prompts' prefill), not a {m.kind} {m.role}; remove it")
        if m.draft_context and (m.role == "target" or m.draft_context < 8):
            raise ConfigError(f"{where('models', 'draft_context')}: model {m.name!r}: draft_context is 0 (the whole "
                              f"prompt) or >= 8 tokens, and only on drafters")
        if m.kind != "neural" and m.role == "target":
            raise ConfigError(f"{where('models', 'kind')}: the target {m.name!r} must be a neural model, not {m.kind}")
        if check_engines and m.kind != "lookup" and not (cfg.engine_dir(m) / "manifest.json").is_file():
            raise ConfigError(f"{where('models', 'engine')}: engine for model {m.name!r} not found at "
                              f"{cfg.engine_dir(m)} (no manifest.json); build it with "
                              f"`cosine-export --model <weights> --out {cfg.engine_dir(m)}` or run `make demo`")
        pre = cfg.prefill_engine_dir(m)
        if check_engines and pre is not None and not (pre / "manifest.json").is_file():
            raise ConfigError(f"{where('models', 'prefill_engine')}: prefill engine for model {m.name!r} not found at "
                              f"{pre} (no manifest.json); build it from the same weights with "
                              f"`cosine-export --model <weights> --out {pre}` (no --quantize)")
    targets = [m for m in cfg.models if m.role == "target"]
    if not targets:
        raise ConfigError(f"{p}: no model has role = \"target\"; add one [[models]] entry with role = \"target\"")
    if cfg.controller.target:
        cfg.model(cfg.controller.target)
    elif len(targets) > 1:
        raise ConfigError(f"{where('controller', None)}: several target models; set [controller] target = \"NAME\"")
    wnames = [w.name for w in cfg.workers]
    endpoints: dict[tuple[str, int], str] = {}
    for w in cfg.workers:
        if wnames.count(w.name) > 1:
            raise ConfigError(f"{where('workers', 'name')}: worker name {w.name!r} is used twice")
        if w.model not in names:
            raise ConfigError(f"{where('workers', 'model')}: worker {w.name!r} serves unknown model {w.model!r}; "
                              f"models: {names}")
        if w.provider not in PROVIDERS:
            raise ConfigError(f"{where('workers', 'provider')}: worker {w.name!r} provider {w.provider!r}; "
                              f"use one of {PROVIDERS}")
        if not re.fullmatch(r"cpu|cuda(:\d+)?", w.device):
            raise ConfigError(f"{where('workers', 'device')}: worker {w.name!r} device {w.device!r}; use 'cpu' or 'cuda:N'")
        if (w.provider == "cpu") != (w.device == "cpu"):
            raise ConfigError(f"{where('workers', 'provider')}: worker {w.name!r} has provider {w.provider!r} on "
                              f"device {w.device!r}; provider 'cpu' goes with device 'cpu', 'cuda'/'tensorrt' with 'cuda:N'")
        if not 1 <= w.port <= 65535:
            raise ConfigError(f"{where('workers', 'port')}: worker {w.name!r} port {w.port} must be 1..65535")
        key = (w.host, w.port)
        if key in endpoints:
            raise ConfigError(f"{where('workers', 'port')}: workers {endpoints[key]!r} and {w.name!r} both use "
                              f"{w.host}:{w.port}; give each worker its own port")
        endpoints[key] = w.name
        for k in ("max_batch", "kv_budget_tokens"):
            if getattr(w, k) < 1:
                raise ConfigError(f"{where('workers', k)}: worker {w.name!r} {k} must be >= 1")
        if w.threads < 0:
            raise ConfigError(f"{where('workers', 'threads')}: worker {w.name!r} threads must be >= 0 (0 = default)")
        if len(set(w.cpus)) != len(w.cpus) or any(c < 0 for c in w.cpus):
            raise ConfigError(f"{where('workers', 'cpus')}: worker {w.name!r} cpus {list(w.cpus)} must be distinct "
                              f"core numbers >= 0")
        if w.kv_arrays not in KV_ARRAYS:
            raise ConfigError(f"{where('workers', 'kv_arrays')}: worker {w.name!r} kv_arrays {w.kv_arrays!r}; use "
                              f"one of {KV_ARRAYS}")
        if w.cuda_graph and w.provider != "cuda":
            raise ConfigError(f"{where('workers', 'cuda_graph')}: worker {w.name!r}: cuda_graph needs provider "
                              f"\"cuda\" (it has {w.provider!r}); CUDA graphs replay captured GPU kernels")
    if not cfg.verifier_workers():
        raise ConfigError(f"{p}: no worker serves the target model {cfg.target_model().name!r}; add a [[workers]] entry")
    c = cfg.controller
    if not c.verifier_grace_s > 0:
        raise ConfigError(f"{where('controller', 'verifier_grace_s')}: verifier_grace_s must be > 0, "
                          f"got {c.verifier_grace_s}")
    if c.mode not in MODES:
        raise ConfigError(f"{where('controller', 'mode')}: mode {c.mode!r}; use one of {MODES}")
    m = re.fullmatch(r"tcp://([^:]+):(\d+)", c.endpoint)
    if not m:
        raise ConfigError(f"{where('controller', 'endpoint')}: endpoint {c.endpoint!r} must look like tcp://HOST:PORT")
    if (m.group(1), int(m.group(2))) in endpoints:
        raise ConfigError(f"{where('controller', 'endpoint')}: {c.endpoint} is also a worker's port")
    for key in ("pipeline", "background_prefill"):
        if getattr(c, key) not in PIPELINE:
            raise ConfigError(f"{where('controller', key)}: {key} {getattr(c, key)!r}; use one of {PIPELINE}")
    if c.routing.classifier not in CLASSIFIERS:
        raise ConfigError(f"{where('controller.routing', 'classifier')}: classifier {c.routing.classifier!r}; "
                          f"use one of {CLASSIFIERS}")
    s = c.speculation
    if s.gate not in GATES:
        raise ConfigError(f"{where('controller.speculation', 'gate')}: gate {s.gate!r}; use one of {GATES}")
    if not 0.0 <= s.min_gain < 1.0:
        raise ConfigError(f"{where('controller.speculation', 'min_gain')}: need 0 <= min_gain < 1, got {s.min_gain}")
    if s.gate_window < 1 or s.gate_explore_every < 2:
        raise ConfigError(f"{where('controller.speculation', 'gate_window')}: need gate_window >= 1 and "
                          f"gate_explore_every >= 2")
    if not 1 <= s.min_draft_len <= s.draft_len <= s.max_draft_len:
        raise ConfigError(f"{where('controller.speculation', 'draft_len')}: need 1 <= min_draft_len <= draft_len <= max_draft_len")
    if not 1 <= c.fusion.siblings <= 8:
        raise ConfigError(f"{where('controller.fusion', 'siblings')}: need 1 <= siblings <= 8, got {c.fusion.siblings}")
    if not 0.0 < c.fusion.guide_min_reach <= 1.0:
        raise ConfigError(f"{where('controller.fusion', 'guide_min_reach')}: need 0 < guide_min_reach <= 1, "
                          f"got {c.fusion.guide_min_reach}")
    if cfg.logging.level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError(f"{where('logging', 'level')}: level {cfg.logging.level!r}; use DEBUG, INFO, WARNING or ERROR")
    sv = cfg.supervisor
    if not 0 < sv.restart_backoff_s <= sv.restart_backoff_max_s:
        raise ConfigError(f"{where('supervisor', 'restart_backoff_s')}: need 0 < restart_backoff_s <= "
                          f"restart_backoff_max_s, got {sv.restart_backoff_s} and {sv.restart_backoff_max_s}")
    if sv.crash_loop_restarts < 1 or sv.crash_loop_window_s <= 0:
        raise ConfigError(f"{where('supervisor', 'crash_loop_restarts')}: need crash_loop_restarts >= 1 and "
                          f"crash_loop_window_s > 0")
    if cfg.security.curve:
        _check_keys(cfg.security, where)
    if cfg.http is not None:
        _check_http(cfg.http, where, endpoints, (m.group(1), int(m.group(2))))


def _check_http(h: HttpConfig, where: Any, workers: dict[tuple[str, int], str], serve: tuple[str, int]) -> None:
    if not h.host or any(c.isspace() for c in h.host):
        raise ConfigError(f"{where('http', 'host')}: host {h.host!r} must be an address or host name to listen on")
    if not 1 <= h.port <= 65535:
        raise ConfigError(f"{where('http', 'port')}: port {h.port} must be 1..65535")
    if (h.host, h.port) in workers or (h.host, h.port) == serve:
        raise ConfigError(f"{where('http', 'port')}: {h.host}:{h.port} is also used by "
                          f"{workers.get((h.host, h.port), 'cosine-serve')}; give the gateway its own port")
    for k in h.api_keys:
        if not k or any(c.isspace() for c in k) or not k.isprintable():
            raise ConfigError(f"{where('http', 'api_keys')}: every API key must be a non-empty string without "
                              f"spaces (clients send it as `Authorization: Bearer KEY`)")
    for k in ("body_timeout_s", "request_timeout_s"):
        if not getattr(h, k) > 0:
            raise ConfigError(f"{where('http', k)}: {k} must be > 0, got {getattr(h, k)}")


def _check_keys(sec: SecurityConfig, where: Any) -> None:
    """curve = true: every key file must exist and hold the right kind of key."""
    import zmq.auth

    fix = "create keys with `cosine keys generate --dir keys` and paste the [security] block it prints"
    for k in (*SecurityConfig.FILES, "authorized_keys_dir"):
        if not getattr(sec, k):
            raise ConfigError(f"{where('security', None)}: curve = true needs {k}; {fix}")
    for k in SecurityConfig.FILES:
        f = Path(getattr(sec, k))
        if not f.is_file():
            raise ConfigError(f"{where('security', k)}: {k} file {f} not found; {fix}")
        try:
            pub, secret = zmq.auth.load_certificate(f)
        except (OSError, ValueError) as e:
            raise ConfigError(f"{where('security', k)}: {k} file {f} is not a ZeroMQ key file ({e})") from None
        if k.endswith("secret_key") and not secret:
            raise ConfigError(f"{where('security', k)}: {k} file {f} holds no secret key; "
                              f"give the .key_secret file, not the public .key")
    d = Path(sec.authorized_keys_dir)
    if not d.is_dir():
        raise ConfigError(f"{where('security', 'authorized_keys_dir')}: authorized_keys_dir {d} not found; {fix}")
    if not any(d.glob("*.key")):
        raise ConfigError(f"{where('security', 'authorized_keys_dir')}: authorized_keys_dir {d} holds no client "
                          f"public keys (*.key), so every client would be refused; add them with "
                          f"`cosine keys generate --dir ... --client NAME`")


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def load(path: str | Path, check_engines: bool = True) -> Config:
    """Read and validate config.toml. ``check_engines`` also requires every engine on disk."""
    p = Path(path).expanduser().resolve()
    if not p.is_file():
        raise ConfigError(f"config file {p} not found; pass --config PATH (the repo's config.toml runs the local demo)")
    text = p.read_text()
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: not valid TOML: {e}") from None
    ctx = (p, text)
    known = {"models", "workers", "controller", "limits", "security", "logging", "http", "supervisor"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{p} {_line_of(text, unknown[0], None)}: unknown table [{unknown[0]}]; "
                          f"known: {', '.join(sorted(known))}")
    for arr in ("models", "workers"):
        if not isinstance(data.get(arr, []), list):
            raise ConfigError(f"{p}: '{arr}' must be an array of tables, written [[{arr}]]")
    models = tuple(_build(ModelConfig, m, "models", ctx) for m in data.get("models", []))
    workers = tuple(_build(WorkerConfig, w, "workers", ctx) for w in data.get("workers", []))
    rest = {k: _build(tp, data[k], k, ctx) for k, tp in
            (("controller", ControllerConfig), ("limits", LimitsConfig),
             ("security", SecurityConfig), ("logging", LoggingConfig), ("http", HttpConfig),
             ("supervisor", SupervisorConfig)) if k in data}
    if "security" in rest:  # key paths, like engine paths, are relative to this file
        sec = rest["security"]
        rest["security"] = dataclasses.replace(sec, **{
            k: str((p.parent / Path(v).expanduser()).resolve())
            for k in (*SecurityConfig.FILES, "authorized_keys_dir") if (v := getattr(sec, k))})
    cfg = Config(path=p, models=models, workers=workers, **rest)
    _check(cfg, text, check_engines)
    return cfg


def load_for_cli(path: str | Path, prog: str, check_engines: bool = True) -> Config | None:
    """load() for a command's main: on a config mistake print one line naming the
    command and return None (the caller exits 2), never a traceback."""
    try:
        return load(path, check_engines=check_engines)
    except ConfigError as e:
        import sys

        print(f"{prog}: {e}", file=sys.stderr)
        return None
