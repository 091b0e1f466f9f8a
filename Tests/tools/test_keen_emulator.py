#!/usr/bin/env python3
"""Self-test of the Keen HTTP API emulator (Tests/tools/keen_emulator.py).

Standard library only. Starts the emulator as a subprocess on port 0 and checks
its rules over real HTTP. Run: python3 Tests/tools/test_keen_emulator.py -v
"""

import http.client
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import unittest
import urllib.parse

HERE = os.path.dirname(os.path.abspath(__file__))
EMULATOR = os.path.join(HERE, "keen_emulator.py")
PROJECT = "5f0c0ffee0000000000000aa"
WRITE, READ, MASTER, ACCESS = "write-key-1", "read-key-1", "master-key-1", "access-key-w"


def start_emulator(*extra):
    proc = subprocess.Popen(
        [sys.executable, EMULATOR, "--port", "0", "--project", PROJECT, "--write-key", WRITE,
         "--read-key", READ, "--master-key", MASTER, "--access-key", ACCESS + "=writes", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline().strip()
    if not line.startswith("listening on 127.0.0.1:"):
        proc.kill()
        raise RuntimeError("emulator did not start: %r %s" % (line, proc.stderr.read()))
    return proc, int(line.rsplit(":", 1)[1])


def stop_emulator(proc):
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    proc.stdout.close()
    proc.stderr.close()


class EmulatorCase(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.proc, cls.port = start_emulator()

    @classmethod
    def tearDownClass(cls):
        stop_emulator(cls.proc)

    def setUp(self):
        self.control({"reset": True})

    # --- helpers ---

    def request(self, method, path, body=None, key=None, headers=None, raw=None):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        h = dict(headers or {})
        if key is not None:
            h["Authorization"] = key
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode("utf-8"))
        if data is not None:
            h.setdefault("Content-Type", "application/json")
        conn.request(method, path, body=data, headers=h)
        resp = conn.getresponse()
        text = resp.read()
        conn.close()
        try:
            parsed = json.loads(text) if text else None
        except ValueError:
            parsed = text.decode("utf-8", "replace")
        return resp.status, parsed, resp

    def batch(self, body, key=WRITE):
        return self.request("POST", "/3.0/projects/%s/events" % PROJECT, body, key)

    def single(self, collection, event, key=WRITE):
        path = "/3.0/projects/%s/events/%s" % (PROJECT, urllib.parse.quote(collection, safe=""))
        return self.request("POST", path, event, key)

    def count(self, params, key=READ, method="POST"):
        path = "/3.0/projects/%s/queries/count" % PROJECT
        if method == "GET":
            qs = {k: (json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in params.items()}
            return self.request("GET", path + "?" + urllib.parse.urlencode(qs), key=key)
        return self.request("POST", path, params, key)

    def count_of(self, collection, *filters, timeframe=None):
        params = {"event_collection": collection, "filters": list(filters)}
        if timeframe is not None:
            params["timeframe"] = timeframe
        status, body, _ = self.count(params)
        self.assertEqual(status, 200, body)
        return body["result"]

    def control(self, spec):
        status, body, _ = self.request("POST", "/_control", spec)
        self.assertEqual(status, 200, body)
        return body

    def stored(self, collection):
        status, body, _ = self.request("GET", "/_events?collection=" + urllib.parse.quote(collection))
        self.assertEqual(status, 200)
        return body["events"]

    def assertKeenError(self, result, status, error_code):
        got_status, body, _ = result
        self.assertEqual(got_status, status, body)
        self.assertIsInstance(body, dict, body)
        self.assertEqual(set(body), {"message", "error_code"}, body)
        self.assertEqual(body["error_code"], error_code, body)
        self.assertTrue(body["message"])

    def assertEventError(self, outcome, name):
        self.assertEqual(outcome["success"], False, outcome)
        self.assertEqual(outcome["error"]["name"], name, outcome)
        self.assertTrue(outcome["error"]["description"])


class AuthTests(EmulatorCase):
    def test_missing_key_is_401(self):
        self.assertKeenError(self.batch({"c": [{"a": 1}]}, key=None), 401, "InvalidApiKeyError")
        self.assertKeenError(self.count({"event_collection": "c"}, key=None), 401, "InvalidApiKeyError")

    def test_wrong_key_is_401(self):
        self.assertKeenError(self.batch({"c": [{"a": 1}]}, key="nope"), 401, "InvalidApiKeyError")
        self.assertKeenError(self.single("c", {"a": 1}, key="nope"), 401, "InvalidApiKeyError")
        self.assertEqual(self.stored("c"), [])

    def test_key_kinds(self):
        self.assertKeenError(self.single("c", {"a": 1}, key=READ), 401, "InvalidApiKeyError")
        self.assertKeenError(self.count({"event_collection": "c"}, key=WRITE), 401, "InvalidApiKeyError")
        self.assertKeenError(self.count({"event_collection": "c"}, key=ACCESS), 401, "InvalidApiKeyError")
        self.assertEqual(self.single("c", {"a": 1}, key=WRITE)[0], 201)
        self.assertEqual(self.single("c", {"a": 2}, key=MASTER)[0], 201)
        self.assertEqual(self.single("c", {"a": 3}, key=ACCESS)[0], 201)
        self.assertEqual(self.count({"event_collection": "c"}, key=READ)[1], {"result": 3})
        self.assertEqual(self.count({"event_collection": "c"}, key=MASTER)[1], {"result": 3})

    def test_api_key_query_parameter(self):
        path = "/3.0/projects/%s/events/c?api_key=%s" % (PROJECT, WRITE)
        self.assertEqual(self.request("POST", path, {"a": 1})[0], 201)

    def test_unknown_project_is_404(self):
        result = self.request("POST", "/3.0/projects/other/events", {"c": [{"a": 1}]}, WRITE)
        self.assertKeenError(result, 404, "ResourceNotFoundError")

    def test_unknown_path_is_404(self):
        self.assertKeenError(self.request("GET", "/3.0/projects/%s/nothing" % PROJECT, key=MASTER), 404, "ResourceNotFoundError")
        self.assertKeenError(self.request("GET", "/2.0/whatever"), 404, "ResourceNotFoundError")


class WriteTests(EmulatorCase):
    def test_batch_success_shape(self):
        status, body, _ = self.batch({"purchases": [{"a": 1}, {"a": 2}], "signups": [{"b": 1}]})
        self.assertEqual(status, 200)
        self.assertEqual(body, {"purchases": [{"success": True}, {"success": True}], "signups": [{"success": True}]})
        events = self.stored("purchases")
        self.assertEqual([e["a"] for e in events], [1, 2])
        for e in events:
            self.assertEqual(set(e["keen"]), {"timestamp", "created_at", "id"})
            self.assertEqual(e["keen"]["timestamp"], e["keen"]["created_at"])

    def test_empty_batch(self):
        self.assertEqual(self.batch({})[:2], (200, {}))

    def test_batch_partial_failure(self):
        status, body, _ = self.batch({
            "ok": [{"a": 1}, {"bad.name": 1}, {"nested": {"$x": 1}}, {"list": [{"deep": {"x.y": 1}}]}, {"a": 2}],
            "$nope": [{"a": 1}],
        })
        self.assertEqual(status, 200)
        self.assertEqual(body["ok"][0], {"success": True})
        self.assertEventError(body["ok"][1], "InvalidPropertyNameError")
        self.assertEventError(body["ok"][2], "InvalidPropertyNameError")
        self.assertEventError(body["ok"][3], "InvalidPropertyNameError")
        self.assertEqual(body["ok"][4], {"success": True})
        self.assertEventError(body["$nope"][0], "InvalidCollectionNameError")
        self.assertEqual([e["a"] for e in self.stored("ok")], [1, 2])
        self.assertEqual(self.stored("$nope"), [])

    def test_collection_names(self):
        good = ["a", "x" * 64, "User posts.new", "Target-collection_name.v2"]
        bad = ["", "x" * 65, "caf\u00e9", "$dollar", "tab\there"]
        status, body, _ = self.batch({name: [{"a": 1}] for name in good + bad})
        self.assertEqual(status, 200)
        for name in good:
            self.assertEqual(body[name], [{"success": True}], name)
        for name in bad:
            self.assertEventError(body[name][0], "InvalidCollectionNameError")
        self.assertKeenError(self.single("x" * 65, {"a": 1}), 400, "InvalidCollectionNameError")
        self.assertKeenError(self.single("$x", {"a": 1}), 400, "InvalidCollectionNameError")
        self.assertEqual(self.single("User posts.new", {"a": 1})[0], 201)

    def test_property_name_rules_at_every_level(self):
        ok = {"a": {"b": {"c": {"x" * 256: 1}}}, "mid$dle": 1, "spa ce": 1, "list": [{"fine": 1}]}
        self.assertEqual(self.single("c", ok)[:2], (201, {"created": True}))
        for bad in ({"x" * 257: 1}, {"": 1}, {"a": {"b": {"c.d": 1}}}, {"a": [{"$b": 1}]}, {"a": [[{"b.c": 1}]]}):
            self.assertKeenError(self.single("c", bad), 400, "InvalidPropertyNameError")
        self.assertEqual(len(self.stored("c")), 1)

    def test_keen_object_rules(self):
        cases = [
            {"keen": "not an object"},
            {"keen": {"timestamp": "yesterday"}},
            {"keen": {"timestamp": 1700000000}},
            {"keen": {"uniqueness_token": "x" * 65}},
            {"keen": {"uniqueness_token": 5}},
            {"text": "y" * 10001},
        ]
        for event in cases:
            self.assertKeenError(self.single("c", event), 400, "InvalidPropertyValueError")
        self.assertEqual(self.single("c", {"keen": {"uniqueness_token": "x" * 64, "timestamp": "2024-05-06T07:08:09.123456+02:00"},
                                           "text": "y" * 10000})[0], 201)
        stored = self.stored("c")
        self.assertEqual(len(stored), 1)
        self.assertEqual(stored[0]["keen"]["timestamp"], "2024-05-06T05:08:09.123Z")

    def test_event_size_limit(self):
        def compact_len(event):
            return len(json.dumps(event, separators=(",", ":")).encode("utf-8"))

        def event_of(size):
            # String values stay within the 10,000-character limit, so only the size can fail.
            event = {"keen": {"uniqueness_token": "s%d" % size}}
            i = 0
            while True:
                key = "p%04d" % i
                remaining = size - compact_len(event)
                add = len(',"%s":""' % key)
                if remaining <= add + 10000:
                    event[key] = "z" * (remaining - add)
                    return event
                event[key] = "z" * 10000
                i += 1

        at_limit, over = event_of(900_000), event_of(900_001)
        self.assertEqual(len(json.dumps(at_limit, separators=(",", ":")).encode()), 900_000)
        status, body, _ = self.batch({"big": [at_limit, over]})
        self.assertEqual(status, 200)
        self.assertEqual(body["big"][0], {"success": True})
        self.assertEventError(body["big"][1], "EventTooLargeError")
        self.assertKeenError(self.single("big", over), 413, "EventTooLargeError")
        self.assertEqual(len(self.stored("big")), 1)

    def test_request_size_limit(self):
        raw = b'{"c":[' + b",".join([b'{"a":"' + b"z" * 9990 + b'"}'] * 1001) + b"]}"
        self.assertGreater(len(raw), 10_000_000)
        self.assertKeenError(self.request("POST", "/3.0/projects/%s/events" % PROJECT, key=WRITE, raw=raw),
                             413, "RequestTooLargeError")
        self.assertEqual(self.stored("c"), [])

    def test_bad_bodies(self):
        path = "/3.0/projects/%s/events" % PROJECT
        self.assertKeenError(self.request("POST", path, key=WRITE, raw=b'{"c": [{"a": 1}'), 400, "InvalidJSONError")
        self.assertKeenError(self.request("POST", path, key=WRITE, raw=b""), 400, "InvalidJSONError")
        self.assertKeenError(self.request("POST", path, key=WRITE, raw=b'\xff\xfe'), 400, "InvalidJSONError")
        self.assertKeenError(self.request("POST", path, key=WRITE, raw=b"[" * 100000), 400, "InvalidJSONError")
        self.assertKeenError(self.batch([{"a": 1}]), 400, "InvalidBatchError")
        self.assertKeenError(self.batch({"c": {"a": 1}}), 400, "InvalidBatchError")
        status, body, _ = self.batch({"c": [1, "x", {"a": 1}]})
        self.assertEqual(status, 200)
        self.assertEventError(body["c"][0], "InvalidEventError")
        self.assertEventError(body["c"][1], "InvalidEventError")
        self.assertEqual(body["c"][2], {"success": True})
        self.assertKeenError(self.single("c", [1, 2]), 400, "InvalidEventError")
        self.assertKeenError(self.request("POST", path + "/c", key=WRITE, raw=b"not json"), 400, "InvalidJSONError")

    def test_large_integers_survive(self):
        event = {"mpid": -9223372036854775808, "batch_id": 9223372036854775807, "big": 2 ** 53 + 1, "f": 1.5}
        self.assertEqual(self.single("c", event)[0], 201)
        stored = self.stored("c")[0]
        for k, v in event.items():
            self.assertEqual(stored[k], v)
        self.assertEqual(self.count_of("c", {"property_name": "big", "operator": "eq", "property_value": 2 ** 53 + 1}), 1)
        self.assertEqual(self.count_of("c", {"property_name": "big", "operator": "eq", "property_value": 2 ** 53}), 0)

    def test_keep_alive_after_errors(self):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        path = "/3.0/projects/%s/events/c" % PROJECT
        for key, expected in (("bad", 401), (WRITE, 201), (READ, 401), (WRITE, 201)):
            conn.request("POST", path, body=json.dumps({"a": 1}), headers={"Authorization": key})
            resp = conn.getresponse()
            resp.read()
            self.assertEqual(resp.status, expected)
        conn.close()
        self.assertEqual(len(self.stored("c")), 2)

    def raw_exchange(self, payload):
        with socket.create_connection(("127.0.0.1", self.port), timeout=30) as s:
            s.sendall(payload)
            data = b""
            while b'{"created":true}' not in data and b"error_code" not in data:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
            return data

    def test_expect_100_continue(self):
        body = json.dumps({"a": 1}).encode()
        head = ("POST /3.0/projects/%s/events/c HTTP/1.1\r\nHost: x\r\nAuthorization: %s\r\n"
                "Content-Type: application/json\r\nContent-Length: %d\r\nExpect: 100-continue\r\n\r\n"
                % (PROJECT, WRITE, len(body))).encode()
        with socket.create_connection(("127.0.0.1", self.port), timeout=30) as s:
            s.sendall(head)
            interim = s.recv(1024)
            self.assertTrue(interim.startswith(b"HTTP/1.1 100"), interim)
            s.sendall(body)
            data = b""
            while b'{"created":true}' not in data:
                chunk = s.recv(65536)
                self.assertTrue(chunk, data)
                data += chunk
        self.assertIn(b"201", data.split(b"\r\n")[0])

    def test_chunked_request_body(self):
        body = json.dumps({"c": [{"a": 1}, {"a": 2}]}).encode()
        chunks = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + 7]), body[i:i + 7]) for i in range(0, len(body), 7)) + b"0\r\n\r\n"
        head = ("POST /3.0/projects/%s/events HTTP/1.1\r\nHost: x\r\nAuthorization: %s\r\n"
                "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n" % (PROJECT, WRITE)).encode()
        with socket.create_connection(("127.0.0.1", self.port), timeout=30) as s:
            s.sendall(head + chunks)
            data = b""
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        self.assertIn(b"200", data.split(b"\r\n")[0])
        self.assertEqual(len(self.stored("c")), 2)


class DedupTests(EmulatorCase):
    def test_uniqueness_token_dedup(self):
        e = {"a": 1, "keen": {"uniqueness_token": "tok-1"}}
        self.assertEqual(self.single("c", e)[:2], (201, {"created": True}))
        self.assertEqual(self.single("c", e)[:2], (201, {"created": True}))
        status, body, _ = self.batch({"c": [e, e, {"a": 2, "keen": {"uniqueness_token": "tok-2"}}, {"a": 3}, {"a": 3}],
                                      "other": [e]})
        self.assertEqual(status, 200)
        self.assertEqual(body, {"c": [{"success": True}] * 5, "other": [{"success": True}]})
        self.assertEqual([x["a"] for x in self.stored("c")], [1, 2, 3, 3])
        self.assertEqual(len(self.stored("other")), 1)
        self.assertEqual(self.count_of("c", {"property_name": "keen.uniqueness_token", "operator": "eq",
                                             "property_value": "tok-1"}), 1)
        self.assertEqual(self.control({})["counters"]["duplicates"], 3)

    def test_rejected_event_does_not_consume_token(self):
        bad = {"a.b": 1, "keen": {"uniqueness_token": "t"}}
        self.assertKeenError(self.single("c", bad), 400, "InvalidPropertyNameError")
        self.assertEqual(self.single("c", {"a": 1, "keen": {"uniqueness_token": "t"}})[0], 201)
        self.assertEqual(len(self.stored("c")), 1)

    def test_duplicates_as_errors_mode(self):
        self.control({"duplicates": "error"})
        e = {"a": 1, "keen": {"uniqueness_token": "t"}}
        status, body, _ = self.batch({"c": [e, e]})
        self.assertEqual(body["c"][0], {"success": True})
        self.assertEventError(body["c"][1], "DuplicateEventError")
        self.assertEqual(len(self.stored("c")), 1)


class QueryTests(EmulatorCase):
    def setUp(self):
        super().setUp()
        events = []
        for i in range(6):
            events.append({"n": i, "kind": "even" if i % 2 == 0 else "odd",
                           "sluice": {"batch_id": 9007199254740993 + (i // 3), "event_id": "e%d" % i},
                           "keen": {"uniqueness_token": "u%d" % i, "timestamp": "2021-03-0%dT12:00:00Z" % (i + 1)}})
        events.append({"n": 99, "kind": None})
        status, body, _ = self.batch({"evts": events})
        self.assertEqual(status, 200, body)

    def test_count_all_and_shape(self):
        status, body, _ = self.count({"event_collection": "evts"})
        self.assertEqual((status, body), (200, {"result": 7}))
        self.assertEqual(self.count({"event_collection": "nothing-here"})[1], {"result": 0})

    def test_eq_on_nested_paths(self):
        self.assertEqual(self.count_of("evts", {"property_name": "keen.uniqueness_token", "operator": "eq", "property_value": "u4"}), 1)
        self.assertEqual(self.count_of("evts", {"property_name": "sluice.batch_id", "operator": "eq",
                                                "property_value": 9007199254740993}), 3)
        self.assertEqual(self.count_of("evts", {"property_name": "sluice.batch_id", "operator": "eq",
                                                "property_value": 9007199254740993},
                                       {"property_name": "kind", "operator": "eq", "property_value": "odd"}), 1)
        self.assertEqual(self.count_of("evts", {"property_name": "sluice.nope", "operator": "eq", "property_value": 1}), 0)

    def test_other_operators(self):
        self.assertEqual(self.count_of("evts", {"property_name": "sluice.event_id", "operator": "exists", "property_value": True}), 6)
        self.assertEqual(self.count_of("evts", {"property_name": "sluice", "operator": "exists", "property_value": False}), 1)
        self.assertEqual(self.count_of("evts", {"property_name": "kind", "operator": "exists", "property_value": False}), 1)
        self.assertEqual(self.count_of("evts", {"property_name": "sluice.event_id", "operator": "in",
                                                "property_value": ["e1", "e2", "zz"]}), 2)
        self.assertEqual(self.count_of("evts", {"property_name": "kind", "operator": "ne", "property_value": "odd"}), 4)
        self.assertEqual(self.count_of("evts", {"property_name": "n", "operator": "gte", "property_value": 4}), 3)
        self.assertEqual(self.count_of("evts", {"property_name": "n", "operator": "lt", "property_value": 2}), 2)

    def test_get_with_query_string(self):
        status, body, _ = self.count({"event_collection": "evts", "timeframe": "this_1000_years",
                                      "filters": [{"property_name": "kind", "operator": "eq", "property_value": "even"}]},
                                     method="GET")
        self.assertEqual((status, body), (200, {"result": 3}))

    def test_timeframes(self):
        absolute = {"start": "2021-03-02T00:00:00Z", "end": "2021-03-04T00:00:00Z"}
        self.assertEqual(self.count_of("evts", timeframe=absolute), 2)
        # Events stamped 2021 are outside a recent relative window; the untimed one (received now) is inside.
        self.assertEqual(self.count_of("evts", timeframe="this_14_days"), 1)
        self.assertEqual(self.count_of("evts", timeframe="this_100_years"), 7)
        self.assertEqual(self.count_of("evts", timeframe="previous_1_minutes"), 0)

    def test_query_errors(self):
        self.assertKeenError(self.count({"timeframe": "this_1_days"}), 400, "MissingRequiredPropertyError")
        self.assertKeenError(self.count({"event_collection": "evts", "filters": [{"property_name": "n", "operator": "like",
                                                                                  "property_value": 1}]}), 400, "FilterError")
        self.assertKeenError(self.count({"event_collection": "evts", "filters": {"x": 1}}), 400, "FilterError")
        self.assertKeenError(self.count({"event_collection": "evts", "timeframe": "someday"}), 400, "TimeframeDefinitionError")
        self.assertKeenError(self.count({"event_collection": "evts", "group_by": "kind"}), 400, "BadRequestError")


class ControlTests(EmulatorCase):
    def test_fail_next(self):
        self.control({"fail_next": {"count": 2, "status": 503, "retry_after": 7}})
        for _ in range(2):
            status, body, resp = self.single("c", {"a": 1})
            self.assertEqual(status, 503)
            self.assertEqual(body["error_code"], "ServiceUnavailableError")
            self.assertEqual(resp.getheader("Retry-After"), "7")
        self.assertEqual(self.single("c", {"a": 1})[0], 201)
        self.assertEqual(len(self.stored("c")), 1)

    def test_fail_next_scope_and_raw_body(self):
        self.control({"fail_next": {"count": 1, "status": 502, "scope": "queries", "raw_body": "<html>bad gateway</html>"}})
        self.assertEqual(self.single("c", {"a": 1})[0], 201)
        status, body, resp = self.count({"event_collection": "c"})
        self.assertEqual(status, 502)
        self.assertEqual(body, "<html>bad gateway</html>")
        self.assertEqual(self.count({"event_collection": "c"})[1], {"result": 1})

    def test_fail_events(self):
        self.control({"fail_events": [{"property": "sluice.event_id", "equals": "e2", "times": 1,
                                       "error": {"name": "InternalServerError", "description": "try again"}}]})
        events = [{"sluice": {"event_id": "e%d" % i}} for i in range(3)]
        status, body, _ = self.batch({"c": events})
        self.assertEqual(body["c"][0], {"success": True})
        self.assertEqual(body["c"][1], {"success": True})
        self.assertEqual(body["c"][2], {"success": False, "error": {"name": "InternalServerError", "description": "try again"}})
        status, body, _ = self.batch({"c": [events[2]]})
        self.assertEqual(body["c"], [{"success": True}])
        self.control({"fail_events": {"property": "x", "equals": 1, "status": 500}})
        self.assertKeenError(self.single("c", {"x": 1}), 500, "InternalServerError")
        self.assertEqual(self.single("c", {"x": 2})[0], 201)

    def test_drop_next(self):
        self.control({"drop_next": {"count": 1, "scope": "events"}})
        with self.assertRaises((http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError)):
            self.single("c", {"a": 1})
        self.assertEqual(self.single("c", {"a": 1})[0], 201)
        self.assertEqual(self.control({})["counters"]["dropped_connections"], 1)

    def test_latency(self):
        self.control({"latency_ms": 300})
        started = time.monotonic()
        self.assertEqual(self.single("c", {"a": 1})[0], 201)
        self.assertGreaterEqual(time.monotonic() - started, 0.3)
        self.control({"latency_ms": 0})

    def test_request_log_and_dumps(self):
        self.single("c", {"a": 1})
        self.single("c", {"a": 1}, key="bad")
        self.batch({"d": [{"b": 1}]})
        status, body, _ = self.request("GET", "/_requests")
        statuses = [(r["method"], r["status"]) for r in body["requests"]]
        self.assertEqual(statuses, [("POST", 201), ("POST", 401), ("POST", 200)])
        self.assertEqual(body["requests"][0]["key"], "write_key")
        status, body, _ = self.request("GET", "/_events")
        self.assertEqual(sorted(body["collections"]), ["c", "d"])
        self.assertEqual(self.request("DELETE", "/_events")[0], 200)
        self.assertEqual(self.request("GET", "/_events")[1], {"collections": {}})

    def test_bad_control(self):
        status, body, _ = self.request("POST", "/_control", {"bogus": 1})
        self.assertEqual(status, 400)
        status, body, _ = self.request("POST", "/_control", {"fail_next": {"count": 1}})
        self.assertEqual(status, 400)


class StartupTests(unittest.TestCase):
    def test_port_file_and_sigterm(self):
        tmp = tempfile.mkdtemp()
        try:
            port_file = os.path.join(tmp, "port")
            proc, port = start_emulator("--port-file", port_file)
            with open(port_file) as f:
                self.assertEqual(f.read().strip(), "127.0.0.1:%d" % port)
            proc.terminate()
            self.assertEqual(proc.wait(timeout=10), 0)
            proc.stdout.close()
            proc.stderr.close()
        finally:
            shutil.rmtree(tmp)

    @unittest.skipUnless(shutil.which("openssl"), "openssl is needed to make test certificates")
    def test_tls(self):
        tmp = tempfile.mkdtemp()
        try:
            subprocess.run(["bash", os.path.join(HERE, "make_test_certs.sh"), tmp], check=True, capture_output=True)
            proc, port = start_emulator("--tls-cert", os.path.join(tmp, "server.pem"), "--tls-key", os.path.join(tmp, "server.key"))
            try:
                ctx = ssl.create_default_context(cafile=os.path.join(tmp, "ca.pem"))
                conn = http.client.HTTPSConnection("localhost", port, context=ctx, timeout=30)
                conn.request("POST", "/3.0/projects/%s/events/c" % PROJECT, body=b'{"a":1}', headers={"Authorization": WRITE})
                resp = conn.getresponse()
                self.assertEqual((resp.status, json.loads(resp.read())), (201, {"created": True}))
                conn.close()
                # A client that does not trust the CA fails the handshake; the server stays up.
                with self.assertRaises(ssl.SSLError):
                    bad = http.client.HTTPSConnection("localhost", port, context=ssl.create_default_context(), timeout=30)
                    bad.request("GET", "/_control")
                # Plain HTTP to the TLS port gets no answer, and the server stays up.
                plain = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                with self.assertRaises((http.client.RemoteDisconnected, ConnectionResetError, http.client.BadStatusLine)):
                    plain.request("GET", "/_control")
                    plain.getresponse()
                conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=30)
                conn.request("GET", "/_events?collection=c")
                self.assertEqual(len(json.loads(conn.getresponse().read())["events"]), 1)
                conn.close()
            finally:
                stop_emulator(proc)
        finally:
            shutil.rmtree(tmp)


if __name__ == "__main__":
    unittest.main()
