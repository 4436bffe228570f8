"""Layer 0: SQLModel tables, the engine (SQLite by default, any SQLAlchemy URL) and migrations."""

from store.engine import DEFAULT_URL, StoreError, open_store, session_scope
from store.migrations import MIGRATIONS, migrate
from store.models import (
    Campaign,
    EmailRecord,
    EngagementEvent,
    FactRecord,
    MiniatureRecord,
    ProfileRecord,
    Prospect,
    Review,
    Run,
    RunStatus,
    SchemaMigration,
    ToolCall,
    Trace,
    WebSnapshot,
)

__all__ = [
    "DEFAULT_URL",
    "MIGRATIONS",
    "Campaign",
    "EmailRecord",
    "EngagementEvent",
    "FactRecord",
    "MiniatureRecord",
    "ProfileRecord",
    "Prospect",
    "Review",
    "Run",
    "RunStatus",
    "SchemaMigration",
    "StoreError",
    "ToolCall",
    "Trace",
    "WebSnapshot",
    "migrate",
    "open_store",
    "session_scope",
]
