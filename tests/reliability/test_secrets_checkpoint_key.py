"""Issue 8 D17: with ``STROMA_CHECKPOINT_KEY`` set, checkpoints are sealed with HMAC-SHA256, so an
edited payload with a recomputed (unkeyed) checksum is refused; without a key, checkpoints are
written and read as before."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from pydantic import BaseModel

from stroma.checkpoint import SQLiteStore
from stroma.checkpoint import _codec as codec
from stroma.errors import CheckpointError

KEY = "0f4b1c2d3e4f5a6b7c8d9e0f1a2b3c4d"


class Balance(BaseModel):
    account: str
    amount: float


def _reseal_unkeyed(text: str, **changes: object) -> str:
    """What someone with write access to the store can do without the key."""
    envelope = json.loads(text)
    envelope["payload"].update(changes)
    del envelope["checksum"]
    body = json.dumps(envelope, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    envelope["checksum"] = "sha256:" + hashlib.sha256(body).hexdigest()
    return json.dumps(envelope)


def test_an_edited_and_resealed_checkpoint_is_accepted_without_a_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """The documented limit of the unkeyed checksum (corruption, not tampering)."""
    monkeypatch.delenv("STROMA_CHECKPOINT_KEY", raising=False)
    text = codec.encode_step("r1", "pay", Balance(account="a", amount=10.0))
    forged = _reseal_unkeyed(text, amount=1_000_000.0)
    assert codec.decode_step(forged, "r1", "pay", Balance).amount == 1_000_000.0


def test_an_edited_and_resealed_checkpoint_is_refused_with_a_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STROMA_CHECKPOINT_KEY", KEY)
    text = codec.encode_step("r1", "pay", Balance(account="a", amount=10.0))
    assert json.loads(text)["checksum"].startswith("hmac-sha256:")
    assert codec.decode_step(text, "r1", "pay", Balance) == Balance(account="a", amount=10.0)
    with pytest.raises(CheckpointError, match="not signed with the checkpoint key"):
        codec.decode_step(_reseal_unkeyed(text, amount=1_000_000.0), "r1", "pay", Balance)
    # editing the payload while keeping the keyed checksum fails too
    edited = json.loads(text)
    edited["payload"]["amount"] = 1_000_000.0
    with pytest.raises(CheckpointError, match="keyed checksum"):
        codec.decode_step(json.dumps(edited), "r1", "pay", Balance)
    manifest = codec.encode_manifest("r1", {"steps": []})
    assert codec.decode_manifest(manifest, "r1") == {"steps": []}


def test_a_wrong_or_missing_key_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STROMA_CHECKPOINT_KEY", KEY)
    text = codec.encode_step("r1", "pay", Balance(account="a", amount=10.0))
    monkeypatch.setenv("STROMA_CHECKPOINT_KEY", KEY[::-1])
    with pytest.raises(CheckpointError, match="keyed checksum"):
        codec.decode_step(text, "r1", "pay", Balance)
    monkeypatch.delenv("STROMA_CHECKPOINT_KEY")
    with pytest.raises(CheckpointError, match="set STROMA_CHECKPOINT_KEY"):
        codec.decode_step(text, "r1", "pay", Balance)


def test_a_real_store_round_trips_with_and_without_a_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("STROMA_CHECKPOINT_KEY", raising=False)
    store = SQLiteStore(str(tmp_path / "c.db"))
    try:
        store.save("old", "pay", Balance(account="a", amount=1.0))
        assert store.load_typed("old", "pay", Balance) == Balance(account="a", amount=1.0)
        monkeypatch.setenv("STROMA_CHECKPOINT_KEY", KEY)
        store.save("new", "pay", Balance(account="b", amount=2.0))
        assert store.load_typed("new", "pay", Balance) == Balance(account="b", amount=2.0)
        with pytest.raises(CheckpointError, match="unset STROMA_CHECKPOINT_KEY"):
            store.load_typed("old", "pay", Balance)  # fail closed, and say how to read it
    finally:
        store.close()
