"""Casefold / CaseOps: the transform and its inverse, the byte sidecar on the official tokenizer,
the dataset builder, the CLI, and whole runs whose BPB is charged on the original bytes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import sentencepiece as spm
from hypothesis import given, settings
from hypothesis import strategies as st

from pgolf.data import shards
from pgolf.data.bpb import build_byte_tables, stream_bytes
from pgolf.data.corpus import embedded_documents, is_validation_document
from pgolf.data.dataset import ensure_embedded_dataset, load_dataset
from pgolf.data.textdata import build_dataset, read_manifest
from pgolf.data.tokenizer import BOS_ID, text_normalizer
from pgolf.errors import ConfigError, DataError
from pgolf.host import Session, run
from pgolf.registry import transform_by_name
from pgolf.reporter import Reporter
from pgolf_plugins.casefold import (
    ALLCAPS,
    CAPNEXT,
    ESC,
    OPERATORS,
    TITLE,
    CaseOpsError,
    CaseOpsTransform,
    LowercaseTransform,
    decode,
    encode,
    original_char_bytes,
    piece_surfaces,
    shard_problems,
)
from tests.conftest import official_tokenizer
from tests.test_cli import pgolf

CASEOPS_MODEL = "fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model"
EXAMPLE = "The NASA Launch of iPhone OpenAI"
QUIET = Reporter(quiet=True)

# Letters of every kind the transform must carry through: ASCII of both cases, the operators
# themselves, non-ASCII letters (some with case), combining marks, CJK, whitespace, digits.
TRICKY = list("aAbBzZ \n\t0.,'-") + list(OPERATORS) + list("ßÉéÜİıﬁＡ日本\u0301\u030c\u3000")
texts = st.lists(st.one_of(st.sampled_from(TRICKY), st.characters(exclude_categories=("Cs",))), max_size=60).map("".join)
any_unicode = st.text(st.characters(exclude_categories=()), max_size=60)  # lone surrogates too


def caseops_sp() -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=str(official_tokenizer(CASEOPS_MODEL)))


# --- the transform ------------------------------------------------------------------------


@settings(max_examples=600, deadline=None)
@given(texts)
def test_decode_inverts_encode(text):
    encoded = encode(text)
    assert decode(encoded) == text
    assert not any("A" <= c <= "Z" for c in encoded), "no ASCII capital survives the transform"


@settings(max_examples=300, deadline=None)
@given(any_unicode)
def test_decode_inverts_encode_on_any_code_points(text):
    assert decode(encode(text)) == text


@settings(max_examples=300, deadline=None)
@given(texts)
def test_operators_cost_nothing_and_everything_else_its_original_bytes(text):
    assert int(original_char_bytes(encode(text)).sum()) == len(text.encode("utf-8"))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The NASA Launch", f"{TITLE}the {ALLCAPS}nasa {TITLE}launch"),
        ("iPhone OpenAI", f"i{CAPNEXT}phone {TITLE}open{CAPNEXT}a{CAPNEXT}i"),
        ("I saw A cat", f"{TITLE}i saw {TITLE}a cat"),  # one capital letter is TITLE, not ALLCAPS
        ("McDONALD", f"{TITLE}mc{CAPNEXT}d{CAPNEXT}o{CAPNEXT}n{CAPNEXT}a{CAPNEXT}l{CAPNEXT}d"),
        ("ÉCOLE Über", f"É{ALLCAPS}cole Über"),  # non-ASCII letters pass through and split runs
        (f"a{TITLE}b{ESC}", f"a{ESC}{TITLE}b{ESC}{ESC}"),  # literal operators are escaped
        ("lower case stays", "lower case stays"),
    ],
)
def test_golden_examples(text, expected):
    assert encode(text) == expected
    assert decode(expected) == text


@pytest.mark.parametrize(
    "malformed",
    [f"a{TITLE}b", f"a{ALLCAPS}b", f"{CAPNEXT}{CAPNEXT}a", f"{TITLE} a", f"{TITLE}", f"x{ESC}",
     f"{TITLE}{ESC}{TITLE}a", f"{ALLCAPS}{TITLE}a"],
)
def test_decode_rejects_operators_no_text_encodes_to(malformed):
    with pytest.raises(CaseOpsError):
        decode(malformed)


def test_decode_lets_capitals_from_nfkc_through():
    """The CaseOps vocabulary holds capitals NFKC made from non-ASCII letters (Ａ -> A)."""
    assert decode(f"Abc {TITLE}x{CAPNEXT}y") == "Abc XY"


# --- the official CaseOps tokenizer ----------------------------------------------------------


def test_official_model_reserves_ids_4_to_7_for_the_operators():
    sp = caseops_sp()
    assert [sp.id_to_piece(i) for i in range(4, 8)] == list(OPERATORS)
    assert all(sp.is_control(i) for i in (0, 1, 2)) and sp.bos_id() == BOS_ID
    assert sp.encode(f"{TITLE}the")[0] == 4


@pytest.mark.parametrize("text", [EXAMPLE, "CamelCase and ALLCAPS words, digits 2026, ÉCOLE déjà vu in 東京.",
                                  "Plain lowercase text with punctuation!"])
def test_sidecar_sums_to_the_original_bytes_and_decodes_back(text):
    sp = caseops_sp()
    ids, counts = CaseOpsTransform().encode_with_bytes(sp, text)
    assert len(ids) == len(counts)
    assert sum(counts) == len(text.encode("utf-8"))
    assert decode(sp.decode(ids)) == text
    for tid, count in zip(ids, counts, strict=True):
        if 4 <= tid <= 7:
            assert count == 0, "operator pieces carry no original bytes"


def test_the_byte_pieces_of_one_character_give_it_to_the_last_piece():
    sp = caseops_sp()
    ids, counts = CaseOpsTransform().encode_with_bytes(sp, "Ü")
    assert [sp.id_to_piece(i) for i in ids] == ["<0xC3>", "<0x9C>"]
    assert counts == [0, 2]  # SentencePiece's surfaces: '' then 'Ü'
    lut = stream_bytes(np.array([BOS_ID, *ids]), build_byte_tables(sp, sp.vocab_size()))[1:]
    assert lut.tolist() == [1, 1]


def test_the_leading_space_lut_overcounts_caseops_tokens():
    """With the LUT each operator would be charged its 3 UTF-8 bytes: 53 instead of 32."""
    sp = caseops_sp()
    ids, counts = CaseOpsTransform().encode_with_bytes(sp, EXAMPLE)
    lut = int(stream_bytes(np.array([BOS_ID, *ids]), build_byte_tables(sp, sp.vocab_size())).sum())
    assert (sum(counts), lut) == (32, 53)


@settings(max_examples=300, deadline=None)
@given(texts)
def test_spans_are_sentencepieces_own_surfaces(text):
    """Without protobuf, the surfaces come from the normaliser's offsets; they must be the proto's."""
    pytest.importorskip("google.protobuf")
    sp = caseops_sp()
    for piece_text in (text, encode(text)):
        ids, surfaces = piece_surfaces(sp, piece_text)
        proto = sp.encode(piece_text, out_type="proto")
        assert ids == [p.id for p in proto.pieces]
        assert surfaces == [p.surface for p in proto.pieces]


@pytest.mark.parametrize(
    ("text", "sidecar", "lut"),
    [("a  b   c", 8, 5), ("x\n\ny", 4, 3), ("ﬁne Ａbc", 11, 8), (" lead", 4, 4), ("trail  ", 5, 5)],
)
def test_what_holds_for_text_sentencepiece_does_not_reproduce(text, sidecar, lut):
    """On raw text the sidecar follows SentencePiece's surfaces: a whitespace run or an NFKC-changed
    character is charged its original bytes to the piece after it, while leading and trailing
    whitespace belong to no piece. The LUT counts the normalised text instead. Canonical text
    (what pgolf stores) makes the two agree; see the next test."""
    sp = caseops_sp()
    ids, counts = CaseOpsTransform().encode_with_bytes(sp, text)
    assert sum(counts) == sidecar
    plain = spm.SentencePieceProcessor(model_file=str(official_tokenizer("fineweb_8192_bpe.model")))
    assert int(stream_bytes(np.array([BOS_ID, *plain.encode(text)]), build_byte_tables(plain, 8192)).sum()) == lut


@pytest.mark.slow
@settings(max_examples=300, deadline=None)
@given(texts)
def test_canonical_text_makes_sidecar_lut_and_document_bytes_agree(text):
    sp = caseops_sp()
    plain = spm.SentencePieceProcessor(model_file=str(official_tokenizer("fineweb_8192_bpe.model")))
    canonical = text_normalizer(official_tokenizer(CASEOPS_MODEL))(text)
    assert text_normalizer(official_tokenizer(CASEOPS_MODEL))(canonical) == canonical
    ids, counts = CaseOpsTransform().encode_with_bytes(sp, canonical)
    plain_ids = plain.encode(canonical)
    lut = int(stream_bytes(np.array([BOS_ID, *plain_ids]), build_byte_tables(plain, 8192)).sum())
    assert sum(counts) == lut == len(canonical.encode("utf-8"))
    assert plain.decode(plain_ids) == canonical


def test_the_one_case_tokens_cannot_decode_back():
    """NFKC composes j + caron (and h+U+0331, t+U+0308, w/y+U+030A) but not their capitals, so after
    lowercasing SentencePiece merges them: the bytes still add up, the text does not come back."""
    sp = caseops_sp()
    ids, counts = CaseOpsTransform().encode_with_bytes(sp, "J\u030c")
    assert sum(counts) == 3
    with pytest.raises(CaseOpsError):
        decode(sp.decode(ids))


# --- datasets ------------------------------------------------------------------------------


def small_corpus(n: int = 120) -> tuple[list[str], list[str]]:
    docs = list(dict.fromkeys(embedded_documents()))[:n]
    return docs[n // 6 :], docs[: n // 6]


def test_shard_and_sidecar_round_trip_and_the_token_glob_skips_sidecars(tmp_path):
    train, val = small_corpus()
    built = build_dataset(tmp_path, train, val, 512, transform=CaseOpsTransform(), shard_tokens=4000)
    val_files = shards.list_shards(tmp_path, shards.VAL_GLOB)
    byte_files = shards.list_shards(tmp_path, shards.VAL_BYTES_GLOB)
    assert len(val_files) == len(byte_files) > 1 and not any("_bytes_" in p.name for p in val_files)
    for tokens_file, bytes_file in zip(val_files, byte_files, strict=True):
        assert shards.read_header(tokens_file) == shards.read_header(bytes_file)
    ds = load_dataset(tmp_path, None, 512, CaseOpsTransform())
    assert ds.byte_source == "sidecar" and ds.transform == "casefold" and ds.lossless
    assert ds.val_bytes.shape == ds.val_tokens.shape
    assert int(ds.val_bytes.sum()) == built.manifest["val_original_bytes"]
    starts = shards.document_starts(ds.val_tokens, BOS_ID)
    assert starts[0] == 0 and starts.size == built.manifest["docs_val"]
    assert (ds.val_bytes[starts] == 0).all()
    sp = spm.SentencePieceProcessor(model_file=str(built.tokenizer))
    assert [sp.id_to_piece(i) for i in range(4, 8)] == list(OPERATORS)
    canonical = text_normalizer()
    ends = np.append(starts[1:], ds.val_tokens.size)
    for doc, s, e in zip(val, starts, ends, strict=True):
        assert decode(sp.decode(ds.val_tokens[s + 1 : e].tolist())) == canonical(doc)
        assert int(ds.val_bytes[s:e].sum()) == len(canonical(doc).encode("utf-8"))


def test_dataset_with_the_official_caseops_tokenizer(tmp_path):
    train, val = small_corpus(60)
    built = build_dataset(tmp_path, train, val, 8192, transform=CaseOpsTransform(),
                          tokenizer=official_tokenizer(CASEOPS_MODEL))
    ds = load_dataset(tmp_path, None, 8192, CaseOpsTransform())
    assert ds.tokenizer_path.name == CASEOPS_MODEL and ds.byte_source == "sidecar"
    assert int(ds.val_bytes.sum()) == built.manifest["val_original_bytes"]
    sp = caseops_sp()
    docs = np.split(ds.val_tokens, shards.document_starts(ds.val_tokens, BOS_ID)[1:])
    canonical = text_normalizer(official_tokenizer(CASEOPS_MODEL))
    assert [decode(sp.decode(d[1:].tolist())) for d in docs] == [canonical(v) for v in val]


def test_plain_datasets_count_the_same_canonical_bytes_with_the_lut():
    directory = ensure_embedded_dataset(1024)
    ds = load_dataset(directory, None, 1024)
    assert ds.byte_source == "lut"
    assert int(ds.val_bytes.sum()) == read_manifest(directory)["val_original_bytes"]


def test_transformed_embedded_data_charges_the_canonical_documents_bytes():
    directory = ensure_embedded_dataset(1024, CaseOpsTransform())
    manifest = read_manifest(directory)
    canonical = text_normalizer()
    val = [canonical(d) for d in embedded_documents() if is_validation_document(d)]
    expected = sum(len(d.encode("utf-8")) for d in val)
    ds = load_dataset(directory, None, 1024, CaseOpsTransform())
    assert int(ds.val_bytes.sum()) == manifest["val_original_bytes"] == expected
    assert manifest["val_bytes_before_normalization"] >= expected


def test_lowercase_mode_is_lossy_and_its_sidecar_counts_the_lowered_text():
    sp = caseops_sp()
    ids, counts = LowercaseTransform().encode_with_bytes(sp, "İstanbul IS Big")
    assert sum(counts) == len("İstanbul IS Big".lower().encode("utf-8")) != len("İstanbul IS Big".encode())
    assert not LowercaseTransform().lossless and LowercaseTransform().user_symbols == ()


def test_shard_problems_explain_what_a_data_dir_lacks(tmp_path):
    plain = tmp_path / "plain"
    build_dataset(plain, *small_corpus(60), 512)
    (message,) = shard_problems(plain, "casefold")
    assert "made with no transform" in message and "--casefold" in message
    challenge = tmp_path / "challenge"  # the challenge's CaseOps export: shards + sidecar, no manifest
    challenge.mkdir()
    for name in ("fineweb_train_000000.bin", "fineweb_val_000000.bin", "fineweb_val_bytes_000000.bin"):
        shards.write_shard(challenge / name, [1, 5, 6])
    assert shard_problems(challenge, "casefold") == []
    assert shard_problems(challenge, "lowercase")
    (challenge / "fineweb_val_bytes_000000.bin").unlink()
    assert "no sidecar" in shard_problems(challenge, "casefold")[0]


# --- the CLI and whole runs ------------------------------------------------------------------


@pytest.fixture(scope="module")
def casefold_shards(tmp_path_factory):
    """`pgolf data text --casefold` on a JSONL of embedded documents."""
    root = tmp_path_factory.mktemp("casefold-data")
    source = root / "docs.jsonl"
    docs = list(dict.fromkeys(embedded_documents()))[:300]  # the corpus repeats a few documents verbatim
    source.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    out = root / "shards"
    proc = pgolf("data", "text", str(source), "--out", str(out), "--vocab", "1024", "--val-docs", "30", "--casefold")
    assert proc.returncode == 0, proc.stderr + proc.stdout
    return out


def test_data_text_casefold_writes_tokenizer_shards_and_sidecar(casefold_shards):
    manifest = read_manifest(casefold_shards)
    assert manifest["transform"] == "casefold" and manifest["lossless"] and manifest["docs_val"] == 30
    assert (casefold_shards / manifest["tokenizer"]).is_file()
    assert shards.list_shards(casefold_shards, shards.TRAIN_GLOB)
    (sidecar,) = shards.list_shards(casefold_shards, shards.VAL_BYTES_GLOB)
    assert int(shards.read_shard(sidecar).astype(np.int64).sum()) == manifest["val_original_bytes"]


def test_data_text_transform_flag_is_the_same_and_conflicts_are_errors(tmp_path):
    source = tmp_path / "a.txt"
    source.write_text("\n\n".join(embedded_documents()[:40]), encoding="utf-8")
    proc = pgolf("data", "text", str(source), "--out", str(tmp_path / "o"), "--vocab", "512", "--doc-mode",
                 "paragraph", "--transform", "casefold")
    assert proc.returncode == 0, proc.stderr
    assert read_manifest(tmp_path / "o")["transform"] == "casefold"
    proc = pgolf("data", "text", str(source), "--out", str(tmp_path / "p"), "--casefold", "--transform", "other")
    assert proc.returncode == 2 and "two transforms" in proc.stderr
    assert transform_by_name("casefold").name == "casefold"


def scored_bytes(val_bytes: np.ndarray, seq_len: int) -> int:
    """The sidecar over the positions the challenge's plain eval scores (whole windows only)."""
    scored = (val_bytes.size - 1) // seq_len * seq_len
    return int(val_bytes[1 : 1 + scored].sum())


@pytest.mark.slow
def test_run_on_casefold_shards(casefold_shards, micro_recipe, tmp_path):
    recipe = micro_recipe(f"data.dir={json.dumps(str(casefold_shards))}", "eval.max_tokens=null",
                          techniques={"casefold": {}})
    result = run(recipe, tmp_path, QUIET)
    assert result["valid"], result["failed_audits"]
    ds = load_dataset(casefold_shards, None, 1024, CaseOpsTransform())
    assert int(ds.val_bytes.sum()) == read_manifest(casefold_shards)["val_original_bytes"]
    assert result["val_bytes"] == scored_bytes(ds.val_bytes, recipe.eval_seq_len)


def test_a_recipe_without_casefold_refuses_casefold_shards(casefold_shards):
    """Toggling casefold off in an ablation must not silently rerun the transformed data."""
    with pytest.raises(DataError, match="made with text transform casefold, but the recipe asks for none"):
        load_dataset(casefold_shards, None, 1024)


def test_casefold_refuses_plain_shards_before_anything_runs(micro_recipe, tmp_path):
    build_dataset(tmp_path, *small_corpus(60), 512)
    recipe = micro_recipe(f"data.dir={json.dumps(str(tmp_path))}", "model.vocab_size=512", techniques={"casefold": {}})
    with pytest.raises(ConfigError, match="made with no transform"):
        Session(recipe)


@pytest.mark.slow
def test_casefold_run_is_valid_and_charges_the_original_bytes(micro_recipe, tmp_path):
    recipe = micro_recipe("eval.max_tokens=null", techniques={"casefold": {}})
    result = run(recipe, tmp_path, QUIET)
    assert result["valid"], result["failed_audits"]
    canonical = text_normalizer()
    val = [canonical(d) for d in embedded_documents() if is_validation_document(d)]
    ds = load_dataset(ensure_embedded_dataset(1024, CaseOpsTransform()), None, 1024, CaseOpsTransform())
    assert int(ds.val_bytes.sum()) == sum(len(d.encode("utf-8")) for d in val)
    assert result["val_bytes"] == scored_bytes(ds.val_bytes, recipe.eval_seq_len)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["data"]["byte_source"] == "sidecar" and manifest["data"]["transform"] == "casefold"


@pytest.mark.slow
def test_lowercase_mode_runs_but_is_marked_invalid(micro_recipe, tmp_path):
    result = run(micro_recipe(techniques={"casefold": {"mode": "lowercase"}}), tmp_path, QUIET)
    assert result["failed_audits"] == ["byte_accounting"]
    assert "lossy" in result["compliance"]["byte_accounting"]["detail"]["reason"]


def test_unknown_mode_is_a_config_error(micro_recipe):
    with pytest.raises(ConfigError, match="caseops"):
        Session(micro_recipe(techniques={"casefold": {"mode": "upper"}}))


def test_a_tokenizer_without_byte_fallback_is_refused():
    sp = spm.SentencePieceProcessor(model_file=str(official_tokenizer("fineweb_1024_bpe.model")))
    with pytest.raises(DataError, match="byte_fallback"):
        CaseOpsTransform().encode_with_bytes(sp, "日本")
