import NIOCore
import XCTest

@testable import Shared

final class BatchValidatorTests: XCTestCase {
    let validator = BatchValidator(maxBatchBytes: 1024)

    func validate(_ s: String) throws -> ValidatedBatch { try validator.validate(ByteBuffer(string: s)) }

    func testValidBatchKeepsBytesAndMPID() throws {
        let doc = "{\"environment\":\"production\",\"mpid\":\"-42\",\"events\":[{\"event_type\":\"screen_view\",\"data\":{\"screen_name\":\"a\",\"event_id\":9223372036854775807}}]}"
        let batch = try validate(doc)
        XCTAssertEqual(batch.mpid, "-42")
        XCTAssertEqual(batch.eventCount, 1)
        XCTAssertEqual(String(buffer: batch.bytes), doc)
        XCTAssertNil(try validate("{\"environment\":\"development\",\"mpid\":null}").mpid)
    }

    func testEveryEventTypeIsKnown() throws {
        for t in EventType.allCases {
            XCTAssertNoThrow(try validate("{\"environment\":\"production\",\"events\":[{\"event_type\":\"\(t.rawValue)\",\"data\":{}}]}"))
            // The same name written with escapes is the same type.
            let escaped = t.rawValue.replacingOccurrences(of: "_", with: "\\u005f").replacingOccurrences(of: "e", with: "\\u0065")
            XCTAssertNoThrow(try validate("{\"environment\":\"production\",\"events\":[{\"event_type\":\"\(escaped)\",\"data\":{}}]}"))
            XCTAssertEqual(type("\"\(t.rawValue)\""), t)
            XCTAssertEqual(type("\"\(escaped)\""), t)
        }
        // Near misses are not types.
        for text in ["\"custom_even\"", "\"custom_eventx\"", "\"Custom_event\"", "\"\"", "\"session_start \"", "\"uninstal\"", "custom_event", "\""] {
            XCTAssertNil(type(text), text)
        }
    }

    private func type(_ json: String) -> EventType? { Array(json.utf8).withUnsafeBytes { EventType(json: $0) } }

    func testErrorsNameTheField() {
        let cases: [(String, String)] = [
            ("[]", "not a JSON object"),
            ("{\"events\":[]}", "\"environment\" is missing"),
            ("{\"environment\":\"staging\"}", "\"environment\" must be"),
            ("{\"environment\":\"production\",\"mpid\":1.5}", "\"mpid\" must be a signed 64-bit integer"),
            ("{\"environment\":\"production\",\"mpid\":9223372036854775808}", "\"mpid\""),
            ("{\"environment\":\"production\",\"batch_id\":\"x\"}", "\"batch_id\""),
            ("{\"environment\":\"production\",\"events\":{}}", "\"events\" must be an array"),
            ("{\"environment\":\"production\",\"events\":[1]}", "events[0] must be an object"),
            ("{\"environment\":\"production\",\"events\":[{\"data\":{}}]}", "events[0]: required event field \"event_type\""),
            ("{\"environment\":\"production\",\"events\":[{\"event_type\":\"nope\",\"data\":{}}]}", "unknown event_type \"nope\""),
            ("{\"environment\":\"production\",\"events\":[{\"event_type\":\"n\\u006fpe\",\"data\":{}}]}", "unknown event_type \"nope\""),
            ("{\"environment\":\"production\",\"events\":[{\"event_type\":\"\",\"data\":{}}]}", "\"event_type\" is missing or empty"),
            ("{\"environment\":\"production\",\"events\":[{\"event_type\":7,\"data\":{}}]}", "\"event_type\" must be a string"),
            ("{\"environment\":\"production\",\"events\":[{\"event_type\":\"custom_event\"}]}", "\"data\" is missing"),
            ("{\"environment\":\"production\",\"events\":[{\"event_type\":\"custom_event\",\"data\":[]}]}", "\"data\" must be an object"),
            ("{\"environment\":\"production\",\"events\":[{\"event_type\":\"custom_event\",\"data\":{\"session_id\":\"abc\"}}]}", "data.session_id"),
            ("{\"environment\":\"production\",\"user_identities\":\"x\"}", "user_identities"),
            ("{\"environment\":\"production\",\"device_info\":[]}", "\"device_info\" must be an object"),
            ("{\"environment\":\"production\"", "not a JSON object"),
        ]
        for (doc, expected) in cases {
            XCTAssertThrowsError(try validate(doc), doc) { error in
                XCTAssertTrue("\(error)".contains(expected), "\(doc): \(error)")
            }
        }
    }

    func testSizeLimit() {
        let big = "{\"environment\":\"production\",\"pad\":\"" + String(repeating: "x", count: 1100) + "\"}"
        XCTAssertThrowsError(try validate(big)) { XCTAssertTrue("\($0)".contains("the limit is 1024 bytes")) }
    }

    func testBulk() throws {
        let one = "{\"environment\":\"production\",\"mpid\":1}"
        let batches = try validator.validateBulk(ByteBuffer(string: "[\(one), \(one)]"), maxBatches: 2)
        XCTAssertEqual(batches.count, 2)
        XCTAssertEqual(String(buffer: batches[1].bytes), one)
        XCTAssertThrowsError(try validator.validateBulk(ByteBuffer(string: "[\(one),\(one),\(one)]"), maxBatches: 2)) {
            XCTAssertTrue("\($0)".contains("at most 2"))
        }
        XCTAssertThrowsError(try validator.validateBulk(ByteBuffer(string: "[\(one), {\"mpid\":1}]"), maxBatches: 5)) {
            XCTAssertTrue("\($0)".contains("batch [1]: required field \"environment\""), "\($0)")
        }
        XCTAssertThrowsError(try validator.validateBulk(ByteBuffer(string: "[]"), maxBatches: 5))
        XCTAssertThrowsError(try validator.validateBulk(ByteBuffer(string: one), maxBatches: 5))
    }
}
