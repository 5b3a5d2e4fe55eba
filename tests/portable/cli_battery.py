"""Run many CLI commands in one process (tests/test_portable.py starts it under cp1252, LANG=C, hidden POSIX calls).

    python cli_battery.py COMMANDS.json RESULTS.json

COMMANDS.json: a list of [label, argv]. Each command runs through `mergekit_sdxl.cli.main.main(argv)` as the
console script would, with argv as Python would have decoded it from a shell's UTF-8 bytes (under LANG=C without
UTF-8 mode: surrogate-escaped); a marker line `=== label ===` goes to stdout and stderr before it, so the parent can
tell which command printed what. RESULTS.json: {label: exit code}. One process for all commands keeps the cost of
importing torch to once per environment.
"""

from __future__ import annotations

import json
import os
import sys


def main() -> None:
    from mergekit_sdxl.cli.main import main as cli_main

    commands = json.loads(open(sys.argv[1], encoding="utf-8").read())
    codes: dict[str, object] = {}
    for label, argv in commands:
        argv = [os.fsdecode(arg.encode("utf-8")) for arg in argv]
        for stream in (sys.stdout, sys.stderr):
            print(f"=== {label} ===", file=stream, flush=True)
        try:
            cli_main(argv)
            code: object = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except BaseException as exc:  # noqa: BLE001 - reported to the parent, which fails the test
            code = f"{type(exc).__name__}: {exc}"
        codes[label] = code
        sys.stdout.flush()
        sys.stderr.flush()
    with open(sys.argv[2], "w", encoding="utf-8") as f:
        json.dump(codes, f)


if __name__ == "__main__":
    main()
