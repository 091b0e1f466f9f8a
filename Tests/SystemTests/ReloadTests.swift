import Foundation
import TestSupport
import XCTest

#if canImport(Glibc)
import Glibc
#endif

/// Destinations swap per tenant, live: the config is reloaded on file change and on SIGHUP.
final class ReloadTests: XCTestCase {
    func config(topic: String, secret: String, extra: String = "") -> String {
        """
        tenants:
          acme:
            api_key: acme-key
            api_secret: \(secret)
            destinations:
              main: {kind: kafka, bootstrap_servers: dev, plaintext: true, topic: \(topic)}
        \(extra)
        """
    }

    func post(_ group: ProcessGroup, id: Int, user: String = "acme-key", password: String) throws -> Int {
        let body = #"{"environment":"production","batch_id":\#(id),"mpid":\#(id % 7)}"#
        return try group.post("/v2/events", body: Data(body.utf8), user: user, password: password).status
    }

    func ids(_ group: ProcessGroup, _ topic: String) throws -> Set<Int> {
        Set(
            try Kcat.consume(bootstrap: group.bootstrapServers, topic: topic).compactMap { m in
                (try? JSONSerialization.jsonObject(with: Data(m.value.utf8)) as? [String: Any])?["batch_id"] as? Int
            })
    }

    func testSwapTopicRotateSecretAddTenantUnderLoadAndRejectABadConfig() throws {
        let group = try ProcessGroup(config: config(topic: "before", secret: "s1"))
        try group.startAll(topics: ["before:2", "after:2", "globex:1"])
        let secret = NSLockedSecret("s1")
        let load = UserLoad(group: group, users: 6, threads: 2, password: { secret.value })
        load.start()
        usleep(1_000_000)

        // The file changes: new topic, rotated secret, a new tenant. No signal: the file is watched.
        try group.writeConfig(
            config(
                topic: "after", secret: "s2",
                extra: """
                      globex:
                        api_key: globex-key
                        api_secret: g1
                        destinations:
                          main: {kind: kafka, bootstrap_servers: dev, plaintext: true, topic: globex}
                    """))
        XCTAssertTrue(eventually(timeout: 15) { (try? self.post(group, id: 900_001, password: "s2")) == 202 }, group.logs())
        secret.value = "s2"
        XCTAssertEqual(try post(group, id: 900_002, password: "s1"), 403, "the old secret no longer works")
        XCTAssertEqual(try post(group, id: 900_003, user: "globex-key", password: "g1"), 202, "the new tenant is served")
        usleep(1_500_000)

        // A broken config is rejected whole; the running one stays in force.
        try group.writeConfig(config(topic: "after", secret: "s3") + "\n    bogus_field: 1\n")
        group.signal("router", SIGHUP)
        group.signal("ingest", SIGHUP)
        var status: [String: Any] = [:]
        XCTAssertTrue(
            try eventually(timeout: 15) {
                status = try group.status()
                return ((status["config"] as? [String: Any])?["last_error"] as? String) != nil
            }, "\(status)")
        let error = (status["config"] as? [String: Any])?["last_error"] as? String ?? ""
        XCTAssertTrue(error.contains("sluice.yaml"), "the error names the file: \(error)")
        XCTAssertTrue(group.logs().contains("config reload rejected"))
        XCTAssertEqual(try post(group, id: 900_004, password: "s2"), 202, "still running on the last good config")
        XCTAssertEqual(try post(group, id: 900_005, password: "s3"), 403)
        usleep(500_000)
        load.stop()

        // Everything accepted arrived, before the swap in `before`, after it in `after`.
        var problems: [String] = []
        XCTAssertTrue(
            try eventually(timeout: 60) {
                let before = try Kcat.consume(bootstrap: group.bootstrapServers, topic: "before")
                let after = try Kcat.consume(bootstrap: group.bootstrapServers, topic: "after")
                problems = load.verify(before, after).problems
                let afterIDs = try ids(group, "after")
                return problems.isEmpty && afterIDs.isSuperset(of: [900_001, 900_004])
            }, "\(problems.prefix(5))")
        XCTAssertEqual(try ids(group, "globex"), [900_003])
        XCTAssertFalse(try ids(group, "before").contains(900_001), "batches accepted after the reload go to the new topic")
        XCTAssertGreaterThan(try ids(group, "before").count, 0)
        let metrics = try group.get("/metrics").body
        XCTAssertTrue(metrics.contains(#"sluice_config_reloads_total{result="applied"} 1"#), metrics)
        XCTAssertTrue(metrics.contains(#"sluice_config_reloads_total{result="rejected"}"#), metrics)
    }

    /// A destination removed while its broker is down keeps its backlog and delivers it when the
    /// broker is back.
    func testARemovedDestinationDrainsItsBacklog() throws {
        let both = config(topic: "keep", secret: "s1").replacingOccurrences(
            of: "      main:", with: "      side: {kind: kafka, bootstrap_servers: dev, plaintext: true, topic: side}\n      main:")
        let group = try ProcessGroup(config: both)
        try group.startAll(topics: ["keep:1", "side:1"])
        XCTAssertEqual(try devClusterControl(group, "down"), "ok")
        for id in 1...20 { XCTAssertEqual(try post(group, id: id, password: "s1"), 202) }
        try group.writeConfig(config(topic: "keep", secret: "s1"))
        group.signal("router", SIGHUP)
        group.signal("ingest", SIGHUP)
        var status: [String: Any] = [:]
        XCTAssertTrue(
            try eventually(timeout: 15) {
                status = try group.status()
                let side = (status["destinations"] as? [[String: Any]])?.first { $0["destination"] as? String == "side" }
                return side?["state"] as? String == "removed"
            }, "\(status)")
        XCTAssertEqual(try devClusterControl(group, "up"), "ok")
        XCTAssertTrue(try eventually(timeout: 60) { try ids(group, "side") == Set(1...20) }, group.logs().suffix(5000).description)
        XCTAssertTrue(try eventually(timeout: 30) { try ids(group, "keep") == Set(1...20) })
        for id in 21...25 { XCTAssertEqual(try post(group, id: id, password: "s1"), 202) }
        XCTAssertTrue(try eventually(timeout: 30) { try ids(group, "keep").isSuperset(of: Set(21...25)) })
        XCTAssertTrue(try ids(group, "side").isDisjoint(with: Set(21...25)), "new batches do not go to the removed destination")
    }
}

final class NSLockedSecret: @unchecked Sendable {
    private let lock = NSLock()
    private var current: String
    init(_ v: String) { current = v }
    var value: String {
        get { lock.withLock { current } }
        set { lock.withLock { current = newValue } }
    }
}
