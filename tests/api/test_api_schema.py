"""Property tests of the service against its own OpenAPI schema (schemathesis): whatever the
input, no 5xx, and responses match the documented status codes and bodies (lease renewal and
the plan segments of a run's snapshot history included).

The schema is loaded at import (schemathesis' `from_fixture` does not work with pytest 9), over
an app on a data home in a temporary folder removed at exit.
"""

import atexit
import shutil
import tempfile
from pathlib import Path

import schemathesis
from api_fixtures import make_service_home
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error, response_schema_conformance, status_code_conformance

from paced.api.app import create_app
from paced.api.settings import Settings

_root = Path(tempfile.mkdtemp(prefix="paced-schema-"))
atexit.register(shutil.rmtree, _root, True)
_home, _ = make_service_home(_root, n=40)
_app = create_app(Settings(home=_home.root, max_shard_size=64, max_epochs=3, max_num_samples=100))
schema = schemathesis.openapi.from_asgi("/openapi.json", _app)


@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_input_makes_a_server_error(case):
    case.call_and_validate(checks=[not_a_server_error, status_code_conformance, response_schema_conformance])


def test_the_schema_documents_renewal_and_the_plan_segments_of_a_run():
    from fastapi.testclient import TestClient

    doc = TestClient(_app).get("/openapi.json").json()
    renew = doc["paths"]["/v1/runs/{run_id}/leases/{lease_id}/renew"]["post"]
    assert {"200", "401", "404", "409", "422"} <= set(renew["responses"]) and "security" in renew
    segment = doc["components"]["schemas"]["PlanSegment"]["properties"]
    assert {"epoch", "segment", "from_shard", "snapshot_id", "student_ids", "checkpoint_id"} <= set(segment)
    assert "handed_out" in doc["components"]["schemas"]["EpochProgress"]["properties"]
