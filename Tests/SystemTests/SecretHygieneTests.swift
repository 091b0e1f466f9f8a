import Foundation
import TestSupport
import XCTest

/// No secret — API secrets, Basic credentials, Kafka passwords, private keys — ever shows in the
/// logs, not even at debug level, and not in error answers, metrics or status.
final class SecretHygieneTests: XCTestCase {
    let apiSecret = "Ingest-Secret-4f9a"
    let kafkaPassword = "Kafka-Pw-77c1"
    let keyMaterial = "PRIVATEKEYMATERIAL0123456789abcdefgh"

    func testSecretsNeverAppearInLogsOrErrors() throws {
        let keyPEM = "-----BEGIN PRIVATE KEY-----\\n\(keyMaterial)\\n-----END PRIVATE KEY-----"
        let certPEM = "-----BEGIN CERTIFICATE-----\\nMIIBfake\\n-----END CERTIFICATE-----"
        let group = try ProcessGroup(config: """
            tenants:
              acme:
                api_key: acme-key
                api_secret: \(apiSecret)
                destinations:
                  local: {kind: kafka, bootstrap_servers: dev, plaintext: true, topic: ok-events}
                  remote:
                    kind: kafka
                    bootstrap_servers: 127.0.0.1:1
                    topic: remote-events
                    username: sluice
                    password: \(kafkaPassword)
                    sasl_mechanism: SCRAM-SHA-512
                    ssl_private_key: "\(keyPEM)"
                    ssl_certificate: "\(certPEM)"
            """)
        try group.startAll(topics: ["ok-events:1"])
        let body = Data(#"{"environment":"production","mpid":1,"events":[]}"#.utf8)
        var answers: [String] = []
        answers.append(try group.post("/v2/events", body: body, user: "acme-key", password: apiSecret).body)
        answers.append(try group.post("/v2/events", body: body, user: "acme-key", password: apiSecret + "x").body)
        answers.append(try group.post("/v2/events", body: Data("{bad".utf8), user: "acme-key", password: apiSecret).body)
        // Wait until the bad destination has been tried and failed (its key cannot be loaded).
        XCTAssertTrue(eventually(timeout: 30) { group.logs().contains("delivery failed") }, group.logs())
        // The healthy destination delivers on its own lane, whatever the broken one does.
        var delivered = 0
        _ = try eventually(timeout: 60) {
            delivered = try Kcat.consume(bootstrap: group.bootstrapServers, topic: "ok-events").count
            return delivered >= 1
        }
        XCTAssertEqual(delivered, 1)

        // Metrics and status too (the status shows each destination's last error).
        answers.append(try group.get("/metrics").body)
        let status = try runCommand(
            BuiltProducts.path("ingest"), ["status", "--run-dir", group.runDir, "--config", group.configPath], timeout: 30)
        XCTAssertTrue(status.out.contains("remote"), status.out + status.err)
        answers.append(status.out + status.err)
        let statusJSON = try runCommand(
            BuiltProducts.path("ingest"), ["status", "--json", "--run-dir", group.runDir, "--config", group.configPath], timeout: 30)
        answers.append(statusJSON.out + statusJSON.err)

        let basic = Data("acme-key:\(apiSecret)".utf8).base64EncodedString()
        let haystack = group.logs() + answers.joined(separator: "\n")
        for secret in [apiSecret, kafkaPassword, keyMaterial, basic, "BEGIN PRIVATE KEY"] {
            XCTAssertFalse(haystack.contains(secret), "secret '\(secret)' leaked:\n\(haystack)")
        }
    }
}
