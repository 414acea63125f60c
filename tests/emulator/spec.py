"""The RunPod REST v2 OpenAPI document, as JSON Schema validators.

The emulator validates request bodies with these (a body that breaks the contract gets the 422
RunPod would send), and tests validate every emulator response against the response schema the
document declares for that operation and status.

The document is a copy of ../shared/reference/runpod-openapi-v2.json kept beside this file so a
clean checkout can run the tests; test_infra_emulator_spec.py checks the copy still matches the
shared reference where that exists.
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path
from typing import Any, Optional

import jsonschema
import referencing
import referencing.jsonschema

SPEC_PATH = Path(__file__).with_name("runpod-openapi-v2.json")
_URI = "urn:runpod-openapi-v2"


@functools.lru_cache(maxsize=1)
def spec() -> dict:
    return json.loads(SPEC_PATH.read_text())


@functools.lru_cache(maxsize=1)
def _registry() -> referencing.Registry:
    # OpenAPI 3.1 schemas are JSON Schema 2020-12; register the whole document so "#/components/..."
    # references resolve inside it.
    resource = referencing.Resource.from_contents(spec(), default_specification=referencing.jsonschema.DRAFT202012)
    return referencing.Registry().with_resource(_URI, resource)


@functools.lru_cache(maxsize=None)
def validator_for_ref(ref: str) -> jsonschema.Draft202012Validator:
    """A validator for a JSON pointer into the document, e.g. '#/components/schemas/Pod'."""
    return jsonschema.Draft202012Validator(
        {"$ref": _URI + ref}, registry=_registry(), format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
    )


def schema_errors(ref: str, instance: Any) -> list[str]:
    """Violations of the schema at `ref`, as RunPod words them ('$.path: message')."""
    out = []
    for e in sorted(validator_for_ref(ref).iter_errors(instance), key=lambda e: list(e.absolute_path)):
        where = "$" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in e.absolute_path)
        out.append(f"{where}: {e.message}")
    return out


@functools.lru_cache(maxsize=None)
def _path_patterns() -> list[tuple[re.Pattern, str]]:
    pats = []
    for template in spec()["paths"]:
        rx = "^" + re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(template)) + "$"
        pats.append((re.compile(rx), template))
    # Literal segments win over parameters (/v2/registries/delegations vs /v2/registries/{id}).
    pats.sort(key=lambda p: p[1].count("{"))
    return pats


def path_template(path: str) -> Optional[str]:
    """'/v2/pods/abc/action' -> '/v2/pods/{id}/action' (None when the document has no such path)."""
    for rx, template in _path_patterns():
        if rx.match(path):
            return template
    return None


def operation(method: str, template: str) -> Optional[dict]:
    return spec()["paths"].get(template, {}).get(method.lower())


def request_schema_ref(method: str, template: str) -> Optional[str]:
    op = operation(method, template)
    if not op or "requestBody" not in op:
        return None
    content = op["requestBody"]["content"]
    schema = next(iter(content.values()))["schema"]
    return schema.get("$ref")


def response_schema_ref(method: str, template: str, status: int) -> tuple[Optional[str], Optional[str]]:
    """(schema pointer, content type) the document declares for this response; (None, None) for no body."""
    op = operation(method, template)
    if op is None:
        raise KeyError(f"{method} {template} is not in the OpenAPI document")
    responses = op["responses"]
    resp = responses.get(str(status)) or responses.get("default")
    if resp is None:
        raise KeyError(f"{method} {template} declares no response {status} and no default")
    if "$ref" in resp:
        resp = _resolve(resp["$ref"])
    content = resp.get("content")
    if not content:
        return None, None
    ctype, media = next(iter(content.items()))
    return media["schema"].get("$ref"), ctype


def declared_statuses(method: str, template: str) -> list[str]:
    return list(operation(method, template)["responses"])


def _resolve(ref: str) -> dict:
    node: Any = spec()
    for part in ref.lstrip("#/").split("/"):
        node = node[part]
    return node
