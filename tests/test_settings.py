"""utils/settings.py: every COURSE_* name in the repository is declared, values convert or fail by name,
misspellings name the nearest setting, and docs/settings.md is the current table."""

from __future__ import annotations

import os
import re
import runpy
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from utils import settings
from utils.settings import SettingError, UnknownSettingError

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "settings.md"
# A COURSE_* (or PERSONA_COURSE_*) name, not the tail of a longer identifier such as DEFAULT_COURSE_ROOT.
NAME = re.compile(r"(?<![A-Za-z0-9_])(?:PERSONA_)?COURSE_[A-Z0-9_]*[A-Z0-9]")
# COURSE_* identifiers that are not environment variables.
NOT_SETTINGS = {
    "COURSE_CACHE_VERSION": "utils/models.py: the stamp file in a built model's cache folder",
    "COURSE_CONFIG": "tools/grade_roundtrip.py: the text of a course root's own nbgrader_config.py",
}
SCANNED_SUFFIXES = {".py", ".md", ".toml", ".yml", ".yaml", ".cfg", ".ini", ".txt", ".sh"}


def tracked_files() -> list[Path]:
    """The repository's tracked files that can name a setting: Python, Markdown, config, the Makefile, .ci/."""
    try:
        listing = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.fail(f"`git ls-files` failed in {ROOT} ({exc}); the settings scan reads the tracked files")
    paths = [ROOT / p for p in listing.stdout.split("\0") if p]
    return [p for p in paths if p.is_file() and (p.suffix in SCANNED_SUFFIXES or p.name == "Makefile"
                                                  or p.relative_to(ROOT).parts[0] == ".ci")]


def course_names(paths: list[Path]) -> dict[str, list[str]]:
    """Every COURSE_* name in ``paths``, with the places (file:line) that mention it."""
    found: dict[str, list[str]] = {}
    for path in paths:
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            for name in NAME.findall(line):
                where = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
                found.setdefault(name, []).append(f"{where}:{number}")
    return found


def undeclared(paths: list[Path]) -> dict[str, list[str]]:
    return {name: places for name, places in course_names(paths).items()
            if name not in settings.SETTINGS and name not in NOT_SETTINGS}


# ----------------------------------------------------------------------------- the scan

def test_every_course_name_in_the_repository_is_declared():
    files = tracked_files()
    names = course_names(files)
    # The scan reads what it should: the Makefile, the notebooks' sources and the grading config name settings.
    for name, where in [("COURSE_MODEL", "Makefile"), ("COURSE_N_TRAITS", "src/part1_persona_space.py"),
                        ("COURSE_CHECK_TIMEOUT", "nbgrader_config.py"), ("COURSE_ROOT", "Makefile")]:
        assert any(p.startswith(where + ":") for p in names.get(name, [])), f"the scan missed {name} in {where}"
    missing = undeclared(files)
    assert not missing, "COURSE_* names that utils/settings.py does not declare (declare them, or fix the name):\n" + \
        "\n".join(f"  {name}: {', '.join(places[:5])}" for name, places in sorted(missing.items()))


def test_every_declared_setting_is_used_somewhere():
    own = {ROOT / "utils" / "settings.py", DOCS, Path(__file__).resolve()}
    names = course_names([p for p in tracked_files() if p not in own])
    unused = [name for name in settings.SETTINGS if name not in names]
    assert not unused, f"declared in utils/settings.py but named nowhere else (remove them?): {unused}"


def test_the_scan_reports_an_undeclared_name(tmp_path):
    typo = "COURSE_" + "MAX_TURN"  # built here, so this file itself names no undeclared setting
    sample = tmp_path / "Makefile"
    sample.write_text(f"demo:\n\t{typo}=3 COURSE_MAX_TURNS=3 PERSONA_COURSE_CACHE=x python -m x\n"
                      "DEFAULT_COURSE_ROOT = 1  # the tail of another name\n"
                      "stamp = 'COURSE_CACHE_VERSION'  # not an environment variable\n")
    assert undeclared([sample]) == {typo: [f"{sample}:2"]}
    assert set(course_names([sample])) == {typo, "COURSE_MAX_TURNS", "PERSONA_COURSE_CACHE", "COURSE_CACHE_VERSION"}


# ----------------------------------------------------------------------------- misspellings

def test_a_misspelt_variable_names_the_nearest_setting(monkeypatch):
    typo = "COURSE_" + "MAX_TURN"
    monkeypatch.setenv(typo, "3")
    expected = f"{typo} is not a course setting; did you mean COURSE_MAX_TURNS? (python -m utils.settings lists them)"
    with pytest.raises(UnknownSettingError) as info:
        settings.get("COURSE_N_QUESTIONS")  # any read: the first read of a run checks the environment
    assert str(info.value) == expected
    with pytest.raises(UnknownSettingError, match=re.escape(expected)):
        settings.check_environment()
    monkeypatch.delenv(typo)
    settings.check_environment()


def test_misspellings_of_the_cache_and_unrelated_names(monkeypatch):
    cache_typo, far = "PERSONA_COURSE_" + "CACH", "COURSE_" + "ZZZ"
    monkeypatch.setenv(cache_typo, "/tmp/x")
    monkeypatch.setenv(far, "1")
    with pytest.raises(UnknownSettingError) as info:
        settings.check_environment()
    lines = str(info.value).splitlines()  # every unknown name, one line each
    assert lines == [f"{far} is not a course setting (python -m utils.settings lists them)",
                     f"{cache_typo} is not a course setting; did you mean PERSONA_COURSE_CACHE? "
                     "(python -m utils.settings lists them)"]


def test_reading_an_undeclared_name_is_an_error():
    with pytest.raises(UnknownSettingError, match="did you mean COURSE_MAX_TOKENS"):
        settings.get("COURSE_" + "MAX_TOKEN")


# ----------------------------------------------------------------------------- conversion

@pytest.mark.parametrize("name,raw,allowed", [
    ("COURSE_N_QUESTIONS", "lots", "an integer >= 1"),
    ("COURSE_N_QUESTIONS", "0", "an integer >= 1"),
    ("COURSE_N_QUESTIONS", "2.5", "an integer >= 1"),
    ("COURSE_MAX_TURNS", "1", "an integer >= 2"),
    ("COURSE_LAYER", "-1", "an integer >= 0"),
    ("COURSE_CHECK_TIMEOUT", "soon", "a number > 0"),
    ("COURSE_CHECK_TIMEOUT", "0", "a number > 0"),
    ("COURSE_CHECK_TIMEOUT", "nan", "a number > 0"),
    ("COURSE_CHECK_DEBUG", "maybe", "a yes/no value (1/true/yes/on/0/false/no/off)"),
    ("COURSE_DTYPE", "int8", "one of auto, bfloat16, bf16, float32, fp32, float16, fp16"),
    ("COURSE_TEST_CLASSROOM", "half", "one of full, minimal"),
    ("COURSE_PROFILE", "laptop", "one of offline, gpu, tests, grading"),
])
def test_a_bad_value_names_the_variable_the_value_and_what_is_allowed(monkeypatch, name, raw, allowed):
    monkeypatch.setenv(name, raw)
    with pytest.raises(SettingError) as info:
        settings.get(name, computed=0) if name == "COURSE_LAYER" else settings.get(name)
    message = str(info.value)
    assert message.startswith(f"{name}={raw!r} is not allowed: it must be {allowed}."), message
    assert settings.SETTINGS[name].help in message and "python -m utils.settings" in message


@pytest.mark.parametrize("name,raw,value", [
    ("COURSE_N_QUESTIONS", " 7 ", 7),
    ("COURSE_CHECK_TIMEOUT", "0.5", 0.5),
    ("COURSE_CHECK_DEBUG", "1", True),
    ("COURSE_CHECK_DEBUG", "TRUE", True),
    ("COURSE_CHECK_DEBUG", "0", False),
    ("COURSE_DTYPE", "BF16", "bf16"),
    ("COURSE_CASE_STUDIES", "llama-3.3-70b/jailbreak", "llama-3.3-70b/jailbreak"),
    ("COURSE_OUT_DIR", "~/course-out", Path.home() / "course-out"),
    ("COURSE_OUT_DIR", "out/mine", Path("out/mine")),
])
def test_values_convert_to_their_type(monkeypatch, name, raw, value):
    monkeypatch.setenv(name, raw)
    got = settings.get(name)
    assert got == value and type(got) is type(value)
    assert settings.is_set(name)


def test_an_empty_value_counts_as_unset(monkeypatch):
    monkeypatch.setenv("COURSE_PROFILE", "tests")
    monkeypatch.setenv("COURSE_N_QUESTIONS", "  ")
    assert settings.get("COURSE_N_QUESTIONS") == 3 and not settings.is_set("COURSE_N_QUESTIONS")


# ----------------------------------------------------------------------------- profiles and defaults

def test_the_profile_comes_from_course_profile_else_the_gpu(monkeypatch):
    monkeypatch.delenv("COURSE_PROFILE", raising=False)
    monkeypatch.delenv("COURSE_MAX_TURNS", raising=False)
    monkeypatch.delenv("COURSE_REPLAY_TURNS", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert settings.profile() == "gpu" and settings.get("COURSE_REPLAY_TURNS") == 10
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert settings.profile() == "offline" and settings.get("COURSE_REPLAY_TURNS") == 6
    monkeypatch.setenv("COURSE_PROFILE", "Grading")
    assert settings.profile() == "grading" == settings.get("COURSE_PROFILE")
    assert settings.get("COURSE_MAX_TURNS") == 2 and settings.get("COURSE_CHECK_TIMEOUT") == 20.0
    monkeypatch.setenv("COURSE_MAX_TURNS", "5")  # a value set wins over every profile
    assert settings.get("COURSE_MAX_TURNS") == 5


@pytest.mark.parametrize("profile,part1,part2", [("offline", 64, 48), ("gpu", 256, 256), ("tests", 12, 12)])
def test_a_default_can_differ_between_the_notebooks(monkeypatch, profile, part1, part2):
    monkeypatch.setenv("COURSE_PROFILE", profile)
    monkeypatch.delenv("COURSE_MAX_NEW_TOKENS", raising=False)
    assert settings.get("COURSE_MAX_NEW_TOKENS", part="part1") == part1
    assert settings.get("COURSE_MAX_NEW_TOKENS", part="part2") == part2


def test_paths_expand_repo_tmp_and_user(monkeypatch):
    for var in ("COURSE_OUT_DIR", "PERSONA_COURSE_CACHE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("COURSE_PROFILE", "offline")
    assert settings.get("COURSE_OUT_DIR") == ROOT / "out" / "part1"
    assert settings.get("PERSONA_COURSE_CACHE") == ROOT / ".cache"
    monkeypatch.setenv("COURSE_PROFILE", "grading")
    out = settings.get("COURSE_OUT_DIR")
    assert out.parent == Path(tempfile.gettempdir()) and out.name.startswith("persona-space-grading-")
    assert "{" not in str(out)


def test_computed_and_per_part_defaults_are_asked_for_and_only_there(monkeypatch):
    monkeypatch.setenv("COURSE_PROFILE", "offline")
    for var in ("COURSE_LAYER", "COURSE_MODEL", "COURSE_MAX_NEW_TOKENS", "COURSE_N_QUESTIONS"):
        monkeypatch.delenv(var, raising=False)
    assert settings.get("COURSE_LAYER", computed=7) == 7
    assert settings.get("COURSE_MODEL", computed="") == ""  # offline: choose_model works it out
    monkeypatch.setenv("COURSE_PROFILE", "tests")
    assert settings.get("COURSE_MODEL", computed="") == "tiny-gemma2"  # tests: declared
    monkeypatch.setenv("COURSE_LAYER", "3")
    assert settings.get("COURSE_LAYER", computed=7) == 3
    with pytest.raises(TypeError, match="COURSE_LAYER: pass computed="):
        settings.get("COURSE_LAYER")
    with pytest.raises(TypeError, match="COURSE_N_QUESTIONS has a declared default.*drop computed="):
        settings.get("COURSE_N_QUESTIONS", computed=15)
    with pytest.raises(TypeError, match="COURSE_MAX_NEW_TOKENS's default differs between the notebooks"):
        settings.get("COURSE_MAX_NEW_TOKENS")  # on every profile, not only where the parts differ
    with pytest.raises(TypeError, match="COURSE_N_QUESTIONS's default is the same in both notebooks"):
        settings.get("COURSE_N_QUESTIONS", part="part1")
    with pytest.raises(TypeError, match="differs by profile"):
        settings.default("COURSE_N_QUESTIONS")
    assert settings.default("COURSE_N_QUESTIONS", "grading") == 3


def test_choose_model_says_where_the_name_came_from(monkeypatch):
    from utils.models import choose_model

    monkeypatch.delenv("COURSE_MODEL", raising=False)
    monkeypatch.setenv("COURSE_PROFILE", "grading")
    choice = choose_model()
    assert choice.name == "tiny-gemma2" and "COURSE_PROFILE=grading" in choice.reason
    monkeypatch.setenv("COURSE_MODEL", "smollm2-135m-instruct")
    assert choose_model().reason == "$COURSE_MODEL is set to 'smollm2-135m-instruct'."


# ----------------------------------------------------------------------------- the tests and grading columns

def _declared(name: str, profile: str) -> set:
    """The declared default(s) of ``name`` on ``profile``: both notebooks' where they differ."""
    if settings.SETTINGS[name].has(settings.ByPart):
        return {settings.default(name, profile, part=part) for part in settings.PARTS}
    return {settings.default(name, profile)}


def test_the_tests_column_is_what_the_test_suite_sets():
    from tests.test_notebooks import TINY_ENV2

    assert TINY_ENV2["COURSE_PROFILE"] == "tests"
    for name, raw in TINY_ENV2.items():
        if name != "COURSE_PROFILE":
            assert _declared(name, "tests") == {settings.SETTINGS[name].convert(raw)}, \
                f"tests/test_notebooks.py sets {name}={raw}, utils/settings.py's tests column says otherwise"


def test_the_grading_column_is_what_nbgrader_config_sets():
    from traitlets.config import Config

    grading = runpy.run_path(str(ROOT / "nbgrader_config.py"), init_globals={"get_config": Config})
    env = {k: v for k, v in grading["GRADING_ENV_DEFAULTS"].items() if k.startswith(settings.PREFIXES)}
    assert env.pop("COURSE_PROFILE") == "grading"
    assert len(env) >= 10, env
    for name, raw in env.items():
        assert _declared(name, "grading") == {settings.SETTINGS[name].convert(raw)}, \
            f"nbgrader_config.py sets {name}={raw}, utils/settings.py's grading column says otherwise"


def test_declared_defaults_match_what_reads_them():
    from utils import models

    makefile = (ROOT / "Makefile").read_text()
    root = re.search(r"^COURSE_ROOT \?= (\S+)$", makefile, re.M)
    assert root and ROOT / root.group(1) == settings.default("COURSE_ROOT"), "the Makefile's COURSE_ROOT default"
    assert set(settings.SETTINGS["COURSE_DTYPE"].choices) == set(models.DTYPES) | {"auto"}


# ----------------------------------------------------------------------------- the table

def _run(*args: str, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if not k.startswith(settings.PREFIXES)} | env
    return subprocess.run([sys.executable, "-m", "utils.settings", *args], cwd=ROOT, env=environ,
                          capture_output=True, text=True, timeout=60)


def test_the_printed_table_lists_every_setting():
    result = _run()
    assert result.returncode == 0, result.stderr
    assert result.stdout == settings.table()
    lines = result.stdout.splitlines()
    assert lines[0] == "| Variable | Type | offline | gpu | tests | grading | What it does |"
    rows = {line.split(" | ")[0].strip("| `"): line for line in lines[2:]}
    assert list(rows) == list(settings.SETTINGS)
    assert "| `COURSE_MAX_TURNS` | int ≥ 2 | `1000` | *as offline* | `2` | `2` |" in rows["COURSE_MAX_TURNS"]
    assert "`64` (Part 1), `48` (Part 2) | `256` |" in rows["COURSE_MAX_NEW_TOKENS"]
    assert "| `60` | *as offline* | *as offline* | `20` |" in rows["COURSE_CHECK_TIMEOUT"]


def test_listing_works_with_a_misspelt_variable_and_check_reports_it():
    typo = "COURSE_" + "N_QUESTION"
    assert _run(**{typo: "3"}).returncode == 0  # the error message sends people here
    result = _run("--check", **{typo: "3"})
    assert result.returncode == 1 and "did you mean COURSE_N_QUESTIONS?" in result.stderr
    result = _run("--check", COURSE_N_QUESTIONS="3")
    assert result.returncode == 0 and result.stdout == "COURSE_N_QUESTIONS=3\n"
    result = _run("--check", COURSE_N_QUESTIONS="three")
    assert result.returncode == 1 and "COURSE_N_QUESTIONS='three' is not allowed" in result.stderr


def test_docs_settings_md_is_the_current_table():
    assert DOCS.exists(), "docs/settings.md is missing: run `python -m utils.settings --markdown > docs/settings.md`"
    text = DOCS.read_text()
    assert "Generated by python -m utils.settings --markdown; do not edit" in text
    assert text == settings.markdown(), \
        "docs/settings.md differs from utils/settings.py: run `python -m utils.settings --markdown > docs/settings.md`"
