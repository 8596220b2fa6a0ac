"""A stand-in for the Hugging Face Hub on 127.0.0.1, for tests that publish without a network.

It serves just the REST routes that huggingface_hub 2.x uses to create a model repo, upload a folder to it and
download it back (`create_repo`, `upload_folder`, `repo_info`, `list_repo_tree`, `hf_hub_download`,
`snapshot_download`). Repos live in memory. Every file is uploaded as a regular git blob (base64 in the NDJSON
commit), so no LFS or Xet storage is involved, and only the latest snapshot of each repo is kept.

    with HubStandIn() as hub:
        # what HF_ENDPOINT sets when huggingface_hub is imported; downloads also need HUGGINGFACE_CO_URL_TEMPLATE
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", hub.endpoint)
        ...
        hub.repos["me/tiny"].files  # {path: bytes}
"""

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

__all__ = ["HubStandIn", "Repo", "Request", "git_blob_oid"]

REPO = r"(?P<repo>[^/]+/[^/]+)"
REVISION = r"(?P<revision>[^/]+)"  # the client quotes revisions with safe="", so "refs/pr/1" arrives as one segment
ROUTES = [
    ("POST", re.compile(r"/api/repos/create"), "create_repo"),
    ("POST", re.compile(r"/api/validate-yaml"), "validate_yaml"),
    ("POST", re.compile(rf"/api/models/{REPO}/preupload/{REVISION}"), "preupload"),
    ("POST", re.compile(rf"/api/models/{REPO}/commit/{REVISION}"), "commit"),
    ("GET", re.compile(rf"/api/models/{REPO}(?:/revision/{REVISION})?"), "model_info"),
    ("GET", re.compile(rf"/api/models/{REPO}/tree/{REVISION}(?:/(?P<path>.+))?"), "tree"),
    ("GET", re.compile(rf"/{REPO}/resolve/{REVISION}/(?P<path>.+)"), "resolve"),
    ("HEAD", re.compile(rf"/{REPO}/resolve/{REVISION}/(?P<path>.+)"), "resolve"),
]


def git_blob_oid(content: bytes) -> str:
    """The git object id of a blob: what the Hub reports as a regular file's oid and ETag."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


@dataclass
class Repo:
    private: bool
    files: dict[str, bytes] = field(default_factory=dict)
    commits: list[str] = field(default_factory=list)  # oids, oldest first; a new repo starts with one commit

    @property
    def head(self) -> str:
        return self.commits[-1]


@dataclass
class Request:
    method: str
    path: str  # without the query string
    route: str | None  # the name in ROUTES, None when nothing matched (answered 404)
    authorization: str | None
    body: bytes


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.headers = status, code, headers or {}


class HubStandIn:
    """An in-process Hub on an ephemeral port; use it as a context manager (the server runs in a daemon thread)."""

    def __init__(self):
        self.repos: dict[str, Repo] = {}
        self.requests: list[Request] = []
        self._lock = threading.Lock()  # the server answers each connection in its own thread
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        # A short poll interval because `shutdown` waits for it.
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.02,), name="hub-standin", daemon=True
        )

    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    # Routes. Each takes the query, the body, the bearer token and the groups of its pattern, and returns
    # (status, headers, JSON-able or bytes body).

    def create_repo(self, query, body, token):
        payload = json.loads(body)
        if payload.get("type", "model") != "model":
            raise HubError(400, "the stand-in only hosts model repos")
        repo_id = f"{payload['organization']}/{payload['name']}" if payload.get("organization") else payload["name"]
        url = f"{self.endpoint}/{repo_id}"
        if repo_id in self.repos:  # what the Hub answers; `exist_ok=True` turns it into a no-op
            return 409, {}, {"error": "You already created this model repo", "url": url}
        repo = Repo(private=payload.get("visibility") == "private")
        repo.commits.append(_commit_oid(repo_id, "initial commit", {}))
        self.repos[repo_id] = repo
        return 200, {}, {"url": url, "name": repo_id, "id": repo_id}

    def validate_yaml(self, query, body, token):
        return 200, {}, {"errors": [], "warnings": []}  # the metadata is not checked here

    def preupload(self, query, body, token, repo, revision):
        target = self._repo(repo, revision, token)
        stored = target.files
        files = [
            {
                "path": f["path"],
                "uploadMode": "regular",
                "shouldIgnore": False,
                # lets the client drop files that did not change, as it does against the real Hub
                "oid": git_blob_oid(stored[f["path"]]) if f["path"] in stored else None,
            }
            for f in json.loads(body)["files"]
        ]
        return 200, {}, {"files": files, "commitOid": target.head}

    def commit(self, query, body, token, repo, revision):
        target = self._repo(repo, revision, token)
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0]["key"] != "header":
            raise HubError(400, "the commit payload must start with a header line")
        files = dict(target.files)
        for line in lines[1:]:
            key, value = line["key"], line["value"]
            if key == "file" and value.get("encoding") == "base64":
                files[value["path"]] = base64.b64decode(value["content"], validate=True)
            elif key == "deletedFile":
                files.pop(value["path"], None)
            else:  # lfsFile etc.: preupload never asks for them
                raise HubError(400, f"the stand-in does not take {key!r} operations")
        target.files = files
        target.commits.append(_commit_oid(target.head, lines[0]["value"]["summary"], files))
        commit_url = f"{self.endpoint}/{repo}/commit/{target.head}"
        return 200, {}, {"success": True, "commitOid": target.head, "commitUrl": commit_url, "pullRequestUrl": None}

    def model_info(self, query, body, token, repo, revision=None):
        target = self._repo(repo, revision or "main", token)
        siblings = [{"rfilename": path} for path in sorted(target.files)]
        return 200, {}, {"id": repo, "sha": target.head, "private": target.private, "siblings": siblings}

    def tree(self, query, body, token, repo, revision, path=""):
        # The files under `path` at any depth, in one page (no Link header). Folder entries are left out: they only
        # matter for non-recursive listings of nested repos, and the exported folders are flat.
        target = self._repo(repo, revision, token)
        prefix = unquote(path).strip("/") + "/" if path else ""
        entries = [
            {"type": "file", "path": name, "size": len(content), "oid": git_blob_oid(content)}
            for name, content in sorted(target.files.items())
            if name.startswith(prefix)
        ]
        if prefix and not entries:
            raise HubError(404, f"{path} not found", "EntryNotFound", {"X-Repo-Commit": target.head})
        return 200, {}, entries

    def resolve(self, query, body, token, repo, revision, path):
        target = self._repo(repo, revision, token)
        path = unquote(path)
        if path not in target.files:
            raise HubError(404, f"{path} not found", "EntryNotFound", {"X-Repo-Commit": target.head})
        content = target.files[path]
        headers = {
            "ETag": f'"{git_blob_oid(content)}"',
            "X-Repo-Commit": target.head,
            "Content-Type": "application/octet-stream",
        }
        return 200, headers, content

    def _repo(self, repo_id: str, revision: str, token: str | None) -> Repo:
        repo = self.repos.get(repo_id)
        if repo is None or (repo.private and token is None):  # the Hub hides private repos from strangers
            raise HubError(404, f"Repository {repo_id} not found", "RepoNotFound")
        if unquote(revision) not in ("main", *repo.commits):
            raise HubError(404, f"Invalid rev id: {unquote(revision)}", "RevisionNotFound")
        return repo

    def _answer(self, method: str, target: str, authorization: str | None, body: bytes):
        url = urlsplit(target)
        name, groups = _route(method, url.path)
        with self._lock:
            self.requests.append(Request(method, url.path, name, authorization, body))
            if name is None:
                return 404, {"X-Error-Message": f"the stand-in has no route for {method} {url.path}"}, {}
            token = authorization.removeprefix("Bearer ") if authorization else None
            if method == "POST" and name != "validate_yaml" and token is None:
                return 401, {"X-Error-Message": "Invalid credentials in Authorization header"}, {}
            try:
                return getattr(self, name)(parse_qs(url.query), body, token, **groups)
            except HubError as error:
                headers = {"X-Error-Message": str(error), **error.headers}
                if error.code:
                    headers["X-Error-Code"] = error.code
                return error.status, headers, {"error": str(error)}


def _route(method: str, path: str) -> tuple[str | None, dict[str, str]]:
    for route_method, pattern, name in ROUTES:
        match = pattern.fullmatch(path)
        if route_method == method and match:
            return name, {key: value for key, value in match.groupdict().items() if value is not None}
    return None, {}


def _commit_oid(parent: str, summary: str, files: dict[str, bytes]) -> str:
    """A deterministic 40-hex commit id from the parent, the message and the tree."""
    tree = "".join(f"{path}\0{git_blob_oid(content)}\n" for path, content in sorted(files.items()))
    return hashlib.sha1(f"{parent}\n{summary}\n{tree}".encode()).hexdigest()


def _handler_for(hub: HubStandIn):
    class Handler(BaseHTTPRequestHandler):
        def _serve(self):
            if "chunked" in self.headers.get("Transfer-Encoding", ""):  # huggingface_hub always sends a length
                status, headers, payload = 411, {}, {"error": "the stand-in needs a Content-Length"}
            else:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                status, headers, payload = hub._answer(
                    self.command, self.path, self.headers.get("Authorization"), body
                )
            data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
            self.send_response(status)
            if not isinstance(payload, bytes):
                self.send_header("Content-Type", "application/json")
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        do_GET = do_HEAD = do_POST = _serve

        def log_message(self, format, *args):  # keep pytest output clean
            pass

    return Handler
