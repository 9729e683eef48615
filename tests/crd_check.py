"""A custom resource checked the way a Kubernetes API server checks it on create, from the CRD itself.

No API server runs here; the CRDs of the operators we target (``../shared/reference/kubeflow-crds/``,
copies of kubeflow/training-operator's and kubeflow/trainer's manifests, its README says which tag)
are the next most real thing. ``check(obj, crd_file)`` does what the API server does with a CRD's
``openAPIV3Schema`` on ``kubectl create`` (strict field validation, kubectl's default):

1. defaulting: every ``default`` of the schema is applied where the field is absent (the API
   server defaults before it validates, so CEL rules see defaulted fields);
2. the structural schema, through ``jsonschema`` (Draft 4: OpenAPI 3.0's schema dialect): types,
   ``enum``, ``required``, ``pattern``, lengths, ``minimum``; an object with ``properties`` and no
   ``x-kubernetes-preserve-unknown-fields`` takes no other field (``additionalProperties: false``:
   the API server would prune it, and strict field validation makes that an error);
   ``x-kubernetes-int-or-string`` takes an integer or a string; ``nullable`` takes null; the formats
   ``int32``/``int64`` are range-checked and ``date-time`` parsed;
3. ``x-kubernetes-list-type``: ``map`` lists have unique keys, ``set`` lists unique items;
4. every ``x-kubernetes-validations`` CEL rule, through ``cel-python`` (``celpy``), with ``self``
   the value at that node. Transition rules (those that name ``oldSelf``) run only on update, so
   they are skipped, as on create.

Each problem is one line naming the field's path; ``check`` returns them all (empty: accepted).
"""

from __future__ import annotations

import copy
import datetime
import functools
import os
import re
from pathlib import Path
from typing import Any, Iterator

import celpy
import jsonschema
import yaml

REPO = Path(__file__).resolve().parent.parent
CRD_DIR = Path(os.environ.get("TTR_KUBEFLOW_CRDS") or REPO.parent / "shared" / "reference" / "kubeflow-crds")
"""``../shared/reference/kubeflow-crds`` from the repository root (absent in a user's clone: the tests
that need it skip), or the folder ``TTR_KUBEFLOW_CRDS`` names."""

INT_RANGES = {"int32": (-(2**31), 2**31 - 1), "int64": (-(2**63), 2**63 - 1)}


@functools.lru_cache(maxsize=None)
def load_crd(crd_file: str) -> dict[str, Any]:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the C parser: these files are 3,000-10,000 lines
    return yaml.load((CRD_DIR / crd_file).read_text(), Loader=loader)


def version_schema(crd: dict[str, Any], api_version: str, kind: str) -> dict[str, Any]:
    """The ``openAPIV3Schema`` the CRD serves for ``apiVersion``/``kind`` (a KeyError-like ValueError else)."""
    group, _, version = api_version.rpartition("/")
    spec = crd["spec"]
    if group != spec["group"] or kind != spec["names"]["kind"]:
        raise ValueError(f"{api_version} {kind} is not served by the CRD {crd['metadata']['name']}")
    for v in spec["versions"]:
        if v["name"] == version and v.get("served", True):
            return v["schema"]["openAPIV3Schema"]
    raise ValueError(f"the CRD {crd['metadata']['name']} serves no version {version}")


# --- 1. defaulting ----------------------------------------------------------------------------


def apply_defaults(value: Any, schema: dict[str, Any]) -> None:
    """In place, as the API server's structural defaulting: absent properties with a ``default``."""
    if isinstance(value, dict):
        for name, sub in schema.get("properties", {}).items():
            if name not in value and "default" in sub:
                value[name] = copy.deepcopy(sub["default"])
            if name in value:
                apply_defaults(value[name], sub)
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            for name, item in value.items():
                if name not in schema.get("properties", {}):
                    apply_defaults(item, extra)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for item in value:
            apply_defaults(item, schema["items"])


# --- 2. structural schema → JSON Schema -------------------------------------------------------


def to_json_schema(schema: Any) -> Any:
    """OpenAPI v3 (Kubernetes' structural dialect) → a Draft 4 JSON Schema with the API server's
    strictness: unknown fields refused, int-or-string, nullable."""
    if isinstance(schema, list):
        return [to_json_schema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out: dict[str, Any] = {}
    for key, sub in schema.items():
        if key in ("description", "x-kubernetes-validations", "default", "nullable"):
            continue
        if key == "properties":
            out[key] = {name: to_json_schema(s) for name, s in sub.items()}
        elif key in ("items", "additionalProperties", "anyOf", "allOf", "oneOf", "not"):
            out[key] = to_json_schema(sub)
        else:
            out[key] = sub
    if schema.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if "properties" in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
        out.setdefault("additionalProperties", False)
    if schema.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    return out


FORMATS = jsonschema.FormatChecker(formats=())


@FORMATS.checks("int32")
def _int32(value: Any) -> bool:
    return not isinstance(value, int) or INT_RANGES["int32"][0] <= value <= INT_RANGES["int32"][1]


@FORMATS.checks("int64")
def _int64(value: Any) -> bool:
    return not isinstance(value, int) or INT_RANGES["int64"][0] <= value <= INT_RANGES["int64"][1]


@FORMATS.checks("date-time", raises=ValueError)
def _date_time(value: Any) -> bool:
    if isinstance(value, str):
        datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    return True


def _path(parts: Iterator[Any]) -> str:
    text = ""
    for p in parts:
        text += f"[{p}]" if isinstance(p, int) else f".{p}"
    return text.lstrip(".") or "<root>"


@functools.lru_cache(maxsize=None)
def _validator(crd_file: str, api_version: str, kind: str) -> jsonschema.Draft4Validator:
    schema = version_schema(load_crd(crd_file), api_version, kind)
    return jsonschema.Draft4Validator(to_json_schema(schema), format_checker=FORMATS)


def schema_errors(obj: dict[str, Any], validator: jsonschema.Draft4Validator) -> list[str]:
    found = []
    for error in sorted(validator.iter_errors(obj), key=lambda e: list(map(str, e.absolute_path))):
        if error.validator == "additionalProperties" and error.validator_value is False:
            extra = sorted(set(error.instance) - set(error.schema.get("properties", {})))
            for name in extra:
                found.append(f'unknown field "{_path([*error.absolute_path, name])}"')
            continue
        found.append(f"{_path(error.absolute_path)}: {error.message}")
    return found


# --- 3. list types ------------------------------------------------------------------------------


def list_type_errors(value: Any, schema: dict[str, Any], path: tuple = ()) -> list[str]:
    found: list[str] = []
    for sub_value, sub_schema, sub_path in _children(value, schema, path):
        found += list_type_errors(sub_value, sub_schema, sub_path)
    if isinstance(value, list):
        kind = schema.get("x-kubernetes-list-type")
        if kind == "map":
            keys = schema.get("x-kubernetes-list-map-keys", [])
            seen = [tuple(item.get(k) for k in keys) for item in value if isinstance(item, dict)]
            if len(seen) != len(set(seen)):
                found.append(f"{_path(path)}: duplicate entries for key(s) {keys}")
        elif kind == "set":
            seen = [yaml.safe_dump(item) for item in value]
            if len(seen) != len(set(seen)):
                found.append(f"{_path(path)}: duplicate items in a set")
    return found


def _children(value: Any, schema: dict[str, Any], path: tuple) -> Iterator[tuple[Any, dict[str, Any], tuple]]:
    if isinstance(value, dict):
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        for name, item in value.items():
            sub = props.get(name, extra if isinstance(extra, dict) else None)
            if sub is not None:
                yield item, sub, (*path, name)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            yield item, schema["items"], (*path, i)


# --- 4. CEL rules -------------------------------------------------------------------------------

_OLD_SELF = re.compile(r"\boldSelf\b")


class CelUnsupported(Exception):
    """A rule this evaluator cannot compile or run: the check cannot vouch for the object."""


@functools.lru_cache(maxsize=None)
def _program(rule: str) -> Any:
    env = celpy.Environment()
    try:
        return env.program(env.compile(rule))
    except celpy.CELParseError as error:
        raise CelUnsupported(f"cannot compile CEL rule {rule!r}: {error}") from error


def cel_errors(value: Any, schema: dict[str, Any], path: tuple = ()) -> list[str]:
    found: list[str] = []
    for rule in schema.get("x-kubernetes-validations", []):
        if _OLD_SELF.search(rule["rule"]) and not rule.get("optionalOldSelf"):
            continue  # a transition rule: evaluated on update only
        try:
            result = _program(rule["rule"]).evaluate({"self": celpy.json_to_cel(value)})
        except celpy.CELEvalError as error:
            raise CelUnsupported(f"{_path(path)}: CEL rule {rule['rule']!r} failed to evaluate: {error}") from error
        if isinstance(result, celpy.CELEvalError):
            raise CelUnsupported(f"{_path(path)}: CEL rule {rule['rule']!r} failed to evaluate: {result}")
        if not bool(result):
            found.append(f"{_path(path)}: {rule.get('message') or 'failed rule: ' + rule['rule']}")
    for sub_value, sub_schema, sub_path in _children(value, schema, path):
        found += cel_errors(sub_value, sub_schema, sub_path)
    return found


# --- all of it ----------------------------------------------------------------------------------


def check(obj: dict[str, Any], crd_file: str) -> list[str]:
    """Every reason the API server would refuse to create ``obj`` under the CRD in ``crd_file``
    (empty: it would accept it)."""
    schema = version_schema(load_crd(crd_file), obj.get("apiVersion", ""), obj.get("kind", ""))
    obj = copy.deepcopy(obj)
    apply_defaults(obj, schema)
    found = schema_errors(obj, _validator(crd_file, obj["apiVersion"], obj["kind"]))
    if found:  # CEL rules run on a schema-valid object only (as the API server: types first)
        return found
    return list_type_errors(obj, schema) + cel_errors(obj, schema)
