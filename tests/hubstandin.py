"""A local stand-in for the Hugging Face Hub: the few routes huggingface_hub uses to list and
download files (model info with sha256, resolve with ETag/commit headers and Range). The real Hub
cannot be reached from these machines; HF_ENDPOINT points huggingface_hub here instead."""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@dataclass
class Repo:
    files: dict[str, Path]  # repo file name -> local file with its bytes
    gated: bool = False
    listed_names: list[str] | None = None  # what model info claims (to serve a hostile listing)
    sha: dict[str, str] = field(default_factory=dict)


class HubStandIn:
    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.drop_after: dict[str, int] = {}  # file -> bytes to send before dropping the connection once
        self.pace: dict[str, float] = {}  # file -> seconds to wait before each MiB sent (a slow download)
        self.requests: list[str] = []
        self.ranges: list[str] = []  # the file paths read with a Range header (a GGUF header read remotely)
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                stand_in._handle(self, head=False)

            def do_HEAD(self) -> None:
                stand_in._handle(self, head=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def add(self, repo_id: str, files: dict[str, Path], gated: bool = False, listed_names: list[str] | None = None) -> None:
        repo = Repo(files, gated, listed_names)
        for name, path in files.items():
            repo.sha[name] = hashlib.sha256(path.read_bytes()).hexdigest()
        self.repos[repo_id] = repo

    def close(self) -> None:
        self.server.shutdown()

    def _error(self, h: BaseHTTPRequestHandler, status: int, code: str, head: bool) -> None:
        body = json.dumps({"error": code}).encode()
        h.send_response(status)
        h.send_header("X-Error-Code", code)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if not head:
            h.wfile.write(body)

    def _search(self, h: BaseHTTPRequestHandler, query: dict[str, list[str]]) -> None:
        """``GET /api/models?search=...``: repos whose id holds the text, most downloaded first."""
        text = query.get("search", [""])[0].lower()
        wanted = query.get("filter", [])
        hits = []
        for i, (repo_id, repo) in enumerate(sorted(self.repos.items())):
            tags = ["gguf"] if any(n.endswith(".gguf") for n in repo.files) else ["safetensors"]
            if text in repo_id.lower() and all(t in tags for t in wanted):
                hits.append({"id": repo_id, "modelId": repo_id, "downloads": 1000 * (i + 1), "likes": i, "tags": tags})
        hits.sort(key=lambda m: -m["downloads"])
        body = json.dumps(hits[: int(query.get("limit", ["1000"])[0])]).encode()
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    def _handle(self, h: BaseHTTPRequestHandler, head: bool) -> None:
        path, _, query = h.path.partition("?")
        self.requests.append(f"{h.command} {path}")
        if path == "/api/models":
            return self._search(h, parse_qs(query))
        info = re.match(r"^/api/models/([^/]+/[^/]+?)(?:/revision/([^/]+))?$", path)
        resolve = re.match(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$", path)
        repo_id = (info or resolve).group(1) if (info or resolve) else None
        repo = self.repos.get(repo_id) if repo_id else None
        if repo is None:
            return self._error(h, 404, "RepoNotFound", head)
        if repo.gated and "authorization" not in {k.lower() for k in h.headers}:
            return self._error(h, 401, "GatedRepo", head)
        if info:
            names = repo.listed_names or list(repo.files)
            siblings = []
            for name in names:
                local = repo.files.get(name)
                size = local.stat().st_size if local else 1000
                sha = repo.sha.get(name, "0" * 64)
                siblings.append({"rfilename": name, "size": size, "lfs": {"sha256": sha, "size": size, "pointerSize": 134}})
            body = json.dumps({"id": repo_id, "modelId": repo_id, "sha": COMMIT, "siblings": siblings, "private": False,
                               "gated": repo.gated, "tags": ["gguf"]}).encode()
            h.send_response(200)
            h.send_header("Content-Type", "application/json")
            h.send_header("Content-Length", str(len(body)))
            h.end_headers()
            if not head:
                h.wfile.write(body)
            return
        name = resolve.group(3)
        local = repo.files.get(name)
        if local is None:
            return self._error(h, 404, "EntryNotFound", head)
        data_size = local.stat().st_size
        start, end = 0, data_size - 1
        rng = h.headers.get("Range")
        if rng:
            self.ranges.append(path)
            m = re.match(r"bytes=(\d+)-(\d*)", rng)
            start, end = int(m.group(1)), int(m.group(2) or data_size - 1)
            end = min(end, data_size - 1)
        h.send_response(206 if rng else 200)
        h.send_header("X-Repo-Commit", COMMIT)
        h.send_header("ETag", f'"{repo.sha[name]}"')
        h.send_header("X-Linked-Etag", f'"{repo.sha[name]}"')
        h.send_header("X-Linked-Size", str(data_size))
        h.send_header("Content-Length", str(end - start + 1))
        h.send_header("Accept-Ranges", "bytes")
        if rng:
            h.send_header("Content-Range", f"bytes {start}-{end}/{data_size}")
        h.end_headers()
        if head:
            return
        drop = self.drop_after.pop(name, None)
        pace = self.pace.get(name, 0.0)
        with open(local, "rb") as fh:
            fh.seek(start)
            remaining = end - start + 1
            sent = 0
            while remaining:
                chunk = fh.read(min(1 << 20, remaining))
                time.sleep(pace)
                if drop is not None and sent + len(chunk) > drop:
                    h.wfile.write(chunk[: drop - sent])
                    h.wfile.flush()
                    h.close_connection = True
                    h.connection.shutdown(2)
                    return
                h.wfile.write(chunk)
                sent += len(chunk)
                remaining -= len(chunk)
