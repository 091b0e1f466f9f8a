import Foundation
import NIOCore
import Shared
import XCTest

@testable import ingest

final class SpoolTests: XCTestCase {
    var dir = ""
    override func setUp() { dir = NSTemporaryDirectory() + "spool-\(UUID().uuidString)" }
    override func tearDown() { try? FileManager.default.removeItem(atPath: dir) }

    func batch(_ text: String, mpid: String? = nil) -> ValidatedBatch {
        ValidatedBatch(bytes: ByteBuffer(string: text), mpid: mpid, eventCount: 0)
    }

    func waitFor(_ condition: () -> Bool) async throws {
        for _ in 0..<200 where !condition() { try await Task.sleep(for: .milliseconds(10)) }
    }

    func testStoredBatchesSurviveReopeningInOrderUntilCompleted() async throws {
        var spool: Spool? = try Spool(directory: dir, maxBytes: 1 << 20)
        let ids = try await spool!.append(tenant: "acme", batches: [batch("{\"a\":1}", mpid: "-9223372036854775808"), batch("{\"b\":2}")])
        XCTAssertEqual(ids.count, 2)
        XCTAssertLessThan(ids[0], ids[1])
        spool = nil
        // Another process (after a crash) finds them, oldest first.
        let reopened = try Spool(directory: dir, maxBytes: 1 << 20)
        let pending = try reopened.pending(after: 0, limit: 10)
        XCTAssertEqual(pending.map(\.id), ids)
        XCTAssertEqual(pending[0].tenant, "acme")
        XCTAssertEqual(pending[0].key, "-9223372036854775808")
        XCTAssertEqual(String(buffer: pending[0].payload), "{\"a\":1}")
        XCTAssertEqual(reopened.usedBytes, 14)
        reopened.complete(ids[0])
        try await waitFor { reopened.usedBytes == 7 }
        XCTAssertEqual(try reopened.pending(after: 0, limit: 10).map(\.id), [ids[1]])
        XCTAssertEqual(try reopened.pending(after: ids[1], limit: 10).count, 0)
    }

    func testDeadLettersKeepTheBatchAndTheReason() async throws {
        let spool = try Spool(directory: dir, maxBytes: 1 << 20)
        let ids = try await spool.append(tenant: "acme", batches: [batch("{}")])
        spool.complete(ids[0], deadLetters: [.init(destination: "main", reason: "MSG_SIZE_TOO_LARGE: too big", attempts: 1)])
        try await waitFor { spool.usedBytes == 0 }
        let dead = try DeadLetterStore(spoolDirectory: dir).list(.init())
        XCTAssertEqual(dead.count, 1)
        XCTAssertEqual(dead[0].destination, "main")
        XCTAssertEqual(dead[0].reason, "MSG_SIZE_TOO_LARGE: too big")
        XCTAssertEqual(dead[0].batchID, ids[0])
        XCTAssertTrue(try spool.pending(after: 0, limit: 10).isEmpty)
    }

    func testFullSpoolRefusesWholeRequests() async throws {
        let spool = try Spool(directory: dir, maxBytes: 1 << 16)
        let big = String(repeating: "x", count: 40_000)
        _ = try await spool.append(tenant: "t", batches: [batch(big)])
        do {
            _ = try await spool.append(tenant: "t", batches: [batch(big)])
            XCTFail("should be full")
        } catch Spool.Failure.full {}
        XCTAssertEqual(spool.count, 1, "nothing half-stored")
        XCTAssertTrue(spool.isFull, "refusing until usage falls below 90%")
    }

    func testConcurrentAppendsShareCommitsAndAllGetIDs() async throws {
        let spool = try Spool(directory: dir, maxBytes: 1 << 24)
        let all = try await withThrowingTaskGroup(of: [Int64].self) { group in
            for i in 0..<200 {
                let b = ValidatedBatch(bytes: ByteBuffer(string: "{\"n\":\(i)}"), mpid: nil, eventCount: 0)
                group.addTask { try await spool.append(tenant: "t", batches: [b]) }
            }
            var ids: [Int64] = []
            for try await r in group { ids += r }
            return ids
        }
        XCTAssertEqual(Set(all).count, 200)
        XCTAssertEqual(spool.count, 200)
    }

    func testSpoolFilesArePrivate() async throws {
        let spool = try Spool(directory: dir, maxBytes: 1 << 20)
        _ = try await spool.append(tenant: "t", batches: [batch("{}")])
        for file in try FileManager.default.contentsOfDirectory(atPath: dir) {
            let mode = try FileManager.default.attributesOfItem(atPath: dir + "/" + file)[.posixPermissions] as! Int
            XCTAssertEqual(mode & 0o077, 0, "\(file) is private: \(String(mode, radix: 8))")
        }
        let dirMode = try FileManager.default.attributesOfItem(atPath: dir)[.posixPermissions] as! Int
        XCTAssertEqual(dirMode & 0o777, 0o700)
    }
}
