"""Pseudonymous output names: stable keys, safe file names, no patient data."""

from __future__ import annotations

import re

import pytest

from medgen.io.deid import output_stem, pseudonym, safe_name


def test_pseudonym_is_stable_short_hex_and_depends_on_every_part():
    study, series = "1.2.840.113619.2.1", "1.2.840.113619.2.1.7"
    key = pseudonym(study, series)
    assert re.fullmatch(r"[0-9a-f]{12}", key)
    assert pseudonym(study, series) == key
    assert pseudonym(study, series + "1") != key
    assert pseudonym(series, study) != key  # order matters
    assert pseudonym(study, series, salt="site-a") != key
    assert len(pseudonym(study, length=20)) == 20


def test_pseudonym_keeps_part_boundaries():
    # Without a separator "1.2" + "3" and "1." + "23" would hash the same text.
    assert pseudonym("1.2", "3") != pseudonym("1.", "23")


def test_pseudonym_rejects_bad_arguments_with_clear_messages():
    with pytest.raises(ValueError, match="`parts` must hold at least one identifier"):
        pseudonym()
    with pytest.raises(ValueError, match="`length` must be between 4 and 64, got 2"):
        pseudonym("1.2", length=2)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("T1 MPRAGE sag", "T1_MPRAGE_sag"),
        ("DWI b=1000 (ADC)", "DWI_b_1000_ADC"),
        ("../../etc/passwd", "etc_passwd"),
        ("Séquence à écho", "Sequence_a_echo"),
        ("ep2d_bold+moco", "ep2d_bold+moco"),
        ("  ...  ", ""),
        (None, ""),
    ],
)
def test_safe_name_keeps_only_portable_characters(text, expected):
    assert safe_name(text) == expected


def test_safe_name_truncates_and_uses_fallback():
    assert safe_name("a" * 100, max_len=10) == "a" * 10
    assert safe_name("abc_____def", max_len=4) == "abc"  # no trailing separator
    assert safe_name("///", empty="unnamed") == "unnamed"
    with pytest.raises(ValueError, match="`max_len` must be >= 1, got 0"):
        safe_name("x", max_len=0)


def test_output_stem_layout():
    assert output_stem("0123456789ab", 3, "T2 FLAIR ax") == "0123456789ab_s3_T2_FLAIR_ax"
    assert output_stem("0123456789ab", "0004", "CT", part="e2") == "0123456789ab_s4_CT_e2"
    # Missing or nonsense series numbers become s0; an empty description is left out.
    assert output_stem("0123456789ab", None, None) == "0123456789ab_s0"
    assert output_stem("0123456789ab", "n/a", "") == "0123456789ab_s0"
    assert output_stem("0123456789ab", 7, "", part=2) == "0123456789ab_s7_2"


def test_output_stem_is_a_single_safe_file_name():
    stem = output_stem("0123456789ab", 12, "a/b\\c: d*?", part="x/y")
    assert re.fullmatch(r"[A-Za-z0-9.+_-]+", stem)
    assert stem == "0123456789ab_s12_a_b_c_d_x_y"
