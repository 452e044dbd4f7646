"""The run lifecycle, in pure Python (no torch): what the console and the engine child share.

    runs.py          run directories: create, find, list, read events, send commands, status
    launcher.py      start an engine process (or torchrun) detached, in its own session
    distributed.py   how many processes a run takes, torchrun's command line, each rank's place
    checkpoints.py   checkpoint folders that are complete or absent (stage, commit, rotate)
    fingerprint.py   the dataset a run started with, checked before it resumes
    events.py        where a run's events go: the pipe and RUN_DIR/events.jsonl
    control.py       commands in, from stdin and the run's control FIFO

The console may import any module here; nothing here imports engine.train.
"""
