"""Seconds per test file, from a run's `--durations=0` report: the weights the suite's order is taken from.

    make test PYTEST_ARGS="--durations=0" | tee run.log && .venv/bin/python -m tests.durations run.log
"""

from __future__ import annotations

import json
import re
import sys
from collections import Counter
from pathlib import Path

TABLE = Path(__file__).with_name("durations.json")
LINE = re.compile(r"^([\d.]+)s (?:call|setup|teardown)\s+(tests/\S+?\.py)::")


def per_file(log: str) -> dict[str, int]:
    seconds: Counter[str] = Counter()
    for line in log.splitlines():
        if m := LINE.match(line):
            seconds[m.group(2)] += float(m.group(1))
    return {f: round(s) for f, s in sorted(seconds.items())}


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    table = per_file(Path(argv[0]).read_text())
    if not table:
        print(f"{argv[0]}: no `--durations=0` lines", file=sys.stderr)
        return 1
    TABLE.write_text(json.dumps(table, indent=1) + "\n")
    print(f"{TABLE}: {len(table)} files, {sum(table.values())} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
