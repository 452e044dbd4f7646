"""The console in a real terminal: tmux runs `qlc`, keys drive it, capture-pane reads the screen.

Case 1: pick the tiny preset, start it, watch steps arrive, sample from the live model, stop it
(the save shows), quit. Case 2: kill the terminal mid-run; the run keeps training, and a new `qlc`
attaches to it with its history, then stops it. Both train the real tiny model (NF4 + LoRA +
8-bit AdamW on the CPU), so they take a minute or two.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from engine.run import runs

REPO = Path(__file__).resolve().parents[2]
pytestmark = [
    pytest.mark.e2e,
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed"),
]


class Tmux:
    """One tmux server of our own (its own socket: it starts with this test's environment)."""

    def __init__(self, name: str, width: int = 80, height: int = 24) -> None:
        self.socket = f"qlc-e2e-{os.getpid()}-{name}"
        self.session = name
        self.width, self.height = width, height

    def _tmux(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["tmux", "-L", self.socket, *args], capture_output=True, text=True, check=check)

    def start(self, command: list[str], env: dict[str, str]) -> None:
        # The terminal's size is tmux's: COLUMNS and LINES inherited from the test process (set
        # by the test tooling) would pin the app to another size.
        line = "-u COLUMNS -u LINES " + " ".join(f"{k}={v}" for k, v in env.items()) + " " + " ".join(command)
        self._tmux(
            "new-session", "-d", "-s", self.session, "-x", str(self.width), "-y", str(self.height),
            "-c", str(REPO), f"env {line}",
        )  # fmt: skip
        self._tmux("set-option", "-t", self.session, "remain-on-exit", "on")

    def keys(self, *keys: str, pause: float = 0.15) -> None:
        for key in keys:
            self._tmux("send-keys", "-t", self.session, key)
            time.sleep(pause)

    def type(self, text: str) -> None:
        self._tmux("send-keys", "-t", self.session, "-l", text)
        time.sleep(0.2)

    def screen(self) -> str:
        return self._tmux("capture-pane", "-p", "-t", self.session, check=False).stdout

    def wait(self, what: str | Callable[[str], bool], timeout: float = 60.0) -> str:
        test = (lambda s: what in s) if isinstance(what, str) else what
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            screen = self.screen()
            if test(screen):
                return screen
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for {what!r}; the screen:\n{self.screen()}")

    def pane_dead(self) -> bool:
        out = self._tmux("display", "-p", "-t", self.session, "#{pane_dead}", check=False).stdout.strip()
        return out == "1"

    def kill(self) -> None:
        self._tmux("kill-server", check=False)


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    keep = ("PATH", "HOME", "LANG", "QLC_CACHE_DIR", "HF_HOME", "HF_HUB_OFFLINE", "TOKENIZERS_PARALLELISM")
    out = {k: os.environ[k] for k in keep if k in os.environ}
    out["QLC_RUNS_DIR"] = str(tmp_path / "runs")
    out["TERM"] = "xterm-256color"
    return out


def _qlc() -> list[str]:
    return [sys.executable, "-m", "tui.cli"]


def _step(screen: str) -> int:
    """The step the dashboard's progress line shows (`━━━── 12/120  ep ...`)."""
    found = re.findall(r" (\d+)/(\d+)  ep ", screen)
    return int(found[-1][0]) if found else 0


def _start_tiny(tmux: Tmux) -> None:
    tmux.wait("tiny-demo", timeout=30)
    tmux.keys("/")
    tmux.type("tiny")
    tmux.keys("Enter")  # to the filtered list: tiny-demo is the one left
    tmux.wait("Offline demo")
    tmux.keys("s")  # start; the budget says it fits, so there is no question
    # The dashboard shows the new run's status. On a loaded machine a key sent while the list is
    # still settling can be lost: send it once more rather than wait for a run that never began.
    try:
        tmux.wait(lambda s: "starting" in s or "training" in s, timeout=30)
    except AssertionError:
        tmux.keys("s")
        tmux.wait(lambda s: "starting" in s or "training" in s, timeout=60)


def _wait_exited(run_dir: Path, timeout: float = 60) -> None:
    """The engine writes `finished`, then cleans up and exits (releasing the run's lock)."""
    deadline = time.monotonic() + timeout
    while runs.is_running(run_dir) and time.monotonic() < deadline:
        time.sleep(0.2)


def _events_steps(run_dir: Path) -> int:
    events, _ = runs.read_events(run_dir)
    return max((e.step for e in events if type(e).__name__ == "Step"), default=0)


def test_start_watch_sample_stop_quit(env: dict[str, str]) -> None:
    tmux = Tmux("console")
    try:
        tmux.start(_qlc(), env)
        _start_tiny(tmux)
        screen = tmux.wait(lambda s: _step(s) >= 4, timeout=240)
        assert "training" in screen and "loss" in screen
        # Sample from the live model: it answers at the next step boundary, then training goes on.
        tmux.keys("5")
        tmux.wait("live model")
        tmux.keys("i")  # into the prompt: until then the pane's keys (1-5, q) stay keys
        tmux.type("Say hello")
        tmux.keys("Enter")
        screen = tmux.wait(
            lambda s: re.search(r"\(\d+ tokens, [\d.]+ s, stopped by", s) is not None, timeout=120
        )
        assert "› Say hello" in screen and "[live @ step" in screen
        # Stop: a question first, then the save happening.
        tmux.keys("Escape", pause=0.6)  # alone: ESC with a key close behind reads as Alt+key
        tmux.keys("3", "x")
        tmux.wait("Stop and save")
        tmux.keys("y")
        screen = tmux.wait("stopped at step", timeout=120)
        assert "saved checkpoint-" in screen
        tmux.keys("n")
        (run_dir,) = runs.list_run_dirs(Path(env["QLC_RUNS_DIR"]))
        _wait_exited(run_dir)
        summary = runs.summarize(run_dir)
        assert summary.status == "stopped" and summary.last_checkpoint
        stopped_at = summary.step
        # The dashboard of a stopped run offers no Stop, Save now or Detach.
        footer = tmux.wait(lambda s: "l Log scale" in s).splitlines()[-1]
        assert "Stop" not in footer and "Save now" not in footer and "Detach" not in footer
        # Resume from the Runs pane: the run goes on from its checkpoint.
        tmux.keys("4")
        tmux.wait(lambda s: "stopped" in s and run_dir.name[4:13] in s)
        tmux.keys("r")
        tmux.wait(lambda s: _step(s) > stopped_at and "training" in s, timeout=240)
        # The engine dies (a kill, an OOM killer): the console says so, and how to go on.
        os.kill(_engine_pid(run_dir), signal.SIGKILL)
        # The run's header says it first; then the dialog, with the log and how to go on.
        screen = tmux.wait(lambda s: "without finishing" in s and "Close (Enter)" in s, timeout=60)
        assert "engine.log" in screen and "resumes" in screen and "checkpoint-" in screen
        tmux.keys("Escape")  # the error dialog
        # Gone before the next key: an ESC with a key close behind it reads as Alt+key (the
        # terminal's escape sequences), so `q` sent while ESC is still pending would quit nothing.
        tmux.wait(lambda s: "crashed" in s and "Close (Enter)" not in s)
        tmux.keys("q")
        tmux.wait(lambda _: tmux.pane_dead(), timeout=15)
    finally:
        tmux.kill()
    # `qlc attach` to the crashed run: its history, then why it ended and how to resume.
    attach = Tmux("attach", 200, 50)
    try:
        attach.start([*_qlc(), "attach", run_dir.name], env)
        attach.wait(lambda _: attach.pane_dead(), timeout=60)
        # The terminal folds the long line: compare without the spaces and line ends.
        joined = "".join(attach.screen().split())
        assert "theengineexitedwithoutfinishing" in joined and "engine.log" in joined
        assert f"qlcresume{run_dir.name}`continuesitfromcheckpoint-" in joined
    finally:
        attach.kill()


def _engine_pid(run_dir: Path) -> int:
    """The newest engine session's process (its hello)."""
    events, _ = runs.read_events(run_dir)
    return [e for e in events if type(e).__name__ == "Hello"][-1].pid


def _box_text(screen: str, title: str) -> str:
    """The text inside a bordered box of the screen, its wrapped lines joined."""
    lines = screen.splitlines()
    start = next(i for i, line in enumerate(lines) if title in line)
    column = lines[start].index("╭")
    inside = []
    for line in lines[start + 1 :]:
        if line[column : column + 1] == "╰":
            break
        inner = line[column + 1 :].split("│")[0]
        inside.append(re.sub(r"[▁▂▃▄▅▆▇█]+\s*$", "", inner))  # the scrollbar's thumb
    return " ".join(" ".join(inside).split())


@pytest.mark.parametrize("size", [(80, 24), (120, 40)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_quick_keys_across_every_pane_never_stick(env: dict[str, str], size: tuple[int, int]) -> None:
    """Bursts of Down and Up in the presets list, then every pane by its number: each shows and
    stays, and the console goes idle. The Memory pane's breakdown is readable whole: wrapped, and
    scrolled where a short window cannot hold it."""
    import json

    tmux = Tmux(f"keys{size[0]}", *size)
    try:
        tmux.start(_qlc(), env)
        tmux.wait(lambda s: "tiny-demo" in s and "llama-3.1-8b-h100" in s, timeout=30)
        for burst in (["Down"] * 3, ["Up"] * 2, ["Down"] * 5, ["Up"] * 4, ["Down", "Up", "Down"]):
            tmux.keys(*burst, pause=0.02)
        time.sleep(1.0)
        pid = int(tmux._tmux("display", "-p", "-t", tmux.session, "#{pane_pid}").stdout.strip())
        cpu = _cpu_seconds(pid)
        time.sleep(2.0)
        assert _cpu_seconds(pid) - cpu < 0.6, "the console keeps a core busy while nothing happens"
        for key, mark in (
            ("2", "breakdown (GiB)"),
            ("3", "No run being watched"),
            ("4", "No runs yet"),
            ("5", "Replies appear here"),
            ("1", "setting"),
            ("5", "Replies appear here"),
            ("2", "breakdown (GiB)"),
        ):
            tmux.keys(key, pause=0.05)
            tmux.wait(mark, timeout=15)
            time.sleep(0.8)
            assert mark in tmux.screen(), f"{key} did not stay: {tmux.screen()}"
        # The Memory pane of the 8 GB recipe: every part of every term, as `qlc estimate` lists them.
        tmux.keys("1", "/")
        tmux.type("4060")
        tmux.keys("Enter")
        tmux.wait("llama-3.1-8b-rtx4060  ")
        tmux.keys("2")
        # (Its first term drawn too: the frame with the new verdict may come before the breakdown's.)
        screen = tmux.wait(
            lambda s: "DOES NOT FIT" in s and "breakdown (GiB)" in s and "4-bit linears" in s, timeout=30
        )
        cli = subprocess.run(
            [*_qlc(), "estimate", "llama-3.1-8b-rtx4060", "--json"],
            capture_output=True, text=True, cwd=REPO, env={**os.environ, **env}, timeout=120,
        )  # fmt: skip
        parts = [f"{k} {v:.2f}" for term in json.loads(cli.stdout)["terms"] for k, v in term["parts"].items()]
        views = [_box_text(screen, "breakdown (GiB)")]
        if size[1] < 30:  # a short window: the rest is a scroll away (Tab to the breakdown)
            tmux.keys("Tab", "Tab")
            for _ in range(12):
                tmux.keys("Down", pause=0.3)
                views.append(_box_text(tmux.screen(), "breakdown (GiB)"))
        assert not [v for v in views if "…" in v]  # wrapped, never cut
        missing = [p for p in parts if not any(p in v for v in views)]
        assert not missing, f"not shown: {missing}\n{tmux.screen()}"
        tmux.keys("Escape", pause=0.6)  # alone: ESC with a key close behind reads as Alt+key
        tmux.keys("q")
        tmux.wait(lambda _: tmux.pane_dead(), timeout=15)
    finally:
        tmux.kill()


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_run_survives_its_terminal_and_a_new_console_attaches(env: dict[str, str]) -> None:
    tmux = Tmux("first")
    try:
        tmux.start(_qlc(), env)
        _start_tiny(tmux)
        tmux.wait(lambda s: _step(s) >= 2, timeout=240)
    finally:
        tmux.kill()  # the terminal goes away, as with a dropped SSH connection
    (run_dir,) = runs.list_run_dirs(Path(env["QLC_RUNS_DIR"]))
    before = _events_steps(run_dir)
    deadline = time.monotonic() + 120
    while _events_steps(run_dir) <= before + 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert runs.is_running(run_dir), "the run died with its terminal"
    assert _events_steps(run_dir) > before + 2, "the run stopped training without its console"

    again = Tmux("second")
    try:
        again.start(_qlc(), env)
        # A new console finds the running run and attaches, history included.
        screen = again.wait(lambda s: run_dir.name in s and _step(s) > before, timeout=60)
        assert "training" in screen
        again.keys("x")
        again.wait("Stop and save")
        again.keys("y")
        again.wait("stopped at step", timeout=120)
        again.keys("n", "q")
        again.wait(lambda _: again.pane_dead(), timeout=15)
    finally:
        again.kill()
    _wait_exited(run_dir)
    assert runs.summarize(run_dir).status == "stopped"
