"""Write the `.proto` files the thin client needs from the descriptors TensorFlow Serving installs.

A maintainer tool, run in the full environment when TensorFlow or TF Serving is upgraded:

    .venv/bin/python serving/protos/vendor.py

Every installed `_pb2` module carries its file's FileDescriptorProto; this prints each one of the
closure of `ROOTS` back as `.proto` source (no comments: descriptors do not keep them) under
this directory. The build compiles them (serving/protoc.py), and tests/test_thin_client.py checks
that what the build compiles is the installed descriptors, field for field.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

from google.protobuf import descriptor_pb2

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

HERE = Path(__file__).resolve().parent
# The messages the client sends and reads: Predict, GetModelMetadata, GetModelStatus, health Check.
ROOTS = ("tensorflow_serving.apis.predict_pb2", "tensorflow_serving.apis.get_model_metadata_pb2",
         "tensorflow_serving.apis.get_model_status_pb2", "grpc_health.v1.health_pb2")
PROVIDED_BY_PROTOC = ("google/protobuf/",)  # well-known types: protoc ships them

F = descriptor_pb2.FieldDescriptorProto
SCALARS = {F.TYPE_DOUBLE: "double", F.TYPE_FLOAT: "float", F.TYPE_INT64: "int64", F.TYPE_UINT64: "uint64",
           F.TYPE_INT32: "int32", F.TYPE_FIXED64: "fixed64", F.TYPE_FIXED32: "fixed32", F.TYPE_BOOL: "bool",
           F.TYPE_STRING: "string", F.TYPE_BYTES: "bytes", F.TYPE_UINT32: "uint32", F.TYPE_SFIXED32: "sfixed32",
           F.TYPE_SFIXED64: "sfixed64", F.TYPE_SINT32: "sint32", F.TYPE_SINT64: "sint64"}
MAX_FIELD_NUMBER = 536870911


def closure(modules=ROOTS) -> dict[str, descriptor_pb2.FileDescriptorProto]:
    """Every file the root modules' files import, by name (dependencies first)."""
    files: dict[str, descriptor_pb2.FileDescriptorProto] = {}

    def walk(fd):
        for dep in fd.dependencies:
            walk(dep)
        if fd.name not in files:
            files[fd.name] = descriptor_pb2.FileDescriptorProto.FromString(fd.serialized_pb)

    for name in modules:
        walk(importlib.import_module(name).DESCRIPTOR)
    return files


def _value(field, value) -> str:
    if field.type == field.TYPE_BOOL:
        return "true" if value else "false"
    if field.type == field.TYPE_ENUM:
        return field.enum_type.values_by_number[value].name
    if field.type in (field.TYPE_STRING, field.TYPE_BYTES):
        return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'
    return str(value)


def _options(options, skip=()) -> list[str]:
    return [f"{f.name} = {_value(f, v)}" for f, v in options.ListFields() if f.name not in skip]


def _reserved(ranges, names, inclusive_end: bool) -> list[str]:
    out = []
    for r in ranges:
        end = r.end if inclusive_end else r.end - 1
        out.append(str(r.start) if end == r.start else f"{r.start} to {'max' if end >= MAX_FIELD_NUMBER else end}")
    lines = [f"reserved {', '.join(out)};"] if out else []
    return lines + ([f"reserved {', '.join(chr(34) + n + chr(34) for n in names)};"] if names else [])


def _enum(enum, indent: str) -> list[str]:
    lines = [f"{indent}enum {enum.name} {{"]
    lines += [f"{indent}  option {o};" for o in _options(enum.options)]
    for v in enum.value:
        opts = _options(v.options)
        lines.append(f"{indent}  {v.name} = {v.number}{' [' + ', '.join(opts) + ']' if opts else ''};")
    lines += [f"{indent}  {line}" for line in _reserved(enum.reserved_range, enum.reserved_name, True)]
    return lines + [f"{indent}}}"]


def _field(field, message, scope: str, proto2: bool) -> str:
    entries = {f"{scope}.{e.name}": e for e in message.nested_type if e.options.map_entry}
    entry = entries.get(field.type_name)
    if field.label == F.LABEL_REPEATED and entry is not None:
        key, value = entry.field
        kind = f"map<{SCALARS[key.type]}, {SCALARS.get(value.type) or value.type_name}>"
    else:
        label = {F.LABEL_REPEATED: "repeated ", F.LABEL_REQUIRED: "required "}.get(field.label, "")
        if field.label == F.LABEL_OPTIONAL and (proto2 and not field.HasField("oneof_index")
                                                or field.proto3_optional):
            label = "optional "
        kind = label + (SCALARS.get(field.type) or field.type_name)
    opts = _options(field.options)
    if field.HasField("json_name"):
        opts.append(f'json_name = "{field.json_name}"')
    if field.HasField("default_value"):
        value = field.default_value
        opts.append(f"default = {value if field.type != F.TYPE_STRING else chr(34) + value + chr(34)}")
    return f"{kind} {field.name} = {field.number}{' [' + ', '.join(opts) + ']' if opts else ''};"


def _message(message, indent: str, scope: str, proto2: bool) -> list[str]:
    scope = f"{scope}.{message.name}"  # the message's full name, with a leading dot as in type_name
    lines = [f"{indent}message {message.name} {{"]
    lines += [f"{indent}  option {o};" for o in _options(message.options)]
    for enum in message.enum_type:
        lines += _enum(enum, indent + "  ")
    done: set[int] = set()
    emitted = 0

    def fields_until(stop: int) -> list[str]:
        """Declare fields [emitted, stop): a oneof's fields as one block."""
        nonlocal emitted
        out = []
        for field in message.field[emitted:stop]:
            oneof = field.oneof_index if field.HasField("oneof_index") and not field.proto3_optional else None
            if oneof is None:
                out.append(f"{indent}  {_field(field, message, scope, proto2)}")
            elif oneof not in done:
                done.add(oneof)
                out.append(f"{indent}  oneof {message.oneof_decl[oneof].name} {{")
                out += [f"{indent}    {_field(f, message, scope, proto2)}" for f in message.field
                        if f.HasField("oneof_index") and f.oneof_index == oneof]
                out.append(f"{indent}  }}")
        emitted = max(emitted, stop)
        return out

    # protoc lists a map's entry type among the nested types where the map field is declared:
    # interleave fields and nested messages so that the order comes back the same.
    for nested in message.nested_type:
        if nested.options.map_entry:
            at = next(i for i, f in enumerate(message.field) if f.type_name == f"{scope}.{nested.name}")
            lines += fields_until(at + 1)
        else:
            lines += _message(nested, indent + "  ", scope, proto2)
    lines += fields_until(len(message.field))
    lines += [f"{indent}  {line}" for line in _reserved(message.reserved_range, message.reserved_name, False)]
    return lines + [f"{indent}}}"]


def proto_source(fd: descriptor_pb2.FileDescriptorProto, origin: str) -> str:
    """`fd` as .proto source that protoc compiles back to `fd` (less comments and source info)."""
    proto2 = fd.syntax in ("", "proto2")
    lines = [f"// {fd.name} from {origin}, under the Apache License 2.0 (see LICENSE and README.md here).",
             "// Modified form: written back from the installed descriptor by vendor.py, less the original comments.",
             "", f'syntax = "{fd.syntax or "proto2"}";', ""]
    if fd.package:
        lines += [f"package {fd.package};", ""]
    for i, dep in enumerate(fd.dependency):
        kind = "public " if i in fd.public_dependency else "weak " if i in fd.weak_dependency else ""
        lines.append(f'import {kind}"{dep}";')
    lines += [""] + [f"option {o};" for o in _options(fd.options)] + [""]
    for enum in fd.enum_type:
        lines += _enum(enum, "") + [""]
    for message in fd.message_type:
        lines += _message(message, "", f".{fd.package}" if fd.package else "", proto2) + [""]
    for service in fd.service:
        lines.append(f"service {service.name} {{")
        for m in service.method:
            stream_in = "stream " if m.client_streaming else ""
            stream_out = "stream " if m.server_streaming else ""
            lines.append(f"  rpc {m.name}({stream_in}{m.input_type}) returns ({stream_out}{m.output_type});")
        lines += ["}", ""]
    if fd.extension:
        raise ValueError(f"{fd.name}: extensions are not supported by this printer")
    return "\n".join(lines).rstrip() + "\n"


def _origin(name: str) -> str:
    from importlib import metadata
    dist = "grpcio-health-checking" if name.startswith("grpc_health/") else (
        "tensorflow-serving-api" if name.startswith("tensorflow_serving/") else "tensorflow")
    return f"{dist} {metadata.version(dist)}"


def main() -> int:
    files = closure()
    written = []
    for name, fd in files.items():
        if name.startswith(PROVIDED_BY_PROTOC):
            continue
        path = HERE / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(proto_source(fd, _origin(name)))
        written.append(name)
    print(f"wrote {len(written)} files under {HERE}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
