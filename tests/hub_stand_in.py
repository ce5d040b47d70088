"""A local stand-in for the parts of the Hugging Face Hub HTTP API that pushing and loading a model use.

Point huggingface_hub at it with HF_ENDPOINT=http://127.0.0.1:PORT (before importing it). Repositories live in
memory: {repo_id: {path: bytes}} (Spaces under "spaces/<repo_id>"); every commit replaces the files it names. With
`token` set, every request must carry `Authorization: Bearer <token>` (else 401, as the Hub answers a wrong token);
the tokens seen are recorded.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class HubState:
    def __init__(self, token: str | None = None):
        self.token = token
        self.tokens_seen: list[str] = []
        self.repos: dict[str, dict[str, bytes]] = {}
        self.commits: dict[str, str] = {}
        self.created: list[dict] = []
        self.gated: set[str] = set()  # repositories that answer 403 GatedRepo, as the Hub does without access


def _commit_id(files: dict[str, bytes]) -> str:
    digest = hashlib.sha1()
    for path in sorted(files):
        digest.update(path.encode() + hashlib.sha1(files[path]).digest())
    return digest.hexdigest()


def make_handler(state: HubState):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # keep test output quiet
            pass

        def _json(self, payload, status=200):
            body = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _body(self) -> bytes:
            return self.rfile.read(int(self.headers.get("Content-Length", 0)))

        def _unauthorized(self) -> bool:
            """Record the request's token; answer 401 (and True) when the server wants another one."""
            auth = self.headers.get("Authorization", "")
            token = auth[len("Bearer "):] if auth.startswith("Bearer ") else None
            if token:
                state.tokens_seen.append(token)
            if state.token is None or token == state.token:
                return False
            self._body()
            body = b'{"error": "Invalid credentials in Authorization header"}'
            self.send_response(401)
            self.send_header("Content-Type", "application/json")
            self.send_header("X-Error-Message", "Invalid credentials in Authorization header")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return True

        def do_POST(self):
            if self._unauthorized():
                return
            path = self.path.split("?")[0]
            if path == "/api/repos/create":
                info = json.loads(self._body())
                repo_id = f"{info['organization']}/{info['name']}" if info.get("organization") else info["name"]
                repo_id = f"spaces/{repo_id}" if info.get("type") == "space" else repo_id
                state.created.append(info)
                state.repos.setdefault(repo_id, {})
                return self._json({"url": f"http://{self.headers['Host']}/{repo_id}", "name": repo_id})
            if path == "/api/validate-yaml":
                self._body()
                return self._json({})
            match = re.match(r"^/api/(models|spaces)/(.+)/(preupload|commit)/([^/]+)$", path)
            repo_id = (match.group(2) if match.group(1) == "models" else f"spaces/{match.group(2)}") if match else None
            if repo_id not in state.repos:
                self._body()
                return self._json({"error": "Repository not found"}, 404)
            action = match.group(3)
            if action == "preupload":
                files = json.loads(self._body())["files"]
                return self._json({"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                             for f in files]})
            for line in self._body().splitlines():
                item = json.loads(line)
                if item["key"] == "file":
                    state.repos[repo_id][item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                elif item["key"] == "deletedFile":
                    state.repos[repo_id].pop(item["value"]["path"], None)
            sha = _commit_id(state.repos[repo_id])
            state.commits[repo_id] = sha
            base = f"http://{self.headers['Host']}/{repo_id}"
            return self._json({"commitUrl": f"{base}/commit/{sha}", "commitOid": sha, "success": True})

        def _model_info(self, repo_id: str):
            files = state.repos[repo_id]
            return self._json({
                "id": repo_id, "modelId": repo_id, "sha": state.commits.get(repo_id, "0" * 40), "private": False,
                "siblings": [{"rfilename": p, "size": len(b)} for p, b in sorted(files.items())],
                "tags": [], "downloads": 0, "likes": 0,
            })

        def _resolve(self, head: bool):
            match = re.match(r"^/(.+?/[^/]+)/resolve/([^/]+)/(.+)$", self.path.split("?")[0])
            repo_id, path = (match.group(1), match.group(3)) if match else (None, None)
            content = state.repos.get(repo_id, {}).get(path)
            if content is None:
                self.send_response(404)
                self.send_header("X-Error-Code", "EntryNotFound" if repo_id in state.repos else "RepoNotFound")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("X-Repo-Commit", state.commits.get(repo_id, "0" * 40))
            self.send_header("ETag", f'"{hashlib.sha1(content).hexdigest()}"')
            self.send_header("Content-Length", str(len(content)))
            self.end_headers()
            if not head:
                self.wfile.write(content)

        def _refused_as_gated(self) -> bool:
            match = re.match(r"^/(?:api/models/)?(.+?/[^/]+?)(?:/(?:resolve|revision|tree)/.*)?$", self.path.split("?")[0])
            if not match or match.group(1) not in state.gated:
                return False
            message = f"Access to model {match.group(1)} is restricted. You must have access to it and be authenticated."
            self.send_response(403)
            self.send_header("X-Error-Code", "GatedRepo")
            self.send_header("X-Error-Message", message)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return True

        def do_HEAD(self):
            if not self._unauthorized() and not self._refused_as_gated():
                self._resolve(head=True)

        def _tree(self, repo_id: str):
            files = state.repos[repo_id]
            return self._json([{"type": "file", "path": p, "size": len(b), "oid": hashlib.sha1(b).hexdigest()}
                               for p, b in sorted(files.items())])

        def do_GET(self):
            if self._unauthorized() or self._refused_as_gated():
                return
            path = self.path.split("?")[0]
            tree = re.match(r"^/api/models/(.+?/[^/]+)/tree/[^/]+/?$", path)
            if tree and tree.group(1) in state.repos:
                return self._tree(tree.group(1))
            match = re.match(r"^/api/models/(.+?/[^/]+)(?:/revision/[^/]+)?$", path)
            if match:
                if match.group(1) not in state.repos:
                    return self._json({"error": "Repository not found"}, 404)
                return self._model_info(match.group(1))
            self._resolve(head=False)

    return Handler


class HubStandIn:
    """Context manager: a threaded server on 127.0.0.1 with a free port; `.url` and `.state`."""

    def __init__(self, token: str | None = None):
        self.token = token

    def __enter__(self):
        self.state = HubState(self.token)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(self.state))
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
