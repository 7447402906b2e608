"""Recipes: the baseline's values, inheritance, scale overlays, overrides, and every error."""

from __future__ import annotations

import pytest

from pgolf.errors import ConfigError
from pgolf.recipe import load_recipe
from tests.conftest import REPO

BASELINE = REPO / "recipes" / "baseline.yaml"


def test_baseline_is_the_challenge_baseline():
    r = load_recipe(BASELINE)
    m, t, o, e = r.model, r.train, r.optim, r.export
    assert (m.num_layers, m.model_dim, m.num_heads, m.num_kv_heads, m.mlp_mult, m.vocab_size) == (9, 512, 8, 4, 2, 1024)
    assert m.tie_embeddings and m.activation == "relu2"
    assert (m.logit_softcap, m.rope_base, m.qk_gain_init, m.tied_embed_init_std) == (30.0, 10000.0, 1.5, 0.005)
    assert (t.seq_len, t.batch_tokens, t.warmup_steps, t.warmdown_iters, t.max_wallclock_seconds) == (
        1024, 524_288, 20, 1200, 600.0)
    assert (o.matrix_lr, o.scalar_lr, o.tied_embed_lr, o.muon_momentum) == (0.04, 0.04, 0.05, 0.95)
    assert (o.muon_momentum_warmup_start, o.muon_momentum_warmup_steps, o.beta1, o.beta2) == (0.85, 500, 0.9, 0.95)
    assert (e.codec, e.level, e.clip_percentile, e.keep_float_max_numel) == ("zlib", 9, 99.99984, 65_536)
    assert e.budget_bytes == 16_000_000 and r.techniques == {}


def test_every_shipped_recipe_loads_at_both_scales():
    from pgolf.registry import resolve

    for path in sorted((REPO / "recipes").glob("*.yaml")):
        for scale in (None, "tiny"):
            r = load_recipe(path, scale=scale)
            resolve(r.techniques, r.provenance)


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_base_inheritance_and_deep_merge(tmp_path):
    parent = write(tmp_path, "parent.yaml", "model:\n  num_layers: 7\n  model_dim: 256\ntrain:\n  seq_len: 128\n")
    child = write(tmp_path, "child.yaml", f"base: {parent.name}\nmodel:\n  num_layers: 5\n")
    r = load_recipe(child)
    assert (r.model.num_layers, r.model.model_dim, r.train.seq_len) == (5, 256, 128)
    assert r.name == "child"


def test_base_resolves_from_the_recipes_directory(tmp_path):
    child = write(tmp_path, "mine.yaml", "base: baseline.yaml\ntrain:\n  seq_len: 512\n")
    r = load_recipe(child)
    assert r.train.seq_len == 512 and r.model.num_layers == 9


def test_overrides_are_typed_and_win(tmp_path):
    r = load_recipe(BASELINE, ["train.seq_len=256", "model.tie_embeddings=false", "optim.matrix_lr=0.02",
                               "techniques.demo={\"x\": 1}", "seed=7"])
    assert r.train.seq_len == 256 and r.model.tie_embeddings is False and r.optim.matrix_lr == 0.02
    assert r.techniques == {"demo": {"x": 1}} and r.seed == 7


def test_integer_is_accepted_for_a_float_field():
    assert load_recipe(BASELINE, ["model.logit_softcap=20"]).model.logit_softcap == 20.0


def test_a_technique_set_to_false_is_removed(tmp_path):
    parent = write(tmp_path, "p.yaml", "techniques:\n  a: {}\n  b: {x: 1}\n")
    child = write(tmp_path, "c.yaml", "base: p.yaml\ntechniques:\n  a: false\n")
    assert load_recipe(child).techniques == {"b": {"x": 1}}
    assert load_recipe(parent, ["techniques.b=false"]).techniques == {"a": {}}


def test_tiny_scale_overlay_and_technique_adjustments(tmp_path):
    r = load_recipe(BASELINE, scale="tiny")
    assert r.scale == "tiny" and r.model.num_layers == 4 and r.model.model_dim == 256
    assert r.train.max_wallclock_seconds == 90 and r.data.dir is None
    # an overlay's technique entries never enable a technique the recipe does not name
    assert r.techniques == {}


def test_cli_flags_win_over_the_scale():
    r = load_recipe(BASELINE, ["train.max_wallclock_seconds=5"], scale="tiny")
    assert r.train.max_wallclock_seconds == 5


# --- errors: file, line, key, expectation, suggestion -------------------------------------------


def test_missing_recipe_suggests_the_nearest_file(tmp_path):
    write(tmp_path, "baseline.yaml", "{}\n")
    with pytest.raises(ConfigError) as info:
        load_recipe(tmp_path / "baselin.yaml")
    text = str(info.value)
    assert "recipe file not found" in text and "Did you mean 'baseline.yaml'?" in text


def test_malformed_yaml_names_file_and_line(tmp_path):
    path = write(tmp_path, "bad.yaml", "model:\n  num_layers: 3\n   model_dim: 4\n")
    with pytest.raises(ConfigError) as info:
        load_recipe(path)
    assert "bad.yaml, line 3" in str(info.value) and "malformed YAML" in str(info.value)


def test_unknown_key_names_line_and_suggests(tmp_path):
    path = write(tmp_path, "r.yaml", "model:\n  num_layers: 3\n  modle_dim: 4\n")
    with pytest.raises(ConfigError) as info:
        load_recipe(path)
    text = str(info.value)
    assert "r.yaml, line 3" in text and "key 'model.modle_dim'" in text and "Did you mean 'model_dim'?" in text


def test_unknown_top_level_key(tmp_path):
    path = write(tmp_path, "r.yaml", "name: x\ntrian:\n  seq_len: 4\n")
    with pytest.raises(ConfigError, match=r"line 2.*unknown top-level key 'trian'.*Did you mean 'train'"):
        load_recipe(path)


def test_wrong_type_names_line_and_expectation(tmp_path):
    path = write(tmp_path, "r.yaml", "train:\n  seq_len: long\n")
    with pytest.raises(ConfigError, match=r"r.yaml, line 2, key 'train.seq_len': expected an integer, got 'long'"):
        load_recipe(path)


def test_literal_choices_are_suggested():
    with pytest.raises(ConfigError, match=r"expected 'zlib' or 'lzma' or 'brotli' or 'pergroup', got 'brotly'.*Did you mean 'brotli'"):
        load_recipe(BASELINE, ["export.codec=brotly"])


def test_semantic_validation_names_the_key():
    with pytest.raises(ConfigError, match=r"key 'model.num_heads'.*not divisible"):
        load_recipe(BASELINE, ["model.num_heads=7"])


def test_override_errors():
    with pytest.raises(ConfigError, match="not of the form key.path=value"):
        load_recipe(BASELINE, ["train.seq_len"])
    with pytest.raises(ConfigError, match=r"unknown section 'trian'.*Did you mean 'train'"):
        load_recipe(BASELINE, ["trian.seq_len=3"])
    with pytest.raises(ConfigError, match=r"--set.*key 'train.seq_lne'.*Did you mean 'seq_len'"):
        load_recipe(BASELINE, ["train.seq_lne=3"])


def test_base_cycle_and_missing_base(tmp_path):
    write(tmp_path, "a.yaml", "base: b.yaml\n")
    write(tmp_path, "b.yaml", "base: a.yaml\n")
    with pytest.raises(ConfigError, match="inheritance cycle: a.yaml -> b.yaml -> a.yaml"):
        load_recipe(tmp_path / "a.yaml")
    write(tmp_path, "c.yaml", "base: nothere.yaml\n")
    with pytest.raises(ConfigError, match=r"c.yaml, line 1, key 'base': base recipe 'nothere.yaml' not found"):
        load_recipe(tmp_path / "c.yaml")


def test_unknown_scale_suggests():
    with pytest.raises(ConfigError, match=r"unknown scale 'tine'.*Did you mean 'tiny'"):
        load_recipe(BASELINE, scale="tine")


def test_technique_params_must_be_a_mapping(tmp_path):
    path = write(tmp_path, "r.yaml", "techniques:\n  ema: 3\n")
    with pytest.raises(ConfigError, match=r"line 2, key 'techniques.ema': expected a mapping"):
        load_recipe(path)


def test_exponent_notation_is_a_number():
    assert load_recipe(BASELINE, ["optim.matrix_lr=1e-3"]).optim.matrix_lr == 0.001
    with pytest.raises(ConfigError, match="expected a number, got 'fast'"):
        load_recipe(BASELINE, ["optim.matrix_lr=fast"])


# --- every problem at once -----------------------------------------------------------------------

FOUR_MISTAKES = """\
name: four
model:
  num_layrs: 3
train:
  iterations: many
techniques:
  sliding_windo: {}
  ema:
    decay: x
"""


def four_expected(path):
    return [
        (f"{path}, line 3, key 'model.num_layrs': unknown key 'num_layrs'", "Did you mean 'num_layers'?"),
        (f"{path}, line 5, key 'train.iterations': expected an integer, got 'many'", None),
        (f"{path}, line 7, key 'techniques.sliding_windo': unknown technique 'sliding_windo'",
         "Did you mean 'sliding_window'?"),
        (f"{path}, line 9, key 'techniques.ema.decay': expected a number, got 'x'", None),
    ]


def test_every_mistake_is_reported_in_one_error(tmp_path):
    from pgolf.errors import ConfigErrors
    from pgolf.registry import technique_problems

    path = write(tmp_path, "four.yaml", FOUR_MISTAKES).resolve()
    with pytest.raises(ConfigErrors) as info:
        load_recipe(path, technique_check=technique_problems)  # as `pgolf run` loads it
    err = info.value
    assert isinstance(err, ConfigError) and len(err.errors) == 4
    lines = str(err).splitlines()
    assert lines[0] == "4 problems found:" and len(lines) == 5
    for (where, hint), line in zip(four_expected(path), lines[1:], strict=True):
        assert where in line and (hint is None or hint in line)


def test_a_single_mistake_renders_as_before(tmp_path):
    path = write(tmp_path, "r.yaml", "train:\n  seq_len: long\n")
    with pytest.raises(ConfigError) as info:
        load_recipe(path)
    assert type(info.value) is ConfigError
    assert str(info.value) == f"{path.resolve()}, line 2, key 'train.seq_len': expected an integer, got 'long'"


def test_validation_problems_and_unknown_top_level_keys_are_all_collected(tmp_path):
    path = write(tmp_path, "r.yaml", "trian: {}\nmodel:\n  logit_softcap: -1\n  vocab_size: 70000\n")
    with pytest.raises(ConfigError) as info:
        load_recipe(path, ["optim.matrix_lr=fast"])
    text = str(info.value)
    assert text.startswith("4 problems found:")
    for part in ("line 1, key 'trian': unknown top-level key 'trian'. Did you mean 'train'?",
                 "key 'model.logit_softcap': logit_softcap must be positive",
                 "key 'model.vocab_size'", "key 'optim.matrix_lr': expected a number, got 'fast'"):
        assert part in text


def test_cli_run_prints_every_mistake_without_a_traceback(tmp_path):
    from typer.testing import CliRunner

    from pgolf.cli import app

    path = write(tmp_path, "four.yaml", FOUR_MISTAKES).resolve()
    result = CliRunner().invoke(app, ["run", str(path), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and "Traceback" not in result.stderr
    assert "error: 4 problems found:" in result.stderr
    for where, hint in four_expected(path):
        assert where in result.stderr and (hint is None or hint in result.stderr)
    assert not (tmp_path / "run").exists()  # nothing ran


def test_a_bare_on_or_off_is_the_setting_yaml_would_read_as_a_boolean(tmp_path):
    path = write(tmp_path, "r.yaml", "base: " + str(BASELINE) + "\ntrain:\n  compile: off\n")
    assert load_recipe(path).train.compile == "off"
    assert load_recipe(BASELINE, ["train.compile=on"]).train.compile == "on"
