"""The ``flashpage`` command: ``flashpage info``, ``flashpage bench scheduler``."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

BIN_DIR = Path(__file__).resolve().parent / "bin"


def bench_binary(name: str) -> Path:
    path = BIN_DIR / name
    if not path.is_file():
        raise SystemExit(f"flashpage: benchmark binary {path} is missing (is the wheel complete?)")
    return path


def cmd_info(_: argparse.Namespace) -> int:
    from flashpage.platform import platform_info

    print(json.dumps(platform_info(), indent=2))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    binary = bench_binary(f"bench_{args.what}")
    return subprocess.call([os.fspath(binary), *args.rest])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flashpage", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="version, CPU ISA in use, CUDA backend status").set_defaults(func=cmd_info)
    bench = sub.add_parser("bench", help="run a benchmark binary shipped with the wheel")
    bench.add_argument("what", choices=["scheduler"])
    bench.add_argument("rest", nargs=argparse.REMAINDER, help="arguments passed to the binary")
    bench.set_defaults(func=cmd_bench)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
