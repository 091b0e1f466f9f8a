import Foundation
import TestSupport
import XCTest

#if canImport(Glibc)
import Glibc
#endif

/// Whole-system tests: the real executables, the dev cluster, HTTP in, kcat out.
final class PipelineTests: XCTestCase {
    static let config = """
        tenants:
          acme:
            api_key: acme-key
            api_secret: acme-secret
            destinations:
              main: {kind: kafka, bootstrap_servers: dev, topic: acme-events, plaintext: true}
          beta:
            api_key: beta-key
            api_secret: {env: BETA_SECRET_UNUSED_FALLBACK}
        """

    func makeGroup() throws -> ProcessGroup {
        // beta's secret comes from the environment, like a production deployment would do it.
        setenv("BETA_SECRET_UNUSED_FALLBACK", "beta-secret", 1)
        return try ProcessGroup(config: Self.config)
    }

    func batch(mpid: String?, n: Int, quoted: Bool = false) -> String {
        let id = mpid.map { quoted ? "\"\($0)\"" : $0 }
        let mpidField = id.map { ",\"mpid\":\($0)" } ?? ""
        return #"{"environment":"production","batch_id":\#(n)\#(mpidField),"events":[{"event_type":"custom_event","data":{"event_name":"e\#(n)","custom_event_type":"other","event_id":-9007199254740993}}]}"#
    }

    func consume(_ group: ProcessGroup, expecting count: Int, topic: String = "acme-events") throws -> [ConsumedMessage] {
        var messages: [ConsumedMessage] = []
        _ = try eventually(timeout: 60) {
            messages = try Kcat.consume(bootstrap: group.bootstrapServers, topic: topic)
            return messages.count >= count
        }
        return messages
    }

    func testBatchesArriveOnceKeyedByExactMPIDWithTheSentPayload() throws {
        let group = try makeGroup()
        try group.startAll(topics: ["acme-events:4"])
        let mpids = ["-9223372036854775808", "9223372036854775807", "9007199254740993", "-1", "0", "42"]
        var sent: [String: String?] = [:]  // payload → expected key
        var n = 0
        for round in 0..<3 {
            for mpid in mpids {
                n += 1
                let body = batch(mpid: mpid, n: n, quoted: round == 1)  // ids as strings are accepted too
                let r = try group.post("/v2/events", body: Data(body.utf8), user: "acme-key", password: "acme-secret")
                XCTAssertEqual(r.status, 202, r.body)
                sent[body] = mpid
            }
        }
        // Batches without an MPID, one by one and in a bulk request.
        var bulk: [String] = []
        for _ in 0..<20 {
            n += 1
            let body = batch(mpid: nil, n: n)
            XCTAssertEqual(try group.post("/v2/events", body: Data(body.utf8), user: "acme-key", password: "acme-secret").status, 202)
            sent[body] = .some(nil)
        }
        for _ in 0..<5 {
            n += 1
            let body = batch(mpid: "77", n: n)
            bulk.append(body)
            sent[body] = "77"
        }
        let r = try group.post("/v2/bulkevents", body: Data("[\(bulk.joined(separator: ","))]".utf8), user: "acme-key", password: "acme-secret")
        XCTAssertEqual(r.status, 202, r.body)

        let messages = try consume(group, expecting: sent.count)
        XCTAssertEqual(messages.count, sent.count, "every accepted batch arrives exactly once\n\(group.logs())")
        var seen = Set<String>()
        var partitionsByKey: [String: Set<Int>] = [:]
        var keylessPartitions = Set<Int>()
        for m in messages {
            XCTAssertTrue(seen.insert(m.value).inserted, "duplicate: \(m.value)")
            guard let expected = sent[m.value] else {
                XCTFail("a message that was never sent: \(m.value)")
                continue
            }
            XCTAssertEqual(m.key, expected, "the key is the MPID's exact decimal text")
            if let key = m.key { partitionsByKey[key, default: []].insert(m.partition) } else { keylessPartitions.insert(m.partition) }
        }
        for (key, partitions) in partitionsByKey {
            XCTAssertEqual(partitions.count, 1, "all batches of MPID \(key) share one partition")
        }
        XCTAssertGreaterThan(keylessPartitions.count, 1, "batches without an MPID spread over partitions")
    }

    func testTenantWithoutDestinationsIsAcceptedAndWritesNothingElsewhere() throws {
        let group = try makeGroup()
        try group.startAll(topics: ["acme-events:4"])
        let r = try group.post("/v2/events", body: Data(batch(mpid: "5", n: 1).utf8), user: "beta-key", password: "beta-secret")
        XCTAssertEqual(r.status, 202)
        XCTAssertEqual(
            try group.post("/v2/events", body: Data(batch(mpid: "6", n: 2).utf8), user: "beta-key", password: "acme-secret").status, 403)
        // acme's own batch marks the end: beta's never reaches acme's topic.
        XCTAssertEqual(
            try group.post("/v2/events", body: Data(batch(mpid: "7", n: 3).utf8), user: "acme-key", password: "acme-secret").status, 202)
        let messages = try consume(group, expecting: 1)
        XCTAssertEqual(messages.map(\.key), ["7"])
    }

    func testAcceptedWhileKafkaOutIsDownArrivesWhenItStarts() throws {
        let group = try makeGroup()
        try group.startDevCluster(topics: ["acme-events:2"])
        try group.start("router")
        try group.startIngest()
        // Not ready (no output to deliver with), yet what arrives is stored and answered 202.
        XCTAssertTrue(eventually { (try? group.get("/readyz").status) == 503 })
        for i in 0..<5 {
            let r = try group.post("/v2/events", body: Data(batch(mpid: "\(i)", n: i).utf8), user: "acme-key", password: "acme-secret")
            XCTAssertEqual(r.status, 202)
        }
        try group.start("kafka-out")
        XCTAssertEqual(try consume(group, expecting: 5).count, 5, group.logs())
    }

    func testWhileTheRouterIsDownBatchesAreSpooledAndDeliveredWhenItIsBack() throws {
        let group = try makeGroup()
        try group.startAll(topics: ["acme-events:2"])
        group.stop("router", signal: SIGKILL)
        XCTAssertTrue(eventually { (try? group.get("/readyz").status) == 503 }, "not ready without a router")
        for i in 0..<3 {
            let r = try group.post("/v2/events", body: Data(batch(mpid: "\(i)", n: i).utf8), user: "acme-key", password: "acme-secret")
            XCTAssertEqual(r.status, 202, "stored durably, so accepted: \(r.body)")
        }
        try group.start("router")
        XCTAssertTrue(eventually { (try? group.get("/readyz").status) == 200 })
        XCTAssertEqual(try consume(group, expecting: 3).count, 3, group.logs())
    }

    func testFullSpoolAnswers429AndRecovers() throws {
        let group = try ProcessGroup(config: ProcessGroup.acmeConfig(topic: "acme-events", ingest: "{spool_max_bytes: 65536}"))
        try group.startDevCluster(topics: ["acme-events:1"])
        try group.start("router")
        try group.startIngest()  // no kafka-out: nothing leaves the spool
        let pad = String(repeating: "x", count: 30_000)
        let big = #"{"environment":"production","mpid":1,"pad":"\#(pad)"}"#
        var statuses: [Int] = []
        var retryAfter: String?
        for _ in 0..<4 {
            let r = try group.post("/v2/events", body: Data(big.utf8), user: "acme-key", password: "acme-secret")
            statuses.append(r.status)
            if r.status == 429 { retryAfter = r.headers["retry-after"] }
        }
        XCTAssertEqual(statuses, [202, 202, 429, 429], group.logs())
        XCTAssertNotNil(retryAfter)
        XCTAssertTrue(eventually { (try? group.get("/readyz").status) == 503 }, "not ready while full")
        // An output drains the spool, and ingest takes batches again by itself.
        try group.start("kafka-out")
        XCTAssertEqual(try consume(group, expecting: 2).count, 2)
        XCTAssertTrue(eventually { (try? group.get("/readyz").status) == 200 }, group.logs())
        XCTAssertEqual(try group.post("/v2/events", body: Data(big.utf8), user: "acme-key", password: "acme-secret").status, 202)
    }

    func testGarbageOnTheRouterSocketDoesNotHurtTheRouter() throws {
        let group = try makeGroup()
        try group.startAll(topics: ["acme-events:2"])
        for garbage in [Array("\u{0}\u{0}\u{0}\u{3}abc".utf8), [0xFF, 0xFF, 0xFF, 0xFF], Array("{\"type\":\"hello\"}".utf8)] {
            let fd = try connectUnix(group.runDir + "/router.sock")
            garbage.withUnsafeBytes { _ = write(fd, $0.baseAddress, $0.count) }
            var buffer = [UInt8](repeating: 0, count: 4096)
            var tv = timeval(tv_sec: 5, tv_usec: 0)
            setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
            _ = read(fd, &buffer, buffer.count)
            close(fd)
        }
        XCTAssertTrue(group.process("router")?.isRunning == true, group.logs())
        let r = try group.post("/v2/events", body: Data(batch(mpid: "9", n: 9).utf8), user: "acme-key", password: "acme-secret")
        XCTAssertEqual(r.status, 202)
        XCTAssertEqual(try consume(group, expecting: 1).count, 1)
    }

    func testSIGTERMStopsEveryProcessCleanly() throws {
        let group = try makeGroup()
        try group.startAll(topics: ["acme-events:2"])
        try group.start("keen-out")
        XCTAssertTrue(eventually { group.logs().contains("peer.role=keen-out") }, "keen-out registered with the router")
        XCTAssertEqual(
            try group.post("/v2/events", body: Data(batch(mpid: "3", n: 3).utf8), user: "acme-key", password: "acme-secret").status, 202)
        for name in ["ingest", "keen-out", "kafka-out", "router", "dev-cluster"] {
            XCTAssertEqual(group.stop(name, signal: SIGTERM), 0, "\(name) exits cleanly on SIGTERM\n\(group.logs())")
        }
        XCTAssertFalse(FileManager.default.fileExists(atPath: group.runDir + "/router.sock"), "the router removes its socket")
        XCTAssertTrue(group.logs().contains("ingest stopping deliveries.unanswered=0"), "ingest waited for the router's answers")
    }

    func testInvalidConfigIsRefusedAtStartWithAPreciseMessage() throws {
        let group = try ProcessGroup(
            config: "tenants:\n  t1:\n    api_key: k\n    api_secret: s\n    destinations:\n      d1: {kind: kafka, bootstrap_servers: 'h:1', topic: x, password: p}\n")
        let router = try group.start("router")
        router.waitUntilExit()
        XCTAssertEqual(router.terminationStatus, 78)
        let log = group.logs()
        XCTAssertTrue(log.contains("tenant 't1', destination 'd1', field 'password'"), log)
    }
}

/// One command to the dev cluster's control socket (down, up, rtt MS, errors API CODE…); its answer.
func devClusterControl(_ group: ProcessGroup, _ command: String) throws -> String {
    let fd = try connectUnix(group.runDir + "/dev-cluster.control")
    defer { close(fd) }
    _ = (command + "\n").withCString { write(fd, $0, strlen($0)) }
    var buffer = [UInt8](repeating: 0, count: 256)
    let n = read(fd, &buffer, buffer.count)
    return String(decoding: buffer[0..<max(0, n)], as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)
}

func connectUnix(_ path: String) throws -> Int32 {
    let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
    var addr = sockaddr_un()
    addr.sun_family = sa_family_t(AF_UNIX)
    withUnsafeMutableBytes(of: &addr.sun_path) { raw in for (i, b) in path.utf8.enumerated() { raw[i] = b } }
    let rc = withUnsafePointer(to: &addr) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
    }
    guard rc == 0 else { close(fd); throw POSIXError(.ECONNREFUSED) }
    return fd
}

/// mParticle's official Python server SDK, pointed at ingest, works unchanged.
final class SDKCompatibilityTests: XCTestCase {
    func testOfficialPythonSDK() throws {
        let check = try runCommand("/usr/bin/env", ["python3", "-c", "import mparticle"])
        try XCTSkipIf(check.status != 0 && ProcessInfo.processInfo.environment["CI"] == nil,
            "the mparticle package (PyPI) is not installed; deploy/sluice test installs it")
        XCTAssertEqual(check.status, 0, "the mparticle package must be installed in CI")
        setenv("BETA_SECRET_UNUSED_FALLBACK", "beta-secret", 1)
        let group = try ProcessGroup(config: PipelineTests.config)
        try group.startAll(topics: ["acme-events:4"])
        let script = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .appendingPathComponent("tools/mparticle_sdk_client.py").path
        let result = try runCommand("/usr/bin/env", ["python3", script, "http://127.0.0.1:\(group.port)/v2", "acme-key", "acme-secret"])
        XCTAssertEqual(result.status, 0, result.err + group.logs())
        let mpids = result.out.split(separator: "\n").map(String.init)
        XCTAssertEqual(mpids.count, 3)
        var messages: [ConsumedMessage] = []
        _ = try eventually(timeout: 60) {
            messages = try Kcat.consume(bootstrap: group.bootstrapServers, topic: "acme-events")
            return messages.count >= 3
        }
        XCTAssertEqual(Set(messages.compactMap(\.key)), Set(mpids), group.logs())
        for m in messages {
            XCTAssertTrue(m.value.contains("\"mpid\": \(m.key!)") || m.value.contains("\"mpid\":\(m.key!)"), m.value)
            XCTAssertTrue(m.value.contains("session_start"), m.value)
        }
    }
}
