"""Stage 2 with the generation head resumed mid-epoch on two CPU processes (gloo) repeats the uninterrupted run's
step 2 bit for bit: the same hidden-token masks, noise and timesteps on every process, the same losses and weights.

tests/resume_generation_script.py runs both, uninterrupted and resumed from the step-1 checkpoint, in one launch.
"""

import json
from pathlib import Path

from conftest import accelerate_launch

TESTS = Path(__file__).parent


def launch(tmp_path: Path, config: str | None = None) -> list[dict]:
    """The script under `accelerate launch` with two CPU processes: DDP, or the shipped accelerate `config` but for
    `num_processes: 2`. Returns the two processes' reports."""
    result = accelerate_launch(TESTS / "resume_generation_script.py", [str(tmp_path)], tmp_path, config)
    assert result.returncode == 0, result.stderr[-6000:]
    return [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]


def assert_resumed_step_two_is_the_uninterrupted_one(ranks: list[dict]):
    assert [(r["rank"], r["world_size"]) for r in ranks] == [(0, 2), (1, 2)]
    for report in ranks:
        whole, resumed = report["whole"], report["resumed"]
        assert [log["step"] for log in whole["logs"]] == [1, 2]
        assert [draw["step"] for draw in whole["draws"]] == [1, 2]
        assert [draw["step"] for draw in resumed["draws"]] == [2], "the resumed run prepared step 2 only"
        # what the generation head was given in step 2: the same masks, timesteps and noised tokens
        assert resumed["draws"][0] == whole["draws"][1]
        # the step-2 log (the step-1 one comes from the checkpoint's state) and every weight, bit for bit
        assert resumed["logs"][-1] == whole["logs"][-1]
        assert resumed["digest"] == whole["digest"] and report["max_diff"] == 0.0
    assert ranks[0]["whole"]["digest"] == ranks[1]["whole"]["digest"], "the processes ended with other weights"
    assert any(report["whole"]["draws"][1]["draws"] for report in ranks), "step 2 draws an image on a process"
    both_draw = [pair for pair in zip(*(r["whole"]["draws"] for r in ranks)) if all(d["draws"] for d in pair)]
    assert both_draw, "in one step both processes draw (three of the four records are images to draw)"
    for first, second in both_draw:
        assert first["noisy"] != second["noisy"] and first["timesteps"] != second["timesteps"], "noise per process"


def test_ddp_resumed_generation_step_repeats_the_uninterrupted_one(tmp_path):
    ranks = launch(tmp_path)
    assert all(r["distributed_type"].endswith("MULTI_CPU") for r in ranks)
    assert_resumed_step_two_is_the_uninterrupted_one(ranks)


def test_deepspeed_zero2_resumed_generation_step_repeats_the_uninterrupted_one(tmp_path):
    ranks = launch(tmp_path, "deepspeed_zero2.yaml")
    assert all(r["distributed_type"].endswith("DEEPSPEED") and r["zero_stage"] == 2 for r in ranks)
    assert_resumed_step_two_is_the_uninterrupted_one(ranks)
