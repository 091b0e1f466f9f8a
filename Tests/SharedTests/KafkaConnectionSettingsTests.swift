import Foundation
import NIOCore
import XCTest

@testable import Shared

/// Seed 000's connection settings, each with both values, on a batch with every event type.
final class KafkaConnectionSettingsTests: XCTestCase {
    static let fixture: ByteBuffer = {
        let url = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .appendingPathComponent("fixtures/batch-all-event-types.json")
        return ByteBuffer(bytes: try! Data(contentsOf: url))
    }()

    func apply(_ configure: (inout KafkaConnectionSettings) -> Void = { _ in }) throws -> (messages: [JSONValue], output: KafkaBatchOutput) {
        var settings = KafkaConnectionSettings()
        configure(&settings)
        let tree = try JSONValue.parse(Self.fixture)
        let output = settings.apply(to: tree, original: Self.fixture, receivedAt: 1)
        return (try output.messages.map { try JSONValue.parse($0) }, output)
    }

    func eventTypes(_ batch: JSONValue) -> [String] {
        batch["events"]?.arrayValue?.compactMap { $0["event_type"]?.stringValue } ?? []
    }

    func testDefaults() throws {
        let (messages, output) = try apply()
        XCTAssertEqual(messages.count, 1, "Send as Batch: one message per batch")
        let batch = messages[0]
        XCTAssertFalse(eventTypes(batch).contains("user_attribute_change"), "off by default")
        XCTAssertFalse(eventTypes(batch).contains("user_identity_change"), "off by default")
        XCTAssertTrue(eventTypes(batch).contains("network_performance"))
        XCTAssertTrue(eventTypes(batch).contains("profile"))
        XCTAssertEqual(eventTypes(batch).count, 15)
        XCTAssertEqual(output.filteredEvents, 2)
        XCTAssertNil(batch["mp_deviceid"], "Include MP DeviceId is off by default")
        XCTAssertNil(batch["context"]?["location"], "Include Event Batch Location is off by default")
        XCTAssertNotNil(batch["context"]?["data_plan"], "the rest of context stays")
        XCTAssertNotNil(batch["application_info"])
        XCTAssertNotNil(batch["device_info"]?["device"])
        XCTAssertNotNil(batch["ip"])
        XCTAssertNotNil(batch["events"]?.arrayValue?[0]["data"]?["location"], "Include Location Information is on by default")
        XCTAssertNil(batch["unique_id"])
        // Exact ids survive.
        XCTAssertEqual(batch["mpid"], .number("-6945696352228325519"))
        XCTAssertEqual(batch["batch_id"], .number("9223372036854775807"))
        XCTAssertEqual(batch["events"]?.arrayValue?[0]["data"]?["session_id"], .number("-9223372036854775808"))
        XCTAssertEqual(batch["events"]?.arrayValue?[0]["data"]?["event_id"], .number("9007199254740993"))
    }

    func testUserIdentitiesGoOutAsTheOutgoingArray() throws {
        let batch = try apply().messages[0]
        let identities = try XCTUnwrap(batch["user_identities"]?.arrayValue)
        XCTAssertEqual(identities.count, 3)
        XCTAssertEqual(identities[0], .object([
            .init("identity_type", .string("customer_id")), .init("identity", .string("cust-0042")),
            .init("timestamp_unixtime_ms", .number("1700000000000")),
        ]))
        XCTAssertEqual(identities.compactMap { $0["identity_type"]?.stringValue }, ["customer_id", "email", "mobile_number"])
    }

    func testEachSwitchFlipped() throws {
        var batch = try apply { $0.sendNetworkPerformanceEvents = false }.messages[0]
        XCTAssertFalse(eventTypes(batch).contains("network_performance"))
        batch = try apply { $0.sendProfileChangeEvents = false }.messages[0]
        XCTAssertFalse(eventTypes(batch).contains("profile"))
        batch = try apply { $0.includeUserAttributeChangeEvents = true }.messages[0]
        XCTAssertTrue(eventTypes(batch).contains("user_attribute_change"))
        batch = try apply { $0.includeUserIdentityChangeEvents = true }.messages[0]
        XCTAssertTrue(eventTypes(batch).contains("user_identity_change"))
        batch = try apply { $0.includeLocation = false }.messages[0]
        XCTAssertTrue(batch["events"]!.arrayValue!.allSatisfy { $0["data"]?["location"] == nil })
        XCTAssertNotNil(batch["context"], "event location only")
        batch = try apply { $0.includeMetadata = false }.messages[0]
        XCTAssertNil(batch["application_info"])
        XCTAssertNil(batch["device_info"])
        XCTAssertNil(batch["source_info"])
        batch = try apply { $0.includeMPDeviceID = true }.messages[0]
        XCTAssertEqual(batch["mp_deviceid"], .string("a0b1c2d3-e4f5-4a6b-8c7d-9e0f1a2b3c4d"))
        batch = try apply { $0.includeEventBatchLocation = true }.messages[0]
        XCTAssertNotNil(batch["context"]?["location"])
        batch = try apply { $0.uniqueID = "my-app" }.messages[0]
        XCTAssertEqual(batch["unique_id"], .string("my-app"))
        batch = try apply { $0.metadataFieldExclusion = [.deviceName] }.messages[0]
        XCTAssertNil(batch["device_info"]?["device"])
        XCTAssertNotNil(batch["device_info"]?["platform"])
        XCTAssertNotNil(batch["ip"])
        batch = try apply { $0.metadataFieldExclusion = [.ipAddress] }.messages[0]
        XCTAssertNil(batch["ip"])
        XCTAssertNotNil(batch["device_info"]?["device"])
    }

    func testPerEventMessagesKeepTheBatchContext() throws {
        let (messages, _) = try apply { $0.sendAsBatch = false }
        XCTAssertEqual(messages.count, 15)
        for (i, m) in messages.enumerated() {
            XCTAssertEqual(m["events"]?.arrayValue?.count, 1)
            XCTAssertEqual(m["mpid"], .number("-6945696352228325519"))
            XCTAssertNotNil(m["user_identities"]?.arrayValue)
            XCTAssertEqual(m["batch_id"], .number("9223372036854775807"))
            XCTAssertEqual(m["events"]?.arrayValue?[0]["data"]?["timestamp_unixtime_ms"]?.description, JSONValue.number("\(1700000000001 + Self.order[i])").description)
        }
    }

    /// Positions of the events that survive the defaults (attribute and identity changes are off).
    static let order = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 15, 16]

    func testBatchesWithoutEvents() throws {
        let eventless = ByteBuffer(string: #"{"environment":"production","mpid":1,"events":[{"event_type":"user_identity_change","data":{}}]}"#)
        let tree = try JSONValue.parse(eventless)
        var settings = KafkaConnectionSettings()
        XCTAssertEqual(settings.apply(to: tree, original: eventless, receivedAt: 1).messages.count, 1, "sent by default")
        settings.sendBatchesWithoutEvents = false
        XCTAssertEqual(settings.apply(to: tree, original: eventless, receivedAt: 1).messages.count, 0)
        settings.sendBatchesWithoutEvents = true
        settings.sendAsBatch = false
        XCTAssertEqual(settings.apply(to: tree, original: eventless, receivedAt: 1).messages.count, 1, "per event: the eventless batch itself")
    }

    func testUnsupportedEventTypesAreDroppedAndCounted() throws {
        let doc = ByteBuffer(string: #"{"environment":"production","events":[{"event_type":"media","data":{}},{"event_type":"custom_event","data":{}}]}"#)
        let output = KafkaConnectionSettings().apply(to: try JSONValue.parse(doc), original: doc, receivedAt: 1)
        XCTAssertEqual(output.unsupportedEvents, 1)
        XCTAssertEqual(try JSONValue.parse(output.messages[0])["events"]?.arrayValue?.count, 1)
    }

    func testUntouchedBatchIsForwardedByteForByte() throws {
        let doc = ByteBuffer(string: #"{"environment":"production", "mpid":  -1,"events":[{"event_type":"custom_event","data":{"x":1.50}}]}"#)
        let output = KafkaConnectionSettings().apply(to: try JSONValue.parse(doc), original: doc, receivedAt: 1)
        XCTAssertEqual(output.messages, [doc])
    }

    func testSettingsFromConfig() throws {
        let config = try SluiceConfig.parse(yaml: """
            tenants:
              t:
                api_key: k
                api_secret: s
                destinations:
                  d:
                    kind: kafka
                    bootstrap_servers: dev
                    plaintext: true
                    topic: x
                    settings:
                      unique_id: app-1
                      send_network_performance_events: false
                      send_as_batch: false
                      include_location: false
                      send_profile_change_events: false
                      include_metadata: false
                      include_user_attribute_change_events: true
                      include_user_identity_change_events: true
                      send_batches_without_events: false
                      include_mp_deviceid: true
                      include_event_batch_location: true
                      metadata_field_exclusion: [device_name, ip_address]
            """)
        guard case .kafka(let k) = config.tenants[0].destinations[0].kind else { return XCTFail() }
        var expected = KafkaConnectionSettings()
        expected.uniqueID = "app-1"
        expected.sendNetworkPerformanceEvents = false
        expected.sendAsBatch = false
        expected.includeLocation = false
        expected.sendProfileChangeEvents = false
        expected.includeMetadata = false
        expected.includeUserAttributeChangeEvents = true
        expected.includeUserIdentityChangeEvents = true
        expected.sendBatchesWithoutEvents = false
        expected.includeMPDeviceID = true
        expected.includeEventBatchLocation = true
        expected.metadataFieldExclusion = [.deviceName, .ipAddress]
        XCTAssertEqual(k.settings, expected)

        for (bad, message) in [
            ("settings: {send_as_batches: true}", "unknown setting 'send_as_batches'"),
            ("settings: {send_as_batch: yes-please}", "true or false"),
            ("settings: {metadata_field_exclusion: [device_model]}", "unknown metadata field 'device_model'"),
            ("settings: {metadata_field_exclusion: device_name}", "must be a list"),
        ] {
            let yaml = "tenants:\n  t:\n    api_key: k\n    api_secret: s\n    destinations:\n      d: {kind: kafka, bootstrap_servers: dev, plaintext: true, topic: x, \(bad.dropFirst(0))}\n"
            XCTAssertThrowsError(try SluiceConfig.parse(yaml: yaml, file: "c.yaml"), bad) { error in
                XCTAssertTrue("\(error)".contains(message), "\(error)")
                XCTAssertTrue("\(error)".contains("destination 'd'"), "\(error)")
            }
        }
    }
}
