"""Stage 3 with the mask decoder under DDP (two CPU processes, gloo) trains the model that one process trains on the
same global batches: the weights, and the prompt statistics that `mask_decoder.prompt_norm` all-reduces.

tests/engine_training_script.py's `sft_segmentation` mode: three steps of two records per process (one process: four),
read in order, so that each step's global batch is the same four records. Objects per process and step are 0 / 2,
1 / 2 and 2 / 0 (`segmentation_records`): a process without objects, once without any image, must still run the
decoder, whose statistics are a collective, and the mask loss is a mean over the objects of all processes.
"""

import json
from pathlib import Path

import pytest
import torch
from conftest import accelerate_launch

TESTS = Path(__file__).parent
MODE = "sft_segmentation"


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    out = tmp_path_factory.mktemp("segmentation_ddp")
    result = accelerate_launch(TESTS / "engine_training_script.py", [str(out), MODE], out)
    assert result.returncode == 0, result.stderr[-6000:]
    ranks = [json.loads((out / f"{MODE}.rank{rank}.json").read_text()) for rank in (0, 1)]
    buffers = [torch.load(out / f"{MODE}.rank{rank}.buffers.pt") for rank in (0, 1)]
    return {"ranks": ranks, "params": torch.load(out / f"{MODE}.pt"), "buffers": buffers}


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    from engine_training_script import train

    return train(MODE, tmp_path_factory.mktemp("segmentation_single"), batch_size=4)


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[name].float() - b[name].float()).abs().max()) for name in a)


def test_the_processes_see_the_single_process_batches_split_in_two(launched, single):
    ranks = launched["ranks"]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert [[b["objects"] for b in r["batches"]] for r in ranks] == [[0, 1, 2], [2, 2, 0]]
    assert [b["reads"] for b in ranks[1]["batches"]] == [True, True, False]  # step 3: no image on rank 1
    assert [b["objects"] for b in single["report"]["batches"]] == [2, 3, 2]
    assert single["report"]["world_size"] == 1


def test_ddp_with_the_mask_decoder_matches_one_process(launched, single):
    ranks = launched["ranks"]
    assert ranks[0]["digest"] == ranks[1]["digest"], "the processes ended with other weights"
    # Measured 4.1e-6 (the mask decoder's attention; the prompt statistics' float32 rounding differs with the
    # summation order), the bound of the other DDP-vs-one-process comparisons (tests/test_engines.py).
    diff = max_diff(single["params"], launched["params"])
    print(f"weights, max abs diff DDP vs one process: {diff:.3g}")
    assert diff < 1e-5
    for rank in ranks:  # the total loss, logged to 6 decimals
        assert rank["losses"] == pytest.approx(single["report"]["losses"], abs=1e-5)
    # The decoder and the LLM trained (the comparison is not between two untouched models).
    from conftest import tiny_processor, tiny_setokim

    torch.manual_seed(0)
    initial = dict(tiny_setokim(tiny_processor(), use_mask_decoder=True).named_parameters())
    for part in ("mask_decoder.prompt_proj", "mask_decoder.hypernetwork", "model.language_model"):
        assert any(part in name and not torch.equal(initial[name], p) for name, p in launched["params"].items()), part


def test_both_processes_keep_the_global_batch_prompt_statistics(launched, single):
    rank0, rank1 = launched["buffers"]
    names = {f"mask_decoder.prompt_norm.{name}" for name in ("running_mean", "running_var", "num_batches_tracked")}
    assert set(rank0) == set(rank1) == set(single["buffers"]) == names
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), f"{name} differs between the processes"
    assert int(rank0["mask_decoder.prompt_norm.num_batches_tracked"]) == 3  # every step, on both processes
    mean, var = (rank0[f"mask_decoder.prompt_norm.running_{name}"] for name in ("mean", "var"))
    assert not torch.equal(mean, torch.zeros_like(mean)) and not torch.equal(var, torch.ones_like(var))
    # Measured 1.2e-7 (mean, values up to 2.3) and 1.6e-7 (variance, values 4e-4 to 2.4e-2: E[x^2] - mean^2 in float32
    # loses the low digits of these small variances, whatever the summation order).
    for name in ("running_mean", "running_var"):
        key = f"mask_decoder.prompt_norm.{name}"
        diff = float((rank0[key] - single["buffers"][key]).abs().max())
        print(f"{name}, max abs diff DDP vs one process: {diff:.3g}")
        torch.testing.assert_close(rank0[key], single["buffers"][key], rtol=0, atol=1e-6)


def test_the_logged_mask_terms_are_the_mean_over_all_objects(launched, single):
    """As `SetokimInputsMixin` documents: the mean over the objects of the step on all processes (step 2 has one
    object on rank 0 and two on rank 1), the same as one process logs."""
    for rank in launched["ranks"]:
        assert rank["loss_terms"].keys() == single["report"]["loss_terms"].keys() >= {"mask_loss", "mask_dice_loss"}
        for term, values in rank["loss_terms"].items():
            assert values == pytest.approx(single["report"]["loss_terms"][term], abs=1e-5), term
