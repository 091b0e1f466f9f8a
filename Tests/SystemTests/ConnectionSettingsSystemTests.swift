import Foundation
import TestSupport
import XCTest

/// Seed 000's connection settings end to end: one batch fans out to destinations with different
/// settings, and each topic is read back with kcat.
final class ConnectionSettingsSystemTests: XCTestCase {
    static let config = """
        tenants:
          acme:
            api_key: acme-key
            api_secret: acme-secret
            destinations:
              defaults: {kind: kafka, bootstrap_servers: dev, plaintext: true, topic: s-defaults}
              inverted:
                kind: kafka
                bootstrap_servers: dev
                plaintext: true
                topic: s-inverted
                settings:
                  unique_id: shop-ios
                  send_network_performance_events: false
                  send_as_batch: false
                  include_location: false
                  send_profile_change_events: false
                  include_metadata: false
                  include_user_attribute_change_events: true
                  include_user_identity_change_events: true
                  send_batches_without_events: true
                  include_mp_deviceid: true
                  include_event_batch_location: true
                  metadata_field_exclusion: [device_name, ip_address]
              no-empty:
                kind: kafka
                bootstrap_servers: dev
                plaintext: true
                topic: s-no-empty
                settings: {send_batches_without_events: false, metadata_field_exclusion: [device_name]}
        """

    func testEverySettingEndToEnd() throws {
        let group = try ProcessGroup(config: Self.config)
        try group.startAll(topics: ["s-defaults:2", "s-inverted:2", "s-no-empty:2"])
        let fixture = try Data(
            contentsOf: URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
                .appendingPathComponent("fixtures/batch-all-event-types.json"))
        XCTAssertEqual(try group.post("/v2/events", body: fixture, user: "acme-key", password: "acme-secret").status, 202)
        // Its only event is filtered out by default: an eventless batch for those destinations.
        let eventless = #"{"environment":"production","mpid":5,"events":[{"event_type":"user_identity_change","data":{"new":{"identity_type":"email","identity":"x@example.com"}}}]}"#
        XCTAssertEqual(try group.post("/v2/events", body: Data(eventless.utf8), user: "acme-key", password: "acme-secret").status, 202)

        var rawInverted: [ConsumedMessage] = []
        func read(_ topic: String, _ count: Int) throws -> [[String: Any]] {
            var messages: [ConsumedMessage] = []
            _ = try eventually(timeout: 60) {
                messages = try Kcat.consume(bootstrap: group.bootstrapServers, topic: topic)
                return messages.count >= count
            }
            XCTAssertEqual(messages.count, count, "\(topic)\n\(group.logs())")
            for m in messages {
                XCTAssertNotNil(m.key, "keyed by MPID")
                XCTAssertNotNil(m.header("sluice-batch-id"), "every message names its batch")
            }
            if topic == "s-inverted" { rawInverted = messages }
            return try messages.sorted { ($0.partition, $0.offset) < ($1.partition, $1.offset) }.map {
                try JSONSerialization.jsonObject(with: Data($0.value.utf8)) as! [String: Any]
            }
        }
        func types(_ batch: [String: Any]) -> [String] {
            (batch["events"] as? [[String: Any]] ?? []).compactMap { $0["event_type"] as? String }
        }

        // Defaults: one message per batch; change events off; no mp_deviceid, no context.location.
        let defaults = try read("s-defaults", 2)
        let full = try XCTUnwrap(defaults.first { types($0).count > 1 })
        XCTAssertEqual(types(full).count, 15)
        XCTAssertFalse(types(full).contains("user_attribute_change"))
        XCTAssertFalse(types(full).contains("user_identity_change"))
        XCTAssertNil(full["mp_deviceid"])
        XCTAssertNil((full["context"] as? [String: Any])?["location"])
        XCTAssertNotNil(full["device_info"])
        XCTAssertNotNil(full["ip"])
        XCTAssertNotNil(full["user_identities"] as? [[String: Any]], "outgoing array form")
        XCTAssertTrue(defaults.contains { types($0).isEmpty }, "batches without events are sent by default")

        // Every switch flipped: one message per event, with the batch context.
        let inverted = try read("s-inverted", 16)
        for m in inverted {
            XCTAssertEqual(types(m).count, 1)
            XCTAssertEqual(m["unique_id"] as? String, "shop-ios")
            XCTAssertNil(m["ip"])
            XCTAssertNil(m["device_info"])
            XCTAssertNil(m["application_info"])
            XCTAssertNil(m["source_info"])
            let data = (m["events"] as! [[String: Any]])[0]["data"] as! [String: Any]
            XCTAssertNil(data["location"])
        }
        // Per-event messages name their event, so consumers can de-duplicate.
        let eventIDs = rawInverted.compactMap { $0.header("sluice-event-id") }
        XCTAssertEqual(eventIDs.count, 16)
        XCTAssertEqual(Set(rawInverted.map { "\($0.header("sluice-batch-id")!)/\($0.header("sluice-event-id")!)" }).count, 16)
        let allTypes = inverted.flatMap(types)
        XCTAssertFalse(allTypes.contains("network_performance"))
        XCTAssertFalse(allTypes.contains("profile"))
        XCTAssertTrue(allTypes.contains("user_attribute_change"))
        XCTAssertEqual(allTypes.filter { $0 == "user_identity_change" }.count, 2)
        let fromFixture = inverted.filter { $0["mp_deviceid"] != nil }
        XCTAssertEqual(fromFixture.count, 15)
        XCTAssertTrue(fromFixture.allSatisfy { ($0["context"] as? [String: Any])?["location"] != nil })

        // Batches without events are not sent; Device Name excluded, the rest of device_info kept.
        let noEmpty = try read("s-no-empty", 1)
        XCTAssertEqual(types(noEmpty[0]).count, 15)
        let device = try XCTUnwrap(noEmpty[0]["device_info"] as? [String: Any])
        XCTAssertNil(device["device"])
        XCTAssertEqual(device["platform"] as? String, "iOS")
        XCTAssertNotNil(noEmpty[0]["ip"])

        // kafka-out holds partition rounds (its default, `--partition-rounds batches`) for the
        // destinations that send whole batches only: the per-event one has a producer of its own.
        let created = group.logs().split(separator: "\n").filter { $0.contains("kafka producer created") }
        XCTAssertTrue(
            created.contains { $0.contains("destination=acme/inverted") && $0.contains("kafka.partition_rounds=false") },
            created.joined(separator: "\n"))
        XCTAssertTrue(
            created.contains { !$0.contains("destination=acme/inverted") && $0.contains("kafka.partition_rounds=true") },
            created.joined(separator: "\n"))
    }
}
