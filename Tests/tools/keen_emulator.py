#!/usr/bin/env python3
"""Keen HTTP API emulator for tests (standard library only).

Emulates the parts of Keen's HTTP API (https://keen.io/docs/api/) that Sluice
uses, and checks requests the way the service does:

  POST /3.0/projects/{project}/events               batch write (write/master key)
       body   {"<collection>": [event, ...], ...}
       200    {"<collection>": [{"success": true}, {"success": false,
                                 "error": {"name": "...", "description": "..."}}]}
  POST /3.0/projects/{project}/events/{collection}  single write (write/master key)
       body   event (a JSON object)
       201    {"created": true}
       400    {"message": "...", "error_code": "InvalidPropertyNameError"} (etc.)
  GET|POST /3.0/projects/{project}/queries/count    count query (read/master key)
       params event_collection, timeframe, filters [{property_name, operator,
              property_value}] (query string, JSON-encoded, or a JSON body)
       200    {"result": N}

Keys travel in the Authorization header (the raw key) or the api_key query
parameter. A missing, wrong or wrong-kind key answers 401
{"message": ..., "error_code": "InvalidApiKeyError"}; an unknown project answers
404 {"message": "Resource not found", "error_code": "ResourceNotFoundError"}.

Validation (per event): collection name (non-empty, <= 64 characters, ASCII, no
control characters, not starting with "$") -> InvalidCollectionNameError;
property names at every nesting level (non-empty, no ".", not starting with
"$", <= 256 characters) -> InvalidPropertyNameError; root "keen" must be an
object, keen.timestamp an ISO-8601 string, keen.uniqueness_token a string of at
most 64 characters, string values at most 10,000 characters ->
InvalidPropertyValueError; events whose compact UTF-8 JSON is larger than
900,000 bytes -> EventTooLargeError; a request body larger than 10,000,000
bytes -> 413. Events with a keen.uniqueness_token already stored in the same
collection are accepted (success / created) but not stored again.

Test hooks (no authentication; bind to loopback only):
  POST   /_control   JSON, any of:
           {"reset": true}                      forget events, rules, request log
           {"fail_next": {"count": N, "status": S, "scope": "events"|"queries"|"all",
                          "error_code": ..., "message": ..., "retry_after": secs,
                          "raw_body": "text instead of Keen JSON"}}
           {"drop_next": {"count": N, "scope": ...}}   close the connection, no answer
           {"fail_events": [{"property": "sluice.event_id", "equals": V,
                             "error": {"name": ..., "description": ...},
                             "times": N (optional), "status": 400 (single-event)}]}
           {"latency_ms": N}                    delay every API request
           {"duplicates": "success"|"error"}    how a repeated uniqueness_token
                                                is answered (default "success")
           {"clear_rules": true}
  GET    /_control   current settings and counters
  GET    /_events[?collection=NAME]   stored events ({"events": [...]} for one
                                      collection, {"collections": {...}} for all)
  DELETE /_events    forget stored events
  GET    /_requests  log of API requests (method, path, status, key kind, ...)

Usage:
  keen_emulator.py --port 0 --project P --write-key W --read-key R --master-key M
                   [--access-key KEY=writes,queries] [--tls-cert C --tls-key K]
                   [--port-file FILE] [--log FILE]
  keen_emulator.py --self-test      runs test_keen_emulator.py
The first stdout line is "listening on 127.0.0.1:PORT" (also with TLS); the
--port-file is written before it. Runs until SIGTERM/SIGINT (exit status 0).
"""

import argparse
import datetime as dt
import hmac
import json
import os
import re
import secrets
import signal
import socket
import ssl
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MAX_EVENT_BYTES = 900_000          # "Single event size" (keen.io/docs/api limits)
MAX_REQUEST_BYTES = 10_000_000     # "Bulk event payload size"
MAX_COLLECTION_CHARS = 64
MAX_PROPERTY_NAME_CHARS = 256
MAX_STRING_VALUE_CHARS = 10_000
MAX_UNIQUENESS_TOKEN_CHARS = 64
REQUEST_LOG_LIMIT = 5000
DRAIN_LIMIT_BYTES = 64_000_000  # oversize bodies up to this are read and discarded before the 413

ERROR_CODES_BY_STATUS = {
    400: "BadRequestError",
    401: "InvalidApiKeyError",
    403: "ForbiddenError",
    404: "ResourceNotFoundError",
    408: "RequestTimeoutError",
    413: "RequestTooLargeError",
    429: "TooManyRequestsError",
    500: "InternalServerError",
    502: "BadGatewayError",
    503: "ServiceUnavailableError",
    504: "GatewayTimeoutError",
}

FILTER_OPERATORS = ("eq", "ne", "lt", "lte", "gt", "gte", "exists", "in", "contains",
                    "not_contains", "starts_with")

_log_file = None


def log(msg, *args):
    if _log_file is None:
        return
    try:
        text = msg % args if args else msg
        _log_file.write("%s %s\n" % (time.strftime("%H:%M:%S"), text))
        _log_file.flush()
    except Exception:
        pass


class KeenError(Exception):
    """A whole-request error answered as {"message": ..., "error_code": ...}."""

    def __init__(self, status, error_code, message, headers=None):
        super().__init__(message)
        self.status = status
        self.error_code = error_code
        self.message = message
        self.headers = headers or {}


# ---------------------------------------------------------------------------
# validation


def collection_name_problem(name):
    if not isinstance(name, str) or name == "":
        return "Event collection name cannot be empty."
    if len(name) > MAX_COLLECTION_CHARS:
        return "Event collection name cannot be longer than %d characters." % MAX_COLLECTION_CHARS
    if any(ord(c) > 127 for c in name):
        return "Event collection name must only contain ASCII characters."
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return "Event collection name cannot contain control characters."
    if name.startswith("$"):
        return "Event collection name cannot start with the dollar sign ($) character."
    return None


def property_name_problem(name):
    if name == "":
        return "An event cannot contain a property with an empty name."
    if "." in name:
        return "An event cannot contain a property with the period (.) character in it."
    if name.startswith("$"):
        return "An event cannot contain a property that starts with the dollar sign ($) character."
    if len(name) > MAX_PROPERTY_NAME_CHARS:
        return "An event cannot contain a property name longer than %d characters." % MAX_PROPERTY_NAME_CHARS
    return None


_ISO_RE = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})"
    r"(?:[T ](\d{2}):(\d{2})(?::(\d{2})(?:\.(\d{1,9}))?)?)?"
    r"(Z|[+-]\d{2}:?\d{2})?$")


def parse_iso8601(text):
    """Returns an aware UTC datetime, or None if `text` is not ISO-8601."""
    if not isinstance(text, str):
        return None
    m = _ISO_RE.match(text.strip())
    if not m:
        return None
    year, month, day, hh, mm, ss, frac, tz = m.groups()
    try:
        micro = int((frac or "0")[:6].ljust(6, "0"))
        value = dt.datetime(int(year), int(month), int(day), int(hh or 0), int(mm or 0), int(ss or 0), micro)
    except ValueError:
        return None
    offset = dt.timedelta(0)
    if tz and tz != "Z":
        sign = 1 if tz[0] == "+" else -1
        digits = tz[1:].replace(":", "")
        offset = sign * dt.timedelta(hours=int(digits[:2]), minutes=int(digits[2:]))
    return (value - offset).replace(tzinfo=dt.timezone.utc)


def format_iso8601(value):
    return value.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def event_problem(event, max_string_chars):
    """Returns (error_name, description) for the first problem in `event`, or None."""
    if not isinstance(event, dict):
        return ("InvalidEventError", "An event must be a JSON object.")
    keen = event.get("keen")
    if keen is not None:
        if not isinstance(keen, dict):
            return ("InvalidPropertyValueError", "The root-level property 'keen' must be an object.")
        if "timestamp" in keen and parse_iso8601(keen["timestamp"]) is None:
            return ("InvalidPropertyValueError",
                    "keen.timestamp must be an ISO-8601 date-time string, got %s." % json.dumps(keen["timestamp"])[:100])
        if "uniqueness_token" in keen:
            token = keen["uniqueness_token"]
            if not isinstance(token, str) or token == "":
                return ("InvalidPropertyValueError", "keen.uniqueness_token must be a non-empty string.")
            if len(token) > MAX_UNIQUENESS_TOKEN_CHARS:
                return ("InvalidPropertyValueError",
                        "keen.uniqueness_token cannot be longer than %d characters." % MAX_UNIQUENESS_TOKEN_CHARS)
    # Walk every nesting level (objects, and objects inside arrays) without recursion.
    stack = [("", event)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, dict):
            for key, child in value.items():
                problem = property_name_problem(key)
                if problem:
                    where = (path + "." if path else "") + key
                    return ("InvalidPropertyNameError", "%s Property: %s" % (problem, json.dumps(where)[:300]))
                stack.append(((path + "." if path else "") + key, child))
        elif isinstance(value, list):
            for index, child in enumerate(value):
                stack.append(("%s[%d]" % (path, index), child))
        elif isinstance(value, str) and max_string_chars and len(value) > max_string_chars:
            return ("InvalidPropertyValueError",
                    "An event cannot contain a string property value longer than %s characters. Property: %s"
                    % ("{:,}".format(max_string_chars), path))
    size = len(json.dumps(event, separators=(",", ":"), ensure_ascii=False).encode("utf-8"))
    if size > MAX_EVENT_BYTES:
        return ("EventTooLargeError",
                "An event cannot be larger than %d bytes (this one is %d bytes)." % (MAX_EVENT_BYTES, size))
    return None


_MISSING = object()


def property_at(event, path):
    """Value at a dotted property path ("keen.uniqueness_token"), or _MISSING."""
    value = event
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return _MISSING
        value = value[part]
    return value


def _comparable(a, b):
    numbers = (int, float)
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool)
    if isinstance(a, numbers) and isinstance(b, numbers):
        return True
    return isinstance(a, str) and isinstance(b, str)


def _equal(a, b):
    if isinstance(a, bool) != isinstance(b, bool):
        return False
    return a == b


def filter_matches(event, flt):
    name = flt["property_name"]
    op = flt["operator"]
    want = flt.get("property_value")
    value = property_at(event, name)
    if op == "exists":
        return (value is not _MISSING and value is not None) == bool(want)
    if value is _MISSING:
        return op in ("ne", "not_contains")
    if op == "eq":
        return _equal(value, want)
    if op == "ne":
        return not _equal(value, want)
    if op == "in":
        return any(_equal(value, w) for w in want)
    if op in ("lt", "lte", "gt", "gte"):
        if not _comparable(value, want):
            return False
        return {"lt": value < want, "lte": value <= want, "gt": value > want, "gte": value >= want}[op]
    if op == "contains":
        if isinstance(value, str) and isinstance(want, str):
            return want in value
        if isinstance(value, list):
            return any(_equal(v, want) for v in value)
        return False
    if op == "not_contains":
        if isinstance(value, str) and isinstance(want, str):
            return want not in value
        if isinstance(value, list):
            return not any(_equal(v, want) for v in value)
        return True
    if op == "starts_with":
        return isinstance(value, str) and isinstance(want, str) and value.startswith(want)
    return False


def check_filters(filters):
    if filters is None:
        return []
    if not isinstance(filters, list):
        raise KeenError(400, "FilterError", "filters must be a JSON array of {property_name, operator, property_value}.")
    for flt in filters:
        if not isinstance(flt, dict) or not isinstance(flt.get("property_name"), str) or "operator" not in flt:
            raise KeenError(400, "FilterError",
                            "Each filter needs property_name, operator and property_value, got %s." % json.dumps(flt)[:200])
        if flt["operator"] not in FILTER_OPERATORS:
            raise KeenError(400, "FilterError", "Unsupported filter operator %s (the emulator knows %s)."
                            % (json.dumps(flt["operator"]), ", ".join(FILTER_OPERATORS)))
        if flt["operator"] != "exists" and "property_value" not in flt:
            raise KeenError(400, "FilterError", "Filter on %s has no property_value." % flt["property_name"])
        if flt["operator"] == "in" and not isinstance(flt.get("property_value"), list):
            raise KeenError(400, "FilterError", "The in operator needs a list property_value.")
    return filters


# ---------------------------------------------------------------------------
# timeframes (UTC; weeks start on Sunday)

_RELATIVE_RE = re.compile(r"^(this|previous)_(\d+)_(minute|hour|day|week|month|year)s?$")


def _truncate(now, unit):
    if unit == "minutes":
        return now.replace(second=0, microsecond=0)
    if unit == "hours":
        return now.replace(minute=0, second=0, microsecond=0)
    day = now.replace(hour=0, minute=0, second=0, microsecond=0)
    if unit == "days":
        return day
    if unit == "weeks":
        return day - dt.timedelta(days=(day.weekday() + 1) % 7)
    if unit == "months":
        return day.replace(day=1)
    return day.replace(month=1, day=1)


def _step_back(start, unit, n):
    if unit == "minutes":
        return start - dt.timedelta(minutes=n)
    if unit == "hours":
        return start - dt.timedelta(hours=n)
    if unit == "days":
        return start - dt.timedelta(days=n)
    if unit == "weeks":
        return start - dt.timedelta(weeks=n)
    months = start.year * 12 + (start.month - 1) - (n if unit == "months" else 12 * n)
    return start.replace(year=months // 12, month=months % 12 + 1)


def timeframe_window(timeframe, now=None):
    """(start, end) for a Keen timeframe; None means no limit on that side."""
    if timeframe is None or timeframe == "":
        return (None, None)
    now = now or dt.datetime.now(dt.timezone.utc)
    if isinstance(timeframe, dict):
        start = parse_iso8601(timeframe.get("start"))
        end = parse_iso8601(timeframe.get("end"))
        if start is None or end is None:
            raise KeenError(400, "TimeframeDefinitionError", "An absolute timeframe needs ISO-8601 start and end.")
        return (start, end)
    if not isinstance(timeframe, str):
        raise KeenError(400, "TimeframeDefinitionError", "timeframe must be a string or {start, end}.")
    aliases = {"today": "this_1_days", "yesterday": "previous_1_days"}
    text = aliases.get(timeframe, timeframe)
    if text.startswith(("this_", "previous_")) and text.count("_") == 1:
        kind, unit = text.split("_")
        text = "%s_1_%s" % (kind, unit)
    m = _RELATIVE_RE.match(text)
    if not m:
        raise KeenError(400, "TimeframeDefinitionError", "Unknown timeframe %s." % json.dumps(timeframe))
    kind, n, unit = m.group(1), int(m.group(2)), m.group(3) + "s"
    current = _truncate(now, unit)
    if kind == "this":
        return (_step_back(current, unit, n - 1), now)
    return (_step_back(current, unit, n), current)


# ---------------------------------------------------------------------------
# state


class Rule:
    def __init__(self, spec):
        if not isinstance(spec, dict) or not isinstance(spec.get("property"), str) or "equals" not in spec:
            raise ValueError("a fail_events rule needs property and equals")
        error = spec.get("error") or {}
        self.property = spec["property"]
        self.equals = spec["equals"]
        self.name = error.get("name", "InternalServerError")
        self.description = error.get("description", "Injected failure for %s = %s" % (self.property, json.dumps(self.equals)))
        self.status = int(spec.get("status", 400))
        self.times = spec.get("times")  # None = always

    def describe(self):
        return {"property": self.property, "equals": self.equals, "error": {"name": self.name, "description": self.description},
                "status": self.status, "times": self.times}


class State:
    def __init__(self, max_string_chars):
        self.lock = threading.Lock()
        self.max_string_chars = max_string_chars
        self.reset()

    def reset(self):
        self.collections = {}      # name -> [event]
        self.tokens = {}           # name -> set(uniqueness_token)
        self.fail_next = []        # [{count, status, scope, ...}]
        self.drop_next = []        # [{count, scope}]
        self.rules = []
        self.latency_ms = 0
        self.duplicates = "success"
        self.requests = []
        self.counters = {"requests": 0, "events_stored": 0, "events_rejected": 0, "duplicates": 0,
                         "injected_failures": 0, "dropped_connections": 0}

    def take(self, queue, scope):
        """Consumes one matching injected action from `queue` (call with the lock held)."""
        for item in queue:
            if item["count"] > 0 and item["scope"] in ("all", scope):
                item["count"] -= 1
                if item["count"] == 0:
                    queue.remove(item)
                return item
        return None

    def matching_rule(self, event):
        for rule in self.rules:
            if rule.times is not None and rule.times <= 0:
                continue
            value = property_at(event, rule.property)
            if value is not _MISSING and _equal(value, rule.equals):
                if rule.times is not None:
                    rule.times -= 1
                return rule
        return None

    def record(self, collection, event):
        """Validates and stores one event (lock held). Returns None or (name, description[, status])."""
        problem = collection_name_problem(collection)
        if problem:
            return ("InvalidCollectionNameError", problem)
        problem = event_problem(event, self.max_string_chars)
        if problem:
            return problem
        rule = self.matching_rule(event)
        if rule:
            self.counters["injected_failures"] += 1
            return (rule.name, rule.description, rule.status)
        now = dt.datetime.now(dt.timezone.utc)
        stored = json.loads(json.dumps(event))
        keen = stored.setdefault("keen", {})
        token = keen.get("uniqueness_token")
        if token is not None:
            seen = self.tokens.setdefault(collection, set())
            if token in seen:
                self.counters["duplicates"] += 1
                if self.duplicates == "error":
                    return ("DuplicateEventError", "An event with keen.uniqueness_token %s was already recorded in %s."
                            % (json.dumps(token), collection))
                return None
            seen.add(token)
        keen["created_at"] = format_iso8601(now)
        keen["timestamp"] = format_iso8601(parse_iso8601(keen["timestamp"])) if "timestamp" in keen else keen["created_at"]
        keen["id"] = secrets.token_hex(12)
        self.collections.setdefault(collection, []).append(stored)
        self.counters["events_stored"] += 1
        return None


# ---------------------------------------------------------------------------
# HTTP


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "KeenEmulator/1.0"
    sys_version = ""

    def log_message(self, fmt, *args):
        log("%s %s", self.address_string(), fmt % args)

    # --- plumbing ---------------------------------------------------------

    @property
    def state(self):
        return self.server.state

    def send_json(self, status, obj, headers=None):
        body = json.dumps(obj, separators=(",", ":")).encode("utf-8")
        self.send_raw(status, body, "application/json", headers)

    def send_raw(self, status, body, content_type="application/json", headers=None):
        # An API request is in the log before its answer leaves: a client that reads /_requests
        # right after its answer finds it there.
        self.record_request(status)
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, str(value))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self.last_status = status

    def record_request(self, status):
        entry, self.pending_entry = getattr(self, "pending_entry", None), None
        if entry is None:
            return
        entry["status"] = status
        st = self.state
        with st.lock:
            st.counters["requests"] += 1
            st.requests.append(entry)
            del st.requests[:-REQUEST_LOG_LIMIT]

    def send_error_json(self, err):
        self.send_json(err.status, {"message": err.message, "error_code": err.error_code}, err.headers)

    def read_body(self):
        self.body_read = True
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks, total = [], 0
            while True:
                line = self.rfile.readline(65537)
                size = int(line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass
                    break
                total += size
                if total > MAX_REQUEST_BYTES:
                    self.close_connection = True
                    raise KeenError(413, "RequestTooLargeError", "The request body is larger than %d bytes." % MAX_REQUEST_BYTES)
                chunks.append(self.rfile.read(size))
                self.rfile.readline(3)
            return b"".join(chunks)
        length = self.headers.get("Content-Length")
        if length is None:
            return b""
        try:
            length = int(length)
        except ValueError:
            self.close_connection = True
            raise KeenError(400, "BadRequestError", "Invalid Content-Length.")
        if length > MAX_REQUEST_BYTES:
            self.close_connection = True
            if length <= DRAIN_LIMIT_BYTES:  # let the client finish sending, then answer
                left = length
                while left > 0:
                    chunk = self.rfile.read(min(left, 1 << 20))
                    if not chunk:
                        break
                    left -= len(chunk)
            raise KeenError(413, "RequestTooLargeError",
                            "The request body is %d bytes; the limit is %d bytes." % (length, MAX_REQUEST_BYTES))
        return self.rfile.read(length)

    def parse_json(self, body):
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            raise KeenError(400, "InvalidJSONError", "The request body is not valid UTF-8.")
        if text.strip() == "":
            raise KeenError(400, "InvalidJSONError", "The request body is empty; a JSON object is required.")
        try:
            return json.loads(text)
        except RecursionError:
            raise KeenError(400, "InvalidJSONError", "The request body is nested too deeply.")
        except ValueError as e:
            raise KeenError(400, "InvalidJSONError", "The request body is not valid JSON: %s" % e)

    def drop(self):
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    # --- dispatch -----------------------------------------------------------

    def do_GET(self):
        self.dispatch()

    def do_POST(self):
        self.dispatch()

    def do_DELETE(self):
        self.dispatch()

    def do_PUT(self):
        self.dispatch()

    def dispatch(self):
        self.last_status = None
        self.pending_entry = None
        self.body_read = False
        url = urllib.parse.urlsplit(self.path)
        query = urllib.parse.parse_qs(url.query, keep_blank_values=True)
        path = urllib.parse.unquote(url.path)
        try:
            if url.path.startswith("/_"):
                self.test_hook(url.path, query)
                return
            self.api(url.path, query)
        except KeenError as err:
            if not self.body_read:
                self.close_connection = True  # the unread body must not be taken for the next request
            self.send_error_json(err)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as e:  # the emulator must answer, whatever happens
            log("internal error on %s %s: %r", self.command, path, e)
            self.close_connection = True
            try:
                self.send_json(500, {"message": "Emulator internal error: %r" % e, "error_code": "InternalServerError"})
            except OSError:
                pass

    # --- test hooks ---------------------------------------------------------

    def test_hook(self, path, query):
        st = self.state
        body = self.read_body()
        if path == "/_control":
            if self.command == "POST":
                spec = self.parse_json(body)
                if not isinstance(spec, dict):
                    raise KeenError(400, "BadRequestError", "/_control takes a JSON object.")
                self.apply_control(spec)
            elif self.command != "GET":
                raise KeenError(405, "MethodNotAllowedError", "GET or POST /_control.")
            with st.lock:
                snapshot = {
                    "latency_ms": st.latency_ms,
                    "duplicates": st.duplicates,
                    "fail_next": [dict(i) for i in st.fail_next],
                    "drop_next": [dict(i) for i in st.drop_next],
                    "fail_events": [r.describe() for r in st.rules],
                    "counters": dict(st.counters),
                    "collections": {k: len(v) for k, v in st.collections.items()},
                }
            self.send_json(200, snapshot)
            return
        if path == "/_events":
            if self.command == "DELETE":
                with st.lock:
                    st.collections = {}
                    st.tokens = {}
                self.send_json(200, {"deleted": True})
                return
            if self.command != "GET":
                raise KeenError(405, "MethodNotAllowedError", "GET or DELETE /_events.")
            with st.lock:
                if "collection" in query:
                    body = {"events": list(st.collections.get(query["collection"][0], []))}
                else:
                    body = {"collections": {k: list(v) for k, v in st.collections.items()}}
            self.send_json(200, body)
            return
        if path == "/_requests":
            with st.lock:
                body = {"requests": list(st.requests)}
            self.send_json(200, body)
            return
        raise KeenError(404, "ResourceNotFoundError", "Unknown test hook %s." % path)

    def apply_control(self, spec):
        st = self.state
        known = {"reset", "clear_rules", "fail_next", "drop_next", "fail_events", "latency_ms", "duplicates"}
        unknown = set(spec) - known
        if unknown:
            raise KeenError(400, "BadRequestError", "Unknown /_control keys: %s (known: %s)." % (
                ", ".join(sorted(unknown)), ", ".join(sorted(known))))
        with st.lock:
            if spec.get("reset"):
                st.reset()
            if spec.get("clear_rules"):
                st.rules = []
                st.fail_next = []
                st.drop_next = []
                st.latency_ms = 0
            if "fail_next" in spec:
                f = spec["fail_next"]
                if not isinstance(f, dict) or not isinstance(f.get("status"), int):
                    raise KeenError(400, "BadRequestError", "fail_next needs at least {\"status\": S}.")
                item = {"count": int(f.get("count", 1)), "status": f["status"], "scope": f.get("scope", "all")}
                for key in ("error_code", "message", "retry_after", "raw_body"):
                    if key in f:
                        item[key] = f[key]
                if item["scope"] not in ("all", "events", "queries"):
                    raise KeenError(400, "BadRequestError", "fail_next scope is all, events or queries.")
                st.fail_next.append(item)
            if "drop_next" in spec:
                d = spec["drop_next"] if isinstance(spec["drop_next"], dict) else {"count": spec["drop_next"]}
                item = {"count": int(d.get("count", 1)), "scope": d.get("scope", "all")}
                if item["scope"] not in ("all", "events", "queries"):
                    raise KeenError(400, "BadRequestError", "drop_next scope is all, events or queries.")
                st.drop_next.append(item)
            if "fail_events" in spec:
                rules = spec["fail_events"]
                if isinstance(rules, dict):
                    rules = [rules]
                try:
                    st.rules.extend(Rule(r) for r in rules)
                except (TypeError, ValueError) as e:
                    raise KeenError(400, "BadRequestError", "fail_events: %s" % e)
            if "latency_ms" in spec:
                st.latency_ms = max(0, int(spec["latency_ms"]))
            if "duplicates" in spec:
                if spec["duplicates"] not in ("success", "error"):
                    raise KeenError(400, "BadRequestError", "duplicates is success or error.")
                st.duplicates = spec["duplicates"]

    # --- the Keen API -------------------------------------------------------

    def api(self, raw_path, query):
        parts = [urllib.parse.unquote(p) for p in raw_path.split("/")]
        # "", "3.0", "projects", project, kind, [collection]
        entry = {"time": time.time(), "method": self.command, "path": raw_path}
        self.pending_entry = entry
        try:
            self._api(parts, query, entry)
        except KeenError as err:
            if not self.body_read:
                self.close_connection = True
            self.send_error_json(err)
        finally:
            self.record_request(self.last_status)  # no answer was sent (a dropped connection)

    def _api(self, parts, query, entry):
        st = self.state
        if len(parts) < 5 or parts[0] != "" or parts[1] != "3.0" or parts[2] != "projects":
            raise KeenError(404, "ResourceNotFoundError", "Resource not found")
        project, kind, rest = parts[3], parts[4], parts[5:]
        scope = {"events": "events", "queries": "queries"}.get(kind, "other")

        with st.lock:
            latency = st.latency_ms
            drop = st.take(st.drop_next, scope)
            if drop:
                st.counters["dropped_connections"] += 1
        if latency:
            time.sleep(latency / 1000.0)
        if drop:
            entry["dropped"] = True
            self.drop()
            return
        body = self.read_body()
        with st.lock:
            injected = st.take(st.fail_next, scope)
            if injected:
                st.counters["injected_failures"] += 1
        if injected:
            entry["injected"] = True
            headers = {}
            if "retry_after" in injected:
                headers["Retry-After"] = injected["retry_after"]
            if "raw_body" in injected:
                self.send_raw(injected["status"], str(injected["raw_body"]).encode("utf-8"), "text/html", headers)
                return
            code = injected.get("error_code", ERROR_CODES_BY_STATUS.get(injected["status"], "InternalServerError"))
            raise KeenError(injected["status"], code,
                            injected.get("message", "Injected failure (HTTP %d)." % injected["status"]), headers)

        if project != self.server.project:
            raise KeenError(404, "ResourceNotFoundError", "Resource not found")
        if kind == "events" and self.command == "POST" and len(rest) <= 1:
            entry["key"] = self.authorize("writes")
            if rest:
                self.write_single(rest[0], body, entry)
            else:
                self.write_batch(body, entry)
            return
        if kind == "queries" and rest == ["count"] and self.command in ("GET", "POST"):
            entry["key"] = self.authorize("queries")
            self.count(query, body, entry)
            return
        raise KeenError(404, "ResourceNotFoundError",
                        "Resource not found (the emulator implements POST .../events, POST .../events/COLLECTION"
                        " and GET|POST .../queries/count).")

    def authorize(self, permission):
        supplied = self.headers.get("Authorization")
        if supplied is None:
            q = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
            supplied = q.get("api_key", [None])[0]
        if supplied is None or supplied.strip() == "":
            raise KeenError(401, "InvalidApiKeyError",
                            "An API key is required: send it in the Authorization header or the api_key parameter.")
        supplied = supplied.strip()
        kind = None
        for name, key, permissions in self.server.keys:
            if hmac.compare_digest(supplied.encode("utf-8"), key.encode("utf-8")):
                kind = name
                if permission in permissions:
                    return name
        if kind is None:
            raise KeenError(401, "InvalidApiKeyError", "The API key is invalid.")
        needed = {"writes": "a Write Key or the Master Key", "queries": "a Read Key or the Master Key"}[permission]
        raise KeenError(401, "InvalidApiKeyError", "This request needs %s (or an Access Key permitting %s); a %s was sent."
                        % (needed, permission, kind.replace("_", " ")))

    def write_single(self, collection, body, entry):
        entry["collection"] = collection
        problem = collection_name_problem(collection)
        if problem:
            raise KeenError(400, "InvalidCollectionNameError", problem)
        event = self.parse_json(body)
        if not isinstance(event, dict):
            raise KeenError(400, "InvalidEventError", "The request body must be a JSON object (one event).")
        entry["events"] = 1
        with self.state.lock:
            failure = self.state.record(collection, event)
            if failure:
                self.state.counters["events_rejected"] += 1
        if failure:
            status = failure[2] if len(failure) > 2 else (413 if failure[0] == "EventTooLargeError" else 400)
            raise KeenError(status, failure[0], failure[1])
        self.send_json(201, {"created": True})

    def write_batch(self, body, entry):
        batch = self.parse_json(body)
        if not isinstance(batch, dict):
            raise KeenError(400, "InvalidBatchError",
                            "The request body must be a JSON object mapping event collection names to arrays of events.")
        for collection, events in batch.items():
            if not isinstance(events, list):
                raise KeenError(400, "InvalidBatchError",
                                "The value for event collection %s must be an array of events." % json.dumps(collection)[:100])
        entry["collections"] = list(batch)
        entry["events"] = sum(len(v) for v in batch.values())
        result = {}
        with self.state.lock:
            for collection, events in batch.items():
                outcomes = []
                for event in events:
                    failure = self.state.record(collection, event)
                    if failure:
                        self.state.counters["events_rejected"] += 1
                        outcomes.append({"success": False, "error": {"name": failure[0], "description": failure[1]}})
                    else:
                        outcomes.append({"success": True})
                result[collection] = outcomes
        self.send_json(200, result)

    def count(self, query, body, entry):
        params = {}
        if self.command == "POST" and body.strip():
            params = self.parse_json(body)
            if not isinstance(params, dict):
                raise KeenError(400, "BadRequestError", "A query body must be a JSON object.")
        for key, values in query.items():
            if key == "api_key":
                continue
            value = values[0]
            if key in ("filters", "timeframe") and value.strip().startswith(("[", "{")):
                try:
                    value = json.loads(value)
                except ValueError:
                    raise KeenError(400, "BadRequestError", "%s is not valid JSON." % key)
            params.setdefault(key, value)
        collection = params.get("event_collection")
        if not isinstance(collection, str) or collection == "":
            raise KeenError(400, "MissingRequiredPropertyError", "event_collection is required.")
        for unsupported in ("group_by", "interval"):
            if params.get(unsupported):
                raise KeenError(400, "BadRequestError", "The emulator does not implement %s." % unsupported)
        filters = check_filters(params.get("filters"))
        start, end = timeframe_window(params.get("timeframe"))
        entry["collection"] = collection
        n = 0
        with self.state.lock:
            events = list(self.state.collections.get(collection, []))
        for event in events:
            if start is not None or end is not None:
                stamp = parse_iso8601(event["keen"]["timestamp"])
                if (start is not None and stamp < start) or (end is not None and stamp >= end):
                    continue
            if all(filter_matches(event, f) for f in filters):
                n += 1
        self.send_json(200, {"result": n})


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address, project, keys, state, tls_context=None):
        super().__init__(address, Handler)
        self.project = project
        self.keys = keys
        self.state = state
        self.tls_context = tls_context

    def finish_request(self, request, client_address):
        # Runs in the connection's own thread: the TLS handshake never blocks accept().
        if self.tls_context is not None:
            try:
                request.settimeout(30)
                request = self.tls_context.wrap_socket(request, server_side=True)
                request.settimeout(None)
            except (ssl.SSLError, OSError) as e:
                log("TLS handshake with %s failed: %s", client_address, e)
                return
        self.RequestHandlerClass(request, client_address, self)

    def handle_error(self, request, client_address):
        log("connection error from %s: %r", client_address, sys.exc_info()[1])


def parse_access_key(text):
    key, sep, perms = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError("--access-key is KEY=writes[,queries]")
    permissions = {p.strip() for p in perms.split(",") if p.strip()}
    if not permissions <= {"writes", "queries"}:
        raise argparse.ArgumentTypeError("access key permissions are writes and/or queries")
    return (key, permissions)


def make_server(project, write_key, read_key, master_key, access_keys=(), host="127.0.0.1", port=0,
                tls_cert=None, tls_key=None, max_string_chars=MAX_STRING_VALUE_CHARS):
    keys = [("write_key", write_key, {"writes"}), ("read_key", read_key, {"queries"}),
            ("master_key", master_key, {"writes", "queries"})]
    keys += [("access_key", k, p) for k, p in access_keys]
    keys = [k for k in keys if k[1]]
    context = None
    if tls_cert:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(tls_cert, tls_key)
    return Server((host, port), project, keys, State(max_string_chars), context)


def self_test():
    """Runs Tests/tools/test_keen_emulator.py (for callers that only know this file)."""
    import unittest
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    suite = unittest.defaultTestLoader.loadTestsFromName("test_keen_emulator")
    result = unittest.TextTestRunner(verbosity=1).run(suite)
    print("keen_emulator self-test: %s" % ("OK" if result.wasSuccessful() else "FAILED"))
    return 0 if result.wasSuccessful() else 1


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv == ["--self-test"]:
        return self_test()
    p = argparse.ArgumentParser(description="Keen HTTP API emulator for tests")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 picks a free port")
    p.add_argument("--project", required=True, help="the one project id served")
    p.add_argument("--write-key", required=True)
    p.add_argument("--read-key", required=True)
    p.add_argument("--master-key", required=True)
    p.add_argument("--access-key", action="append", type=parse_access_key, default=[],
                   help="KEY=writes[,queries] (repeatable)")
    p.add_argument("--tls-cert", help="serve HTTPS with this certificate (PEM)")
    p.add_argument("--tls-key", help="private key for --tls-cert (PEM)")
    p.add_argument("--max-string-chars", type=int, default=MAX_STRING_VALUE_CHARS,
                   help="longest string property value accepted (0: no limit); default %(default)s")
    p.add_argument("--port-file", help="also write HOST:PORT here once listening")
    p.add_argument("--log", help="debug log file")
    args = p.parse_args(argv)
    if bool(args.tls_cert) != bool(args.tls_key):
        p.error("--tls-cert and --tls-key go together")

    global _log_file
    if args.log:
        _log_file = open(args.log, "a", encoding="utf-8")

    server = make_server(args.project, args.write_key, args.read_key, args.master_key, args.access_key,
                         args.host, args.port, args.tls_cert, args.tls_key, args.max_string_chars)
    host, port = server.server_address[:2]

    # Handlers first: whoever reads the port file or the first line may send SIGTERM at once.
    def stop(signum, frame):
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    if args.port_file:
        tmp = args.port_file + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write("%s:%d\n" % (host, port))
        os.replace(tmp, args.port_file)
    print("listening on %s:%d" % (host, port), flush=True)
    log("listening on %s:%d (tls: %s)", host, port, bool(args.tls_cert))

    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
