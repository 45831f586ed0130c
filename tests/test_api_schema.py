"""Schemathesis, a third-party fuzzer, against the service's own OpenAPI schema, with all its
checks: whatever it sends that the schema allows is answered as the schema says, and what the
schema forbids is refused with a documented 4xx. Both kinds of request, for every operation."""

from __future__ import annotations

import hypothesis
import pytest
import schemathesis

from digitune import serve
from test_serve import started

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(
    "mode", [schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE]
)
def test_the_api_keeps_to_its_schema(serving, mode):
    app = serve.create_app(poll_seconds=0)
    with started(app):
        schema = schemathesis.openapi.from_asgi("/openapi.json", app)
        operations = [result.ok() for result in schema.get_all_operations()]
        assert {operation.label for operation in operations} >= {
            "POST /predict",
            "GET /health",
            "GET /metadata",
            "POST /reload",
        }
        for operation in operations:
            if mode == schemathesis.GenerationMode.NEGATIVE and operation.label != "POST /predict":
                continue  # Nothing to send wrong: no parameters, no body.

            @hypothesis.given(case=operation.as_strategy(generation_mode=mode))
            @hypothesis.settings(
                max_examples=25,
                deadline=None,
                derandomize=True,
                database=None,
                suppress_health_check=list(hypothesis.HealthCheck),
            )
            def keeps_to_the_schema(case):
                case.call_and_validate()

            keeps_to_the_schema()
