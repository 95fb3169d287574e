"""``feclip-cache``: see and clear feclip's caches under ``paths.cache_dir``.

Usage::

    feclip-cache list  [--cache-dir DIR] [--adapters] [--outputs] [--decoded]
    feclip-cache clear [--cache-dir DIR] [--adapters] [--outputs] [--decoded] [--older-than DAYS]

The caches (none of them changes a number; :mod:`feclip.engine.store`): ``adapters`` (trained adapters
keyed by their training identity, ``train.reuse``), ``outputs`` (the model's raw outputs on a target,
``eval.reuse_outputs``) and ``decoded`` (decoded, resized images and masks, ``data.decoded_cache``).
Without a kind flag a command covers all three. ``list`` prints one line per entry: kind, key, size,
creation time and what it was made from. ``clear`` removes entries (those older than ``--older-than``
days, or all) and says how much it freed; an entry another process is making is left alone. The
generated synthetic data (``<cache_dir>/data``) is never touched.

Exit status: 0 success; 2 a usage error (one line ``feclip-cache: error: ...``); 130 interrupted.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from pathlib import Path

from feclip.apps.common import OneLineParser, one_line, run_app
from feclip.config import PathsConfig
from feclip.engine.store import KINDS, clear, list_entries
from feclip.errors import ConfigError

__all__ = ["PROG", "build_parser", "main"]

PROG = "feclip-cache"


class _CommandParser(OneLineParser):
    """A sub-command's parser: usage mistakes read ``feclip-cache: error: ...`` like the app's own."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{PROG}: error: {one_line(message)} (see {self.prog} --help)\n")


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def _kinds(args) -> tuple[str, ...]:
    chosen = tuple(k for k in KINDS if getattr(args, k))
    return chosen or KINDS


def _cache_dir(args) -> Path:
    path = Path(args.cache_dir).expanduser()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--cache-dir {path} is not a folder")
    return path


def _cmd_list(args) -> int:
    root = _cache_dir(args)
    entries = list_entries(root, _kinds(args))
    if not entries:
        print(f"no cache entries under {root} ({', '.join(_kinds(args))})")
        return 0
    for e in entries:
        created = time.strftime("%Y-%m-%d %H:%M", time.localtime(e.created))
        print(f"{e.kind:<9} {e.key[:16]:<16} {_size(e.bytes):>9}  {created}  {e.made_from}")
    total = sum(e.bytes for e in entries)
    print(f"{len(entries)} entries, {_size(total)} under {root}")
    return 0


def _cmd_clear(args) -> int:
    if args.older_than is not None and args.older_than < 0:
        raise ConfigError(f"--older-than takes a number of days >= 0, got {args.older_than}")
    root = _cache_dir(args)
    removed = clear(root, _kinds(args), args.older_than)
    for e in removed:
        print(f"removed {e.kind} {e.key[:16]} ({_size(e.bytes)})")
    age = f" older than {args.older_than:g} days" if args.older_than is not None else ""
    print(
        f"removed {len(removed)} entries{age} ({_size(sum(e.bytes for e in removed))}) "
        f"of {', '.join(_kinds(args))} under {root}"
    )
    return 0


def build_parser() -> OneLineParser:
    """The ``feclip-cache`` parser with its two sub-commands."""
    parser = OneLineParser(
        prog=PROG, description="See and clear feclip's caches (adapters, outputs, decoded)."
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_CommandParser)
    for name, helptext, func in (
        ("list", "one line per cache entry: kind, key, size, created, made from", _cmd_list),
        ("clear", "remove cache entries (all, or those older than --older-than days)", _cmd_clear),
    ):
        p = sub.add_parser(name, help=helptext)
        p.add_argument(
            "--cache-dir",
            default=PathsConfig.cache_dir,
            help=f"paths.cache_dir of the runs (default {PathsConfig.cache_dir}, relative to this folder)",
        )
        p.add_argument("--adapters", action="store_true", help="trained adapters (train.reuse)")
        p.add_argument("--outputs", action="store_true", help="the model's outputs (eval.reuse_outputs)")
        p.add_argument("--decoded", action="store_true", help="decoded images (data.decoded_cache)")
        if name == "clear":
            p.add_argument("--older-than", type=float, default=None, metavar="DAYS")
        p.set_defaults(func=func)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``feclip-cache``; returns the exit status."""
    args = build_parser().parse_args(argv)
    return run_app(PROG, lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
