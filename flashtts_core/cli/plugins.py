"""``flashtts plugins [--check] [--json]``: what is installed, and whether it works here."""

from __future__ import annotations

import argparse
import sys
from typing import Any

__all__ = ("add_parser", "run")


def add_parser(sub: Any) -> None:
    p = sub.add_parser("plugins", help="list installed backends and engines")
    p.add_argument("--check", action="store_true", help="exit with status 1 when a plugin is broken or incompatible")
    p.add_argument("--json", action="store_true", help="print a JSON list")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import msgspec

    from flashtts_core.plugins.registry import get_registry

    # Plugin modules must be cheap to import (no runtime at import time), so listing always checks them.
    rows = get_registry().list(check=True)
    if args.json:
        sys.stdout.write(msgspec.json.encode(rows).decode() + "\n")
    else:
        headers = ("name", "kind", "distribution", "version", "status", "reason")
        table = [headers] + [(r.name, r.kind, r.distribution, r.version, r.status, r.reason or "") for r in rows]
        widths = [max(len(row[i]) for row in table) for i in range(len(headers) - 1)]
        for row in table:
            sys.stdout.write(
                "  ".join(c.ljust(w) for c, w in zip(row[:-1], widths, strict=True)) + "  " + row[-1] + "\n"
            )
    if args.check and any(r.status in ("broken", "incompatible") for r in rows):
        return 1
    return 0
