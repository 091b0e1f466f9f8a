"""Sends batches to ingest with mParticle's official Python server SDK, unchanged.

Usage: mparticle_sdk_client.py BASE_URL API_KEY API_SECRET
Prints one line per batch sent: the batch's mpid, so the caller can look for it in Kafka.
Exits non-zero if the SDK reports any error.
"""
import sys

import mparticle
from mparticle import (AppEvent, Batch, CommerceEvent, DeviceInformation, EventsApi, ProductAction, ScreenViewEvent,
                       SessionEndEvent, SessionStartEvent, UserIdentities)


def make_batch(mpid, environment="development"):
    batch = Batch()
    batch.environment = environment
    batch.mpid = mpid
    identities = UserIdentities()
    identities.customerid = "cust-%d" % mpid
    identities.email = "user%d@example.com" % mpid
    batch.user_identities = identities
    batch.user_attributes = {"tier": "gold"}
    device = DeviceInformation()
    device.ios_advertising_id = "A5D934A0-232F-4486-B475-7CB1A4CE4BD1"
    batch.device_info = device
    start = SessionStartEvent()
    start.session_id = 12345678
    start.timestamp_unixtime_ms = 1700000000000
    app_event = AppEvent("Example", "navigation", custom_attributes={"example attribute key": "example attribute value"})
    screen = ScreenViewEvent()
    screen.screen_name = "Home"
    product_action = ProductAction("purchase")
    product_action.total_amount = 123.12
    commerce = CommerceEvent(product_action)
    end = SessionEndEvent()
    end.session_id = start.session_id
    end.session_duration_ms = 1000
    batch.events = [start, app_event, screen, commerce, end]
    return batch


def main():
    base_url, key, secret = sys.argv[1:4]
    configuration = mparticle.Configuration()
    configuration.api_key = key
    configuration.api_secret = secret
    configuration.host = base_url
    api = EventsApi(configuration)
    # One batch, then a bulk request of two (the SDK's two calls).
    api.upload_events(make_batch(9007199254740993))
    print(9007199254740993)
    api.bulk_upload_events([make_batch(-4611686018427387904), make_batch(8)])
    print(-4611686018427387904)
    print(8)


if __name__ == "__main__":
    main()
