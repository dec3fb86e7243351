"""The `emdloss` command as a new user meets it: a mistake is one line on stderr and exit status 2 (the traceback
only under --debug), help texts show defaults, results follow the umask, progress bars end their line, and worker
counts fit the machine. Every test here runs in seconds and none needs the shared data folder."""

from __future__ import annotations

import argparse
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from emdloss_lab import data
from emdloss_lab.cli import main
from emdloss_lab.errors import UsageError
from emdloss_lab.experiments import imagenet, runner
from emdloss_lab.experiments.runner import CHECKPOINT_NAME, CheckpointError

SMOKE = ["--smoke", "--seeds", "1", "--no-progress"]


def _one_error_line(capsys) -> str:
    """The single stderr line of a refused command (and nothing on stdout)."""
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("emdloss: error: ") and "Traceback" not in captured.err
    return lines[0]


def _fake_checkpoint(out: Path, config: dict | None = None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    config = config or {"experiment": "ordinal", "seeds": 7}
    (out / CHECKPOINT_NAME).write_text(
        json.dumps({"config_hash": runner.config_hash(config), "config": config, "done": {}, "time": 0.0})
    )


@pytest.fixture
def umask():
    """Set the process umask for one test and restore it afterwards."""
    old = os.umask(0o022)
    os.umask(old)
    yield lambda mask: os.umask(mask)
    os.umask(old)


# ---------------------------------------------------------------------- each mistake: one line, status 2


def test_existing_out_without_resume(tmp_path, capsys) -> None:
    out = tmp_path / "run"
    _fake_checkpoint(out)
    assert main(["experiment", "ordinal", "--out", str(out), *SMOKE]) == 2
    line = _one_error_line(capsys)
    assert "--resume" in line and "another --out" in line and str(out) in line


def test_resume_with_changed_options_names_what_changed(tmp_path, capsys) -> None:
    out = tmp_path / "run"
    _fake_checkpoint(out)  # a checkpoint of another configuration (seeds 7)
    assert main(["experiment", "ordinal", "--out", str(out), *SMOKE, "--resume"]) == 2
    line = _one_error_line(capsys)
    assert "different configuration" in line and "seeds 7 -> 1" in line


def test_corrupt_checkpoint(tmp_path, capsys) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / CHECKPOINT_NAME).write_text("{ not json")
    assert main(["experiment", "convergence", "--out", str(out), *SMOKE, "--resume"]) == 2
    assert "corrupt" in _one_error_line(capsys)


def test_out_that_is_a_file(tmp_path, capsys) -> None:
    (tmp_path / "file").write_text("")
    assert main(["experiment", "hierarchy", "--out", str(tmp_path / "file"), *SMOKE]) == 2
    assert "is a file, not a folder" in _one_error_line(capsys)


def test_data_folder_named_by_the_variable_is_missing(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("EMDLOSS_DATA", str(tmp_path / "nowhere"))
    assert main(["experiment", "ordinal", "--out", str(tmp_path / "run"), *SMOKE]) == 2
    line = _one_error_line(capsys)
    assert "EMDLOSS_DATA" in line and "PROVENANCE.md" in line and "ordinal/" in line


def test_data_folder_not_found_says_where_data_comes_from(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.delenv("EMDLOSS_DATA", raising=False)
    monkeypatch.chdir(tmp_path)  # no shared/data above the current folder ...
    monkeypatch.setattr(data, "__file__", str(tmp_path / "pkg" / "data.py"))  # ... nor above the package
    assert main(["experiment", "convergence", "--out", str(tmp_path / "run"), *SMOKE]) == 2
    line = _one_error_line(capsys)
    assert "not found" in line and "EMDLOSS_DATA" in line and "shared/data" in line and "demo" in line


def test_data_file_missing_in_the_folder(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("EMDLOSS_DATA", str(tmp_path))  # exists, but holds nothing
    assert main(["experiment", "ordinal", "--out", str(tmp_path / "run"), *SMOKE]) == 2
    line = _one_error_line(capsys)
    assert "shared data file missing" in line and "EMDLOSS_DATA" in line and "no PROVENANCE.md" in line


def test_train_imagenet_root_that_does_not_exist(tmp_path, capsys) -> None:
    assert (
        main(["train-imagenet", "--root", str(tmp_path / "nothing"), "--out", str(tmp_path / "o"), "--no-progress"])
        == 2
    )
    line = _one_error_line(capsys)
    assert "--root" in line and "train/<wnid>/" in line and not (tmp_path / "o").exists()


def test_train_imagenet_root_without_train_folder(tmp_path, capsys) -> None:
    assert main(["train-imagenet", "--root", str(tmp_path), "--no-progress"]) == 2
    assert "has no train/ folder" in _one_error_line(capsys)


def test_train_imagenet_device_that_is_not_there(tmp_path, capsys) -> None:
    (tmp_path / "train" / "n01").mkdir(parents=True)
    assert main(["train-imagenet", "--root", str(tmp_path), "--device", "nonsense", "--no-progress"]) == 2
    assert "--device" in _one_error_line(capsys)


def test_debug_shows_the_traceback(tmp_path) -> None:
    for argv in (
        ["--debug", "train-imagenet", "--root", str(tmp_path / "x")],
        ["train-imagenet", "--root", str(tmp_path / "x"), "--debug"],
    ):
        with pytest.raises(UsageError, match="--root"):
            main(argv)
    out = tmp_path / "run"
    _fake_checkpoint(out)
    with pytest.raises(CheckpointError, match="--resume"):
        main(["--debug", "experiment", "ordinal", "--out", str(out), *SMOKE])


def test_genuine_bugs_keep_their_traceback(monkeypatch) -> None:
    from emdloss_lab.experiments import demo

    def broken(args):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(demo, "run", broken)
    with pytest.raises(ZeroDivisionError):
        main(["demo"])


def test_error_class_hierarchy() -> None:
    assert issubclass(CheckpointError, UsageError) and issubclass(CheckpointError, RuntimeError)
    assert issubclass(data.DataUnavailable, UsageError) and issubclass(data.DataUnavailable, FileNotFoundError)


def test_end_to_end_one_line_and_status_2(tmp_path) -> None:
    """As typed in a shell: `python -m emdloss ...` into a folder holding another run."""
    out = tmp_path / "run"
    _fake_checkpoint(out)
    done = subprocess.run(
        [sys.executable, "-m", "emdloss", "experiment", "ordinal", "--out", str(out), *SMOKE],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("emdloss: error: --out "), done.stderr
    assert done.stdout == ""


# ---------------------------------------------------------------------- help texts


def _help(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--help"])
    assert exc.value.code == 0
    return capsys.readouterr().out


def test_top_level_help_is_for_users(capsys) -> None:
    text = _help([], capsys)
    for word in (
        "demo",
        "bench",
        "experiment",
        "train-imagenet",
        "--debug",
        "examples:",
        "EMDLOSS_DATA",
        "PROVENANCE.md",
    ):
        assert word in text
    for developer_word in ("add_arguments", "``", "module"):
        assert developer_word not in text


def test_train_imagenet_help_shows_defaults(capsys) -> None:
    text = " ".join(_help(["train-imagenet"], capsys).split())
    for shown in (
        "(default: 90)",
        "(default: 256)",
        "(default: resnet18)",
        "(default: ce)",
        "(default: 0.1)",
        "(default: 224)",
        "(default: bf16)",
        "(default: imagenet-run)",
        f"default: {imagenet.default_workers()}, the CPUs available here",
    ):
        assert shown in text, shown


@pytest.mark.parametrize("argv", [["demo"], ["bench"], ["experiment", "ordinal"], ["experiment", "sinkhorn"]])
def test_every_command_help_shows_defaults(argv, capsys) -> None:
    text = _help(argv, capsys)
    assert "default" in text and "--debug" in text


def test_command_missing_prints_that_level_of_help(capsys) -> None:
    assert main(["experiment"]) == 2
    err = capsys.readouterr().err
    assert "usage: emdloss experiment" in err and "convergence" in err


def test_bad_option_values_are_usage_errors(capsys) -> None:
    for argv in (
        ["demo", "--seeds", "0"],
        ["train-imagenet", "--root", ".", "--workers", "-1"],
        ["experiment", "ordinal", "--out", "x", "--seeds", "zero"],
        ["experiment", "hierarchy", "--out", "x", "--workers", "0"],
    ):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
    assert "must be >= 1" in capsys.readouterr().err


# ---------------------------------------------------------------------- files follow the umask


@pytest.mark.parametrize("mask,mode", [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_result_files_follow_the_umask(tmp_path, umask, mask, mode) -> None:
    umask(mask)
    runner.write_text(tmp_path / "a.md", "x")
    runner.write_json(tmp_path / "b.json", {"x": 1})
    runner.torch_save({"w": torch.zeros(2)}, tmp_path / "c.pt")
    plt = runner.pyplot()
    runner.save_figure(plt.figure(), tmp_path / "d.png")
    runner.Checkpoint(tmp_path, {"k": 1})["unit"] = 1.0
    files = sorted(tmp_path.iterdir())
    assert [p.name for p in files] == ["a.md", "b.json", "c.pt", CHECKPOINT_NAME, "d.png"]  # no temporary left
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in files} == {p.name: mode for p in files}


def test_demo_results_are_readable_by_others(tmp_path, umask, capsys) -> None:
    pytest.importorskip("sklearn")
    umask(0o022)
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--seeds", "1", "--steps", "3", "--no-progress"]) == 0
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert set(modes) == {"report.md", "results.json", "demo.png"} and set(modes.values()) == {0o644}
    printed = capsys.readouterr().out
    assert f"writing to {out.resolve()}{os.sep}" in printed.splitlines()[0]
    assert printed.rstrip().splitlines()[-1].startswith(f"wrote report.md, results.json and demo.png to {out}")


# ---------------------------------------------------------------------- progress bars and worker counts


def test_progress_bar_ends_its_line_in_a_log(capsys) -> None:
    pytest.importorskip("tqdm")
    assert list(runner.progress(range(3), "work")) == [0, 1, 2]
    err = capsys.readouterr().err  # captured: not a terminal, as in a log file
    assert "work" in err and err.endswith("\n")


def test_interrupted_progress_bar_is_closed_before_the_message(tmp_path, capsys) -> None:
    pytest.importorskip("tqdm")

    def fail_midway(args: argparse.Namespace) -> int:
        for i in runner.progress(range(10), "work"):
            if i == 3:
                raise UsageError("stopped")
        return 0

    import emdloss_lab.experiments.demo as demo

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(demo, "run", fail_midway)
        assert main(["demo"]) == 2
    err = capsys.readouterr().err
    assert "\nemdloss: error: stopped\n" in err or err.startswith("emdloss: error: stopped")


def test_default_workers_fit_the_machine(monkeypatch) -> None:
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert imagenet.available_cpus() == 2 and imagenet.default_workers() == 2
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two training processes share the CPUs
    assert imagenet.default_workers() == 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert imagenet.default_workers() == 8  # capped


def test_config_changes_lists_what_differs() -> None:
    assert runner.config_changes({"a": 1, "b": [1, 2]}, {"a": 2, "b": [1, 2], "c": "x"}) == 'a 1 -> 2, c (unset) -> "x"'
    assert runner.config_changes(None, {"a": 1}) == ""


def test_ctrl_c_is_one_line_with_what_to_do(monkeypatch, capsys) -> None:
    from emdloss_lab.experiments import ordinal

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(ordinal, "run", interrupted)
    assert main(["experiment", "ordinal", "--out", "unused", *SMOKE]) == 130
    assert capsys.readouterr().err == "emdloss: interrupted; run the same command with --resume to continue\n"
