"""A tenants file for tests: keys, their digests, and a server with two tenants and an admin."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

from hotlora.server.tenants import key_digest
from tests.server.support import bearer, make_settings, serve

KEYS = {"acme": "sk-acme-7f3e9a", "bob": "sk-bob-21c44d", "ops": "sk-ops-admin-9bb0"}
ROLES = {"acme": "tenant", "bob": "tenant", "ops": "admin"}


def tenants_doc(limits: dict[str, dict[str, int]] | None = None,
                keys: dict[str, str] | None = None) -> dict[str, Any]:
    keys = keys or KEYS
    return {
        "tenants": [
            {
                "name": name,
                "role": ROLES.get(name, "tenant"),
                "keys_sha256": [key_digest(key)],
                **({"limits": limits[name]} if limits and name in limits else {}),
            }
            for name, key in keys.items()
        ]
    }


def write_tenants(path: Path, doc: dict[str, Any]) -> Path:
    if path.suffix == ".json":
        path.write_text(json.dumps(doc))
    else:
        import yaml

        path.write_text(yaml.safe_dump(doc))
    return path


def as_(who: str) -> dict[str, str]:
    return bearer(KEYS[who])


@contextmanager
def tenant_server(
    tmp_path: Path, limits: dict[str, dict[str, int]] | None = None, **overrides: Any
) -> Iterator[TestClient]:
    path = write_tenants(tmp_path / "tenants.yaml", tenants_doc(limits))
    with serve(make_settings(tmp_path, tenants_file=path, **overrides)) as client:
        yield client
