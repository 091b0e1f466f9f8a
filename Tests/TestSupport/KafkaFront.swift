import Foundation

#if canImport(Glibc)
import Glibc
#endif

/// Test tools in `Tests/tools` (Python and shell).
public enum TestTools {
    public static var directory: URL {
        URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().appendingPathComponent("tools")
    }

    /// Makes the test certificates (CA, server for localhost/127.0.0.1, client, another CA, wrong host) in `dir`.
    public static func makeCertificates(in dir: String) throws {
        let result = try runCommand("/bin/bash", [directory.appendingPathComponent("make_test_certs.sh").path, dir])
        guard result.status == 0 else { throw ProcessGroup.Failure("make_test_certs.sh failed: \(result.err)") }
    }
}

/// The TLS+SASL front (`Tests/tools/kafka_front.py`) in front of the dev cluster: real TLS
/// handshakes and real SASL (PLAIN, SCRAM-SHA-256/512) for librdkafka's own client to pass or fail.
public final class KafkaFront: @unchecked Sendable {
    public let process: Process
    public let bootstrapServers: String

    public init(
        upstream: String, certificate: String, key: String, users: [String: String], clientCA: String? = nil,
        sasl: Bool = true, missingTopics: [String] = [], workDir: String, name: String
    ) throws {
        let portsFile = "\(workDir)/\(name).ports"
        var arguments = [
            TestTools.directory.appendingPathComponent("kafka_front.py").path, "--upstream", upstream, "--cert", certificate,
            "--key", key, "--ports-file", portsFile, "--log", "\(workDir)/\(name).log",
        ]
        for (user, password) in users { arguments += ["--user", "\(user):\(password)"] }
        if let clientCA { arguments += ["--client-ca", clientCA] }
        if !sasl { arguments.append("--no-sasl") }
        for topic in missingTopics { arguments += ["--missing-topic", topic] }
        process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        process.arguments = ["python3"] + arguments
        process.standardOutput = FileHandle.nullDevice
        try process.run()
        var ports = ""
        _ = eventually(timeout: 30) {
            ports = ((try? String(contentsOfFile: portsFile, encoding: .utf8)) ?? "").trimmingCharacters(in: .whitespacesAndNewlines)
            return !ports.isEmpty
        }
        guard !ports.isEmpty else {
            process.terminate()
            throw ProcessGroup.Failure("the Kafka front did not start (see \(workDir)/\(name).log)")
        }
        bootstrapServers = ports
    }

    deinit {
        if process.isRunning {
            process.terminate()
            process.waitUntilExit()
        }
    }
}
