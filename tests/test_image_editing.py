"""Image editing: `SetokimImageEditingPipeline` (the source tokenized once, the edit drawn by the text-to-image
sampler, InstructPix2Pix guidance over the chat without its instruction and without its source) and `setok edit`."""

import json
import math

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import count_setok_calls, tiny_processor, tiny_setokim

from transformers_setok.generation import noise_scheduler_for
from transformers_setok.pipelines import SetokimImageEditingPipeline, image_editing
from transformers_setok.training.collators import SetokimChatCollator
from transformers_setok.training.data import editing_messages
from transformers_setok.training.generation_targets import ConditionDropout
from transformers_setok.training.step_inputs import DiffusionSettings, prepare_step

KWARGS = dict(num_inference_steps=3, num_unmasking_rounds=2, max_image_tokens=6)


@pytest.fixture(scope="module")
def processor():
    return tiny_processor()


@pytest.fixture(scope="module")
def model(processor):
    torch.manual_seed(0)
    model = tiny_setokim(processor, use_generation_head=True)
    for parameter in model.generation_head.parameters():  # a fresh head predicts zero: give it something to say
        torch.nn.init.normal_(parameter, std=0.05)
    model.model.vision_tower.requires_grad_(False)  # as stage 3 has it (`prepare_step` checks)
    return model


@pytest.fixture(scope="module")
def sources():
    rng = np.random.default_rng(0)
    return [PIL.Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)) for _ in range(2)]


def pipeline(model, processor):
    pipe = SetokimImageEditingPipeline(model=model, processor=processor, scheduler=noise_scheduler_for(model.config))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def edit(pipe, sources, seed=3, **kwargs):
    return pipe(image=sources, prompt="a cat", generator=torch.Generator().manual_seed(seed), **KWARGS, **kwargs)


def passes_read(model, monkeypatch) -> list[tuple]:
    """Records every LLM pass of the unmasking rounds: its `input_ids`, `attention_mask` and visible tokens."""
    seen = []
    conditions = model.image_token_conditions

    def spy(input_ids, attention_mask, hidden, visible, **kwargs):
        seen.append((input_ids.clone(), attention_mask.clone(), [t.clone() for t in visible]))
        return conditions(input_ids, attention_mask, hidden, visible, **kwargs)

    monkeypatch.setattr(model, "image_token_conditions", spy)
    return seen


def spy_on(monkeypatch, name) -> list[tuple]:
    calls = []
    original = getattr(image_editing, name)
    # What the combination is called with besides the predictions: its scales.
    monkeypatch.setattr(
        image_editing, name, lambda *a: calls.append(tuple(x for x in a if not torch.is_tensor(x))) or original(*a)
    )
    return calls


def words(processor, ids, mask) -> str:
    """A row as words, its image blocks written `[Img] n [/Img]`."""
    row = " ".join(processor.tokenizer.convert_ids_to_tokens(ids[mask.bool()].tolist()))
    blocks = row.split("[Img]")
    return "[Img]".join([blocks[0]] + [f" {b.count('<image>')} [/Img]{b.split('[/Img]', 1)[1]}" for b in blocks[1:]])


def test_the_editing_chat_is_trainings(processor):
    assert [image_editing.editing_request("add a cup")] == editing_messages("add a cup")[:1]


def test_setok_runs_once_on_the_sources_and_fills_their_blocks_in_every_pass(model, processor, sources, monkeypatch):
    pixels = processor.image_processor(sources, return_tensors="pt")["pixel_values"]
    setok = model.get_image_features(pixels)
    counts = [len(features) for features in setok.pooler_output]
    calls = count_setok_calls(model, monkeypatch)
    seen = passes_read(model, monkeypatch)
    out = edit(pipeline(model, processor), sources, guidance_scale=2.0, image_guidance_scale=1.5)
    assert calls == [2]  # one SeTok forward, on both sources, for the length and all three variants' passes
    assert len(seen) == KWARGS["num_unmasking_rounds"]
    for ids, mask, visible in seen:
        rows = [words(processor, i, m) for i, m in zip(ids, mask)]
        with_source = [row.startswith(f"User : [Img] {counts[b % 2]} [/Img]") for b, row in enumerate(rows)]
        assert with_source == [True] * 4 + [False] * 2
        # Rows with the source read its SeTok tokens whole, before the drawn image's visible ones.
        for row in range(4):
            torch.testing.assert_close(visible[2 * row], setok.last_hidden_state[row % 2][: counts[row % 2]])
    slots = [int(seen[0][0][b].eq(processor.image_token_id).sum()) - counts[b] for b in (0, 1)]
    assert [len(t) for t in out.image_tokens] == slots


def test_guidance_one_is_the_unguided_sampler_bit_for_bit(model, processor, sources, monkeypatch):
    pipe = pipeline(model, processor)
    seen = passes_read(model, monkeypatch)
    combined = spy_on(monkeypatch, "classifier_free_guidance") + spy_on(monkeypatch, "instruct_pix2pix_guidance")
    plain = edit(pipe, sources)
    one = edit(pipe, sources, guidance_scale=1.0, image_guidance_scale=1.0)
    assert {len(ids) for ids, _, _ in seen} == {2}  # the two edits' full chats only
    assert not combined
    assert [len(t) for t in one.image_tokens] == [len(t) for t in plain.image_tokens]
    assert all(torch.equal(a, b) for a, b in zip(one.image_tokens, plain.image_tokens))
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(one.images, plain.images))
    assert one.images[0].size == (32, 32)


def test_text_guidance_alone_reads_the_chat_without_its_instruction(model, processor, sources, monkeypatch):
    pipe = pipeline(model, processor)
    plain = edit(pipe, sources)
    seen = passes_read(model, monkeypatch)
    two_way = spy_on(monkeypatch, "classifier_free_guidance")
    three_way = spy_on(monkeypatch, "instruct_pix2pix_guidance")
    guided = edit(pipe, sources, guidance_scale=3.0)
    ids, mask, _ = seen[0]
    rows = [words(processor, i, m) for i, m in zip(ids, mask)]
    # [full; without the instruction] x 2 edits: the same source block and slots, the instruction's tokens cut.
    assert len(rows) == 4 and [row.startswith("User : [Img] ") and " a cat " in row for row in rows[:2]] == [True] * 2
    assert rows[2:] == [row.replace(" a cat", "") for row in rows[:2]]
    assert two_way == [(3.0,)] * KWARGS["num_inference_steps"] * KWARGS["num_unmasking_rounds"]
    assert not three_way
    assert [len(t) for t in guided.image_tokens] == [len(t) for t in plain.image_tokens]  # the full chat's length
    assert all(not torch.allclose(g, p) for g, p in zip(guided.image_tokens, plain.image_tokens))


def test_image_guidance_combines_three_variants_as_instruct_pix2pix(model, processor, sources, monkeypatch):
    pipe = pipeline(model, processor)
    seen = passes_read(model, monkeypatch)
    calls = []
    original = image_editing.instruct_pix2pix_guidance

    def spy(uncond, image_only, full, text_scale, image_scale):
        calls.append((text_scale, image_scale))
        return original(uncond, image_only, full, text_scale, image_scale)

    monkeypatch.setattr(image_editing, "instruct_pix2pix_guidance", spy)
    edit(pipe, sources, guidance_scale=1.0, image_guidance_scale=2.5)
    ids, mask, visible = seen[0]
    rows = [words(processor, i, m) for i, m in zip(ids, mask)]
    assert len(rows) == 6  # [full; image only; neither] x 2 edits
    assert [" a cat " in row for row in rows] == [True, True, False, False, False, False]
    assert [row.count("[Img]") for row in rows] == [2, 2, 2, 2, 1, 1]
    assert rows[4].startswith("User : Assistant : [Img]")
    assert len(visible) == 4 * 2 + 2  # source + drawn for the rows with the source, drawn only for the others
    # One combination per denoising step of each round.
    assert calls == [(1.0, 2.5)] * KWARGS["num_inference_steps"] * KWARGS["num_unmasking_rounds"]


def test_the_null_chats_are_what_training_dropout_leaves(model, processor, sources, monkeypatch):
    """The sampler's image-only and unconditional rows match stage 3's text dropout and text-and-image dropout of the
    same edit (up to the drawn image's block)."""
    seen = passes_read(model, monkeypatch)
    edit(pipeline(model, processor), sources[:1], guidance_scale=2.0, image_guidance_scale=2.0)
    ids, mask, _ = seen[0]
    sampled = [words(processor, i, m).rsplit("[Img]", 1)[0] for i, m in zip(ids, mask)]
    record = {"images": [sources[0], sources[1]], "messages": editing_messages("a cat")}
    batch = SetokimChatCollator(processor)([record])
    for row, dropout in ((0, {}), (1, {"text": 1.0}), (2, {"both": 1.0})):
        settings = DiffusionSettings(noise_scheduler_for(model.config), condition_dropout=ConditionDropout(**dropout))
        step = prepare_step(
            model,
            batch,
            processor,
            padding_side="left",
            diffusion=settings,
            generator=torch.Generator().manual_seed(0),
        )
        inputs = step.model_kwargs
        trained = words(processor, inputs["input_ids"][0], inputs["attention_mask"][0]).rsplit("[Img]", 1)[0]
        assert sampled[row] == trained


def test_a_seeded_generator_repeats_the_edit(model, processor, sources):
    pipe = pipeline(model, processor)
    first = edit(pipe, sources, seed=5, guidance_scale=2.0, image_guidance_scale=1.5)
    again = edit(pipe, sources, seed=5, guidance_scale=2.0, image_guidance_scale=1.5)
    other = edit(pipe, sources, seed=6, guidance_scale=2.0, image_guidance_scale=1.5)
    assert all(torch.equal(a, b) for a, b in zip(first.image_tokens, again.image_tokens))
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(first.images, again.images))
    assert not all(len(a) == len(b) and torch.allclose(a, b) for a, b in zip(first.image_tokens, other.image_tokens))


@pytest.mark.parametrize(
    "overrides, named",
    [
        ({"image": None}, "`image`"),
        ({"image": []}, "`image`"),
        ({"prompt": ""}, "`prompt`"),
        ({"prompt": "   "}, "`prompt`"),
        ({"prompt": None}, "`prompt`"),
        ({"prompt": ["a cat", "a cat"]}, "`prompt`"),  # two instructions, one image
        ({"guidance_scale": -0.5}, "`guidance_scale`"),
        ({"guidance_scale": math.nan}, "`guidance_scale`"),
        ({"image_guidance_scale": -1.0}, "`image_guidance_scale`"),
        ({"image_guidance_scale": math.nan}, "`image_guidance_scale`"),
        ({"prompt": "<image> a cat"}, "`prompt[0]`"),
    ],
)
def test_bad_input_is_refused_by_name(model, processor, sources, overrides, named):
    arguments = {"image": sources[0], "prompt": "a cat", **overrides}
    with pytest.raises(ValueError, match=named.replace("[", r"\[").replace("]", r"\]")):
        pipeline(model, processor)(**arguments, **KWARGS)


def test_a_model_without_a_generation_head_is_refused(processor, sources):
    pipe = pipeline(tiny_setokim(processor), processor)
    with pytest.raises(ValueError, match="no generation head"):
        pipe(image=sources[0], prompt="a cat", **KWARGS)


def test_the_edit_command_writes_edits_and_an_index(model, processor, sources, tmp_path):
    from transformers_setok.cli import main

    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    folder = tmp_path / "photos"
    folder.mkdir()
    sources[0].save(folder / "a.png")
    sources[1].save(folder / "b.jpg")
    (folder / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "out"
    command = ["edit", str(folder), "--instruction", "a cat", "--model", str(tmp_path / "model"), "--out", str(out)]
    command += ["--guidance-scale", "2", "--image-guidance-scale", "1.5", "--steps", "2", "--seed", "4"]
    with pytest.raises(SystemExit, match="broken.png"):
        main(command)
    main(command + ["--skip-bad"])
    index = json.loads((out / "index.json").read_text())
    assert [entry["edited"] for entry in index["images"]] == ["a_edited.png", "b_edited.png"]
    assert [entry["image"] for entry in index["skipped"]] == [str(folder / "broken.png")]
    assert index["instruction"] == "a cat" and index["image_guidance_scale"] == 1.5
    expected = pipeline(model, processor)(
        image=PIL.Image.open(folder / "a.png").convert("RGB"),
        prompt="a cat",
        guidance_scale=2.0,
        image_guidance_scale=1.5,
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(4),
    )
    assert index["images"][0]["num_tokens"] == len(expected.image_tokens[0])
    assert np.array_equal(np.asarray(PIL.Image.open(out / "a_edited.png")), np.asarray(expected.images[0]))
    with pytest.raises(SystemExit, match="image-guidance-scale"):
        main(command[:-6] + ["--image-guidance-scale", "nan"])


def test_the_edit_command_refuses_a_model_without_a_head(processor, sources, tmp_path):
    from transformers_setok.cli import main

    tiny_setokim(processor).save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    sources[0].save(tmp_path / "a.png")
    with pytest.raises(SystemExit, match="has no generation head"):
        main(
            [
                "edit",
                str(tmp_path / "a.png"),
                "--instruction",
                "a",
                "--model",
                str(tmp_path / "model"),
                "--out",
                str(tmp_path / "o"),
            ]
        )
    assert not (tmp_path / "o").exists()


def test_an_overfit_model_reproduces_its_one_training_edit(tmp_path):
    """One edit learnt by heart through the stage-2 trainer (the source read, the target drawn): the pipeline then
    writes as many tokens as SeTok gives the target and draws tokens close to the target's, not the source's."""
    from conftest import trainer_for
    from skimage import data

    processor = tiny_processor()
    torch.manual_seed(0)
    model = tiny_setokim(processor, use_generation_head=True)
    source, target = PIL.Image.fromarray(data.chelsea()), PIL.Image.fromarray(data.coffee())
    record = {"images": [source, target], "messages": editing_messages("make it a cup")}
    trainer = trainer_for(
        model,
        processor,
        [record],
        tmp_path,
        max_steps=100,
        learning_rate=1e-2,
        train_language_model=True,
        train_generation_head=True,
        diffusion_noise_repeats=64,
        lr_scheduler_type="constant",
    )
    trainer.train()
    model.eval()
    pixel_values = processor.image_processor([source, target], return_tensors="pt")["pixel_values"]
    setok = model.model.vision_tower(pixel_values)
    wanted = setok.last_hidden_state[1, : int(setok.num_tokens[1])]

    pipe = SetokimImageEditingPipeline(model=model, processor=processor, scheduler=noise_scheduler_for(model.config))
    pipe.set_progress_bar_config(disable=True)
    drawn = pipe(
        image=source, prompt="make it a cup", num_inference_steps=50, generator=torch.Generator().manual_seed(0)
    )
    drawn = drawn.image_tokens[0]
    assert drawn.shape == wanted.shape
    error = (drawn - wanted).pow(2).mean()
    assert error < 0.5 * wanted.pow(2).mean(), (float(error), float(wanted.pow(2).mean()))
