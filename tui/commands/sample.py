"""`qlc sample RUN "prompt"`: generate from a checkpoint (default) or the live model (--live)."""

from __future__ import annotations

import argparse
import uuid

from rich.markup import escape

from engine import protocol
from engine.config import load_resolved
from engine.errors import UserError
from engine.run import launcher, runs
from tui.commands.runs import find_run
from tui.follow import EventPrinter, iter_file_from, pipe_events
from tui.output import err


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sample", help="generate from a run's checkpoint, final adapter, or live model")
    p.add_argument(
        "run", help="run id (or a unique part of it, or `last`; with --live, the newest one running)"
    )
    p.add_argument("prompt", help="the user message")
    p.add_argument("--checkpoint", help="a checkpoint step, `adapter` (the final one) or `latest` (default)")
    p.add_argument(
        "--live", action="store_true", help="sample from the running model at its next step, without saving"
    )
    p.add_argument("--system", help="a system message")
    p.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate at most")
    p.add_argument("--temperature", type=float, default=0.7, help="0 for greedy decoding")
    p.add_argument(
        "--top-p",
        type=float,
        default=0.9,
        help="sample from the likeliest tokens whose probabilities add up to this",
    )
    p.add_argument("--timeout", type=float, default=600, help="seconds to wait for a live sample")
    p.add_argument("--json", action="store_true", help="print events as JSON lines")
    p.set_defaults(func=run_sample)


def run_sample(args: argparse.Namespace) -> int:
    if not args.prompt.strip():
        raise UserError("the prompt is empty", "give the message to answer, e.g. qlc sample last 'Hello'")
    # Each value named on its own, and the console's bounds (it took --max-new-tokens 100000).
    if not 1 <= args.max_new_tokens <= protocol.MAX_NEW_TOKENS_LIMIT:
        raise UserError(
            f"--max-new-tokens {args.max_new_tokens}: must be a whole number from 1 to "
            f"{protocol.MAX_NEW_TOKENS_LIMIT}"
        )
    if not 0 <= args.temperature <= protocol.TEMPERATURE_LIMIT:
        raise UserError(
            f"--temperature {args.temperature:g}: must be from 0 (greedy) to {protocol.TEMPERATURE_LIMIT:g}"
        )
    if not 0 < args.top_p <= 1:
        raise UserError(f"--top-p {args.top_p:g}: must be above 0, up to 1")
    # --live asks a running engine: there `last` is the newest run running, not a newer one that ended.
    run_dir = find_run(args, live=args.live)
    request = protocol.SampleRequest(
        prompt=args.prompt,
        request_id=uuid.uuid4().hex[:8],
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        system=args.system,
    )
    printer = EventPrinter(args.json)
    if args.live:
        if args.checkpoint:
            raise UserError("--live and --checkpoint exclude each other")
        _, offset = runs.read_events(run_dir)
        runs.send_command(run_dir, request)
        for ev in iter_file_from(run_dir, offset, args.timeout):
            if getattr(ev, "request_id", None) == request.request_id:
                printer(ev)
                if isinstance(ev, protocol.Sample):
                    return 0
        err.print("no sample came back: the run ended or the wait timed out")
        return 1
    # What would be loaded, checked before anything is: "no checkpoint yet" takes no model load.
    adapter = runs.resolve_adapter(run_dir, args.checkpoint)
    if not args.json:
        model = load_resolved(run_dir / runs.CONFIG).model.name_or_path
        err.print(
            f"[dim]loading {escape(model)} + {adapter.name} (the engine starts; this takes a while)…[/]"
        )
    proc = launcher.launch_sample(run_dir, args.checkpoint, protocol.encode(request).decode().strip())
    code = 1
    for ev in pipe_events(proc):
        if isinstance(ev, protocol.ErrorEvent):
            err.print(f"qlc: error: {ev.message}" + (f" ({ev.hint})" if ev.hint else ""))
            code = 2 if ev.kind == "input" else 1
            continue
        if not isinstance(ev, protocol.StageEvent) or args.json:
            printer(ev)
        if isinstance(ev, protocol.Sample):
            code = 0
    proc.wait()
    return code
