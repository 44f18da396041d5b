"""edp: Event-Driven Packaging.

Listens to S3 object events, groups them into batches by key prefix, and emits one
``package-objects-ready`` event per batch (see ``SPEC.md`` in the docs). The public
API is what entry points and integrations need; everything else is internal.
"""

from edp.config import Settings, load_settings
from edp.core.events import BatchReady, EventKind, ObjectEvent, PackageReady, Trigger
from edp.core.rules import GroupingRules, RuleBook
from edp.decode import decode_message
from edp.engine import Engine, Message
from edp.errors import (
    ConfigError,
    DecodeError,
    EdpError,
    NotFound,
    PermanentSinkError,
    SinkError,
    StoreError,
)
from edp.store import open_store

__version__ = "0.1.0"

__all__ = [
    "BatchReady",
    "ConfigError",
    "DecodeError",
    "EdpError",
    "Engine",
    "EventKind",
    "GroupingRules",
    "Message",
    "NotFound",
    "ObjectEvent",
    "PackageReady",
    "PermanentSinkError",
    "RuleBook",
    "Settings",
    "SinkError",
    "StoreError",
    "Trigger",
    "__version__",
    "decode_message",
    "load_settings",
    "open_store",
]
