"""A gRPC client that knows nothing of Lodge but what the server's reflection tells it.

Uses only Python's stock reflection client (grpcio-reflection, which speaks
grpc.reflection.v1alpha), protobuf's descriptor pool and message factory: every request is
built from descriptors fetched at run time. Run by tests/reflection.rs against a live node:

    python3 client.py HOST:PORT KEY VALUE

Prints one JSON document: the listed services, one service described, a KV Put then Range of
KEY, and the actor paths from Admin ListActors. Exits non-zero on any failure.
"""

import base64
import json
import sys

import grpc
from google.protobuf import descriptor_pool, json_format, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

TIMEOUT_S = 10


def unary(channel, pool, service, method, fields):
    """Calls SERVICE/METHOD with a request built from FIELDS (a JSON-shaped dict)."""
    m = pool.FindServiceByName(service).FindMethodByName(method)
    request_class = message_factory.GetMessageClass(m.input_type)
    response_class = message_factory.GetMessageClass(m.output_type)
    request = json_format.ParseDict(fields, request_class())
    call = channel.unary_unary(
        f"/{service}/{method}",
        request_serializer=lambda r: r.SerializeToString(),
        response_deserializer=response_class.FromString,
    )
    response = call(request, timeout=TIMEOUT_S)
    return json_format.MessageToDict(response)


def b64(text):
    return base64.b64encode(text.encode()).decode()


def main():
    target, key, value = sys.argv[1:4]
    with grpc.insecure_channel(target) as channel:
        db = ProtoReflectionDescriptorDatabase(channel)
        pool = descriptor_pool.DescriptorPool(db)
        services = sorted(db.get_services())

        kv = pool.FindServiceByName("lodge.kv.v1.KV")
        described = {
            "service": kv.full_name,
            "file": kv.file.name,
            "methods": {
                m.name: {
                    "input": m.input_type.full_name,
                    "output": m.output_type.full_name,
                    "server_streaming": m.server_streaming,
                }
                for m in kv.methods
            },
            "put_request_fields": [
                f.name for f in pool.FindMessageTypeByName("lodge.kv.v1.PutRequest").fields
            ],
        }

        # protobuf's JSON mapping carries bytes fields as base64.
        put = unary(channel, pool, "lodge.kv.v1.KV", "Put", {"key": b64(key), "value": b64(value)})
        got = unary(channel, pool, "lodge.kv.v1.KV", "Range", {"key": b64(key)})
        values = [base64.b64decode(item["value"]).decode() for item in got.get("kvs", [])]
        actors = unary(channel, pool, "lodge.admin.v1.Admin", "ListActors", {"pathGlob": "/node*"})

    print(
        json.dumps(
            {
                "services": services,
                "described": described,
                "put_revision": int(put["header"]["revision"]),
                "range_values": values,
                "actors": sorted(a["path"] for a in actors.get("actors", [])),
            }
        )
    )


if __name__ == "__main__":
    main()
