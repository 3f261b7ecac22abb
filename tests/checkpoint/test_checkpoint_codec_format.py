"""The stored form written through pydantic-core: checksum over the stored bytes, checkpoints
written by the earlier encoder still read, and non-finite floats still refused."""

from __future__ import annotations

import hashlib
import hmac
import json

import pytest
from pydantic import BaseModel, Field

from stroma.checkpoint import _codec as codec
from stroma.checkpoint.memory import InMemoryStore
from stroma.errors import CheckpointError


class Source(BaseModel):
    url: str
    score: float


class Report(BaseModel):
    title: str
    words: int
    ratio: float
    tags: list[str]
    note: str | None = None
    source: Source
    flag: bool = Field(alias="isFlagged")


REPORT = Report(
    title="Zürich — “quoted” \n tab\t",
    words=3,
    ratio=1e16,
    tags=["b", "a"],
    source=Source(url="https://x/y", score=0.1),
    isFlagged=True,
)

# Written by the encoder before this format change (stdlib json, payload keys sorted), frozen.
OLD_STEP = (
    b'{"checksum":"sha256:139161cccdd98df3d4a58abb17175682588195b0e8d21f4c8fbde4f5dc92f101",'
    b'"format":"stroma.checkpoint","kind":"step","payload":{"isFlagged":true,"note":null,'
    b'"ratio":1e+16,"source":{"score":0.1,"url":"https://x/y"},"tags":["b","a"],'
    b'"title":"Z\xc3\xbcrich \xe2\x80\x94 \xe2\x80\x9cquoted\xe2\x80\x9d \\n tab\\t","words":3},'
    b'"run_id":"run-1","saved_at":1767225600.5,"schema":{"fingerprint":'
    b'"sha256:bb9d38e28cd8c7f19fc9252d10697b59a02d2f67bf1abc416daeee4ad4ae65b6",'
    b'"name":"tests.checkpoint.test_checkpoint_codec.Report"},"step_id":"summarize","version":1}'
)
OLD_KEYED_STEP = OLD_STEP.replace(
    b"sha256:139161cccdd98df3d4a58abb17175682588195b0e8d21f4c8fbde4f5dc92f101",
    b"hmac-sha256:a7ad9db511585193c5d6f4c9401a43bc928bca8823627526a37fd342fd26d2fd",
)
OLD_MANIFEST = (
    b'{"checksum":"sha256:f6fc90b7e7d2a0d4d059c9f001f552e7417ef942a54a53a4c9b80cd822976eff",'
    b'"format":"stroma.checkpoint","kind":"manifest","payload":{"n":2,"status":"running",'
    b'"steps":["a","b"]},"run_id":"run-1","saved_at":1767225600.5,"schema":null,"step_id":null,"version":1}'
)


def test_a_step_checkpoint_written_by_the_earlier_encoder_still_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(codec.KEY_ENV, raising=False)
    assert codec.decode_step(OLD_STEP, "run-1", "summarize", Report) == REPORT
    assert codec.decode_step(OLD_STEP.decode(), "run-1", "summarize", Report) == REPORT


def test_a_keyed_checkpoint_written_by_the_earlier_encoder_still_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(codec.KEY_ENV, "test-key")
    assert codec.decode_step(OLD_KEYED_STEP, "run-1", "summarize", Report) == REPORT
    monkeypatch.setenv(codec.KEY_ENV, "another-key")
    with pytest.raises(CheckpointError, match="keyed checksum"):
        codec.decode_step(OLD_KEYED_STEP, "run-1", "summarize", Report)


def test_a_manifest_written_by_the_earlier_encoder_still_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(codec.KEY_ENV, raising=False)
    assert codec.decode_manifest(OLD_MANIFEST, "run-1") == {"n": 2, "status": "running", "steps": ["a", "b"]}


def test_an_earlier_checkpoint_edited_in_place_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(codec.KEY_ENV, raising=False)
    with pytest.raises(CheckpointError, match="fails its checksum"):
        codec.decode_step(OLD_STEP.replace(b'"words":3', b'"words":4'), "run-1", "summarize", Report)


def test_a_reformatted_checkpoint_is_verified_against_its_canonical_fields(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(codec.KEY_ENV, raising=False)
    pretty = json.dumps(json.loads(OLD_STEP), indent=2)
    assert codec.decode_step(pretty, "run-1", "summarize", Report) == REPORT
    with pytest.raises(CheckpointError, match="fails its checksum"):
        codec.decode_step(pretty.replace('"words": 3', '"words": 4'), "run-1", "summarize", Report)


@pytest.mark.parametrize("key", [None, "test-key"])
def test_the_payload_is_pydantic_cores_json_and_the_checksum_covers_the_stored_bytes(
    monkeypatch: pytest.MonkeyPatch, key: str | None
) -> None:
    if key is None:
        monkeypatch.delenv(codec.KEY_ENV, raising=False)
    else:
        monkeypatch.setenv(codec.KEY_ENV, key)
    stored = codec.encode_step_bytes("run-1", "summarize", REPORT)
    assert b'"payload":' + REPORT.model_dump_json(by_alias=True, round_trip=True).encode() + b"," in stored
    member, rest = stored.split(b",", 1)
    checksum = json.loads(member[1:].split(b":", 1)[1])
    body = b"{" + rest
    if key is None:
        assert checksum == "sha256:" + hashlib.sha256(body).hexdigest()
    else:
        assert checksum == "hmac-sha256:" + hmac.new(key.encode(), body, hashlib.sha256).hexdigest()
    assert codec.decode_step(stored, "run-1", "summarize", Report) == REPORT
    envelope = json.loads(stored)
    assert list(envelope) == sorted(envelope)
    assert envelope["schema"] == {"name": codec.schema_name(Report), "fingerprint": codec.schema_fingerprint(Report)}


class Measurement(BaseModel):
    value: float
    label: str | None = None


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_floats_are_still_refused_not_stored_as_null(value: float) -> None:
    with pytest.raises(CheckpointError, match="NaN and Infinity are not allowed"):
        codec.encode_step("run-1", "measure", Measurement(value=value))


def test_a_null_field_is_stored_and_loaded() -> None:
    stored = codec.encode_step_bytes("run-1", "measure", Measurement(value=1.5))
    assert codec.decode_step(stored, "run-1", "measure", Measurement) == Measurement(value=1.5)


def test_the_in_memory_store_keeps_the_encoded_bytes_as_they_are() -> None:
    store = InMemoryStore()
    store.save("run-1", "summarize", REPORT)
    kept, model = store._runs["run-1"].steps["summarize"]
    assert isinstance(kept, bytes) and model is Report
    assert store.load("run-1", "summarize") == REPORT
