"""docs/protocol.md stays true to the code: its examples are valid messages whose checksums add
up, and every error code the server can produce is documented."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import msgspec
import pytest

from sync_protocol import messages as m
from sync_protocol.checksums import row_checksum, sum_checksums

ROOT = Path(__file__).resolve().parents[2]
DOC = (ROOT / "docs" / "protocol.md").read_text()


def _examples() -> list[dict[str, Any]]:
    blocks = re.findall(r"```json\n(.*?)```", DOC, flags=re.DOTALL)
    return [json.loads(block) for block in blocks]


def _message_type(example: dict[str, Any]) -> type[Any]:
    """Which protocol message an example is, by the fields only that message has."""
    keys = set(example)
    for fields, type_ in (
        ({"platform"}, m.RegisterDevice),
        ({"user_id", "scopes"}, m.DeviceInfo),
        ({"change_sets"}, m.PushRequest),
        ({"outcomes"}, m.PushResponse),
        ({"changes"}, m.PullResponse),
        ({"change_set_id"}, m.Outcome),
        ({"ops", "seq"}, m.ChangeSet),
        ({"code", "details"}, m.ErrorBody),
        ({"protocol", "device_id"}, m.PullRequest),
    ):
        if fields <= keys:
            return type_
    raise AssertionError(f"example matches no message: {sorted(keys)}")


EXAMPLES = _examples()


def test_the_spec_has_an_example_of_every_request_and_response() -> None:
    shown = {_message_type(example) for example in EXAMPLES}
    assert {
        m.RegisterDevice,
        m.DeviceInfo,
        m.PushRequest,
        m.PushResponse,
        m.PullRequest,
        m.PullResponse,
        m.ErrorBody,
    } <= shown


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda e: _message_type(e).__name__)
def test_every_json_example_decodes_as_its_message(example: dict[str, Any]) -> None:
    type_ = _message_type(example)
    msgspec.json.decode(json.dumps(example), type=type_)  # strict: unknown fields refused


def test_pull_examples_page_checksums_add_up() -> None:
    pages = [e for e in EXAMPLES if _message_type(e) is m.PullResponse]
    assert pages
    for page in pages:
        total = sum_checksums(
            row_checksum(c["entity"], c["id"], c["version"]) for c in page["changes"]
        )
        assert total == page["page_checksum"]


def test_the_worked_checksum_example_is_right() -> None:
    value = row_checksum("inventory_items", "0b8f6a52-3c1d-4e7a-9f20-6d4c8b1a2e93", 3)
    assert f"which is\n`{value}`" in DOC


def _documented_codes(section: str) -> set[str]:
    start = DOC.index(section)
    end = DOC.index("\n#", start + len(section))
    return set(re.findall(r"^\| (?:\d+ \| )?`([a-z_]+)`", DOC[start:end], flags=re.MULTILINE))


def test_every_op_refusal_code_the_engine_produces_is_documented() -> None:
    sources = [
        ROOT / "conflict" / "planner.py",
        ROOT / "domain" / "fields.py",
        ROOT / "domain" / "catalog.py",
        ROOT / "sync_server" / "push.py",
    ]
    produced: set[str] = set()
    for path in sources:
        text = path.read_text()
        produced |= set(re.findall(r"_refuse\(\s*\w+,\s*\"([a-z_]+)\"", text))
        produced |= set(re.findall(r"OpIssue\(\s*-?\w+,\s*\"([a-z_]+)\"", text))
        produced |= set(re.findall(r"FieldError\(\s*[^,()]+,\s*\"([a-z_]+)\"", text))
    assert "unknown_entity" in produced  # the patterns still find what they look for
    assert produced <= _documented_codes("### 6.3 Per-op error codes")


def test_every_error_code_of_the_sync_endpoints_is_documented() -> None:
    text = (ROOT / "sync_server" / "sync_http.py").read_text()
    produced = set(re.findall(r"ApiError\(\s*\d+,\s*\"([a-z_]+)\"", text))
    produced |= set(re.findall(r"ErrorBody\(\s*\"([a-z_]+)\"", text))
    assert {"reset_required", "seq_gap"} <= produced
    documented = set(re.findall(r"`([a-z_]+)`", DOC[DOC.index("## 8. Errors") :]))
    assert produced <= documented
