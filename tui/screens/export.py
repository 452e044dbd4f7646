"""Exporting a run from the console: choose what and where (sensible defaults), then follow the
engine's export process until its result.

The choices are the CLI's (`qlc export`), checked by the same code before anything starts. Once
started, the dialog shows the stages with a progress bar; hiding it leaves the export running and
a notification reports its end. The process is the app's to end when the console quits.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import ClassVar

from rich.text import Text
from textual.app import App, ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.css.query import NoMatches
from textual.message import Message
from textual.screen import ModalScreen
from textual.widgets import Button, Footer, Input, Label, ProgressBar, Select, Static

from engine import protocol
from engine.config import load_resolved
from engine.errors import UserError
from engine.export import (
    DTYPES,
    GGUF_CONVERTER_TYPES,
    GGUF_TYPES,
    build_request,
    default_dtype,
    default_out_dir,
    find_llama_cpp,
    resolve_source,
)
from engine.memory import estimate_merge
from engine.run import runs
from tui.client import Launcher, RunClient
from tui.widgets.in_order_input import InOrderInput

FINAL = "adapter"
KINDS = [("merged model", "merged"), ("adapter only", "adapter")]
NO_GGUF = "none"


def _relative(path: Path) -> str:
    """As typed and shown in the dialog: relative to the working folder when inside it."""
    with contextlib.suppress(ValueError):
        return str(path.relative_to(Path.cwd()))
    return str(path)


def _short(path: Path, run_dir: Path) -> str:
    """For the progress lines: relative to the run when inside it."""
    with contextlib.suppress(ValueError):
        return str(path.relative_to(run_dir))
    return _relative(path)


class ExportScreen(ModalScreen[None]):
    # The dialog's own footer shows these (a modal takes no keys of the App or the panes below,
    # so the main screen's footer showing through offered keys that did nothing here).
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("ctrl+s", "start", "Export"),
        Binding("escape", "close", "Close"),
        Binding("escape", "hide", "Hide"),  # while the export runs: it goes on, as the button says
    ]

    class Result(Message):
        """An export ended (posted to the app whether or not the dialog is still open)."""

        def __init__(
            self, run_id: str, exported: protocol.Exported | None, error: str, cancelled: bool = False
        ) -> None:
            super().__init__()
            self.run_id = run_id
            self.exported = exported
            self.error = error
            self.cancelled = cancelled  # a person's Cancel: no failure

    def __init__(self, run_dir: Path, launcher: Launcher, jobs: list[RunClient]) -> None:
        super().__init__()
        self.run_dir = run_dir
        self._launcher = launcher
        self._jobs = jobs
        self._cfg = load_resolved(run_dir / runs.CONFIG)
        self._default_out = ""
        self.client: RunClient | None = None
        self.exported: protocol.Exported | None = None
        self.error = ""
        self.cancelled = False  # the engine said the export was cancelled (kind "interrupted")
        self._lines: list[Text] = []
        self._refusal: Text | None = None  # why the last Export was refused (_refuse)

    # ---- the form ----------------------------------------------------------------------------

    def _sources(self) -> list[tuple[str, str]]:
        options = []
        if (self.run_dir / runs.ADAPTER / "adapter_config.json").is_file():
            options.append(("final adapter", FINAL))
        for ckpt in reversed(runs.checkpoints(self.run_dir)):
            step = ckpt.name.removeprefix(runs.CHECKPOINT_PREFIX)
            options.append((f"checkpoint {step}", step))
        return options

    def compose(self) -> ComposeResult:
        sources = self._sources()
        tools = find_llama_cpp()
        gguf_types = (
            [] if tools is None else [t for t in GGUF_TYPES if tools.quantize or t in GGUF_CONVERTER_TYPES]
        )
        with Vertical(classes="dialog export-dialog"):
            yield Static(Text(f"Export run {self.run_dir.name}", style="bold"), classes="dialog-title")
            with Horizontal(classes="export-row"):
                yield Label("from", classes="export-label")
                yield Select(
                    sources,
                    value=sources[0][1] if sources else Select.NULL,
                    id="export-source",
                    allow_blank=not sources,
                    compact=True,
                )
                yield Select(KINDS, value="merged", id="export-kind", allow_blank=False, compact=True)
            with Horizontal(classes="export-row", id="export-as"):
                yield Label("as", classes="export-label")
                yield Select(
                    [(d, d) for d in DTYPES],
                    value=default_dtype(self._cfg),
                    id="export-dtype",
                    allow_blank=False,
                    compact=True,
                )
                yield Select(
                    [("no GGUF", NO_GGUF), *((f"GGUF {t}", t) for t in gguf_types)],
                    value=NO_GGUF,
                    id="export-gguf",
                    allow_blank=False,
                    disabled=not gguf_types,
                    compact=True,
                )
            with Horizontal(classes="export-row"):
                yield Label("to", classes="export-label")
                yield InOrderInput(id="export-out", compact=True)
            yield Static(id="export-where", classes="dialog-body")
            yield Static(id="export-note", classes="dialog-body")
            yield ProgressBar(id="export-progress", show_eta=False)
            yield Static(id="export-log", classes="dialog-body")
            with Horizontal(classes="dialog-buttons"):
                yield Button("Export (ctrl+s)", variant="primary", id="export-start")
                yield Button("Cancel export", variant="error", id="export-cancel")
                yield Button("Close (Esc)", id="export-close")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#export-progress").display = False
        self.query_one("#export-cancel").display = False
        if not self._sources():
            self._line(Text(f"✗ run {self.run_dir.name} has no checkpoint yet", style="bold red"))
            self.query_one("#export-start", Button).disabled = True
        self._refresh_form()
        self.query_one("#export-start" if self._sources() else "#export-close", Button).focus()

    def _value(self, select_id: str) -> str:
        value = self.query_one(select_id, Select).value
        return "" if value is Select.NULL else str(value)

    def _refresh_form(self) -> None:
        """The default folder and the memory note follow the choices (an edited folder stays)."""
        adapter_only = self._value("#export-kind") == "adapter"
        # Neither the dtype nor GGUF applies to the adapter alone: the row is not shown for it.
        self.query_one("#export-as").display = not adapter_only
        out = self.query_one("#export-out", Input)
        checkpoint = self._value("#export-source")
        note = ""
        if checkpoint:
            with contextlib.suppress(UserError):
                source = resolve_source(self.run_dir, checkpoint)
                default = _relative(
                    default_out_dir(self.run_dir, source, self._value("#export-dtype"), adapter_only)
                )
                if out.value in ("", self._default_out):
                    out.value = default
                    # The end in view: the run and the export's own folder are what the choices
                    # change, and a long runs folder pushed them out of the field.
                    self.call_after_refresh(self._show_out_dir)
                self._default_out = default
        if not adapter_only:
            try:
                est = estimate_merge(self._cfg, self._value("#export-dtype"))
                note = f"merge needs {est.cpu_gb:.1f} GiB of RAM, or {est.gpu_gb:.1f} GiB on a GPU"
            except UserError as exc:
                note = f"no memory estimate: {exc.message}"
        if self.query_one("#export-gguf", Select).disabled:
            note += ("\n" if note else "") + "GGUF: llama.cpp not found (set $QLC_LLAMA_CPP)"
        self.query_one("#export-note", Static).update(Text(note, style="dim"))

    def _show_out_dir(self) -> None:
        """The default folder's end in view (the run and the export's own folder, what the
        choices change). (Input scrolls to its cursor only once the cursor moves: a value set in
        code leaves the start in view.)"""
        out = self.query_one("#export-out", Input)
        out.cursor_position = 0
        out.action_end()
        self._show_whole_path()

    def _show_whole_path(self) -> None:
        """The whole folder under the field, where the field is too narrow to show it."""
        out = self.query_one("#export-out", Input)
        where = self.query_one("#export-where", Static)
        # Not once the export runs or is refused: the log needs the rows, and names the folder.
        quiet = self.client is None and self._refusal is None and not self._lines
        where.display = quiet and len(out.value) >= max(out.content_size.width, 1)
        where.update(Text(out.value, style="dim") if where.display else "")

    def on_input_changed(self, event: Input.Changed) -> None:
        if event.input.id == "export-out":
            event.stop()
            self._show_whole_path()

    def on_select_changed(self, event: Select.Changed) -> None:
        event.stop()
        if self.client is None:
            self._refresh_form()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self.action_start()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        if event.button.id == "export-start":
            self.action_start()
        elif event.button.id == "export-cancel":
            self.action_cancel_export()
        else:
            self.action_close()

    # ---- running -----------------------------------------------------------------------------

    def action_start(self) -> None:
        if self.client is not None or self.query_one("#export-start", Button).disabled:
            return
        adapter_only = self._value("#export-kind") == "adapter"
        gguf_type = self._value("#export-gguf")
        try:
            request = build_request(
                self.run_dir,
                checkpoint=self._value("#export-source") or None,
                out=self.query_one("#export-out", Input).value.strip() or None,
                dtype=None if adapter_only else self._value("#export-dtype"),
                adapter_only=adapter_only,
                gguf=None if adapter_only or gguf_type == NO_GGUF else gguf_type,
                out_field='the "to" field',
            )
            proc = self._launcher(self.run_dir, request.engine_args())
        except UserError as exc:
            self._refuse(Text(f"✗ {exc}", style="bold red"))
            return
        except OSError as exc:
            self._refuse(Text(f"✗ cannot start the engine: {exc}", style="bold red"))
            return
        self._refuse(None)
        self.client = RunClient(self.run_dir, proc=proc, mode="pipe", role="export")
        self._jobs.append(self.client)
        for widget in self.query("Select, Input"):
            widget.disabled = True
        self.query_one("#export-start").display = False
        self.query_one("#export-cancel").display = True
        self.query_one("#export-close", Button).label = "Hide (Esc)"
        self.query_one("#export-progress").display = True
        self.refresh_bindings()  # ctrl+s leaves the footer; Escape now hides
        self._show_whole_path()
        self._line(Text(f"exporting {request.source.name} → {_short(request.out_dir, self.run_dir)}"))
        client, app = self.client, self.app
        app.run_worker(
            lambda: client.read_loop(lambda message: self._deliver(message, app)),
            name=f"export {self.run_dir.name}",
            group="exports",
            thread=True,
            exit_on_error=False,
        )

    def _deliver(self, message: Message, app: App) -> None:
        """From the reader thread: to this dialog while it is open. Once it is closed (hidden),
        its result still reaches the app, which notifies."""
        if self.post_message(message) or not isinstance(message, RunClient.Ended):
            return
        client = message.client
        with contextlib.suppress(ValueError):
            self._jobs.remove(client)
        for ev in client.drain():
            self._record(ev)
        if self.exported is None and not self.error:
            self.error = self._no_result(message.returncode)
        app.post_message(self.Result(self.run_dir.name, self.exported, self.error, self.cancelled))

    def on_run_client_events_arrived(self, message: RunClient.EventsArrived) -> None:
        message.stop()
        for ev in message.client.drain():
            self.note(ev)

    def on_run_client_ended(self, message: RunClient.Ended) -> None:
        message.stop()
        with contextlib.suppress(ValueError):
            self._jobs.remove(message.client)
        if self.exported is None and not self.error:
            self.error = self._no_result(message.returncode)
            self._line(Text(f"✗ {self.error}", style="bold red"))
        self.query_one("#export-cancel").display = False
        if self.exported is None:
            self.query_one("#export-progress").display = False  # (it went on animating "--%")
        self.query_one("#export-close", Button).label = "Close (Esc)"
        self.refresh_bindings()
        self.app.post_message(self.Result(self.run_dir.name, self.exported, self.error, self.cancelled))

    def _record(self, ev: protocol.Event) -> None:
        """What an event says of the export's outcome: the same whether the dialog is shown
        (note) or hidden (_deliver, from the reader thread)."""
        if isinstance(ev, protocol.Exported):
            self.exported = ev
        elif isinstance(ev, protocol.ErrorEvent):
            self.error = ev.message + (f" ({ev.hint})" if ev.hint else "")
            self.cancelled = ev.kind == "interrupted"

    def _no_result(self, returncode: int | None) -> str:
        return f"the engine exited ({returncode}) without a result; see {self.run_dir / runs.ENGINE_LOG}"

    def note(self, ev: protocol.Event) -> None:
        self._record(ev)
        if isinstance(ev, protocol.StageEvent):
            bar = self.query_one("#export-progress", ProgressBar)
            bar.update(total=ev.total or None, progress=max(ev.current - 1, 0))
            self._line(
                Text(f"{ev.current}/{ev.total} {ev.stage.replace('_', ' ')}: {ev.message}", style="dim")
            )
        elif isinstance(ev, protocol.Log) and ev.level in ("info", "warning"):
            self._line(Text(ev.message, style="dim" if ev.level == "info" else "yellow"))
        elif isinstance(ev, protocol.WarningEvent):
            self._line(Text(f"! {ev.message}", style="yellow"))
        elif isinstance(ev, protocol.ErrorEvent):
            self._line(Text(f"✗ {self.error}", style="bold red"))
        elif isinstance(ev, protocol.Exported):
            bar = self.query_one("#export-progress", ProgressBar)
            bar.update(progress=bar.total or 1, total=bar.total or 1)
            where = _short(Path(ev.out_dir), self.run_dir)
            self._line(
                Text(f"✓ exported {len(ev.files)} files, {ev.size_mb:,.1f} MB → {where}", style="bold green")
            )
            if ev.max_logit_diff is not None and ev.tolerance is not None:
                self._line(
                    Text(
                        f"  check: logits within {ev.max_logit_diff:.3g} of base + adapter (tolerance {ev.tolerance:.3g})"
                    )
                )
            if ev.gguf_path:
                self._line(Text(f"  GGUF: {Path(ev.gguf_path).name}"))

    def _line(self, text: Text) -> None:
        self._lines.append(text)
        self._draw_log()

    def _refuse(self, text: Text | None) -> None:
        """Why Export was refused: the latest reason only (each ctrl+s added the same one again,
        and the dialog grew over the Runs list)."""
        self._refusal = text
        self._draw_log()
        self._show_whole_path()

    def _draw_log(self) -> None:
        lines = [*self._lines[-5:], *([self._refusal] if self._refusal else [])]
        self.query_one("#export-log", Static).update(Text("\n").join(lines))

    def action_cancel_export(self) -> None:
        if self.client is not None and self.client.proc is not None and self.client.proc.poll() is None:
            self.client.proc.terminate()  # the engine cleans its temporary folder up and says so
            self._line(Text("cancelling…", style="yellow"))

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        try:
            start, cancel = self.query_one("#export-start", Button), self.query_one("#export-cancel")
        except NoMatches:  # asked before the dialog is composed
            return True
        running = self.client is not None and cancel.display
        if action == "start":  # only while there is something to start
            return self.client is None and not start.disabled
        if action == "close":
            return not running
        if action == "hide":
            return running
        return True

    def action_close(self) -> None:
        self.dismiss(None)

    def action_hide(self) -> None:
        self.dismiss(None)
