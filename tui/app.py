"""The console: a Textual app around one watched run.

`make_app` is the one way to build it, used by `qlc` (through `run_console`) and by the tests,
which swap in a fake engine launcher and a GPU probe. The App owns the run being watched (its
`RunClient` and `RunHistory`) and the actions a person takes; it publishes what the panes show
as reactives (tui.views) that the panes watch, and the panes post messages back. The start flow
(tui.start), the samplers (tui.jobs) and the palette (tui.palette) live beside it. Nothing here
imports torch: training and sampling happen in engine processes.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, ClassVar

from textual.app import App, SystemCommand
from textual.binding import Binding, BindingType
from textual.notifications import Notification, Notify
from textual.reactive import var
from textual.screen import Screen
from textual.widgets import TabbedContent
from textual.worker import Worker, WorkerState

from engine.config import load_resolved
from engine.errors import UserError
from engine.run import launcher as engine_launcher
from engine.run import runs
from tui import watched
from tui.client import Launcher, RunClient
from tui.history import RunHistory, SampleText
from tui.jobs import Samplers, end_clients
from tui.keys import KeyActions
from tui.palette import PANE_FOCUS, PANE_TITLES, system_commands
from tui.preset_actions import PresetActions
from tui.run_actions import RunActions
from tui.sample_actions import SampleActions
from tui.screens.error import ErrorScreen
from tui.screens.main import PANES, MainScreen
from tui.screens.quit import QuitScreen
from tui.views import BudgetState, RunView, SampleSources, focus_now
from tui.watched import RunEvents
from tui.widgets.gpu import Probe
from tui.widgets.presets_pane import PresetsPane
from tui.widgets.runs_pane import RunsPane

RESUME_POLL_S = 1.0  # how soon a console sees that another one resumed the run it shows


class QlcApp(KeyActions, RunEvents, PresetActions, RunActions, SampleActions, App[int]):
    CSS_PATH = "app.tcss"
    TITLE = "qlora-console"
    ENABLE_COMMAND_PALETTE = True
    # Screen classes for bigger terminals: more rows for the lower charts and the log; under 80
    # columns the keys panel takes the whole width rather than leave the pane half of 60.
    VERTICAL_BREAKPOINTS: ClassVar[list[tuple[int, str]]] = [(0, "-tiny"), (22, "-short"), (32, "-tall")]
    HORIZONTAL_BREAKPOINTS: ClassVar[list[tuple[int, str]]] = [
        (0, "-narrow"),
        (80, "-medium"),
        (110, "-wide"),
    ]
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("ctrl+q", "quit", "Quit", priority=True, show=False),
        Binding("q", "request_quit", "Quit"),
        # Shown in the footer whenever a text box has focus: the way back to 1-5, q and the
        # panes' letter keys, which a box types instead. A priority binding: the focus has moved
        # before the next key is read, so Escape then 3 never types the 3.
        Binding("escape", "leave_input", "Leave the box", priority=True),
        # The keys of the focused pane and the App, beside the screen (Textual's help panel);
        # the palette's "Keys" opens the same. Escape closes it too.
        Binding("question_mark", "toggle_keys", "Keys"),
        Binding("f1", "toggle_keys", "Keys", show=False),
        Binding("escape", "hide_keys", "Close keys", show=False, priority=True),
        # Priority: the pane (and its focus) has changed before the next key is read, so "2t24"
        # typed fast reaches the Memory pane's t. Not while a text box has focus (it types them).
        *(
            Binding(str(i), f"show_pane('{pane}')", PANE_TITLES[pane], show=False, priority=True)
            for i, pane in enumerate(PANES, 1)
        ),
    ]

    run_view: var[RunView] = var(RunView(None, ""), always_update=True)
    """The Dashboard's run and status; set again whenever its history grew."""
    sample_replies: var[tuple[SampleText, ...]] = var((), always_update=True)
    """Every reply asked for here, in order (the Sample pane); replies stream in place."""
    sample_sources: var[SampleSources] = var(SampleSources())
    """What the Sample pane may sample from."""
    budget_state: var[BudgetState | None] = var(None, always_update=True)
    """The selected preset's memory budget (the Memory pane, and the Presets pane's line)."""

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
        self.runs_root = runs_root
        self.launcher = launcher
        self._export_launcher = export_launcher
        self._export_clients: list[RunClient] = []
        self._gpu_probe = gpu_probe
        self._attach_ref = attach
        self._auto_attach = auto_attach
        self.client: RunClient | None = None
        self.history: RunHistory | None = None
        self.stopping = False
        self._quit_when_finished = False
        self.samplers = Samplers(sample_launcher)
        self._preset: PresetsPane.ConfigChanged | None = None
        self._live_in_footer = False

    @property
    def samples(self) -> list[SampleText]:
        return self.samplers.replies

    def get_default_screen(self) -> Screen:
        initial = "dashboard" if self._attach_ref else "presets"
        return MainScreen(self.runs_root, self._gpu_probe, initial, PANE_FOCUS[initial])

    def on_mount(self) -> None:
        self.sub_title = str(self.runs_root)
        self.call_after_refresh(self._started)
        self.set_interval(RESUME_POLL_S, self._follow_a_resume)

    def _started(self) -> None:
        """After the first refresh, when every pane is mounted."""
        # Keys work at once, without a click: the first pane's main widget has the focus (the
        # screen's AUTO_FOCUS). Not again here: keys typed meanwhile ("/" and a filter) moved it.
        if self.focused is None:
            self._focus_pane("dashboard" if self._attach_ref else "presets")
        if self._attach_ref:
            try:
                run_dir = runs.find_run(self.runs_root, self._attach_ref)
                self.open_run(run_dir, show=False)
                self._show_run_preset(run_dir)
            except UserError as exc:
                self.show_error("No such run", exc.message, exc.hint)
        elif self._auto_attach:
            self.run_worker(self._newest_running, thread=True, group="startup", exit_on_error=False)

    # ---- panes -------------------------------------------------------------------------------

    def pane(self, kind: type[Any]) -> Any:
        return self.screen_stack[0].query_one(kind)

    def action_show_pane(self, name: str) -> None:
        self.mark_command()  # "2" then "f" quickly: the f is a key of its own, not typing
        tabs = self.screen_stack[0].query_one(TabbedContent)
        tabs.active = name  # shows the pane at once (TabActivated focuses it again, for clicks)
        self._focus_pane(name)  # before the next key: "2t" reaches the Memory pane's t

    def on_tabbed_content_tab_activated(self, event: TabbedContent.TabActivated) -> None:
        """A tab clicked (keys focus their pane at once): focus into it. A stale event, for a tab
        shown before the keys that came since, must not pull the focus (and the tabs) back."""
        pane = event.pane.id if event.pane is not None else None
        if not pane or pane != event.tabbed_content.active or not self.screen_stack:
            return  # (no screen: a tab activated while the app shuts down, as _focus_pane says)
        focused = self.focused
        if focused is None or pane not in {node.id for node in focused.ancestors_with_self}:
            self._focus_pane(pane)

    def _focus_pane(self, name: str) -> None:
        # Pane key bindings apply while focus is inside the pane: give each pane its natural focus.
        target = PANE_FOCUS.get(name)
        # A tab activated while the app shuts down (an engine error then quit) finds no screen.
        if target and self.screen_stack:
            focus_now(self.screen_stack[0].query_one(target))

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        yield from system_commands(self)

    def runs_action(self, action: str) -> None:
        self.action_show_pane("runs")
        self.pane(RunsPane).request(action)

    def show_error(self, title: str, message: str, hint: str = "", advice: Iterable[str] = ()) -> None:
        self.push_screen(ErrorScreen(title, message, hint, list(advice)))

    @contextlib.contextmanager
    def while_noted(self, message: str, timeout: float = 10.0) -> Iterator[None]:
        """A toast that says what is being done, withdrawn when it is done: one left to time out
        would say "checking…" over the next thing shown (at 60x18 it covers the dashboard's log)."""
        note = Notification(message, timeout=timeout)
        self.post_message(Notify(note))
        try:
            yield
        finally:
            # Queued behind the Notify (a quick check ends before the toast is shown). Textual 8
            # has no public way to withdraw one toast; without `_unnotify` it times out instead.
            self.call_later(self._withdraw, note)

    def _withdraw(self, note: Notification) -> None:
        unnotify = getattr(self, "_unnotify", None)
        if unnotify is not None:
            with contextlib.suppress(KeyError):  # it had timed out
                unnotify(note)

    # ---- the watched run ---------------------------------------------------------------------

    def watch_client(self, client: RunClient, history: RunHistory | None) -> None:
        """Make `client` the run on the Dashboard; the previous one is detached (it keeps going)."""
        if self.client is not None and self.client is not client:
            self.client.detach()
        self.client, self.stopping = client, False
        self.history = history or RunHistory(run_id=client.run_id, run_dir=client.run_dir)
        self._publish("opening" if history is None else None)
        self.run_worker(
            lambda: client.read_loop(self.post_message),
            name=f"read {client.run_id}",
            group="run-reader",
            thread=True,
            exit_on_error=False,
        )

    def _follow_a_resume(self) -> None:
        """The watched run's engine had ended (stopped, finished, crashed) and this console read
        its events file to the end; another console or `qlc resume` may start it again. Its lock
        says so (one flock, no read): then follow it again, as R would, instead of showing the old
        end until someone presses R."""
        client = self.client
        if client is None or not client.ended or client.role != "run":
            return
        if client.proc is not None and client.proc.poll() is None:
            return  # this console's own engine is still exiting (it holds the lock until it has)
        if runs.is_running(client.run_dir):
            self.open_run(client.run_dir, show=False)
            self.notify(f"{client.run_id} started again elsewhere: following it", timeout=5)

    def open_run(self, run_dir: Path, show: bool = True) -> None:
        """Show a run: its history from the events file, then (if it is running) its new events."""
        self.watch_client(RunClient(run_dir, mode="tail"), None)
        if show:
            self.action_show_pane("dashboard")

    def run_status(self) -> str:
        return watched.run_status(self.history, self.client, self.stopping)

    def live(self) -> bool:
        return watched.is_live(self.history, self.client)

    def _publish(self, status: str | None = None) -> None:
        """What the panes show of the watched run: the Dashboard's view, the Sample pane's sources."""
        h = self.history
        self.run_view = RunView(h, self.run_status() if status is None else status)
        if self.live() != self._live_in_footer and self.screen_stack:
            # Stop, Save now and Detach only while the run trains here. (Only on a change: the
            # footer is composed again each time.) Every screen's, not only the top one's, as
            # App.refresh_bindings does: a run ends while its stop or error dialog is open, and
            # the Dashboard's footer below the dialog offered them until the dialog closed.
            self._live_in_footer = self.live()
            for screen in self.screen_stack:
                screen.refresh_bindings()
        self.sample_sources = SampleSources(
            h.run_id if h else None, self.live(), watched.sample_checkpoints(h)
        )

    def _newest_running(self) -> None:
        running = [d for d in runs.list_run_dirs(self.runs_root) if runs.is_running(d)]
        if running:
            self.call_from_thread(self._auto_open, running[-1])

    def _auto_open(self, run_dir: Path) -> None:
        if self.client is None:
            self.open_run(run_dir)
            self._show_run_preset(run_dir)
            self.notify(f"attached to running run {run_dir.name}", timeout=4)

    def _show_run_preset(self, run_dir: Path) -> None:
        """A console that opens on a run shows that run's preset in the Presets pane (it showed
        the list's first, unrelated to the run on the dashboard); the run's own settings are its
        config.yaml, which `qlc attach` prints."""
        pane = self.pane(PresetsPane)
        if pane.overrides or not pane.showing_the_first():
            return  # a person picked a preset meanwhile: theirs stays
        try:
            name = load_resolved(run_dir / runs.CONFIG).name
        except UserError:
            return
        pane.select(name)

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
            self._end_jobs()
            self.exit(0)
            return
        self.push_screen(QuitScreen(self.client.run_id), self._quit_chosen)

    def _quit_chosen(self, choice: str | None) -> None:
        if choice == "detach":
            run_id = self.client.run_id if self.client is not None else None
            if self.client is not None:
                self.client.detach()
            self._end_jobs()
            # Said on the terminal the console leaves: which run trains on, and how to reach it.
            said = f"run {run_id} keeps training: qlc attach {run_id}, or qlc to open it" if run_id else None
            self.exit(0, message=said)
        elif choice == "stop":
            self._quit_when_finished = True
            self.action_stop_run()

    def on_unmount(self) -> None:
        """However the app ends, stop every reader thread (the default executor is joined at exit)
        without touching the runs themselves: they train on, reachable from any console."""
        if self.client is not None:
            self.client.detach()
        self._end_jobs()

    def _end_jobs(self) -> None:
        end_clients(self.samplers.clients)
        end_clients(self._export_clients)


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
