"""Part 1's saved results: exact round trip, clear errors when corrupt or for another model, load-or-compute."""

import json

import pytest
import torch

from utils.part1_results import (META_FILE, TENSORS_FILE, Part1ResultsError, load_or_compute_part1_results,
                                 load_part1_results, save_part1_results)

NAMES = ["default_empty", "default_assistant", "analyst", "bard", "ghost"]
DEFAULTS = ["default_empty", "default_assistant"]


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    vectors = torch.randn(5, 6, 64, generator=g)
    axis = vectors[:2].mean(0) - vectors[2:].mean(0)
    return dict(model_name="tiny-gemma2", layer=3, names=list(NAMES), persona_vectors=vectors,
                default_names=list(DEFAULTS), axis=axis)


def test_round_trip_is_exact(tmp_path):
    kw = _inputs()
    acts = torch.randn(7, 6, 64)
    path = save_part1_results(tmp_path, **kw, extra={"n_questions": 3}, default_activations=acts)
    assert path == tmp_path / META_FILE and (tmp_path / TENSORS_FILE).exists()
    loaded = load_part1_results(tmp_path, model_name="tiny-gemma2")
    assert loaded.model_name == "tiny-gemma2" and loaded.layer == 3
    assert loaded.names == NAMES and loaded.default_names == DEFAULTS and loaded.extra == {"n_questions": 3}
    assert torch.equal(loaded.persona_vectors, kw["persona_vectors"]) and torch.equal(loaded.axis, kw["axis"])
    assert torch.equal(loaded.default_activations, acts)
    assert loaded.n_layers == 6 and loaded.d_model == 64 and loaded.is_default.tolist() == [1, 1, 0, 0, 0]
    torch.testing.assert_close(loaded.unit_axis(), kw["axis"][3] / kw["axis"][3].norm())
    assert torch.equal(loaded.vectors_at(5), kw["persona_vectors"][:, 5])
    # without the optional tensors
    save_part1_results(tmp_path / "b", **kw)
    assert load_part1_results(tmp_path / "b").default_activations is None


def test_missing_is_none_and_corrupt_is_an_error(tmp_path):
    assert load_part1_results(tmp_path / "nothing") is None
    save_part1_results(tmp_path, **_inputs())
    with pytest.raises(Part1ResultsError, match="for 'tiny-gemma2', not 'smollm2-135m-instruct'"):
        load_part1_results(tmp_path, model_name="smollm2-135m-instruct")

    meta = json.loads((tmp_path / META_FILE).read_text())
    (tmp_path / META_FILE).write_text("{ not json")
    with pytest.raises(Part1ResultsError, match="not valid JSON.*Rerun Part 1"):
        load_part1_results(tmp_path)
    (tmp_path / META_FILE).write_text(json.dumps({**meta, "names": NAMES[:4]}))
    with pytest.raises(Part1ResultsError, match="5 rows but there are 4 names"):
        load_part1_results(tmp_path)
    (tmp_path / META_FILE).write_text(json.dumps(meta))
    (tmp_path / TENSORS_FILE).write_bytes(b"garbage")
    with pytest.raises(Part1ResultsError, match="not a readable safetensors"):
        load_part1_results(tmp_path)
    (tmp_path / TENSORS_FILE).unlink()
    with pytest.raises(Part1ResultsError, match="only part1_results.json"):
        load_part1_results(tmp_path)


@pytest.mark.parametrize("change, message", [
    (dict(axis=torch.randn(6, 63)), "axis is"),
    (dict(default_names=["nobody"]), "default_names"),
    (dict(default_names=list(NAMES)), "at least one role"),
    (dict(layer=6), "layer must be"),
    (dict(persona_vectors=torch.full((5, 6, 64), float("nan"))), "NaN"),
    (dict(extra={"x": object()}), "JSON"),
    (dict(default_activations=torch.randn(3, 5, 64)), "default_activations"),
])
def test_save_rejects_inconsistent_results(tmp_path, change, message):
    kw = {**_inputs(), **change}
    with pytest.raises(Part1ResultsError, match=message):
        save_part1_results(tmp_path, **kw)
    assert not (tmp_path / META_FILE).exists()


def test_load_or_compute(tiny, tmp_path):
    model, tok = tiny
    results, how = load_or_compute_part1_results(model, tok, "tiny-gemma2", tmp_path, n_questions=1, max_new_tokens=3,
                                                 roles=["analyst", "bard", "ghost"], progress=False)
    assert how.startswith("Computed") and str(tmp_path) in how
    assert results.persona_vectors.shape[1:] == (6, 64) and results.axis.shape == (6, 64)
    assert results.layer == 3 and set(results.default_names) <= set(results.names)
    assert len(results.names) == 5 + 3 - len(results.extra["dropped_roles"])
    assert results.default_activations.shape == (5, 6, 64)  # one question, five default prompts
    is_default = results.is_default
    expected_axis = results.persona_vectors[is_default].mean(0) - results.persona_vectors[~is_default].mean(0)
    torch.testing.assert_close(results.axis, expected_axis)
    torch.testing.assert_close(results.persona_vectors[is_default].mean(0), results.default_activations.mean(0))

    again, how = load_or_compute_part1_results(model, tok, "tiny-gemma2", tmp_path, n_questions=1, max_new_tokens=3,
                                               progress=False)
    assert how.startswith("Loaded") and torch.equal(again.axis, results.axis)
    with pytest.raises(Part1ResultsError, match="not 'smollm2-135m-instruct'"):
        load_or_compute_part1_results(model, tok, "smollm2-135m-instruct", tmp_path, n_questions=1, max_new_tokens=3)


class _Stop(Exception):
    pass


def test_computing_says_what_it_will_do_before_it_starts(tiny, tmp_path, monkeypatch, capsys):
    """The notice comes before the first stage runs (so it is on screen for the whole wait), with the work's size."""
    from utils import part1_results

    model, tok = tiny
    printed_before_generating = []

    def generate(self):
        printed_before_generating.append(capsys.readouterr().out)
        raise _Stop  # stop here: only the notice is under test

    monkeypatch.setattr(part1_results.Pipeline, "generate", generate)
    with pytest.raises(_Stop):
        load_or_compute_part1_results(model, tok, "tiny-gemma2", tmp_path, n_questions=2, max_new_tokens=7,
                                      roles=["analyst", "bard", "ghost"], progress=True)
    notice = printed_before_generating[0]
    assert f"No saved Part 1 results for tiny-gemma2 in {tmp_path}: computing them now" in notice
    assert "That is 16 answers of up to 7 new tokens" in notice  # (5 defaults + 3 roles) x 2 questions
    assert "all 6 layers" in notice and "progress bar" in notice

    monkeypatch.undo()
    capsys.readouterr()
    load_or_compute_part1_results(model, tok, "tiny-gemma2", tmp_path / "quiet", n_questions=1, max_new_tokens=3,
                                  roles=["analyst"], progress=False)
    assert "computing them now" not in capsys.readouterr().out  # progress=False prints nothing
