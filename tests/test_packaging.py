"""The package as users install it: every package folder ships, and a wheel (not the editable checkout) installed in
a fresh virtual environment exports a Setokim with its model card and runs `setok demo`."""

import json
import os
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_folder_is_listed_in_pyproject():
    # pyproject.toml lists its packages (the model-card folder is mapped in from the top level, which rules out
    # `packages.find`): a new subpackage missing from the list would be left out of the wheel.
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {".".join(init.parent.relative_to(ROOT / "src").parts) for init in (ROOT / "src").rglob("__init__.py")}
    assert on_disk | {"transformers_setok.model_cards"} == listed


CHILD = r"""
import json, sys
from pathlib import Path
import torch
import transformers_setok
from transformers_setok.hub import export_setokim
from transformers_setok.hub.model_card import supported_transformers
sys.path.insert(0, sys.argv[2])
from conftest import tiny_config
from conftest import tiny_processor, tiny_setokim

processor = tiny_processor()
folder = export_setokim(tiny_setokim(processor), processor, Path(sys.argv[1]) / "export", name="tiny", repo="me/tiny")
print(json.dumps({
    "package": transformers_setok.__file__,
    "card": (folder / "README.md").read_text(),
    "range": supported_transformers(),
}))
"""


@pytest.mark.slow
def test_the_wheel_installs_and_its_features_work(tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(wheels),
            str(ROOT),
        ],
        check=True,
        cwd=tmp_path,
    )
    (wheel,) = wheels.glob("transformers_setok-*.whl")

    # A fresh venv that holds only the wheel; the dependencies come from this environment's site-packages through a
    # .pth path entry (which puts the folder on sys.path but does not run its .pth files, so this checkout's
    # editable install stays invisible).
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", str(wheel)], check=True
    )
    site = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    (site / "parent_environment.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}

    result = subprocess.run(
        [str(python), "-c", CHILD, str(tmp_path), str(ROOT / "tests")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert Path(report["package"]).is_relative_to(site), "the wheel's package was imported, not the checkout"
    assert report["range"].startswith(">=5.23,<") and f"transformers{report['range']}" in report["card"]
    assert "# tiny" in report["card"]

    demo = subprocess.run(
        [str(env_dir / "bin" / "setok"), "demo", "--out", "demo", "--steps", "2", "--batch-size", "2"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=600,
    )
    assert demo.returncode == 0, demo.stderr[-3000:]
    assert (tmp_path / "demo" / "report.md").is_file()
    assert "SeTok demo" in (tmp_path / "demo" / "model" / "README.md").read_text()
    assert json.loads((tmp_path / "demo" / "metrics.json").read_text())


@pytest.mark.parametrize(
    "old, names",
    [
        ("transformers_setok.image_generation", ["SetokimTextToImagePipeline", "noise_scheduler_for"]),
        ("transformers_setok.export", ["export_setokim", "push_folder_to_hub"]),
        ("transformers_setok.training.model_card", ["render_setokim_card"]),
        ("transformers_setok.training.demo", ["run_demo"]),
        ("transformers_setok.training.photos", ["load_photos"]),
    ],
)
def test_moved_modules_keep_their_old_path_for_one_release(old, names):
    import importlib

    sys.modules.pop(old, None)
    with pytest.warns(FutureWarning, match="moved to"):
        module = importlib.import_module(old)
    assert all(hasattr(module, name) for name in names)


def test_pipelines_call_only_public_model_api():
    """A pipeline holds a model and calls its public methods, as diffusers pipelines do: no private attribute of the
    model and none of its submodules (a change inside the model would break such a pipeline silently)."""
    import re

    reaching_in = re.compile(
        r"\bmodel\.(_\w+|model|generation_head|mask_decoder|multi_modal_projector|language_model|vision_tower)\b"
    )
    offenders = [
        f"{path.name}:{number}: {line.strip()}"
        for path in (ROOT / "src" / "transformers_setok" / "pipelines").glob("*.py")
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if reaching_in.search(line)
    ]
    assert not offenders, offenders
