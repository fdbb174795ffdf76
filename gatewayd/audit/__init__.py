"""Tamper-evident audit log: typed events → hash-chained JSON lines with signed checkpoints.

Owns the public API of the audit package; the modules behind it:

* `events` — event names (`EVENT_NAMES`), field schema, escaping of values;
* `chain` — canonical form, record hash, checking one stored line;
* `signing` — Ed25519 key files and checkpoint signatures;
* `files` — file names (rotated, quarantine), streaming and tail reading;
* `writer` — the `AuditLog`; `resume` — where an existing log ends (start-up rules);
* `verify` — `verify_files`; `query` — `query_files`; `cli` — ``gatewayd audit``.
"""

from gatewayd.audit.chain import GENESIS_PREV, canonical_json, record_hash
from gatewayd.audit.events import (
    CONTEXT_FIELDS,
    EVENT_NAMES,
    EventName,
    FieldError,
    SecretFieldError,
    UnknownEventError,
)
from gatewayd.audit.query import query_files
from gatewayd.audit.resume import AuditResumeError
from gatewayd.audit.signing import AuditKeyError
from gatewayd.audit.verify import Problem, VerifyResult, verify_files
from gatewayd.audit.writer import AuditConfigError, AuditLog, AuditRecord, AuditWriteError

__all__ = [
    "CONTEXT_FIELDS",
    "EVENT_NAMES",
    "GENESIS_PREV",
    "AuditConfigError",
    "AuditKeyError",
    "AuditLog",
    "AuditRecord",
    "AuditResumeError",
    "AuditWriteError",
    "EventName",
    "FieldError",
    "Problem",
    "SecretFieldError",
    "UnknownEventError",
    "VerifyResult",
    "canonical_json",
    "query_files",
    "record_hash",
    "verify_files",
]
