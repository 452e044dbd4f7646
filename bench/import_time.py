"""Where an import's time goes, from `python -X importtime` output, as JSON.

    python -X importtime -c "import unsloth" 2> unsloth.txt
    python -m bench.import_time unsloth.txt [more.txt ...] --wall 30.5 [--wall ...] --out OUT.json

For each file: the sum of the modules' own times, the subtrees that took the longest (cumulative,
with their depth, so a reader sees which top-level import pulled them in), and the modules whose own
code ran longest (module-level work: patching, code generation), besides the wall time measured
around the process when --wall gives it.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

LINE = re.compile(r"import time:\s+(\d+) \|\s+(\d+) \|(\s*)(\S+)")


def parse(text: str) -> list[tuple[int, int, int, str]]:
    """(self us, cumulative us, depth, module) per line, in the order Python wrote them."""
    rows = []
    for line in text.splitlines():
        m = LINE.match(line)
        if m:
            rows.append((int(m[1]), int(m[2]), (len(m[3]) - 1) // 2, m[4]))
    return rows


def summary(rows: list[tuple[int, int, int, str]], top: int = 15) -> dict[str, Any]:
    roots = [r for r in rows if r[2] == 0]
    return {
        "modules": len(rows),
        "self_total_s": round(sum(r[0] for r in rows) / 1e6, 2),
        "top_level_s": {r[3]: round(r[1] / 1e6, 2) for r in sorted(roots, key=lambda r: -r[1])[:top]},
        "longest_subtrees": [
            {"module": r[3], "depth": r[2], "cumulative_s": round(r[1] / 1e6, 2)}
            for r in sorted(rows, key=lambda r: -r[1])
            if r[1] >= 1e6
        ][: 3 * top],
        "longest_own_code": [
            {"module": r[3], "self_s": round(r[0] / 1e6, 2)} for r in sorted(rows, key=lambda r: -r[0])[:top]
        ],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", type=Path, nargs="+")
    ap.add_argument("--wall", type=float, action="append", default=[], help="wall seconds, one per file")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--note", default="")
    args = ap.parse_args(argv)
    report: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "bench": "bench/import_time.py",
        "note": args.note,
    }
    for i, f in enumerate(args.files):
        entry = summary(parse(f.read_text(encoding="utf-8", errors="replace")))
        if i < len(args.wall):
            entry["wall_s"] = args.wall[i]
        report[f.name] = entry
        print(
            f"{f.name}: {entry['modules']} modules, own code {entry['self_total_s']} s"
            + (f", wall {entry['wall_s']} s" if "wall_s" in entry else "")
        )
    text = json.dumps(report, indent=1) + "\n"
    if args.out:
        args.out.write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
