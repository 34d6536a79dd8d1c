"""Independent readers of SBOM documents for the tests: spdx-tools and cyclonedx-python-lib."""

from __future__ import annotations

import tempfile
from pathlib import Path

from cyclonedx.schema import SchemaVersion
from cyclonedx.validation.json import JsonStrictValidator
from spdx_tools.spdx.parser.parse_anything import parse_file
from spdx_tools.spdx.validation.document_validator import validate_full_spdx_document


def spdx_problems(document: bytes) -> list[str]:
    """spdx-tools' validation messages for an SPDX 2.3 JSON document (empty: valid)."""
    with tempfile.TemporaryDirectory() as work:
        path = Path(work) / "sbom.spdx.json"
        path.write_bytes(document)
        parsed = parse_file(str(path))
    return [m.validation_message for m in validate_full_spdx_document(parsed, "SPDX-2.3")]


def cyclonedx_problem(document: bytes) -> str | None:
    """cyclonedx-python-lib's strict JSON 1.5 validation error, ``None`` when valid."""
    error = JsonStrictValidator(SchemaVersion.V1_5).validate_str(document.decode())
    return None if error is None else str(error)
