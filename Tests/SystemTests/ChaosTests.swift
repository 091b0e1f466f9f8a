import Foundation
import TestSupport
import XCTest

#if canImport(Glibc)
import Glibc
#endif

/// Nothing acknowledged is lost: sustained load while ingest, router and kafka-out are SIGKILLed
/// and restarted, then every accepted batch must be in the topic (read back with kcat).
/// `SLUICE_CHAOS_SECONDS` makes it a longer soak by hand.
final class ChaosTests: XCTestCase {
    final class Ledger: @unchecked Sendable {
        let lock = NSLock()
        var accepted = Set<Int>()
        var refused = Set<Int>()  // a definite HTTP error: must never arrive
        var unknown = Set<Int>()  // the connection broke: may or may not have been stored
        var stop = false
    }

    func testSIGKILLEachProcessUnderLoadLosesNothingAccepted() throws {
        let group = try ProcessGroup(config: """
            tenants:
              acme:
                api_key: acme-key
                api_secret: acme-secret
                destinations:
                  main: {kind: kafka, bootstrap_servers: dev, topic: chaos, plaintext: true}
            """)
        try group.startAll(topics: ["chaos:4"])
        let ledger = Ledger()
        let load = Thread {
            var n = 0
            while !ledger.lock.withLock({ ledger.stop }) {
                n += 1
                let body = #"{"environment":"production","batch_id":\#(n),"mpid":\#(n % 17),"events":[{"event_type":"custom_event","data":{"event_name":"e","custom_event_type":"other"}}]}"#
                let status = (try? group.post("/v2/events", body: Data(body.utf8), user: "acme-key", password: "acme-secret"))?.status
                ledger.lock.withLock {
                    switch status {
                    case 202?: ledger.accepted.insert(n)
                    case nil: ledger.unknown.insert(n)
                    default: ledger.refused.insert(n)
                    }
                }
                if status != 202 { usleep(50_000) }
            }
        }
        load.start()
        let seconds = Double(ProcessInfo.processInfo.environment["SLUICE_CHAOS_SECONDS"] ?? "") ?? 12
        let rounds = max(1, Int(seconds / 6))
        for _ in 0..<rounds {
            for name in ["router", "kafka-out", "ingest"] {
                usleep(1_000_000)
                group.stop(name, signal: SIGKILL)
                usleep(300_000)
                if name == "ingest" { try group.startIngest() } else { try group.start(name) }
            }
        }
        usleep(1_000_000)
        ledger.lock.withLock { ledger.stop = true }
        while !load.isFinished { usleep(20_000) }

        let (accepted, refused) = ledger.lock.withLock { (ledger.accepted, ledger.refused) }
        XCTAssertGreaterThan(accepted.count, 20, "the load generator got batches through\n\(group.logs())")
        var seen: [Int: Int] = [:]
        var batchHeaders: [Int: Set<String>] = [:]
        _ = try eventually(timeout: 120) {
            seen = [:]
            batchHeaders = [:]
            for m in try Kcat.consume(bootstrap: group.bootstrapServers, topic: "chaos") {
                guard let obj = try? JSONSerialization.jsonObject(with: Data(m.value.utf8)) as? [String: Any],
                    let id = (obj["batch_id"] as? NSNumber)?.intValue
                else { continue }
                seen[id, default: 0] += 1
                batchHeaders[id, default: []].insert(m.header("sluice-batch-id") ?? "none")
            }
            return accepted.isSubset(of: Set(seen.keys))
        }
        let missing = accepted.subtracting(seen.keys)
        XCTAssertTrue(missing.isEmpty, "accepted but lost: \(missing.sorted().prefix(20))\n\(group.logs().suffix(20000))")
        XCTAssertTrue(refused.intersection(seen.keys).isEmpty, "refused but delivered")
        let duplicates = seen.values.filter { $0 > 1 }.count
        // A duplicate carries the same sluice-batch-id as its original, so consumers can drop it.
        XCTAssertTrue(batchHeaders.values.allSatisfy { $0.count == 1 && !$0.contains("none") }, "\(batchHeaders.filter { $0.value.count != 1 }.prefix(5))")
        print("chaos: accepted \(accepted.count), refused \(refused.count), unknown \(ledger.unknown.count), delivered \(seen.count) distinct, \(duplicates) duplicated")
    }
}
