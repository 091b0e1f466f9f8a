import Foundation
import XCTest

@testable import Shared

final class ConfigTests: XCTestCase {
    let valid = """
        ingest:
          listen: 0.0.0.0:9090
          max_batch_bytes: 65536
          max_answer_hold_ms: 50
          spool_commit_delay_us: 250
        tenants:
          acme:
            api_key: acme-key
            api_secret: {env: ACME_SECRET}
            destinations:
              main:
                kind: kafka
                bootstrap_servers: "k1.example.com:9093, k2.example.com:9093"
                topic: acme.events
                username: sluice
                password: {file: PWFILE}
                sasl_mechanism: SCRAM-SHA-512
          dev:
            api_key: dev-key
            api_secret: s3cret
            destinations:
              local: {kind: kafka, bootstrap_servers: dev, topic: dev-events, plaintext: true}
        """

    func parse(_ yaml: String, env: [String: String] = [:]) throws -> SluiceConfig {
        try SluiceConfig.parse(yaml: yaml, file: "test.yaml", environment: env)
    }

    func testValidConfig() throws {
        let pw = FileManager.default.temporaryDirectory.appendingPathComponent("pw-\(UUID())").path
        try "hunter2\n".write(toFile: pw, atomically: true, encoding: .utf8)
        let config = try parse(valid.replacingOccurrences(of: "PWFILE", with: pw), env: ["ACME_SECRET": "from-env"])
        XCTAssertEqual(config.ingest.host, "0.0.0.0")
        XCTAssertEqual(config.ingest.port, 9090)
        XCTAssertEqual(config.ingest.maxBatchBytes, 65536)
        XCTAssertEqual(config.ingest.maxRequestBytes, 256 * 1024)
        XCTAssertEqual(config.ingest.maxAnswerHoldMs, 50)
        XCTAssertEqual(IngestSettings().maxAnswerHoldMs, 0, "off unless asked for")
        XCTAssertEqual(config.ingest.spoolCommitDelayUs, 250)
        XCTAssertEqual(IngestSettings().spoolCommitDelayUs, 1000)
        XCTAssertEqual(config.tenants.map(\.id), ["acme", "dev"])
        let acme = config.tenant(id: "acme")!
        XCTAssertEqual(acme.apiSecret.value, "from-env")
        guard case .kafka(let k) = acme.destinations[0].kind else { return XCTFail() }
        XCTAssertEqual(k.password?.value, "hunter2", "the trailing newline of a secret file is not part of the secret")
        XCTAssertEqual(k.saslMechanism, .scramSHA512)
        XCTAssertFalse(k.plaintext)
        XCTAssertTrue(config.usesDevCluster)
        XCTAssertEqual("\(k.password!)", "<redacted>")
    }

    /// Each error names the file, the tenant, the destination and the field.
    func assertError(
        _ yaml: String, env: [String: String] = [:], contains parts: [String], file: StaticString = #filePath, line: UInt = #line
    ) {
        XCTAssertThrowsError(try parse(yaml, env: env), file: file, line: line) { error in
            let text = "\(error)"
            XCTAssertTrue(text.hasPrefix("test.yaml"), text, file: file, line: line)
            for p in parts { XCTAssertTrue(text.contains(p), "'\(p)' not in: \(text)", file: file, line: line) }
        }
    }

    func kafka(_ body: String) -> String {
        """
        tenants:
          t1:
            api_key: k
            api_secret: s
            destinations:
              d1:
                kind: kafka
        \(body.split(separator: "\n").map { "        " + $0 }.joined(separator: "\n"))
        """
    }

    func testErrorPaths() {
        assertError("", contains: ["empty"])
        assertError("tenants: [", contains: ["not valid YAML"])
        assertError("ingest: {}\n", contains: ["'tenants'", "required"])
        assertError("tenant: {}\n", contains: ["unknown setting 'tenant'"])
        assertError("ingest: {listen: nope}\ntenants: {}\n", contains: ["ingest.listen", "HOST:PORT"])
        assertError("ingest: {max_batch_bytes: 10}\ntenants: {}\n", contains: ["max_batch_bytes", "between"])
        assertError("ingest: {max_batch_bytes: 8388608}\ntenants: {}\n", contains: ["max_batch_bytes", "between 1024 and 2097152"])
        assertError("ingest: {max_batch_bytes: lots}\ntenants: {}\n", contains: ["whole number"])
        assertError("ingest: {max_answer_hold_ms: 60000}\ntenants: {}\n", contains: ["max_answer_hold_ms", "between 0 and 10000"])
        assertError("ingest: {spool_commit_delay_us: -1}\ntenants: {}\n", contains: ["spool_commit_delay_us", "between 0 and 100000"])
        assertError("tenants: {\"bad id\": {api_key: k, api_secret: s}}\n", contains: ["tenant 'bad id'"])
        assertError("tenants: {t1: {api_secret: s}}\n", contains: ["tenant 't1'", "'api_key'", "required"])
        assertError("tenants: {t1: {api_key: k}}\n", contains: ["tenant 't1'", "'api_secret'", "required"])
        assertError("tenants: {t1: {api_key: k, api_secret: s, colour: red}}\n", contains: ["unknown setting 'colour'"])
        assertError(
            "tenants: {t1: {api_key: k, api_secret: s}, t2: {api_key: k, api_secret: s}}\n",
            contains: ["tenant 't2'", "already used by tenant 't1'"])
        assertError("tenants: {t1: {api_key: k, api_secret: {env: NOPE}}}\n", contains: ["'NOPE'", "not set"])
        assertError("tenants: {t1: {api_key: k, api_secret: {file: /nonexistent/x}}}\n", contains: ["cannot read secret file"])
        assertError("tenants: {t1: {api_key: k, api_secret: {env: A, file: B}}}\n", contains: ["exactly one"])
        assertError("tenants: {t1: {api_key: k, api_secret: [1]}}\n", contains: ["api_secret", "{env: NAME}"])
        assertError(
            "tenants: {t1: {api_key: k, api_secret: s, destinations: {d1: {kind: carrier-pigeon}}}}\n",
            contains: ["destination 'd1'", "unknown destination kind"])
        assertError(
            "tenants: {t1: {api_key: k, api_secret: s, destinations: {d1: {topic: x}}}}\n",
            contains: ["destination 'd1'", "'kind'", "required"])
        assertError(
            "tenants: {t1: {api_key: k, api_secret: s, destinations: {d1: {kind: keen}}}}\n",
            contains: ["destination 'd1'", "'project_id'", "required"])
    }

    func keen(_ body: String) -> String {
        "tenants:\n  t1:\n    api_key: k\n    api_secret: s\n    destinations:\n      d1:\n        kind: keen\n"
            + body.split(separator: "\n").map { "        " + $0 }.joined(separator: "\n") + "\n"
    }

    func testKeenDestination() throws {
        let config = try SluiceConfig.parse(
            yaml: keen("project_id: p1\nkey: {env: KEEN_KEY}\ncollection: mparticle.{event_type}"),
            environment: ["KEEN_KEY": "write-key-1"])
        guard case .keen(let k) = config.tenants[0].destinations[0].kind else { return XCTFail("not keen") }
        XCTAssertEqual(k.projectID, "p1")
        XCTAssertEqual(k.key.value, "write-key-1")
        XCTAssertEqual(k.transport, .kafka)
        XCTAssertEqual(k.bootstrapServers, "b1.kafka-in.keen.io:9092,b2.kafka-in.keen.io:9092,b3.kafka-in.keen.io:9092")
        XCTAssertEqual(k.httpBaseURL, "https://api.keen.io")
        XCTAssertTrue(k.uniquenessToken)
        XCTAssertEqual(k.collection(eventType: "screen_view"), "mparticle.screen_view")
        XCTAssertEqual(config.tenants[0].destinations[0].role, .keenOut)
        XCTAssertFalse("\(config)".contains("write-key-1"), "the key is a secret")

        assertError(keen("project_id: p1\ncollection: c"), contains: ["'key'", "required"])
        assertError(keen("project_id: p1\nkey: k\ncollection: _hidden"), contains: ["'collection'", "starts with '_'"])
        assertError(keen("project_id: p1\nkey: k\ncollection: a b"), contains: ["'collection'", "' '"])
        assertError(keen("project_id: p1\nkey: k\ncollection: \(String(repeating: "x", count: 65))"), contains: ["longer than 64"])
        assertError(keen("project_id: p1\nkey: k\ncollection: c\ntransport: smoke"), contains: ["'transport'", "kafka or http"])
        assertError(keen("project_id: p1\nkey: k\ncollection: c\nhttp_base_url: ftp://x"), contains: ["'http_base_url'"])
        assertError(keen("project_id: p1\nkey: k\ncollection: c\ntopic: t"), contains: ["'topic'"])
    }

    func testKafkaDestinationErrorPaths() {
        assertError(kafka("topic: x"), contains: ["tenant 't1'", "destination 'd1'", "'bootstrap_servers'", "required"])
        assertError(kafka("bootstrap_servers: b:1"), contains: ["destination 'd1'", "'topic'", "required"])
        assertError(kafka("bootstrap_servers: nohost\ntopic: x"), contains: ["'nohost' is not HOST:PORT"])
        assertError(kafka("bootstrap_servers: h:99999\ntopic: x"), contains: ["is not HOST:PORT"])
        assertError(kafka("bootstrap_servers: h:1\ntopic: bad/topic"), contains: ["'topic'", "a-z A-Z 0-9"])
        assertError(kafka("bootstrap_servers: h:1\ntopic: x\npassword: p"), contains: ["'password'", "without a username"])
        assertError(
            kafka("bootstrap_servers: h:1\ntopic: x\nusername: u\nsasl_mechanism: GSSAPI"),
            contains: ["'sasl_mechanism'", "PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512"])
        assertError(kafka("bootstrap_servers: h:1\ntopic: x\nsasl_mechanism: PLAIN"), contains: ["without a username"])
        assertError(kafka("bootstrap_servers: h:1\ntopic: x\nssl_ca_certificate: notapem"), contains: ["'ssl_ca_certificate'", "PEM"])
        assertError(
            kafka("bootstrap_servers: h:1\ntopic: x\nssl_ca_certificate: \"-----BEGIN CERTIFICATE-----\\nnot base64!\\n-----END CERTIFICATE-----\""),
            contains: ["not valid base64"])
        assertError(
            kafka("bootstrap_servers: h:1\ntopic: x\nssl_ca_certificate: \"-----BEGIN CERTIFICATE-----\\nAAAA\\n\""),
            contains: ["without its END"])
        assertError(
            kafka("bootstrap_servers: h:1\ntopic: x\nssl_certificate: \"-----BEGIN CERTIFICATE-----\\nAAAA\\n-----END CERTIFICATE-----\""),
            contains: ["'ssl_private_key'", "go together"])
        assertError(kafka("bootstrap_servers: h:1\ntopic: x\nplaintext: maybe"), contains: ["'plaintext'", "true or false"])
        assertError(
            kafka("bootstrap_servers: h:1\ntopic: x\nplaintext: true\nusername: u"),
            contains: ["'plaintext'", "cannot be combined"])
        assertError(kafka("bootstrap_servers: dev\ntopic: x"), contains: ["plaintext only"])
        assertError(kafka("bootstrap_servers: h:1\ntopic: x\nsettingz: {}"), contains: ["unknown setting 'settingz'"])
    }

    func testErrorsCarryTheLineNumber() {
        XCTAssertThrowsError(try parse(kafka("bootstrap_servers: h:1\ntopic: x\npassword: p"))) { error in
            XCTAssertEqual((error as? ConfigError)?.line, 7, "\(error)")
        }
    }

    func testErrorsNeverShowSecretValues() {
        XCTAssertThrowsError(try parse(kafka("bootstrap_servers: h:1\ntopic: x\npassword: TOPSECRET"))) { error in
            XCTAssertFalse("\(error)".contains("TOPSECRET"))
        }
    }
}
