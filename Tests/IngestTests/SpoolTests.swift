import Foundation
import GRDB
import NIOConcurrencyHelpers
import NIOCore
import Shared
import XCTest

@testable import ingest

final class SpoolTests: SpoolTestCase {
    func waitFor(_ condition: () -> Bool) async throws {
        for _ in 0..<300 where !condition() { try await Task.sleep(for: .milliseconds(10)) }
    }

    let a = DeliveryTarget(tenant: "acme", destination: "a")
    let b = DeliveryTarget(tenant: "acme", destination: "b")

    func testCommitsAreFsyncedSynchronousFull() throws {
        // GRDB's WAL setup lowers the writer to NORMAL (no fsync per commit); the spool must not.
        let spool = try Spool(directory: dir, maxBytes: 1 << 20)
        XCTAssertEqual(spool.synchronousMode, 2, "PRAGMA synchronous on the writer must be FULL")
    }

    func testCheckpointsRunOutsideTheWriter() async throws {
        let spool = try Spool(directory: dir, maxBytes: 1 << 20)
        XCTAssertEqual(spool.autocheckpointPages, 0, "commits never checkpoint")
        for i in 0..<20 { _ = try await spool.append(tenant: "t", destinations: ["a"], batches: [batch("{\"n\":\(i)}")]) }
        let wal = try spool.checkpoint()
        XCTAssertGreaterThan(wal.walFrameCount, 0)
        XCTAssertEqual(wal.checkpointedFrameCount, wal.walFrameCount, "the checkpointer's connection copies the whole WAL")
        XCTAssertEqual(spool.count, 20)
    }

    /// Many appends at once go through the two-stage pipeline (bytes of one group while the rows
    /// of the previous commit): every batch gets its own id, and its rows point at its own bytes.
    func testConcurrentAppendsEachFindTheirOwnBytes() async throws {
        let spool = try Spool(directory: dir, maxBytes: 1 << 30, segmentBytes: 64 << 10)
        let bodies = (0..<300).map { "{\"n\":\($0),\"p\":\"\(String(repeating: "y", count: $0 * 7 % 900))\"}" }
        let stored = bodies.map { batch($0) }
        let ids = try await withThrowingTaskGroup(of: (Int, Int64).self) { group in
            for (i, b) in stored.enumerated() {
                group.addTask { (i, try await spool.append(tenant: "t", destinations: ["a", "b"], batches: [b])[0]) }
            }
            var ids = [Int64](repeating: 0, count: bodies.count)
            for try await (i, id) in group { ids[i] = id }
            return ids
        }
        XCTAssertEqual(Set(ids).count, bodies.count)
        let byID = Dictionary(uniqueKeysWithValues: zip(ids, bodies))
        for destination in ["a", "b"] {
            let pending = try spool.pending(DeliveryTarget(tenant: "t", destination: destination), after: 0, limit: 1000)
            XCTAssertEqual(pending.count, bodies.count)
            XCTAssertEqual(pending.map(\.batchID), pending.map(\.batchID).sorted(), "oldest first")
            for d in pending { XCTAssertEqual(String(buffer: d.payload), byID[d.batchID]) }
        }
    }

    /// Commits that never pause must not grow the WAL without bound: the checkpointer gets it
    /// rewound (a passive checkpoint alone never caught up with the latest commit).
    func testTheWALStaysSmallUnderASteadyStreamOfCommits() async throws {
        let spool = try Spool(directory: dir, maxBytes: 1 << 30)
        let body = String(repeating: "x", count: 2000)
        let stop = NIOLockedValueBox(false)
        let stored = batch("{\"p\":\"\(body)\"}")
        let writer = Task {
            var n = 0
            while !stop.withLockedValue({ $0 }) {
                let ids = try await spool.append(tenant: "t", destinations: ["a"], batches: [stored])
                n += 1
                for d in try spool.pending(DeliveryTarget(tenant: "t", destination: "a"), after: ids[0] - 1, limit: 1) {
                    spool.complete(delivery: d.id)
                }
            }
            return n
        }
        var largest = 0
        for _ in 0..<40 {
            try await Task.sleep(for: .milliseconds(50))
            do {
                try spool.checkpointRewinding()
            } catch let error as DatabaseError where error.resultCode == .SQLITE_BUSY {
                continue  // as the spool's own timer does: the next one
            }
            largest = max(largest, spool.walBytes)
        }
        stop.withLockedValue { $0 = true }
        let commits = try await writer.value
        XCTAssertGreaterThan(commits, 100)
        // Each append and each completion commits several 4 KB pages (≈ 36 KB per append and its
        // completion): never rewound, the WAL would hold all of them. Rewound every 50 ms it holds
        // about one interval's worth, a fortieth of the run — so the bound is one page per append,
        // whatever the machine's speed (a fixed 4 MB failed on a machine doing 2,300 in 2 s).
        let bound = max(1 << 20, commits * 4096)
        XCTAssertLessThan(spool.walBytes, bound, "after \(commits) appends the WAL is \(spool.walBytes) bytes (largest \(largest))")
    }

    func testStoredBatchesSurviveReopeningUntilEveryDestinationHasThem() async throws {
        var spool: Spool? = try Spool(directory: dir, maxBytes: 1 << 20)
        let ids = try await spool!.append(
            tenant: "acme", destinations: ["a", "b"], batches: [batch("{\"a\":1}", mpid: "-9223372036854775808"), batch("{\"b\":2}")])
        XCTAssertEqual(ids.count, 2)
        spool = nil
        // Another process (after a crash) finds them, oldest first, for each destination.
        let reopened = try Spool(directory: dir, maxBytes: 1 << 20)
        XCTAssertEqual(reopened.backlog, [a: 2, b: 2])
        let forA = try reopened.pending(a, after: 0, limit: 10)
        XCTAssertEqual(forA.map(\.batchID), ids)
        XCTAssertEqual(forA[0].key, "-9223372036854775808")
        XCTAssertEqual(String(buffer: forA[0].payload), "{\"a\":1}")
        XCTAssertEqual(reopened.usedBytes, 14)
        // Destination a has the first batch: b still needs it, so its bytes stay.
        reopened.complete(delivery: forA[0].id)
        try await waitFor { reopened.backlog[a] == 1 }
        XCTAssertEqual(reopened.usedBytes, 14)
        XCTAssertEqual(try reopened.pending(a, after: 0, limit: 10).map(\.batchID), [ids[1]])
        let forB = try reopened.pending(b, after: 0, limit: 10)
        reopened.complete(delivery: forB[0].id)
        try await waitFor { reopened.usedBytes == 7 }
        XCTAssertEqual(reopened.count, 1)
        // A repeated ack changes nothing.
        reopened.complete(delivery: forB[0].id)
        try await Task.sleep(for: .milliseconds(50))
        XCTAssertEqual(reopened.count, 1)
    }

    func testDeadLettersKeepTheBatchDestinationAndReason() async throws {
        let spool = try Spool(directory: dir, maxBytes: 1 << 20)
        let ids = try await spool.append(tenant: "acme", destinations: ["a"], batches: [batch("{}")])
        let d = try spool.pending(a, after: 0, limit: 1)[0]
        spool.complete(delivery: d.id, deadLetter: .init(reason: "MSG_SIZE_TOO_LARGE: too big", attempts: 1))
        try await waitFor { spool.usedBytes == 0 }
        let dead = try DeadLetterStore(spoolDirectory: dir).list(.init())
        XCTAssertEqual(dead.count, 1)
        XCTAssertEqual(dead[0].destination, "a")
        XCTAssertEqual(dead[0].reason, "MSG_SIZE_TOO_LARGE: too big")
        XCTAssertEqual(dead[0].batchID, ids[0])
        XCTAssertEqual(try DeadLetterStore(spoolDirectory: dir).replay(.init(destination: "a")), 1)
        try spool.flush()  // the running spool takes replays in with its next apply
        XCTAssertEqual(try spool.pending(a, after: 0, limit: 10).count, 1, "replayed for that destination")
    }

    func testBacklogCapDeadLettersTheOldestOfThatDestinationOnly() async throws {
        let spool = try Spool(directory: dir, maxBytes: 1 << 20, maxBacklogPerDestination: 3)
        for i in 0..<5 {
            _ = try await spool.append(tenant: "acme", destinations: ["a", "b"], batches: [batch("{\"n\":\(i)}")])
            // b keeps delivering; a is down.
            for d in try spool.pending(b, after: 0, limit: 10) { spool.complete(delivery: d.id) }
            try await waitFor { spool.backlog[b] == nil }
        }
        try spool.flush()  // the cap is applied with the log (every 100 ms)
        XCTAssertEqual(spool.backlog[a], 3)
        XCTAssertEqual(try spool.pending(a, after: 0, limit: 10).map { String(buffer: $0.payload) }, ["{\"n\":2}", "{\"n\":3}", "{\"n\":4}"])
        let dead = try DeadLetterStore(spoolDirectory: dir).list(.init())
        XCTAssertEqual(dead.map(\.destination), ["a", "a"])
        XCTAssertTrue(dead.allSatisfy { $0.reason.hasPrefix("backlog cap") })
    }

    func testFullSpoolRefusesWholeRequests() async throws {
        let spool = try Spool(directory: dir, maxBytes: 1 << 16)
        let big = String(repeating: "x", count: 40_000)
        _ = try await spool.append(tenant: "t", destinations: ["a"], batches: [batch(big)])
        do {
            _ = try await spool.append(tenant: "t", destinations: ["a"], batches: [batch(big)])
            XCTFail("should be full")
        } catch Spool.Failure.full {}
        XCTAssertEqual(spool.count, 1, "nothing half-stored")
        XCTAssertTrue(spool.isFull, "refusing until usage falls below 90%")
    }

    func testTenantWithoutDestinationsStoresNothing() async throws {
        let spool = try Spool(directory: dir, maxBytes: 1 << 16)
        let ids = try await spool.append(tenant: "t", destinations: [], batches: [batch("{}")])
        XCTAssertEqual(ids, [])
        XCTAssertEqual(spool.count, 0)
    }

    func testConcurrentAppendsShareCommitsAndAllGetIDs() async throws {
        let spool = try Spool(directory: dir, maxBytes: 1 << 24)
        let all = try await withThrowingTaskGroup(of: [Int64].self) { group in
            for i in 0..<200 {
                let b = ValidatedBatch(bytes: ByteBuffer(string: "{\"n\":\(i)}"), mpid: nil, eventCount: 0)
                group.addTask { try await spool.append(tenant: "t", destinations: ["a"], batches: [b]) }
            }
            var ids: [Int64] = []
            for try await r in group { ids += r }
            return ids
        }
        XCTAssertEqual(Set(all).count, 200)
        XCTAssertEqual(spool.count, 200)
    }

    func testAfterALargeGroupTheWriterWaitsSoTheNextGroupGrows() async throws {
        let delay = Duration.milliseconds(500)
        // Every group counts as large here (one operation or more), so the wait is certain.
        let spool = try Spool(directory: dir, maxBytes: 1 << 24, commitDelay: delay, commitDelayOperations: 1)
        let b = (0..<4).map { batch("{\"n\":\($0)}") }
        _ = try await spool.append(tenant: "t", destinations: ["a"], batches: [b[0]])
        XCTAssertEqual(spool.commits.withLockedValue { $0 }, 1)
        // The writer now waits before it looks again: two appends 100 ms apart share one commit.
        async let second = spool.append(tenant: "t", destinations: ["a"], batches: [b[1]])
        try await Task.sleep(for: .milliseconds(100))
        async let third = spool.append(tenant: "t", destinations: ["a"], batches: [b[2]])
        _ = try await (second, third)
        XCTAssertEqual(spool.commits.withLockedValue { $0 }, 2, "the appends made during the wait share a commit")
        // Once the queue ran dry the writer stops; the next append starts it again without a wait.
        try await Task.sleep(for: delay * 2)
        let start = ContinuousClock.now
        _ = try await spool.append(tenant: "t", destinations: ["a"], batches: [b[3]])
        XCTAssertLessThan(ContinuousClock.now - start, delay, "an append after a quiet spell commits at once")
        XCTAssertEqual(spool.commits.withLockedValue { $0 }, 3)
        XCTAssertEqual(spool.count, 4)
    }

    func testSpoolFilesArePrivate() async throws {
        let spool = try Spool(directory: dir, maxBytes: 1 << 20)
        _ = try await spool.append(tenant: "t", destinations: ["a"], batches: [batch("{}")])
        for file in try FileManager.default.contentsOfDirectory(atPath: dir) {
            let mode = try FileManager.default.attributesOfItem(atPath: dir + "/" + file)[.posixPermissions] as! Int
            XCTAssertEqual(mode & 0o077, 0, "\(file) is private: \(String(mode, radix: 8))")
        }
        let dirMode = try FileManager.default.attributesOfItem(atPath: dir)[.posixPermissions] as! Int
        XCTAssertEqual(dirMode & 0o777, 0o700)
    }

    /// Batch bytes live in payload-log segments: a full segment makes way for a new one, a segment
    /// goes when no batch needs it (one is kept as the spare, and the next segment is written over
    /// it), and reopening finds every byte still needed and retires the rest.
    func testPayloadSegmentsRotateAndGoWhenNothingNeedsThem() async throws {
        let body = String(repeating: "x", count: 1000)
        var spool: Spool? = try Spool(directory: dir, maxBytes: 1 << 24, segmentBytes: 4096)
        var ids: [Int64] = []
        for i in 0..<10 {
            ids += try await spool!.append(tenant: "t", destinations: ["a"], batches: [batch("{\"n\":\(i),\"p\":\"\(body)\"}")])
        }
        XCTAssertGreaterThanOrEqual(spool!.segments.count, 3, "\(spool!.segments)")
        // The first six delivered: the segments holding only those go (not the one being written).
        let target = DeliveryTarget(tenant: "t", destination: "a")
        let first = try spool!.pending(target, after: 0, limit: 6)
        for d in first { spool!.complete(delivery: d.id) }
        try await waitFor { spool!.count == 4 }
        let spare = "payloads-spare.log"
        let files = {
            try FileManager.default.contentsOfDirectory(atPath: self.dir).filter { $0.hasPrefix("payloads-") && $0 != spare }.sorted()
        }
        func inode(_ name: String) throws -> Int {
            try FileManager.default.attributesOfItem(atPath: self.dir + "/" + name)[.systemFileNumber] as! Int
        }
        try await waitFor { (try? files().count) == spool!.segments.count }  // files go off the writer's path
        XCTAssertEqual(try files().count, spool!.segments.count)
        XCTAssertLessThan(spool!.segments.count, 4)
        try await waitFor { FileManager.default.fileExists(atPath: self.dir + "/" + spare) }
        let spareInode = try inode(spare)
        // The next segment is the spare, written over from its start.
        let before = Set(try files())
        var more: [Int64] = []
        while Set(try files()).subtracting(before).isEmpty {
            more += try await spool!.append(tenant: "t", destinations: ["a"], batches: [batch("{\"m\":\(more.count),\"p\":\"\(body)\"}")])
        }
        let next = try XCTUnwrap(Set(try files()).subtracting(before).first)
        XCTAssertEqual(try inode(next), spareInode)
        let written = try spool!.pending(target, after: ids.last!, limit: 100)
        XCTAssertEqual(written.map { String(buffer: $0.payload) }, more.indices.map { "{\"m\":\($0),\"p\":\"\(body)\"}" })
        for d in written { spool!.complete(delivery: d.id) }
        try await waitFor { spool!.count == 4 }
        XCTAssertEqual(spool!.usedBytes, try spool!.pending(target, after: 0, limit: 10).reduce(0) { $0 + $1.payload.readableBytes })
        spool = nil
        // Reopened: the remaining four are intact, oldest first; a new segment is started.
        let reopened = try Spool(directory: dir, maxBytes: 1 << 24, segmentBytes: 4096)
        let rest = try reopened.pending(target, after: 0, limit: 10)
        XCTAssertEqual(rest.map(\.batchID), Array(ids[6...]))
        for (k, d) in rest.enumerated() { XCTAssertEqual(String(buffer: d.payload), "{\"n\":\(6 + k),\"p\":\"\(body)\"}") }
        for d in rest { reopened.complete(delivery: d.id) }
        try await waitFor { reopened.count == 0 }
        XCTAssertEqual(reopened.usedBytes, 0)
        try await waitFor { (try? files().count) == 1 }
        let left = try files()
        XCTAssertEqual(left.count, 1, "only the segment being written is left (and the spare): \(left)")
        XCTAssertTrue(FileManager.default.fileExists(atPath: dir + "/" + spare))
    }

    /// Dead letters take their bytes out of the payload log into SQLite; a replayed dead letter
    /// (bytes inline in SQLite, as spools written before the payload log) is delivered like any other.
    func testDeadLettersCarryTheirBytesOutOfTheLog() async throws {
        let spool = try Spool(directory: dir, maxBytes: 1 << 20)
        _ = try await spool.append(tenant: "t", destinations: ["a"], batches: [batch("{\"lost\":true}")])
        let target = DeliveryTarget(tenant: "t", destination: "a")
        let d = try spool.pending(target, after: 0, limit: 1)[0]
        spool.complete(delivery: d.id, deadLetter: .init(reason: "no", attempts: 3))
        try await waitFor { spool.count == 0 }
        let store = try DeadLetterStore(spoolDirectory: dir)
        XCTAssertEqual(try store.list(.init(tenant: nil, destination: nil)).map { String(decoding: $0.payload, as: UTF8.self) }, ["{\"lost\":true}"])
        XCTAssertEqual(try store.replay(.init(tenant: nil, destination: nil)), 1)
        XCTAssertEqual(spool.count, 1)
        let again = try spool.pending(target, after: d.id, limit: 1)
        XCTAssertEqual(again.map { String(buffer: $0.payload) }, ["{\"lost\":true}"])
    }
}

extension SpoolTests {
    /// The pump reads just-spooled deliveries from memory: the same ids, keys and bytes as the
    /// spool holds, and a delivery another process put back is still found.
    func testThePumpsViewFromMemoryIsTheSpools() async throws {
        let spool = try Spool(directory: dir, maxBytes: 1 << 20)
        for i in 0..<5 {
            _ = try await spool.append(tenant: "acme", destinations: ["a", "b"], batches: [batch("{\"n\":\(i)}", mpid: "m\(i)")])
        }
        func same(_ target: DeliveryTarget, after: Int64, _ message: String) throws {
            let fromMemory = try spool.pending(target, after: after, limit: 3, fromMemory: true)
            let fromSpool = try spool.pending(target, after: after, limit: 3)
            XCTAssertEqual(fromMemory, fromSpool, message)
        }
        try same(a, after: 0, "before anything was sent")
        let first = try spool.pending(a, after: 0, limit: 2)
        spool.sent(a, upTo: first[1].id)
        try same(a, after: first[1].id, "after the first two went")
        try same(a, after: 0, "a reconnect starts over (from the spool)")
        XCTAssertGreaterThan(spool.freshBytes, 0)

        // The last of a's goes to a dead letter; `ingest dead-letters replay` (another process) puts it back.
        let rest = try spool.pending(a, after: first[1].id, limit: 10)
        spool.sent(a, upTo: rest.last!.id)
        for d in rest { spool.complete(delivery: d.id, deadLetter: d == rest.last ? .init(reason: "x", attempts: 1) : nil) }
        try await waitFor { spool.backlog[a] == nil }
        XCTAssertEqual(try DeadLetterStore(spoolDirectory: dir).replay(.init(destination: "a")), 1)
        try spool.flush()  // taken in with the next apply, with an id of this spool's
        _ = try await spool.append(tenant: "acme", destinations: ["a"], batches: [batch("{\"n\":5}")])
        let next = try spool.pending(a, after: rest.last!.id, limit: 10, fromMemory: true)
        XCTAssertEqual(next.map { String(buffer: $0.payload) }, ["{\"n\":4}", "{\"n\":5}"], "the replayed one is not skipped")
    }

    /// A lane whose oldest deliveries were evicted from memory (it held too many) reads back only
    /// those: the ones after them still come from memory — and the answer is the spool's.
    func testOnlyTheEvictedDeliveriesAreReadBack() async throws {
        let one = FreshDeliveries.cost(SpooledDelivery(id: 0, batchID: 0, target: a, key: nil, payload: batch("{\"n\":0}").bytes))
        let spool = try Spool(directory: dir, maxBytes: 1 << 20, freshMaxBytes: 3 * one)
        for i in 0..<8 { _ = try await spool.append(tenant: "acme", destinations: ["a"], batches: [batch("{\"n\":\(i)}")]) }
        XCTAssertNil(spool.pendingInMemory(a, after: 0, limit: 10), "five were evicted")
        let fromMemory = try spool.pending(a, after: 0, limit: 10, fromMemory: true)
        XCTAssertEqual(spool.readBack.withLockedValue { $0 }, 5, "the three memory holds are not read back")
        XCTAssertEqual(fromMemory, try spool.pending(a, after: 0, limit: 10))
        XCTAssertEqual(fromMemory.map { String(buffer: $0.payload) }, (0..<8).map { "{\"n\":\($0)}" })

        XCTAssertEqual(try spool.pending(a, after: 0, limit: 4, fromMemory: true), Array(fromMemory.prefix(4)), "the limit holds")
        // A byte budget (what the router link has room for): only what fits is read, at least one.
        let readBefore = spool.readBack.withLockedValue { $0 }
        XCTAssertEqual(try spool.pending(a, after: 0, limit: 10, maxBytes: 2 * 7, fromMemory: true), Array(fromMemory.prefix(2)))
        XCTAssertEqual(try spool.pending(a, after: 0, limit: 10, maxBytes: 0), Array(fromMemory.prefix(1)))
        XCTAssertEqual(spool.readBack.withLockedValue { $0 } - readBefore, 3, "payloads beyond the budget are not read")
        // Bytes left after a read cut short by them: the ones memory holds must not skip the rest.
        XCTAssertEqual(try spool.pending(a, after: 0, limit: 10, maxBytes: 2 * 7 + 3, fromMemory: true), Array(fromMemory.prefix(2)))
        XCTAssertEqual(try spool.pending(a, after: 0, limit: 2, fromMemory: true), Array(fromMemory.prefix(2)))
        XCTAssertEqual(try spool.pending(a, after: fromMemory[3].id, limit: 3, fromMemory: true), Array(fromMemory[4...6]))
        XCTAssertEqual(try spool.pending(a, after: fromMemory[4].id, limit: 10, maxBytes: 2 * 7, fromMemory: true), Array(fromMemory[5...6]))
        spool.sent(a, upTo: fromMemory[5].id)
        XCTAssertEqual(try spool.pending(a, after: fromMemory[5].id, limit: 10, fromMemory: true), Array(fromMemory.suffix(2)))
    }

    /// A read back cut short by the byte budget before the floor is not followed by memory's
    /// deliveries, even when the next of those would fit: the lane's cursor would pass the rest.
    func testAReadBackCutShortIsNotFollowedByLaterDeliveries() async throws {
        let one = FreshDeliveries.cost(SpooledDelivery(id: 0, batchID: 0, target: a, key: nil, payload: batch("{\"n\":0}").bytes))
        let spool = try Spool(directory: dir, maxBytes: 1 << 20, freshMaxBytes: 3 * one)
        let large = "{\"n\":1,\"pad\":\"\(String(repeating: "x", count: 200))\"}"
        for i in 0..<8 { _ = try await spool.append(tenant: "acme", destinations: ["a"], batches: [batch(i == 1 ? large : "{\"n\":\(i)}")]) }
        let all = try spool.pending(a, after: 0, limit: 10)
        XCTAssertEqual(spool.pendingInMemory(a, after: all[4].id, limit: 10), Array(all[5...]), "memory holds the last three")
        // Room for the first and 10 bytes more: not for the large second, though for the sixth.
        XCTAssertEqual(try spool.pending(a, after: 0, limit: 10, maxBytes: 7 + 10, fromMemory: true), [all[0]])
        XCTAssertEqual(try spool.pending(a, after: all[1].id, limit: 10, fromMemory: true), Array(all[2...]))
    }
}

extension SpoolTests {
    /// A replayed dead letter taken in by an apply is read back after rows read ahead before it,
    /// which held every delivery SQLite had then.
    func testAReplayTakenInIsReadAfterRowsReadAheadBeforeIt() async throws {
        let spool = try Spool(directory: dir, maxBytes: 1 << 20, applyAfter: .seconds(3600), freshMaxBytes: 0)
        _ = try await spool.append(tenant: "acme", destinations: ["a"], batches: (0..<3).map { batch("{\"n\":\($0)}") })
        try spool.flush()
        let first = try spool.pending(a, after: 0, limit: 1)  // reads all three ahead
        let last = try spool.pending(a, after: first[0].id, limit: 10)
        XCTAssertEqual(last.count, 2)
        spool.complete(delivery: last[1].id, deadLetter: .init(reason: "x", attempts: 1))
        try await waitFor { spool.backlog(of: a) == 2 }
        try spool.flush()
        XCTAssertEqual(try DeadLetterStore(spoolDirectory: dir).replay(.init(destination: "a")), 1)
        try spool.flush()  // taken in, with a new id
        let after = try spool.pending(a, after: first[0].id, limit: 10)
        XCTAssertEqual(after.map { String(buffer: $0.payload) }, ["{\"n\":1}", "{\"n\":2}"])
        XCTAssertGreaterThan(after.last?.id ?? 0, last[1].id, "a new id")
    }

    /// The rows kept are bounded per destination and all together, whatever the number of
    /// destinations reading back.
    func testTheRowsReadAheadAreBounded() {
        for n in [1, 10, 50, 64, 100, 1000, 100_000] {
            let cap = Spool.readAheadCap(destinations: n)
            XCTAssert((16...256).contains(cap), "\(n) destinations: \(cap)")
            XCTAssert(n * cap <= max(16_384, 16 * n), "\(n) destinations keep \(n * cap) rows")
            if n <= 100 { XCTAssertGreaterThanOrEqual(cap, Spool.readAheadRows, "a whole query kept with \(n)") }
        }
    }

    /// An apply's end tells the rows read ahead what it changed. When a read's query ran after
    /// the apply committed but before its end, the rows it took from the log are already among
    /// them, interleaved: they merge in id order, each once; finished ones leave; a replay ends
    /// what the rows cover before it; the cap drops the newest and narrows what they cover.
    func testAnApplyTellsRowsReadAheadWhatChangedEvenWhenTheyAlreadySawIt() {
        func row(_ id: Int64) -> Spool.Candidate {
            .init(id: id, batchID: id * 10, key: "k\(id)", source: .log(PayloadLocation(segment: 1, offset: id * 100, length: 10)))
        }
        var kept = Spool.ReadAhead(generation: 1, usedAt: 1, after: 0, through: 100, found: [2, 5, 9, 40].map(row))
        kept.update(removing: [5], inserting: [12, 3, 9, 150].map(row), firstReplay: nil, cap: 256, generation: 2)
        XCTAssertEqual(kept.found.map(\.id), [2, 3, 9, 12, 40], "merged in order, 9 once, 5 gone, 150 beyond what they cover")
        XCTAssertEqual(kept.found.map(\.batchID), [20, 30, 90, 120, 400])
        XCTAssertEqual(kept.generation, 2)
        XCTAssertEqual(kept.through, 100)

        kept.update(removing: [], inserting: [7].map(row), firstReplay: 20, cap: 256, generation: 3)
        XCTAssertEqual(kept.found.map(\.id), [2, 3, 7, 9, 12], "a replay at 20 ends what they cover at 19")
        XCTAssertEqual(kept.through, 19)

        kept.update(removing: [3], inserting: [], firstReplay: nil, cap: 3, generation: 4)
        XCTAssertEqual(kept.found.map(\.id), [2, 7, 9])
        XCTAssertEqual(kept.through, 9, "capped: they cover only up to their last row")

        let taken = kept.take(after: 2, through: .max, limit: 10)
        XCTAssertNil(taken, "beyond what they cover they cannot tell")
        let within = kept.take(after: 2, through: 9, limit: 10)
        XCTAssertEqual(within?.found.map(\.id), [7, 9])
        XCTAssertEqual(within?.complete, true)
        XCTAssertEqual(kept.take(after: 7, through: 9, limit: 1)?.found.map(\.id), [9])
        XCTAssertNil(kept.take(after: 1, through: 9, limit: 10), "rows before what they hold are gone")
    }

    /// Reads back from SQLite take rows ahead of what one read needs (`Spool.readAheadRows`): in
    /// any order of appends, completions, applies and reads from anywhere, a read answers what the
    /// spool holds — nothing finished, nothing new missed.
    func testReadsFromSQLiteAnswerWhatTheSpoolHoldsWhateverHappensBetween() async throws {
        let spool = try Spool(directory: dir, maxBytes: 8 << 20, applyAfter: .seconds(3600), freshMaxBytes: 0)
        var seed: UInt64 = 7  // a linear congruential sequence: the same on every run
        func roll(_ n: Int) -> Int {
            seed = seed &* 6_364_136_223_846_793_005 &+ 1_442_695_040_888_963_407
            return Int(seed >> 33) % n
        }
        var unfinished: [String] = []  // the model: a's payloads not finished, in order
        var ids: [String: Int64] = [:]  // learned from reads
        var next = 0
        for step in 0..<400 {
            switch roll(20) {
            case 0..<6:
                var batches: [ValidatedBatch] = []
                for _ in 0...roll(3) {
                    batches.append(batch("{\"n\":\(next)}"))
                    unfinished.append("{\"n\":\(next)}")
                    next += 1
                }
                _ = try await spool.append(tenant: "acme", destinations: ["a", "b"], batches: batches)
            case 6..<10:
                let known = unfinished.filter { ids[$0] != nil }
                guard !known.isEmpty else { continue }
                let done = known[roll(known.count)]
                spool.complete(delivery: ids[done]!)
                unfinished.removeAll { $0 == done }
                try await waitFor { spool.backlog(of: a) == unfinished.count }
            case 10..<12:
                try spool.flush()  // everything to SQLite
            default:
                let starts = [nil] + unfinished.suffix(40).filter { ids[$0] != nil }.map(Optional.some)
                let from = starts[roll(starts.count)]
                let after = from.flatMap { ids[$0] } ?? 0
                let limit = 1 + roll(6)
                let maxBytes = roll(2) == 0 ? Int.max : roll(40)  // sometimes the room of a byte window
                let found = try spool.pending(a, after: after, limit: limit, maxBytes: maxBytes)
                let expected = from.flatMap { f in unfinished.firstIndex(of: f).map { unfinished[($0 + 1)...] } } ?? unfinished[...]
                XCTAssertEqual(
                    found.map { String(buffer: $0.payload) }, expected.prefix(limit, maxBytes: maxBytes) { $0.utf8.count }, "step \(step)")
                for d in found { ids[String(buffer: d.payload)] = d.id }
            }
        }
        XCTAssertGreaterThan(spool.readBack.withLockedValue { $0 }, 100)
    }
}
