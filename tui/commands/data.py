"""`qlc data PRESET`: what a preset's dataset will train on, before any GPU time is spent.

Two steps. The source is read and validated here, in-process (pure Python: a bad row is one line
and exit 2). Then an engine process (`python -m engine data CONFIG.yaml`) loads the model's
tokenizer and prepares the data exactly as training would, reporting progress (examples/s, ETA,
shown on stderr) and then the report as one JSON line. The prepared rows stay in the engine's
data cache: the `qlc train` that follows reuses them. The console never imports torch,
transformers or datasets.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.text import Text

from engine import protocol
from engine.config import RunConfig, load_preset
from engine.data import DataReport, SourceSummary, bad_records, check_source
from engine.errors import UserError
from engine.run.launcher import engine_command
from tui.output import err, fmt_progress, out, print_json

ROOT = Path(__file__).resolve().parent.parent.parent
BAR_WIDTH = 32
EXAMPLE_CHARS = 1600
# Without colour the trained spans are bracketed instead of highlighted.
TRAINED_OPEN, TRAINED_CLOSE = "[[", "]]"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "data",
        help="check a preset's dataset and report what training will see",
        description="Validate the dataset, then template, tokenize and mask it as training would: "
        "examples, token lengths, truncation, tokens and steps per epoch, and a rendered example.",
    )
    p.add_argument("preset", help="a preset name or a path to a preset YAML")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--json", action="store_true", help="print the source summary and report as JSON")
    p.set_defaults(func=run_data)


def run_data(args: argparse.Namespace) -> int:
    cfg = load_preset(args.preset, args.overrides)
    summary = check_source(cfg)
    if not args.json:
        out.print(_source_line(cfg, summary))
    report = engine_report(cfg)
    if args.json:
        print_json({"source": summary.to_dict(), "report": report.to_dict()})
        return 0
    print_report(cfg, summary, report)
    return 0


class ProgressPrinter:
    """Data preparation's progress on stderr (stdout stays the report): a line when a phase
    starts or ends, and every few seconds in between (the engine reports a few times a second)."""

    EVERY_S = 5.0

    def __init__(self) -> None:
        self._message = ""
        self._printed = float("-inf")

    def __call__(self, ev: protocol.StageEvent) -> None:
        now = time.monotonic()
        finished = ev.total > 0 and ev.current >= ev.total
        if ev.message == self._message and not finished and now - self._printed < self.EVERY_S:
            return
        self._message, self._printed = ev.message, now
        progress = fmt_progress(ev.current, ev.total, ev.unit, ev.rate, ev.eta_s)
        text = f"preparing data{' ' + progress if progress else ''}: {short_path(ev.message)}"
        err.print(text, style="dim", markup=False, soft_wrap=True)


def engine_report(
    cfg: RunConfig, progress: Callable[[protocol.StageEvent], None] | None = None
) -> DataReport:
    """Run the engine's data step on `cfg` in a child process: its progress events go to
    `progress` (stderr by default), its one-line JSON report is returned."""
    show = progress or ProgressPrinter()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    report: dict[str, Any] | None = None
    with tempfile.TemporaryDirectory(prefix="qlc-data-") as tmp:
        config = Path(tmp) / "config.yaml"
        config.write_text(cfg.to_yaml(), encoding="utf-8")
        proc = subprocess.Popen(
            engine_command("data", str(config)),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        stderr: list[str] = []
        drain = threading.Thread(target=lambda: stderr.extend(proc.stderr or []), daemon=True)
        drain.start()
        for line in proc.stdout or []:
            if not line.startswith("{"):
                continue
            data = json.loads(line)
            if "type" not in data:
                report = data
            elif data["type"] == "stage":
                show(protocol.decode_event(line))
        returncode = proc.wait()
        drain.join()
    if returncode == 2:
        lines = [line.rstrip("\n") for line in stderr if line.startswith("error: ")]
        raise UserError(lines[-1].removeprefix("error: ") if lines else "the data step failed (exit 2)")
    if returncode != 0:
        err.print("".join(stderr).strip()[-4000:], markup=False)
        raise SystemExit(1)
    if report is None:
        raise UserError("the data step printed no report")
    return DataReport.from_dict(report)


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------


def _source_line(cfg: RunConfig, summary: SourceSummary) -> Text:
    line = Text.assemble((cfg.name or "preset", "bold"), "  ", short_path(summary.source))
    if summary.location == "local":
        files = f", {len(summary.files)} files" if len(summary.files) > 1 else ""
        skipped = f", {bad_records(summary.skipped)} skipped" if summary.skipped else ""
        line.append(f"  ({summary.format}, {summary.examples:,} examples{skipped}{files})")
    if summary.note:
        line.append(f"\n{summary.note}", style="dim")
    return line


def short_path(text: str) -> str:
    """Paths under the working folder, said relative to it."""
    return text.replace(os.getcwd() + os.sep, "")


def _row(label: str, *parts: Any) -> Text:
    return Text.assemble((f"{label:<11}", "bold"), *parts)


def _plain() -> bool:
    return bool(out.no_color) or out.color_system is None


def print_report(cfg: RunConfig, summary: SourceSummary, r: DataReport) -> None:
    if r.template:
        own = f"tokenizer's own ({_family(r)})" if r.template == "tokenizer" else r.template
        eot = f" · turns end with {r.end_of_turn}" if r.end_of_turn else ""
        mask = "responses only" if r.responses_only else "all tokens"
        out.print(_row("template", f"{own}{eot} · {mask}"))
    held = f" · {r.eval_examples:,} eval" if r.eval_examples else ""
    out.print(_row("examples", f"{r.examples:,} train{held}"))
    out.print(
        _row(
            "length",
            f"p50 {r.length_p50:,} · p95 {r.length_p95:,} · max {r.length_max:,} tokens (seq_len {r.seq_len:,})",
        )
    )
    for line in histogram_lines(r):
        out.print(line)
    cut = f"{r.truncated:,} truncated ({r.truncated_tokens:,} tokens lost)" if r.truncated else "0 truncated"
    reasons = ", ".join(f"{n:,} {why.replace('_', ' ')}" for why, n in r.dropped_reasons.items())
    out.print(_row("too long", f"{cut} · {r.dropped:,} dropped" + (f" ({reasons})" if reasons else "")))
    share = f" ({r.trained_tokens_per_epoch / r.tokens_per_epoch:.0%})" if r.tokens_per_epoch else ""
    out.print(
        _row("tokens", f"{r.tokens_per_epoch:,} per epoch · {r.trained_tokens_per_epoch:,} trained{share}")
    )
    if r.packing:
        fill = f", {r.pack_fill:.0%} full" if r.pack_fill is not None else ""
        out.print(_row("packing", f"{r.examples:,} examples in {r.rows:,} rows of {r.seq_len:,}{fill}"))
    batch = r.micro_batch * r.grad_accum
    limit = " (train.max_steps)" if cfg.train.max_steps is not None else f" ({cfg.train.epochs:g} epochs)"
    out.print(
        _row(
            "steps",
            f"{r.steps_per_epoch:,} per epoch at batch {batch} ({r.micro_batch} × {r.grad_accum}) · {r.total_steps:,} total{limit}",
        )
    )
    for warning in r.warnings:
        out.print(Text(f"warning: {warning}", style="yellow"))
    if r.example:
        legend = f"trained in {TRAINED_OPEN} {TRAINED_CLOSE}" if _plain() else "trained highlighted"
        out.print(_row("example", short_path(r.example_where), (f"  ({legend})", "dim")))
        out.print(example_text(r.example, plain=_plain()))


def _family(r: DataReport) -> str:
    families = {"<|eot_id|>": "llama3", "<end_of_turn>": "gemma3", "<|im_end|>": "chatml", "</s>": "mistral"}
    return families.get(r.end_of_turn or "", "unknown family")


def histogram_lines(r: DataReport) -> list[Text]:
    if not r.histogram:
        return []
    top = max(b.count for b in r.histogram) or 1
    width = len(f"{r.histogram[-1].hi:,}")
    lines = []
    for b in r.histogram:
        bar = "█" * max(1 if b.count else 0, round(b.count / top * BAR_WIDTH))
        over = b.hi > r.seq_len
        label = f"{b.lo:>{width},}–{b.hi:<{width},}"
        line = Text.assemble(" " * 11, (label, "dim"), " ", (bar, "red" if over else "cyan"), f" {b.count:,}")
        if over:
            line.append("  > seq_len", style="red")
        lines.append(line)
    return lines


def example_text(spans: list[tuple[str, bool]], plain: bool, limit: int = EXAMPLE_CHARS) -> Text:
    text = Text()
    used = 0
    for piece, trained in spans:
        if used >= limit:
            text.append(" …", style="dim")
            break
        piece = piece[: limit - used]
        used += len(piece)
        if trained:
            text.append(
                f"{TRAINED_OPEN}{piece}{TRAINED_CLOSE}" if plain else piece, style="bold green reverse"
            )
        else:
            text.append(piece, style="dim")
    return text
