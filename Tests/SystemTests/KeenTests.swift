import Foundation
import TestSupport
import XCTest

/// Keen destinations, both transports, through the real processes.
final class KeenTests: XCTestCase {
    /// The emulator's own checks of Keen's rules (runs its unittest suite).
    func testEmulatorSelfTest() throws {
        let result = try runCommand(
            "/usr/bin/env", ["python3", TestTools.directory.appendingPathComponent("keen_emulator.py").path, "--self-test"],
            timeout: 120)
        XCTAssertEqual(result.status, 0, result.out + result.err)
    }

    func batch(events: [String], mpid: Int = 77, batchID: Int = 1) -> Data {
        Data(#"{"environment":"production","mpid":\#(mpid),"batch_id":\#(batchID),"device_info":{"platform":"iOS"},"events":[\#(events.joined(separator: ","))]}"#.utf8)
    }

    func custom(_ name: String, id: String, extra: String = "") -> String {
        #"{"event_type":"custom_event","data":{"event_name":"\#(name)","custom_event_type":"other","source_message_id":"\#(id)","timestamp_unixtime_ms":1700000000000,"custom_attributes":{"$plan":"gold","Version3.1":true\#(extra)}}}"#
    }

    func destinationRow(_ group: ProcessGroup, _ name: String) throws -> [String: Any]? {
        (try group.status()["destinations"] as? [[String: Any]])?.first { $0["destination"] as? String == name }
    }

    /// Kafka transport: SASL_SSL PLAIN with project id / key (through the TLS+SASL front), one
    /// JSON object per event in the collection's topic; oversize events are never sent.
    func testKafkaTransportThroughSASLFront() throws {
        let group = try ProcessGroup(config: "tenants: {}\n")
        try group.startDevCluster()
        let certs = group.runDir + "/certs"
        try TestTools.makeCertificates(in: certs)
        let front = try KafkaFront(
            upstream: group.bootstrapServers, certificate: "\(certs)/server.pem", key: "\(certs)/server.key",
            users: [KeenEmulator.project: KeenEmulator.writeKey], workDir: group.runDir, name: "front-keen")
        try group.writeConfig(
            """
            ingest: {max_batch_bytes: 2000000, max_request_bytes: 2100000}
            tenants:
              acme:
                api_key: acme-key
                api_secret: acme-secret
                destinations:
                  keen:
                    kind: keen
                    project_id: \(KeenEmulator.project)
                    key: \(KeenEmulator.writeKey)
                    collection: mparticle.{event_type}
                    bootstrap_servers: "\(front.bootstrapServers)"
                    ssl_ca_certificate: {file: \(certs)/ca.pem}
            """)
        try group.start("router")
        try group.start("keen-out")
        try group.startIngest()
        XCTAssertTrue(eventually { (try? group.get("/readyz").status) == 200 }, group.logs())
        let huge = String(repeating: "z", count: 950_000)
        let body = batch(events: [
            custom("Buy", id: "m-1"), #"{"event_type":"screen_view","data":{"screen_name":"Home"}}"#,
            custom("Huge", id: "m-3", extra: #","blob":"\#(huge)""#),
        ])
        XCTAssertEqual(try group.post("/v2/events", body: body, user: "acme-key", password: "acme-secret").status, 202)

        var custom: [ConsumedMessage] = []
        XCTAssertTrue(
            try eventually(timeout: 60) {
                custom = try Kcat.consume(bootstrap: group.bootstrapServers, topic: "mparticle.custom_event")
                return !custom.isEmpty
            }, group.logs())
        XCTAssertEqual(custom.count, 1, "the oversize event is never sent")
        let event = try XCTUnwrap(JSONSerialization.jsonObject(with: Data(custom[0].value.utf8)) as? [String: Any])
        XCTAssertEqual(event["event_name"] as? String, "Buy")
        XCTAssertEqual((event["keen"] as? [String: Any])?["uniqueness_token"] as? String, "m-1")
        XCTAssertEqual((event["keen"] as? [String: Any])?["timestamp"] as? String, "2023-11-14T22:13:20.000Z")
        XCTAssertEqual(((event["custom_attributes"] as? [String: Any])?["mp_plan"]) as? String, "gold")
        XCTAssertEqual(((event["custom_attributes"] as? [String: Any])?["Version3_1"]) as? Bool, true)
        XCTAssertEqual(custom[0].key, "77", "keyed by MPID")
        XCTAssertEqual(try Kcat.consume(bootstrap: group.bootstrapServers, topic: "mparticle.screen_view").count, 1)
        // The oversize event is reported: a dead letter with the reason, shown by status.
        var row: [String: Any]?
        XCTAssertTrue(
            try eventually(timeout: 30) {
                row = try destinationRow(group, "keen")
                return row?["dead_letters"] as? Int == 1
            }, "\(String(describing: row))")
        XCTAssertTrue((row?["last_error"] as? String ?? "").contains("900000"), "\(String(describing: row))")
        XCTAssertFalse(group.logs().contains(KeenEmulator.writeKey), "the key is never logged")
        withExtendedLifetime(front) {}
    }

    /// HTTP transport against the emulator: per-event results, a retryable failure retried, a
    /// permanent one dead-lettered, whole-request failures retried; `keen-out verify`.
    func testHTTPTransportPartialFailuresRetriesAndVerify() throws {
        let group = try ProcessGroup(config: "tenants: {}\n")
        let keen = try KeenEmulator(workDir: group.runDir)
        try group.writeConfig(
            """
            tenants:
              acme:
                api_key: acme-key
                api_secret: acme-secret
                destinations:
                  keen:
                    kind: keen
                    transport: http
                    http_base_url: \(keen.baseURL)
                    project_id: \(KeenEmulator.project)
                    key: \(KeenEmulator.writeKey)
                    collection: purchases
            """)
        // One event fails once (retryable), one is refused for good, and the first two requests
        // fail whole (503).
        try keen.control(
            #"{"fail_events":[{"property":"keen.uniqueness_token","equals":"m-2","times":1,"error":{"name":"InternalServerError","description":"try again"}},{"property":"event_name","equals":"Bad","error":{"name":"InvalidPropertyValueError","description":"no"}}],"fail_next":{"count":2,"status":503,"scope":"events"}}"#
        )
        try group.start("router")
        try group.start("keen-out")
        try group.startIngest()
        XCTAssertTrue(eventually { (try? group.get("/readyz").status) == 200 }, group.logs())
        let body = batch(events: [custom("Buy", id: "m-1"), custom("Again", id: "m-2"), custom("Bad", id: "m-3"), custom("More", id: "m-4")])
        XCTAssertEqual(try group.post("/v2/events", body: body, user: "acme-key", password: "acme-secret").status, 202)

        var stored: [[String: Any]] = []
        XCTAssertTrue(
            try eventually(timeout: 60) {
                stored = try keen.events("purchases")
                return stored.count == 3
            }, "\(stored)\n\(group.logs().suffix(4000))")
        let names = Set(stored.compactMap { $0["event_name"] as? String })
        XCTAssertEqual(names, ["Buy", "Again", "More"], "the refused event is not stored; the others are, once")
        var row: [String: Any]?
        XCTAssertTrue(
            try eventually(timeout: 30) {
                row = try destinationRow(group, "keen")
                return row?["dead_letters"] as? Int == 1
            }, "\(String(describing: row))")
        let dead = try runCommand(
            BuiltProducts.path("ingest"), ["dead-letters", "list", "--json", "--spool-dir", group.runDir + "/spool"], timeout: 30)
        XCTAssertTrue(dead.out.contains("InvalidPropertyValueError"), "the dead letter says why: \(dead.out) \(dead.err)")
        XCTAssertTrue(group.logs().contains("delivery failed, will retry"), "the 503s and the retryable event were retried")

        // verify: the count query finds what arrived, and not what did not.
        func verify(_ tokens: [String]) throws -> Int32 {
            let arguments =
                ["verify", "--project", KeenEmulator.project, "--collection", "purchases", "--base-url", keen.baseURL]
                + tokens.flatMap { ["--token", $0] }
            let p = Process()
            p.executableURL = URL(fileURLWithPath: BuiltProducts.path("keen-out"))
            p.arguments = arguments
            p.environment = ["KEEN_READ_KEY": KeenEmulator.readKey]
            p.standardOutput = FileHandle.nullDevice
            try p.run()
            p.waitUntilExit()
            return p.terminationStatus
        }
        XCTAssertEqual(try verify(["m-1", "m-2", "m-4"]), 0)
        XCTAssertEqual(try verify(["m-1", "m-3"]), 1, "m-3 was refused: not all arrived")
        XCTAssertFalse(group.logs().contains(KeenEmulator.writeKey), "the key is never logged")
    }

    /// HTTPS with verification: the emulator's certificate is trusted only through the configured CA.
    func testHTTPSVerifiesTheServerCertificate() throws {
        let group = try ProcessGroup(config: "tenants: {}\n")
        let certs = group.runDir + "/certs"
        try TestTools.makeCertificates(in: certs)
        let keen = try KeenEmulator(workDir: group.runDir, tls: ("\(certs)/server.pem", "\(certs)/server.key"))
        func destination(_ name: String, ca: String) -> String {
            """
                  \(name):
                    kind: keen
                    transport: http
                    http_base_url: \(keen.baseURL)
                    project_id: \(KeenEmulator.project)
                    key: \(KeenEmulator.writeKey)
                    collection: \(name)
                    ssl_ca_certificate: {file: \(certs)/\(ca)}
            """
        }
        try group.writeConfig(
            """
            tenants:
              acme:
                api_key: acme-key
                api_secret: acme-secret
                destinations:
            \(destination("trusted", ca: "ca.pem"))
            \(destination("untrusted", ca: "other-ca.pem"))
            """)
        try group.start("router")
        try group.start("keen-out")
        try group.startIngest()
        XCTAssertTrue(eventually { (try? group.get("/readyz").status) == 200 }, group.logs())
        XCTAssertEqual(
            try group.post("/v2/events", body: batch(events: [custom("Buy", id: "t-1")]), user: "acme-key", password: "acme-secret").status,
            202)
        var trusted: [String: Any]?
        var untrusted: [String: Any]?
        XCTAssertTrue(
            try eventually(timeout: 30) {
                trusted = try destinationRow(group, "trusted")
                untrusted = try destinationRow(group, "untrusted")
                return trusted?["delivered"] as? Int == 1 && (untrusted?["last_error"] as? String) != nil
            }, "\(String(describing: trusted)) \(String(describing: untrusted))")
        XCTAssertEqual(untrusted?["delivered"] as? Int, 0)
        let error = untrusted?["last_error"] as? String ?? ""
        XCTAssertTrue(error.contains("certificate") || error.contains("SSL"), error)
    }
}
