"""moeprune.loading.ModelSource: one typed value for "the model", resolved before anything loads."""

from __future__ import annotations

import pytest

from moeprune.bundled import bundled_model_path
from moeprune.errors import MoePruneError
from moeprune.loading import ModelSource
from moeprune.presets import BUNDLED, PAPER


def test_bundled_source_knows_its_preset_config_and_limits_before_loading():
    source = ModelSource.of("bundled")
    assert source.name == str(bundled_model_path())
    assert source.preset.name == BUNDLED
    assert source.local_dir is not None and source.is_loaded is False
    assert source.max_positions == source.config.max_position_embeddings
    assert source.quantization is None
    assert source.placement() == "memory"


def test_a_loaded_bundled_model_keeps_the_bundled_preset():
    source = ModelSource.of("bundled", device="cpu")
    model = source.load()
    loaded = source.with_model(model)
    assert loaded.is_loaded and loaded.preset.name == BUNDLED
    assert loaded.config_hash == source.config_hash


def test_other_models_get_the_paper_preset(tmp_path):
    assert ModelSource.of(str(tmp_path)).preset.name == PAPER


def test_of_keeps_a_source_and_overrides_only_what_is_given():
    source = ModelSource.of("bundled", device="cpu", stream=True)
    assert ModelSource.of(source) is source
    again = ModelSource.of(source, dtype="float32", device=None)
    assert (again.device, again.dtype, again.stream) == ("cpu", "float32", True)
    assert again.placement() == "stream"


@pytest.mark.parametrize("bad", ["", 3, ["bundled"]])
def test_bad_models_are_one_line_errors(bad):
    with pytest.raises(MoePruneError, match="model must be"):
        ModelSource.of(bad)
