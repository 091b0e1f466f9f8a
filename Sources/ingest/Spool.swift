import Foundation
import GRDB
import NIOConcurrencyHelpers
import NIOCore
import Shared

/// A batch kept in the spool until every destination has it.
struct SpooledBatch: Sendable, Equatable {
    var id: Int64
    var tenant: String
    var key: String?
    var payload: ByteBuffer
    /// Set for a replayed dead letter: only this destination gets the batch.
    var destination: String?
}

/// ingest's durable spool: every accepted batch is written and fsync'd here before the client gets
/// its 202, and stays until the router reports that every destination has it (or dead-lettered it).
///
/// SQLite in WAL mode with `synchronous=FULL` (each commit reaches the disk). Appends from
/// concurrent requests are grouped: one transaction — one fsync — carries all that arrived while
/// the previous one was being written. The file is private to the service user (0600).
final class Spool: Sendable {
    enum Failure: Error, CustomStringConvertible {
        case full(used: Int, limit: Int)
        var description: String {
            switch self {
            case .full(let used, let limit): return "the spool is full (\(used) of \(limit) bytes)"
            }
        }
    }

    /// A destination that will never get a batch, and why.
    struct DeadLetter: Sendable, Equatable {
        var destination: String
        var reason: String
        var attempts: Int
    }

    private enum Operation {
        case append([ValidatedBatch], tenant: String, CheckedContinuation<[Int64], Error>)
        case complete(Int64, deadLetters: [DeadLetter])
    }

    private struct State {
        var queue: [Operation] = []
        var writing = false
        var usedBytes = 0
        /// Set when a request was refused for lack of room; cleared once usage falls below 90%.
        var refusing = false
    }

    private let db: DatabasePool
    private let state = NIOLockedValueBox(State())
    let maxBytes: Int
    let path: String
    /// Made once when the spool is created: with a batch's id, it names the batch for good
    /// (the `sluice-batch-id` Kafka header), across restarts and replays.
    let identity: String

    init(directory: String, maxBytes: Int) throws {
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
        path = (directory as NSString).appendingPathComponent("spool.sqlite")
        self.maxBytes = maxBytes
        var configuration = Configuration()
        configuration.prepareDatabase { db in
            try db.execute(sql: "PRAGMA synchronous = FULL")
        }
        let oldMask = umask(0o077)
        defer { umask(oldMask) }
        db = try DatabasePool(path: path, configuration: configuration)
        try db.write { db in
            try db.execute(
                sql: """
                    CREATE TABLE IF NOT EXISTS batches (
                        id INTEGER PRIMARY KEY AUTOINCREMENT,
                        tenant TEXT NOT NULL,
                        key TEXT,
                        payload BLOB NOT NULL,
                        received_at INTEGER NOT NULL,
                        destination TEXT
                    );
                    CREATE TABLE IF NOT EXISTS dead_letters (
                        id INTEGER PRIMARY KEY AUTOINCREMENT,
                        batch_id INTEGER NOT NULL,
                        tenant TEXT NOT NULL,
                        destination TEXT NOT NULL,
                        key TEXT,
                        payload BLOB NOT NULL,
                        reason TEXT NOT NULL,
                        attempts INTEGER NOT NULL,
                        received_at INTEGER NOT NULL,
                        failed_at INTEGER NOT NULL
                    );
                    CREATE INDEX IF NOT EXISTS dead_letters_by_destination ON dead_letters (tenant, destination);
                    CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
                    """)
            try db.execute(sql: "INSERT OR IGNORE INTO meta (key, value) VALUES ('spool_id', ?)", arguments: [UUID().uuidString.lowercased()])
        }
        identity = try db.read { db in try String.fetchOne(db, sql: "SELECT value FROM meta WHERE key = 'spool_id'") ?? "" }
        let used = try db.read { db in try Int.fetchOne(db, sql: "SELECT COALESCE(SUM(length(payload)), 0) FROM batches") ?? 0 }
        state.withLockedValue { $0.usedBytes = used }
        for file in [path, path + "-wal", path + "-shm"] where FileManager.default.fileExists(atPath: file) {
            chmod(file, 0o600)
        }
    }

    var usedBytes: Int { state.withLockedValue { $0.usedBytes } }
    /// Full: at the limit, or refusing since a request did not fit (until usage falls below 90%).
    var isFull: Bool { state.withLockedValue { $0.refusing || $0.usedBytes >= maxBytes } }

    /// Stores the batches durably and returns their ids, in order. Throws `Failure.full` when the
    /// spool has no room: the client is told to retry later (429), nothing is half-stored.
    func append(tenant: String, batches: [ValidatedBatch]) async throws -> [Int64] {
        let size = batches.reduce(0) { $0 + $1.bytes.readableBytes }
        let maxBytes = self.maxBytes
        let used = state.withLockedValue { s -> Int? in
            guard s.usedBytes + size > maxBytes else { return nil }
            s.refusing = true
            return s.usedBytes
        }
        if let used { throw Failure.full(used: used, limit: maxBytes) }
        return try await withCheckedThrowingContinuation { continuation in
            enqueue(.append(batches, tenant: tenant, continuation))
        }
    }

    /// Forgets a batch that every destination has, keeping a dead letter (batch, destination,
    /// reason) for each destination that will never get it.
    func complete(_ id: Int64, deadLetters: [DeadLetter] = []) {
        enqueue(.complete(id, deadLetters: deadLetters))
    }

    /// Up to `limit` stored batches with an id above `after`, oldest first.
    func pending(after: Int64, limit: Int) throws -> [SpooledBatch] {
        try db.read { db in
            try Row.fetchAll(
                db, sql: "SELECT id, tenant, key, payload, destination FROM batches WHERE id > ? ORDER BY id LIMIT ?",
                arguments: [after, limit]
            ).map { row in
                let data: Data = row["payload"]
                return SpooledBatch(
                    id: row["id"], tenant: row["tenant"], key: row["key"], payload: ByteBuffer(data: data), destination: row["destination"])
            }
        }
    }

    var count: Int { (try? db.read { db in try Int.fetchOne(db, sql: "SELECT COUNT(*) FROM batches") ?? 0 }) ?? 0 }

    private func enqueue(_ operation: Operation) {
        let lead = state.withLockedValue { s -> Bool in
            s.queue.append(operation)
            if s.writing { return false }
            s.writing = true
            return true
        }
        if lead { Task { await self.drain() } }
    }

    /// Group commit: writes everything queued in one transaction, until the queue is empty.
    private func drain() async {
        while true {
            let operations = state.withLockedValue { s -> [Operation] in
                let q = s.queue
                s.queue = []
                if q.isEmpty { s.writing = false }
                return q
            }
            if operations.isEmpty { return }
            let now = Int64(Date().timeIntervalSince1970 * 1000)
            do {
                let (ids, delta) = try await db.write { db -> ([[Int64]], Int) in
                    var ids: [[Int64]] = []
                    var delta = 0
                    for op in operations {
                        switch op {
                        case .append(let batches, let tenant, _):
                            var these: [Int64] = []
                            for b in batches {
                                try db.execute(
                                    sql: "INSERT INTO batches (tenant, key, payload, received_at) VALUES (?, ?, ?, ?)",
                                    arguments: [tenant, b.mpid, Data(b.bytes.readableBytesView), now])
                                these.append(db.lastInsertedRowID)
                                delta += b.bytes.readableBytes
                            }
                            ids.append(these)
                        case .complete(let id, let deadLetters):
                            for dead in deadLetters {
                                try db.execute(
                                    sql: """
                                        INSERT INTO dead_letters (batch_id, tenant, destination, key, payload, reason, attempts, received_at, failed_at)
                                        SELECT id, tenant, COALESCE(destination, ?), key, payload, ?, ?, received_at, ? FROM batches WHERE id = ?
                                        """,
                                    arguments: [dead.destination, dead.reason, dead.attempts, now, id])
                            }
                            let removed = try Int.fetchOne(db, sql: "SELECT length(payload) FROM batches WHERE id = ?", arguments: [id]) ?? 0
                            try db.execute(sql: "DELETE FROM batches WHERE id = ?", arguments: [id])
                            delta -= removed
                        }
                    }
                    return (ids, delta)
                }
                let maxBytes = self.maxBytes
                state.withLockedValue { s in
                    s.usedBytes += delta
                    if s.refusing && s.usedBytes < maxBytes / 10 * 9 { s.refusing = false }
                }
                var next = ids.makeIterator()
                for op in operations {
                    if case .append(_, _, let continuation) = op { continuation.resume(returning: next.next()!) }
                }
            } catch {
                for op in operations {
                    if case .append(_, _, let continuation) = op { continuation.resume(throwing: error) }
                }
            }
        }
    }
}
