"""Stage 6 of the resumable runner: per-layer axes and capping thresholds (Part 2)."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from utils import pipeline
from utils.pipeline import DEFAULT, Config, Item, Pipeline


def _config(tmp_path, **kw):
    base = dict(model="tiny-gemma2", roles=["bard", "ghost", "analyst"], n_questions=3, n_prompts=2, layers=[2, 4],
                max_tokens=6, min_count=1, min_score=0, chunk_size=8, workers=4, cache_dir=tmp_path / "cache",
                out_dir=tmp_path / "out")
    base.update(kw)
    return Config(**base)


def test_capping_stage_after_a_run_and_alone(tmp_path, tiny, capsys):
    model, tok = tiny
    run = Pipeline(_config(tmp_path), model, tok, progress=False)
    with pytest.raises(RuntimeError, match="run stages 1-5 first"):
        run.capping_axes()
    summary = run.run()
    out = tmp_path / "out" / "tiny-gemma2"
    saved = load_file(str(out / "capping.safetensors"))
    info = json.loads((out / "capping.json").read_text())
    assert info["layers"] == [2, 4] and info["percentile"] == 25.0 and summary["capping"]["layers"] == [2, 4]
    assert saved["axis"].shape == saved["axis_unit"].shape == (2, 64) and saved["thresholds"].shape == (2,)
    torch.testing.assert_close(saved["axis"], load_file(str(out / "axis.safetensors"))["axis"])
    torch.testing.assert_close(saved["axis_unit"].norm(dim=-1), torch.ones(2))

    # the thresholds are the 25th percentile of the default responses' projections, layer by layer
    acts = run.activations()
    defaults = torch.stack([acts[k] for k in acts if Item.from_key(k).persona == DEFAULT])
    assert len(defaults) == info["n_default_responses"] == 2 * 3
    for i, layer in enumerate([2, 4]):
        proj = (defaults[:, i] @ saved["axis_unit"][i]).numpy()
        assert info["thresholds"][str(layer)] == pytest.approx(float(np.percentile(proj, 25)), abs=1e-5)
        assert float(saved["thresholds"][i]) == pytest.approx(info["thresholds"][str(layer)], abs=1e-6)

    # `--stage axes` reruns only this stage, from the cache, with another percentile
    args = ["--model", "tiny-gemma2", "--roles", "bard,ghost,analyst", "--questions", "3", "--prompts", "2",
            "--layers", "2,4", "--max-tokens", "6", "--chunk-size", "8", "--cache-dir", str(tmp_path / "cache"), "--out",
            str(tmp_path / "out"), "--stage", "axes", "--percentile", "75"]
    assert pipeline.main(args) == 0
    again = json.loads((out / "capping.json").read_text())
    assert again["percentile"] == 75.0 and json.loads(capsys.readouterr().out)["percentile"] == 75.0
    for layer in ("2", "4"):
        assert again["thresholds"][layer] > info["thresholds"][layer]
    with pytest.raises(SystemExit):
        pipeline.main(args[:-1] + ["100"])
    assert "--percentile must be in (0, 100)" in capsys.readouterr().err
