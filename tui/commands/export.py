"""`qlc export RUN`: merge a run's adapter into its 16-bit base (or copy the adapter alone), check
it, write a model card, and optionally convert it to GGUF. The work runs in an engine process;
this command checks the arguments first (bad input: one line, exit 2, nothing started) and prints
the engine's progress and result."""

from __future__ import annotations

import argparse
import contextlib
import signal
import subprocess

from rich.markup import escape

from engine import protocol
from engine.export import DEVICES, DTYPES, GGUF_TYPES, request_from_args
from engine.memory import SHARD_DEFAULT
from engine.run import launcher, runs
from tui.commands.runs import find_run
from tui.follow import EventPrinter, pipe_events
from tui.output import err, out


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="merge a run's adapter into its base model (or copy the adapter), check it, write a model card",
    )
    p.add_argument("run", help="run id (or a unique part of it, or `last`)")
    p.add_argument(
        "--checkpoint",
        help="a checkpoint step, or `adapter` (the final one); default: the final adapter, else the newest checkpoint",
    )
    p.add_argument(
        "--out", help="the folder to write (must not exist, or be empty); default RUN/exports/NAME"
    )
    p.add_argument("--dtype", choices=DTYPES, help="merged weights' dtype (default: the run's compute dtype)")
    p.add_argument("--adapter-only", action="store_true", help="the adapter + tokenizer + card, no merge")
    p.add_argument("--gguf", metavar="TYPE", help=f"also write GGUF with llama.cpp: {', '.join(GGUF_TYPES)}")
    p.add_argument("--base", help="the 16-bit base to merge into (default: the run's model)")
    p.add_argument(
        "--device", choices=DEVICES, default="auto", help="where to merge (auto: the GPU if it has room)"
    )
    p.add_argument(
        "--max-shard-size", default=SHARD_DEFAULT, help=f"safetensors shard size (default {SHARD_DEFAULT})"
    )
    p.add_argument("--json", action="store_true", help="print the engine's events as JSON lines")
    p.set_defaults(func=run_export)


def print_result(ev: protocol.Exported) -> None:
    what = "merged model" if ev.kind == "merged" else "adapter"
    out.print(f"[bold green]exported[/] {what} ({ev.source}, {ev.dtype}) → {escape(ev.out_dir)}")
    out.print(f"  {len(ev.files)} files, {ev.size_mb:,.1f} MB: {escape(', '.join(ev.files))}")
    if ev.max_logit_diff is not None and ev.tolerance is not None:
        out.print(
            f"  check: largest logit difference {ev.max_logit_diff:.4g} (tolerance {ev.tolerance:.4g}"
            + (f": {escape(ev.tolerance_basis)}" if ev.tolerance_basis else "")
            + f") over "
            f"{ev.prompts} prompts, {ev.tokens} tokens; the adapter moves logits by up to {ev.adapter_effect:.4g}"
        )
    if ev.eos_token_ids:
        out.print(f"  stops on token ids {', '.join(map(str, ev.eos_token_ids))}")
    if ev.kind == "merged":
        memory = f"{ev.peak_host_gb:.2f} GiB peak RAM" if ev.peak_host_gb is not None else ""
        if ev.peak_gpu_gb is not None:
            memory += f", {ev.peak_gpu_gb:.2f} GiB peak GPU"
        if ev.estimate_gb is not None:
            memory += f" (estimated {ev.estimate_gb:.2f} GiB)"
        out.print(f"  merged on {escape(ev.device)} in {ev.seconds:.1f} s · {memory}")
    if ev.gguf_path:
        out.print(f"  GGUF: {escape(ev.gguf_path)}")
    elif ev.gguf_note and ev.kind == "merged":
        out.print(f"  [dim]GGUF: {escape(ev.gguf_note)}[/]")


def run_export(args: argparse.Namespace) -> int:
    run_dir = find_run(args)
    request = request_from_args(run_dir, args)
    proc = launcher.launch_export(run_dir, request.engine_args())
    printer = EventPrinter(args.json)
    code = 1
    try:
        for ev in pipe_events(proc):
            if args.json:
                printer(ev)
            elif isinstance(ev, protocol.Hello):
                target = "adapter" if request.adapter_only else f"merged {request.dtype}"
                source = "final adapter" if request.step is None else request.source.name
                out.print(f"[bold]export {ev.run_id}[/] · {source} → {target}")
            elif isinstance(ev, protocol.Exported):
                print_result(ev)
            elif isinstance(ev, protocol.ErrorEvent):
                err.print(f"qlc: error: {escape(ev.message)}" + (f" ({escape(ev.hint)})" if ev.hint else ""))
            elif not isinstance(ev, protocol.Log) or ev.level != "debug":
                printer(ev)
            if isinstance(ev, protocol.Exported):
                code = 0
            elif isinstance(ev, protocol.ErrorEvent):
                code = 2 if ev.kind == "input" else 1
        proc.wait()
    except KeyboardInterrupt:
        # The engine runs in its own session: pass the interrupt on, and let it clean up. A second
        # Ctrl-C meanwhile is ignored: leaving now would leave its temporary folder behind.
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=30)
        finally:
            signal.signal(signal.SIGINT, previous)
        err.print("export cancelled; nothing was written")
        return 130
    if code == 1 and proc.returncode not in (0, 1, 2):
        err.print(f"qlc: error: the engine exited ({proc.returncode}); see {run_dir / runs.ENGINE_LOG}")
    return code
