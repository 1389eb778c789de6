"""Log lines such as apply's verification result reach the user; --quiet silences them, --verbose adds more."""

from __future__ import annotations

import pytest

from moeprune.cli import build_parser, main
from tests.surgery import make_mask
from tests.tiny_models import build_model


@pytest.fixture(scope="module")
def mask_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("mask") / "mask.json"
    make_mask(build_model("qwen3_moe")).save(path)
    return path


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    path = tmp_path_factory.mktemp("src") / "qwen3"
    build_model("qwen3_moe").save_pretrained(path)
    return path


@pytest.mark.parametrize(("flag", "shown"), [(None, True), ("--quiet", False), ("-v", True)])
def test_verification_result_reaches_the_user_unless_quiet(flag, shown, source, mask_file, tmp_path, capsys):
    argv = ["apply", str(source), str(mask_file), "--out", str(tmp_path / "out")] + ([flag] if flag else [])
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert ("moeprune: Verified: reloaded logits match" in err) is shown
    assert ("moeprune: Loading" in err) is shown  # where the model was placed, e.g. "on cpu"


def test_quiet_and_verbose_exclude_each_other(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["inspect", "x", "--quiet", "--verbose"])
    assert "not allowed with argument" in capsys.readouterr().err


@pytest.fixture(autouse=True)
def restore_library_bars():
    """--quiet turns transformers' and datasets' bars off process-wide (the CLI's process); turn them back on."""
    yield
    import datasets
    import transformers

    transformers.utils.logging.enable_progress_bar()
    datasets.enable_progress_bars()


@pytest.mark.parametrize(("flag", "shown"), [(None, True), ("--quiet", False)])
def test_progress_bars_show_unless_quiet(flag, shown, source, mask_file, tmp_path, capsys):
    argv = ["apply", str(source), str(mask_file), "--out", str(tmp_path / "out")] + ([flag] if flag else [])
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert ("apply: done" in err) is shown  # moeprune's own bar
    assert ("Loading weights" in err) is shown  # transformers' bar
