"""Hub downloads for real: the real `qlc pull` (and the engine process it starts, with the real
huggingface_hub client) against a Hub stand-in on 127.0.0.1 (tests/hubserver.py) serving the tiny
model and a small chat dataset. What a run would fetch, with progress; a dropped connection and a
killed process that resume; a warm cache and HF_HUB_OFFLINE that make no request; the hub's
refusals as one line and exit 2."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from engine import protocol
from engine.errors import UserError
from engine.hub.fetch import CHUNK_BYTES
from engine.hub.files import dataset_files, model_files, readme_configs
from tests.conftest import QLC, REPO, qlc
from tests.hubserver import HubServer

TINY_FILES = {
    "chat_template.jinja",
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
}
DECOYS = {  # what a real repo also holds, and a run must never download
    "pytorch_model.bin": b"\x80\x02pickle" * 1000,
    "original/consolidated.00.pth": b"\x80\x02pickle" * 1000,
    "README.md": b"# tiny\n",
}
CHATS = REPO / "presets" / "data" / "tiny-instruct.jsonl"


@pytest.fixture(scope="module")
def tiny_folder() -> Path:
    from engine.models import tiny_build as tiny

    return tiny.ensure_builtin("builtin:tiny-llama")


@pytest.fixture
def hub(tiny_folder: Path):
    with HubServer() as server:
        files = {p.name: p.read_bytes() for p in tiny_folder.iterdir() if p.is_file()}
        assert set(files) == TINY_FILES
        server.push("owner/tiny", {**files, **DECOYS})
        yield server
        server.release()


@pytest.fixture
def env(hub: HubServer, tmp_path: Path) -> dict[str, str]:
    """A user's environment: the stand-in as the hub, an empty hub cache, the network allowed."""
    base = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HF_HUB_OFFLINE")}
    return {
        **base,
        "HF_ENDPOINT": hub.url,
        "HF_HOME": str(tmp_path / "hf"),
        "HF_HUB_OFFLINE": "0",
        "QLC_CACHE_DIR": str(tmp_path / "qlc"),
    }


def _events(stdout: str) -> list[protocol.Event]:
    return [protocol.decode_event(line) for line in stdout.splitlines() if line.startswith("{")]


def _snapshot(env: dict[str, str], repo: str = "owner/tiny", kind: str = "models") -> Path:
    folder = Path(env["HF_HOME"]) / "hub" / f"{kind}--{repo.replace('/', '--')}"
    commit = (folder / "refs" / "main").read_text()
    return folder / "snapshots" / commit


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_pull_fetches_only_what_a_run_loads_with_byte_progress(
    hub: HubServer, env: dict[str, str], tiny_folder: Path
) -> None:
    hub.rate = 3e6  # bytes/s per transfer: the 7 MB of weights take a few seconds
    t0 = time.monotonic()
    result = qlc("pull", "owner/tiny", "--json", env=env)
    seconds = time.monotonic() - t0
    assert result.returncode == 0, result.stderr + result.stdout
    stages = [e for e in _events(result.stdout) if isinstance(e, protocol.StageEvent)]
    total = sum((tiny_folder / f).stat().st_size for f in TINY_FILES)
    assert stages and all(e.stage == "downloading" and e.unit == "B" and e.total == total for e in stages)
    currents = [e.current for e in stages]
    assert currents == sorted(currents) and currents[-1] == total and currents[0] == 0
    assert len(stages) <= 4 * seconds + 2, f"{len(stages)} events in {seconds:.1f} s"
    measured = [e for e in stages if e.rate]
    assert measured and all(e.eta_s is not None for e in measured)
    assert max(e.rate for e in measured) <= 1.5 * hub.rate  # what the server let through, measured
    assert "owner/tiny: model.safetensors" in {e.message for e in stages}

    fetched = {r.path.rsplit("/resolve/", 1)[1].split("/", 1)[1] for r in hub.file_requests()}
    assert fetched == TINY_FILES  # no pickle, no original checkpoint, no README
    snap = _snapshot(env)
    assert {p.name for p in snap.iterdir()} == TINY_FILES
    for name in TINY_FILES:
        assert _sha((snap / name).read_bytes()) == _sha((tiny_folder / name).read_bytes()), name

    # Pulled again: the hub is asked for its newest commit, nothing is transferred.
    hub.requests.clear()
    again = qlc("pull", "owner/tiny", env=env)
    assert again.returncode == 0, again.stderr
    assert "owner/tiny at commit" in again.stdout and "(cached)" in again.stdout
    assert [r.path for r in hub.requests if r.path != "/api/agent-harnesses"] == ["/api/models/owner/tiny"]


def test_a_dropped_connection_resumes_in_the_same_download(
    hub: HubServer, env: dict[str, str], tiny_folder: Path
) -> None:
    weights = (tiny_folder / "model.safetensors").read_bytes()
    drop = 3_000_000
    hub.drop_after("model.safetensors", drop)
    result = qlc("pull", "owner/tiny", "--json", env=env)
    assert result.returncode == 0, result.stderr + result.stdout
    transfers = [r for r in hub.requests if r.method == "GET" and r.path.startswith("/lfs/")]
    written = (
        drop // CHUNK_BYTES * CHUNK_BYTES
    )  # the client writes whole chunks; the rest is lost with the connection
    assert [r.range for r in transfers] == [None, f"bytes={written}-"]
    assert hub.sent["model.safetensors"] == len(weights) + drop - written  # only the lost part twice
    assert _sha((_snapshot(env) / "model.safetensors").read_bytes()) == _sha(weights)


def _children(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def test_a_killed_download_resumes_in_the_next_process(
    hub: HubServer, env: dict[str, str], tiny_folder: Path
) -> None:
    weights = (tiny_folder / "model.safetensors").read_bytes()
    stall = 2_500_000
    written = stall // CHUNK_BYTES * CHUNK_BYTES
    hub.stall_after("model.safetensors", stall)
    console = subprocess.Popen(
        [*QLC, "pull", "owner/tiny", "--json"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        assert hub.stalled.wait(60), "the transfer never reached the stall"
        (engine,) = _children(console.pid)
        blobs = Path(env["HF_HOME"]) / "hub" / "models--owner--tiny" / "blobs"
        partial = blobs / f"{_sha(weights)}.incomplete"
        deadline = time.monotonic() + 30
        while (not partial.exists() or partial.stat().st_size < written) and time.monotonic() < deadline:
            time.sleep(0.05)  # the client writes what it received
        os.kill(engine, signal.SIGKILL)  # a reboot, an OOM kill: nothing gets to clean up
        console.communicate(timeout=60)
    finally:
        hub.release()
        if console.poll() is None:
            os.killpg(console.pid, signal.SIGKILL)
    kept = partial.stat().st_size
    assert kept == written

    hub.requests.clear()
    result = qlc("pull", "owner/tiny", "--json", env=env)
    assert result.returncode == 0, result.stderr + result.stdout
    transfers = [r for r in hub.requests if r.method == "GET" and r.path.startswith("/lfs/")]
    assert [r.range for r in transfers] == [f"bytes={kept}-"]
    assert hub.sent["model.safetensors"] == len(weights) + stall - kept  # the first process's bytes were kept
    first = next(
        e
        for e in _events(result.stdout)
        if isinstance(e, protocol.StageEvent) and e.message.endswith("model.safetensors")
    )
    assert first.current >= kept  # the resumed part counts as done from its start
    assert _sha((_snapshot(env) / "model.safetensors").read_bytes()) == _sha(weights)
    assert not partial.exists()


def _fetch_as_a_run(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """What a run's start does (engine.train.sources): a fetch that may use a warm cache."""
    code = (
        "from engine.hub.model import fetch_model\n"
        "snap = fetch_model('owner/tiny', None)\n"
        "print(snap.commit, sorted(snap.files))"
    )
    return subprocess.run(
        [str(Path(os.sys.executable)), "-c", code],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_warm_cache_and_offline_mode_make_no_request(hub: HubServer, env: dict[str, str]) -> None:
    assert qlc("pull", "owner/tiny", env=env).returncode == 0
    commit = _snapshot(env).name
    hub.requests.clear()

    warm = _fetch_as_a_run(env)
    assert warm.returncode == 0, warm.stderr
    assert warm.stdout.split()[0] == commit
    offline = {**env, "HF_HUB_OFFLINE": "1"}
    assert _fetch_as_a_run(offline).stdout.split()[0] == commit
    pulled = qlc("pull", "owner/tiny", env=offline)
    assert pulled.returncode == 0, pulled.stderr
    assert "checking the local cache only" in pulled.stdout and "(cached)" in pulled.stdout
    assert hub.requests == []

    # A cache missing one file is not warm: the run asks the hub, and fetches just that file.
    link = _snapshot(env) / "tokenizer.json"
    link.resolve().unlink()  # the blob
    link.unlink()
    assert _fetch_as_a_run(env).returncode == 0
    assert {r.path.rsplit("/", 1)[1] for r in hub.file_requests()} == {"tokenizer.json"}

    # A cache the engine did not fill (no manifest) and no network: a run uses what is there.
    for manifest in (Path(env["QLC_CACHE_DIR"]) / "hub").rglob("*.json"):
        manifest.unlink()
    unreachable = _fetch_as_a_run({**env, "HF_ENDPOINT": "http://127.0.0.1:9"})
    assert unreachable.returncode == 0, unreachable.stderr
    assert unreachable.stdout.split()[0] == commit

    missing = qlc("pull", "owner/other", env=offline)
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines() == [
        "qlc: error: model.name_or_path: owner/other is not in the local hub cache, and HF_HUB_OFFLINE is set "
        "(download it once with the network on, or name a local folder)"
    ]


def _one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qlc: error: "), result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    return lines[0]


def test_hub_refusals_are_one_line_and_exit_2(hub: HubServer, env: dict[str, str]) -> None:
    line = _one_line_error(qlc("pull", "owner/missing", env=env))
    assert f"owner/missing not found on {hub.url} (or it is private)" in line and "hf auth login" in line

    hub.push("owner/gated", {"config.json": b"{}", "model.safetensors": b"\0" * 64})
    hub.gate("owner/gated")
    line = _one_line_error(qlc("pull", "owner/gated", env=env))
    assert "owner/gated is gated" in line and f"accept its conditions on {hub.url}/owner/gated" in line
    hub.requests.clear()
    granted = qlc("pull", "owner/gated", env={**env, "HF_TOKEN": hub.token})
    assert granted.returncode == 0, granted.stderr
    gets = [r for r in hub.requests if r.method == "GET" and r.path != "/api/agent-harnesses"]
    assert {r.token for r in gets if not r.path.startswith("/lfs/")} == {hub.token}
    assert {r.token for r in gets if r.path.startswith("/lfs/")} == {None}  # never sent off the hub

    line = _one_line_error(qlc("pull", "owner/tiny", "--revision", "nope", env=env))
    assert "model.revision: 'nope' is not a branch, tag or commit of owner/tiny" in line

    hub.push("owner/pickled", {"config.json": b"{}", "pytorch_model.bin": b"\x80\x02" * 64})
    line = _one_line_error(qlc("pull", "owner/pickled", env=env))
    assert "only as PyTorch pickles (pytorch_model.bin)" in line and "model.allow_pickle" in line
    assert qlc("pull", "owner/pickled", "--allow-pickle", env=env).returncode == 0
    assert (_snapshot(env, "owner/pickled") / "pytorch_model.bin").is_file()

    line = _one_line_error(qlc("pull", "owner/tiny", env={**env, "HF_ENDPOINT": "http://127.0.0.1:9"}))
    assert "cannot reach the hub at http://127.0.0.1:9" in line


# ---------------------------------------------------------------------------------------------
# Hub datasets
# ---------------------------------------------------------------------------------------------

CARD = b"""---
configs:
- config_name: default
  data_files:
  - split: train
    path: data/train-*.parquet
  - split: test
    path: data/test-*.parquet
---
# chats
"""


def _parquet(rows: list[dict]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buffer)
    return buffer.getvalue()


def _chats() -> list[dict]:
    return [json.loads(line) for line in CHATS.read_text().splitlines() if line.strip()]


def test_a_hub_dataset_fetches_its_split_and_loads_from_the_cache(
    hub: HubServer, env: dict[str, str]
) -> None:
    rows = _chats()
    hub.push(
        "owner/chats",
        {
            "README.md": CARD,
            "data/train-00000-of-00002.parquet": _parquet(rows[:300]),
            "data/train-00001-of-00002.parquet": _parquet(rows[300:500]),
            "data/test-00000-of-00001.parquet": _parquet(rows[500:]),
            "extra/other.parquet": _parquet(rows[:10]),
        },
        repo_type="dataset",
    )
    overrides = [
        "--set",
        "data.source=owner/chats",
        "--set",
        "data.split=train",
        "--set",
        "data.val_fraction=0",
    ]
    pulled = qlc("pull", "tiny-demo", *overrides, env=env)
    assert pulled.returncode == 0, pulled.stderr
    assert "owner/chats at commit" in pulled.stdout
    fetched = {r.path.split("/resolve/", 1)[1].split("/", 1)[1] for r in hub.file_requests()}
    assert fetched == {"README.md", "data/train-00000-of-00002.parquet", "data/train-00001-of-00002.parquet"}

    hub.requests.clear()
    report = qlc("data", "tiny-demo", *overrides, "--json", env=env)
    assert report.returncode == 0, report.stderr
    assert json.loads(report.stdout)["report"]["examples"] == 500  # the train split's rows, all of them
    assert hub.requests == []  # read from the local snapshot

    line = _one_line_error(
        qlc("pull", "tiny-demo", "--set", "data.source=owner/chats", "--set", "data.split=dev", env=env)
    )
    assert (
        "data.split: 'dev' is not a split of owner/chats (subset default) (its splits: train, test)" in line
    )


# ---------------------------------------------------------------------------------------------
# The choice of files (pure)
# ---------------------------------------------------------------------------------------------

LLAMA_31 = [  # meta-llama/Llama-3.1-8B-Instruct's files
    ".gitattributes", "LICENSE", "README.md", "USE_POLICY.md", "config.json", "generation_config.json",
    "model-00001-of-00004.safetensors", "model-00002-of-00004.safetensors",
    "model-00003-of-00004.safetensors", "model-00004-of-00004.safetensors",
    "model.safetensors.index.json", "original/consolidated.00.pth", "original/params.json",
    "original/tokenizer.model", "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json",
]  # fmt: skip


def test_a_model_repo_gives_its_config_tokenizer_and_indexed_shards() -> None:
    index = {"weight_map": {f"layer.{i}": f"model-0000{i % 4 + 1}-of-00004.safetensors" for i in range(8)}}
    assert model_files(LLAMA_31, repo="meta-llama/x", index=index) == [
        "config.json",
        "generation_config.json",
        "model-00001-of-00004.safetensors",
        "model-00002-of-00004.safetensors",
        "model-00003-of-00004.safetensors",
        "model-00004-of-00004.safetensors",
        "model.safetensors.index.json",
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    with pytest.raises(UserError, match="names shards the repo does not hold"):
        model_files(LLAMA_31, repo="x", index={"weight_map": {"a": "model-00009-of-00009.safetensors"}})
    code = model_files(
        ["config.json", "model.safetensors", "modeling_x.py"], repo="x", trust_remote_code=True
    )
    assert "modeling_x.py" in code
    assert "modeling_x.py" not in model_files(["config.json", "model.safetensors", "modeling_x.py"], repo="x")


def test_a_dataset_card_picks_the_subset_and_split_files() -> None:
    card = (
        "---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train_sft\n    path: data/train_sft-*\n"
        "  - split: test_sft\n    path: data/test_sft-*\n- config_name: other\n  data_files: other/*.jsonl\n---\n"
    )
    names = ["README.md", "data/train_sft-0.parquet", "data/train_sft-1.parquet", "data/test_sft-0.parquet"]
    configs = readme_configs(card)
    files, by_split = dataset_files(names, configs, repo="r", subset=None, split="train_sft[:10%]")
    assert files == ["data/train_sft-0.parquet", "data/train_sft-1.parquet"]
    assert by_split == {"train_sft": files}
    with pytest.raises(UserError, match="'nope' is not a subset of r"):
        dataset_files(names, configs, repo="r", subset="nope", split="train")
    # Without a card's configs every data file is fetched, and datasets tells the splits apart.
    assert dataset_files(
        ["a/train.jsonl", "b.py", "state.json"], [], repo="r", subset=None, split="train"
    ) == (
        ["a/train.jsonl"],
        None,
    )
    with pytest.raises(UserError, match="only a loading script"):
        dataset_files(["loader.py", "README.md"], [], repo="r", subset=None, split="train")
