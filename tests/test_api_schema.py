"""Property tests of the service against its own OpenAPI schema (schemathesis): whatever the
input, no 5xx, and responses match the documented status codes and bodies.

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
schema = schemathesis.openapi.from_asgi(
    "/openapi.json", create_app(Settings(home=_home.root, max_shard_size=64, max_epochs=3, max_num_samples=100)))


@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_input_makes_a_server_error(case):
    case.call_and_validate(checks=[not_a_server_error, status_code_conformance, response_schema_conformance])
