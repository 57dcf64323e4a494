"""One logging set-up for every cosine process: level and optional file from config.toml."""

from __future__ import annotations

import logging
import os
import sys


def setup(level: str = "INFO", file: str = "", process: str = "") -> None:
    fmt = f"%(asctime)s %(levelname)s {process + ' ' if process else ''}%(name)s: %(message)s"
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if file:
        handlers.append(logging.FileHandler(os.path.expanduser(file)))
    logging.basicConfig(level=level.upper(), format=fmt, handlers=handlers, force=True)
