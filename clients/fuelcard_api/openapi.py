"""The OpenAPI 3.1 document of the JSON API, made from the route table
(app.ROUTES) and the shapes (schemas.SCHEMAS): what is served is what is
documented, as both come from the same table."""

from __future__ import annotations

import functools
import re
from typing import Any

from fuelcard_api import schemas
from fuelcard_api.app import API_VERSION, IDEMPOTENCY_KEY, ROUTES, Route
from fuelcard_api.schemas import ref

_STATUS_TEXT = {400: "The request is malformed or breaks a rule (see reason and fields)",
                401: "No session, or it expired: log in again",
                403: "Not something this principal has authority over, or the core refused",
                404: "Not found", 409: "The state does not allow it (e.g. STEP_UP_REQUIRED, "
                "INSUFFICIENT_FUNDS)", 413: "The body is larger than 64 KiB",
                429: "Rate-limited (per principal and per IP address); see Retry-After",
                503: "The core or the database is unavailable; retry"}
_MUTATING = frozenset({"POST", "PUT", "DELETE"})


def _operation(route: Route) -> dict[str, Any]:
    op: dict[str, Any] = {"operationId": route.operation_id, "summary": route.summary,
                          "tags": [route.tag]}
    params = [{"name": p.name, "in": p.where, "required": p.where == "path", "schema": p.schema,
               "description": p.description} for p in route.params]
    if route.method in _MUTATING and route.auth and route.operation_id != "logout":
        params.append({"name": IDEMPOTENCY_KEY, "in": "header", "required": False,
                       "schema": {"type": "string", "minLength": 1, "maxLength": 200},
                       "description": "Repeat a change that got no answer with the same key: the "
                                      "first answer comes back, nothing changes twice."})
    if params:
        op["parameters"] = params
    if route.body is not None:
        op["requestBody"] = {"required": True,
                             "content": {"application/json": {"schema": ref(route.body)}}}
    ok = "201" if route.method == "POST" else "200"
    responses: dict[str, Any] = {}
    if route.response is None:
        responses["204"] = {"description": "Done"}
    else:
        responses[ok] = {"description": "OK", "content": {"application/json": {
            "schema": ref(route.response)}}}
    for status in route.errors:
        responses[str(status)] = {"description": _STATUS_TEXT[status], "content": {
            "application/json": {"schema": ref("Error")}}}
    op["responses"] = responses
    if not route.auth:
        op["security"] = []
    return op


@functools.cache
def document() -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    for route in ROUTES:
        assert set(re.findall(r"{(\w+)}", route.path)) == {p.name for p in route.params
                                                          if p.where == "path"}, route.path
        paths.setdefault(route.path, {})[route.method.lower()] = _operation(route)
    return {
        "openapi": "3.1.0",
        "info": {"title": "fuelcard JSON API", "version": API_VERSION,
                 "description": "For card holders' apps and mini-programs and fleet managers: log in "
                                "(POST /v1/sessions), then send `Authorization: Bearer <token>`. "
                                "Amounts are integers in fen; times RFC 3339 in UTC."},
        "servers": [{"url": "/"}],
        "paths": paths,
        "components": {
            "schemas": schemas.SCHEMAS,
            "securitySchemes": {"session": {"type": "http", "scheme": "bearer",
                                            "description": "the token from POST /v1/sessions"}},
        },
        "security": [{"session": []}],
    }
