import Foundation
import TestSupport
import XCTest

/// The end-to-end benchmark runs and prints its table (a couple of seconds per step, on the
/// binaries of this build). No speed is asserted: machines here are shared and noisy.
final class BenchmarkSmokeTests: XCTestCase {
    func testBenchmarkCommandRunsAndPrintsItsTable() throws {
        let repo = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .deletingLastPathComponent().path
        let result = try runCommand(
            repo + "/Benchmarks/run", ["--quick", "--bin-dir", BuiltProducts.directory.path], timeout: 600)
        XCTAssertEqual(result.status, 0, String(result.out.suffix(3000)) + String(result.err.suffix(3000)))
        let rows = [
            "| Sluice | max |", "| raw librdkafka (ceiling) | max |", "| peer, ack after Kafka confirmed | max |",
            "| HTTP ceiling (reads, answers 202) | max |", "| raw librdkafka at Sluice's rate | Sluice's max |",
        ]
        for row in rows {
            XCTAssertTrue(result.out.contains(row), "'\(row)' in:\n\(result.out.suffix(4000))")
        }
        for ratio in ["Sluice ÷ raw producer", "Sluice ÷ HTTP ceiling", "librdkafka at Sluice's rate", "librdkafka at the target rate"] {
            XCTAssertTrue(result.out.contains(ratio), "'\(ratio)' in:\n\(result.out.suffix(4000))")
        }
    }
}
