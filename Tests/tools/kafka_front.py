#!/usr/bin/env python3
"""Kafka "TLS + SASL front" for tests.

Sits in front of a PLAINTEXT Kafka cluster without SASL (librdkafka's mock
cluster) and lets real Kafka clients connect to it with TLS and, unless
--no-sasl, SASL (PLAIN, SCRAM-SHA-256, SCRAM-SHA-512), so that a client's
TLS/SASL configuration is exercised for real.

One TLS listener on 127.0.0.1 per upstream broker node. Per client connection
the front opens a plain TCP connection to the upstream broker its listener
stands for, answers SaslHandshake/SaslAuthenticate itself, adds them to the
ApiVersions response, rewrites broker addresses in Metadata and
FindCoordinator responses to point at its own listeners, and relays
everything else byte for byte.

Standard library only. Runs until SIGTERM/SIGINT.
"""

import argparse
import asyncio
import base64
import hashlib
import hmac
import json
import os
import secrets
import signal
import ssl
import struct
import sys
import time

API_PRODUCE = 0
API_METADATA = 3
API_FIND_COORDINATOR = 10
API_SASL_HANDSHAKE = 17
API_API_VERSIONS = 18
API_SASL_AUTHENTICATE = 36

ERR_NONE = 0
ERR_UNSUPPORTED_SASL_MECHANISM = 33
ERR_ILLEGAL_SASL_STATE = 34
ERR_UNSUPPORTED_VERSION = 35
ERR_SASL_AUTHENTICATION_FAILED = 58

ALL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
SCRAM_ITERATIONS = 4096
MAX_FRAME = 256 * 1024 * 1024
PRE_AUTH_MAX_FRAME = 1024 * 1024

# ---------------------------------------------------------------------------
# logging

_log_file = None


def log(msg, *args):
    if _log_file is None:
        return
    try:
        text = msg % args if args else msg
        t = time.time()
        stamp = time.strftime("%H:%M:%S", time.localtime(t)) + ".%03d" % int((t % 1) * 1000)
        _log_file.write("%s %s\n" % (stamp, text))
        _log_file.flush()
    except Exception:  # logging must never break the front
        pass


# ---------------------------------------------------------------------------
# wire encoding helpers


class ParseError(Exception):
    pass


class Reader:
    """Cursor over a Kafka message body."""

    def __init__(self, data, pos=0):
        self.data = data
        self.pos = pos

    def raw(self, n):
        if n < 0 or self.pos + n > len(self.data):
            raise ParseError("truncated message (want %d bytes at %d of %d)" % (n, self.pos, len(self.data)))
        b = self.data[self.pos:self.pos + n]
        self.pos += n
        return bytes(b)

    def i16(self):
        return struct.unpack(">h", self.raw(2))[0]

    def i32(self):
        return struct.unpack(">i", self.raw(4))[0]

    def i64(self):
        return struct.unpack(">q", self.raw(8))[0]

    def uvarint(self):
        shift = 0
        value = 0
        while True:
            b = self.raw(1)[0]
            value |= (b & 0x7F) << shift
            if not b & 0x80:
                return value
            shift += 7
            if shift > 63:
                raise ParseError("varint too long")

    def string(self, flexible):
        """Nullable string (int16 length, or compact uvarint length+1)."""
        if flexible:
            n = self.uvarint() - 1
        else:
            n = self.i16()
        if n < 0:
            return None
        return self.raw(n).decode("utf-8", "replace")

    def bytes_(self, flexible):
        if flexible:
            n = self.uvarint() - 1
        else:
            n = self.i32()
        if n < 0:
            return None
        return self.raw(n)

    def array_len(self, flexible):
        if flexible:
            return self.uvarint() - 1
        return self.i32()

    def tagged_fields(self):
        count = self.uvarint()
        for _ in range(count):
            self.uvarint()  # tag
            size = self.uvarint()
            self.raw(size)

    def skip(self, fn, *args):
        """Run fn(*args) and return the raw bytes it consumed."""
        start = self.pos
        fn(*args)
        return bytes(self.data[start:self.pos])

    def rest(self):
        b = bytes(self.data[self.pos:])
        self.pos = len(self.data)
        return b


def enc_i16(v):
    return struct.pack(">h", v)


def enc_i32(v):
    return struct.pack(">i", v)


def enc_i64(v):
    return struct.pack(">q", v)


def enc_uvarint(v):
    out = bytearray()
    while True:
        b = v & 0x7F
        v >>= 7
        if v:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def enc_string(s, flexible):
    if s is None:
        return enc_uvarint(0) if flexible else enc_i16(-1)
    b = s.encode("utf-8")
    if flexible:
        return enc_uvarint(len(b) + 1) + b
    return enc_i16(len(b)) + b


def enc_bytes(b, flexible):
    if b is None:
        return enc_uvarint(0) if flexible else enc_i32(-1)
    if flexible:
        return enc_uvarint(len(b) + 1) + b
    return enc_i32(len(b)) + b


def enc_array_len(n, flexible):
    if flexible:
        return enc_uvarint(n + 1)  # n == -1 (null) encodes as 0
    return enc_i32(n)


EMPTY_TAGS = b"\x00"


# ---------------------------------------------------------------------------
# which versions use flexible (tagged-field) headers

def request_header_flexible(api_key, version):
    """Whether the request header is v2 (has tagged fields), for the APIs we parse."""
    first_flexible = {
        API_PRODUCE: 9,
        API_METADATA: 9,
        API_FIND_COORDINATOR: 3,
        API_SASL_HANDSHAKE: 99,       # never flexible
        API_API_VERSIONS: 3,
        API_SASL_AUTHENTICATE: 2,
    }
    return version >= first_flexible.get(api_key, 99)


def response_header_flexible(api_key, version):
    if api_key == API_API_VERSIONS:
        return False  # ApiVersions responses always use response header v0
    return request_header_flexible(api_key, version)


def parse_request_header(frame):
    """Return (api_key, api_version, correlation_id, client_id, body_reader)."""
    r = Reader(frame)
    api_key = r.i16()
    api_version = r.i16()
    corr = r.i32()
    client_id = r.string(False)  # client_id is never a compact string
    if request_header_flexible(api_key, api_version):
        r.tagged_fields()
    return api_key, api_version, corr, client_id, r


def produce_expects_response(frame):
    """Produce with acks=0 gets no response from the broker."""
    try:
        api_key, version, _corr, _cid, r = parse_request_header(frame)
        flexible = version >= 9
        if version >= 3:
            r.string(flexible)  # transactional_id
        acks = r.i16()
        return acks != 0
    except ParseError:
        return True


# ---------------------------------------------------------------------------
# response rewriting


def rewrite_api_versions(body, version, add_sasl):
    r = Reader(body)
    error = r.i16()
    if error != ERR_NONE:
        # e.g. UNSUPPORTED_VERSION: body is in v0 format whatever was asked; relay as is.
        return body
    flexible = version >= 3
    n = r.array_len(flexible)
    entries = []
    for _ in range(max(n, 0)):
        start = r.pos
        key = r.i16()
        r.i16()
        r.i16()
        if flexible:
            r.tagged_fields()
        entries.append((key, bytes(body[start:r.pos])))
    entries = [e for e in entries if e[0] not in (API_SASL_HANDSHAKE, API_SASL_AUTHENTICATE)]
    if add_sasl:
        tail = EMPTY_TAGS if flexible else b""
        entries.append((API_SASL_HANDSHAKE, struct.pack(">hhh", API_SASL_HANDSHAKE, 0, 1) + tail))
        entries.append((API_SASL_AUTHENTICATE, struct.pack(">hhh", API_SASL_AUTHENTICATE, 0, 1) + tail))
    entries.sort(key=lambda e: e[0])
    return enc_i16(error) + enc_array_len(len(entries), flexible) + b"".join(e[1] for e in entries) + r.rest()


ERR_UNKNOWN_TOPIC_OR_PART = 3


def rewrite_metadata(body, version, node_ports, missing_topics=()):
    """Broker addresses → the front's listeners. Topics named in missing_topics are answered as
    the broker answers a topic that does not exist (UNKNOWN_TOPIC_OR_PART, no partitions), as a
    cluster without topic auto-creation would."""
    r = Reader(body)
    flexible = version >= 9
    out = bytearray()
    if version >= 3:
        out += r.raw(4)  # throttle_time_ms
    n = r.array_len(flexible)
    out += enc_array_len(n, flexible)
    for _ in range(max(n, 0)):
        node = r.i32()
        host = r.string(flexible)
        port = r.i32()
        if node in node_ports:
            host, port = "127.0.0.1", node_ports[node]
        out += enc_i32(node) + enc_string(host, flexible) + enc_i32(port)
        if version >= 1:
            out += r.skip(r.string, flexible)  # rack
        if flexible:
            out += r.skip(r.tagged_fields)
    if not missing_topics:
        out += r.rest()
        return bytes(out)
    if version >= 2:
        out += r.skip(r.string, flexible)  # cluster_id
    if version >= 1:
        out += r.raw(4)  # controller_id
    n = r.array_len(flexible)
    out += enc_array_len(n, flexible)
    for _ in range(max(n, 0)):
        error = r.i16()
        name = r.string(flexible)
        topic_id = r.raw(16) if version >= 10 else b""
        internal = r.raw(1) if version >= 1 else b""
        partitions = r.skip(skip_metadata_partitions, r, version, flexible)
        authorized = r.raw(4) if version >= 8 else b""
        tags = r.skip(r.tagged_fields) if flexible else b""
        if name in missing_topics:
            error, partitions = ERR_UNKNOWN_TOPIC_OR_PART, enc_array_len(0, flexible)
        out += enc_i16(error) + enc_string(name, flexible) + topic_id + internal + partitions + authorized + tags
    out += r.rest()
    return bytes(out)


def skip_metadata_partitions(r, version, flexible):
    for _ in range(max(r.array_len(flexible), 0)):
        r.raw(2 + 4 + 4)  # error_code, partition_index, leader_id
        if version >= 7:
            r.raw(4)  # leader_epoch
        for _ in range(3 if version >= 5 else 2):  # replica_nodes, isr_nodes[, offline_replicas]
            r.raw(4 * max(r.array_len(flexible), 0))
        if flexible:
            r.tagged_fields()


def rewrite_find_coordinator(body, version, node_ports):
    r = Reader(body)
    flexible = version >= 3
    out = bytearray()
    if version >= 1:
        out += r.raw(4)  # throttle_time_ms

    def node_host_port():
        node = r.i32()
        host = r.string(flexible)
        port = r.i32()
        if node in node_ports:
            host, port = "127.0.0.1", node_ports[node]
        return enc_i32(node) + enc_string(host, flexible) + enc_i32(port)

    if version >= 4:
        n = r.array_len(flexible)
        out += enc_array_len(n, flexible)
        for _ in range(max(n, 0)):
            out += r.skip(r.string, flexible)  # key
            out += node_host_port()
            out += r.raw(2)  # error_code
            out += r.skip(r.string, flexible)  # error_message
            out += r.skip(r.tagged_fields)
    else:
        out += r.raw(2)  # error_code
        if version >= 1:
            out += r.skip(r.string, flexible)  # error_message
        out += node_host_port()
    out += r.rest()
    return bytes(out)


def rewrite_response(frame, api_key, version, front):
    """frame: response without the size prefix. Returns the (maybe rewritten) frame."""
    if api_key not in (API_API_VERSIONS, API_METADATA, API_FIND_COORDINATOR):
        return frame
    r = Reader(frame)
    r.i32()  # correlation id
    if response_header_flexible(api_key, version):
        r.tagged_fields()
    header = bytes(frame[:r.pos])
    body = bytes(frame[r.pos:])
    if api_key == API_API_VERSIONS:
        new_body = rewrite_api_versions(body, version, front.sasl_enabled)
    elif api_key == API_METADATA:
        new_body = rewrite_metadata(body, version, front.node_ports, front.missing_topics)
    else:
        new_body = rewrite_find_coordinator(body, version, front.node_ports)
    return header + new_body


# ---------------------------------------------------------------------------
# SASL


class AuthFailed(Exception):
    def __init__(self, message, code=ERR_SASL_AUTHENTICATION_FAILED):
        super().__init__(message)
        self.code = code


INVALID_CREDENTIALS = "Authentication failed: invalid credentials"


class PlainAuthenticator:
    def __init__(self, users):
        self.users = users
        self.user = None

    def step(self, token):
        """Return (done, response_bytes). Raises AuthFailed."""
        parts = token.split(b"\x00")
        if len(parts) != 3:
            raise AuthFailed("Authentication failed: invalid SASL/PLAIN request: expected 3 tokens")
        try:
            authzid, user, password = (p.decode("utf-8") for p in parts)
        except UnicodeDecodeError:
            raise AuthFailed("Authentication failed: invalid SASL/PLAIN request: not UTF-8")
        if authzid and authzid != user:
            raise AuthFailed("Authentication failed: Client requested an authorization id that is different from username")
        self.user = user
        expected = self.users.get(user)
        if expected is None or not hmac.compare_digest(expected.encode("utf-8"), password.encode("utf-8")):
            raise AuthFailed(INVALID_CREDENTIALS)
        return True, b""


def _scram_unescape(name):
    return name.replace("=2C", ",").replace("=3D", "=")


def _scram_attrs(text):
    attrs = {}
    for item in text.split(","):
        if len(item) >= 2 and item[1] == "=":
            attrs.setdefault(item[0], item[2:])
    return attrs


class ScramAuthenticator:
    def __init__(self, users, mechanism):
        self.users = users
        self.hash_name = "sha256" if mechanism == "SCRAM-SHA-256" else "sha512"
        self.state = 0
        self.user = None

    def _hmac(self, key, msg):
        return hmac.new(key, msg, self.hash_name).digest()

    def _h(self, data):
        return hashlib.new(self.hash_name, data).digest()

    def step(self, token):
        try:
            text = token.decode("utf-8")
        except UnicodeDecodeError:
            raise AuthFailed("Authentication failed: invalid SCRAM message: not UTF-8")
        if self.state == 0:
            return self._client_first(text)
        if self.state == 1:
            return self._client_final(text)
        raise AuthFailed("Authentication failed: unexpected SCRAM message", ERR_ILLEGAL_SASL_STATE)

    def _client_first(self, text):
        # gs2-header "n,," (or "y,,"), then client-first-message-bare
        parts = text.split(",", 2)
        if len(parts) != 3 or parts[0] not in ("n", "y") or (parts[1] and not parts[1].startswith("a=")):
            raise AuthFailed("Authentication failed: invalid SCRAM client-first message")
        self.gs2_header = parts[0] + "," + parts[1] + ","
        self.client_first_bare = parts[2]
        attrs = _scram_attrs(self.client_first_bare)
        if "n" not in attrs or "r" not in attrs or not attrs["r"]:
            raise AuthFailed("Authentication failed: invalid SCRAM client-first message")
        self.user = _scram_unescape(attrs["n"])
        self.nonce = attrs["r"] + base64.b64encode(secrets.token_bytes(18)).decode("ascii")
        # Unknown users get a random salt and fail at the final step, like a real broker.
        self.salt = secrets.token_bytes(16)
        self.server_first = "r=%s,s=%s,i=%d" % (self.nonce, base64.b64encode(self.salt).decode("ascii"),
                                               SCRAM_ITERATIONS)
        self.state = 1
        return False, self.server_first.encode("ascii")

    def _client_final(self, text):
        idx = text.rfind(",p=")
        if idx < 0:
            raise AuthFailed("Authentication failed: invalid SCRAM client-final message: no proof")
        without_proof = text[:idx]
        try:
            proof = base64.b64decode(text[idx + 3:], validate=True)
        except Exception:
            raise AuthFailed("Authentication failed: invalid SCRAM client-final message: bad proof")
        attrs = _scram_attrs(without_proof)
        expected_cbind = base64.b64encode(self.gs2_header.encode("utf-8")).decode("ascii")
        if attrs.get("c") != expected_cbind:
            raise AuthFailed("Authentication failed: invalid SCRAM channel binding")
        # Kafka brokers only check that the client-final nonce ENDS WITH the server nonce;
        # librdkafka relies on that: it sends r=<client nonce><full server nonce>.
        if not attrs.get("r", "").endswith(self.nonce):
            log("SCRAM nonce mismatch: client-final %r, expected nonce %r", text, self.nonce)
            raise AuthFailed("Authentication failed: invalid SCRAM nonce")
        self.state = 2
        password = self.users.get(self.user)
        if password is None:
            raise AuthFailed(INVALID_CREDENTIALS)
        salted = hashlib.pbkdf2_hmac(self.hash_name, password.encode("utf-8"), self.salt, SCRAM_ITERATIONS)
        client_key = self._hmac(salted, b"Client Key")
        stored_key = self._h(client_key)
        auth_message = ",".join((self.client_first_bare, self.server_first, without_proof)).encode("utf-8")
        client_signature = self._hmac(stored_key, auth_message)
        if len(proof) != len(client_signature):
            raise AuthFailed(INVALID_CREDENTIALS)
        recovered_key = bytes(a ^ b for a, b in zip(proof, client_signature))
        if not hmac.compare_digest(self._h(recovered_key), stored_key):
            raise AuthFailed(INVALID_CREDENTIALS)
        server_key = self._hmac(salted, b"Server Key")
        server_signature = self._hmac(server_key, auth_message)
        return True, b"v=" + base64.b64encode(server_signature)


def make_authenticator(mechanism, users):
    if mechanism == "PLAIN":
        return PlainAuthenticator(users)
    return ScramAuthenticator(users, mechanism)


# ---------------------------------------------------------------------------
# TLS over memory BIOs
#
# asyncio's built-in server TLS drops the TLS alert when the handshake fails on the
# server side (e.g. a required client certificate is missing), so the client only sees
# an unexpected EOF. Driving ssl.SSLObject ourselves lets the alert reach the client,
# as it would from a real broker.


class TlsStream:
    def __init__(self, reader, writer, ctx):
        self.reader = reader
        self.writer = writer
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self.incoming, self.outgoing, server_side=True)

    def _flush_nowait(self):
        data = self.outgoing.read()
        if data and not self.writer.is_closing():
            self.writer.write(data)

    async def _flush(self):
        self._flush_nowait()
        await self.writer.drain()

    async def _feed(self):
        data = await self.reader.read(65536)
        if data:
            self.incoming.write(data)
        else:
            self.incoming.write_eof()

    async def handshake(self):
        while True:
            try:
                self.obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                await self._flush()
                await self._feed()
            except ssl.SSLError:
                # send the alert (e.g. certificate required / unknown ca) before failing
                try:
                    await self._flush()
                except Exception:
                    pass
                raise
        await self._flush()

    async def readexactly(self, n):
        buf = bytearray()
        while len(buf) < n:
            try:
                chunk = self.obj.read(n - len(buf))
                if not chunk:  # close_notify
                    raise asyncio.IncompleteReadError(bytes(buf), n)
                buf += chunk
            except ssl.SSLWantReadError:
                await self._flush()
                await self._feed()
            except (ssl.SSLEOFError, ssl.SSLZeroReturnError):
                raise asyncio.IncompleteReadError(bytes(buf), n)
        return bytes(buf)

    def write(self, data):
        self.obj.write(data)
        self._flush_nowait()

    async def drain(self):
        await self._flush()

    def get_extra_info(self, name):
        if name == "ssl_object":
            return self.obj
        return self.writer.get_extra_info(name)

    def is_closing(self):
        return self.writer.is_closing()

    def close(self):
        try:
            self._flush_nowait()
        except Exception:
            pass
        self.writer.close()


# ---------------------------------------------------------------------------
# framing


async def read_frame(reader, limit):
    head = await reader.readexactly(4)
    (size,) = struct.unpack(">i", head)
    if size < 0 or size > limit:
        raise ParseError("bad frame size %d" % size)
    return await reader.readexactly(size)


def frame(payload):
    return struct.pack(">i", len(payload)) + payload


CLOSE = object()


# ---------------------------------------------------------------------------
# one client connection


class Connection:
    counter = 0

    def __init__(self, front, node, c_reader, c_writer):
        Connection.counter += 1
        self.id = Connection.counter
        self.front = front
        self.node = node
        self.c_reader = c_reader
        self.c_writer = c_writer
        self.u_reader = None
        self.u_writer = None
        self.order = asyncio.Queue()       # futures, in request order
        self.upstream_pending = {}         # corr -> (api_key, version, future)
        self.authenticated = not front.sasl_enabled
        self.mechanism = None
        self.authenticator = None
        self.raw_sasl = False              # after a SaslHandshake v0: raw SASL tokens
        self.user = None

    def log(self, msg, *args):
        log("[conn %d node %s] " % (self.id, self.node["node_id"]) + msg, *args)

    async def run(self):
        peer = self.c_writer.get_extra_info("peername")
        sslobj = self.c_writer.get_extra_info("ssl_object")
        self.log("client %s connected (%s, %s)", peer, sslobj.version() if sslobj else "?",
                 sslobj.cipher()[0] if sslobj and sslobj.cipher() else "?")
        if sslobj is not None and self.front.client_ca:
            cert = sslobj.getpeercert()
            self.log("client certificate subject: %s", cert.get("subject") if cert else None)
        try:
            self.u_reader, self.u_writer = await asyncio.wait_for(
                asyncio.open_connection(self.node["host"], self.node["port"]), 10)
        except Exception as e:
            self.log("cannot connect upstream %s:%s: %r", self.node["host"], self.node["port"], e)
            self._close()
            return
        tasks = {
            asyncio.ensure_future(self.client_loop()): "client",
            asyncio.ensure_future(self.upstream_loop()): "upstream",
        }
        writer_task = asyncio.ensure_future(self.writer_loop())
        tasks[writer_task] = "writer"
        try:
            done, _ = await asyncio.wait(tasks.keys(), return_when=asyncio.FIRST_COMPLETED)
            closing = False
            for t in done:
                try:
                    res = t.result()
                except Exception as e:
                    res = "error %r" % (e,)
                self.log("%s loop ended: %s", tasks[t], res)
                if res == "closing":
                    closing = True
            if closing and writer_task not in done:
                # let the final response (e.g. authentication failure) reach the client
                try:
                    await asyncio.wait_for(asyncio.shield(writer_task), 5)
                except Exception:
                    pass
        finally:
            for t in tasks:
                if not t.done():
                    t.cancel()
            await asyncio.gather(*tasks.keys(), return_exceptions=True)
            self._close()
            self.log("closed")

    def _close(self):
        for w in (self.c_writer, self.u_writer):
            if w is not None:
                try:
                    w.close()
                except Exception:
                    pass

    def _respond_now(self, data, close=False):
        fut = asyncio.get_running_loop().create_future()
        fut.set_result((data, close))
        self.order.put_nowait(fut)

    async def writer_loop(self):
        while True:
            fut = await self.order.get()
            data, close = await fut
            if data:
                self.c_writer.write(data)
                await self.c_writer.drain()
            if close:
                return "closed after final response"

    async def upstream_loop(self):
        while True:
            try:
                payload = await read_frame(self.u_reader, MAX_FRAME)
            except asyncio.IncompleteReadError:
                return "upstream EOF"
            if len(payload) < 4:
                return "short upstream frame"
            (corr,) = struct.unpack(">i", payload[:4])
            entry = self.upstream_pending.pop(corr, None)
            if entry is None:
                self.log("response with unknown correlation id %d dropped", corr)
                continue
            api_key, version, fut = entry
            try:
                out = rewrite_response(payload, api_key, version, self.front)
                if out is not payload:
                    self.log("rewrote response api_key=%d v%d corr=%d", api_key, version, corr)
            except Exception as e:
                self.log("cannot rewrite response api_key=%d v%d corr=%d: %r; relayed unchanged",
                         api_key, version, corr, e)
                out = payload
            fut.set_result((frame(out), False))

    async def client_loop(self):
        while True:
            limit = MAX_FRAME if self.authenticated else PRE_AUTH_MAX_FRAME
            try:
                payload = await read_frame(self.c_reader, limit)
            except asyncio.IncompleteReadError:
                return "client EOF"
            except (ConnectionError, ssl.SSLError) as e:
                return "client read error %r" % (e,)
            if self.raw_sasl:
                if not self.handle_raw_sasl(payload):
                    return "closing"
                continue
            if len(payload) < 8:
                self.log("short request frame; closing")
                self._respond_now(None, True)
                return "closing"
            api_key, version, corr = struct.unpack(">hhi", payload[:8])
            self.front.seen_versions.setdefault(api_key, set()).add(version)
            self.log("request api_key=%d v%d corr=%d (%d bytes)", api_key, version, corr, len(payload))
            if api_key in (API_SASL_HANDSHAKE, API_SASL_AUTHENTICATE) and self.front.sasl_enabled:
                if not self.handle_sasl(api_key, version, corr, payload):
                    return "closing"
                continue
            if not self.authenticated and api_key != API_API_VERSIONS:
                self.log("api_key %d before SASL authentication: closing", api_key)
                self._respond_now(None, True)
                return "closing"
            if api_key == API_PRODUCE and not produce_expects_response(payload):
                self.log("produce with acks=0: no response expected")
            else:
                fut = asyncio.get_running_loop().create_future()
                self.upstream_pending[corr] = (api_key, version, fut)
                self.order.put_nowait(fut)
            self.u_writer.write(frame(payload))
            await self.u_writer.drain()

    # -- SASL -------------------------------------------------------------

    def handle_sasl(self, api_key, version, corr, payload):
        """Answer SaslHandshake/SaslAuthenticate. Returns False if the connection is closing."""
        try:
            _k, _v, _c, _cid, r = parse_request_header(payload)
            if api_key == API_SASL_HANDSHAKE:
                return self.handle_handshake(version, corr, r)
            return self.handle_authenticate(version, corr, r)
        except ParseError as e:
            self.log("malformed SASL request: %s; closing", e)
            self._respond_now(None, True)
            return False

    def handle_handshake(self, version, corr, r):
        mechanism = r.string(False)
        enabled = self.front.mechanisms
        if version > 1:
            self.log("SaslHandshake v%d unsupported; closing", version)
            self._respond_now(None, True)
            return False
        body = bytearray()
        if self.authenticated or self.mechanism is not None:
            error = ERR_ILLEGAL_SASL_STATE
        elif mechanism in enabled:
            error = ERR_NONE
            self.mechanism = mechanism
            self.authenticator = make_authenticator(mechanism, self.front.users)
        else:
            error = ERR_UNSUPPORTED_SASL_MECHANISM
        body += enc_i16(error)
        body += enc_i32(len(enabled))
        for m in enabled:
            body += enc_string(m, False)
        self.log("SaslHandshake v%d mechanism=%r -> error %d", version, mechanism, error)
        self._respond_now(frame(enc_i32(corr) + bytes(body)))
        if error == ERR_NONE and version == 0:
            self.raw_sasl = True  # legacy: raw SASL tokens follow, without Kafka framing
        return True

    def _auth_step(self, token):
        """Returns (ok, done, response_bytes, error_code, error_message)."""
        if self.authenticator is None:
            return False, False, b"", ERR_ILLEGAL_SASL_STATE, "SaslAuthenticate without a successful SaslHandshake"
        try:
            done, resp = self.authenticator.step(token)
        except AuthFailed as e:
            return False, False, b"", e.code, str(e)
        if done:
            self.authenticated = True
            self.user = self.authenticator.user
            self.log("SASL %s authentication succeeded for user %r", self.mechanism, self.user)
        return True, done, resp, ERR_NONE, None

    def handle_authenticate(self, version, corr, r):
        flexible = version >= 2
        if version > 2:
            self.log("SaslAuthenticate v%d unsupported; closing", version)
            self._respond_now(None, True)
            return False
        token = r.bytes_(flexible) or b""
        if self.authenticated:
            ok, resp, code, msg = False, b"", ERR_ILLEGAL_SASL_STATE, "Already authenticated"
        else:
            ok, _done, resp, code, msg = self._auth_step(token)
        if not ok:
            self.log("SASL %s authentication failed (user %r): %d %s", self.mechanism,
                     getattr(self.authenticator, "user", None), code, msg)
        header = enc_i32(corr) + (EMPTY_TAGS if flexible else b"")
        body = enc_i16(code) + enc_string(msg, flexible) + enc_bytes(resp, flexible)
        if version >= 1:
            body += enc_i64(0)  # session_lifetime_ms: no re-authentication required
        if flexible:
            body += EMPTY_TAGS
        self._respond_now(frame(header + body), close=not ok)
        return ok

    def handle_raw_sasl(self, token):
        ok, done, resp, code, msg = self._auth_step(token)
        if not ok:
            self.log("SASL %s (raw) authentication failed: %d %s; closing", self.mechanism, code, msg)
            self._respond_now(None, True)
            return False
        self._respond_now(frame(resp))
        if done:
            self.raw_sasl = False
        return True


# ---------------------------------------------------------------------------
# the front


class Front:
    def __init__(self, args):
        self.args = args
        self.sasl_enabled = not args.no_sasl
        self.mechanisms = list(dict.fromkeys(args.mechanism or ALL_MECHANISMS))
        for m in self.mechanisms:
            if m not in ALL_MECHANISMS:
                raise SystemExit("unsupported mechanism %r (supported: %s)" % (m, ", ".join(ALL_MECHANISMS)))
        self.users = {}
        for u in args.user or []:
            if ":" not in u:
                raise SystemExit("--user wants NAME:PASSWORD, got %r" % u)
            name, password = u.split(":", 1)
            self.users[name] = password
        if self.sasl_enabled and not self.users:
            raise SystemExit("at least one --user is needed unless --no-sasl")
        self.client_ca = args.client_ca
        self.missing_topics = frozenset(args.missing_topic or [])
        self.upstream = [parse_hostport(a) for a in args.upstream.split(",") if a.strip()]
        self.nodes = []        # [{node_id, host, port}], listener order
        self.node_ports = {}   # node_id -> front listener port
        self.servers = []
        self.seen_versions = {}
        self.connections = set()

    def ssl_context(self):
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(self.args.cert, self.args.key)
        if self.client_ca:
            ctx.load_verify_locations(cafile=self.client_ca)
            ctx.verify_mode = ssl.CERT_REQUIRED
        else:
            ctx.verify_mode = ssl.CERT_NONE
        return ctx

    async def discover(self):
        deadline = time.monotonic() + 15
        last = None
        while time.monotonic() < deadline:
            for host, port in self.upstream:
                try:
                    brokers = await fetch_brokers(host, port)
                    if brokers:
                        return brokers
                except Exception as e:
                    last = "%s:%d: %r" % (host, port, e)
                    log("metadata from %s failed", last)
            await asyncio.sleep(0.3)
        raise SystemExit("cannot learn the upstream brokers (%s)" % last)

    async def start(self):
        brokers = await self.discover()
        log("upstream brokers: %s", brokers)
        # Listener order: the upstream addresses in the order given, then any other nodes.
        by_addr = {(b["host"], b["port"]): b for b in brokers}
        ordered = []
        for addr in self.upstream:
            b = by_addr.get(addr)
            if b is not None and b not in ordered:
                ordered.append(b)
        for b in sorted(brokers, key=lambda b: b["node_id"]):
            if b not in ordered:
                ordered.append(b)
        self.nodes = ordered
        self.ctx = self.ssl_context()
        addrs = []
        for node in self.nodes:
            server = await asyncio.start_server(
                lambda r, w, node=node: self.handle(node, r, w), "127.0.0.1", 0)
            port = server.sockets[0].getsockname()[1]
            self.node_ports[node["node_id"]] = port
            self.servers.append(server)
            addrs.append("127.0.0.1:%d" % port)
            log("listening on 127.0.0.1:%d for node %d (%s:%d)", port, node["node_id"], node["host"], node["port"])
        tmp = self.args.ports_file + ".tmp.%d" % os.getpid()
        with open(tmp, "w") as f:
            f.write(",".join(addrs) + "\n")  # newline-terminated, like dev-cluster.bootstrap
        os.replace(tmp, self.args.ports_file)
        log("ports file %s: %s (sasl=%s mechanisms=%s client_ca=%s)", self.args.ports_file, ",".join(addrs),
            self.sasl_enabled, self.mechanisms, self.client_ca)

    async def handle(self, node, reader, writer):
        task = asyncio.current_task()
        self.connections.add(task)
        peer = writer.get_extra_info("peername")
        tls = TlsStream(reader, writer, self.ctx)
        try:
            await asyncio.wait_for(tls.handshake(), 15)
        except Exception as e:
            log("[node %s] TLS handshake with %s failed: %r", node["node_id"], peer, e)
            writer.close()
            self.connections.discard(task)
            return
        conn = Connection(self, node, tls, tls)
        try:
            await conn.run()
        except Exception as e:  # one bad client never kills the front
            log("[conn %d] error: %r", conn.id, e)
            conn._close()
        finally:
            self.connections.discard(task)

    async def stop(self):
        for s in self.servers:
            s.close()
        for t in list(self.connections):
            t.cancel()
        log("stopped; request versions seen: %s",
            json.dumps({str(k): sorted(v) for k, v in sorted(self.seen_versions.items())}))


def parse_hostport(text):
    text = text.strip()
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise SystemExit("bad HOST:PORT %r" % text)
    return host.strip("[]"), int(port)


async def fetch_brokers(host, port):
    """Metadata v1 with an empty topic list over plain TCP: returns the brokers."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 5)
    try:
        corr = 1
        req = enc_i16(API_METADATA) + enc_i16(1) + enc_i32(corr) + enc_string("kafka-front", False) + enc_i32(0)
        writer.write(frame(req))
        await writer.drain()
        payload = await asyncio.wait_for(read_frame(reader, MAX_FRAME), 5)
        r = Reader(payload)
        if r.i32() != corr:
            raise ParseError("correlation id mismatch")
        brokers = []
        for _ in range(max(r.array_len(False), 0)):
            node = r.i32()
            bhost = r.string(False)
            bport = r.i32()
            r.string(False)  # rack
            brokers.append({"node_id": node, "host": bhost, "port": bport})
        return brokers
    finally:
        writer.close()


# ---------------------------------------------------------------------------
# self-test (python3 kafka_front.py --self-test): the encodings the mock cluster never
# exercises (flexible Metadata v9+, ApiVersions v3, FindCoordinator v3/v4) and SASL.


def self_test():
    ports = {1: 40001, 2: 40002}

    class F:
        sasl_enabled = True
        node_ports = ports

    def tags(flex):
        return EMPTY_TAGS if flex else b""

    # Metadata v0..v12
    for v in range(0, 13):
        flex = v >= 9
        brokers = [(1, "broker-1.internal", 9092, "rack-a"), (2, "b2", 9093, None), (7, "unknown", 9094, None)]
        body = bytearray()
        if v >= 3:
            body += enc_i32(5)
        body += enc_array_len(len(brokers), flex)
        for node, host, port, rack in brokers:
            body += enc_i32(node) + enc_string(host, flex) + enc_i32(port)
            if v >= 1:
                body += enc_string(rack, flex)
            body += tags(flex)
        tail = bytearray()
        if v >= 2:
            tail += enc_string("cluster-x", flex)
        if v >= 1:
            tail += enc_i32(1)
        tail += enc_array_len(1, flex) + enc_i16(0) + enc_string("t1", flex)
        if v >= 10:
            tail += b"\x11" * 16
        tail += b"\x00" + enc_array_len(0, flex)
        if v >= 8:
            tail += enc_i32(-2147483648)
        tail += tags(flex)
        if 8 <= v <= 10:
            tail += enc_i32(0)
        tail += tags(flex)
        out = rewrite_metadata(bytes(body + tail), v, ports)
        r = Reader(out)
        if v >= 3:
            assert r.i32() == 5
        got = []
        for _ in range(r.array_len(flex)):
            node, host, port = r.i32(), r.string(flex), r.i32()
            rack = r.string(flex) if v >= 1 else None
            if flex:
                r.tagged_fields()
            got.append((node, host, port, rack))
        want = [(1, "127.0.0.1", 40001, "rack-a" if v >= 1 else None), (2, "127.0.0.1", 40002, None),
                (7, "unknown", 9094, None)]
        assert got == want, (v, got)
        assert r.rest() == bytes(tail), v

    # ApiVersions v0..v3 (and an error response, relayed unchanged)
    for v in range(0, 4):
        flex = v >= 3
        apis = [(0, 0, 9), (3, 0, 12), (17, 0, 1), (18, 0, 3), (36, 0, 2)]
        body = enc_i16(0) + enc_array_len(len(apis), flex)
        for k, lo, hi in apis:
            body += struct.pack(">hhh", k, lo, hi) + tags(flex)
        tail = (enc_i32(0) if v >= 1 else b"") + (b"\x01\x00\x02\xab\xcd" if flex else b"")
        for add in (True, False):
            out = rewrite_api_versions(body + tail, v, add)
            r = Reader(out)
            assert r.i16() == 0
            got = []
            for _ in range(r.array_len(flex)):
                got.append((r.i16(), r.i16(), r.i16()))
                if flex:
                    r.tagged_fields()
            want = [(0, 0, 9), (3, 0, 12), (18, 0, 3)]
            if add:
                want = sorted(want + [(17, 0, 1), (36, 0, 1)])
            assert got == want, (v, add, got)
            assert r.rest() == tail
    err = enc_i16(ERR_UNSUPPORTED_VERSION) + enc_i32(1) + struct.pack(">hhh", 18, 0, 2)
    assert rewrite_api_versions(err, 3, True) == err

    # ApiVersions response header is never flexible, even at v3
    resp = enc_i32(9) + enc_i16(0) + enc_array_len(1, True) + struct.pack(">hhh", 18, 0, 3) + b"\x00" + enc_i32(0) + b"\x00"
    out = rewrite_response(resp, API_API_VERSIONS, 3, F)
    assert out[:4] == enc_i32(9) and b"\x00\x11\x00\x00\x00\x01" in out

    # FindCoordinator v0..v4
    for v in range(0, 5):
        flex = v >= 3
        body = bytearray()
        if v >= 1:
            body += enc_i32(0)
        if v >= 4:
            body += enc_array_len(2, flex)
            for key, node in (("g1", 2), ("g2", -1)):
                body += enc_string(key, flex) + enc_i32(node) + enc_string("b", flex) + enc_i32(1)
                body += enc_i16(0) + enc_string(None, flex) + tags(flex)
        else:
            body += enc_i16(0)
            if v >= 1:
                body += enc_string(None, flex)
            body += enc_i32(2) + enc_string("broker-2", flex) + enc_i32(9093)
        body += tags(flex)
        out = rewrite_find_coordinator(bytes(body), v, ports)
        r = Reader(out)
        if v >= 1:
            r.i32()
        if v >= 4:
            assert r.array_len(flex) == 2
            assert r.string(flex) == "g1" and r.i32() == 2
            assert r.string(flex) == "127.0.0.1" and r.i32() == 40002
            r.i16(); r.string(flex); r.tagged_fields()
            assert r.string(flex) == "g2" and r.i32() == -1 and r.string(flex) == "b" and r.i32() == 1
            r.i16(); r.string(flex); r.tagged_fields()
        else:
            r.i16()
            if v >= 1:
                r.string(flex)
            assert r.i32() == 2 and r.string(flex) == "127.0.0.1" and r.i32() == 40002
        if flex:
            r.tagged_fields()
        assert r.pos == len(out), v

    # SASL PLAIN
    users = {"alice": "s3cret", "bob": "x,y=z"}
    assert PlainAuthenticator(users).step(b"\x00alice\x00s3cret") == (True, b"")
    assert PlainAuthenticator(users).step(b"alice\x00alice\x00s3cret")[0]
    for bad in (b"\x00alice\x00wrong", b"\x00carol\x00s3cret", b"alice\x00s3cret", b"bob\x00alice\x00s3cret"):
        try:
            PlainAuthenticator(users).step(bad)
            raise AssertionError("PLAIN accepted %r" % bad)
        except AuthFailed:
            pass

    # SASL SCRAM, both the RFC nonce form and librdkafka's <cnonce><server nonce> form
    def scram_client(mech, user, password, server, librdkafka_nonce):
        h = "sha256" if mech == "SCRAM-SHA-256" else "sha512"
        cnonce = base64.b64encode(secrets.token_bytes(24)).decode()
        bare = "n=%s,r=%s" % (user.replace("=", "=3D").replace(",", "=2C"), cnonce)
        done, first = server.step(("n,," + bare).encode())
        assert not done
        first = first.decode()
        a = _scram_attrs(first)
        assert a["r"].startswith(cnonce)
        salted = hashlib.pbkdf2_hmac(h, password.encode(), base64.b64decode(a["s"]), int(a["i"]))
        ck = hmac.new(salted, b"Client Key", h).digest()
        nonce = cnonce + a["r"] if librdkafka_nonce else a["r"]
        wo = "c=biws,r=" + nonce
        am = ",".join((bare, first, wo)).encode()
        sig = hmac.new(hashlib.new(h, ck).digest(), am, h).digest()
        proof = base64.b64encode(bytes(x ^ y for x, y in zip(ck, sig))).decode()
        done, final = server.step((wo + ",p=" + proof).encode())
        assert done
        sk = hmac.new(salted, b"Server Key", h).digest()
        assert final == b"v=" + base64.b64encode(hmac.new(sk, am, h).digest())

    for mech in ("SCRAM-SHA-256", "SCRAM-SHA-512"):
        for quirk in (False, True):
            scram_client(mech, "alice", "s3cret", ScramAuthenticator(users, mech), quirk)
            scram_client(mech, "bob", "x,y=z", ScramAuthenticator(users, mech), quirk)
            for user, pw in (("alice", "wrong"), ("carol", "s3cret")):
                try:
                    scram_client(mech, user, pw, ScramAuthenticator(users, mech), quirk)
                    raise AssertionError("SCRAM accepted %s/%s" % (user, pw))
                except AuthFailed as e:
                    assert str(e) == INVALID_CREDENTIALS

    # request header parsing / acks=0
    for v in (3, 8, 9):
        flex = v >= 9
        req = enc_i16(API_PRODUCE) + enc_i16(v) + enc_i32(1) + enc_string("c", False) + tags(flex)
        req += enc_string(None, flex)
        assert produce_expects_response(req + enc_i16(1) + b"...")
        assert not produce_expects_response(req + enc_i16(0) + b"...")
    print("kafka_front self-test: OK")
    return 0


def main():
    if sys.argv[1:] == ["--self-test"]:
        return self_test()
    p = argparse.ArgumentParser(description="Kafka TLS + SASL front for a PLAINTEXT test cluster",
                                epilog="python3 kafka_front.py --self-test checks the codecs and SASL offline.")
    p.add_argument("--upstream", required=True, help="HOST:PORT[,HOST:PORT...] of the upstream (plaintext) cluster")
    p.add_argument("--cert", required=True, help="server certificate (PEM, may include the chain)")
    p.add_argument("--key", required=True, help="server private key (PEM)")
    p.add_argument("--client-ca", help="require a client certificate signed by this CA (PEM)")
    p.add_argument("--mechanism", action="append", choices=ALL_MECHANISMS,
                   help="enabled SASL mechanism (repeatable; default: all)")
    p.add_argument("--user", action="append", help="accepted credentials NAME:PASSWORD (repeatable)")
    p.add_argument("--no-sasl", action="store_true", help="TLS only (security.protocol=SSL clients)")
    p.add_argument("--ports-file", required=True, help="written once listening: 127.0.0.1:p1,127.0.0.1:p2,...")
    p.add_argument("--log", help="debug log file")
    p.add_argument("--missing-topic", action="append",
                   help="answer Metadata for this topic as a broker without it (UNKNOWN_TOPIC_OR_PART); repeatable")
    args = p.parse_args()

    global _log_file
    if args.log:
        _log_file = open(args.log, "a", buffering=1)

    front = Front(args)

    async def amain():
        loop = asyncio.get_running_loop()

        def on_loop_error(_loop, context):
            exc = context.get("exception")
            log("event loop: %s %r", context.get("message"), exc)

        loop.set_exception_handler(on_loop_error)
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await front.start()
        await stop.wait()
        await front.stop()

    try:
        asyncio.run(amain())
    except SystemExit as e:
        log("exit: %s", e)
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
