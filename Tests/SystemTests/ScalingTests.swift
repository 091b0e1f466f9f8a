import Foundation
import TestSupport
import XCTest

#if canImport(Glibc)
import Glibc
#endif

/// Outputs scale at runtime: kafka-out goes from 1 to 3 instances and back to 1 under load;
/// nothing accepted is lost and each user's batches stay in order (read back by kcat).
final class ScalingTests: XCTestCase {
    func metric(_ text: String, _ name: String) -> Double? {
        text.split(separator: "\n").first { $0.hasPrefix(name + " ") }.flatMap { Double($0.split(separator: " ").last!) }
    }

    func testScaleKafkaOutFrom1To3AndBackUnderLoad() throws {
        let group = try ProcessGroup(config: ProcessGroup.acmeConfig(topic: "scale"))
        try group.startDevCluster(topics: ["scale:4"])
        try group.start("router")
        let ports = try (1...3).map { _ in try freePort() }
        func startOutput(_ i: Int) throws {
            try group.start(
                "kafka-out-\(i)", executable: "kafka-out",
                ["--instance", "kafka-out-\(i)", "--metrics-listen", "127.0.0.1:\(ports[i - 1])"])
        }
        try startOutput(1)
        try group.startIngest()
        XCTAssertTrue(eventually { (try? group.get("/readyz").status) == 200 }, group.logs())

        let load = UserLoad(group: group, users: 24)
        load.start()
        usleep(1_500_000)
        try startOutput(2)
        usleep(1_500_000)
        try startOutput(3)
        usleep(3_000_000)
        // Both newcomers took a share of the work.
        for i in [2, 3] {
            let text = try group.get(port: ports[i - 1], "/metrics").body
            let delivered = metric(text, #"sluice_kafka_out_messages_total{outcome="delivered"}"#) ?? 0
            XCTAssertGreaterThan(delivered, 0, "kafka-out-\(i) got no work:\n\(text)")
        }
        group.stop("kafka-out-3", signal: SIGTERM)
        usleep(1_500_000)
        group.stop("kafka-out-2", signal: SIGKILL)
        usleep(2_000_000)
        load.stop()

        XCTAssertGreaterThan(load.acceptedCount, 50, group.logs().suffix(5000).description)
        var result: (problems: [String], duplicates: Int) = ([], 0)
        let complete = try eventually(timeout: 60) {
            result = load.verify(try Kcat.consume(bootstrap: group.bootstrapServers, topic: "scale"))
            return result.problems.isEmpty
        }
        XCTAssertTrue(complete, "\(result.problems.prefix(10))\n\(group.logs().suffix(10000))")
        print("scaling: accepted \(load.acceptedCount) batches from 24 users, \(result.duplicates) duplicates")
    }

    /// SIGTERM to the whole group under load: every process exits cleanly, and after a restart
    /// everything that was accepted arrives.
    func testSIGTERMOfTheWholeGroupUnderLoadLosesNothing() throws {
        let group = try ProcessGroup(config: ProcessGroup.acmeConfig(topic: "term"))
        try group.startAll(topics: ["term:2"])
        let load = UserLoad(group: group, users: 8)
        load.start()
        usleep(2_000_000)
        for name in ["ingest", "kafka-out", "router"] {
            let status = group.stop(name, signal: SIGTERM, timeout: 20)
            XCTAssertEqual(status, 0, "\(name) exits cleanly on SIGTERM\n\(group.logs().suffix(4000))")
        }
        load.stop()
        try group.start("router")
        try group.start("kafka-out")
        try group.startIngest()
        var result: (problems: [String], duplicates: Int) = ([], 0)
        let complete = try eventually(timeout: 60) {
            result = load.verify(try Kcat.consume(bootstrap: group.bootstrapServers, topic: "term"))
            return result.problems.isEmpty
        }
        XCTAssertTrue(complete, "\(result.problems.prefix(10))\n\(group.logs().suffix(10000))")
    }
}
