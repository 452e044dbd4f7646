"""A small Hugging Face Hub stand-in on 127.0.0.1, for tests that download for real.

It serves model and dataset repos through the endpoints the real `huggingface_hub` client uses:

    GET  /api/{models|datasets}/OWNER/NAME[/revision/REV]    repo info: commit sha, files, sizes, LFS
    HEAD /[datasets/]OWNER/NAME/resolve/REV/PATH             X-Repo-Commit, ETag; LFS files: X-Linked-Etag,
                                                             X-Linked-Size and a 302 to the blob store, as the Hub does
    GET  /[datasets/]OWNER/NAME/resolve/REV/PATH             the bytes (LFS: through the same redirect)
    GET  /lfs/SHA256                                         the blob store: Range requests answered with 206

REV is a branch (`main`), or a commit sha. Errors carry the Hub's X-Error-Code header (RepoNotFound,
RevisionNotFound, EntryNotFound, GatedRepo), so the client raises the same exceptions as against the Hub.

Tests push commits (`push`), read what was asked (`requests`), make a repo gated, drop a transfer
mid-file once (`drop_after`), stall one (`stall_after`: the client hangs there until killed) and cap
the transfer rate (`rate`), so progress reports have time to happen.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".parquet", ".arrow", ".gguf")
CHUNK = 64 * 1024


def git_blob_sha(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Commit:
    sha: str
    files: dict[str, bytes]


@dataclass
class Repo:
    commits: list[Commit] = field(default_factory=list)  # oldest first; `main` is the last
    gated: bool = False


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    range: str | None
    token: str | None


class HubServer:
    """Start with `with HubServer() as hub:`; `hub.url` is what HF_ENDPOINT should be."""

    def __init__(self, token: str = "hf_test_token") -> None:
        self.repos: dict[tuple[str, str], Repo] = {}
        self.requests: list[Request] = []
        self.token = token  # the one token that opens gated repos
        self.rate: float | None = None  # bytes per second for file bodies; None: as fast as it goes
        self._drops: dict[str, int] = {}  # repo path -> bytes to send before dropping, once
        self._stalls: dict[str, int] = {}
        self.sent: dict[str, int] = {}  # repo path -> body bytes sent, over all requests
        self.stalled = threading.Event()  # set when a stalled transfer reached its stall point
        self._release = threading.Event()
        self._lock = threading.Lock()
        handler = self._handler()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        # LFS blobs come from another host, as the Hub's CDN: the client follows the redirect
        # without its token. Another loopback address is another host to the client.
        try:
            self._cdn = ThreadingHTTPServer(("127.0.0.2", 0), handler)
        except OSError:  # no 127.0.0.2 (not Linux): the same host then
            self._cdn = self._server
        self._servers = list({id(s): s for s in (self._server, self._cdn)}.values())
        self._threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in self._servers]
        for s in self._servers:
            s.daemon_threads = True

    # -- setup ----------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def cdn_url(self) -> str:
        host, port = self._cdn.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> HubServer:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._release.set()
        for s in self._servers:
            s.shutdown()
            s.server_close()

    def push(self, repo_id: str, files: dict[str, bytes] | Path, repo_type: str = "model") -> str:
        """A new commit on `main` holding exactly `files` (a dict, or every file under a folder)."""
        if isinstance(files, Path):
            files = {
                str(p.relative_to(files)): p.read_bytes() for p in sorted(files.rglob("*")) if p.is_file()
            }
        repo = self.repos.setdefault((repo_type, repo_id), Repo())
        digest = hashlib.sha1(repo_id.encode())
        for name in sorted(files):
            digest.update(name.encode() + b"\0" + hashlib.sha256(files[name]).digest())
        digest.update(str(len(repo.commits)).encode())
        sha = digest.hexdigest()
        repo.commits.append(Commit(sha, dict(files)))
        return sha

    def gate(self, repo_id: str, repo_type: str = "model") -> None:
        self.repos[(repo_type, repo_id)].gated = True

    def drop_after(self, path: str, nbytes: int) -> None:
        """The next transfer of `path` (as in the repo) sends `nbytes` of the body, then closes the
        connection, as a network drop does."""
        self._drops[path] = nbytes

    def stall_after(self, path: str, nbytes: int) -> None:
        """The next transfer of `path` sends `nbytes`, then sends nothing more until the server stops."""
        self._stalls[path] = nbytes

    def release(self) -> None:
        """Let a stalled transfer end (its client is gone, or the test is done with it)."""
        self._release.set()

    def file_requests(self, method: str = "GET") -> list[Request]:
        return [r for r in self.requests if r.method == method and "/resolve/" in r.path]

    # -- serving ----------------------------------------------------------------------------------

    def _find(self, repo_type: str, repo_id: str, rev: str) -> tuple[Repo | None, Commit | None]:
        repo = self.repos.get((repo_type, repo_id))
        if repo is None or not repo.commits:
            return None, None
        if rev == "main":
            return repo, repo.commits[-1]
        return repo, next((c for c in repo.commits if c.sha == rev), None)

    def _blob(self, sha256: str) -> tuple[str, bytes] | None:
        for repo in self.repos.values():
            for commit in repo.commits:
                for name, data in commit.files.items():
                    if hashlib.sha256(data).hexdigest() == sha256:
                        return name, data
        return None

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:  # quiet
                pass

            def do_HEAD(self) -> None:
                self._serve(body=False)

            def do_GET(self) -> None:
                self._serve(body=True)

            def _error(self, status: int, code: str, message: str = "", headers: dict | None = None) -> None:
                payload = json.dumps({"error": message or code}).encode()
                self.send_response(status)
                self.send_header("X-Error-Code", code)
                if message:
                    self.send_header("X-Error-Message", message)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)

            def _serve(self, body: bool) -> None:
                url = urlsplit(self.path)
                path = unquote(url.path)
                auth = self.headers.get("Authorization", "")
                token = auth.removeprefix("Bearer ") if auth.startswith("Bearer ") else None
                with hub._lock:
                    hub.requests.append(Request(self.command, path, self.headers.get("Range"), token))
                if m := re.fullmatch(r"/api/(models|datasets)/([^/]+/[^/]+)(?:/revision/(.+))?", path):
                    return self._info(m.group(1)[:-1], m.group(2), m.group(3) or "main", token)
                if m := re.fullmatch(r"/(datasets/)?([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path):
                    return self._resolve("dataset" if m.group(1) else "model", *m.group(2, 3, 4), token, body)
                if m := re.fullmatch(r"/lfs/([0-9a-f]{64})", path):
                    return self._lfs(m.group(1), body)
                return self._error(404, "NotFound", f"no route {path}")

            def _access(self, repo_type: str, repo_id: str, rev: str, token: str | None) -> Commit | None:
                repo, commit = hub._find(repo_type, repo_id, rev)
                if repo is None:
                    # The Hub answers 401 for a repo that does not exist (or is private) without a token.
                    self._error(401, "RepoNotFound", "Repository not found")
                    return None
                if repo.gated and token != hub.token:
                    self._error(403, "GatedRepo", "Access to this model is restricted: accept its conditions")
                    return None
                if commit is None:
                    self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
                    return None
                return commit

            def _info(self, repo_type: str, repo_id: str, rev: str, token: str | None) -> None:
                commit = self._access(repo_type, repo_id, rev, token)
                if commit is None:
                    return
                siblings = []
                for name, data in sorted(commit.files.items()):
                    entry: dict = {"rfilename": name, "size": len(data), "blobId": git_blob_sha(data)}
                    if name.endswith(LFS_SUFFIXES):
                        entry["lfs"] = {
                            "sha256": hashlib.sha256(data).hexdigest(),
                            "size": len(data),
                            "pointerSize": 134,
                        }
                    siblings.append(entry)
                info = {"id": repo_id, "sha": commit.sha, "private": False, "siblings": siblings}
                payload = json.dumps(info).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)

            def _resolve(
                self, repo_type: str, repo_id: str, rev: str, name: str, token: str | None, body: bool
            ) -> None:
                commit = self._access(repo_type, repo_id, rev, token)
                if commit is None:
                    return
                data = commit.files.get(name)
                if data is None:
                    return self._error(
                        404, "EntryNotFound", f"{name} not found", {"X-Repo-Commit": commit.sha}
                    )
                if name.endswith(LFS_SUFFIXES):
                    sha256 = hashlib.sha256(data).hexdigest()
                    self.send_response(302)
                    self.send_header("X-Repo-Commit", commit.sha)
                    self.send_header("X-Linked-Etag", f'"{sha256}"')
                    self.send_header("X-Linked-Size", str(len(data)))
                    self.send_header("ETag", f'"{git_blob_sha(data)}"')
                    self.send_header("Location", f"{hub.cdn_url}/lfs/{sha256}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self._send_bytes(
                    name, data, body, {"X-Repo-Commit": commit.sha, "ETag": f'"{git_blob_sha(data)}"'}
                )

            def _lfs(self, sha256: str, body: bool) -> None:
                found = hub._blob(sha256)
                if found is None:
                    return self._error(404, "EntryNotFound", "no such blob")
                self._send_bytes(*found, body, {"ETag": f'"{sha256}"'})

            def _send_bytes(self, name: str, data: bytes, body: bool, headers: dict[str, str]) -> None:
                start, status = 0, 200
                if body and (m := re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))):
                    start, status = int(m.group(1)), 206
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("Content-Length", str(len(data) - start))
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.end_headers()
                if not body:
                    return
                with hub._lock:
                    drop = hub._drops.pop(name, None)
                    stall = hub._stalls.pop(name, None)
                stop = drop if drop is not None else stall
                t0, sent = time.monotonic(), 0
                for offset in range(start, len(data), CHUNK):
                    piece = data[offset : offset + CHUNK]
                    if stop is not None and offset + len(piece) > stop:
                        piece = data[offset:stop]
                    if piece:
                        self.wfile.write(piece)
                        self.wfile.flush()
                        sent += len(piece)
                        with hub._lock:
                            hub.sent[name] = hub.sent.get(name, 0) + len(piece)
                    if stop is not None and offset + CHUNK > stop:
                        if stall is not None:
                            hub.stalled.set()
                            hub._release.wait()
                        self.close_connection = True
                        self.connection.shutdown(2)  # the client sees the body end early
                        return
                    if hub.rate:
                        ahead = sent / hub.rate - (time.monotonic() - t0)
                        if ahead > 0:
                            time.sleep(ahead)

        return Handler
