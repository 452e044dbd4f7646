"""The engine's command readers: what they say when the console that started the run goes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from engine import protocol
from engine.run import runs
from engine.run.control import CommandQueue
from engine.run.events import Emitter, FileSink


@pytest.mark.parametrize("finished", [False, True])
def test_a_console_letting_go_is_news_only_while_the_run_trains(tmp_path: Path, finished: bool) -> None:
    """A console that stopped a run and moved on (resume, another run) closed its end of the
    stopped engine's stdin, which logged "... training goes on" after the run had finished."""
    emitter = Emitter([FileSink(tmp_path / runs.EVENTS)])
    if finished:
        emitter.emit(protocol.Finished(status="stopped", step=69))
    read, write = os.pipe()
    reader = CommandQueue(emitter).read_stdin(read)
    os.close(write)  # the console lets go
    reader.join(timeout=10)
    emitter.close()
    logged = [e.message for e in runs.read_events(tmp_path)[0] if isinstance(e, protocol.Log)]
    assert any("training goes on" in m for m in logged) is not finished, logged
