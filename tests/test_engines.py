"""Every process runs the same collectives whatever its batch holds (text only, an image to read, an image to draw),
under DDP, DeepSpeed ZeRO-2 / ZeRO-3 and FSDP 2, on two CPU processes (gloo).

tests/engine_training_script.py trains two steps on mixed batches (step 1: one process reads no image while the other
reads or draws one; stage 1: each process its own photo and concepts). DDP is compared with one process training both
records of each step; DeepSpeed and FSDP with DDP. The configs are the shipped `configs/accelerate/deepspeed_zero*.yaml`
and `fsdp.yaml` with two CPU processes.
"""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from conftest import accelerate_launch

from transformers_setok.training.setokim_trainer import SetokimInputsMixin

TESTS = Path(__file__).parent
CONFIGS = TESTS.parent / "configs" / "accelerate"


def launch(tmp_path: Path, modes: list[str], config: str | None = None, check: bool = True, **extra_env):
    """tests/engine_training_script.py under `accelerate launch` with two CPU processes (gloo); DDP unless `config`
    names a shipped accelerate config, which is run as shipped but for `num_processes: 2`."""
    out = tmp_path / (config or "ddp").replace(".yaml", "")
    out.mkdir()
    result = accelerate_launch(
        TESTS / "engine_training_script.py", [str(out), ",".join(modes)], out, config, **extra_env
    )
    if not check:
        return result
    assert result.returncode == 0, result.stderr[-6000:]
    return out


def reports(out: Path, mode: str) -> list[dict]:
    """Each rank's report of `mode` (of the uninterrupted run for a `MODE_resume`), checked for two equal ranks."""
    ranks = [json.loads((out / f"{mode}.rank{rank}.json").read_text()) for rank in (0, 1)]
    ranks = [r.get("whole", r) for r in ranks]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert ranks[0]["digest"] == ranks[1]["digest"], f"{mode}: the processes ended with other weights"
    assert [len(r["losses"]) for r in ranks] == [2, 2]
    return ranks


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[name] - b[name]).abs().max()) for name in a)


def assert_same_losses(report: dict, reference: dict):
    """The logged loss and each logged term (logged to 6 decimals) of every step, within 1e-5."""
    assert report["losses"] == pytest.approx(reference["losses"], abs=1e-5)
    assert report["loss_terms"].keys() == reference["loss_terms"].keys()
    for term, values in report["loss_terms"].items():
        assert values == pytest.approx(reference["loss_terms"][term], abs=1e-5), term


def trained(before: dict, after: dict, part: str) -> bool:
    return any(part in name and not torch.equal(before[name], after[name]) for name in after)


# Stage 1 (SetokTrainer): trained without the discriminator; with it the trainer is only built (refused by DeepSpeed).
STAGE1_MODES = ["tokenizer", "tokenizer_discriminator"]
DISCRIMINATOR_REFUSED = (
    "The PatchGAN discriminator (`use_discriminator=True`) is supported with single-process and DDP"
)


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    return launch(
        tmp_path_factory.mktemp("engines"),
        ["sft_lora", "merge", "sft_full", "sft_full_tied", "generation", "generation_llm", *STAGE1_MODES],
    )


def initial_parameters(mode, tmp_path):
    from conftest import tiny_processor
    from engine_training_script import build_trainer

    torch.manual_seed(0)
    trainer = build_trainer(mode, tmp_path / "initial", tiny_processor(), 1)
    return {name: p.detach().float().clone() for name, p in trainer.model.named_parameters()}


@pytest.mark.parametrize("mode", ["sft_lora", "sft_full"])
def test_ddp_on_mixed_batches_matches_one_process(ddp, mode, tmp_path):
    """Step 1 has a text-only batch on rank 0 and an image on rank 1; one process trains on both records at once."""
    from engine_training_script import train

    ranks = reports(ddp, mode)
    assert [b["reads"] for b in ranks[0]["batches"]] == [False, True]
    assert [b["reads"] for b in ranks[1]["batches"]] == [True, True]
    distributed = torch.load(ddp / f"{mode}.pt")
    diff = max_diff(train(mode, tmp_path, batch_size=2)["params"], distributed)
    print(f"{mode}: max abs diff DDP vs one process: {diff:.3g}")
    assert diff < 1e-5
    before = initial_parameters(mode, tmp_path)
    part = "lora_" if mode == "sft_lora" else "language_model"
    assert trained(before, distributed, part) and trained(before, distributed, "multi_modal_projector")


def test_ddp_generation_on_mixed_batches_keeps_the_processes_equal(ddp, tmp_path):
    """Step 1: rank 0 text only, rank 1 draws; step 2: rank 0 reads, rank 1 draws (the head and SeTok idle on rank 0).
    The diffusion noise is drawn per process, so the reference is DDP itself (below: DeepSpeed against it)."""
    ranks = reports(ddp, "generation")
    assert [(b["reads"], b["draws"]) for b in ranks[0]["batches"]] == [(False, False), (True, False)]
    assert [(b["reads"], b["draws"]) for b in ranks[1]["batches"]] == [(True, True), (True, True)]
    before = initial_parameters("generation", tmp_path)
    assert trained(before, torch.load(ddp / "generation.pt"), "generation_head")


def test_ddp_stage1_matches_one_process_and_accepts_the_discriminator(ddp, tmp_path):
    """Stage 1 under DDP: each process its own photo (one or two concepts, "rocket" on both in step 1), the concept
    contrast gathered across the processes; one process trains on both records of each step at once."""
    from engine_training_script import train

    ranks = reports(ddp, "tokenizer")
    assert [b["concepts"] for b in ranks[0]["batches"]] == [[["man", "rocket"]], [["cat"]]]
    assert [b["concepts"] for b in ranks[1]["batches"]] == [[["rocket"]], [["cup"]]]
    one = train("tokenizer", tmp_path, batch_size=2)
    diff = max_diff(one["params"], torch.load(ddp / "tokenizer.pt"))
    print(f"stage 1: max abs diff DDP vs one process: {diff:.3g}")
    assert diff < 1e-5
    assert_same_losses(ranks[0], one["report"])
    assert [json.loads((ddp / f"tokenizer_discriminator.rank{r}.json").read_text()) for r in (0, 1)] == [
        {"refused": None}
    ] * 2


def _needs_deepspeed():
    # DeepSpeed comes with the dev extra (`.[deepspeed]`): a missing one fails here instead of skipping the engine tests.
    import deepspeed  # noqa: F401


def _compare_with_ddp(out: Path, ddp: Path, modes, engine: str = "DEEPSPEED") -> dict:
    """`modes`: the modes run in both, or {mode run here: the DDP mode it must equal}."""
    diffs = {}
    for mode, ddp_mode in (modes if isinstance(modes, dict) else {mode: mode for mode in modes}).items():
        ranks = reports(out, mode)
        assert ranks[0]["distributed_type"].endswith(engine), f"{engine} ran (not a silent DDP fallback)"
        assert ranks[0]["batches"] == json.loads((ddp / f"{ddp_mode}.rank0.json").read_text())["batches"]
        diffs[mode] = max_diff(torch.load(out / f"{mode}.pt"), torch.load(ddp / f"{ddp_mode}.pt"))
    print(f"max abs diff vs DDP: {diffs}")
    assert all(diff < 1e-5 for diff in diffs.values()), diffs
    return diffs


def _stage1_matches_ddp(out: Path, ddp: Path, tmp_path: Path):
    """Stage 1's losses (each term) as DDP's, the trained parts trained and the frozen encoders not, and the
    `save_model` checkpoint: loadable by a model built without DeepSpeed (the logit scale a 0-dim tensor again,
    though it trains as a (1,) vector under DeepSpeed) and equal to DDP's weights."""
    from transformers_setok import SetokForImageReconstruction

    run, reference = reports(out, "tokenizer")[0], reports(ddp, "tokenizer")[0]
    assert run["loss_terms"].keys() == {"concept_loss", "reconstruction_loss"}
    assert_same_losses(run, reference)

    before, after = initial_parameters("tokenizer", tmp_path), torch.load(out / "tokenizer.pt")
    for part in (
        "model.merger.",
        "detokenizer.",
        "concept_contrast.token_projection.",
        "concept_contrast.logit_scale",
    ):
        assert trained(before, after, part), part
    frozen = ("model.vision_model.", "concept_contrast.text_encoder.")
    assert not any(name.startswith(frozen) and not torch.equal(before[name], after[name]) for name in after)

    saved = dict(SetokForImageReconstruction.from_pretrained(out / "tokenizer_final").named_parameters())
    replicated = torch.load(ddp / "tokenizer.pt")
    assert {name: p.shape for name, p in saved.items()} == {name: p.shape for name, p in replicated.items()}
    assert max_diff({name: p.detach().float() for name, p in saved.items()}, replicated) < 1e-5


def test_deepspeed_zero2_matches_ddp_on_mixed_batches(ddp, tmp_path):
    """Stage 2 with the generation head (per-row embedding mask included), stage 3 LoRA and full fine-tuning, and
    stage 1 (SetokTrainer: reconstruction and the concept contrast across processes) under ZeRO-2; stage 1 with the
    PatchGAN discriminator is refused when its trainer is built (the script reports the error instead of failing the
    launch). Resuming under ZeRO-2 is tests/test_resume_generation.py's."""
    _needs_deepspeed()
    modes = ["generation", "sft_lora", "sft_full", "tokenizer"]
    out = launch(tmp_path, [*modes, "tokenizer_discriminator"], config="deepspeed_zero2.yaml")
    _compare_with_ddp(out, ddp, modes)
    _stage1_matches_ddp(out, ddp, tmp_path)
    for rank in (0, 1):
        refused = json.loads((out / f"tokenizer_discriminator.rank{rank}.json").read_text())["refused"]
        assert refused is not None and refused.startswith(DISCRIMINATOR_REFUSED), refused
        assert "DeepSpeed and FSDP shard its parameters" in refused


def test_deepspeed_zero3_lora_full_and_merge_match_ddp(ddp, tmp_path):
    """Stage 3 LoRA and full fine-tuning under ZeRO-3, `merge_adapters` on every process (the main one writes a
    checkpoint gathered from the shards, equal to the DDP one), resuming LoRA from a ZeRO-3 checkpoint, and stage 1
    (SetokTrainer, its frozen encoders sharded too; the checkpoint gathered by `save_model`)."""
    _needs_deepspeed()
    from safetensors.torch import load_file

    modes = ["sft_lora", "merge", "sft_full", "sft_lora_resume", "tokenizer"]
    out = launch(tmp_path, modes, config="deepspeed_zero3.yaml")
    _compare_with_ddp(out, ddp, ["sft_lora", "sft_full", "tokenizer"])
    _stage1_matches_ddp(out, ddp, tmp_path)
    returned = [json.loads((out / f"merge.rank{rank}.json").read_text())["returned"] for rank in (0, 1)]
    assert returned == [True, False]
    sharded, replicated = (
        load_file(out / "merged" / "model.safetensors"),
        load_file(ddp / "merged" / "model.safetensors"),
    )
    assert sharded.keys() == replicated.keys()
    diff = max_diff(sharded, replicated)
    print(f"merged under ZeRO-3 vs DDP: {diff:.3g}")
    assert diff < 1e-5
    for rank in (0, 1):  # resumed from the step-1 DeepSpeed checkpoint: the same step 2
        resumed = json.loads((out / f"sft_lora_resume.rank{rank}.json").read_text())
        assert resumed["resumed"]["losses"] == resumed["whole"]["losses"]
        assert resumed["max_diff"] < 1e-6


def test_fsdp_on_the_cpu_is_refused_instead_of_running_as_ddp(tmp_path):
    """accelerate 1.15 builds FSDP from GPU states only: on the CPU the shipped fsdp.yaml used to train as plain DDP
    without a word. The trainer now refuses it."""
    result = launch(tmp_path, ["sft_lora"], config="fsdp.yaml", check=False)
    assert result.returncode != 0
    assert "asks for FSDP (ACCELERATE_USE_FSDP=true), but it is not enabled" in result.stderr


@pytest.mark.parametrize(
    ("variable", "engine", "hint"),
    [("ACCELERATE_USE_FSDP", "FSDP", "GPU states only"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed", "use_cpu: false")],
)
def test_an_engine_that_accelerate_turned_off_is_an_error(monkeypatch, variable, engine, hint):
    trainer = SimpleNamespace(is_fsdp_enabled=False, is_deepspeed_enabled=False)
    SetokimInputsMixin._check_requested_engine(trainer)  # nothing asked for
    monkeypatch.setenv(variable, "true")
    with pytest.raises(RuntimeError, match=f"asks for {engine}") as error:
        SetokimInputsMixin._check_requested_engine(trainer)
    assert hint in str(error.value)
    SetokimInputsMixin._check_requested_engine(SimpleNamespace(is_fsdp_enabled=True, is_deepspeed_enabled=True))


def _unit_of(units: list[str], module: str) -> str:
    """The FSDP unit that holds `module`'s parameters: the nearest enclosing unit ("" is the root)."""
    return max((u for u in units if u == "" or module == u or module.startswith(f"{u}.")), key=len)


# Run under FSDP 2 -> the DDP run it must equal (a `_resume` mode's uninterrupted run is compared).
FSDP_MODES = {
    "sft_lora": "sft_lora",
    "sft_full_tied": "sft_full_tied",
    "sft_full_resume": "sft_full",
    "generation_llm_resume": "generation_llm",
}


def test_fsdp2_matches_ddp_on_mixed_batches_and_resumes(ddp, tmp_path):
    """FSDP 2 on two CPU processes through tests/fsdp_cpu_shim.py (accelerate builds FSDP from GPU states only), the
    shipped fsdp.yaml otherwise: stage 3 LoRA and full fine-tuning (LM head untied and tied), stage 2 with the
    generation head (training the LLM: FSDP refuses the per-row embedding mask), each equal to DDP, and each full run
    resumed from its step-1 checkpoint equal to the uninterrupted one.

    What it guards: SeTok and the projector run in `get_image_features`, outside the root's forward, which the
    trainer registers with FSDP (without it: "aten.addmm.default got mixed torch.Tensor and DTensor"); TRL's fused LM
    head reads `lm_head.weight` without calling the module, whose unit SetokimSFTTrainer unsharded first (without
    it the untied head's gradient is never averaged: 0.028 off DDP after two steps)."""
    out = launch(tmp_path, list(FSDP_MODES), config="fsdp.yaml", SETOK_FSDP_CPU_SHIM="1")
    _compare_with_ddp(out, ddp, FSDP_MODES, engine="FSDP")

    # The wrap policy of fsdp.yaml: SeTok one unit (frozen, run once per step), one unit per decoder layer, the
    # input embeddings and the LM head (accelerate's own), and the projector and the generation head in the root.
    layers = [f"model.language_model.layers.{i}" for i in (0, 1)]
    expected = ["", "model.vision_tower", "model.language_model.embed_tokens", *layers, "lm_head"]
    for mode in ("sft_full_tied", "sft_full_resume", "generation_llm_resume"):
        units = reports(out, mode)[0]["fsdp_units"]
        assert units == expected, (mode, units)
        for module in ("model.multi_modal_projector", "generation_head", "model.language_model.norm"):
            assert _unit_of(units, module) == "", (mode, module)
    lora_units = reports(out, "sft_lora")[0]["fsdp_units"]
    assert lora_units == ["", *(f"base_model.model.{unit}" for unit in expected[1:])], lora_units

    for mode in ("sft_full_resume", "generation_llm_resume"):
        for rank in (0, 1):
            resumed = json.loads((out / f"{mode}.rank{rank}.json").read_text())
            assert resumed["resumed"]["losses"] == resumed["whole"]["losses"], mode
            assert resumed["max_diff"] < 1e-6, (mode, resumed["max_diff"])


def test_fsdp_yaml_names_the_units_because_the_no_split_fallback_cannot_work():
    """Without `fsdp_transformer_layer_cls_to_wrap`, accelerate wraps the classes of the model's `_no_split_modules`,
    which transformers gathers from every sub-model: SigLIP's list names classes a SeTok tower has not (its text
    embeddings, and its pooling head, dropped by `vision_use_head: False`), and accelerate refuses a class it cannot
    find. So fsdp.yaml names the classes; they must exist in a Setokim and pick SeTok and the decoder layers."""
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
    from conftest import tiny_processor, tiny_setokim

    model = tiny_setokim(tiny_processor(), use_generation_head=True)
    fallback = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap")
    with pytest.raises(ValueError, match="Could not find the transformer layer class Siglip"):
        fallback.set_auto_wrap_policy(model)

    names = yaml.safe_load((CONFIGS / "fsdp.yaml").read_text())["fsdp_config"]["fsdp_transformer_layer_cls_to_wrap"]
    shipped = FullyShardedDataParallelPlugin(
        fsdp_version=2, auto_wrap_policy="transformer_based_wrap", transformer_cls_names_to_wrap=names.split(",")
    )
    shipped.set_auto_wrap_policy(model)
    policy = fsdp2_prepare_auto_wrap_policy(shipped, model)
    wrapped = [name for name, module in model.named_modules() if policy(module)]
    assert wrapped == ["model.vision_tower", "model.language_model.layers.0", "model.language_model.layers.1"]


def test_stage_1_refuses_an_engine_that_accelerate_turned_off(monkeypatch, tmp_path):
    """The tokenizer trainer makes the Setokim trainers' check (tested above) on itself, once built."""
    from conftest import tiny_config

    from transformers_setok import SetokForImageReconstruction
    from transformers_setok.training import setok_trainer

    checked = []
    monkeypatch.setattr(setok_trainer, "refuse_engines_turned_off", checked.append)
    args = setok_trainer.SetokTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    trainer = setok_trainer.SetokTrainer(SetokForImageReconstruction(tiny_config()), args)
    assert checked == [trainer]
