import Foundation
import NIOCore
import Shared

/// A small deterministic generator (SplitMix64), so every run benchmarks the same bytes.
public struct SplitMix64: RandomNumberGenerator {
    var state: UInt64
    public init(seed: UInt64) { state = seed }
    public mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}

/// Realistic mParticle batches, the same shape as `Benchmarks/endtoend/payloads.py` (which the
/// end-to-end benchmark sends): `device_info`, `application_info`, `source_info`, the inbound
/// `user_identities` map, `user_attributes`, int64 `mpid`/`batch_id`/`event_id`/`session_id`,
/// `mp_deviceid`, and events (`session_start`, `custom_event` with `custom_attributes`,
/// `screen_view`, `commerce_event`, `breadcrumb`, `session_end`) with `location`.
/// Every event type is one the Kafka integration forwards under the default settings.
public enum Inputs {
    static let screens = ["Home", "Search", "Product", "Cart", "Checkout", "Account", "Settings", "Wishlist"]
    static let actions = [
        "Product Viewed", "Added to Cart", "Search Submitted", "Filter Applied", "Video Played", "Article Shared",
        "Coupon Applied", "Notification Opened",
    ]

    /// The large batch: 50 events, about 21 KB.
    public static let large: ByteBuffer = batch(events: 50, seed: 7)
    /// The small batch: 3 events (the middle of the end-to-end benchmark's 1–5), about 1.9 KB.
    public static let small: ByteBuffer = batch(events: 3, seed: 11)

    public static func named(_ name: String) -> ByteBuffer {
        switch name {
        case "large": return large
        case "small": return small
        default: fatalError("unknown input \(name)")
        }
    }

    /// One batch with `events` events, as compact JSON (member order as in payloads.py).
    public static func batch(events count: Int, seed: UInt64) -> ByteBuffer {
        var rng = SplitMix64(seed: seed)
        func int64() -> String { String(Int64(bitPattern: rng.next())) }
        func pick<T>(_ a: [T]) -> T { a[Int(rng.next() % UInt64(a.count))] }
        func int(_ r: ClosedRange<Int>) -> Int { Int.random(in: r, using: &rng) }
        func hex(_ digits: Int, upper: Bool = false) -> String {
            var s = ""
            while s.count < digits { s += String(rng.next(), radix: 16, uppercase: upper) }
            return String(s.prefix(digits))
        }
        func num(_ v: Double, _ places: Int) -> JSONValue { .number(String(format: "%.\(places)f", v)) }
        func str(_ s: String) -> JSONValue { .string(s) }
        func obj(_ pairs: [(String, JSONValue)]) -> JSONValue { .object(pairs.map { .init($0.0, $0.1) }) }

        let t = 1_700_000_000_000 + int(0...1_000_000_000)
        let sessionID = int64()
        let request = "\(hex(4))-\(hex(6))"
        var kinds: [String]
        if count == 1 {
            kinds = [pick(["custom_event", "screen_view"])]
        } else {
            kinds = ["session_start"]
            for _ in 0..<max(0, count - 2) {
                let r = int(0...99)
                kinds.append(r < 60 ? "custom_event" : r < 88 ? "screen_view" : r < 94 ? "commerce_event" : "breadcrumb")
            }
            kinds.append("session_end")
        }
        var events: [JSONValue] = []
        for (n, kind) in kinds.enumerated() {
            var data: [(String, JSONValue)] = [
                ("source_message_id", str("\(request)-\(n)")),
                ("event_id", .number(int64())),
                ("session_id", .number(sessionID)),
                ("timestamp_unixtime_ms", .number(String(t + 1000 * n))),
                (
                    "location",
                    obj([
                        ("latitude", num(Double.random(in: -60...60, using: &rng), 6)),
                        ("longitude", num(Double.random(in: -180...180, using: &rng), 6)),
                        ("accuracy", .number(String(int(5...60)))),
                    ])
                ),
            ]
            switch kind {
            case "custom_event":
                data += [
                    ("event_name", str(pick(actions))),
                    ("custom_event_type", str(pick(["navigation", "transaction", "other"]))),
                    (
                        "custom_attributes",
                        obj([
                            ("product_id", str(String(format: "SKU-%05d", int(0...99999)))),
                            ("category", str(pick(["shoes", "books", "garden", "toys"]))),
                            ("price", str(String(format: "%.2f", Double.random(in: 1...300, using: &rng)))),
                            ("currency", str("USD")),
                            ("referrer", str(pick(["search", "push", "email", "direct"]))),
                            ("position", str(String(int(1...40)))),
                            ("ab_variant", str(pick(["A", "B", "C"]))),
                        ])
                    ),
                ]
            case "screen_view":
                data += [
                    ("screen_name", str(pick(screens))),
                    ("custom_attributes", obj([("previous", str(pick(screens))), ("load_ms", str(String(int(40...900))))])),
                ]
            case "commerce_event":
                let price = num(Double.random(in: 5...200, using: &rng), 2)
                data += [
                    (
                        "product_action",
                        obj([
                            ("action", str("purchase")),
                            ("transaction_id", str(String(format: "T%08d", int(0...99_999_999)))),
                            ("total_amount", price),
                            (
                                "products",
                                .array([
                                    obj([
                                        ("id", str(String(format: "SKU-%05d", int(0...99999)))), ("name", str("Thing")),
                                        ("price", price), ("quantity", .number("1")),
                                    ])
                                ])
                            ),
                        ])
                    ),
                    ("currency_code", str("USD")),
                ]
            case "breadcrumb":
                data += [("session_number", .number(String(int(1...40)))), ("label", str("tapped " + pick(screens).lowercased()))]
            default:
                break
            }
            events.append(obj([("event_type", str(kind)), ("data", obj(data))]))
        }
        let doc = obj([
            ("schema_version", .number("2")),
            ("environment", str("production")),
            ("mpid", .number(int64())),
            ("batch_id", .number(int64())),
            ("mp_deviceid", str(hex(32))),
            ("source_request_id", str(request)),
            ("timestamp_unixtime_ms", .number(String(t))),
            ("ip", str("198.51.100.\(int(1...254))")),
            (
                "user_identities",
                obj([
                    ("customer_id", str(String(format: "cust-%06d", int(0...999_999)))),
                    ("email", str("user\(int(0...1_000_000))@example.com")),
                ])
            ),
            (
                "user_attributes",
                obj([("$firstname", str("Alex")), ("tier", str(pick(["free", "gold"]))), ("visits", .number(String(int(1...300))))])
            ),
            (
                "device_info",
                obj([
                    ("platform", str("iOS")), ("device", str("iPhone15,2")), ("os_version", str("17.1")), ("brand", str("Apple")),
                    ("device_manufacturer", str("Apple")), ("device_model", str("iPhone15,2")), ("locale_language", str("en")),
                    ("locale_country", str("US")), ("ios_idfv", str(hex(32, upper: true))), ("screen_width", .number("1179")),
                    ("screen_height", .number("2556")),
                ])
            ),
            (
                "application_info",
                obj([
                    ("application_name", str("Shop")), ("application_version", str("4.2.0")), ("package", str("com.example.shop")),
                    ("os", str("IOS")), ("install_referrer", str("organic")),
                ])
            ),
            ("source_info", obj([("channel", str("native")), ("partner", str("mparticle"))])),
            ("events", .array(events)),
        ])
        return doc.jsonBytes
    }

    /// The bytes of a buffer as `Data` (what Foundation's APIs take).
    public static func data(_ buffer: ByteBuffer) -> Data { Data(buffer.readableBytesView) }

    public static func eventCount(_ buffer: ByteBuffer) -> Int {
        (try? JSONValue.parse(buffer))?["events"]?.arrayValue?.count ?? 0
    }

    /// The router's per-destination settings with the defaults (removes `mp_deviceid`, turns the
    /// `user_identities` map into the outgoing array, drops user attribute/identity change events).
    public static func kafkaSettings(sendAsBatch: Bool) -> KafkaConnectionSettings {
        var s = KafkaConnectionSettings()
        s.sendAsBatch = sendAsBatch
        return s
    }

    /// A Keen destination with a collection per event type and every context section included.
    public static let keen = KeenDestination(projectID: "bench-project", key: Secret("bench-key"), collection: "{event_type}")

    public static let receivedAt: Int64 = 1_700_000_500_000
    public static let batchID = "9f86d081884c7d65-42"

    /// A router → kafka-out batch frame carrying `payload`.
    /// The router's frame for a batch's per-event messages (as `batchFrame`, with parts).
    public static func splitFrame(_ output: KafkaBatchOutput) -> Frame {
        var f = batchFrame(ByteBuffer())
        let messages = output.messages.enumerated().map { (payload: $1, topic: String?.none, eventID: Optional(output.eventIDs[$0])) }
        (f.payload, f.parts) = Frame.pack(messages)
        return f
    }

    public static func batchFrame(_ payload: ByteBuffer) -> Frame {
        var f = Frame(type: .batch, id: 123_456_789)
        f.tenant = "tenant-0042"
        f.destination = "kafka-main"
        f.key = "-8620663297813924289"
        f.config = "3f79bb7b435b05321651daefd374cdc681dc06faa65e374e38337b88ca046dea"
        f.headers = [Header("sluice-batch-id", batchID)]
        f.payload = payload
        return f
    }
}
