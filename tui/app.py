"""The console: a Textual app around one watched run.

`make_app` is the one way to build it, used by `qlc` (through `run_console`) and by the tests,
which swap in a fake engine launcher and a GPU probe. The App owns the run being watched (its
`RunClient` and `RunHistory`) and every action a person can take; panes draw and post messages.
Nothing here imports torch: training and sampling happen in engine processes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, ClassVar

from rich.text import Text
from textual import work
from textual.app import App, ScreenStackError, SystemCommand
from textual.binding import Binding, BindingType
from textual.css.query import NoMatches
from textual.screen import Screen
from textual.widgets import TabbedContent
from textual.worker import Worker, WorkerState

from engine import preflight, protocol
from engine.config import PresetDraft, load_resolved
from engine.errors import UserError
from engine.run import launcher as engine_launcher
from engine.run import runs
from tui import budget
from tui.client import Launcher, RunClient, start_sample
from tui.history import RunHistory, SampleText
from tui.screens.confirm import ConfirmScreen
from tui.screens.error import ErrorScreen
from tui.screens.export import ExportScreen
from tui.screens.main import PANES, MainScreen
from tui.screens.quit import QuitScreen
from tui.screens.stop import StopScreen
from tui.widgets.dashboard import Dashboard
from tui.widgets.gpu import Probe
from tui.widgets.memory_pane import MemoryPane
from tui.widgets.presets_pane import PresetsPane
from tui.widgets.runs_pane import RunsPane
from tui.widgets.sample_pane import LIVE, SamplePane

PANE_FOCUS = {
    "presets": "#preset-list",
    "memory": "#gpu-select",
    "dashboard": "#event-log",
    "runs": "#runs-table",
    "sample": "#prompt",
}
PANE_TITLES = {
    "presets": "Presets",
    "memory": "Memory budget",
    "dashboard": "Dashboard",
    "runs": "Runs",
    "sample": "Sample",
}


def _while_panes_exist(handler: Callable[..., None]) -> Callable[..., None]:
    """Client (and late preset) messages can still arrive while the app shuts down and its panes
    are removed (the screen stack is then empty: IndexError)."""

    @functools.wraps(handler)
    def guarded(*args: Any, **kwargs: Any) -> None:
        with contextlib.suppress(NoMatches, ScreenStackError, IndexError):
            handler(*args, **kwargs)

    return guarded


class QlcApp(App[int]):
    CSS_PATH = "app.tcss"
    TITLE = "qlora-console"
    ENABLE_COMMAND_PALETTE = True
    # Screen classes for bigger terminals: more rows for the lower charts and the log.
    VERTICAL_BREAKPOINTS: ClassVar[list[tuple[int, str]]] = [(0, "-short"), (32, "-tall")]
    HORIZONTAL_BREAKPOINTS: ClassVar[list[tuple[int, str]]] = [(0, "-narrow"), (110, "-wide")]
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("ctrl+q", "quit", "Quit", priority=True, show=False),
        Binding("q", "quit", "Quit"),
        *(
            Binding(str(i), f"show_pane('{pane}')", PANE_TITLES[pane], show=False)
            for i, pane in enumerate(PANES, 1)
        ),
    ]

    def __init__(
        self,
        runs_root: Path,
        *,
        launcher: Launcher = engine_launcher.launch_train,
        sample_launcher: Launcher = engine_launcher.launch_sample,
        export_launcher: Launcher = engine_launcher.launch_export,
        gpu_probe: Probe | None = None,
        attach: str | None = None,
        auto_attach: bool = True,
    ) -> None:
        super().__init__()
        self._export_launcher = export_launcher
        self._export_clients: list[RunClient] = []
        self.runs_root = runs_root
        self._launcher = launcher
        self._sample_launcher = sample_launcher
        self._gpu_probe = gpu_probe
        self._attach_ref = attach
        self._auto_attach = auto_attach
        self.client: RunClient | None = None
        self.history: RunHistory | None = None
        self.stopping = False
        self._quit_when_finished = False
        self._sample_clients: list[RunClient] = []
        self._sample_history = RunHistory(run_id="samples")
        self.samples: list[SampleText] = []
        self._sources_key: tuple | None = None
        self._preset: PresetsPane.ConfigChanged | None = None

    def get_default_screen(self) -> Screen:
        initial = "dashboard" if self._attach_ref else "presets"
        return MainScreen(self.runs_root, self._gpu_probe, initial)

    def on_mount(self) -> None:
        self.sub_title = str(self.runs_root)
        self.call_after_refresh(self._started)

    def _started(self) -> None:
        """After the first refresh, when every pane is mounted."""
        # Keys work at once, without a click: focus the first pane's main widget.
        self._focus_pane("dashboard" if self._attach_ref else "presets")
        if self._attach_ref:
            try:
                run_dir = runs.find_run(self.runs_root, self._attach_ref)
            except UserError as exc:
                self.show_error("No such run", exc.message, exc.hint)
            else:
                self.watch_client(RunClient(run_dir, mode="tail"), None)
        elif self._auto_attach:
            self.run_worker(self._newest_running, thread=True, group="startup", exit_on_error=False)

    # ---- panes -------------------------------------------------------------------------------

    def pane(self, kind: type[Any]) -> Any:
        return self.screen_stack[0].query_one(kind)

    def action_show_pane(self, name: str) -> None:
        tabs = self.screen_stack[0].query_one(TabbedContent)
        if tabs.active == name:
            self._focus_pane(name)
        tabs.active = name  # TabActivated focuses the pane's main widget

    def on_tabbed_content_tab_activated(self, event: TabbedContent.TabActivated) -> None:
        if event.pane is not None and event.pane.id:
            self._focus_pane(event.pane.id)

    def _focus_pane(self, name: str) -> None:
        # Pane key bindings apply while focus is inside the pane: give each pane its natural focus.
        target = PANE_FOCUS.get(name)
        # A tab activated while the app shuts down (an engine error then quit) finds no screen.
        if target and self.screen_stack:
            self.screen_stack[0].query_one(target).focus()

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        for i, pane in enumerate(PANES, 1):
            yield SystemCommand(
                f"Show {PANE_TITLES[pane]}", f"switch to pane {i}", lambda p=pane: self.action_show_pane(p)
            )
        yield SystemCommand(
            "Start run", "train the selected preset with its overrides", self.action_start_run
        )
        yield SystemCommand("Stop run", "finish the step, save a checkpoint, exit", self.action_stop_run)
        yield SystemCommand(
            "Save checkpoint now", "the run saves at the next step and goes on", self.action_save_checkpoint
        )
        yield SystemCommand(
            "Detach from run", "stop watching; the run keeps training", self.action_detach_run
        )
        yield SystemCommand(
            "Toggle log scale", "the loss chart on a log10 axis", self.action_toggle_log_scale
        )
        yield SystemCommand(
            "Auto-fit memory", "change settings until the budget fits the GPU", self.action_auto_fit
        )
        yield SystemCommand("Reset overrides", "back to the preset as written", self.action_reset_overrides)
        yield SystemCommand(
            "Open selected run", "its dashboard from its events file", lambda: self._runs_action("open")
        )
        yield SystemCommand(
            "Attach to selected run", "follow a running run", lambda: self._runs_action("attach")
        )
        yield SystemCommand(
            "Resume selected run", "from its newest checkpoint", lambda: self._runs_action("resume")
        )
        yield SystemCommand(
            "Compare marked runs", "their loss curves on one chart", lambda: self._runs_call("action_compare")
        )
        yield SystemCommand("Reload runs", "re-read the runs directory", lambda: self._runs_call("reload"))
        yield SystemCommand(
            "Export selected run",
            "merge its adapter into the base model, or copy it",
            lambda: self._runs_action("export"),
        )
        yield SystemCommand(
            "Generate sample", "from the live model or a checkpoint", self.action_generate_sample
        )

    def _runs_call(self, method: str) -> None:
        self.action_show_pane("runs")
        getattr(self.pane(RunsPane), method)()

    def _runs_action(self, action: str) -> None:
        self.action_show_pane("runs")
        self.pane(RunsPane)._request(action)

    def show_error(self, title: str, message: str, hint: str = "", advice: Iterable[str] = ()) -> None:
        self.push_screen(ErrorScreen(title, message, hint, list(advice)))

    # ---- the watched run ---------------------------------------------------------------------

    def watch_client(self, client: RunClient, history: RunHistory | None) -> None:
        """Make `client` the run on the Dashboard; the previous one is detached (it keeps going)."""
        if self.client is not None and self.client is not client:
            self.client.detach()
        self.client, self.history, self.stopping = client, history, False
        placeholder = history or RunHistory(run_id=client.run_id, run_dir=client.run_dir)
        self.history = placeholder
        self.pane(Dashboard).show(placeholder, "opening" if history is None else self.run_status())
        self._update_sample_sources()
        self.run_worker(
            lambda: client.read_loop(self.post_message),
            name=f"read {client.run_id}",
            group="run-reader",
            thread=True,
            exit_on_error=False,
        )

    def open_run(self, run_dir: Path) -> None:
        """Show a run: its history from the events file, then (if it is running) its new events."""
        self.watch_client(RunClient(run_dir, mode="tail"), None)
        self.action_show_pane("dashboard")

    def run_status(self) -> str:
        h, c = self.history, self.client
        if h is None:
            return ""
        status = h.status
        if status in ("training", "starting", "created") and c is not None:
            if self.stopping:
                return "stopping"
            if c.ended and not c.saw_finished:
                return "crashed" if h.hello is not None else status
        if c is None and status in ("training", "starting"):
            return "detached"
        return status

    def live(self) -> bool:
        """A run is training here: its engine is there and has not said `finished` (after that it
        only cleans up and exits, and there is nothing left to stop, save or sample)."""
        if self.client is None or self.client.role != "run" or self.client.ended:
            return False
        return self.history is None or self.history.finished is None

    def _newest_running(self) -> None:
        running = [d for d in runs.list_run_dirs(self.runs_root) if runs.is_running(d)]
        if running:
            self.call_from_thread(self._auto_open, running[-1])

    def _auto_open(self, run_dir: Path) -> None:
        if self.client is None:
            self.open_run(run_dir)
            self.notify(f"attached to running run {run_dir.name}", timeout=4)

    # ---- events from clients -----------------------------------------------------------------

    @_while_panes_exist
    def on_run_client_opened(self, message: RunClient.Opened) -> None:
        if message.client is not self.client:
            return
        self.history = message.history
        self.pane(Dashboard).show(self.history, self.run_status())
        self.samples = [*self.samples, *(s for s in self.history.samples.values() if s not in self.samples)]
        self.pane(SamplePane).show(self.samples)
        self._update_sample_sources()

    @_while_panes_exist
    def on_run_client_events_arrived(self, message: RunClient.EventsArrived) -> None:
        client = message.client
        events = client.drain()
        if client.role == "sample":
            self._sample_events(events)
            return
        if client is not self.client or self.history is None:
            return
        self.history.apply_all(events)
        stop_screen = self.screen if isinstance(self.screen, StopScreen) else None
        samples_changed = False
        for ev in events:
            if stop_screen is not None:
                stop_screen.note(ev)
            if isinstance(ev, protocol.ErrorEvent):
                self._engine_error(ev)
            elif isinstance(ev, protocol.Finished):
                self._finished(ev)
            elif isinstance(ev, (protocol.SampleStarted, protocol.SampleToken, protocol.Sample)):
                samples_changed = True
        self.pane(Dashboard).changed(self.run_status())
        if samples_changed:
            for s in self.history.samples.values():
                if s not in self.samples:
                    self.samples.append(s)
            self.pane(SamplePane).show(self.samples)
        self._update_sample_sources()

    @_while_panes_exist
    def on_run_client_ended(self, message: RunClient.Ended) -> None:
        client = message.client
        if client.role == "sample":
            if client in self._sample_clients:
                self._sample_clients.remove(client)
            for s in self.samples:
                if not s.done and s.source != LIVE:
                    s.done = True  # the process is gone; whatever streamed is the reply
            self.pane(SamplePane).show(self.samples)
            return
        if client is not self.client:
            return
        if isinstance(self.screen, StopScreen):
            self.screen.ended()
        self.pane(Dashboard).changed(self.run_status())
        self._update_sample_sources()
        if self._quit_when_finished:
            self.exit(0)

    def _finished(self, ev: protocol.Finished) -> None:
        self.stopping = False
        severity = "error" if ev.status == "failed" else "information"
        self.notify(f"run {ev.status} at step {ev.step}", severity=severity, timeout=6)

    def _engine_error(self, ev: protocol.ErrorEvent) -> None:
        advice = list(ev.advice)
        if ev.kind == "out_of_memory" and not advice and self.client is not None:
            try:
                cfg = load_resolved(self.client.run_dir / runs.CONFIG)
                advice = [a.text for a in budget.compute(cfg).advice]
            except UserError:
                pass
        title = ev.kind.replace("_", " ")
        where = f" (step {ev.step})" if ev.step is not None else ""
        self.show_error(f"Engine error: {title}{where}", ev.message, ev.hint, advice)

    # ---- presets and the memory budget -------------------------------------------------------

    @_while_panes_exist
    def on_presets_pane_config_changed(self, message: PresetsPane.ConfigChanged) -> None:
        self._preset = message
        self._refresh_budget()

    def on_memory_pane_gpu_changed(self, message: MemoryPane.GpuChanged) -> None:
        self._refresh_budget()

    def _refresh_budget(self) -> None:
        msg = self._preset
        if msg is None:
            return
        presets, memory = self.pane(PresetsPane), self.pane(MemoryPane)
        if msg.config is None:
            view = budget.BudgetView(False, reason="the preset does not validate: " + "; ".join(msg.problems))
            memory.show(view, msg.preset)
            return
        view = budget.compute(msg.config, memory.gpu_spec)
        memory.show(view, msg.preset)
        style = {"fits": "green", "tight": "yellow", "does_not_fit": "bold red"}.get(view.verdict, "dim")
        presets.show_summary(Text("memory " + view.summary(), style=style))

    def on_memory_pane_suggestion_chosen(self, message: MemoryPane.SuggestionChosen) -> None:
        self.pane(PresetsPane).apply_overrides(message.overrides)
        self.notify(f"applied: {' '.join(message.overrides)}", timeout=5)

    def action_auto_fit(self) -> None:
        msg = self._preset
        if msg is None or msg.config is None:
            self.notify("pick a preset that validates first", severity="warning")
            return
        overrides, text = budget.fit(msg.config, self.pane(MemoryPane).gpu_spec)
        if not overrides:
            hint = (
                ""
                if text.startswith("nothing to change")
                else "; the ranked list (Enter) changes more than batch and length"
            )
            self.notify(text + hint, severity="information" if hint == "" else "warning", timeout=6)
            return
        self.pane(PresetsPane).apply_overrides(overrides)
        self.notify(f"auto-fit: {text}", timeout=6)

    def action_reset_overrides(self) -> None:
        self.pane(PresetsPane).action_reset_overrides()

    # ---- actions on runs ---------------------------------------------------------------------

    def action_start_run(self) -> None:
        msg = self._preset
        if msg is None:
            self.notify("pick a preset first", severity="warning")
            return
        self._start_flow(msg.draft)

    @work(exclusive=True, group="start", exit_on_error=False)
    async def _start_flow(self, draft: PresetDraft) -> None:
        preset, cfg = draft.name, draft.config
        if cfg is None:
            self.show_error("The preset does not validate", draft.describe_problems())
            return
        if cfg.model.trust_remote_code:
            ok = await self.push_screen_wait(
                ConfirmScreen(
                    "Run code from the model's repository?",
                    f"{preset} sets model.trust_remote_code: the model's own Python code will run.",
                    yes="Trust and start",
                    danger=True,
                )
            )
            if not ok:
                return
        view = budget.compute(cfg, self.pane(MemoryPane).gpu_spec)
        if not view.fits:
            body = Text(view.summary() + "\n")
            for i, a in enumerate(view.advice[:4], 1):
                body.append(f"\n{i}. {a.text}")
            body.append("\n\nLaunching anyway will likely end in CUDA out of memory.", "bold")
            ok = await self.push_screen_wait(
                ConfirmScreen(
                    "The memory budget says this does not fit", body, yes="Launch anyway", danger=True
                )
            )
            if not ok:
                return
        if self.live() and self.client is not None:
            ok = await self.push_screen_wait(
                ConfirmScreen(
                    "Start another run?",
                    f"Run {self.client.run_id} is still training. It keeps training; the dashboard switches "
                    "to the new run (the Runs pane brings the other back).",
                    yes="Start",
                )
            )
            if not ok:
                return
        self.notify(f"checking data for {preset}…", timeout=2)
        try:
            # A bad model path, bad data, GPUs asked for but absent: before any run directory.
            await asyncio.to_thread(preflight.check, cfg)
            run_dir = await asyncio.to_thread(runs.create_run, self.runs_root, cfg)
            client = RunClient.launch(run_dir, self._launcher)
        except UserError as exc:
            self.show_error("Cannot start the run", exc.message, exc.hint)
            return
        except OSError as exc:
            self.show_error("Cannot start the engine", str(exc), "is the runs directory writable?")
            return
        self.watch_client(client, RunHistory(run_id=run_dir.name, run_dir=run_dir))
        self.action_show_pane("dashboard")
        self.pane(RunsPane).reload()

    def _send(self, command: protocol.Message) -> str | None:
        """Send to the watched run; a problem as text (shown by the caller) instead of raising."""
        if self.client is None:
            return "no run is being watched"
        try:
            self.client.send(command)
        except UserError as exc:
            return str(exc)
        except OSError as exc:
            return f"could not reach the engine: {exc}"
        return None

    def action_stop_run(self) -> None:
        if not self.live() or self.client is None:
            self.notify("no run is training here", severity="warning")
            return

        def send_stop() -> str | None:
            problem = self._send(protocol.Stop())
            if problem is None:
                self.stopping = True
                self.pane(Dashboard).changed(self.run_status())
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
        problem = self._send(protocol.Save())
        self.notify(
            problem or "checkpoint requested: saved at the next step",
            severity="error" if problem else "information",
        )

    def action_detach_run(self) -> None:
        if self.client is None:
            self.notify("not watching a run", severity="warning")
            return
        run_id = self.client.run_id
        was_live = self.live()
        self.client.detach()
        self.client = None
        self.pane(Dashboard).changed(self.run_status())
        self._update_sample_sources()
        if was_live:
            self.notify(f"detached: {run_id} keeps training; Runs (4) attaches again", timeout=5)

    def action_toggle_log_scale(self) -> None:
        self.pane(Dashboard).action_toggle_log_scale()

    def on_runs_pane_open(self, message: RunsPane.Open) -> None:
        run_dir = message.run_dir
        running = runs.is_running(run_dir)
        if message.action == "attach" and not running:
            self.notify(f"{run_dir.name} is not running: showing its history", timeout=4)
        if message.action in ("open", "attach"):
            if self.client is not None and self.client.run_dir == run_dir and not self.client.ended:
                self.action_show_pane("dashboard")
                return
            self.open_run(run_dir)
        elif message.action == "resume":
            self._resume(run_dir)
        elif message.action == "export":
            try:
                self.push_screen(ExportScreen(run_dir, self._export_launcher, self._export_clients))
            except UserError as exc:  # a damaged config.yaml
                self.show_error("Cannot export", exc.message, exc.hint)
        elif message.action == "stop":
            if not running:
                self.notify(f"{run_dir.name} is not running", severity="warning")
                return
            if self.client is None or self.client.run_dir != run_dir:
                self.open_run(run_dir)
            self.action_stop_run()

    def on_export_screen_result(self, message: ExportScreen.Result) -> None:
        if message.exported is not None:
            self.notify(f"{message.run_id} exported to {message.exported.out_dir}", timeout=8)
        else:
            self.notify(f"export of {message.run_id} failed: {message.error}", severity="error", timeout=8)

    def _resume(self, run_dir: Path) -> None:
        if runs.is_running(run_dir):
            self.notify(f"{run_dir.name} is already running: attaching", timeout=4)
            self.open_run(run_dir)
            return
        try:
            runs.resume_point(run_dir)
            client = RunClient.launch(run_dir, self._launcher, resume=True)
        except UserError as exc:
            self.show_error("Cannot resume", exc.message, exc.hint)
            return
        except OSError as exc:
            self.show_error("Cannot start the engine", str(exc))
            return
        self.watch_client(client, None)
        self.action_show_pane("dashboard")

    # ---- sampling ----------------------------------------------------------------------------

    def _update_sample_sources(self) -> None:
        h = self.history
        checkpoints = [Path(c.path).name for c in h.checkpoints] if h else []
        if h is not None and h.finished is not None and h.finished.adapter_path:
            checkpoints.append("adapter")
        key = (h.run_id if h else None, self.live(), tuple(checkpoints))
        if key == self._sources_key:
            return
        self._sources_key = key
        self.pane(SamplePane).set_sources(h.run_id if h else None, self.live(), checkpoints)

    def action_generate_sample(self) -> None:
        self.action_show_pane("sample")
        self.pane(SamplePane).action_generate()

    def on_sample_pane_requested(self, message: SamplePane.Requested) -> None:
        request = message.request
        placeholder = SampleText(request.request_id, request.prompt, message.source)
        if message.source == LIVE:
            if not self.live() or self.history is None:
                self.notify("the run is not training: pick a checkpoint", severity="warning")
                return
            problem = self._send(request)
            if problem:
                self.show_error("Cannot sample", problem)
                return
            self.history.samples[request.request_id] = placeholder
        else:
            run_dir = self.history.run_dir if self.history is not None else None
            if run_dir is None:
                return
            checkpoint = None if message.source == "adapter" else message.source
            try:
                client = start_sample(run_dir, checkpoint, request, self._sample_launcher)
            except OSError as exc:
                self.show_error("Cannot start the sampler", str(exc))
                return
            self._sample_history.samples[request.request_id] = placeholder
            self._sample_clients.append(client)
            self.run_worker(
                lambda: client.read_loop(self.post_message),
                name=f"sample {request.request_id}",
                group="samplers",
                thread=True,
                exit_on_error=False,
            )
        self.samples.append(placeholder)
        self.pane(SamplePane).show(self.samples)

    def _sample_events(self, events: list[protocol.Event]) -> None:
        self._sample_history.apply_all(events)
        for ev in events:
            if isinstance(ev, protocol.ErrorEvent):
                self.show_error(f"Sampling failed: {ev.kind.replace('_', ' ')}", ev.message, ev.hint)
        for s in self._sample_history.samples.values():
            if s not in self.samples:
                self.samples.append(s)
        self.pane(SamplePane).show(self.samples)

    # ---- failures and quitting ---------------------------------------------------------------

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        """Every worker is exit_on_error=False: a failure is shown here and the console stays up."""
        if event.state == WorkerState.ERROR:
            error = event.worker.error
            self.show_error(
                f"Unexpected error ({event.worker.name or event.worker.group})",
                f"{type(error).__name__}: {error}",
                "the console is still running; the engine log is in the run directory (engine.log)",
            )

    async def action_quit(self) -> None:
        if not self.live() or self.client is None:
            self._end_samplers()
            self.exit(0)
            return
        self.push_screen(QuitScreen(self.client.run_id), self._quit_chosen)

    def _quit_chosen(self, choice: str | None) -> None:
        if choice == "detach":
            if self.client is not None:
                self.client.detach()
            self._end_samplers()
            self.exit(0)
        elif choice == "stop":
            self._quit_when_finished = True
            self.action_stop_run()

    def on_unmount(self) -> None:
        """However the app ends, stop every reader thread (the default executor is joined at exit)
        without touching the runs themselves: they train on, reachable from any console."""
        if self.client is not None:
            self.client.detach()
        self._end_samplers()

    def _end_samplers(self) -> None:
        for client in self._sample_clients:
            client.detach()
            if client.proc is not None and client.proc.poll() is None:
                client.proc.terminate()  # a one-off sampler of ours; no state to save
        for client in self._export_clients:
            client.detach()
            if client.proc is not None and client.proc.poll() is None:
                client.proc.terminate()  # the export removes its unfinished folder


def make_app(
    runs_dir: str | Path | None = None,
    *,
    launcher: Launcher | None = None,
    sample_launcher: Launcher | None = None,
    export_launcher: Launcher | None = None,
    gpu_probe: Probe | None = None,
    attach: str | None = None,
    auto_attach: bool = True,
) -> QlcApp:
    """The console, configured. `qlc` and the tests both build it here."""
    return QlcApp(
        runs.runs_root(runs_dir),
        launcher=launcher or engine_launcher.launch_train,
        sample_launcher=sample_launcher or engine_launcher.launch_sample,
        export_launcher=export_launcher or engine_launcher.launch_export,
        gpu_probe=gpu_probe,
        attach=attach,
        auto_attach=auto_attach,
    )


def run_console(args: argparse.Namespace) -> int:
    """`qlc` with no command. `args.attach` (if the caller sets it) opens that run first."""
    app = make_app(getattr(args, "runs_dir", None), attach=getattr(args, "attach", None))
    app.run()
    return app.return_code or 0
