"""The stored form of a checkpoint: a checksummed JSON envelope, and nothing else.

Every store keeps the same text. A step checkpoint looks like::

    {"checksum": "sha256:…", "format": "stroma.checkpoint", "kind": "step",
     "payload": {…model_dump(mode="json")…}, "run_id": "r1", "step_id": "summarize",
     "saved_at": 1767225600.0, "schema": {"fingerprint": "sha256:…", "name": "app.models.Summary"},
     "version": 1}

A run manifest has ``"kind": "manifest"``, ``"step_id": null`` and ``"schema": null``.

Rules (design §3 item 9, reliability scenario 15):

- The stored text is UTF-8 JSON with the keys in sorted order and no spaces, so it starts with the
  checksum member: ``{"checksum":"sha256:…",`` followed by the other fields. The checksum is
  SHA-256 over exactly those stored bytes with the checksum member cut out (``{`` + the rest), so
  a flipped byte, a truncated write, an edited payload or a checkpoint copied from another run or
  step is detected, and verifying never re-encodes anything. The payload is the model's JSON as
  pydantic-core's serializer writes it (``model_dump_json(by_alias=True, round_trip=True)``:
  field order, not sorted), made once. Checkpoints written by earlier versions (payload keys
  sorted too) have the same layout and verify the same way; text that does not start with the
  checksum member (e.g. re-formatted by hand) is verified against the canonical JSON of its
  fields, as earlier versions did. Without a key it is an integrity check, not a signature:
  someone who can write to the store can also recompute it (what such a writer can achieve is
  bounded by the next rule).
- With a secret in ``STROMA_CHECKPOINT_KEY`` the checksum is keyed: ``"hmac-sha256:…"``, an
  HMAC-SHA256 of the same bytes, so an edited payload cannot be re-sealed without the key (tamper
  evidence, not secrecy: payloads stay readable). While a key is set, unkeyed (``"sha256:"``)
  envelopes are refused, because anyone could write one; without a key, keyed envelopes are
  refused (they cannot be verified). Unkeyed checkpoints written before a key was set are read by
  running without the key (or by clearing the run).
- Loading never imports anything and never unpickles. The schema name is stored as plain text for
  error messages only; the payload is validated with the schema the *caller* passes. Without a
  schema a persistent store can only return a :class:`CheckpointData` (a generic model holding the
  payload's fields).
- Everything that is wrong fails closed with :class:`~stroma.errors.CheckpointError` naming the run,
  the step and what is wrong. Validation errors are summarised by location and message only, never
  with the stored values (those may be secrets and error messages may be exported).
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import os
import time
from collections.abc import Mapping
from typing import Any, Final, TypeVar

from pydantic import BaseModel, ConfigDict, PrivateAttr, ValidationError
from pydantic_core import PydanticSerializationError

from stroma._ids import run_id_problem
from stroma.errors import CheckpointError, describe_validation_error

FORMAT: Final = "stroma.checkpoint"
FORMAT_VERSION: Final = 1
KIND_STEP: Final = "step"
KIND_MANIFEST: Final = "manifest"

_CHECKSUM_PREFIX: Final = "sha256:"
_KEYED_PREFIX: Final = "hmac-sha256:"
KEY_ENV: Final = "STROMA_CHECKPOINT_KEY"
_ENVELOPE_FIELDS: Final = frozenset(
    {"format", "version", "kind", "run_id", "step_id", "saved_at", "schema", "payload", "checksum"}
)
# JSON-schema keywords that document a model without changing what it accepts.
_ANNOTATION_KEYWORDS: Final = frozenset({"title", "description", "examples", "$comment"})
# JSON-schema keywords whose value maps *names* (of properties, definitions) to sub-schemas.
_NAME_MAPS: Final = frozenset({"properties", "patternProperties", "$defs", "definitions", "dependentSchemas"})

M = TypeVar("M", bound=BaseModel)


class CheckpointData(BaseModel):
    """A checkpoint loaded without a schema: the stored payload's fields, validated as plain JSON.

    Persistent stores return this from ``load(run_id, node_id)`` because rebuilding the original
    class would mean importing code named by stored data. Fields are reachable as attributes
    (``data.value``) or through :meth:`model_dump`; nested models come back as dicts. To get the
    step's real model pass its schema: ``CheckpointManager.resume(run_id, step_id, Schema)`` or
    ``store.load_typed(run_id, step_id, Schema)``.
    """

    model_config = ConfigDict(extra="allow", frozen=True)

    _schema_name: str = PrivateAttr(default="")
    _schema_fingerprint: str = PrivateAttr(default="")

    @property
    def stored_schema_name(self) -> str:
        """Qualified name of the model that wrote the checkpoint (informational text only)."""
        return self._schema_name

    @property
    def stored_schema_fingerprint(self) -> str:
        """:func:`schema_fingerprint` of the model that wrote the checkpoint."""
        return self._schema_fingerprint


# --- identifiers ---------------------------------------------------------------------------------


_CHECKED_RUN_IDS: dict[str, None] = {}
"""Run ids (exact ``str``) already found valid: a run checkpoints every step under the same id, and
whether a plain string is a run id depends on its text alone. Bounded; cleared when full."""
_MAX_CHECKED_RUN_IDS: Final = 1024


def check_run_id(run_id: object) -> str:
    """Return *run_id* if it is a run id (:func:`stroma._ids.run_id_problem`, the rule ``RunConfig``
    applies too); raise ``TypeError`` for a non-``str``, ``ValueError`` for a bad string."""
    if type(run_id) is str and run_id in _CHECKED_RUN_IDS:
        return run_id
    if not isinstance(run_id, str):
        raise TypeError(f"run_id must be a str, got {type(run_id).__name__}")
    problem = run_id_problem(run_id)
    if problem is not None:
        raise ValueError(f"run_id {problem}")
    if type(run_id) is str:  # a str subclass may compare or hash unlike its text: checked every time
        if len(_CHECKED_RUN_IDS) >= _MAX_CHECKED_RUN_IDS:
            _CHECKED_RUN_IDS.clear()
        _CHECKED_RUN_IDS[run_id] = None
    return run_id


def check_step_id(step_id: object) -> str:
    """Return *step_id* if it is a non-empty ``str``; raise ``TypeError`` / ``ValueError`` otherwise."""
    if not isinstance(step_id, str):
        raise TypeError(f"node_id must be a str, got {type(step_id).__name__}")
    if not step_id:
        raise ValueError("node_id must be a non-empty string")
    return step_id


def check_schema(schema: object) -> type[BaseModel]:
    """Return *schema* if it is a pydantic model class; raise ``TypeError`` otherwise."""
    if not (isinstance(schema, type) and issubclass(schema, BaseModel)):
        raise TypeError(f"schema must be a pydantic BaseModel subclass, got {schema!r}")
    return schema


def _place(run_id: str, step_id: str | None) -> str:
    return f"run {run_id!r}" if step_id is None else f"step {step_id!r} in run {run_id!r}"


def record(run_id: str, step_id: str | None) -> str:
    """``"the checkpoint of step 'x' in run 'y'"``, or ``"the manifest of run 'y'"`` when *step_id* is None."""
    if step_id is None:
        return f"the manifest of run {run_id!r}"
    return f"the checkpoint of step {step_id!r} in run {run_id!r}"


def operation(action: str, run_id: str, step_id: str | None) -> str:
    """Describe a store operation for messages: ``"save the checkpoint of step 'x' in run 'y'"``.

    *action* ``"save"`` / ``"load"`` applies to :func:`record`; any other action (``"delete the
    checkpoints"``, ``"list the completed steps"``) applies to the whole run.
    """
    if action in ("save", "load"):
        return f"{action} {record(run_id, step_id)}"
    return f"{action} of run {run_id!r}"


# --- schema identity -----------------------------------------------------------------------------


def schema_name(schema: type[BaseModel]) -> str:
    """``module.QualName`` of *schema*: text for messages, never resolved back to a class."""
    return f"{schema.__module__}.{schema.__qualname__}"


@functools.lru_cache(maxsize=512)
def schema_fingerprint(schema: type[BaseModel]) -> str:
    """A stable ``"sha256:<hex>"`` identity of what *schema* accepts.

    It hashes the model's validation JSON schema with its titles, descriptions, examples and
    comments removed, so editing a docstring or renaming the top-level class keeps the fingerprint,
    while adding, removing or retyping a field, changing a constraint, a default or whether a field
    is required changes it. Models whose JSON schema cannot be generated (arbitrary types) fall back
    to hashing their field names, annotations and requiredness. Results are cached (bounded).
    Note that a pydantic upgrade that changes JSON-schema generation can change fingerprints.
    """
    check_schema(schema)
    try:
        described: Any = _strip_annotations(schema.model_json_schema(mode="validation"), names=False)
    except Exception:
        # Deliberately broad: pydantic raises several error types for schemas it cannot express.
        described = [
            [name, repr(field.annotation), field.is_required(), field.alias]
            for name, field in schema.model_fields.items()
        ]
    return _CHECKSUM_PREFIX + hashlib.sha256(_canonical(described)).hexdigest()


def _strip_annotations(node: Any, *, names: bool) -> Any:
    if isinstance(node, dict):
        if names:
            return {key: _strip_annotations(value, names=False) for key, value in node.items()}
        return {
            key: _strip_annotations(value, names=key in _NAME_MAPS)
            for key, value in node.items()
            if key not in _ANNOTATION_KEYWORDS
        }
    if isinstance(node, list):
        return [_strip_annotations(item, names=False) for item in node]
    return node


# --- encoding ------------------------------------------------------------------------------------


def _canonical(value: Any) -> bytes:
    """Canonical JSON bytes; raises ``ValueError`` (NaN/Infinity) or ``TypeError`` (not JSON)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")


def _checksum(body: Mapping[str, Any]) -> str:
    return _seal_bytes(_canonical(body), None)


def _seal_bytes(body: bytes, key: bytes | None) -> str:
    """The checksum of *body* (the envelope's bytes without the checksum member)."""
    if key is None:
        return _CHECKSUM_PREFIX + hashlib.sha256(body).hexdigest()
    return _KEYED_PREFIX + hmac.new(key, body, hashlib.sha256).hexdigest()


def checkpoint_key() -> bytes | None:
    """The checkpoint signing key from ``STROMA_CHECKPOINT_KEY`` (UTF-8), or ``None`` when unset
    or empty. Read on every call, so a key set while the process runs applies from then on."""
    raw = os.environ.get(KEY_ENV)
    return raw.encode("utf-8") if raw else None


def _keyed_checksum(body: Mapping[str, Any], key: bytes) -> str:
    return _seal_bytes(_canonical(body), key)


def _not_json(run_id: str, step_id: str | None, exc: Exception) -> CheckpointError:
    return CheckpointError(
        f"cannot write {record(run_id, step_id)}: the data is not representable "
        f"as JSON ({exc}); NaN and Infinity are not allowed",
        run_id=run_id,
        node_id=step_id,
    )


@functools.lru_cache(maxsize=512)
def _schema_member(model: type[BaseModel]) -> bytes:
    """``"schema":{"fingerprint":…,"name":…}`` for *model* (cached with its fingerprint)."""
    return b'"schema":' + _canonical({"name": schema_name(model), "fingerprint": schema_fingerprint(model)})


@functools.lru_cache(maxsize=256)
def _json_string(text: str) -> bytes:
    """*text* as a JSON string in UTF-8 (ids repeat from checkpoint to checkpoint: cached, bounded)."""
    return _canonical(text)


@functools.lru_cache(maxsize=8)
def _envelope_head(kind: str) -> bytes:
    """``{"format":…,"kind":…,"payload":`` (constant per kind)."""
    return b'{"format":"' + FORMAT.encode() + b'","kind":"' + kind.encode() + b'","payload":'


@functools.lru_cache(maxsize=256)
def _run_member(run_id: str) -> bytes:
    """``,"run_id":…,"saved_at":`` for *run_id* (constant per run: cached, bounded)."""
    return b',"run_id":' + _json_string(run_id) + b',"saved_at":'


@functools.lru_cache(maxsize=512)
def _envelope_tail(schema: bytes, step_id: str | None) -> bytes:
    """``,"schema":…,"step_id":…,"version":…}`` (constant per schema and step: cached, bounded)."""
    step = b"null" if step_id is None else _json_string(step_id)
    return b"," + schema + b',"step_id":' + step + b',"version":' + str(FORMAT_VERSION).encode() + b"}"


def _envelope(kind: str, run_id: str, step_id: str | None, payload: bytes, schema: bytes) -> bytes:
    """The sealed envelope as bytes, keys in sorted order, from an already encoded *payload*.

    Raises ``ValueError`` when an id is not encodable as UTF-8 (lone surrogates).
    """
    body = b"".join(
        (
            _envelope_head(kind),
            payload,
            _run_member(run_id),
            float.__repr__(time.time()).encode("ascii"),  # how JSON writes a finite float
            _envelope_tail(schema, step_id),
        )
    )
    checksum = _seal_bytes(body, checkpoint_key())
    return b'{"checksum":"' + checksum.encode("ascii") + b'",' + body[1:]


def _model_json(state: BaseModel, run_id: str, step_id: str) -> bytes:
    """*state*'s JSON bytes from pydantic-core, refusing non-finite floats as the format requires."""
    try:
        payload = state.__pydantic_serializer__.to_json(state, by_alias=True, round_trip=True)
    except PydanticSerializationError as exc:
        raise CheckpointError(
            f"cannot write {record(run_id, step_id)}: {type(state).__name__} cannot be serialised to JSON ({exc})",
            run_id=run_id,
            node_id=step_id,
        ) from exc
    if b"null" in payload or b"NaN" in payload or b"Infinity" in payload:
        # pydantic-core writes NaN / Infinity as null (or as constants, by model config): where
        # either may have happened, check the values the slow way so none is stored changed.
        try:
            _canonical(state.model_dump(mode="json", by_alias=True, round_trip=True))
        except (TypeError, ValueError, PydanticSerializationError) as exc:
            raise _not_json(run_id, step_id, exc) from exc
    return payload


def encode_step_bytes(run_id: str, step_id: str, state: BaseModel, schema: type[BaseModel] | None = None) -> bytes:
    """:func:`encode_step` as UTF-8 bytes (what an in-process store keeps, with no decoding)."""
    check_run_id(run_id)
    check_step_id(step_id)
    if not isinstance(state, BaseModel):
        raise TypeError(f"state must be a pydantic BaseModel instance, got {type(state).__name__}")
    model = type(state) if schema is None else check_schema(schema)
    if type(state) is not model:
        # Exact type: a subclass would store fields that *schema* may reject when loading.
        state = _revalidate(state, model, run_id, step_id, action="write")
    payload = _model_json(state, run_id, step_id)
    try:
        return _envelope(KIND_STEP, run_id, step_id, payload, _schema_member(model))
    except (TypeError, ValueError) as exc:
        raise _not_json(run_id, step_id, exc) from exc


def encode_step(run_id: str, step_id: str, state: BaseModel, schema: type[BaseModel] | None = None) -> str:
    """Serialise *state* (coerced to *schema* when given) into a sealed envelope.

    Raises ``TypeError`` / ``ValueError`` for malformed ids or a non-model *state*, and
    :class:`CheckpointError` when the state cannot be coerced to *schema* or represented as JSON.
    """
    return encode_step_bytes(run_id, step_id, state, schema).decode("utf-8")


def encode_manifest(run_id: str, manifest: Mapping[str, Any]) -> str:
    """Serialise a run manifest (a JSON object) into a sealed envelope.

    Raises ``TypeError`` when *manifest* is not a mapping with ``str`` keys, and
    :class:`CheckpointError` when a value is not representable as JSON.
    """
    check_run_id(run_id)
    if not isinstance(manifest, Mapping) or not all(isinstance(key, str) for key in manifest):
        raise TypeError("a run manifest must be a mapping with str keys (a JSON object)")
    try:
        return _envelope(KIND_MANIFEST, run_id, None, _canonical(dict(manifest)), b'"schema":null').decode("utf-8")
    except (TypeError, ValueError) as exc:
        raise _not_json(run_id, None, exc) from exc


# --- decoding ------------------------------------------------------------------------------------


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name}")


def open_envelope(raw: str | bytes | bytearray, run_id: str, step_id: str | None) -> dict[str, Any]:
    """Parse and verify stored text; return the envelope. Raises :class:`CheckpointError`.

    Checks, in order: UTF-8, JSON, the envelope's shape and format, the format version, the
    checksum, and that the envelope belongs to *run_id* / *step_id* (``None`` = the run manifest).
    """

    def fail(problem: str) -> CheckpointError:
        return CheckpointError(
            f"{record(run_id, step_id)} could not be loaded: as stored it {problem}. "
            "Clear the run's checkpoints (CheckpointManager.clear) or restore the store from a backup.",
            run_id=run_id,
            node_id=step_id,
        )

    data: bytes | None
    if isinstance(raw, (bytes, bytearray)):
        data = bytes(raw)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise fail("is not UTF-8 text (corrupt data)") from exc
    else:
        text = raw
        try:
            data = raw.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates: a str that was never UTF-8
            data = None
    try:
        envelope = json.loads(text, object_pairs_hook=_reject_duplicates, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise fail(f"is not valid JSON (truncated or corrupt: {exc})") from exc
    if not isinstance(envelope, dict) or envelope.get("format") != FORMAT:
        raise fail("is not a Stroma checkpoint envelope (written by another program or an older Stroma)")
    version = envelope.get("version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise fail("has no valid format version")
    if version != FORMAT_VERSION:
        raise fail(f"uses format version {version}; this Stroma reads version {FORMAT_VERSION}")
    if set(envelope) != _ENVELOPE_FIELDS:
        raise fail("has a malformed envelope (unexpected or missing fields)")
    stored_checksum = envelope.pop("checksum")
    if not isinstance(stored_checksum, str):
        raise fail("has no valid checksum")
    key = checkpoint_key()
    keyed = stored_checksum.startswith(_KEYED_PREFIX)
    if key is not None and not keyed:
        raise fail(
            f"is not signed with the checkpoint key ({KEY_ENV} is set): it was written without a key, "
            f"or edited and re-sealed; unset {KEY_ENV} to read checkpoints written before the key was set"
        )
    if key is None and keyed:
        raise fail(f"is signed with a checkpoint key; set {KEY_ENV} to the key it was written with")
    try:
        actual = _verify_checksum(data, stored_checksum, envelope, key)
    except (TypeError, ValueError) as exc:  # e.g. lone surrogates from a str that was never UTF-8
        raise fail("cannot be re-encoded for verification (corrupt text)") from exc
    if not hmac.compare_digest(stored_checksum.encode("utf-8", "replace"), actual.encode("ascii")):
        if key is not None:
            raise fail(f"fails its keyed checksum: the stored data was modified, or written with another {KEY_ENV}")
        raise fail("fails its checksum: the stored data was modified or corrupted")
    kind = KIND_MANIFEST if step_id is None else KIND_STEP
    if envelope["kind"] != kind:
        raise fail(f"is a {envelope['kind']!r} record where a {kind!r} record was expected")
    if envelope["run_id"] != run_id or envelope["step_id"] != step_id:
        raise fail(f"belongs to {_place(str(envelope['run_id']), envelope['step_id'])} (copied or misplaced data)")
    return envelope


def _verify_checksum(data: bytes | None, stored: str, envelope: Mapping[str, Any], key: bytes | None) -> str:
    """The checksum the stored bytes should carry: over the bytes after the leading checksum
    member when the text has that layout (everything this format writes), else over the
    canonical JSON of the other fields (text re-formatted since it was written)."""
    if data is not None:
        member = b'{"checksum":' + _canonical(stored) + b","
        if data.startswith(member):
            return _seal_bytes(b"{" + data[len(member) :], key)
    return _seal_bytes(_canonical(envelope), key)


def _stored_schema(envelope: Mapping[str, Any]) -> tuple[str, str]:
    schema = envelope["schema"]
    if isinstance(schema, dict) and isinstance(schema.get("name"), str) and isinstance(schema.get("fingerprint"), str):
        return schema["name"], schema["fingerprint"]
    return "", ""


def _revalidate(state: BaseModel, model: type[M], run_id: str, step_id: str, *, action: str) -> M:
    try:
        return model.model_validate_json(state.model_dump_json(by_alias=True, round_trip=True))
    except (ValidationError, PydanticSerializationError) as exc:
        detail = describe_validation_error(None, exc) if isinstance(exc, ValidationError) else str(exc)
        raise CheckpointError(
            f"cannot {action} {record(run_id, step_id)}: a {type(state).__name__} "
            f"does not validate as {model.__name__} ({detail})",
            run_id=run_id,
            node_id=step_id,
        ) from exc


def coerce_to_schema(state: BaseModel, schema: type[M], run_id: str, step_id: str) -> M:
    """Return *state* as an instance of *schema*, revalidating through JSON if needed.

    Used for results of third-party stores. Raises :class:`CheckpointError` when it does not validate.
    """
    if isinstance(state, schema):
        return state
    return _revalidate(state, schema, run_id, step_id, action="load")


def decode_step(raw: str | bytes | bytearray, run_id: str, step_id: str, schema: type[M]) -> M:
    """Verify stored text and validate its payload with the caller's *schema*.

    Raises :class:`CheckpointError` when the envelope is corrupt, tampered with or misplaced, when
    the schema fingerprint recorded at save time differs from *schema*'s (the step's output model
    changed since the checkpoint was written), or when the payload does not validate.
    """
    check_schema(schema)
    envelope = open_envelope(raw, run_id, step_id)
    stored_name, stored_fingerprint = _stored_schema(envelope)
    expected = schema_fingerprint(schema)
    if stored_fingerprint != expected:
        raise CheckpointError(
            f"{record(run_id, step_id)} was written with schema {stored_name or '?'} "
            f"({stored_fingerprint or 'no fingerprint'}) but is being loaded as {schema_name(schema)} "
            f"({expected}); the step's output schema changed since it was saved. Resume with the code "
            "that wrote it, or clear the run's checkpoints and start again.",
            run_id=run_id,
            node_id=step_id,
        )
    try:
        return schema.model_validate_json(_canonical(envelope["payload"]))
    except ValidationError as exc:
        raise CheckpointError(
            f"{record(run_id, step_id)} does not validate as {schema_name(schema)}: "
            f"{describe_validation_error(None, exc)}",
            run_id=run_id,
            node_id=step_id,
        ) from exc


def decode_untyped(raw: str | bytes | bytearray, run_id: str, step_id: str) -> CheckpointData:
    """Verify stored text and return its payload as a :class:`CheckpointData` (no schema, no import).

    Raises :class:`CheckpointError` as :func:`open_envelope` does, or when the payload is not a JSON
    object (a ``RootModel``): such a checkpoint can only be loaded with its schema.
    """
    envelope = open_envelope(raw, run_id, step_id)
    payload = envelope["payload"]
    if not isinstance(payload, dict):
        raise CheckpointError(
            f"{record(run_id, step_id)} is not a JSON object and cannot be loaded "
            "without its schema; use CheckpointManager.resume(run_id, step_id, Schema) or load_typed",
            run_id=run_id,
            node_id=step_id,
        )
    data = CheckpointData.model_validate(payload)
    data._schema_name, data._schema_fingerprint = _stored_schema(envelope)
    return data


def decode_manifest(raw: str | bytes | bytearray, run_id: str) -> dict[str, Any]:
    """Verify a stored manifest and return it as a ``dict``. Raises :class:`CheckpointError`."""
    envelope = open_envelope(raw, run_id, None)
    payload = envelope["payload"]
    if not isinstance(payload, dict):
        raise CheckpointError(f"{record(run_id, None)} is not a JSON object", run_id=run_id, node_id=None)
    return payload
