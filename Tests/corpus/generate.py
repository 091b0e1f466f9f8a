#!/usr/bin/env python3
"""Writes the corpus of malformed and hostile inputs replayed by every test run.

bodies/*.bin  request bodies POSTed to /v2/events (or /v2/bulkevents when the name starts with
              "bulk-") with valid credentials: each must get a 4xx, never a 202 or a 5xx.
frames/*.bin  raw bytes written to the router's Unix socket: each must get an error frame or a
              closed connection, and the router must keep running.
Run it again after adding a case; the files are committed.
"""
import gzip
import json
import os
import struct

here = os.path.dirname(os.path.abspath(__file__))
good_event = {"event_type": "custom_event", "data": {"event_name": "x", "custom_event_type": "other"}}

bodies = {
    "empty": b"",
    "not-json": b"hello world",
    "truncated": b'{"environment":"production","events":[',
    "trailing-comma": b'{"environment":"production",}',
    "array-not-object": b"[1,2,3]",
    "string-not-object": b'"batch"',
    "null": b"null",
    "nan": b'{"environment":"production","mpid":NaN}',
    "invalid-utf8-in-string": b'{"environment":"production","x":"\xff\xfe"}',
    "overlong-utf8": b'{"environment":"production","x":"\xc0\xaf"}',
    "lone-surrogate-escape": b'{"environment":"production","x":"\\ud800"}',
    "control-char": b'{"environment":"production","x":"a\x01b"}',
    "deep-nesting": b'{"environment":"production","x":' + b"[" * 100000 + b"]" * 100000 + b"}",
    "deep-objects": b'{"environment":"production","x":' + b'{"a":' * 5000 + b"1" + b"}" * 5000 + b"}",
    "huge-string": b'{"environment":"production","x":"' + b"a" * 300000 + b'"}',
    "huge-number": b'{"environment":"production","mpid":' + b"9" * 5000 + b"}",
    "mpid-float": b'{"environment":"production","mpid":1.5}',
    "mpid-exponent": b'{"environment":"production","mpid":1e18}',
    "mpid-overflow": b'{"environment":"production","mpid":9223372036854775808}',
    "mpid-object": b'{"environment":"production","mpid":{}}',
    "environment-number": b'{"environment":1}',
    "missing-environment": json.dumps({"events": [good_event]}).encode(),
    "events-object": b'{"environment":"production","events":{}}',
    "event-not-object": b'{"environment":"production","events":[42]}',
    "event-unknown-type": b'{"environment":"production","events":[{"event_type":"teleport","data":{}}]}',
    "event-no-data": b'{"environment":"production","events":[{"event_type":"custom_event"}]}',
    "event-data-array": b'{"environment":"production","events":[{"event_type":"custom_event","data":[]}]}',
    "session-id-text": b'{"environment":"production","events":[{"event_type":"session_start","data":{"session_id":"abc"}}]}',
    "duplicate-garbage-after": b'{"environment":"production"} {"environment":"production"}',
    "nul-bytes": b'{"environment":"production"\x00}',
    "bulk-not-array": b'{"environment":"production"}',
    "bulk-empty": b"[]",
    "bulk-one-bad": b'[{"environment":"production"},{"mpid":1}]',
    "bulk-too-many": json.dumps([{"environment": "production"}] * 101).encode(),
}
# A gzip bomb: small on the wire, far over the request limit once inflated.
bodies["gzip-bomb"] = gzip.compress(b'{"environment":"production","x":"' + b"a" * 5_000_000 + b'"}')


def frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


frames = {
    "not-json": frame(b"hello"),
    "oversize-header": struct.pack(">I", 0xFFFFFFF0),
    "invalid-utf8": frame(b'{"type":"\xff"}'),
    "array": frame(b"[1]"),
    "no-type": frame(b'{"id":1}'),
    "unknown-type": frame(b'{"type":"teleport","id":1}'),
    "negative-id": frame(b'{"type":"ack","id":-1}'),
    "batch-before-hello": frame(b'{"type":"batch","id":1,"tenant":"acme","payload":{}}'),
    "hello-bad-version": frame(b'{"type":"hello","id":0,"version":99,"role":"ingest"}'),
    "hello-bad-role": frame(b'{"type":"hello","id":0,"version":1,"role":"mallory"}'),
    "deep-nesting": frame(b'{"type":"ack","id":1,"x":' + b"[" * 10000 + b"]" * 10000 + b"}"),
    "length-only": struct.pack(">I", 100),
    "zero-length": frame(b""),
}

for folder, items in (("bodies", bodies), ("frames", frames)):
    os.makedirs(os.path.join(here, folder), exist_ok=True)
    for name, data in items.items():
        with open(os.path.join(here, folder, name + ".bin"), "wb") as f:
            f.write(data)
print("wrote %d bodies and %d frames" % (len(bodies), len(frames)))
