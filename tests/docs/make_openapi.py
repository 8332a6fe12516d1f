"""Write docs/openapi.json: the OpenAPI document the app publishes at GET /openapi.json.

    .venv/bin/python tests/docs/make_openapi.py          # rewrite docs/openapi.json
    .venv/bin/python tests/docs/make_openapi.py --check  # exit 1 if it is not current

tests/docs/test_docs_current.py fails while the committed file differs from the app's. The
document does not depend on the settings (it is built without loading the model).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

OPENAPI_JSON = Path(__file__).resolve().parents[2] / "docs" / "openapi.json"


def openapi() -> dict[str, Any]:
    from hotlora.server.config import Settings
    from hotlora.server.main import create_app

    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(adapter_store=Path(tmp) / "store", admin_key=None, api_keys=[])
        spec: dict[str, Any] = create_app(settings).openapi()
    return spec


def openapi_text() -> str:
    return json.dumps(openapi(), indent=2, ensure_ascii=False) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if docs/openapi.json is stale")
    args = ap.parse_args()
    text = openapi_text()
    if args.check:
        current = OPENAPI_JSON.read_text() if OPENAPI_JSON.exists() else ""
        if current != text:
            print(f"{OPENAPI_JSON} is stale: run {Path(__file__).name} without --check")
            return 1
        return 0
    OPENAPI_JSON.write_text(text)
    print(f"wrote {OPENAPI_JSON}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
