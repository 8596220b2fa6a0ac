"""Bad input to the `setok` command line: one line naming the file or argument at fault, a non-zero exit, no
traceback (unless `--debug`). A new user error gets a row in BAD_INPUTS."""

import inspect
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
from conftest import tiny_config

from transformers_setok import SetokImageProcessor, SetokModel, cli
from transformers_setok._checks import is_hub_id
from transformers_setok.cli import main
from transformers_setok.loading import check_model_path, load_pretrained


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A saved tiny SeTok, broken copies of it, good and bad images and folders, in one folder (the module's cwd)."""
    root = tmp_path_factory.mktemp("cli-errors")
    model = root / "model"
    SetokModel(tiny_config()).save_pretrained(model)
    SetokImageProcessor(size=32).save_pretrained(model)
    files = {path.name: path.read_bytes() for path in model.iterdir()}

    def broken_copy(name, drop=(), **replace):
        folder = root / name
        folder.mkdir()
        for file, data in files.items():
            if file not in drop:
                (folder / file).write_bytes(replace.get(file.replace(".", "_"), data))

    broken_copy("no-config", drop=("config.json",))
    broken_copy("no-weights", drop=("model.safetensors",))
    broken_copy("no-processor", drop=("preprocessor_config.json",))
    broken_copy("truncated-weights", model_safetensors=files["model.safetensors"][:-1000])
    broken_copy("bad-config", config_json=b'{"model_type": "setok",')

    image = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8))
    image.save(root / "good.png")
    image.save(root / "full.jpg")
    (root / "truncated.jpg").write_bytes((root / "full.jpg").read_bytes()[:400])
    (root / "notes.png").write_text("hello")
    (root / "a-file").write_text("not a folder")
    (root / "empty").mkdir()
    (root / "nested" / "deeper").mkdir(parents=True)
    image.save(root / "nested" / "deeper" / "inside.png")
    (root / "bad.yaml").write_text("stage: [tokenizer\n")
    return root


@pytest.fixture
def in_workspace(workspace, monkeypatch):
    monkeypatch.chdir(workspace)
    return workspace


def tokenize(*args, model="model"):
    return ["tokenize", *args, "--model", model]


# argv (relative to the workspace) -> what the one-line message must match.
BAD_INPUTS = {
    "missing image": (tokenize("nope.png"), r"^setok tokenize: Image file\(s\) not found: nope\.png$"),
    "truncated image": (
        tokenize("good.png", "truncated.jpg"),
        r"Cannot read truncated\.jpg as an image: .*[Tt]runcated.*--skip-bad",
    ),
    "not an image": (tokenize("notes.png"), r"Cannot read notes\.png as an image: cannot identify image file"),
    "every image bad, skipped": (
        tokenize("truncated.jpg", "notes.png", "--skip-bad"),
        r"All 2 of 2 images: truncated\.jpg \(.*[Tt]runcated.*\), notes\.png \(cannot identify .* are unreadable",
    ),
    "folder without images": (tokenize("empty"), r"empty is a folder with no image files \(\.jpg"),
    "images only in subfolders": (tokenize("nested"), r"nested is a folder with no image files .*--recursive"),
    "batch size 0": (tokenize("good.png", "--batch-size", "0"), r"--batch-size must be at least 1, got 0"),
    "--out is a file": (tokenize("good.png", "--out", "a-file"), r"--out a-file: is a file, not a folder"),
    "--out under a file": (tokenize("good.png", "--out", "a-file/overlays"), r"--out a-file/overlays: cannot create"),
    "mistyped model path": (tokenize("good.png", model="nowhere"), r"--model nowhere: no such folder\.$"),
    "mistyped nested model path": (tokenize("good.png", model="./runs/x"), r"--model \./runs/x: no such folder\.$"),
    "model is a file": (tokenize("good.png", model="a-file"), r"--model a-file: is a file, not a model folder"),
    "model without config.json": (tokenize("good.png", model="no-config"), r"--model no-config: .*no config\.json"),
    "config.json not JSON": (tokenize("good.png", model="bad-config"), r"bad-config/config\.json is not valid JSON"),
    "model without weights": (tokenize("good.png", model="no-weights"), r"--model no-weights: .*no model weights"),
    "truncated weights": (
        tokenize("good.png", model="truncated-weights"),
        r"truncated-weights/model\.safetensors looks truncated.*its header lists \d+",
    ),
    "model without processor": (
        tokenize("good.png", model="no-processor"),
        r"--model no-processor: the folder has no preprocessor_config\.json",
    ),
    "demo encoder path mistyped": (["demo", "--vision-model", "nowhere"], r"^setok demo: --vision-model nowhere: no"),
    "train config missing": (
        ["train", "tokenizer", "--config", "missing.yaml"],
        r"^setok train tokenizer: No such config file: missing\.yaml$",
    ),
    "train config not YAML": (["train", "tokenizer", "--config", "bad.yaml"], r"^setok train tokenizer: bad\.yaml is"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_naming_it(case, in_workspace, capsys):
    argv, message = BAD_INPUTS[case]
    with pytest.raises(SystemExit) as exit:
        main(argv)
    # sys.exit(str): Python prints the string to stderr and exits with status 1.
    assert isinstance(exit.value.code, str), f"exit status {exit.value.code!r}"
    assert "\n" not in exit.value.code
    assert exit.value.code.startswith("setok ")
    assert re.search(message, exit.value.code), exit.value.code
    if "Hub" in exit.value.code or "huggingface" in exit.value.code:
        pytest.fail(f"a local path is no Hub id: {exit.value.code}")
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out
    assert not (in_workspace / "run-tokenizer").exists()


def test_debug_shows_the_original_error(in_workspace):
    for argv in (
        ["--debug", *tokenize("good.png", model="nowhere")],
        [*tokenize("good.png", model="nowhere"), "--debug"],
    ):
        with pytest.raises(FileNotFoundError, match="--model nowhere: no such folder"):
            main(argv)


def test_bugs_keep_their_traceback(in_workspace, monkeypatch):
    def broken(*args, **kwargs):
        raise TypeError("a bug, not bad input")

    monkeypatch.setattr(cli, "tokenize", broken)
    with pytest.raises(TypeError, match="a bug"):
        main(tokenize("good.png"))


def test_interrupt_exits_quietly(in_workspace, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "tokenize", interrupted)
    try:
        with pytest.raises(SystemExit) as exit:
            main(tokenize("good.png"))
    except KeyboardInterrupt:  # would stop the whole test session
        pytest.fail("the interrupt came through as a traceback")
    assert exit.value.code == 130


def test_only_rank_zero_prints_the_message(in_workspace, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(SystemExit) as exit:
        main(tokenize("nope.png"))
    assert exit.value.code == 1


@pytest.mark.parametrize("debug", [False, True])
def test_setok_entry_point_prints_one_line_or_the_traceback(workspace, debug):
    setok = Path(sys.executable).parent / "setok"
    assert setok.exists(), "the package's `setok` console script must be installed with it"
    argv = [str(setok), *(["--debug"] if debug else []), *tokenize("good.png", model="nowhere")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(argv, cwd=workspace, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 1
    assert result.stdout == ""
    if debug:
        assert "Traceback" in result.stderr and "FileNotFoundError: --model nowhere" in result.stderr
    else:
        assert result.stderr == "setok tokenize: --model nowhere: no such folder.\n"


# --- Model names: local folders and Hub ids ---


@pytest.mark.parametrize("name", ["org/name", "google/siglip-so400m-patch14-384", "setok-demo/model", "a_b/c.d"])
def test_hub_ids(name):
    assert is_hub_id(name, owner_required=True) and is_hub_id(name)


@pytest.mark.parametrize("name", ["nowhere", "./x/y", "a/b/c", "/abs/path", "../up", "org/", "/name", "-a/b", "a/.b"])
def test_no_hub_ids(name):
    assert not is_hub_id(name, owner_required=True)


@pytest.mark.parametrize("name", ["mnist", "gpt2", "squad_v2"])
def test_bare_names_are_hub_ids_where_the_hub_has_canonical_ones(name):
    assert is_hub_id(name) and not is_hub_id(name, owner_required=True)


def test_only_a_hub_id_failure_mentions_the_hub(in_workspace):
    """A name not on disk that looks like a Hub id is left to transformers; its failure says so, in one line."""

    class Unreachable:
        @staticmethod
        def from_pretrained(name, **kwargs):
            raise OSError("We couldn't connect to 'https://huggingface.co'.\nCheck your internet connection.")

    assert check_model_path("org/name") is False
    with pytest.raises(OSError, match=r"^--model org/name: no such local folder, and loading it from the Hub fail"):
        load_pretrained(Unreachable, "org/name")
    with pytest.raises(FileNotFoundError, match=r"^--model nowhere: no such folder\.$"):
        load_pretrained(Unreachable, "nowhere")
    assert check_model_path("model", required=("preprocessor_config.json",)) is True


def test_sharded_weights_are_checked_shard_by_shard(tmp_path):
    folder = tmp_path / "sharded"
    SetokModel(tiny_config()).save_pretrained(folder, max_shard_size="100KB")
    shards = sorted(folder.glob("model-*.safetensors"))
    assert len(shards) > 1 and (folder / "model.safetensors.index.json").is_file()
    assert check_model_path(str(folder)) is True
    shards[-1].write_bytes(shards[-1].read_bytes()[:-10])
    with pytest.raises(ValueError, match=rf"{shards[-1].name} looks truncated"):
        check_model_path(str(folder))
    shards[0].unlink()
    with pytest.raises(FileNotFoundError, match=rf"{shards[0].name}: no such file"):
        check_model_path(str(folder))


def test_a_file_that_is_no_safetensors_is_named(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "setok"}))
    (folder / "model.safetensors").write_bytes(b"<html>404 Not Found</html>")
    with pytest.raises(ValueError, match=r"model\.safetensors is not a safetensors file"):
        check_model_path(str(folder))


# --- setok train --overwrite ---


def test_train_passes_overwrite_to_the_runner(tmp_path, monkeypatch):
    from transformers_setok.training import config, runners

    calls = []

    class Config:
        final_dir = str(tmp_path / "final")

    def run_stage(config, resume=None, overwrite=False):
        calls.append((resume, overwrite))
        return {"global_step": 2}

    monkeypatch.setattr(config, "load_config", lambda path, stage: Config())
    monkeypatch.setattr(runners, "run_stage", run_stage)
    main(["train", "tokenizer", "--config", "c.yaml"])
    main(["train", "tokenizer", "--config", "c.yaml", "--overwrite", "--resume", "auto"])
    assert calls == [(None, False), ("auto", True)]


def test_the_runner_takes_overwrite():
    """`setok train --overwrite` calls `run_stage(config, resume, overwrite=True)`: training/runners.py's side."""
    from transformers_setok.training.runners import run_stage

    parameters = inspect.signature(run_stage).parameters
    assert "overwrite" in parameters and parameters["overwrite"].default is False
