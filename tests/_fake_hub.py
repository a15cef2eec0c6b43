"""A Hugging Face Hub on 127.0.0.1 serving model repositories from local directories, so huggingface_hub's
own download code (snapshot_download, hf_hub_download) fills a cache in a test, with no network.

It answers the four requests huggingface_hub 2.x makes for a model snapshot: the repository's info
(`/api/models/ORG/NAME/revision/REV`: its commit), its file tree (`/api/models/ORG/NAME/tree/COMMIT`),
and HEAD / GET of each file (`/ORG/NAME/resolve/REV/FILE`, with the X-Repo-Commit and ETag headers the
cache is keyed by). An unknown repository is a 404 with the hub's RepoNotFound code. `requests` records
every (method, path) served.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import threading
from pathlib import Path
from urllib.parse import unquote, urlsplit

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FakeHub:
    def __init__(self, repos: dict[str, Path]):
        """repos: repository id ('org/name') -> directory whose files the repository holds."""
        self.files = {repo: {f.name: f.read_bytes() for f in sorted(Path(d).iterdir()) if f.is_file()}
                      for repo, d in repos.items()}
        self.requests: list[tuple[str, str]] = []
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep the test output clean
                pass

            def do_HEAD(self):
                hub._serve(self, body=False)

            def do_GET(self):
                hub._serve(self, body=True)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "FakeHub":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _serve(self, handler, body: bool) -> None:
        path = unquote(urlsplit(handler.path).path)
        self.requests.append((handler.command, path))
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "models"] and len(parts) >= 6:
            repo, kind = "/".join(parts[2:4]), parts[4]
            files = self.files.get(repo)
            if files is None:
                return self._reply(handler, 404, b"", {"X-Error-Code": "RepoNotFound"}, body)
            if kind == "tree":
                data = [{"type": "file", "path": name, "size": len(blob), "oid": hashlib.sha1(blob).hexdigest()}
                        for name, blob in files.items()]
            else:
                data = {"id": repo, "sha": COMMIT, "siblings": [{"rfilename": name} for name in files]}
            return self._reply(handler, 200, json.dumps(data).encode(), {"Content-Type": "application/json"}, body)
        if len(parts) >= 5 and parts[2] == "resolve":
            blob = self.files.get("/".join(parts[:2]), {}).get("/".join(parts[4:]))
            if blob is not None:
                return self._reply(handler, 200, blob, {"X-Repo-Commit": COMMIT,
                                                        "ETag": f'"{hashlib.sha256(blob).hexdigest()}"'}, body)
        self._reply(handler, 404, b"", {"X-Error-Code": "EntryNotFound"}, body)

    @staticmethod
    def _reply(handler, status: int, payload: bytes, headers: dict, body: bool) -> None:
        handler.send_response(status)
        for k, v in {**headers, "Content-Length": str(len(payload))}.items():
            handler.send_header(k, v)
        handler.end_headers()
        if body:
            handler.wfile.write(payload)
