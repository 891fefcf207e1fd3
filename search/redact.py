"""Credential redaction: user:password@ in URIs and paths, and token=/password=/... values, never
reach MLflow params, tags or artifacts, nor sweep.json. Pure `re`: imported before Ray/MLflow."""
from __future__ import annotations

import re
from typing import Any

SECRET_PATTERN = re.compile(r"(token|secret|password|passwd|credential|api[_-]?key|access[_-]?key)", re.I)
URI_CREDENTIALS = re.compile(r"(://)[^/@\s]+@")
# user:password@ that lost its scheme (a URI resolved as a local path keeps only one slash)
USERINFO = re.compile(r"(^|[/\s=,;'\"])[^/@\s:'\"]+:[^/@\s'\"]*@")
SECRET_ASSIGNMENT = re.compile(r"((?:token|secret|password|passwd|credential|api[_-]?key|access[_-]?key|signature)"
                               r"[\w-]*=)[^&\s'\",;]+", re.I)


def redact(value: Any) -> str:
    """Strip user:password@ from URIs and paths, and the values of token=/password=/... query
    arguments; credentials never reach logged params or artifacts."""
    text = URI_CREDENTIALS.sub(r"\1***@", str(value))
    text = USERINFO.sub(r"\1***@", text)
    return SECRET_ASSIGNMENT.sub(r"\1***", text)


def redact_obj(obj: Any) -> Any:
    """`redact` through dicts and lists (sweep.json, space.json); values of secret-named keys go."""
    if isinstance(obj, dict):
        return {k: "***" if isinstance(k, str) and SECRET_PATTERN.search(k) else redact_obj(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact_obj(v) for v in obj]
    if isinstance(obj, str):
        return redact(obj)
    return obj
