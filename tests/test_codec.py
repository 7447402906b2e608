"""The codec technique sets the recipe's export codec; the artifact bytes are that codec's real output."""

from __future__ import annotations

import hashlib

import pytest

from pgolf.artifact import BODY_OFFSET, FILE_MAGIC, int8_matrices
from pgolf.codecs import CODEC_IDS, DEFAULT_LEVELS, GROUP_ROLES, compress, decompress, group_matrices
from pgolf.errors import ConfigError
from pgolf.host import Session
from pgolf.recipe import ExportConfig
from pgolf.reporter import Reporter
from pgolf_plugins.codec import LEVEL_RANGES, CodecConfig, configure_export
from tests.micro_training import export_with, stored_tensors, train_micro

QUIET = Reporter(quiet=True)


def test_configure_writes_the_export_section():
    export = ExportConfig()
    configure_export(export, CodecConfig())
    assert (export.codec, export.level, export.byte_shuffle) == ("brotli", 11, 2)
    configure_export(export, CodecConfig(codec="lzma", level=6, byte_shuffle=0))
    assert (export.codec, export.level, export.byte_shuffle) == ("lzma", 6, 0)


def test_none_is_the_hosts_strongest_level():
    """The plugin's own ranges end at the level the host runs for `level: None`."""
    assert {codec: high for codec, (_, high) in LEVEL_RANGES.items()} == DEFAULT_LEVELS


def test_settings_equal_to_the_recipe_leave_it_untouched():
    export = ExportConfig()  # zlib, level None (= 9), no shuffle
    configure_export(export, CodecConfig(codec="zlib", level=9, byte_shuffle=0))
    assert (export.codec, export.level, export.byte_shuffle) == ("zlib", None, 0)


@pytest.mark.parametrize(("params", "acts"), [({}, True), ({"codec": "zlib", "byte_shuffle": 0}, False),
                                              ({"codec": "zlib", "level": 9, "byte_shuffle": 0}, False),
                                              ({"codec": "zlib", "level": 6, "byte_shuffle": 0}, True)])
def test_a_codec_that_changes_nothing_does_not_count_as_acting(micro_recipe, params, acts):
    """The baseline exports zlib-9 unshuffled: asking for that again is a no-op the run reports as silent."""
    session = Session(micro_recipe(techniques={"codec": params}), reporter=QUIET)
    assert ("codec" in session.trace.configured) == acts


@pytest.fixture(scope="module")
def trained():
    return train_micro()


@pytest.mark.parametrize(("codec", "shuffle"), [("lzma", 0), ("brotli", 2), ("zlib", 2)])
def test_artifact_is_the_real_codec_output(micro_recipe, trained, codec, shuffle):
    _, exported = export_with(micro_recipe(techniques={"codec": {"codec": codec, "byte_shuffle": shuffle}}), trained)
    blob = exported.blob
    assert blob[:4] == FILE_MAGIC and blob[4] == CODEC_IDS[codec] and blob[5] == shuffle
    payload = decompress(blob[BODY_OFFSET:], codec, shuffle)  # after the payload's SHA-256
    assert blob[BODY_OFFSET:] == compress(payload, codec, None, shuffle)  # recompressing reproduces the stored bytes
    assert blob[6:BODY_OFFSET] == hashlib.sha256(payload).digest()
    assert exported.info["bytes_model"] == len(blob) and exported.info["codec"] == codec


def test_level_out_of_range_is_a_config_error(micro_recipe):
    with pytest.raises(ConfigError, match="level 12 is out of range for zlib"):
        Session(micro_recipe(techniques={"codec": {"codec": "zlib", "level": 12}}), reporter=QUIET)


def test_brotli_with_shuffle_beats_the_baseline_zlib_on_int6_codes(micro_recipe, trained):
    techniques = {"sandwich_quant": {"outer_layers": 0, "middle_bits": 6, "embed_bits": 6}, "sdclip": {}}
    _, plain = export_with(micro_recipe(techniques=techniques), trained)
    _, packed = export_with(micro_recipe(techniques={**techniques, "codec": {}}), trained)
    assert packed.info["bytes_model"] < plain.info["bytes_model"]
    assert stored_tensors(packed.blob) == stored_tensors(plain.blob)  # lossless: the same weights either way


def test_pergroup_stores_the_same_weights_as_brotli(micro_recipe, trained):
    """The micro model's int8 matrices go through role groups and come back unchanged."""
    _, plain = export_with(micro_recipe(techniques={"codec": {}}), trained)
    _, grouped = export_with(micro_recipe(techniques={"codec": {"codec": "pergroup", "coder": "brotli"}}), trained)
    assert grouped.blob[4] == CODEC_IDS["pergroup"] and grouped.info["codec"] == "pergroup"
    payload = decompress(grouped.blob[BODY_OFFSET:], "pergroup", 2)
    groups = group_matrices(int8_matrices(payload), "roles")
    assert [role for role, _ in groups] == list(GROUP_ROLES)  # every role is int8 at micro size
    assert stored_tensors(grouped.blob) == stored_tensors(plain.blob)
