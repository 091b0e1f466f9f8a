import Foundation
import GRDB
import NIOCore
import Shared
import XCTest

@testable import ingest

/// The spool's log is what makes a batch durable, and it also records deliveries that finished;
/// SQLite hears of a batch once it waited a second (or at a flush) or never (delivered before
/// then). These tests stop a spool without its last apply — as a killed process does — and check
/// what the next one finds.
final class SpoolRecoveryTests: SpoolTestCase {
    let a = DeliveryTarget(tenant: "acme", destination: "a")
    let b = DeliveryTarget(tenant: "acme", destination: "b")

    /// A spool that never applies on its own: what it holds stays in the log until `flush`.
    func openSpool(segmentBytes: Int64 = 64 << 20) throws -> Spool {
        try Spool(directory: dir, maxBytes: 1 << 24, segmentBytes: segmentBytes, applyInterval: .seconds(3600))
    }

    /// Waits until the writer has logged something more (a record of finished deliveries).
    func waitForLogToGrow(_ spool: Spool, from size: Int64) async throws {
        for _ in 0..<300 where spool.segments.values.reduce(0, +) <= size { try await Task.sleep(for: .milliseconds(10)) }
        XCTAssertGreaterThan(spool.segments.values.reduce(0, +), size)
    }

    /// Reads the spool's SQLite file as another process would: a spool just dropped may still be
    /// closing its connections (the last one checkpoints under a lock), so it waits as ingest's
    /// own readers do.
    func sql<T: DatabaseValueConvertible>(_ query: String) throws -> T? {
        var configuration = Configuration()
        configuration.busyMode = .timeout(10)
        return try DatabaseQueue(path: dir + "/spool.sqlite", configuration: configuration).read { db in try T.fetchOne(db, sql: query) }
    }

    func segmentFiles() throws -> [String] {
        try FileManager.default.contentsOfDirectory(atPath: dir).filter { PayloadLog.segmentNumber($0) != nil }.sorted()
    }

    func testAcknowledgedBatchesOfAWriterThatDiedBeforeApplyingAreReadBackFromTheLog() async throws {
        var spool: Spool? = try openSpool()
        var ids: [Int64] = []
        for i in 0..<3 {
            ids += try await spool!.append(tenant: "acme", destinations: ["a", "b"], batches: [batch("{\"n\":\(i)}", mpid: "m\(i)")])
        }
        let first = try XCTUnwrap(spool!.pendingInMemory(a, after: 0, limit: 1)?.first)
        let logged = spool!.segments.values.reduce(0, +)
        spool!.complete(delivery: first.id)
        try await waitForLogToGrow(spool!, from: logged)
        XCTAssertEqual(try sql("SELECT COUNT(*) FROM batches") as Int?, 0, "nothing reached SQLite yet")
        spool = nil  // dies without applying

        let reopened = try openSpool()
        XCTAssertEqual(reopened.backlog, [a: 2, b: 3], "all acknowledged batches, less the delivery logged as done")
        for (target, from) in [(a, 1), (b, 0)] {
            let pending = try reopened.pending(target, after: 0, limit: 10)
            XCTAssertEqual(pending.map(\.batchID), Array(ids[from...]))
            XCTAssertEqual(pending.map { String(buffer: $0.payload) }, ["{\"n\":0}", "{\"n\":1}", "{\"n\":2}"].suffix(3 - from))
            XCTAssertEqual(pending.map(\.key), ["m0", "m1", "m2"].suffix(3 - from))
        }
        XCTAssertEqual(reopened.usedBytes, 21)
        // Ids go on after every one handed out.
        let next = try await reopened.append(tenant: "acme", destinations: ["a"], batches: [batch("{}")])
        XCTAssertGreaterThan(next[0], ids.max()!)
        let newest = try reopened.pending(a, after: 0, limit: 10).last!
        XCTAssertGreaterThan(newest.id, try reopened.pending(b, after: 0, limit: 10).map(\.id).max()!)
    }

    func testABatchDeliveredBeforeTheApplyNeverReachesSQLiteAndItsIdsAreNeverReused() async throws {
        var spool: Spool? = try openSpool()
        let ids = try await spool!.append(tenant: "acme", destinations: ["a", "b"], batches: [batch("{\"n\":1}"), batch("{\"n\":2}")])
        let deliveryIDs = try [a, b].flatMap { try spool!.pending($0, after: 0, limit: 10).map(\.id) }
        XCTAssertEqual(deliveryIDs.count, 4)
        for id in deliveryIDs { spool!.complete(delivery: id) }
        XCTAssertEqual(spool!.count, 0)  // applies
        XCTAssertNil(try sql("SELECT seq FROM sqlite_sequence WHERE name = 'batches'") as Int64?, "no batch row was ever written")
        XCTAssertEqual(spool!.usedBytes, 0)
        spool = nil

        let reopened = try openSpool()
        XCTAssertEqual(reopened.backlog, [:], "applied: not read back")
        let next = try await reopened.append(tenant: "acme", destinations: ["a"], batches: [batch("{}")])
        XCTAssertGreaterThan(next[0], ids.max()!)
        XCTAssertGreaterThan(try reopened.pending(a, after: 0, limit: 1)[0].id, deliveryIDs.max()!)
    }

    /// A crash during a group's write leaves a torn record (it was never acknowledged); a damaged
    /// record ends what is read of its segment.
    func testATornOrDamagedRecordEndsWhatIsReadBack() async throws {
        var spool: Spool? = try openSpool()
        for i in 0..<3 { _ = try await spool!.append(tenant: "acme", destinations: ["a"], batches: [batch("{\"n\":\(i)}")]) }
        spool = nil
        let segment = dir + "/" + (try XCTUnwrap(try segmentFiles().last))
        let intact = try Data(contentsOf: URL(fileURLWithPath: segment))

        try intact.dropLast(3).write(to: URL(fileURLWithPath: segment))
        var reopened: Spool? = try openSpool()
        XCTAssertEqual(try reopened!.pending(a, after: 0, limit: 10).map { String(buffer: $0.payload) }, ["{\"n\":0}", "{\"n\":1}"])
        reopened = nil

        // The same log, with one byte of the second record's payload changed.
        try FileManager.default.removeItem(atPath: dir)
        spool = try openSpool()
        for i in 0..<3 { _ = try await spool!.append(tenant: "acme", destinations: ["a"], batches: [batch("{\"n\":\(i)}")]) }
        spool = nil
        let again = dir + "/" + (try XCTUnwrap(try segmentFiles().last))
        var damaged = try Data(contentsOf: URL(fileURLWithPath: again))
        let second = try XCTUnwrap(damaged.firstRange(of: Data("{\"n\":1}".utf8)))
        damaged[second.lowerBound + 5] = UInt8(ascii: "9")
        try damaged.write(to: URL(fileURLWithPath: again))
        reopened = try openSpool()
        XCTAssertEqual(try reopened!.pending(a, after: 0, limit: 10).map { String(buffer: $0.payload) }, ["{\"n\":0}"])
    }

    /// Records SQLite already holds are not read back, even when a reused segment file still has
    /// them past what was written over them.
    func testRecordsAlreadyAppliedAreNotReadBackFromAReusedFile() async throws {
        var spool: Spool? = try openSpool(segmentBytes: 4096)
        let body = String(repeating: "x", count: 1500)
        var ids: [Int64] = []
        for i in 0..<6 { ids += try await spool!.append(tenant: "acme", destinations: ["a"], batches: [batch("{\"n\":\(i),\"p\":\"\(body)\"}")]) }
        for d in try spool!.pending(a, after: 0, limit: 4) { spool!.complete(delivery: d.id) }
        try spool!.flush()  // the first segments go; one becomes the spare
        let spare = dir + "/" + PayloadLog.spareName
        for _ in 0..<300 where !FileManager.default.fileExists(atPath: spare) { try await Task.sleep(for: .milliseconds(10)) }
        XCTAssertTrue(FileManager.default.fileExists(atPath: spare))
        // Written over from its start with one record of the same size: an old intact record
        // follows it, and it is not taken back.
        while FileManager.default.fileExists(atPath: spare) {
            ids += try await spool!.append(tenant: "acme", destinations: ["a"], batches: [batch("{\"m\":\(ids.count),\"p\":\"\(body)\"}")])
        }
        let reused = dir + "/" + (try XCTUnwrap(try segmentFiles().last))
        let found = try Data(contentsOf: URL(fileURLWithPath: reused)).withUnsafeBytes { SpoolRecord.scan($0) }
        XCTAssertEqual(found.count, 2, "the new record and an old one")
        XCTAssertLessThan(found[1].sequence, found[0].sequence)
        let expected = try spool!.pending(a, after: 0, limit: 100).map { String(buffer: $0.payload) }
        spool = nil

        let reopened = try openSpool(segmentBytes: 4096)
        XCTAssertEqual(try reopened.pending(a, after: 0, limit: 100).map { String(buffer: $0.payload) }, expected)
    }

    /// `ingest dead-letters replay` puts a dead letter back in a table of its own; the spool takes
    /// it in with ids after every one it handed out — also when ingest was not running.
    func testReplayedDeadLettersTakeIdsAfterEveryOneHandedOut() async throws {
        var spool: Spool? = try openSpool()
        _ = try await spool!.append(tenant: "acme", destinations: ["a"], batches: [batch("{\"dead\":1}")])
        let d = try spool!.pending(a, after: 0, limit: 1)[0]
        spool!.complete(delivery: d.id, deadLetter: .init(reason: "no", attempts: 1))
        try spool!.flush()
        let later = try await spool!.append(tenant: "acme", destinations: ["a"], batches: [batch("{\"later\":1}")])
        let laterDelivery = try spool!.pending(a, after: 0, limit: 1)[0]
        try spool!.close()
        spool = nil

        XCTAssertEqual(try DeadLetterStore(spoolDirectory: dir).replay(.init(destination: "a")), 1)
        let status = try SpoolSummary(directory: dir)
        XCTAssertEqual(status.pending[a], 2, "the replayed one counts as waiting")

        let reopened = try openSpool()
        try reopened.flush()
        let pending = try reopened.pending(a, after: 0, limit: 10)
        XCTAssertEqual(pending.map { String(buffer: $0.payload) }, ["{\"later\":1}", "{\"dead\":1}"])
        XCTAssertGreaterThan(pending[1].id, laterDelivery.id)
        XCTAssertGreaterThan(pending[1].batchID, later[0])
        let next = try await reopened.append(tenant: "acme", destinations: ["a"], batches: [batch("{}")])
        XCTAssertGreaterThan(next[0], pending[1].batchID)
        XCTAssertEqual(reopened.backlog[a], 3)
    }

    /// A delivery SQLite holds that finished after the last apply is logged as done: the next
    /// start does not send it again.
    func testADeliveryFinishedAfterTheLastApplyIsNotSentAgain() async throws {
        var spool: Spool? = try openSpool()
        _ = try await spool!.append(tenant: "acme", destinations: ["a", "b"], batches: [batch("{\"n\":1}")])
        try spool!.flush()  // into SQLite
        XCTAssertEqual(try sql("SELECT COUNT(*) FROM deliveries") as Int?, 2)
        let logged = spool!.segments.values.reduce(0, +)
        spool!.complete(delivery: try spool!.pending(a, after: 0, limit: 1)[0].id)
        try await waitForLogToGrow(spool!, from: logged)
        spool = nil  // dies before the next apply
        XCTAssertEqual(try sql("SELECT COUNT(*) FROM deliveries") as Int?, 2, "SQLite was not told")

        let reopened = try openSpool()
        XCTAssertEqual(reopened.backlog, [b: 1])
        XCTAssertEqual(try reopened.pending(a, after: 0, limit: 10), [])
    }

    /// The timer's apply takes only batches that waited `applyAfter`: the young stay in the log.
    func testOnlyBatchesThatWaitedAreApplied() async throws {
        let spool = try Spool(directory: dir, maxBytes: 1 << 24, applyInterval: .milliseconds(20), applyAfter: .milliseconds(300))
        _ = try await spool.append(tenant: "acme", destinations: ["a"], batches: [batch("{\"old\":1}")])
        for _ in 0..<300 where (try sql("SELECT COUNT(*) FROM batches") as Int?) != 1 { try await Task.sleep(for: .milliseconds(10)) }
        _ = try await spool.append(tenant: "acme", destinations: ["a"], batches: [batch("{\"young\":1}")])
        try await Task.sleep(for: .milliseconds(100))
        XCTAssertEqual(try sql("SELECT COUNT(*) FROM batches") as Int?, 1, "the old one only")
        XCTAssertEqual(try spool.pending(a, after: 0, limit: 10).map { String(buffer: $0.payload) }, ["{\"old\":1}", "{\"young\":1}"])
    }

    /// Applies run on their own thread while the writer goes on: with one every millisecond and
    /// every batch old enough at once, appends and completions race them; nothing is lost, nothing
    /// finished comes back, before or after a restart without a last apply.
    func testAppliesRacingAppendsAndCompletionsLoseNothing() async throws {
        var spool: Spool? = try Spool(directory: dir, maxBytes: 1 << 26, applyInterval: .milliseconds(1), applyAfter: .zero)
        var cursor: Int64 = 0
        var kept: [String] = []
        for i in 0..<300 {
            let body = "{\"n\":\(i)}"
            _ = try await spool!.append(tenant: "acme", destinations: ["a", "b"], batches: [batch(body)])
            for d in try spool!.pending(a, after: cursor, limit: 10) {
                spool!.complete(delivery: d.id)
                cursor = d.id
            }
            if i % 3 == 0 {
                for d in try spool!.pending(b, after: 0, limit: 1) { spool!.complete(delivery: d.id) }
            }
        }
        try spool!.flush()
        let waiting = try spool!.pending(b, after: 0, limit: 1000).map { String(buffer: $0.payload) }
        kept = waiting
        XCTAssertEqual(waiting.count, 200, "b finished one in three")
        XCTAssertEqual(spool!.backlog, [b: 200])
        XCTAssertEqual(try sql("SELECT COUNT(*) FROM deliveries") as Int?, 200)
        XCTAssertEqual(try sql("SELECT COUNT(*) FROM batches") as Int?, 200)
        XCTAssertEqual(spool!.usedBytes, waiting.reduce(0) { $0 + $1.utf8.count })
        // One more of b's finished, then the process dies before any apply.
        let logged = spool!.segments.values.reduce(0, +)
        spool!.complete(delivery: try spool!.pending(b, after: 0, limit: 1)[0].id)
        try await waitForLogToGrow(spool!, from: logged)
        spool = nil

        let reopened = try openSpool()
        XCTAssertEqual(reopened.backlog, [b: 199])
        XCTAssertEqual(try reopened.pending(b, after: 0, limit: 1000).map { String(buffer: $0.payload) }, Array(kept.dropFirst()))
        XCTAssertEqual(try reopened.pending(a, after: 0, limit: 1000), [])
    }

    /// Sequence numbers grow by one per record, a record of finished deliveries written alone
    /// included.
    func testEveryRecordTakesTheNextSequenceNumber() async throws {
        let spool = try openSpool()
        _ = try await spool.append(tenant: "acme", destinations: ["a"], batches: [batch("{\"n\":1}")])
        let logged = spool.segments.values.reduce(0, +)
        spool.complete(delivery: try spool.pending(a, after: 0, limit: 1)[0].id)
        try await waitForLogToGrow(spool, from: logged)
        _ = try await spool.append(tenant: "acme", destinations: ["a"], batches: [batch("{\"n\":2}"), batch("{\"n\":3}")])
        let segment = dir + "/" + (try XCTUnwrap(try segmentFiles().last))
        let found = try Data(contentsOf: URL(fileURLWithPath: segment)).withUnsafeBytes { SpoolRecord.scan($0) }
        XCTAssertEqual(found.count, 4)
        XCTAssertEqual(found.map(\.sequence), (0..<4).map { found[0].sequence + UInt64($0) })
    }

    /// A destination over its backlog cap does not bring young batches into SQLite: the cap takes
    /// the oldest, which SQLite holds once they have waited.
    func testTheBacklogCapLeavesYoungBatchesInTheLog() async throws {
        let spool = try Spool(
            directory: dir, maxBytes: 1 << 24, maxBacklogPerDestination: 2, applyInterval: .milliseconds(10),
            applyAfter: .seconds(3600))
        for i in 0..<4 { _ = try await spool.append(tenant: "acme", destinations: ["a"], batches: [batch("{\"n\":\(i)}")]) }
        _ = try await spool.append(tenant: "other", destinations: ["x"], batches: [batch("{\"x\":1}")])
        try await Task.sleep(for: .milliseconds(200))  // twenty applies' time
        XCTAssertEqual(try sql("SELECT COUNT(*) FROM batches") as Int?, 0, "nothing is old enough yet")
        XCTAssertEqual(spool.backlog[a], 4)
        try spool.flush()  // now SQLite holds them all, and the cap applies
        XCTAssertEqual(spool.backlog[a], 2)
        XCTAssertEqual(try spool.pending(a, after: 0, limit: 10).map { String(buffer: $0.payload) }, ["{\"n\":2}", "{\"n\":3}"])
        XCTAssertEqual(try DeadLetterStore(spoolDirectory: dir).list(.init()).map(\.reason.isEmpty), [false, false])
    }

    func testRecordsReadBackAsWritten() {
        let records = [
            SpoolRecord(
                sequence: 7, batchID: 41, receivedAt: 1_700_000_000_123, tenant: "acme", key: "-9223372036854775808",
                deliveries: [.init(id: 100, destination: "kafka-a"), .init(id: 101, destination: "keen")]),
            SpoolRecord(sequence: 8, batchID: 42, receivedAt: 5, tenant: "t", key: nil, deliveries: [.init(id: 102, destination: "é")]),
        ]
        var buffer = ByteBuffer()
        var payloadStarts: [Int] = []
        for (i, r) in records.enumerated() {
            let start = buffer.writerIndex
            payloadStarts.append(start + r.write(payload: ByteBuffer(string: "{\"batch\":\(i)}"), to: &buffer))
        }
        SpoolRecord.writeDone(sequence: 9, deliveries: [100, 102], to: &buffer)
        let found = buffer.withUnsafeReadableBytes { SpoolRecord.scan($0) }
        XCTAssertEqual(found.map(\.entry), records.map { .batch($0) } + [.done([100, 102])])
        XCTAssertEqual(found.map(\.sequence), [7, 8, 9])
        XCTAssertEqual(found.prefix(2).map(\.payloadOffset), payloadStarts)
        XCTAssertEqual(
            found.prefix(2).map { String(buffer: buffer.getSlice(at: $0.payloadOffset, length: $0.payloadLength)!) }, ["{\"batch\":0}", "{\"batch\":1}"])
        var torn = buffer
        torn.moveWriterIndex(to: buffer.writerIndex - 1)
        XCTAssertEqual(torn.withUnsafeReadableBytes { SpoolRecord.scan($0) }.map(\.sequence), [7, 8])
        XCTAssertEqual(ByteBuffer(string: "{\"old\":\"format\"}").withUnsafeReadableBytes { SpoolRecord.scan($0) }.count, 0)
    }
}
