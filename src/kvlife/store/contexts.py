"""Named contexts on the server: a manifest and the chunk keys it names, per tenant, beside the chunks.

    TENANT_DIR/contexts/ID.json     {"manifest": {...}, "chunks": ["<64 hex>", ...]}

A streamed context is store chunks (one namespace per codec level) plus a manifest that says how to
read them. The server does not interpret the manifest (`kvlife.stream.context` does); it keeps the
keys so that a context is listed only once every chunk it names is stored (the server checks before
`put`), and so that deleting a context drops the chunks no other context of the tenant names.
Written atomically (`disk.write_atomic`). Torch-free.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from kvlife.store.base import StoreError
from kvlife.store.disk import remove_file, write_atomic

CONTEXT_ID = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")


def check_context_id(context_id: str) -> str:
    if not isinstance(context_id, str) or not CONTEXT_ID.match(context_id):
        raise StoreError(f"invalid context id {context_id!r}: 1-128 letters, digits, '.', '_', '-' "
                         "(not starting with '.')")
    return context_id


class ContextEntries:
    """One tenant's contexts: `TENANT_DIR/contexts/ID.json`."""

    def __init__(self, tenant_dir: Path) -> None:
        self.root = tenant_dir / "contexts"

    def path(self, context_id: str) -> Path:
        return self.root / f"{check_context_id(context_id)}.json"

    def ids(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.stem for p in self.root.glob("*.json") if CONTEXT_ID.match(p.stem))

    def get(self, context_id: str) -> dict[str, Any] | None:
        """The stored document, or None if the tenant has no such context."""
        try:
            return json.loads(self.path(context_id).read_bytes())
        except FileNotFoundError:
            return None

    def put(self, context_id: str, manifest: dict[str, Any], keys: list[str]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        body = json.dumps({"manifest": manifest, "chunks": keys}, separators=(",", ":")).encode()
        write_atomic(self.path(context_id), [body])

    def delete(self, context_id: str) -> list[str] | None:
        """Drop a context; returns the keys it named that no other context of the tenant names (None: no
        such context)."""
        entry = self.get(context_id)
        if entry is None:
            return None
        remove_file(self.path(context_id))
        still_named = {key for other in self.ids() for key in (self.get(other) or {}).get("chunks", [])}
        return [key for key in entry["chunks"] if key not in still_named]
