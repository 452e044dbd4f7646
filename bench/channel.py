"""Messages between the calibration driver and its child processes, as two append-only JSON-lines
files per child (one each way).

Files rather than the children's stdout: Unsloth, transformers and bitsandbytes print to stdout
and stderr, which go to each child's log. A file also survives the process: after a crash the
driver still reads what the child said last.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any


class Channel:
    """One end: `send` appends to our outbox, `poll` reads what the other end appended since."""

    def __init__(self, outbox: Path, inbox: Path) -> None:
        self.outbox, self.inbox = outbox, inbox
        self._offset = 0
        self._partial = b""

    @classmethod
    def for_child(cls, folder: Path, name: str) -> Channel:
        """The child's end: it writes NAME.out.jsonl and reads NAME.in.jsonl."""
        return cls(folder / f"{name}.out.jsonl", folder / f"{name}.in.jsonl")

    @classmethod
    def for_driver(cls, folder: Path, name: str) -> Channel:
        folder.mkdir(parents=True, exist_ok=True)
        channel = cls(folder / f"{name}.in.jsonl", folder / f"{name}.out.jsonl")
        channel.outbox.touch()
        return channel

    def send(self, **message: Any) -> None:
        message.setdefault("t", time.time())
        line = json.dumps(message, default=str) + "\n"
        with self.outbox.open("a", encoding="utf-8") as f:
            f.write(line)

    def poll(self) -> list[dict[str, Any]]:
        try:
            with self.inbox.open("rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return []
        self._offset += len(data)
        data = self._partial + data
        lines = data.split(b"\n")
        self._partial = lines.pop()  # a torn last line waits for the rest
        out = []
        for line in lines:
            if line.strip():
                out.append(json.loads(line))
        return out

    def wait(self, kinds: set[str], timeout: float | None = None, key: str = "cmd") -> dict[str, Any] | None:
        """Block until a message whose `key` is one of `kinds` arrives (others are dropped)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while deadline is None or time.monotonic() < deadline:
            for message in self.poll():
                if message.get(key) in kinds:
                    return message
            time.sleep(0.02)
        return None
