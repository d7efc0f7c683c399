"""A local Hugging Face hub mirror: a real HTTP server on 127.0.0.1 speaking the part of the hub
protocol that huggingface_hub uses for model_info, list_repo_tree and hf_hub_download.

Knobs let tests break things the way networks do: cut a transfer after N bytes, serve corrupt
bytes once, and count what was served so resumes can be checked.
"""

from __future__ import annotations

import hashlib
import json
import threading
import urllib.parse
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".model")


class Repo:
    def __init__(self, repo_id: str, directory: Path):
        self.id = repo_id
        self.files = {
            str(p.relative_to(directory)): p.read_bytes()
            for p in sorted(Path(directory).rglob("*")) if p.is_file() and ".cache" not in p.parts
        }
        self.sha = hashlib.sha1(json.dumps({k: hashlib.sha256(v).hexdigest() for k, v in self.files.items()}).encode()).hexdigest()

    def is_lfs(self, path: str) -> bool:
        return path.endswith(LFS_SUFFIXES)

    def entry(self, path: str) -> dict:
        data = self.files[path]
        git_oid = hashlib.sha1(f"blob {len(data)}\0".encode() + data).hexdigest()
        item = {"type": "file", "path": path, "size": len(data), "oid": git_oid}
        if self.is_lfs(path):
            item["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 130}
        return item


class HubMirror:
    def __init__(self):
        self.repos: dict[str, Repo] = {}
        self.served = Counter()  # path -> bytes sent
        self.cut_after: dict[str, int] = {}  # path -> close the connection after this many body bytes (once)
        self.corrupt_once: set[str] = set()
        self.gated: set[str] = set()
        self.throttle: dict[str, tuple[int, float]] = {}  # path -> (after this many bytes, sleep per 64 KiB chunk)
        self.ranges: list[tuple[str, str]] = []  # (path, Range header) of every ranged GET
        self.requests: list[str] = []
        self.broken: set[str] = set()  # files answered with a 500
        # a hostile hub: {"sha": reported commit id} | {"path": an extra tree entry} | {"lfs": sha256 of the weights}
        # | {"oid": blob id of config.json} | {"size": size of config.json}
        self.hostile: dict = {}
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def add(self, repo_id: str, directory: Path, repo_type: str = "model") -> Repo:
        """Serve ``directory`` as a model repo, or as a dataset repo (``repo_type="dataset"``)."""
        repo = Repo(repo_id, directory)
        self.repos[("datasets/" if repo_type == "dataset" else "") + repo_id] = repo
        return repo

    def __enter__(self) -> "HubMirror":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _handler(self):
        mirror = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _json(self, obj, status=200):
                body = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _error(self, status, message, code=None):
                body = json.dumps({"error": message}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                if code:
                    self.send_header("X-Error-Code", code)
                self.send_header("X-Error-Message", message)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _repo(self, repo_id):
                repo = mirror.repos.get(repo_id)
                if repo is None:
                    self._error(404, "Repository not found", "RepoNotFound")
                elif repo_id in mirror.gated:
                    self._error(403, "Access to this repo is restricted", "GatedRepo")
                    return None
                return repo

            def do_GET(self):
                self._serve(body=True)

            def do_HEAD(self):
                self._serve(body=False)

            def _serve(self, body):
                url = urllib.parse.urlparse(self.path)
                path = urllib.parse.unquote(url.path)
                mirror.requests.append(f"{self.command} {path}")
                parts = path.strip("/").split("/")
                kind = ""
                if parts[:2] == ["api", "datasets"]:
                    kind, parts = "datasets/", ["api", "models", *parts[2:]]
                elif parts[:1] == ["datasets"]:
                    kind, parts = "datasets/", parts[1:]
                if parts[:2] == ["api", "models"] and len(parts) >= 4:
                    repo = self._repo(kind + "/".join(parts[2:4]))
                    if repo is None:
                        return
                    rest = parts[4:]
                    if not rest or rest[0] == "revision":
                        if rest and rest[1] not in ("main", repo.sha):
                            return self._error(404, "Invalid rev id", "RevisionNotFound")
                        siblings = [{"rfilename": p} for p in repo.files]
                        sha = mirror.hostile.get("sha", repo.sha)
                        return self._json({"id": repo.id, "modelId": repo.id, "sha": sha, "siblings": siblings, "private": False})
                    if rest[0] == "tree":
                        prefix = "/".join(rest[2:])
                        items = [repo.entry(p) for p in repo.files if p.startswith(prefix)]
                        hostile = mirror.hostile
                        if "path" in hostile:
                            items.append({**repo.entry("config.json"), "path": hostile["path"]})
                        for item in items:
                            if item["path"] == "config.json":
                                item["oid"] = hostile.get("oid", item["oid"])
                                item["size"] = hostile.get("size", item["size"])
                            if "lfs" in item and "lfs" in hostile:
                                item["lfs"] = {**item["lfs"], "oid": hostile["lfs"]}
                        dirs = sorted({p.rsplit("/", 1)[0] for p in repo.files if "/" in p})
                        items += [{"type": "directory", "path": d, "oid": "0" * 40, "size": 0} for d in dirs]
                        return self._json(items)
                    return self._error(404, "Not found")
                if len(parts) >= 5 and parts[2] == "resolve":
                    repo = self._repo(kind + "/".join(parts[:2]))
                    if repo is None:
                        return
                    rev, fname = parts[3], "/".join(parts[4:])
                    if rev not in ("main", repo.sha):
                        return self._error(404, "Invalid rev id", "RevisionNotFound")
                    if fname not in repo.files:
                        return self._error(404, "Entry not found", "EntryNotFound")
                    if fname in mirror.broken:
                        return self._error(500, "Internal error")
                    data = repo.files[fname]
                    entry = repo.entry(fname)
                    etag = entry["lfs"]["oid"] if "lfs" in entry else entry["oid"]
                    start = 0
                    rng = self.headers.get("Range")
                    if rng and body:
                        mirror.ranges.append((fname, rng))
                    if rng and rng.startswith("bytes="):
                        start = int(rng[6:].split("-")[0] or 0)
                    payload = data[start:]
                    self.send_response(206 if start else 200)
                    self.send_header("Content-Type", "application/octet-stream")
                    self.send_header("X-Repo-Commit", repo.sha)
                    self.send_header("ETag", f'"{etag}"')
                    if "lfs" in entry:
                        self.send_header("X-Linked-Etag", f'"{etag}"')
                        self.send_header("X-Linked-Size", str(len(data)))
                    self.send_header("Accept-Ranges", "bytes")
                    if start:
                        self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                    self.send_header("Content-Length", str(len(payload)))
                    cut = mirror.cut_after.pop(fname, None) if body else None
                    if cut is not None:
                        self.send_header("Connection", "close")
                    self.end_headers()
                    if not body:
                        return
                    if fname in mirror.corrupt_once:
                        mirror.corrupt_once.discard(fname)
                        payload = bytes(b ^ 0xFF for b in payload[:64]) + payload[64:]
                    if cut is not None:
                        self.wfile.write(payload[:cut])
                        self.wfile.flush()
                        mirror.served[fname] += min(cut, len(payload))
                        self.close_connection = True
                        import socket
                        try:
                            self.connection.shutdown(socket.SHUT_RDWR)
                        except OSError:
                            pass
                        return
                    slow = mirror.throttle.get(fname)
                    if slow:
                        import time
                        after, delay = slow
                        for i in range(0, len(payload), 65536):
                            self.wfile.write(payload[i:i + 65536])
                            self.wfile.flush()
                            mirror.served[fname] += len(payload[i:i + 65536])
                            if i >= after:
                                time.sleep(delay)
                        return
                    self.wfile.write(payload)
                    mirror.served[fname] += len(payload)
                    return
                self._error(404, "Not found")

        return Handler
