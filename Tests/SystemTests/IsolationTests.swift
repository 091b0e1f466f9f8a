import Foundation
import TestSupport
import XCTest

/// A destination that is down does not slow the others: neither another tenant's nor the same
/// tenant's other destination. Its backlog is capped; the excess becomes dead letters.
final class IsolationTests: XCTestCase {
    func testDownDestinationHoldsOnlyItsOwnBacklog() throws {
        let group = try ProcessGroup(config: """
            ingest: {max_backlog_per_destination: 100}
            tenants:
              acme:
                api_key: acme-key
                api_secret: acme-secret
                destinations:
                  up: {kind: kafka, bootstrap_servers: dev, plaintext: true, topic: iso-acme}
                  down: {kind: kafka, bootstrap_servers: "127.0.0.1:1", plaintext: true, topic: nowhere}
              beta:
                api_key: beta-key
                api_secret: beta-secret
                destinations:
                  main: {kind: kafka, bootstrap_servers: dev, plaintext: true, topic: iso-beta}
            """)
        try group.startAll(topics: ["iso-acme:2", "iso-beta:2"])
        // More batches than a destination's window (64) plus its backlog cap (100). The load is
        // paced by the healthy destinations (the cap counts every waiting batch, so a destination
        // that merely lags far behind would reach it too).
        let count = 600
        let bulkSize = 50
        for start in stride(from: 0, to: count, by: bulkSize) {
            let batches = (start..<(start + bulkSize)).map { #"{"environment":"production","batch_id":\#($0),"mpid":\#($0 % 7)}"# }
            let body = Data("[\(batches.joined(separator: ","))]".utf8)
            XCTAssertEqual(try group.post("/v2/bulkevents", body: body, user: "acme-key", password: "acme-secret").status, 202)
            XCTAssertEqual(try group.post("/v2/bulkevents", body: body, user: "beta-key", password: "beta-secret").status, 202)
            for topic in ["iso-acme", "iso-beta"] {
                var n = 0
                _ = try eventually(timeout: 60) {
                    n = try Kcat.consume(bootstrap: group.bootstrapServers, topic: topic).count
                    return n >= start + bulkSize
                }
                XCTAssertEqual(n, start + bulkSize, "\(topic) keeps flowing while acme/down is down\n\(group.logs().suffix(5000))")
            }
        }
        let r = try runCommand(BuiltProducts.path("ingest"), ["dead-letters", "list", "--json", "--spool-dir", group.runDir + "/spool"])
        let dead = r.out.split(separator: "\n")
        XCTAssertEqual(dead.count, count - 100, "beyond the cap, the oldest of acme/down are dead letters")
        XCTAssertTrue(dead.allSatisfy { $0.contains("\"destination\":\"down\"") && $0.contains("backlog cap") }, "\(Set(dead.map { $0.split(separator: ",").suffix(2).joined() }))")
    }
}
