"""The OpenAPI 3.1 document of /api/v1, generated from the operation registry, and a docs page.

Nothing here is written by hand: paths, parameters, bodies and responses come from the
:class:`~api.contract.Operation` declarations and their msgspec types
(``msgspec.json.schema_components`` emits JSON Schema 2020-12, the dialect of OpenAPI 3.1).
The docs page is rendered on the server from the same document, so it needs no script or CDN.
"""

from __future__ import annotations

import html
import re
from functools import lru_cache
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response

from . import schemas
from .contract import MAX_PAGE_SIZE, Api
from .v1 import api

TITLE = "Galley API"
VERSION = "1.0.0"
REF = "#/components/schemas/{name}"
DOCS_CSP = "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'"

_ERROR_TEXT = {
    400: "Malformed JSON",
    401: "Not signed in, or the token is invalid, expired or revoked",
    403: "The caller's role or branch does not allow this",
    404: "Not found (or not visible to the caller)",
    409: "Conflict",
    413: "Body too large",
    415: "Not JSON",
    422: "Validation error, with field-level details",
    429: "Rate limited or locked out (see Retry-After)",
}


def _envelope(data: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {"data": data, "meta": meta},
        "required": ["data", "meta"],
    }


def _not_null(schema: dict[str, Any]) -> dict[str, Any]:
    """A query parameter is absent rather than null: drop the null branch of an optional."""
    options = [s for s in schema.get("anyOf", []) if s != {"type": "null"}]
    return options[0] if len(options) == 1 else schema


def _error_responses(codes: set[int]) -> dict[str, Any]:
    return {
        str(code): {
            "description": _ERROR_TEXT.get(code, "Error"),
            "content": {"application/json": {"schema": {"$ref": REF.format(name="Error")}}},
        }
        for code in sorted(codes)
    }


def build_document(registry: Api) -> dict[str, Any]:
    """The OpenAPI 3.1 document of every operation in ``registry``."""
    types: list[Any] = [schemas.Error, schemas.PageMeta]
    for op in registry.operations:
        types += [t for t in (op.body, op.response, op.query) if t is not None]
    generated, components = msgspec.json.schema_components(types, ref_template=REF)
    schema_of = dict(zip(map(id, types), generated, strict=True))

    paths: dict[str, dict[str, Any]] = {}
    for op in registry.operations:
        parameters: list[dict[str, Any]] = [
            {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
            for name in re.findall(r"{(\w+)}", op.path)
        ]
        if op.paginated:
            parameters += [
                {"name": "cursor", "in": "query", "required": False, "schema": {"type": "string"}},
                {
                    "name": "limit",
                    "in": "query",
                    "required": False,
                    "schema": {"type": "integer", "minimum": 1, "maximum": MAX_PAGE_SIZE},
                },
            ]
        if op.query is not None:
            properties = components[op.query.__name__]["properties"]
            parameters += [
                {"name": name, "in": "query", "required": False, "schema": _not_null(schema)}
                for name, schema in properties.items()
            ]
        if op.idempotent:
            parameters.append(
                {
                    "name": "Idempotency-Key",
                    "in": "header",
                    "required": False,
                    "schema": {"type": "string", "minLength": 1, "maxLength": 255},
                    "description": "Retry safely: the first response is replayed for 24 hours.",
                }
            )
        errors = set(op.errors)
        if op.body is not None:
            errors |= {400, 415, 422}
        if op.query is not None or op.paginated:
            errors.add(422)
        if op.access != "public":
            errors.add(401)
            if op.access != "authenticated":
                errors.add(403)
        if op.status == 204:
            success: dict[str, Any] = {"description": "Done (no content)"}
        else:
            meta = {"$ref": REF.format(name="PageMeta")} if op.paginated else {"type": "null"}
            data = schema_of[id(op.response)] if op.response is not None else {"type": "null"}
            success = {
                "description": "Success",
                "content": {"application/json": {"schema": _envelope(data, meta)}},
            }
        operation: dict[str, Any] = {
            "operationId": op.operation_id,
            "summary": op.summary,
            "tags": [op.tag],
            "x-permission": op.access,
            "security": [] if op.access == "public" else [{"bearerAuth": []}],
            "parameters": parameters,
            "responses": {str(op.status): success, **_error_responses(errors)},
        }
        if op.body is not None:
            operation["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": schema_of[id(op.body)]}},
            }
        paths.setdefault(op.path, {})[op.method.lower()] = operation

    return {
        "openapi": "3.1.0",
        "info": {
            "title": TITLE,
            "version": VERSION,
            "description": "Online-only operations of Galley: accounts, staff, security. "
            "Success: {data, meta}; errors: {code, message, details}.",
        },
        "servers": [{"url": "/api/v1"}],
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {
                "bearerAuth": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}
            },
        },
    }


@lru_cache(maxsize=1)
def _document_bytes() -> bytes:
    return msgspec.json.encode(build_document(api))


async def openapi_json(request: Request) -> Response:
    """The OpenAPI 3.1 document."""
    return Response(_document_bytes(), media_type="application/json")


def _schema_text(schema: dict[str, Any]) -> str:
    if "$ref" in schema:
        return str(schema["$ref"]).rsplit("/", 1)[-1]
    if "anyOf" in schema:
        return " | ".join(_schema_text(s) for s in schema["anyOf"])
    if schema.get("type") == "array":
        return f"list of {_schema_text(schema.get('items', {}))}"
    if "enum" in schema:
        return " | ".join(repr(v) for v in schema["enum"])
    return str(schema.get("type", "any"))


def render_docs(document: dict[str, Any]) -> str:
    """A self-contained HTML page describing every operation and schema of ``document``."""
    e = html.escape
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>{e(document['info']['title'])}</title><style>",
        "body{font:15px/1.5 system-ui,sans-serif;max-width:60em;margin:2em auto;padding:0 1em}",
        "code,.m{font-family:ui-monospace,monospace}.m{font-weight:bold;margin-right:.5em}",
        "section{border-top:1px solid #ccc;padding:.5em 0}table{border-collapse:collapse}",
        "td,th{border:1px solid #ddd;padding:.2em .5em;text-align:left;vertical-align:top}",
        "</style></head><body>",
        f"<h1>{e(document['info']['title'])} <small>{e(document['info']['version'])}</small></h1>",
        f"<p>{e(document['info']['description'])}</p>",
        "<p>Machine-readable: <a href='openapi.json'>openapi.json</a> (OpenAPI 3.1).</p>",
    ]
    base = document["servers"][0]["url"]
    for path, methods in document["paths"].items():
        for method, op in methods.items():
            parts.append(
                f"<section id='{e(op['operationId'])}'><h3><span class='m'>{e(method.upper())}"
                f"</span><code>{e(base + path)}</code></h3><p>{e(op['summary'])}</p>"
                f"<p>Requires: <code>{e(op['x-permission'])}</code></p>"
            )
            if op["parameters"]:
                rows = "".join(
                    f"<tr><td><code>{e(p['name'])}</code></td><td>{e(p['in'])}</td>"
                    f"<td>{e(_schema_text(p['schema']))}</td></tr>"
                    for p in op["parameters"]
                )
                parts.append(f"<table><tr><th>parameter</th><th>in</th><th>type</th></tr>{rows}")
                parts.append("</table>")
            if "requestBody" in op:
                body = op["requestBody"]["content"]["application/json"]["schema"]
                parts.append(f"<p>Body: <code>{e(_schema_text(body))}</code></p>")
            for code, response in op["responses"].items():
                if code.startswith("2") and "content" in response:
                    envelope = response["content"]["application/json"]["schema"]
                    data = _schema_text(envelope["properties"]["data"])
                    parts.append(f"<p>Returns ({e(code)}): <code>data: {e(data)}</code></p>")
            codes = ", ".join(e(code) for code in op["responses"])
            parts.append(f"<p>Responses: {codes}</p></section>")
    parts.append("<h2>Schemas</h2>")
    for name, schema in document["components"]["schemas"].items():
        rows = "".join(
            f"<tr><td><code>{e(field)}</code></td><td>{e(_schema_text(spec))}</td></tr>"
            for field, spec in schema.get("properties", {}).items()
        )
        parts.append(
            f"<section id='schema-{e(name)}'><h3>{e(name)}</h3>"
            f"<p>{e(schema.get('description', ''))}</p><table>{rows}</table></section>"
        )
    parts.append("</body></html>")
    return "".join(parts)


@lru_cache(maxsize=1)
def _docs_html() -> str:
    return render_docs(build_document(api))


async def docs_page(request: Request) -> Response:
    """Human-readable API documentation (no scripts; a strict CSP)."""
    return HTMLResponse(_docs_html(), headers={"Content-Security-Policy": DOCS_CSP})
