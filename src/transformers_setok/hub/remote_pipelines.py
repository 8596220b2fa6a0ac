"""The drawing pipelines (text-to-image, image editing) as diffusers remote code in an exported Setokim folder.

A diffusers user loads a pipeline from a folder or Hub repo that holds `model_index.json`: its `_class_name`
`[file, class]` names a pipeline file at the top of the folder (run with `trust_remote_code=True`), and each
component is `[library, class]`, loaded from the folder of that name, or `[null, null]`, passed by the caller. An
exported Setokim folder is a transformers checkpoint at its top (weights, modeling code, processor), so the model and
the processor are `[null, null]` (loaded with transformers' auto classes and passed in) and the scheduler is
`["diffusers", "DDPMScheduler"]`, read from `scheduler/scheduler_config.json` (the head's training schedule,
`generation.noise_scheduler_for`).

The shipped code is the package's own files, each under a flat `setokim_*` name (`pipelines/_sampling.py` ->
`setokim_sampling.py`), with its relative imports rewritten to those names (`sibling_import_source`); nothing else in
them changes. Two constraints of diffusers' loader (0.42, `diffusers.utils.dynamic_modules_utils`) shape the rest:

- the file a `custom_pipeline` names must define exactly one `DiffusionPipeline` subclass (`find_pipeline_class`),
  and each drawing module also holds the shared base `SetokimSamplingPipeline`;
- from a folder (a Hub download is one too), it copies into its module cache only the files the named file itself
  imports, not what those import in turn.

So each pipeline has a small entry file, `pipeline_setokim_image_editing.py` / `pipeline_setokim_text_to_image.py`,
written here: it imports its one pipeline class and every file that class needs, and nothing else.
"""

import ast
import importlib
import importlib.util
import inspect
import json
import re
from pathlib import Path

__all__ = [
    "DRAWING_PIPELINES",
    "EDITING_ENTRY",
    "TEXT_TO_IMAGE_ENTRY",
    "remote_module_name",
    "sibling_import_source",
    "write_drawing_pipelines",
]

_PACKAGE = __name__.split(".")[0]
EDITING_ENTRY = "pipeline_setokim_image_editing"
TEXT_TO_IMAGE_ENTRY = "pipeline_setokim_text_to_image"
# Entry file (without `.py`) -> the package module defining the pipeline, and the pipeline class.
DRAWING_PIPELINES = {
    EDITING_ENTRY: (f"{_PACKAGE}.pipelines.image_editing", "SetokimImageEditingPipeline"),
    TEXT_TO_IMAGE_ENTRY: (f"{_PACKAGE}.pipelines.text_to_image", "SetokimTextToImagePipeline"),
}


def remote_module_name(module: str) -> str:
    """The flat file name (without `.py`) a package module ships under: `transformers_setok.pipelines._sampling` ->
    `setokim_sampling`."""
    return "setokim_" + module.rsplit(".", 1)[-1].lstrip("_")


def sibling_import_source(module: str) -> tuple[str, list[str]]:
    """The source of package module `module` with each relative import pointed at the flat sibling its target ships
    as (`from ..generation.guidance import x` -> `from .setokim_guidance import x`), and the package modules it
    imports, in order. Only the module part of those lines changes.

    A relative import of a package (`from ..generation import x`, `from . import x`) names no one file to ship, and
    an absolute import of this package would fail where it is not installed: ValueError naming the module and line.
    """
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None or spec.submodule_search_locations is not None:
        raise ValueError(f"`module` {module!r} must be a module of {_PACKAGE} (a .py file, not a package).")
    source = Path(spec.origin).read_text()
    lines = source.splitlines(keepends=True)
    package = module.rpartition(".")[0]
    imported = []
    for node in ast.walk(ast.parse(source, filename=spec.origin)):
        where = f"{module} line {getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import) and any(alias.name.split(".")[0] == _PACKAGE for alias in node.names):
            raise ValueError(f"{where} imports {_PACKAGE} by name; remote code may import only its siblings.")
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level == 0:
            if (node.module or "").split(".")[0] == _PACKAGE:
                raise ValueError(f"{where} imports {node.module}; remote code may import only its siblings.")
            continue
        relative = "." * node.level + (node.module or "")
        target = importlib.util.resolve_name(relative, package)
        target_spec = importlib.util.find_spec(target)
        if node.module is None or target_spec is None or target_spec.submodule_search_locations is not None:
            raise ValueError(
                f"{where} imports from {relative!r}, a package: import from the module that defines the names "
                "(`from ..generation.guidance import x`), so that the file to ship is known."
            )
        pattern = re.compile(rf"^(\s*from\s+){re.escape(relative)}(\s+import\b)")
        line = lines[node.lineno - 1]
        found = pattern.match(line)
        if not found:
            raise ValueError(f"{where}: write the relative import as `from {relative} import ...` on one line start.")
        lines[node.lineno - 1] = f"{found[1]}.{remote_module_name(target)}{found[2]}{line[found.end() :]}"
        imported.append(target)
    return "".join(lines), list(dict.fromkeys(imported))


def _closure(module: str) -> dict[str, str]:
    """`module` and every package module it needs, transitively: package module -> its rewritten source."""
    sources, pending = {}, [module]
    while pending:
        name = pending.pop(0)
        if name in sources:
            continue
        sources[name], imported = sibling_import_source(name)
        pending += imported
    files = {}
    for name in sources:
        other = files.setdefault(remote_module_name(name), name)
        if other != name:
            raise ValueError(f"{other} and {name} would both ship as {remote_module_name(name)}.py.")
    return sources


def _entry_source(module: str, class_name: str, needed: list[str]) -> str:
    """The entry file of one pipeline: its class, and an import of every other file it needs (see the module
    docstring for why both)."""
    lines = [
        f'"""`{class_name}` for diffusers\' custom-pipeline loader, written by `transformers_setok.hub.export_setokim`.',
        "",
        "It holds that one pipeline class, as diffusers requires of the file `custom_pipeline` (or `_class_name`) names,",
        "and imports each file the pipeline needs itself: from a folder, diffusers copies only the files the named file",
        'imports."""',
        "",
        f"from .{remote_module_name(module)} import {class_name}",
    ]
    lines += [f"from .{remote_module_name(other)} import __name__ as _{remote_module_name(other)}" for other in needed]
    lines += ["", f"__all__ = [{class_name!r}]", ""]
    return "\n".join(lines)


def write_drawing_pipelines(model, folder) -> list[str]:
    """For a `model` with a generation head (`config.use_generation_head`): write into `folder` the drawing pipelines'
    code (`DRAWING_PIPELINES`, their entry files and the package files they need), `scheduler/scheduler_config.json`
    and a `model_index.json` that names the editing pipeline; return the file names written (code and index). A
    model without a head gets nothing (returns []): it cannot draw. The model and its config are only read."""
    if not getattr(model.config, "use_generation_head", False):
        return []
    import diffusers

    from ..generation.schedule import noise_scheduler_for

    folder = Path(folder)
    written = []
    components = None
    for entry, (module, class_name) in DRAWING_PIPELINES.items():
        sources = _closure(module)
        for name, source in sources.items():
            (folder / f"{remote_module_name(name)}.py").write_text(source)
            written.append(f"{remote_module_name(name)}.py")
        needed = [name for name in sources if name != module]
        (folder / f"{entry}.py").write_text(_entry_source(module, class_name, needed))
        written.append(f"{entry}.py")
        pipeline = getattr(importlib.import_module(module), class_name)
        names = [name for name in inspect.signature(pipeline.__init__).parameters if name != "self"]
        if components is not None and names != components:
            raise ValueError(f"The drawing pipelines take different components: {components} and {names}.")
        components = names
    scheduler = noise_scheduler_for(model.config)
    if "scheduler" not in components:
        raise ValueError(f"The drawing pipelines take no `scheduler` component (they take {components}).")
    scheduler.save_pretrained(folder / "scheduler")
    module, class_name = DRAWING_PIPELINES[EDITING_ENTRY]
    index = {"_class_name": [EDITING_ENTRY, class_name], "_diffusers_version": diffusers.__version__}
    # The model and processor live at the top of the folder (a transformers checkpoint): the caller passes them.
    index.update({name: [None, None] for name in components})
    index["scheduler"] = ["diffusers", type(scheduler).__name__]
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    written.append("model_index.json")
    return list(dict.fromkeys(written))
