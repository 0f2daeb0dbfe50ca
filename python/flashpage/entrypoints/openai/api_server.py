"""`python -m flashpage.entrypoints.openai.api_server --model DIR ...`: vLLM's way of starting its
OpenAI server, as `flashpage serve` (the same flags)."""

from __future__ import annotations

import sys

from flashpage.cli import main as cli_main


def main(argv: list[str] | None = None) -> int:
    return cli_main(["serve", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
