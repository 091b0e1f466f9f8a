import Foundation
import NIOCore
import XCTest

@testable import Shared

/// The splicing implementation of the connection settings against the tree-based reference, on
/// random batches and random settings: same messages (as JSON values), same ids, same counts.
final class KafkaSpliceTests: XCTestCase {
    typealias RNG = SeededRNG

    func randomScalar(_ rng: inout RNG) -> JSONValue {
        switch Int.random(in: 0..<6, using: &rng) {
        case 0: return .number(String(Int64.random(in: .min ... .max, using: &rng)))
        case 1: return .string(["plain", "quote\"d", "back\\slash", "é ü 日本", "tab\tnew\nline", ""].randomElement(using: &rng)!)
        case 2: return .bool(Bool.random(using: &rng))
        case 3: return .null
        case 4: return .number("1.5e3")
        default: return .string("s\(Int.random(in: 0..<1000, using: &rng))")
        }
    }

    func randomValue(_ rng: inout RNG, depth: Int = 0) -> JSONValue {
        guard depth < 3, Bool.random(using: &rng) else { return randomScalar(&rng) }
        if Bool.random(using: &rng) {
            return .array((0..<Int.random(in: 0..<4, using: &rng)).map { _ in randomValue(&rng, depth: depth + 1) })
        }
        return .object((0..<Int.random(in: 0..<4, using: &rng)).map { i in .init("k\(i)", randomValue(&rng, depth: depth + 1)) })
    }

    func randomBatch(_ rng: inout RNG) -> JSONValue {
        var members: [JSONValue.Member] = [.init("environment", .string("production"))]
        func maybe(_ key: String, _ value: @autoclosure () -> JSONValue) {
            if Bool.random(using: &rng) { members.append(.init(key, value())) }
        }
        maybe("mpid", .number(String(Int64.random(in: .min ... .max, using: &rng))))
        maybe("timestamp_unixtime_ms", .number("1700000000000"))
        maybe("user_identities", Bool.random(using: &rng)
            ? .object([.init("customer_id", .string("c1")), .init("email", .string("a@b.c"))])
            : .array([.object([.init("identity_type", .string("other")), .init("identity", .string("x"))])]))
        maybe("device_info", .object([.init("platform", .string("iOS")), .init("device", .string("Jane's"))]))
        maybe("application_info", .object([.init("application_name", .string("A"))]))
        maybe("source_info", .object([.init("channel", .string("native"))]))
        maybe("ip", .string("10.0.0.1"))
        maybe("mp_deviceid", .string("d-1"))
        maybe("context", .object([.init("location", .object([.init("lat", .number("1.5"))])), .init("other", .number("1"))]))
        maybe("unique_id", .string("old"))
        maybe("extra", randomValue(&rng))
        if Int.random(in: 0..<5, using: &rng) > 0 {
            let types = Array(KafkaConnectionSettings.supportedEventTypes) + ["media", "bogus"]
            let events: [JSONValue] = (0..<Int.random(in: 0..<6, using: &rng)).map { _ in
                var data: [JSONValue.Member] = [.init("event_name", .string("e"))]
                if Bool.random(using: &rng) { data.append(.init("location", .object([.init("lat", .number("2"))]))) }
                if Bool.random(using: &rng) { data.append(.init("source_message_id", .string("m-\(Int.random(in: 0..<99, using: &rng))"))) }
                if Bool.random(using: &rng) { data.append(.init("custom_attributes", randomValue(&rng))) }
                var event: [JSONValue.Member] = [.init("event_type", .string(types.randomElement(using: &rng)!)), .init("data", .object(data))]
                if Bool.random(using: &rng) { event.append(.init("source_message_id", .string("top"))) }
                return .object(event)
            }
            members.insert(.init("events", .array(events)), at: Int.random(in: 0...members.count, using: &rng))
        }
        members.shuffle(using: &rng)
        return .object(members)
    }

    func randomSettings(_ rng: inout RNG) -> KafkaConnectionSettings {
        var s = KafkaConnectionSettings()
        s.sendNetworkPerformanceEvents = Bool.random(using: &rng)
        s.sendAsBatch = Bool.random(using: &rng)
        s.includeLocation = Bool.random(using: &rng)
        s.sendProfileChangeEvents = Bool.random(using: &rng)
        s.includeMetadata = Bool.random(using: &rng)
        s.includeUserAttributeChangeEvents = Bool.random(using: &rng)
        s.includeUserIdentityChangeEvents = Bool.random(using: &rng)
        s.sendBatchesWithoutEvents = Bool.random(using: &rng)
        s.includeMPDeviceID = Bool.random(using: &rng)
        s.includeEventBatchLocation = Bool.random(using: &rng)
        if Bool.random(using: &rng) { s.uniqueID = "u-\"1\"" }
        if Bool.random(using: &rng) { s.metadataFieldExclusion.insert(.deviceName) }
        if Bool.random(using: &rng) { s.metadataFieldExclusion.insert(.ipAddress) }
        return s
    }

    func assertSame(_ batch: ByteBuffer, _ settings: KafkaConnectionSettings, file: StaticString = #filePath, line: UInt = #line) throws {
        let reference = settings.apply(to: try JSONValue.parse(batch), original: batch, receivedAt: 42)
        let spliced = try settings.splice(batch, receivedAt: 42)
        let context = "settings \(settings)\nbatch \(String(buffer: batch))"
        XCTAssertEqual(spliced.messages.count, reference.messages.count, context, file: file, line: line)
        for (a, b) in zip(spliced.messages, reference.messages) {
            XCTAssertEqual(try JSONValue.parse(a), try JSONValue.parse(b), context, file: file, line: line)
        }
        XCTAssertEqual(spliced.eventIDs, reference.eventIDs, context, file: file, line: line)
        if let packed = spliced.packed {
            // Per event: the messages as one array, what a frame carries for them (each a slice of it).
            var frame = Frame(type: .batch, id: 1)
            frame.payload = packed
            frame.parts = spliced.messages.map { Frame.Part(bytes: $0.readableBytes) }
            XCTAssertEqual(try frame.messages().map(\.payload), spliced.messages, context, file: file, line: line)
            XCTAssertEqual(try JSONValue.parse(packed), .array(try spliced.messages.map { try JSONValue.parse($0) }), file: file, line: line)
        } else {
            XCTAssert(settings.sendAsBatch || spliced.messages.count <= 1, context, file: file, line: line)
        }
        XCTAssertEqual(spliced.unsupportedEvents, reference.unsupportedEvents, file: file, line: line)
        XCTAssertEqual(spliced.filteredEvents, reference.filteredEvents, file: file, line: line)
    }

    func testRandomBatchesAndSettingsMatchTheReference() throws {
        var rng = RNG(state: 20261126)
        for _ in 0..<1000 {
            let batch = randomBatch(&rng)
            var bytes = batch.jsonBytes
            if Bool.random(using: &rng) {
                // Whitespace between tokens, as clients send it.
                bytes = ByteBuffer(string: String(buffer: bytes).replacingOccurrences(of: ",\"", with: ", \n\t\""))
            }
            if Int.random(in: 0..<4, using: &rng) == 0 {
                // Keys and values written with escapes (`event\u005ftype`, `custom\u005fevent`,
                // `\u0064ata`): the same batch to a JSON reader. Underscores only occur in strings.
                bytes = ByteBuffer(
                    string: String(buffer: bytes).replacingOccurrences(of: "_", with: "\\u005f")
                        .replacingOccurrences(of: "\"data\"", with: "\"\\u0064ata\""))
            }
            try assertSame(bytes, randomSettings(&rng))
        }
    }

    func testUntouchedBatchIsForwardedByteForByte() throws {
        var settings = KafkaConnectionSettings()
        settings.includeMPDeviceID = true
        let batch = ByteBuffer(string: #"{"environment":"production", "mpid":  -1,"events":[{"event_type":"custom_event","data":{"a":"\u00e9"}}]}"#)
        XCTAssertEqual(try settings.splice(batch, receivedAt: 0).messages, [batch])
    }

    func testFixtureBatchWithEverySettingValue() throws {
        let url = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .appendingPathComponent("fixtures/batch-all-event-types.json")
        let batch = ByteBuffer(bytes: try Data(contentsOf: url))
        var rng = RNG(state: 7)
        for _ in 0..<60 { try assertSame(batch, randomSettings(&rng)) }
    }
}
