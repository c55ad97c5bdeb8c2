"""Field declarations say which values a device may send, and answer with a code when not."""

from __future__ import annotations

from typing import Any

import pytest

from domain import fields as f
from domain.fields import INT64_MAX, INT64_MIN, Field, FieldError

UUID = "0f8b1c5e-3d2a-4b6f-9c1e-7a5d4e3f2b1a"


def code(field: Field, value: Any) -> str | None:
    err = field.check("x", value)
    return None if err is None else err.code


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        (f.text(5), "hello", None),
        (f.text(5), "hello!", "too_long"),
        (f.text(5), "", "too_short"),
        (f.text(5), " \t ", "too_short"),
        (f.text(5, min_length=0), "", None),
        (f.text(5), 5, "wrong_type"),
        (f.text(5), None, "required"),
        (f.text(5, nullable=True), None, None),
        # Length counts characters, as the utf8mb4 column does, not bytes.
        (f.text(3), "🍕🍕🍕", None),
        (f.money(), 0, None),
        (f.money(), 100_000_000, None),
        (f.money(), 100_000_001, "out_of_range"),
        (f.money(), -1, "out_of_range"),
        (f.money(), True, "wrong_type"),
        (f.money(), 2.0, "wrong_type"),
        (f.money(), "2", "wrong_type"),
        (f.money(nullable=True), None, None),
        (f.integer(), INT64_MAX, None),
        (f.integer(), INT64_MAX + 1, "out_of_range"),
        (f.integer(), INT64_MIN - 1, "out_of_range"),
        (f.integer(0, 10), 11, "out_of_range"),
        (f.integer(), False, "wrong_type"),
        (f.boolean(), True, None),
        (f.boolean(), 1, "wrong_type"),
        (f.boolean(), "true", "wrong_type"),
        (f.boolean(), None, "required"),
        (f.uuid_ref(), UUID, None),
        (f.uuid_ref(), UUID.upper(), None),
        (f.uuid_ref(), UUID.replace("-", ""), "invalid"),
        (f.uuid_ref(), "{" + UUID + "}", "invalid"),
        (f.uuid_ref(), "urn:uuid:" + UUID, "invalid"),
        (f.uuid_ref(), UUID + "\n", "invalid"),
        (f.uuid_ref(), 7, "wrong_type"),
        (f.uuid_ref(nullable=True), None, None),
        (f.choice("each", "kg"), "kg", None),
        (f.choice("each", "kg"), "KG", "invalid_choice"),
        (f.choice("each", "kg"), "dozen", "invalid_choice"),
        (f.choice("each", "kg"), 3, "wrong_type"),
        (f.text_list(), ["a"], "read_only"),
        (f.text_list(), "a", "read_only"),
    ],
)
def test_a_value_is_accepted_or_refused_with_a_code(
    field: Field, value: Any, expected: str | None
) -> None:
    assert code(field, value) == expected


def test_an_error_names_the_field_and_says_why() -> None:
    assert f.text(10).check("name", "x" * 11) == FieldError(
        "name", "too_long", "name is longer than 10"
    )
    err = f.choice("each", "kg").check("unit", "dozen")
    assert err is not None and err.message == "unit must be one of each, kg"


def test_a_blank_or_short_text_says_how_long_it_must_be() -> None:
    assert f.text().check("name", " ") == FieldError("name", "too_short", "name must not be blank")
    err = f.text(min_length=3).check("code", "ab ")
    assert err == FieldError("code", "too_short", "code needs at least 3 characters besides spaces")


def test_uuids_are_stored_lower_case_and_other_values_as_sent() -> None:
    assert f.uuid_ref().canonical(UUID.upper()) == UUID
    assert f.text().canonical("Mixed Case") == "Mixed Case"
    assert f.money().canonical(5) == 5
    assert f.uuid_ref(nullable=True).canonical(None) is None


def test_a_choice_field_is_as_long_as_its_longest_choice() -> None:
    assert f.choice("g", "pack").max_length == 4


def test_a_choice_field_needs_a_choice() -> None:
    with pytest.raises(ValueError, match="at least one choice"):
        f.choice()
