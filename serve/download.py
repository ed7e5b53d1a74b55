"""Fetch a model snapshot from the Hugging Face Hub into ``models/<name>/`` and prove it is complete.

huggingface_hub does the work: ``HfApi.model_info(files_metadata=True)`` for the file list, sizes and
sha256s; ``snapshot_download(local_dir=...)`` for resumable transfers into a plain folder (real files, no
symlinks into a cache); ``HfApi.verify_repo_checksums`` for the hashes. What is ours: the licence and
free-space checks before any byte moves, the error hints, and the completion protocol: a manifest
(``kit-download.json``) written atomically, then a marker (``kit-download.complete``, holding the
manifest's sha256) written atomically. A folder without a valid marker is never served.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from serve.atomic import write_text_atomic
from serve.config import DownloadSettings, ModelConfig

logger = logging.getLogger(__name__)

MANIFEST = "kit-download.json"
MARKER = "kit-download.complete"
_GIB = 1024**3


class DownloadError(Exception):
    """A download that cannot go on; ``str()`` says what happened and what to do.

    Attributes:
        exit_code: 1 for failures, 3 for a refused licence, 4 for too little disk space.
    """

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True)
class Target:
    """What to download and where."""

    repo_id: str
    revision: str | None
    """Commit sha; None resolves ``main`` (and the manifest records the sha it got)."""
    local_dir: Path
    allowed_licenses: list[str]
    config_name: str | None = None
    """The model config it came from, for hints (None for ``--repo`` downloads)."""

    @classmethod
    def from_model(cls, model: ModelConfig, root: Path) -> Target:
        """The target a model config describes (its ``local_dir`` resolved against ``root``)."""
        local = model.local_dir if model.local_dir.is_absolute() else root / model.local_dir
        return cls(
            model.repo_id, model.revision, local, model.allowed_licenses or [model.license], model.name
        )


@dataclass(frozen=True)
class RemoteFile:
    """One file of the snapshot as the hub describes it."""

    path: str
    size: int
    sha256: str | None
    """For LFS files (the weights); small files are checked by their git blob id instead."""


@dataclass
class Plan:
    """What a download would do, computed before any byte is fetched."""

    repo_id: str
    revision: str
    license: str | None
    local_dir: Path
    files: list[RemoteFile]
    missing_bytes: int
    """Bytes still to fetch (complete-looking local files and partial transfers count as present)."""
    free_bytes: int
    present: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def describe(self) -> str:
        """A human summary of the plan, one line per file."""
        lines = [
            f"{self.repo_id} @ {self.revision} (licence: {self.license or 'unknown'}) -> {self.local_dir}"
        ]
        for f in self.files:
            state = "present" if f.path in self.present else "to fetch"
            lines.append(f"  {_size(f.size):>12}  {f.path}  [{state}]")
        lines.append(
            f"total {_size(self.total_bytes)} in {len(self.files)} files; still to fetch "
            f"{_size(self.missing_bytes)}; free on disk {_size(self.free_bytes)}"
        )
        return "\n".join(lines)


def _size(n: float) -> str:
    """Bytes as a short human string (binary units, as ``du -h``)."""
    for unit, scale in (("GiB", _GIB), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def _endpoint() -> str:
    # Read at call time (huggingface_hub reads HF_ENDPOINT once, at import).
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def _hint_for(exc: BaseException, target: Target) -> DownloadError:
    """Map a huggingface_hub / network / OS failure to an actionable message."""
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    page = f"{_endpoint()}/{target.repo_id}"
    if isinstance(exc, GatedRepoError):
        return DownloadError(
            f"{target.repo_id} is gated: accept its terms at {page} with your account, then set HF_TOKEN to "
            "a read token of that account and run the download again."
        )
    if isinstance(exc, RevisionNotFoundError):
        return DownloadError(
            f"revision {target.revision} does not exist in {target.repo_id}: check `revision` in "
            f"{_config_path(target)} against {page}/commits/main."
        )
    if isinstance(exc, RepositoryNotFoundError):
        status = exc.response.status_code if exc.response is not None else None
        auth = " (the hub answered 401: if it is private, set HF_TOKEN to a token that can read it)"
        return DownloadError(
            f"repository {target.repo_id} not found on {_endpoint()}{auth if status == 401 else ''}: "
            f"check `repo_id` in {_config_path(target)}."
        )
    if isinstance(exc, EntryNotFoundError):
        return DownloadError(f"a file listed by the hub is missing from {target.repo_id}: {exc}")
    if isinstance(exc, HfHubHTTPError):
        status = exc.response.status_code if exc.response is not None else "?"
        if status == 401:
            return DownloadError(
                f"the hub refused the token (401): set HF_TOKEN to a valid read token ({page})."
            )
        return DownloadError(f"the hub answered {status} for {target.repo_id}: {str(exc).splitlines()[0]}")
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return DownloadError(
            f"the disk holding {target.local_dir} is full: free space and run the same command again; it "
            "resumes where it stopped.",
            exit_code=4,
        )
    if isinstance(exc, LocalEntryNotFoundError | OSError) or exc.__class__.__module__.startswith("httpx"):
        return DownloadError(
            f"cannot reach {_endpoint()} ({exc.__class__.__name__}): check the network or proxy "
            "(HTTPS_PROXY), then run the same command again (files already finished are kept). "
            "With a complete copy already on disk, HF_HUB_OFFLINE=1 skips the hub."
        )
    raise exc


def _config_path(target: Target) -> str:
    return f"configs/models/{target.config_name}.yaml" if target.config_name else "the REPO / REVISION given"


def _free_bytes(path: Path) -> int:
    probe = path
    while not probe.exists():
        probe = probe.parent
    return shutil.disk_usage(probe).free


def _partial_bytes(local_dir: Path, filename: str) -> int:
    """Bytes of an interrupted transfer of ``filename`` that huggingface_hub will resume from."""
    folder = local_dir / ".cache" / "huggingface" / "download" / Path(filename).parent
    stem = Path(filename).name
    return sum(p.stat().st_size for p in folder.glob(f"{stem}.*.incomplete")) if folder.is_dir() else 0


def make_plan(target: Target, settings: DownloadSettings, api: Any) -> Plan:
    """Ask the hub what the snapshot holds and work out what is still missing locally.

    Args:
        target: what and where.
        settings: allow patterns and margins from ``configs/download.yaml``.
        api: a ``huggingface_hub.HfApi``.

    Raises:
        DownloadError: hub errors (gated, 401, not found, unreachable) mapped to hints, or no file matches.
    """
    from huggingface_hub.utils import filter_repo_objects

    try:
        info = api.model_info(target.repo_id, revision=target.revision or "main", files_metadata=True)
    except Exception as exc:  # mapped to a hint, or re-raised when unknown
        raise _hint_for(exc, target) from None
    card = info.card_data.to_dict() if info.card_data is not None else {}
    license_id = card.get("license") or next(
        (t.split(":", 1)[1] for t in info.tags or [] if t.startswith("license:")), None
    )
    siblings = {s.rfilename: s for s in info.siblings or []}
    wanted = sorted(filter_repo_objects(list(siblings), allow_patterns=settings.allow_patterns))
    if not wanted:
        raise DownloadError(f"no file of {target.repo_id} matches allow_patterns in configs/download.yaml")
    files = []
    missing = 0
    present = []
    for name in wanted:
        sibling = siblings[name]
        if sibling.size is None:
            raise DownloadError(f"the hub gave no size for {name}; cannot plan the download")
        sha = sibling.lfs.sha256 if sibling.lfs is not None else None
        files.append(RemoteFile(name, sibling.size, sha))
        local = target.local_dir / name
        if local.is_file() and local.stat().st_size == sibling.size:
            present.append(name)
        else:
            missing += max(sibling.size - _partial_bytes(target.local_dir, name), 0)
    return Plan(
        target.repo_id,
        info.sha,
        license_id,
        target.local_dir,
        files,
        missing,
        _free_bytes(target.local_dir),
        present,
    )


def check_license(plan: Plan, target: Target, accept_license: bool) -> None:
    """Refuse a licence outside the allowlist unless the user accepted it explicitly.

    Raises:
        DownloadError: exit code 3, with where to read the licence and how to accept it.
    """
    allowed = {x.lower() for x in target.allowed_licenses}
    if plan.license is not None and plan.license.lower() in allowed:
        return
    if accept_license:
        logger.warning("licence %s of %s accepted by --accept-license", plan.license, plan.repo_id)
        return
    raise DownloadError(
        f"{plan.repo_id} is licensed {plan.license or '(no licence in its model card)'}, which is not on the "
        f"allowlist {sorted(allowed)} ({_config_path(target)}). Read it at {_endpoint()}/{plan.repo_id}; "
        "to download anyway, pass --accept-license (make download ACCEPT_LICENSE=1).",
        exit_code=3,
    )


def check_space(plan: Plan, settings: DownloadSettings) -> None:
    """Refuse before transfer when the disk cannot take what is missing plus the margin.

    Raises:
        DownloadError: exit code 4.
    """
    needed = plan.missing_bytes + settings.free_space_margin_bytes
    if plan.free_bytes < needed:
        raise DownloadError(
            f"not enough disk space for {plan.repo_id}: {_size(plan.missing_bytes)} still to fetch "
            f"plus a {_size(settings.free_space_margin_bytes)} margin, but only "
            f"{_size(plan.free_bytes)} free at {plan.local_dir}. Free space or point local_dir "
            "elsewhere; nothing was fetched.",
            exit_code=4,
        )


def _manifest_text(plan: Plan) -> str:
    return (
        json.dumps(
            {
                "repo_id": plan.repo_id,
                "revision": plan.revision,
                "license": plan.license,
                "files": [{"path": f.path, "size": f.size, "sha256": f.sha256} for f in plan.files],
                "completed_at": datetime.now(UTC).isoformat(timespec="seconds"),
            },
            indent=2,
        )
        + "\n"
    )


def completion_problem(local_dir: Path) -> str | None:
    """Why ``local_dir`` is not a complete, verified download (None when it is).

    Checks the marker against the manifest's sha256 and every listed file's size; hashes were checked
    when the marker was written (``--verify`` checks them again).
    """
    marker, manifest = local_dir / MARKER, local_dir / MANIFEST
    if not marker.is_file() or not manifest.is_file():
        return "it has no completion marker: the download did not finish or was not verified"
    text = manifest.read_text(encoding="utf-8")
    if marker.read_text(encoding="utf-8").strip() != hashlib.sha256(text.encode()).hexdigest():
        return "its completion marker does not match its manifest"
    try:
        files = json.loads(text)["files"]
    except (ValueError, KeyError):
        return "its manifest is unreadable"
    for entry in files:
        path = local_dir / entry["path"]
        if not path.is_file() or path.stat().st_size != entry["size"]:
            return f"{entry['path']} is missing or has the wrong size"
    return None


def _forget(local_dir: Path, names: list[str]) -> None:
    """Delete bad files and huggingface_hub's download metadata for them, so the next run fetches them."""
    for name in names:
        (local_dir / name).unlink(missing_ok=True)
        (local_dir / ".cache" / "huggingface" / "download" / f"{name}.metadata").unlink(missing_ok=True)


def verify(plan: Plan, api: Any, target: Target, *, unmark: bool = True) -> int:
    """Hash every planned file against the hub's sha256 / git blob id (``verify_repo_checksums``).

    ``unmark=False`` leaves the completion marker alone on failure (a config-only fetch does not speak
    for the weights).

    Returns:
        The number of files checked.

    Raises:
        DownloadError: naming each missing or corrupted file; those files are removed so that the same
            command fetches them again.
    """
    try:
        result = api.verify_repo_checksums(plan.repo_id, revision=plan.revision, local_dir=plan.local_dir)
    except Exception as exc:
        raise _hint_for(exc, target) from None
    wanted = {f.path for f in plan.files}
    bad = [m for m in result.mismatches if m["path"] in wanted]
    missing = [p for p in result.missing_paths if p in wanted]
    if bad or missing:
        if unmark:
            (plan.local_dir / MARKER).unlink(missing_ok=True)
        _forget(plan.local_dir, [m["path"] for m in bad])
        details = [
            f"  {m['path']}: {m['algorithm']} {m['actual'][:16]}… expected {m['expected'][:16]}…" for m in bad
        ]
        details += [f"  {p}: missing" for p in missing]
        raise DownloadError(
            f"verification failed for {len(bad) + len(missing)} file(s) of {plan.repo_id} "
            f"in {plan.local_dir}:\n"
            + "\n".join(details)
            + "\nThe bad files were removed; run the same command again to fetch them. The folder stays "
            "marked incomplete and will not be served."
        )
    return len(wanted)


def _is_weights(path: str) -> bool:
    return path.endswith(".safetensors") or path.endswith(".safetensors.index.json")


def _without_weights(plan: Plan) -> Plan:
    files = [f for f in plan.files if not _is_weights(f.path)]
    missing = sum(f.size for f in files if f.path not in plan.present)
    present = [p for p in plan.present if not _is_weights(p)]
    return Plan(
        plan.repo_id, plan.revision, plan.license, plan.local_dir, files, missing, plan.free_bytes, present
    )


def _fetch(plan: Plan, target: Target, token: str | None) -> None:
    """Transfer the plan's files into ``target.local_dir`` (huggingface_hub resumes and retries)."""
    from huggingface_hub import snapshot_download

    target.local_dir.mkdir(parents=True, exist_ok=True)
    try:
        snapshot_download(
            plan.repo_id,
            revision=plan.revision,
            local_dir=target.local_dir,
            allow_patterns=[f.path for f in plan.files],
            endpoint=_endpoint(),
            token=token,
        )
    except Exception as exc:
        raise _hint_for(exc, target) from None


def _fetch_config_only(plan: Plan, target: Target, token: str | None, echo: Callable[[str], None]) -> Outcome:
    """Fetch and verify the non-weight files of ``plan``; leave the completion marker as it is."""
    from huggingface_hub import HfApi

    start = time.monotonic()
    _fetch(plan, target, token)
    count = verify(plan, HfApi(endpoint=_endpoint(), token=token), target, unmark=False)
    complete = completion_problem(target.local_dir) is None
    echo(
        f"done: {count} config and tokenizer files of {plan.repo_id} @ {plan.revision[:12]} verified in "
        f"{target.local_dir} ({_size(plan.total_bytes)}). "
        + (
            "The weights are there too."
            if complete
            else "No weights yet: enough for `make validate-data`; the same command without "
            "CONFIG_ONLY fetches the rest."
        )
    )
    return Outcome(plan, plan.missing_bytes, time.monotonic() - start, already_complete=False)


@dataclass
class Outcome:
    """What a download run did."""

    plan: Plan
    fetched_bytes: int
    seconds: float
    already_complete: bool


def download(
    target: Target,
    settings: DownloadSettings,
    *,
    accept_license: bool = False,
    dry_run: bool = False,
    reverify: bool = False,
    config_only: bool = False,
    token: str | None = None,
    echo: Callable[[str], None] = print,
) -> Outcome | None:
    """Plan, check, fetch, verify and mark a snapshot complete.

    Args:
        target: what and where.
        settings: ``configs/download.yaml``.
        accept_license: accept a licence outside the allowlist.
        dry_run: print the plan and stop (returns None).
        reverify: on an already complete copy, hash every file again.
        config_only: fetch and verify only the small files (configs, tokenizer, chat template; a few
            MB), so that fine-tune data can be validated while the weights are not there yet. The
            folder is not marked complete; the same command without it fetches the rest.
        token: hub token; default ``HF_TOKEN`` / the saved login (huggingface_hub's own lookup).
        echo: where progress lines go.

    Returns:
        The outcome, or None for a dry run.

    Raises:
        DownloadError: every failure, with its hint and exit code.
    """
    if _offline():
        problem = completion_problem(target.local_dir)
        if problem:
            raise DownloadError(
                f"HF_HUB_OFFLINE is set and {target.local_dir} is not a complete copy ({problem}): unset "
                "HF_HUB_OFFLINE to download it."
            )
        echo(f"offline: {target.local_dir} is complete (manifest and sizes checked; nothing fetched)")
        return None

    from huggingface_hub import HfApi

    api = HfApi(endpoint=_endpoint(), token=token)
    plan = make_plan(target, settings, api)
    check_license(plan, target, accept_license)
    if config_only:
        plan = _without_weights(plan)
    if dry_run:
        echo(plan.describe())
        return None
    if config_only:
        return _fetch_config_only(plan, target, token, echo)
    manifest_path = target.local_dir / MANIFEST
    previous = json.loads(manifest_path.read_text()) if manifest_path.is_file() else None
    same_snapshot = (
        previous is not None
        and previous.get("revision") == plan.revision
        and previous.get("repo_id") == plan.repo_id
    )
    if same_snapshot and completion_problem(target.local_dir) is None and plan.missing_bytes == 0:
        if reverify:
            count = verify(plan, api, target)
            echo(
                f"{plan.repo_id} @ {plan.revision[:12]} is complete in {target.local_dir}: {count} files "
                "re-verified, nothing downloaded"
            )
        else:
            echo(
                f"{plan.repo_id} @ {plan.revision[:12]} is already complete in {target.local_dir}: nothing "
                "downloaded (--verify hashes it again)"
            )
        return Outcome(plan, 0, 0.0, already_complete=True)
    check_space(plan, settings)
    echo(plan.describe())
    target.local_dir.mkdir(parents=True, exist_ok=True)
    (target.local_dir / MARKER).unlink(missing_ok=True)  # incomplete until verified again
    start = time.monotonic()
    _fetch(plan, target, token)
    seconds = time.monotonic() - start
    count = verify(plan, api, target)
    text = _manifest_text(plan)
    write_text_atomic(manifest_path, text)
    write_text_atomic(target.local_dir / MARKER, hashlib.sha256(text.encode()).hexdigest() + "\n")
    rate = plan.missing_bytes / 1e6 / seconds if seconds > 0 else 0.0
    echo(
        f"done: {_size(plan.missing_bytes)} fetched in {seconds:.1f} s ({rate:.1f} MB/s); "
        f"{count} files verified; {_size(plan.total_bytes)} in {target.local_dir}"
    )
    if target.revision is None:
        echo(
            f"note: {_config_path(target)} pins no revision; this copy is commit {plan.revision}. "
            f"Pin it with `revision: {plan.revision}`."
        )
    return Outcome(plan, plan.missing_bytes, seconds, already_complete=False)
