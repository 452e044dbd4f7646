"""The App's actions on runs: stop, save, detach, and what the Runs pane asks for (open, attach,
resume, stop, export). A mixin of QlcApp."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine import protocol
from engine.errors import UserError
from engine.run import runs
from tui import watched
from tui.client import RunClient
from tui.screens.stop import StopScreen
from tui.widgets.dashboard import Dashboard
from tui.widgets.runs_pane import RunsPane

if TYPE_CHECKING:  # the export dialog (and the memory model behind it) loads when first opened
    from tui.screens.export import ExportScreen


class RunActions:
    client: RunClient | None
    stopping: bool
    launcher: Any
    _quit_when_finished: bool
    _export_launcher: Any
    _export_clients: list[RunClient]
    history: Any
    pane: Any
    notify: Any
    push_screen: Any
    show_error: Any
    live: Any
    open_run: Any
    watch_client: Any
    action_show_pane: Any
    _publish: Any

    def action_stop_run(self) -> None:
        if not self.live() or self.client is None:
            self.notify("no run is training here", severity="warning")
            return

        def send_stop() -> str | None:
            problem = watched.send(self.client, protocol.Stop())
            if problem is None:
                self.stopping = True
                self._publish()
            return problem

        def closed(done: bool | None) -> None:
            if self._quit_when_finished and not done:
                self._quit_when_finished = False  # hid the dialog: stay

        screen = StopScreen(self.client.run_id, self.history.step if self.history else 0, send_stop)
        self.push_screen(screen, closed)
        if self._quit_when_finished:
            screen.call_after_refresh(screen.action_confirm)

    def action_save_checkpoint(self) -> None:
        if not self.live():
            self.notify("no run is training here", severity="warning")
            return
        problem = watched.send(self.client, protocol.Save())
        self.notify(
            problem or "checkpoint requested: saved at the next step",
            severity="error" if problem else "information",
        )

    def action_detach_run(self) -> None:
        if self.client is None:
            self.notify("not watching a run", severity="warning")
            return
        run_id, was_live = self.client.run_id, self.live()
        self.client.detach()
        self.client = None
        self._publish()
        if was_live:
            self.notify(f"detached: {run_id} keeps training; Runs (4) attaches again", timeout=5)

    def action_toggle_log_scale(self) -> None:
        self.pane(Dashboard).action_toggle_log_scale()

    def on_runs_pane_open(self, message: RunsPane.Open) -> None:
        run_dir, action = message.run_dir, message.action
        running = runs.is_running(run_dir)
        if action == "attach" and not running:
            self.notify(f"{run_dir.name} is not running: showing its history", timeout=4)
        if action in ("open", "attach"):
            if self.client is not None and self.client.run_dir == run_dir and not self.client.ended:
                self.action_show_pane("dashboard")
            else:
                self.open_run(run_dir)
        elif action == "resume":
            self._resume(run_dir)
        elif action == "export":
            from tui.screens.export import ExportScreen

            try:
                self.push_screen(ExportScreen(run_dir, self._export_launcher, self._export_clients))
            except UserError as exc:  # a damaged config.yaml
                self.show_error("Cannot export", exc.message, exc.hint)
        elif action == "stop" and not running:
            self.notify(f"{run_dir.name} is not running", severity="warning")
        elif action == "stop":
            if self.client is None or self.client.run_dir != run_dir:
                self.open_run(run_dir)
            self.action_stop_run()

    def on_export_screen_result(self, message: ExportScreen.Result) -> None:
        if message.exported is not None:
            self.notify(f"{message.run_id} exported to {message.exported.out_dir}", timeout=8)
        elif message.cancelled:  # it read "export of ... failed: export cancelled"
            self.notify(f"export of {message.run_id} cancelled; nothing was written", timeout=6)
        else:
            self.notify(f"export of {message.run_id} failed: {message.error}", severity="error", timeout=8)

    def _resume(self, run_dir: Path) -> None:
        if runs.is_running(run_dir):
            self.notify(f"{run_dir.name} is already running: attaching", timeout=4)
            self.open_run(run_dir)
            return
        try:
            runs.resume_point(run_dir)
            client = RunClient.launch(run_dir, self.launcher, resume=True)
        except UserError as exc:
            self.show_error("Cannot resume", exc.message, exc.hint)
            return
        except OSError as exc:
            self.show_error("Cannot start the engine", str(exc))
            return
        self.watch_client(client, None)
        self.action_show_pane("dashboard")
