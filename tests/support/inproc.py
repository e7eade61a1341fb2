"""An in-process app over a fake engine, for the surface tests, and the PHI canaries they send."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from starlette.testclient import TestClient

from mlserve.engine.fake import FakeEngine
from mlserve.security.audit import log_files

# Patient identifiers no log line, metric or audit record may ever contain.
CANARIES = ("Jane Canary-Doe", "MRN 00417733")
CANARY = " ".join(CANARIES)


@dataclass
class App:
    """An in-process app over a fake engine, and where it writes its audit log."""

    client: TestClient
    engine: FakeEngine
    home: Path

    def records(self) -> list[dict[str, Any]]:
        """Every audit record, after the app's lifespan has ended (which flushes the writer)."""
        self.client.__exit__(None, None, None)
        return [json.loads(line) for f in log_files(self.home / "audit") for line in f.read_text().splitlines()]
