import NIOCore
import XCTest

@testable import Shared

final class KeenEventsTests: XCTestCase {
    func destination(_ collection: String = "mparticle.{event_type}", token: Bool = true) -> KeenDestination {
        KeenDestination(projectID: "p", key: Secret("k"), collection: collection, uniquenessToken: token)
    }

    func testCollectionNameRules() {
        let valid = ["events", "a", "mparticle.custom_event", "A-Z_0.9", String(repeating: "x", count: 64), "x_", "x-"]
        for name in valid { XCTAssertNil(KeenDestination.collectionProblem(name), name) }
        let invalid = [
            "", String(repeating: "x", count: 65), "_leading", ".leading", "trailing.", "sp ace", "slash/", "colon:", "dollar$",
            "plus+", "ümlaut", "tab\t", "star*", "at@", "hash#", "comma,",
        ]
        for name in invalid { XCTAssertNotNil(KeenDestination.collectionProblem(name), name) }
    }

    func testPropertyRenamingAtEveryLevel() {
        XCTAssertEqual(KeenDestination.keenPropertyName("$firstname"), "mp_firstname")
        XCTAssertEqual(KeenDestination.keenPropertyName("Google.Category"), "Google_Category")
        XCTAssertEqual(KeenDestination.keenPropertyName("Version3.1"), "Version3_1")
        XCTAssertEqual(KeenDestination.keenPropertyName("fine_name"), "fine_name")
        XCTAssertEqual(KeenDestination.keenPropertyName(""), "_")
        XCTAssertEqual(KeenDestination.keenPropertyName(String(repeating: "n", count: 300)).count, 255)
        XCTAssertEqual(KeenDestination.keenPropertyName("$"), "mp_")
        XCTAssertEqual(KeenDestination.keenPropertyName("$a.b.c"), "mp_a_b_c")
        XCTAssertEqual(KeenDestination.keenPropertyName("."), "_")
        XCTAssertEqual(KeenDestination.keenPropertyName("é.日本"), "é_日本")
        XCTAssertEqual(KeenDestination.keenPropertyName("a$b"), "a$b")
        XCTAssertEqual(KeenDestination.keenPropertyName("." + String(repeating: "é", count: 300)), "_" + String(repeating: "é", count: 254))
        // Clashes in a large object (more than 16 members) too.
        let large = JSONValue.object((0..<20).map { .init("k\($0)", .number("\($0)")) } + [.init("k.1", .null), .init("k_1", .null)])
        XCTAssertEqual(
            KeenDestination.renamed(large).jsonString,
            "{" + (0..<20).map { "\"k\($0)\":\($0)" }.joined(separator: ",") + #","k_1":null,"k_1_2":null}"#)
        let nested = try! JSONValue.parse(#"{"a.b":{"$c":[{"d.e":1}],"ok":2},"a_b":3}"#)
        XCTAssertEqual(
            KeenDestination.renamed(nested).jsonString,
            #"{"a_b":{"mp_c":[{"d_e":1}],"ok":2},"a_b_2":3}"#, "renamed inside objects and arrays; a clash gets _2")
    }

    func testOneObjectPerEventWithContextTimestampAndToken() throws {
        let batch = try JSONValue.parse(
            """
            {"environment":"production","mpid":-9223372036854775808,"batch_id":9007199254740993,
             "timestamp_unixtime_ms":1700000000000,
             "user_identities":{"customer_id":"c1"},"user_attributes":{"$FirstName":"Jane"},
             "device_info":{"platform":"iOS"},"application_info":{"application_name":"App"},
             "events":[
              {"event_type":"custom_event","data":{"event_name":"Buy","timestamp_unixtime_ms":1700000001234,
                "source_message_id":"m-1","custom_attributes":{"Google.Category":"x"}}},
              {"event_type":"screen_view","data":{"screen_name":"Home"}}]}
            """)
        let out = destination().events(from: batch, batchID: "spool-7", receivedAt: 1)
        XCTAssertEqual(out.rejected.count, 0)
        XCTAssertEqual(out.events.map(\.collection), ["mparticle.custom_event", "mparticle.screen_view"])
        let first = try JSONValue.parse(out.events[0].payload)
        XCTAssertEqual(first["event_name"], .string("Buy"))
        XCTAssertEqual(first["event_type"], .string("custom_event"))
        XCTAssertEqual(first["custom_attributes"]?["Google_Category"], .string("x"))
        XCTAssertEqual(first["keen"]?["timestamp"], .string("2023-11-14T22:13:21.234Z"))
        XCTAssertEqual(first["keen"]?["uniqueness_token"], .string("m-1"))
        XCTAssertEqual(first["mparticle"]?["mpid"], .number("-9223372036854775808"), "int64 ids exact")
        XCTAssertEqual(first["mparticle"]?["batch_id"], .number("9007199254740993"))
        XCTAssertEqual(first["mparticle"]?["user_attributes"]?["mp_FirstName"], .string("Jane"))
        XCTAssertEqual(
            first["mparticle"]?["user_identities"],
            .array([.object([.init("identity_type", .string("customer_id")), .init("identity", .string("c1"))])]))
        XCTAssertEqual(first["sluice"]?["batch_id"], .string("spool-7"))
        let second = try JSONValue.parse(out.events[1].payload)
        XCTAssertEqual(second["keen"]?["timestamp"], .string("2023-11-14T22:13:20.000Z"), "the batch's time when the event has none")
        XCTAssertEqual(second["keen"]?["uniqueness_token"], .string("spool-7:1"), "no source_message_id: batch id and position")
        XCTAssertEqual(out.events[1].eventID, "spool-7:1")

        var context = destination(token: false)
        context.includeUser = false
        context.includeDevice = false
        let bare = try JSONValue.parse(context.events(from: batch, batchID: nil, receivedAt: 1).events[0].payload)
        XCTAssertNil(bare["keen"]?["uniqueness_token"])
        XCTAssertNil(bare["mparticle"]?["user_identities"])
        XCTAssertNil(bare["mparticle"]?["device_info"])
        XCTAssertNotNil(bare["mparticle"]?["application_info"])
    }

    func testLongTokensAreDigestedAndStableAcrossCalls() {
        let long = String(repeating: "m", count: 100)
        let a = KeenDestination.eventID(long, batchID: nil, index: 0)
        XCTAssertLessThanOrEqual(a.count, 64)
        XCTAssertEqual(a, KeenDestination.eventID(long, batchID: "other", index: 5))
        XCTAssertNotEqual(a, KeenDestination.eventID(long + "x", batchID: nil, index: 0))
    }

    func testOversizeEventsAndBadDerivedNamesAreRejectedNotSent() throws {
        let big = String(repeating: "x", count: 950_000)
        let batch = try JSONValue.parse(
            #"{"environment":"production","events":[{"event_type":"custom_event","data":{"blob":"\#(big)"}},{"event_type":"screen_view","data":{}}]}"#)
        let out = destination().events(from: batch, batchID: "b", receivedAt: 0)
        XCTAssertEqual(out.events.count, 1)
        XCTAssertEqual(out.rejected.map(\.index), [0])
        XCTAssertTrue(out.rejected[0].reason.contains("900000"), out.rejected[0].reason)
        let derived = destination("_{event_type}").events(from: batch, batchID: "b", receivedAt: 0)
        XCTAssertEqual(derived.events.count, 0)
        XCTAssertTrue(derived.rejected.allSatisfy { $0.reason.contains("starts with '_'") })
    }

    func testISO8601() {
        XCTAssertEqual(KeenDestination.iso8601(milliseconds: 0), "1970-01-01T00:00:00.000Z")
        XCTAssertEqual(KeenDestination.iso8601(milliseconds: -1), "1969-12-31T23:59:59.999Z")
        XCTAssertEqual(KeenDestination.iso8601(milliseconds: 1_700_000_000_007), "2023-11-14T22:13:20.007Z")
    }
}
