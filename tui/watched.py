"""The run the console watches: its status as a person should read it, sending it commands, and
the App's handlers for what its clients report (RunEvents, a mixin of QlcApp)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from engine import protocol
from engine.config import load_resolved
from engine.errors import UserError
from engine.run import runs
from tui import budget
from tui.client import RunClient, how_to_go_on
from tui.history import RunHistory, SampleText
from tui.jobs import Samplers
from tui.screens.stop import StopScreen
from tui.views import while_panes_exist


def run_status(history: RunHistory | None, client: RunClient | None, stopping: bool) -> str:
    if history is None:
        return ""
    status = history.status
    if status in ("training", "starting", "created") and client is not None:
        if stopping:
            return "stopping"
        if client.ended and not client.saw_finished:
            return "crashed" if history.hello is not None else status
    if client is None and status in ("training", "starting"):
        return "detached"
    return status


def crashed_note(run_dir: Path) -> str:
    """What a run whose engine died without finishing needs: its log, and how to go on."""
    return f"The engine exited without finishing; see {run_dir / runs.ENGINE_LOG}; {how_to_go_on(run_dir)}."


def is_live(history: RunHistory | None, client: RunClient | None) -> bool:
    """A run is training here: its engine is there and has not said `finished` (after that it only
    cleans up and exits, and there is nothing left to stop, save or sample)."""
    if client is None or client.role != "run" or client.ended:
        return False
    return history is None or history.finished is None


def send(client: RunClient | None, command: protocol.Message) -> str | None:
    """Send to the watched run; a problem as text (shown by the caller) instead of raising."""
    if client is None:
        return "no run is being watched"
    try:
        client.send(command)
    except UserError as exc:
        return str(exc)
    except OSError as exc:
        return f"could not reach the engine: {exc}"
    return None


def sample_checkpoints(history: RunHistory | None) -> tuple[str, ...]:
    """What a sample can load from this run: its checkpoints, and the final adapter once written."""
    if history is None:
        return ()
    names = [Path(c.path).name for c in history.checkpoints]
    if history.finished is not None and history.finished.adapter_path:
        names.append("adapter")
    return tuple(names)


class RunEvents:
    """What the engine processes the App listens to report: the watched run's history and events,
    a sampler's reply, a process that ended."""

    client: RunClient | None
    history: RunHistory | None
    stopping: bool
    samplers: Samplers
    sample_replies: tuple[SampleText, ...]
    _quit_when_finished: bool
    screen: Any
    samples: Any
    notify: Any
    show_error: Any
    exit: Any
    _publish: Any

    @while_panes_exist
    def on_run_client_opened(self, message: RunClient.Opened) -> None:
        if message.client is self.client:
            self.history = message.history
            self.samplers.merge(self.history)
            self.sample_replies = tuple(self.samples)
            self._publish()

    @while_panes_exist
    def on_run_client_events_arrived(self, message: RunClient.EventsArrived) -> None:
        client, events = message.client, message.client.drain()
        if client.role == "sample":
            for ev in self.samplers.events(events):
                self.show_error(f"Sampling failed: {ev.kind.replace('_', ' ')}", ev.message, ev.hint)
            self.sample_replies = tuple(self.samples)
            return
        if client is not self.client or self.history is None:
            return
        self.history.apply_all(events)
        for ev in events:
            if isinstance(self.screen, StopScreen):
                self.screen.note(ev)
            if isinstance(ev, protocol.ErrorEvent):
                self._engine_error(ev)
            elif isinstance(ev, protocol.Finished):
                self.stopping = False
                severity = "error" if ev.status == "failed" else "information"
                self.notify(f"run {ev.status} at step {ev.step}", severity=severity, timeout=6)
        if any(
            isinstance(ev, (protocol.SampleStarted, protocol.SampleToken, protocol.Sample)) for ev in events
        ):
            self.samplers.merge(self.history)
            self.sample_replies = tuple(self.samples)
        self._publish()

    @while_panes_exist
    def on_run_client_ended(self, message: RunClient.Ended) -> None:
        client = message.client
        if client.role == "sample":
            self.samplers.ended(client)
            self.sample_replies = tuple(self.samples)
        elif client is self.client:
            if isinstance(self.screen, StopScreen):
                self.screen.ended()
            self._publish()
            if self._quit_when_finished:
                self.exit(0)
            elif client.proc is None and run_status(self.history, client, self.stopping) == "crashed":
                # A run opened from its events file (its engine died before): no error dialog
                # told it, as one does for an engine this console started.
                self.notify(crashed_note(client.run_dir), severity="error", timeout=15)

    def _engine_error(self, ev: protocol.ErrorEvent) -> None:
        advice = list(ev.advice)
        if ev.kind == "out_of_memory" and not advice and self.client is not None:
            try:
                cfg = load_resolved(self.client.run_dir / runs.CONFIG)
                advice = [a.text for a in budget.compute(cfg).advice]
            except UserError:
                pass
        where = f" (step {ev.step})" if ev.step is not None else ""
        self.show_error(f"Engine error: {ev.kind.replace('_', ' ')}{where}", ev.message, ev.hint, advice)

    # ---- actions on runs ---------------------------------------------------------------------
