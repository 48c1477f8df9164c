"""The checks' stored fixtures (tests/fixtures/) are generated from the reference solutions by `make fixtures`:
the suite fails when they drift from what the current reference gives."""

import torch

from tools import make_fixtures, make_fixtures_part2
from tools.make_fixtures import check_or_write


def test_part1_fixtures_are_current(capsys):
    assert make_fixtures.main(["--check"]) == 0, capsys.readouterr().err


def test_part2_fixtures_are_current(capsys):
    assert make_fixtures_part2.main(["--check"]) == 0, capsys.readouterr().err


def test_a_drifted_fixture_is_named(tmp_path, capsys):
    path, meta_path = tmp_path / "f.safetensors", tmp_path / "f.json"
    tensors, meta = {"a": torch.zeros(3), "b": torch.ones(2)}, {"names": ["x"]}
    assert check_or_write(tensors, path, check=True, made_by="test", meta=meta, meta_path=meta_path) == 1
    assert "missing" in capsys.readouterr().err
    assert check_or_write(tensors, path, check=False, made_by="test", meta=meta, meta_path=meta_path) == 0
    assert check_or_write(tensors, path, check=True, made_by="test", meta=meta, meta_path=meta_path) == 0
    drifted = {"a": torch.zeros(3), "b": torch.ones(2) + 1e-3}
    assert check_or_write(drifted, path, check=True, made_by="test", meta=meta, meta_path=meta_path) == 1
    assert "out of date (['b'])" in capsys.readouterr().err
    assert check_or_write(tensors, path, check=True, made_by="test", meta={"names": ["y"]}, meta_path=meta_path) == 1
    assert "f.json" in capsys.readouterr().err
    assert check_or_write({"a": torch.zeros(3)}, path, check=True, made_by="test", meta=meta, meta_path=meta_path) == 1
    assert "['b']" in capsys.readouterr().err
