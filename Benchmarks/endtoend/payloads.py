"""Realistic mParticle batches as templates for load.lua.

A large batch has 50 events (about 20 KB), a small one 1 to 5. Every event type used is one the Kafka
integration forwards under the default connection settings, so events in equal events out.
`user_identities` is the inbound map form that mParticle's SDKs send (which Sluice rewrites into
the outgoing array), or with identities="array" already the array (which Sluice can forward
unchanged). MPID, batch_id and the
source_message_id prefix are placeholders that load.lua fills with fresh values per request.
"""
import json
import random

SCREENS = ["Home", "Search", "Product", "Cart", "Checkout", "Account", "Settings", "Wishlist"]
ACTIONS = ["Product Viewed", "Added to Cart", "Search Submitted", "Filter Applied", "Video Played",
           "Article Shared", "Coupon Applied", "Notification Opened"]


def _event(rng, n, kind, session_id, t):
    data = {
        "source_message_id": "{{U}}-%d" % n,
        "event_id": rng.randint(-2**63, 2**63 - 1),
        "session_id": session_id,
        "timestamp_unixtime_ms": t,
        "location": {"latitude": round(rng.uniform(-60, 60), 6), "longitude": round(rng.uniform(-180, 180), 6),
                     "accuracy": rng.randint(5, 60)},
    }
    if kind == "custom_event":
        data.update(event_name=rng.choice(ACTIONS), custom_event_type=rng.choice(["navigation", "transaction", "other"]),
                    custom_attributes={"product_id": "SKU-%05d" % rng.randint(0, 99999),
                                       "category": rng.choice(["shoes", "books", "garden", "toys"]),
                                       "price": "%.2f" % rng.uniform(1, 300), "currency": "USD",
                                       "referrer": rng.choice(["search", "push", "email", "direct"]),
                                       "position": str(rng.randint(1, 40)), "ab_variant": rng.choice("ABC")})
    elif kind == "screen_view":
        data.update(screen_name=rng.choice(SCREENS), custom_attributes={"previous": rng.choice(SCREENS),
                                                                         "load_ms": str(rng.randint(40, 900))})
    elif kind == "commerce_event":
        price = round(rng.uniform(5, 200), 2)
        data.update(product_action={"action": "purchase", "transaction_id": "T%08d" % rng.randint(0, 10**8),
                                    "total_amount": price, "products": [{"id": "SKU-%05d" % rng.randint(0, 99999),
                                                                         "name": "Thing", "price": price, "quantity": 1}]},
                    currency_code="USD")
    elif kind == "breadcrumb":
        data.update(session_number=rng.randint(1, 40), label="tapped " + rng.choice(SCREENS).lower())
    return {"event_type": kind, "data": data}


def batch(rng, events, identities="map"):
    """One batch template (JSON text with placeholders) with `events` events."""
    t = 1700000000000 + rng.randint(0, 10**9)
    session_id = rng.randint(-2**63, 2**63 - 1)
    kinds = ["session_start"] + rng.choices(["custom_event", "screen_view", "commerce_event", "breadcrumb"],
                                            weights=[60, 28, 6, 6], k=max(0, events - 2)) + ["session_end"]
    kinds = kinds[:events] if events > 1 else [rng.choice(["custom_event", "screen_view"])]
    doc = {
        "schema_version": 2, "environment": "production", "mpid": "__MPID__", "batch_id": "__BID__",
        "mp_deviceid": "%032x" % rng.getrandbits(128), "source_request_id": "{{U}}",
        "timestamp_unixtime_ms": t, "ip": "198.51.100.%d" % rng.randint(1, 254),
        "user_identities": {"customer_id": "cust-%06d" % rng.randint(0, 999999),
                            "email": "user%d@example.com" % rng.randint(0, 10**6)},
        "user_attributes": {"$firstname": "Alex", "tier": rng.choice(["free", "gold"]), "visits": rng.randint(1, 300)},
        "device_info": {"platform": "iOS", "device": "iPhone15,2", "os_version": "17.1", "brand": "Apple",
                        "device_manufacturer": "Apple", "device_model": "iPhone15,2", "locale_language": "en",
                        "locale_country": "US", "ios_idfv": "%032X" % rng.getrandbits(128),
                        "screen_width": 1179, "screen_height": 2556},
        "application_info": {"application_name": "Shop", "application_version": "4.2.0", "package": "com.example.shop",
                             "os": "IOS", "install_referrer": "organic"},
        "source_info": {"channel": "native", "partner": "mparticle"},
        "events": [_event(rng, n, kind, session_id, t + 1000 * n) for n, kind in enumerate(kinds)],
    }
    if identities == "array":
        doc["user_identities"] = [{"identity_type": k, "identity": v, "timestamp_unixtime_ms": t}
                                  for k, v in doc["user_identities"].items()]
    text = json.dumps(doc, separators=(",", ":"))
    return text.replace('"__MPID__"', "{{MPID}}").replace('"__BID__"', "{{BID}}")


def write_templates(path, mix, identities="map", seed=7, variants=16):
    """Writes EVENTS<TAB>BODY lines: `variants` of each kind, repeated by the mix's weights.
    Returns (events per request, bytes per request) averaged over the file."""
    rng = random.Random(seed)
    lines = []
    for _ in range(variants):
        for kind, weight in mix.items():
            n = 50 if kind == "large" else rng.randint(1, 5)
            body = batch(rng, n, identities)
            lines += [(n, body)] * weight
    with open(path, "w") as f:
        for n, body in lines:
            f.write("%d\t%s\n" % (n, body))
    return sum(n for n, _ in lines) / len(lines), sum(len(b) for _, b in lines) / len(lines)


def parse_mix(text):
    """'large=1,small=1' -> {'large': 1, 'small': 1}."""
    mix = {}
    for part in text.split(","):
        kind, _, weight = part.partition("=")
        if kind not in ("large", "small") or not weight.isdigit():
            raise ValueError("--mix: expected e.g. large=1,small=1")
        if int(weight) > 0:
            mix[kind] = int(weight)
    if not mix:
        raise ValueError("--mix: no batches")
    return mix
