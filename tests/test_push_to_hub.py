"""push_folder_to_hub against a local stand-in for the Hub (tests/hub_standin.py): no network is used."""

import ipaddress
import json
import re
import socket
from pathlib import Path

import huggingface_hub
import pytest
import torch
from conftest import tiny_processor, tiny_setokim
from hub_standin import HubStandIn
from huggingface_hub import constants
from transformers import AutoModelForImageTextToText, AutoProcessor
from transformers.utils import hub as transformers_hub

from transformers_setok.hub import export_setokim, push_folder_to_hub

TOKEN = "hf_standin_token"


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    processor = tiny_processor()
    model = tiny_setokim(processor)
    return export_setokim(model, processor, tmp_path_factory.mktemp("export"), name="tiny", repo="me/tiny")


def folder_files(folder: Path) -> dict[str, bytes]:
    return {path.relative_to(folder).as_posix(): path.read_bytes() for path in folder.rglob("*") if path.is_file()}


@pytest.fixture
def loopback_only(monkeypatch):
    """Any connection that is not to this machine fails loudly, so that a mistake cannot reach the real Hub."""
    connect = socket.socket.connect

    def is_loopback(host: str) -> bool:
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return host == "localhost"

    def guarded(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6) and not is_loopback(address[0]):
            raise OSError(f"test tried to reach {address}")
        return connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)


@pytest.fixture
def hub(monkeypatch, loopback_only):
    """The stand-in, with huggingface_hub pointed at it as `HF_ENDPOINT` would at import time, and online."""
    with HubStandIn() as standin:
        monkeypatch.setattr(constants, "ENDPOINT", standin.endpoint)
        monkeypatch.setattr(
            constants, "HUGGINGFACE_CO_URL_TEMPLATE", standin.endpoint + "/{repo_id}/resolve/{revision}/{filename}"
        )
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        # Otherwise the first request of the process also asks {ENDPOINT}/api/agent-harnesses (for the user agent).
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
        # transformers keeps one HfApi, whose endpoint was fixed when it was made: have it make a new one.
        monkeypatch.setattr(transformers_hub, "_hf_api", None)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
        yield standin


# With hf_xet installed, upload_folder streams through a pipelined uploader; without it, one create_commit.
@pytest.mark.parametrize("xet", [True, False], ids=["pipelined-upload", "single-commit"])
@pytest.mark.parametrize("private", [True, False], ids=["private", "public"])
def test_push_uploads_the_folder_as_is(hub, exported, monkeypatch, private, xet):
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", not xet)
    url = push_folder_to_hub(exported, "me/tiny", private=private, token=TOKEN)

    created = [json.loads(r.body) for r in hub.requests if r.route == "create_repo"]
    assert created == [{"name": "tiny", "organization": "me", "visibility": "private" if private else "public"}]
    repo = hub.repos["me/tiny"]
    assert repo.private is private
    assert repo.files == folder_files(exported)
    assert {"config.json", "model.safetensors", "README.md", "modeling_setokim.py", "compat_setokim.py"} <= set(
        repo.files
    )
    assert len(repo.commits) == 2  # the repo's initial commit and the upload
    assert url == f"{hub.endpoint}/me/tiny/commit/{repo.head}"
    assert {r.route for r in hub.requests} <= {"create_repo", "validate_yaml", "preupload", "commit"}
    assert {r.authorization for r in hub.requests} == {f"Bearer {TOKEN}"}


def test_pushed_repo_downloads_back_byte_for_byte(hub, exported, tmp_path):
    url = push_folder_to_hub(exported, "me/tiny", token=TOKEN)
    snapshot = huggingface_hub.snapshot_download("me/tiny", cache_dir=tmp_path / "cache", token=TOKEN)
    assert folder_files(Path(snapshot)) == folder_files(exported)
    assert Path(snapshot).name == url.rsplit("/", 1)[1]  # the snapshot is the pushed commit
    assert None not in {r.route for r in hub.requests}  # every request was one the stand-in knows


def test_private_repo_loads_by_its_id_with_the_token(hub, exported, tmp_path):
    push_folder_to_hub(exported, "me/tiny", private=True, token=TOKEN)
    model = AutoModelForImageTextToText.from_pretrained("me/tiny", cache_dir=tmp_path / "cache", token=TOKEN)
    processor = AutoProcessor.from_pretrained("me/tiny", cache_dir=tmp_path / "cache", token=TOKEN)
    expected = AutoModelForImageTextToText.from_pretrained(exported).state_dict()
    assert model.state_dict().keys() == expected.keys()
    assert all(torch.equal(tensor, expected[name]) for name, tensor in model.state_dict().items())
    assert processor.tokenizer.get_vocab() == AutoProcessor.from_pretrained(exported).tokenizer.get_vocab()
    assert "resolve" in {r.route for r in hub.requests} and None not in {r.route for r in hub.requests}


def test_pushing_an_unchanged_folder_again_makes_no_commit(hub, exported):
    first = push_folder_to_hub(exported, "me/tiny", token=TOKEN)
    second = push_folder_to_hub(exported, "me/tiny", token=TOKEN)  # the repo exists by now: not an error
    assert second == first
    assert len(hub.repos["me/tiny"].commits) == 2


@pytest.mark.parametrize(
    "make, problem",
    [(lambda p: p / "missing", "is not a folder"), (lambda p: p, "has no config.json")],
    ids=["missing", "no-config"],
)
def test_a_folder_that_is_not_an_export_is_refused_before_the_hub_is_asked(hub, tmp_path, make, problem):
    (tmp_path / "README.md").write_text("not a model")
    folder = make(tmp_path)
    with pytest.raises(
        FileNotFoundError, match=re.escape(f"`folder` '{folder}' {problem}; expected a folder written by")
    ):
        push_folder_to_hub(folder, "me/tiny", token=TOKEN)
    assert hub.requests == [] and hub.repos == {}
