"""schemathesis hooks for tests/test_api_contract.py (loaded through SCHEMATHESIS_HOOKS).

- The only server error the API may answer while Temporal is unreachable is the documented 503
  saying so (README.md "JSON API"); any other 5xx, or a 503 for another reason, fails.
- Path parameters are sometimes the names and ids of rows the test made (SEEDED), so the
  operations on an existing endpoint, key, model and version are reached, not only their 404s.
"""
from __future__ import annotations

import json

import schemathesis
from hypothesis import strategies as st

TEMPORAL_DOWN = "Temporal is not reachable"
# Endpoints (and models of the same names) the test creates before schemathesis starts.
SEEDED = {"name": ("contract-standby", "contract-running", "contract-stopped"), "key_id": (1, 2, 3), "number": (1,),
          "project": ("default",), "user": ("admin",), "token_id": (1, 2, 3)}
# The id of the token schemathesis runs with, far from the small ids it tries: revoking it would
# make every later call a 401.
OWN_TOKEN_ID = 1_234_567_891


@schemathesis.check
def temporal_outage_is_the_only_server_error(ctx, response, case) -> None:
    if response.status_code < 500:
        return
    try:
        message = json.loads(response.content).get("error", "")
    except (ValueError, AttributeError):
        message = ""
    if response.status_code != 503 or TEMPORAL_DOWN not in message:
        raise AssertionError(f"server error {response.status_code} that is not the documented 503 "
                             f"'{TEMPORAL_DOWN}': {response.content[:300]!r}")


@schemathesis.hook
def filter_path_parameters(context, path_parameters):
    return str((path_parameters or {}).get("token_id")) != str(OWN_TOKEN_ID)


@schemathesis.hook
def flatmap_path_parameters(context, path_parameters):
    seeded = {name: st.sampled_from(SEEDED[name]) for name in path_parameters or {} if name in SEEDED}
    if not seeded:
        return st.just(path_parameters)
    return st.one_of(st.just(path_parameters),
                     st.fixed_dictionaries(seeded).map(lambda values: {**path_parameters, **values}))


@schemathesis.hook
def before_call(ctx, case, **kwargs):
    # The stateful phase takes ids from answers (GET /tokens lists this run's own token) and
    # path-parameter filters do not see them: never revoke the token the run sends.
    params = case.path_parameters or {}
    if str(params.get("token_id")) == str(OWN_TOKEN_ID):
        case.path_parameters = {**params, "token_id": SEEDED["token_id"][0]}
