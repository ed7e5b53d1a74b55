"""A local stand-in for the Hugging Face Hub: the endpoints huggingface_hub calls for one model repo.

Serves ``/api/models/{repo}/revision/{rev}`` (model info with file metadata), ``/api/models/{repo}/tree/
{rev}`` (file listing with sha256 / git blob ids) and ``/{repo}/resolve/{rev}/{file}`` (HEAD with
``X-Repo-Commit`` / ``X-Linked-Etag`` / ``X-Linked-Size``; GET with ``Range``), plus fault injection:
dropped connections, corrupted bytes, gated and token-protected repos, any licence.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

COMMIT = "3f1c0de5a1b2c3d4e5f60718293a4b5c6d7e8f90"


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class FakeRepo:
    repo_id: str
    files: dict[str, bytes]
    license: str | None = "apache-2.0"
    lfs_suffixes: tuple[str, ...] = (".safetensors",)
    # Faults, switchable while the server runs.
    abort_at: dict[str, int] = field(default_factory=dict)
    """file -> byte offset where a GET drops the connection."""
    abort_times: int = 10**9
    """How many GETs ``abort_at`` breaks before serving normally again."""
    corrupt: set[str] = field(default_factory=set)
    gated: bool = False
    token: str | None = None
    """When set, requests without ``Authorization: Bearer <token>`` get 401."""
    log: list[tuple[str, str, str | None]] = field(default_factory=list)
    """(method, path, Range header) of every file request."""

    def is_lfs(self, name: str) -> bool:
        return name.endswith(self.lfs_suffixes)

    def payload(self, name: str) -> bytes:
        data = self.files[name]
        if name in self.corrupt:
            return bytes([data[0] ^ 0xFF]) + data[1:]
        return data

    def sibling(self, name: str) -> dict:
        data = self.files[name]
        entry: dict = {"rfilename": name, "size": len(data), "blobId": git_blob_sha1(data)}
        if self.is_lfs(name):
            entry["lfs"] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
        return entry

    def tree_entry(self, name: str) -> dict:
        data = self.files[name]
        entry: dict = {"type": "file", "path": name, "size": len(data), "oid": git_blob_sha1(data)}
        if self.is_lfs(name):
            entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
        return entry


def _error(status: int, code: str | None, message: str) -> web.Response:
    headers = {"X-Error-Code": code} if code else {}
    return web.json_response({"error": message}, status=status, headers=headers)


def make_app(repo: FakeRepo) -> web.Application:
    def check(request: web.Request, repo_id: str, revision: str) -> web.Response | None:
        if repo_id != repo.repo_id:
            return _error(404, "RepoNotFound", "Repository not found")
        if repo.gated:
            return _error(401, "GatedRepo", "Access to model is restricted. You must have access to it.")
        if repo.token and request.headers.get("Authorization") != f"Bearer {repo.token}":
            return _error(401, None, "Invalid credentials in Authorization header")
        if revision not in (COMMIT, "main"):
            return _error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return None

    async def model_info(request: web.Request) -> web.Response:
        repo_id = f"{request.match_info['ns']}/{request.match_info['name']}"
        if (failure := check(request, repo_id, request.match_info["rev"])) is not None:
            return failure
        card = {"license": repo.license} if repo.license else {}
        return web.json_response(
            {
                "id": repo.repo_id,
                "modelId": repo.repo_id,
                "sha": COMMIT,
                "private": False,
                "gated": False,
                "tags": [f"license:{repo.license}"] if repo.license else [],
                "cardData": card,
                "siblings": [repo.sibling(n) for n in sorted(repo.files)],
            }
        )

    async def tree(request: web.Request) -> web.Response:
        repo_id = f"{request.match_info['ns']}/{request.match_info['name']}"
        if (failure := check(request, repo_id, request.match_info["rev"])) is not None:
            return failure
        return web.json_response([repo.tree_entry(n) for n in sorted(repo.files)])

    async def resolve(request: web.Request) -> web.StreamResponse:
        repo_id = f"{request.match_info['ns']}/{request.match_info['name']}"
        name = request.match_info["file"]
        repo.log.append((request.method, name, request.headers.get("Range")))
        if (failure := check(request, repo_id, request.match_info["rev"])) is not None:
            return failure
        if name not in repo.files:
            return _error(404, "EntryNotFound", f"{name} does not exist")
        meta = repo.sibling(name)
        etag = meta["lfs"]["sha256"] if "lfs" in meta else meta["blobId"]
        data = repo.payload(name)
        headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{etag}"', "Accept-Ranges": "bytes"}
        if "lfs" in meta:
            headers |= {"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": str(len(data))}
        if request.method == "HEAD":
            return web.Response(status=200, headers=headers | {"Content-Length": str(len(data))})
        start = 0
        if (spec := request.headers.get("Range")) and spec.startswith("bytes="):
            start = int(spec[6:].split("-")[0])
        body = data[start:]
        response = web.StreamResponse(status=206 if start else 200, headers=headers)
        response.content_length = len(body)
        if start:
            response.headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        await response.prepare(request)
        cut = repo.abort_at.get(name)
        if cut is not None and start <= cut < len(data) and repo.abort_times > 0:
            repo.abort_times -= 1
            await response.write(data[start:cut])
            assert request.transport is not None
            request.transport.abort()
            return response
        await response.write(body)
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_get("/api/models/{ns}/{name}/revision/{rev}", model_info)
    app.router.add_get("/api/models/{ns}/{name}/tree/{rev}", tree)
    app.router.add_route("*", "/{ns}/{name}/resolve/{rev}/{file:.+}", resolve)
    return app


def tiny_repo(model_dir: Path, repo_id: str = "kit/qwen3_5-tiny") -> FakeRepo:
    """A repo holding the tiny qwen3_5 checkpoint plus files that downloads must leave out."""
    files = {
        p.name: p.read_bytes() for p in model_dir.iterdir() if p.is_file() and p.name != "kit-build.json"
    }
    files["README.md"] = b"---\nlicense: apache-2.0\n---\n# tiny\n"
    files["original/consolidated.pth"] = b"\0" * 4096
    return FakeRepo(repo_id, files)
