"""The hub's refusals as one-line errors that say what to do.

The hub answers 401 for a repo that does not exist or is private (without a token), 403 for a gated
repo whose conditions the user has not accepted, 404 for an unknown revision or file; a network
that is down raises a connection error. Each becomes a UserError naming the repo and the fix.
"""

from __future__ import annotations

import errno
import os

from engine.errors import UserError

LOGIN = "log in with `hf auth login` (or set HF_TOKEN)"


def endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def page(repo: str, repo_type: str) -> str:
    return f"{endpoint()}/{'datasets/' if repo_type == 'dataset' else ''}{repo}"


def explain(
    exc: BaseException, repo: str, repo_type: str, revision: str | None, where: str
) -> UserError | None:
    """A UserError for an exception raised while talking to the hub; None if it is not one the
    user can fix (a bug: let it surface)."""
    import httpx
    from huggingface_hub import errors as hf

    what = "dataset" if repo_type == "dataset" else "model"
    if isinstance(exc, hf.GatedRepoError):
        return UserError(
            f"{where}: {repo} is gated and this account has not been granted access",
            f"accept its conditions on {page(repo, repo_type)}, then {LOGIN}",
        )
    if isinstance(exc, hf.RepositoryNotFoundError):
        return UserError(
            f"{where}: {what} {repo} not found on {endpoint()} (or it is private)",
            f"check the id; for a private or gated repo {LOGIN}",
        )
    if isinstance(exc, hf.RevisionNotFoundError):
        field = "model.revision" if repo_type == "model" else "data.revision"
        return UserError(
            f"{field}: {revision!r} is not a branch, tag or commit of {repo}",
            f"see the repo's history on {page(repo, repo_type)}",
        )
    if isinstance(exc, hf.RemoteEntryNotFoundError):
        return UserError(f"{where}: a file of {repo} is missing on the hub ({_first_line(exc)})")
    if isinstance(exc, hf.HfHubHTTPError) and exc.response is not None:
        status = exc.response.status_code
        if status == 401:
            return UserError(f"{where}: the hub refused the token for {repo} (401)", f"{LOGIN} again")
        if status == 403:
            return UserError(
                f"{where}: the hub refused access to {repo} (403)",
                f"accept its conditions on {page(repo, repo_type)}, or check the token's permissions",
            )
        if status == 429 or status >= 500:
            return UserError(f"{where}: the hub answered {status} for {repo}", "try again in a few minutes")
    if isinstance(exc, hf.OfflineModeIsEnabled):
        return UserError(
            f"{where}: {what} {repo} is not in the local cache, and HF_HUB_OFFLINE is set",
            "download it once with the network on (`qlc pull`), or name a local folder",
        )
    if isinstance(
        exc, (httpx.ConnectError, httpx.TimeoutException, httpx.RemoteProtocolError, httpx.ProxyError)
    ):
        return UserError(
            f"{where}: cannot reach the hub at {endpoint()} for {repo} ({exc.__class__.__name__}: {_first_line(exc)})",
            "check the network (proxy, HF_ENDPOINT); a partial download resumes when you start again",
        )
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return UserError(
            f"{where}: the disk holding the hub cache is full while downloading {repo}",
            "free space, or point HF_HOME (or HF_HUB_CACHE) at a larger disk; the download resumes",
        )
    return None


def unreachable(exc: BaseException) -> bool:
    """The hub could not be reached at all (no answer, as opposed to a refusal)."""
    import httpx

    return isinstance(exc, (httpx.ConnectError, httpx.TimeoutException, httpx.ProxyError))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else exc.__class__.__name__
