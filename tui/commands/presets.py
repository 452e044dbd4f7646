"""`qlc presets [NAME]`: the ready recipes, or one preset resolved with its overrides."""

from __future__ import annotations

import argparse
import sys

from rich.table import Table

from engine import preflight
from engine.config import list_presets, load_preset, origin, read_yaml
from engine.errors import UserError
from tui.output import out, print_json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("presets", help="list presets, or show one resolved with --set overrides")
    p.add_argument("name", nargs="?", help="a preset to show in full")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--json", action="store_true", help="print the list, or the resolved preset, as JSON")
    p.set_defaults(func=run_presets)


def run_presets(args: argparse.Namespace) -> int:
    if args.name:
        cfg = load_preset(args.name, args.overrides)
        # What `qlc train` and `qlc estimate` would refuse.
        preflight.check_gpu_name(cfg, lambda key: origin(args.name, args.overrides, key))
        if args.json:
            print_json(cfg.to_dict())
        else:
            sys.stdout.write(cfg.to_yaml())  # verbatim: YAML is neither markup nor to be wrapped
        return 0
    rows = []
    for path in list_presets():
        try:
            data = read_yaml(path)
        except UserError as exc:
            rows.append(
                {"name": path.stem, "model": "?", "description": f"(unreadable: {exc})", "path": str(path)}
            )
            continue
        model = data.get("model", {}) if isinstance(data.get("model"), dict) else {}
        rows.append(
            {
                "name": path.stem,
                "model": model.get("name_or_path", "?"),
                "description": data.get("description", ""),
                "path": str(path),
            }
        )
    if args.json:
        print_json(rows)
        return 0
    table = Table(box=None, header_style="bold")
    table.add_column("preset")
    table.add_column("model")
    table.add_column("description")
    for row in rows:
        table.add_row(row["name"], row["model"], row["description"])
    out.print(table)
    return 0
