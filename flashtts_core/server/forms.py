"""Form bodies (``/clone_voice``, ``/add_speaker``, ``/delete_speaker``): parsing and OpenAPI description.

Litestar's declarative multipart binding (``Body(media_type=MULTI_PART)``) is not used for these routes because
it cannot express what the original API accepts and what browsers send:

* the original took ``/delete_speaker`` (and file-less ``/clone_voice``) as ``multipart/form-data`` **or**
  ``application/x-www-form-urlencoded``; the multipart binder rejects the latter as "Invalid multipart/form-data";
* HTML forms send ``""`` for every empty input; the binder turns ``pitch=""`` into "Invalid enum value ''"
  and ``temperature=""`` into a float error, where "empty" should simply mean "not given".

So :func:`read_form` reads ``request.form()`` (either encoding; the app's body-size limit still applies while
it streams), drops empty values, reads uploads into bytes with a size cap, and converts the result with the
same msgspec Struct and constraints as everywhere else. :func:`form_operation` documents that Struct as the
request body in OpenAPI (files as ``format: binary``).
"""

from __future__ import annotations

import logging
from typing import Any, TypeVar

import msgspec
from litestar import Request
from litestar.datastructures import UploadFile
from litestar.openapi.spec import OpenAPIMediaType, Operation, RequestBody

from flashtts_core.errors import InvalidRequestError, PayloadTooLargeError
from flashtts_core.server.errors import validation_error

__all__ = ("form_operation", "read_form")

logger = logging.getLogger(__name__)

T = TypeVar("T", bound=msgspec.Struct)

_TRUE = frozenset({"1", "true", "yes", "on", "t", "y"})
_FALSE = frozenset({"0", "false", "no", "off", "f", "n"})


def _bool_fields(schema: type[msgspec.Struct]) -> frozenset[str]:
    return frozenset(f.name for f in msgspec.structs.fields(schema) if f.type is bool)


async def _read_upload(upload: UploadFile, *, name: str, max_bytes: int) -> bytes:
    try:
        data = await upload.read(max_bytes + 1)
    finally:
        await upload.close()
    if len(data) > max_bytes:
        raise PayloadTooLargeError(
            f"the file '{name}' is larger than the limit of {max_bytes / 1_000_000:.1f} MB", param=name
        )
    return data


async def read_form(
    request: Request[Any, Any, Any], schema: type[T], *, file_fields: frozenset[str], max_file_bytes: int
) -> T:
    """Decode the request's form (multipart or urlencoded) into ``schema``; raises 400/413 envelopes."""
    form = await request.form()
    booleans = _bool_fields(schema)
    values: dict[str, Any] = {}
    uploads: list[UploadFile] = [v for _, v in form.multi_items() if isinstance(v, UploadFile)]
    try:
        for name in schema.__struct_fields__:
            items = form.getall(name) if name in form else []
            if not items:
                continue
            value = items[0]
            if name in file_fields:
                if isinstance(value, UploadFile):
                    data = await _read_upload(value, name=name, max_bytes=max_file_bytes)
                    if not data and not value.filename:
                        continue  # an <input type=file> that nobody filled
                    values[name] = data
                elif value != "":
                    raise InvalidRequestError(
                        f"'{name}' must be a file upload (multipart/form-data with a filename)", param=name
                    )
                continue
            if isinstance(value, UploadFile):
                raise InvalidRequestError(f"'{name}' is a text field, not a file upload", param=name)
            if value == "":
                continue  # empty form input = not given
            if name in booleans:
                lowered = value.strip().lower()
                if lowered in _TRUE:
                    value = True
                elif lowered in _FALSE:
                    value = False
            values[name] = value
    finally:
        for upload in uploads:
            await upload.close()
    try:
        return msgspec.convert(values, schema, strict=False)
    except msgspec.ValidationError as exc:
        raise validation_error(str(exc)) from None


def _form_schema(schema: type[msgspec.Struct], file_fields: frozenset[str]) -> dict[str, Any]:
    generated = msgspec.json.schema(schema)
    body: dict[str, Any] = dict(generated.get("$defs", {}).get(schema.__name__, generated))
    body.pop("title", None)
    properties: dict[str, Any] = dict(body.get("properties", {}))
    for name in file_fields:
        if name in properties:
            description = None
            for option in properties[name].get("anyOf", [properties[name]]):
                description = description or option.get("description")
            properties[name] = {
                "type": "string",
                "format": "binary",
                **({"description": description} if description else {}),
            }
    body["properties"] = properties
    return body


def form_operation(schema: type[msgspec.Struct], *, file_fields: frozenset[str] = frozenset()) -> type[Operation]:
    """An ``operation_class`` that documents ``schema`` as a multipart/urlencoded request body."""
    body = _form_schema(schema, file_fields)
    content = {"multipart/form-data": OpenAPIMediaType(schema=body)}  # type: ignore[arg-type]
    if not file_fields:
        content["application/x-www-form-urlencoded"] = OpenAPIMediaType(schema=body)  # type: ignore[arg-type]

    def __init__(self: Operation, *args: Any, **kwargs: Any) -> None:
        Operation.__init__(self, *args, **kwargs)
        self.request_body = RequestBody(content=content, required=True)

    return type(f"{schema.__name__}Operation", (Operation,), {"__init__": __init__})
