import Foundation
import TestSupport
import XCTest

#if canImport(Glibc)
import Glibc
#endif

/// Every thread of every Sluice process runs under the CPU scheduling policy asked for
/// (`--cpu-scheduling` or `SLUICE_CPU_SCHEDULING`; without either, the one it was started with), including the threads
/// started after the process set it (Dispatch's workers, librdkafka's broker threads).
final class SchedulingTests: XCTestCase {
    /// Linux's policy of each thread of `pid` (field 41 of /proc/PID/task/TID/stat), by thread name.
    func policies(of pid: Int32) -> [String: Int] {
        var found: [String: Int] = [:]
        let dir = "/proc/\(pid)/task"
        for tid in (try? FileManager.default.contentsOfDirectory(atPath: dir)) ?? [] {
            guard let stat = try? String(contentsOfFile: "\(dir)/\(tid)/stat", encoding: .utf8),
                let close = stat.lastIndex(of: ")")
            else { continue }
            let name = (try? String(contentsOfFile: "\(dir)/\(tid)/comm", encoding: .utf8))?
                .trimmingCharacters(in: .whitespacesAndNewlines) ?? tid
            // After the command's closing parenthesis, fields start at 3 (state): policy is the 39th.
            let fields = stat[stat.index(after: close)...].split(separator: " ")
            if fields.count > 38, let policy = Int(fields[38]) { found["\(name) (\(tid))"] = policy }
        }
        return found
    }

    func testEveryThreadOfEveryProcessRunsUnderTheBatchPolicyWhenAskedFor() throws {
        setenv("SLUICE_CPU_SCHEDULING", "batch", 1)
        defer { unsetenv("SLUICE_CPU_SCHEDULING") }
        let group = try ProcessGroup(config: ProcessGroup.acmeConfig(topic: "acme-sched"))
        try group.startAll(topics: ["acme-sched:1"])
        // Traffic, so that the threads started on demand exist (Dispatch's workers, librdkafka's).
        let body = #"{"environment":"production","mpid":7,"events":[{"event_type":"custom_event","data":{"event_name":"x","custom_event_type":"other"}}]}"#
        let r = try group.post("/v2/events", body: Data(body.utf8), user: "acme-key", password: "acme-secret")
        XCTAssertEqual(r.status, 202, r.body)
        XCTAssertTrue(try eventually(timeout: 60) { try Kcat.consume(bootstrap: group.bootstrapServers, topic: "acme-sched").count == 1 })
        for name in ["ingest", "router", "kafka-out"] {
            let pid = try XCTUnwrap(group.process(name)?.processIdentifier)
            let threads = policies(of: pid)
            XCTAssertFalse(threads.isEmpty, name)
            XCTAssertEqual(threads.filter { $0.value != 3 }, [:], "\(name): threads not under SCHED_BATCH (3)")
        }
    }

    func testNormalPolicyOnRequestAndInheritedWithoutIt() throws {
        let group = try ProcessGroup(config: ProcessGroup.acmeConfig(topic: "acme-sched"))
        // The option wins over the environment; without either, the policy it started with (this test's).
        let asked = try group.start("router", ["--cpu-scheduling", "normal"], environment: ["SLUICE_CPU_SCHEDULING": "batch"])
        let plain = try group.start("kafka-out")
        let inherited = Int(sched_getscheduler(0))
        XCTAssertTrue(eventually(timeout: 30) { FileManager.default.fileExists(atPath: group.runDir + "/router.sock") })
        for (name, process, expected) in [("router", asked, 0), ("kafka-out", plain, inherited)] {
            XCTAssertTrue(eventually(timeout: 30) { policies(of: process.processIdentifier).count > 1 }, name)
            let threads = policies(of: process.processIdentifier)
            XCTAssertEqual(threads.filter { $0.value != expected }, [:], "\(name): threads not under policy \(expected)")
        }
    }
}
