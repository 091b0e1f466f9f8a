import Foundation
import TestSupport
import XCTest

/// A permanent failure lands in the dead-letter store with its reason; the commands list, show,
/// replay (to that destination only) and purge it.
final class DeadLetterTests: XCTestCase {
    func testPermanentFailureIsDeadLetteredAndCanBeReplayedAndPurged() throws {
        let group = try ProcessGroup(config: """
            ingest: {max_batch_bytes: 2000000, max_request_bytes: 4000000}
            tenants:
              acme:
                api_key: acme-key
                api_secret: acme-secret
                destinations:
                  per-event: {kind: kafka, bootstrap_servers: dev, plaintext: true, topic: dl-events, settings: {send_as_batch: false}}
                  whole: {kind: kafka, bootstrap_servers: dev, plaintext: true, topic: dl-batches}
            """)
        try group.startAll(topics: ["dl-events:1", "dl-batches:1"])
        // 30 events of 50 KB: each event fits in a Kafka message, the whole batch (1.5 MB) does not.
        let pad = String(repeating: "y", count: 50_000)
        let events = (0..<30).map { #"{"event_type":"custom_event","data":{"event_name":"e\#($0)","custom_event_type":"other","pad":"\#(pad)"}}"# }
        let body = #"{"environment":"production","mpid":3,"events":[\#(events.joined(separator: ","))]}"#
        XCTAssertEqual(try group.post("/v2/events", body: Data(body.utf8), user: "acme-key", password: "acme-secret").status, 202)

        let ingest = BuiltProducts.path("ingest")
        let spool = ["--spool-dir", group.runDir + "/spool"]
        func list() throws -> [[String: Any]] {
            let r = try runCommand(ingest, ["dead-letters", "list", "--json"] + spool)
            XCTAssertEqual(r.status, 0, r.err)
            return r.out.split(separator: "\n").compactMap { try? JSONSerialization.jsonObject(with: Data($0.utf8)) as? [String: Any] }
        }
        var entries: [[String: Any]] = []
        XCTAssertTrue(eventually(timeout: 60) { entries = (try? list()) ?? []; return !entries.isEmpty }, group.logs())
        XCTAssertEqual(entries.count, 1)
        XCTAssertEqual(entries[0]["destination"] as? String, "whole")
        XCTAssertEqual(entries[0]["tenant"] as? String, "acme")
        XCTAssertTrue((entries[0]["reason"] as? String ?? "").contains("MSG_SIZE_TOO_LARGE"), "\(entries)")
        var perEvent = 0
        _ = try eventually(timeout: 60) {
            perEvent = try Kcat.consume(bootstrap: group.bootstrapServers, topic: "dl-events").count
            return perEvent >= 30
        }
        XCTAssertEqual(perEvent, 30, "the other destination got it")

        let id = "\(entries[0]["id"]!)"
        let shown = try runCommand(ingest, ["dead-letters", "show", id] + spool)
        XCTAssertTrue(shown.out.contains("destination: whole") && shown.out.contains("\"mpid\":3"), shown.out + shown.err)

        // Replay goes to that destination only: it fails again, the other gets no duplicate.
        let replayed = try runCommand(ingest, ["dead-letters", "replay", "--destination", "whole"] + spool)
        XCTAssertEqual(replayed.out.trimmingCharacters(in: .whitespacesAndNewlines), "replayed 1", replayed.err)
        XCTAssertTrue(eventually(timeout: 60) { ((try? list()) ?? []).first.map { "\($0["id"]!)" != id } ?? false }, group.logs())
        XCTAssertEqual(try list().count, 1)
        XCTAssertEqual(try Kcat.consume(bootstrap: group.bootstrapServers, topic: "dl-events").count, 30)

        let refused = try runCommand(ingest, ["dead-letters", "purge"] + spool)
        XCTAssertNotEqual(refused.status, 0, "purging everything needs --all")
        let purged = try runCommand(ingest, ["dead-letters", "purge", "--tenant", "acme"] + spool)
        XCTAssertEqual(purged.out.trimmingCharacters(in: .whitespacesAndNewlines), "purged 1", purged.err)
        XCTAssertEqual(try list().count, 0)
    }
}
