#!/usr/bin/env python3
"""The forwarder a team would write instead of Sluice: aiohttp + orjson + confluent-kafka.

Accepts mParticle batches on POST /v2/events (one batch) and /v2/bulkevents (a JSON array of
batches), checks HTTP Basic auth against a tenants file, and produces to the tenant's topic keyed by
the batch's MPID (decimal text), with acks=all and idempotence, like Sluice.

  --mode batch   one message per batch: the request body bytes, unchanged
  --mode event   one message per event: the batch without its events plus that one event
  --ack confirmed  answer 202 once Kafka confirmed every message of the request
  --ack queued     answer 202 as soon as the messages are in librdkafka's local queue

Tenants file: JSON list of {"api_key", "api_secret", "topic"}.
"""
import argparse
import asyncio
import base64
import hmac
import json
import threading

import orjson
from aiohttp import web
from confluent_kafka import KafkaException, Producer

MAX_REQUEST_BYTES = 256 * 1024


def error(status, code, message):
    return web.Response(status=status, content_type="application/json",
                        body=orjson.dumps({"errors": [{"code": code, "message": message}]}))


class Pending:
    """Delivery reports outstanding for one request; resolved from the poll thread."""
    __slots__ = ("loop", "future", "left", "failure")

    def __init__(self, loop, count):
        self.loop, self.future, self.left, self.failure = loop, loop.create_future(), count, None

    def report(self, err, _msg):
        if err is not None and self.failure is None:
            self.failure = str(err)
        self.left -= 1  # delivery callbacks all run on the one poll thread
        if self.left == 0:
            self.loop.call_soon_threadsafe(self._finish)

    def _finish(self):
        if not self.future.done():
            self.future.set_result(self.failure)


class Forwarder:
    def __init__(self, args):
        self.mode, self.confirmed = args.mode, args.ack == "confirmed"
        with open(args.tenants) as f:
            tenants = json.load(f)
        self.tenants = {t["api_key"]: (t["api_secret"].encode(), t["topic"]) for t in tenants}
        self.auth_cache = {}  # Authorization header value -> topic, once verified
        self.producer = Producer({
            "bootstrap.servers": args.bootstrap, "acks": "all", "enable.idempotence": True,
            "linger.ms": 5, "queue.buffering.max.messages": 100000, "queue.buffering.max.kbytes": 65536,
        })
        self.running = True
        self.poller = threading.Thread(target=self._poll, daemon=True)
        self.poller.start()

    def _poll(self):
        while self.running:
            self.producer.poll(0.05)

    def topic_for(self, header):
        topic = self.auth_cache.get(header)
        if topic is not None:
            return topic
        if not header or not header.startswith("Basic "):
            raise web.HTTPUnauthorized()
        try:
            key, _, secret = base64.b64decode(header[6:], validate=True).decode().partition(":")
        except ValueError:
            raise web.HTTPUnauthorized()
        tenant = self.tenants.get(key)
        if tenant is None or not hmac.compare_digest(tenant[0], secret.encode()):
            raise web.HTTPForbidden()
        self.auth_cache[header] = tenant[1]
        return tenant[1]

    def messages(self, batch, raw):
        """(key, value) pairs for one batch."""
        mpid = batch.get("mpid")
        key = str(mpid).encode() if mpid is not None else None
        if self.mode == "batch":
            yield key, raw if raw is not None else orjson.dumps(batch)
            return
        events = batch.get("events") or []
        envelope = dict(batch)
        for event in events:
            envelope["events"] = [event]
            yield key, orjson.dumps(envelope)

    async def produce(self, topic, pairs, pending):
        for key, value in pairs:
            while True:
                try:
                    if pending is None:
                        self.producer.produce(topic, value, key)
                    else:
                        self.producer.produce(topic, value, key, on_delivery=pending.report)
                    break
                except BufferError:  # local queue full: let the poll thread drain it
                    await asyncio.sleep(0.001)

    async def handle(self, request, bulk):
        try:
            topic = self.topic_for(request.headers.get("Authorization"))
        except web.HTTPUnauthorized:
            return error(401, "UNAUTHORIZED", "HTTP Basic credentials required")
        except web.HTTPForbidden:
            return error(403, "FORBIDDEN", "unknown API key or wrong secret")
        if request.content_length and request.content_length > MAX_REQUEST_BYTES:
            return error(413, "PAYLOAD_TOO_LARGE", "request too large")
        raw = await request.read()
        if len(raw) > MAX_REQUEST_BYTES:
            return error(413, "PAYLOAD_TOO_LARGE", "request too large")
        try:
            doc = orjson.loads(raw)
        except orjson.JSONDecodeError as e:
            return error(400, "BAD_REQUEST", f"malformed JSON: {e}")
        batches = doc if bulk else [doc]
        if not isinstance(batches, list) or not all(isinstance(b, dict) for b in batches):
            return error(400, "BAD_REQUEST", "expected a batch object" + (" array" if bulk else ""))
        for b in batches:
            if b.get("environment") not in ("production", "development", "unknown"):
                return error(400, "BAD_REQUEST", "environment must be production, development or unknown")
            if not isinstance(b.get("events", []), list):
                return error(400, "BAD_REQUEST", "events must be an array")
        pairs = [p for b in batches for p in self.messages(b, None if bulk else raw)]
        if not self.confirmed or not pairs:
            await self.produce(topic, pairs, None)
            return web.Response(status=202)
        pending = Pending(asyncio.get_running_loop(), len(pairs))
        await self.produce(topic, pairs, pending)
        failure = await pending.future
        if failure is not None:
            return error(503, "SERVICE_UNAVAILABLE", f"Kafka did not confirm: {failure}")
        return web.Response(status=202)

    async def events(self, request):
        return await self.handle(request, bulk=False)

    async def bulk(self, request):
        return await self.handle(request, bulk=True)

    async def healthz(self, _request):
        return web.Response(text="ok")

    def close(self):
        self.producer.flush(10)
        self.running = False


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--listen", default="127.0.0.1:8090")
    p.add_argument("--bootstrap", required=True)
    p.add_argument("--tenants", required=True)
    p.add_argument("--mode", choices=["batch", "event"], default="batch")
    p.add_argument("--ack", choices=["confirmed", "queued"], default="confirmed")
    args = p.parse_args()
    try:
        import uvloop  # the faster event loop a careful team would use
        uvloop.install()
    except ImportError:
        pass
    forwarder = Forwarder(args)
    app = web.Application(client_max_size=MAX_REQUEST_BYTES + 1)
    app.router.add_post("/v2/events", forwarder.events)
    app.router.add_post("/v2/bulkevents", forwarder.bulk)
    app.router.add_get("/healthz", forwarder.healthz)

    async def on_cleanup(_app):
        await asyncio.get_running_loop().run_in_executor(None, forwarder.close)
    app.on_cleanup.append(on_cleanup)
    host, port = args.listen.rsplit(":", 1)
    web.run_app(app, host=host, port=int(port), access_log=None, print=None, handle_signals=True)


if __name__ == "__main__":
    try:
        main()
    except KafkaException as e:
        raise SystemExit(f"peer_forwarder: {e}")
