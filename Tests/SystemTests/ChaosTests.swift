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
        // Two destinations: Kafka (kafka-out) and Keen over HTTP (keen-out, against the emulator).
        let group = try ProcessGroup(config: "tenants: {}\n")
        let keen = try KeenEmulator(workDir: group.runDir)
        try group.writeConfig(
            ProcessGroup.acmeConfig(topic: "chaos") + """

                      keen:
                        kind: keen
                        transport: http
                        http_base_url: \(keen.baseURL)
                        project_id: \(KeenEmulator.project)
                        key: \(KeenEmulator.writeKey)
                        collection: chaos
                """)
        try group.startDevCluster(topics: ["chaos:4"])
        try group.start("router")
        try group.start("kafka-out")
        try group.start("keen-out")
        try group.startIngest()
        XCTAssertTrue(eventually { (try? group.get("/readyz").status) == 200 }, group.logs())
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
            for name in ["router", "kafka-out", "keen-out", "ingest"] {
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
        // Keen has every accepted batch's event too (Keen drops repeats by uniqueness token).
        var inKeen = Set<Int>()
        _ = try eventually(timeout: 120) {
            inKeen = Set(try keen.events("chaos").compactMap { ($0["mparticle"] as? [String: Any])?["batch_id"] as? Int })
            return accepted.isSubset(of: inKeen)
        }
        let missingInKeen = accepted.subtracting(inKeen)
        XCTAssertTrue(missingInKeen.isEmpty, "accepted but not in Keen: \(missingInKeen.sorted().prefix(20))")
        XCTAssertTrue(refused.intersection(inKeen).isEmpty, "refused but delivered to Keen")
        print("chaos: accepted \(accepted.count), refused \(refused.count), unknown \(ledger.unknown.count), delivered \(seen.count) distinct, \(duplicates) duplicated; Keen has \(inKeen.count)")
    }
}

/// Broker outages and errors, injected through the dev cluster's control socket.
final class BrokerOutageTests: XCTestCase {
    func control(_ group: ProcessGroup, _ command: String) throws -> String { try devClusterControl(group, command) }

    func startGroup(_ topic: String, _ kafkaOutArguments: [String] = []) throws -> ProcessGroup {
        let group = try ProcessGroup(config: ProcessGroup.acmeConfig(topic: topic))
        try group.startDevCluster(topics: ["\(topic):2"])
        try group.start("router")
        // librdkafka gives up on a message after 2 s; Sluice must retry it, not drop it.
        try group.start("kafka-out", ["--message-timeout-ms", "2000"] + kafkaOutArguments)
        try group.startIngest()
        XCTAssertTrue(eventually { (try? group.get("/readyz").status) == 200 })
        return group
    }

    final class Sender {
        let group: ProcessGroup
        let topic: String
        var sent = 0
        init(_ group: ProcessGroup, _ topic: String) {
            self.group = group
            self.topic = topic
        }
        func send(_ n: Int) throws {
            for _ in 0..<n {
                sent += 1
                let body = #"{"environment":"production","batch_id":\#(sent),"mpid":\#(sent % 5)}"#
                let r = try group.post("/v2/events", body: Data(body.utf8), user: "acme-key", password: "acme-secret")
                XCTAssertEqual(r.status, 202, "accepted whatever the brokers do (429 only when the spool is full)")
            }
        }
        func delivered() throws -> Set<Int> {
            Set(try Kcat.consume(bootstrap: group.bootstrapServers, topic: topic).compactMap { m in
                (try? JSONSerialization.jsonObject(with: Data(m.value.utf8)) as? [String: Any])?["batch_id"] as? Int
            })
        }
        func assertAllArrive() throws {
            var got = Set<Int>()
            _ = try eventually(timeout: 120) {
                got = try delivered()
                return got.count >= sent
            }
            let kafkaOutLog = (try? String(contentsOfFile: group.runDir + "/kafka-out.log", encoding: .utf8)) ?? ""
            XCTAssertEqual(got, Set(1...sent), "every accepted batch arrived\n\(kafkaOutLog.suffix(8000))")
        }
    }

    func testOutageLongerThanTheMessageTimeoutLosesNothing() throws {
        let group = try startGroup("outage")
        let sender = Sender(group, "outage")
        try sender.send(10)
        XCTAssertTrue(try eventually(timeout: 60) { try sender.delivered().count == 10 })
        // All brokers down for longer than the message timeout.
        XCTAssertEqual(try control(group, "down"), "ok")
        try sender.send(20)
        XCTAssertTrue(
            eventually(timeout: 30) { group.logs().contains("_MSG_TIMED_OUT") }, "librdkafka expired messages during the outage")
        Thread.sleep(forTimeInterval: 2)
        XCTAssertEqual(try control(group, "up"), "ok")
        try sender.send(10)
        try sender.assertAllArrive()
    }

    func testSlowBrokersAndDroppedConnectionsLoseNothing() throws {
        let group = try startGroup("slow")
        let sender = Sender(group, "slow")
        try sender.send(5)
        XCTAssertEqual(try control(group, "rtt 300"), "ok")
        try sender.send(10)
        // The broker drops the connection instead of answering Produce (librdkafka's _TRANSPORT).
        XCTAssertEqual(try control(group, "errors 0 -195 -195"), "ok")
        try sender.send(10)
        XCTAssertEqual(try control(group, "rtt 0"), "ok")
        try sender.assertAllArrive()
        XCTAssertEqual(try control(group, "bogus"), "error: unknown command (down, up, rtt MS, errors API_KEY CODE...)")
    }

    /// With `--partition-rounds batches` (the destination sends batches: they are held while their
    /// partition has 5 in flight): slow brokers, dropped connections and an outage longer than the
    /// message timeout lose nothing.
    func testPartitionRoundsLoseNothingThroughSlowBrokersAndAnOutage() throws {
        let group = try startGroup("rounds", ["--partition-rounds", "batches"])
        let sender = Sender(group, "rounds")
        try sender.send(10)
        XCTAssertTrue(try eventually(timeout: 60) { try sender.delivered().count == 10 })
        Thread.sleep(forTimeInterval: 6)  // the producer's statistics (every 5 s) name the partitions: rounds begin
        XCTAssertEqual(try control(group, "rtt 300"), "ok")
        try sender.send(20)
        XCTAssertEqual(try control(group, "errors 0 -195 -195"), "ok")
        try sender.send(10)
        XCTAssertEqual(try control(group, "down"), "ok")
        try sender.send(10)
        XCTAssertTrue(
            eventually(timeout: 30) { group.logs().contains("_MSG_TIMED_OUT") }, "librdkafka expired messages during the outage")
        XCTAssertEqual(try control(group, "up"), "ok")
        XCTAssertEqual(try control(group, "rtt 0"), "ok")
        try sender.send(10)
        try sender.assertAllArrive()
    }

    /// Produce requests failing with NOT_ENOUGH_REPLICAS and REQUEST_TIMED_OUT: retried, nothing lost.
    ///
    /// kafka-out runs with one request in flight per connection here, because with several
    /// librdkafka 2.0.2's mock cluster loses messages that a real broker would not: an injected error skips one Produce
    /// request's append, but the mock checks sequence numbers only for transactional producers
    /// (rdkafka_mock.c, rd_kafka_mock_validate_records), so it appends the next in-flight request;
    /// the idempotent client then implicitly acks the skipped messages
    /// (rdkafka_request.c, rd_kafka_handle_idempotent_Produce_success → rd_kafka_dr_implicit_ack).
    /// A real broker answers OUT_OF_ORDER_SEQUENCE_NUMBER and the client retries. Reproduced with a
    /// plain C producer and kcat, without Sluice: loss only with idempotence on, requests in flight
    /// overlapping, and error codes 19, 7 or 6; never with -195 (see the test above).
    /// SLUICE_MOCK_ERROR_TESTS=5 runs it with librdkafka's default of 5 in flight (to watch the mock's loss).
    func testProduceErrorsLoseNothing() throws {
        let inFlight = ProcessInfo.processInfo.environment["SLUICE_MOCK_ERROR_TESTS"] ?? "1"
        let group = try startGroup("errors", ["--max-in-flight", inFlight])
        let sender = Sender(group, "errors")
        try sender.send(5)
        XCTAssertEqual(try control(group, "errors 0 19 19 7 7"), "ok")
        try sender.send(20)
        try sender.assertAllArrive()
    }
}
