"""The drawing pipelines (image editing, text-to-image) as diffusers remote code in an exported Setokim folder: they
load with `DiffusionPipeline.from_pretrained(..., trust_remote_code=True)` where this package is not installed and
draw what the package's own pipelines draw."""

import contextlib
import importlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import WITHOUT_THE_PACKAGE, tiny_processor, tiny_setokim
from diffusers import DiffusionPipeline
from hub_standin import HubStandIn

from transformers_setok.generation import noise_scheduler_for
from transformers_setok.hub import export_setokim
from transformers_setok.hub.remote_pipelines import (
    DRAWING_PIPELINES,
    EDITING_ENTRY,
    TEXT_TO_IMAGE_ENTRY,
    remote_module_name,
    sibling_import_source,
)
from transformers_setok.pipelines import SetokimImageEditingPipeline, SetokimTextToImagePipeline

EDIT = dict(prompt="a cat", guidance_scale=2.0, image_guidance_scale=1.5, num_inference_steps=3,
            num_unmasking_rounds=2, max_image_tokens=5)  # fmt: skip
DRAW = dict(prompt="a red circle", guidance_scale=2.0, num_inference_steps=3, num_unmasking_rounds=2,
            max_image_tokens=5)  # fmt: skip
SEED = 7


@pytest.fixture(scope="module")
def drawer():
    torch.manual_seed(0)
    processor = tiny_processor()
    model = tiny_setokim(processor, use_generation_head=True)
    for parameter in model.generation_head.parameters():  # a fresh head predicts zero: give it something to say
        torch.nn.init.normal_(parameter, std=0.05)
    return model, processor


@pytest.fixture(scope="module")
def source():
    return PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8))


REMOTE_CHILD = WITHOUT_THE_PACKAGE + textwrap.dedent(
    r"""
    import json
    import PIL.Image
    import torch
    from diffusers import DiffusionPipeline
    from transformers import AutoModelForImageTextToText, AutoProcessor

    torch.set_num_threads(1)
    folder, photo, edit, draw, seed = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4]), int(sys.argv[5])
    if len(sys.argv) > 6:  # the Hub stand-in: only this machine may be reached; publish the folder there first
        import socket
        from huggingface_hub import HfApi

        connect = socket.socket.connect

        def loopback_only(sock, address):
            if sock.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in ("127.0.0.1", "::1"):
                raise OSError(f"the test tried to reach {address}")
            return connect(sock, address)

        socket.socket.connect = loopback_only
        HfApi().create_repo(sys.argv[6])
        HfApi().upload_folder(repo_id=sys.argv[6], folder_path=folder)
        folder = sys.argv[6]
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    editor = DiffusionPipeline.from_pretrained(folder, model=model, processor=processor, trust_remote_code=True)
    drawer = DiffusionPipeline.from_pretrained(
        folder, custom_pipeline="pipeline_setokim_text_to_image", model=model, processor=processor,
        trust_remote_code=True,
    )
    results = {}
    for name, pipe, kwargs in (("edit", editor, dict(image=PIL.Image.open(photo), **edit)), ("draw", drawer, draw)):
        pipe.set_progress_bar_config(disable=True)
        out = pipe(generator=torch.Generator().manual_seed(seed), **kwargs)
        results[name] = {
            "class": type(pipe).__module__ + "." + type(pipe).__name__,
            "scheduler": dict(pipe.scheduler.config),
            "tokens": [t.tolist() for t in out.image_tokens],
            "size": list(out.images[0].size),
        }
    results["setok_imported"] = any(name.split(".")[0] == "transformers_setok" for name in sys.modules)
    print(json.dumps(results))
    """
)


@pytest.mark.parametrize("where", ["folder", "hub"])
def test_an_export_edits_and_draws_without_the_package_as_the_package_does(drawer, source, tmp_path, where):
    model, processor = drawer
    folder = export_setokim(model, processor, tmp_path / "export", name="tiny", repo="me/tiny")
    source.save(tmp_path / "source.png")
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "modules"), PYTHONPATH="", OMP_NUM_THREADS="1")
    arguments = [str(folder), str(tmp_path / "source.png"), json.dumps(EDIT), json.dumps(DRAW), str(SEED)]
    with contextlib.ExitStack() as stack:
        if where == "hub":  # pushed to a stand-in of the Hub on 127.0.0.1 (tests/hub_standin.py), loaded by its id
            hub = stack.enter_context(HubStandIn())
            env.update(HF_ENDPOINT=hub.endpoint, HF_HOME=str(tmp_path / "hf"), HF_TOKEN="hf_standin_token",
                       HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_XET="1", HF_HUB_OFFLINE="0",
                       TRANSFORMERS_OFFLINE="0")  # fmt: skip
            arguments.append("me/tiny")
        else:
            env.update(HF_HUB_OFFLINE="1")
        child = subprocess.run(
            [sys.executable, "-c", REMOTE_CHILD, *arguments],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
    assert child.returncode == 0, child.stderr[-3000:]
    remote = json.loads(child.stdout.strip().splitlines()[-1])
    assert not remote["setok_imported"]

    scheduler = noise_scheduler_for(model.config)
    editor = SetokimImageEditingPipeline(model=model, processor=processor, scheduler=scheduler)
    painter = SetokimTextToImagePipeline(model=model, processor=processor, scheduler=scheduler)
    expected = {
        "edit": (editor, dict(image=source, **EDIT), DRAWING_PIPELINES[EDITING_ENTRY]),
        "draw": (painter, DRAW, DRAWING_PIPELINES[TEXT_TO_IMAGE_ENTRY]),
    }
    for name, (pipe, kwargs, (module, class_name)) in expected.items():
        pipe.set_progress_bar_config(disable=True)
        out = pipe(generator=torch.Generator().manual_seed(SEED), **kwargs)
        got = remote[name]
        # The class is the shipped file's, loaded from diffusers' module cache: not this package's.
        assert got["class"] == f"diffusers_modules.local.{remote_module_name(module)}.{class_name}"
        assert {k: v for k, v in got["scheduler"].items() if not k.startswith("_")} == {
            k: (list(v) if isinstance(v, tuple) else v) for k, v in scheduler.config.items() if not k.startswith("_")
        }
        assert [len(t) for t in got["tokens"]] == [len(t) for t in out.image_tokens]
        for drawn, own in zip(got["tokens"], out.image_tokens):
            assert torch.equal(torch.tensor(drawn, dtype=own.dtype), own)
        assert got["size"] == list(out.images[0].size)


def test_the_shipped_files_are_the_packages_with_only_their_relative_imports_rewritten(drawer, tmp_path):
    model, processor = drawer
    folder = export_setokim(model, processor, tmp_path / "export", name="tiny", repo="me/tiny")
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == [EDITING_ENTRY, "SetokimImageEditingPipeline"]
    assert index["model"] == index["processor"] == [None, None]
    assert index["scheduler"] == ["diffusers", "DDPMScheduler"]
    shipped = {
        "transformers_setok._checks",
        "transformers_setok.generation.conditions",
        "transformers_setok.generation.guidance",
        "transformers_setok.generation.schedule",
        "transformers_setok.pipelines._sampling",
        "transformers_setok.pipelines.image_editing",
        "transformers_setok.pipelines.text_to_image",
    }
    assert {p.stem for p in folder.glob("setokim_*.py")} == {remote_module_name(m) for m in shipped}
    for module in shipped:
        ours = Path(importlib.import_module(module).__file__).read_text().splitlines()
        theirs = (folder / f"{remote_module_name(module)}.py").read_text().splitlines()
        assert len(ours) == len(theirs)
        changed = [(a, b) for a, b in zip(ours, theirs) if a != b]
        for a, b in changed:
            assert a.startswith("from .") and b.startswith("from .setokim_")
            assert a.split(" import ", 1)[1] == b.split(" import ", 1)[1]
        assert "from .." not in "\n".join(theirs)
    assert sibling_import_source("transformers_setok.pipelines._sampling")[1] == [
        "transformers_setok._checks",
        "transformers_setok.generation.conditions",
        "transformers_setok.generation.schedule",
    ]
    for entry, (module, class_name) in DRAWING_PIPELINES.items():
        text = (folder / f"{entry}.py").read_text()
        assert f"from .{remote_module_name(module)} import {class_name}\n" in text
        assert "from .setokim_checks import" in text and "from .setokim_schedule import" in text


def test_a_model_without_a_generation_head_ships_no_drawing_pipeline(tmp_path):
    processor = tiny_processor()
    folder = export_setokim(tiny_setokim(processor), processor, tmp_path / "export", name="tiny", repo="me/tiny")
    assert (folder / "config.json").is_file()
    assert not (folder / "model_index.json").exists() and not (folder / "scheduler").exists()
    assert not list(folder.glob("setokim_*.py")) and not list(folder.glob("pipeline_setokim_*.py"))
    with pytest.raises(OSError, match="model_index.json"):  # diffusers finds no pipeline there
        DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)


def test_exporting_leaves_the_live_model_config_as_it_was(drawer, tmp_path):
    model, processor = drawer
    before = model.config.to_dict()
    export_setokim(model, processor, tmp_path / "export", name="tiny", repo="me/tiny")
    assert model.config.to_dict() == before
    assert "_auto_class" not in type(model).__dict__


@pytest.mark.parametrize(
    "line, message",
    [
        ("from .. import helpers\n", "imports from '..', a package"),
        ("from ..helpers import x\n", "imports from '..helpers', a package"),
        ("from transformers_setok import _checks\n", "imports transformers_setok"),
        ("import transformers_setok._checks\n", "imports transformers_setok by name"),
    ],
)
def test_an_import_that_names_no_file_to_ship_is_refused_by_module_and_line(line, message, tmp_path, monkeypatch):
    package = tmp_path / "shipping_probe"
    (package / "helpers").mkdir(parents=True)
    (package / "inner").mkdir()
    for init in (package, package / "helpers", package / "inner"):
        (init / "__init__.py").write_text("")
    (package / "inner" / "mod.py").write_text("import math\n\n" + line)
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [name for name in sys.modules if name.split(".")[0] == package.name]:  # another case's files
        monkeypatch.delitem(sys.modules, name)
    with pytest.raises(ValueError, match=message) as error:
        sibling_import_source("shipping_probe.inner.mod")
    assert "shipping_probe.inner.mod line 3" in str(error.value)
    with pytest.raises(ValueError, match="not a package"):
        sibling_import_source("shipping_probe.inner")
