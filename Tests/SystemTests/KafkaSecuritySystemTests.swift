import Foundation
import TestSupport
import XCTest

/// Seed 000, "Authentication", proven against real TLS handshakes and librdkafka's own SASL client:
/// kafka-out talks to TLS+SASL fronts (Tests/tools/kafka_front.py) in front of the dev cluster.
final class KafkaSecuritySystemTests: XCTestCase {
    /// The front's own codec checks (message versions the mock cluster never sends, SCRAM vectors).
    func testFrontSelfTest() throws {
        let result = try runCommand("/usr/bin/env", ["python3", TestTools.directory.appendingPathComponent("kafka_front.py").path, "--self-test"])
        XCTAssertEqual(result.status, 0, result.out + result.err)
    }

    func testEachAuthenticationRule() throws {
        let group = try ProcessGroup(config: "tenants: {}\n")
        try group.startDevCluster()
        let certs = group.runDir + "/certs"
        try TestTools.makeCertificates(in: certs)
        let upstream = group.bootstrapServers
        let users = ["sluice": "right-password"]
        // SASL with all three mechanisms, server certificate for localhost/127.0.0.1.
        // It also plays a cluster without the topic `sec-notopic` (and without auto-creation).
        let sasl = try KafkaFront(
            upstream: upstream, certificate: "\(certs)/server.pem", key: "\(certs)/server.key", users: users,
            missingTopics: ["sec-notopic"], workDir: group.runDir, name: "front-sasl")
        // A certificate for another host name.
        let wrongHost = try KafkaFront(
            upstream: upstream, certificate: "\(certs)/wronghost.pem", key: "\(certs)/wronghost.key", users: users,
            workDir: group.runDir, name: "front-wronghost")
        // TLS only, client certificate required.
        let mtls = try KafkaFront(
            upstream: upstream, certificate: "\(certs)/server.pem", key: "\(certs)/server.key", users: [:],
            clientCA: "\(certs)/ca.pem", sasl: false, workDir: group.runDir, name: "front-mtls")

        func destination(_ name: String, _ front: KafkaFront, _ extra: String) -> String {
            """
                  \(name):
                    kind: kafka
                    bootstrap_servers: "\(front.bootstrapServers)"
                    topic: sec-\(name)
                    ssl_ca_certificate: {file: \(certs)/ca.pem}
            \(extra.split(separator: "\n").map { "        " + $0 }.joined(separator: "\n"))
            """
        }
        let clientCert = "ssl_certificate: {file: \(certs)/client.pem}\nssl_private_key: {file: \(certs)/client.key}"
        let config = """
            tenants:
              acme:
                api_key: acme-key
                api_secret: acme-secret
                destinations:
            \(destination("plain", sasl, "username: sluice\npassword: right-password"))
            \(destination("scram256", sasl, "username: sluice\npassword: right-password\nsasl_mechanism: SCRAM-SHA-256"))
            \(destination("scram512", sasl, "username: sluice\npassword: right-password\nsasl_mechanism: SCRAM-SHA-512"))
            \(destination("wrongpw", sasl, "username: sluice\npassword: wrong-password\nsasl_mechanism: SCRAM-SHA-512"))
            \(destination("mtls", mtls, clientCert))
            \(destination("nocert", mtls, ""))
            \(destination("wronghost", wrongHost, "username: sluice\npassword: right-password"))
            \(destination("notopic", sasl, "username: sluice\npassword: right-password"))
                  unknownca:
                    kind: kafka
                    bootstrap_servers: "\(sasl.bootstrapServers)"
                    topic: sec-unknownca
                    username: sluice
                    password: right-password
                    ssl_ca_certificate: {file: \(certs)/other-ca.pem}
                  unreachable:
                    kind: kafka
                    bootstrap_servers: "127.0.0.1:1"
                    topic: sec-unreachable
                  systemtrust:
                    kind: kafka
                    bootstrap_servers: "\(sasl.bootstrapServers)"
                    topic: sec-systemtrust
                    username: sluice
                    password: right-password
            """
        try group.writeConfig(config)
        try group.start("router")
        // Without `ssl_ca_certificate` the system trust store decides; here it is OpenSSL's default
        // file, pointed at the test CA (as a host would have its own CA installed).
        try group.start("kafka-out", environment: ["SSL_CERT_FILE": "\(certs)/ca.pem"])
        try group.startIngest()
        XCTAssertTrue(eventually { (try? group.get("/readyz").status) == 200 })
        let body = Data(#"{"environment":"production","mpid":-42,"events":[]}"#.utf8)
        XCTAssertEqual(try group.post("/v2/events", body: body, user: "acme-key", password: "acme-secret").status, 202)

        // Right credentials deliver, through each mechanism, and with a client certificate.
        for name in ["plain", "scram256", "scram512", "mtls", "systemtrust"] {
            var messages: [ConsumedMessage] = []
            _ = try eventually(timeout: 60) {
                messages = try Kcat.consume(bootstrap: upstream, topic: "sec-\(name)")
                return !messages.isEmpty
            }
            XCTAssertEqual(messages.map(\.key), ["-42"], "\(name) delivers\n\(group.logs())")
        }

        // The failures are reported clearly, naming the destination and how it connects.
        let expectations: [(destination: String, text: String)] = [
            ("acme/wrongpw", "SASL authentication error"),
            ("acme/unknownca", "certificate verify failed"),
            ("acme/wronghost", "certificate verify failed"),
            ("acme/nocert", "certificate required"),
        ]
        for e in expectations {
            let found = eventually(timeout: 60) {
                group.logs().split(separator: "\n").contains { $0.contains(e.text) && $0.contains("destination=\(e.destination)") }
            }
            XCTAssertTrue(found, "\(e.destination): '\(e.text)' in the kafka-out log\n\(group.logs())")
        }
        XCTAssertTrue(group.logs().contains("kafka.sasl_mechanism=SCRAM-SHA-512"), "the mechanism is named")
        // ... and `status` shows them per destination.
        let shown: [(destination: String, text: String)] = [
            ("wrongpw", "SASL authentication error"), ("unknownca", "certificate verify failed"),
            ("unreachable", "Connection refused"),
            // librdkafka gives a missing topic 30 s (topic.metadata.propagation.max.ms) to appear.
            ("notopic", "Unknown topic"),
        ]
        var status: [String: Any] = [:]
        for e in shown {
            let found = try eventually(timeout: 60) {
                status = try group.status()
                let row = (status["destinations"] as? [[String: Any]])?.first { $0["destination"] as? String == e.destination }
                return (row?["last_error"] as? String)?.contains(e.text) == true
            }
            XCTAssertTrue(found, "\(e.destination): '\(e.text)' in status\n\(status)")
        }
        // A missing topic is not retried for ever: the batch is dead-lettered for that destination.
        XCTAssertTrue(
            try eventually(timeout: 30) {
                status = try group.status()
                let row = (status["destinations"] as? [[String: Any]])?.first { $0["destination"] as? String == "notopic" }
                return row?["dead_letters"] as? Int == 1
            }, "\(status)")
        // Nothing was delivered (or acknowledged) for them.
        for name in ["wrongpw", "unknownca", "wronghost", "nocert"] {
            XCTAssertEqual(try Kcat.consume(bootstrap: upstream, topic: "sec-\(name)").count, 0, name)
        }
        XCTAssertFalse(group.logs().contains("wrong-password"), "no password in the logs")
        XCTAssertFalse(group.logs().contains("right-password"), "no password in the logs")
        withExtendedLifetime([sasl, wrongHost, mtls]) {}
    }
}
