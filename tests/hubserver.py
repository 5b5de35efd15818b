"""A local HTTP server speaking the part of the Hugging Face Hub protocol huggingface_hub downloads with.

The client under test is the real huggingface_hub (``hf_hub_download``, ``HfApi.dataset_info``) pointed at
this endpoint; only the far side of the wire is local. Served:

* ``GET /api/datasets/{repo}/revision/{rev}[?blobs=True]``: ``{"id", "sha", "siblings": [{rfilename, size,
  blobId, lfs: {sha256, size, pointerSize}}]}`` (every ``.bin``/``.idx`` is an LFS file, as on the Hub);
* ``HEAD``/``GET /datasets/{repo}/resolve/{rev}/{file}``: ``X-Repo-Commit``, ``ETag`` (the LFS sha256, or the
  git blob sha1), ``Content-Length`` and the bytes;
* unknown repo / revision / file: 404 with ``X-Error-Code`` ``RepoNotFound`` / ``RevisionNotFound`` /
  ``EntryNotFound``, as the Hub answers.

``served`` counts the body bytes sent per file; ``tamper`` replaces a file's bytes on the wire (the listing
keeps the true sha256), to exercise a corrupted download.
"""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit


def _git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()  # noqa: S324 - git's object id


class LocalHub:
    def __init__(self):
        self.repos: dict[str, dict] = {}  # repo -> {"refs": {branch: commit}, "commits": {commit: {file: bytes}}}
        self.served: dict[str, int] = {}
        self.tamper: dict[str, bytes] = {}
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def add(self, repo_id: str, commit: str, files: dict[str, bytes], branch: str | None = "main") -> None:
        repo = self.repos.setdefault(repo_id, {"refs": {}, "commits": {}})
        repo["commits"][commit] = dict(files)
        if branch:
            repo["refs"][branch] = commit

    def start(self) -> LocalHub:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    # -- lookups ---------------------------------------------------------------------------------
    def resolve(self, repo_id: str, rev: str) -> tuple[str | None, dict | None, str | None]:
        repo = self.repos.get(repo_id)
        if repo is None:
            return None, None, "RepoNotFound"
        commit = repo["refs"].get(rev, rev)
        files = repo["commits"].get(commit)
        if files is None:
            return None, None, "RevisionNotFound"
        return commit, files, None


def _is_lfs(name: str) -> bool:
    return name.endswith((".bin", ".idx"))


def _handler(hub: LocalHub):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # quiet
            pass

        def _error(self, code: int, error_code: str) -> None:
            body = json.dumps({"error": error_code}).encode()
            self.send_response(code)
            self.send_header("X-Error-Code", error_code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _route(self):
            parts = [unquote(p) for p in urlsplit(self.path).path.split("/")]
            # /api/datasets/org/name/revision/rev
            if len(parts) >= 7 and parts[1:3] == ["api", "datasets"] and parts[5] == "revision":
                return "info", f"{parts[3]}/{parts[4]}", "/".join(parts[6:]), None
            # /datasets/org/name/resolve/rev/file...
            if len(parts) >= 7 and parts[1] == "datasets" and parts[4] == "resolve":
                return "file", f"{parts[2]}/{parts[3]}", parts[5], "/".join(parts[6:])
            return None, None, None, None

        def do_GET(self):  # noqa: N802
            self._serve(body=True)

        def do_HEAD(self):  # noqa: N802
            self._serve(body=False)

        def _serve(self, body: bool) -> None:
            kind, repo_id, rev, filename = self._route()
            if kind is None:
                return self._error(404, "RepoNotFound")
            commit, files, err = hub.resolve(repo_id, rev)
            if err:
                return self._error(404, err)
            if kind == "info":
                siblings = []
                for name, data in sorted(files.items()):
                    entry = {"rfilename": name, "size": len(data), "blobId": _git_sha1(data)}
                    if _is_lfs(name):
                        entry["lfs"] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data),
                                        "pointerSize": 134}
                    siblings.append(entry)
                payload = json.dumps({"id": repo_id, "sha": commit, "siblings": siblings}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if body:
                    self.wfile.write(payload)
                return None
            if filename not in files:
                return self._error(404, "EntryNotFound")
            data = files[filename]
            etag = hashlib.sha256(data).hexdigest() if _is_lfs(filename) else _git_sha1(data)
            wire = hub.tamper.get(filename, data)
            self.send_response(200)
            self.send_header("X-Repo-Commit", commit)
            self.send_header("ETag", f'"{etag}"')
            self.send_header("Content-Length", str(len(wire)))
            self.send_header("Accept-Ranges", "none")
            self.end_headers()
            if body:
                try:
                    for a in range(0, len(wire), 1 << 16):
                        self.wfile.write(wire[a:a + (1 << 16)])
                        hub.served[filename] = hub.served.get(filename, 0) + len(wire[a:a + (1 << 16)])
                except (BrokenPipeError, ConnectionResetError):
                    pass
            return None

    return Handler
