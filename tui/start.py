"""Starting a run from the console: the confirmations a person answers, then the same pre-flight
as `qlc train` (engine.preflight) before any run directory exists."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from rich.text import Text

from engine.config import PresetDraft
from engine.errors import UserError
from engine.run import runs
from tui import budget
from tui.client import RunClient
from tui.history import RunHistory
from tui.screens.confirm import ConfirmScreen

if TYPE_CHECKING:
    from tui.app import QlcApp


async def _confirmed(app: QlcApp, screen: ConfirmScreen) -> bool:
    return bool(await app.push_screen_wait(screen))


async def start_run(app: QlcApp, draft: PresetDraft, gpu_spec: str | None) -> None:
    """Ask what needs asking, check, create the run directory and launch the engine."""
    preset, cfg = draft.name, draft.config
    if cfg is None:
        app.show_error("The preset does not validate", draft.describe_problems())
        return
    if cfg.model.trust_remote_code and not await _confirmed(
        app,
        ConfirmScreen(
            "Run code from the model's repository?",
            f"{preset} sets model.trust_remote_code: the model's own Python code will run.",
            yes="Trust and start",
            danger=True,
        ),
    ):
        return
    view = budget.compute(cfg, gpu_spec)
    if not view.fits:
        body = Text(view.summary() + "\n")
        for i, a in enumerate(view.advice_fitting_first()[:4], 1):
            body.append(f"\n{i}. {a.text}")
        body.append("\n\nLaunching anyway will likely end in CUDA out of memory.", "bold")
        screen = ConfirmScreen(
            "The memory budget says this does not fit", body, yes="Launch anyway", danger=True
        )
        if not await _confirmed(app, screen):
            return
    if app.live() and app.client is not None:
        # Named: after a fresh open the highlighted preset (the first in the list) is the one
        # started, which a person answering from another pane may not have in mind.
        body = Text.assemble("This starts preset ", (preset, "bold"))
        if draft.overrides:
            body.append(" with ")
            body.append(" ".join(draft.overrides), "bold")
        body.append(
            f".\n\nRun {app.client.run_id} is still training. It keeps training; the dashboard "
            "switches to the new run (the Runs pane brings the other back)."
        )
        screen = ConfirmScreen(f"Start {preset} as another run?", body, yes="Start")
        if not await _confirmed(app, screen):
            return
    try:
        # A bad model path, bad data, GPUs asked for but absent: before any run directory.
        from engine import preflight  # the data pipeline loads with the first start, not the console

        with app.while_noted(f"checking data for {preset}…"):
            await asyncio.to_thread(preflight.check, cfg)
        run_dir = await asyncio.to_thread(runs.create_run, app.runs_root, cfg)
        client = RunClient.launch(run_dir, app.launcher)
    except UserError as exc:
        app.show_error("Cannot start the run", exc.message, exc.hint)
        return
    except OSError as exc:
        app.show_error("Cannot start the engine", str(exc), "is the runs directory writable?")
        return
    app.watch_client(client, RunHistory(run_id=run_dir.name, run_dir=run_dir))
    app.action_show_pane("dashboard")
