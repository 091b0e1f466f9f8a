import Dispatch
import Foundation
import GRDB
import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import Observability
import Shared

/// One destination's copy of a spooled batch, waiting until that destination has it.
struct SpooledDelivery: Sendable, Equatable {
    /// The delivery's own id: the frame id the router acks.
    var id: Int64
    var batchID: Int64
    var target: DeliveryTarget
    var key: String?
    var payload: ByteBuffer
}

/// A tenant's destination, as the spool tracks it.
struct DeliveryTarget: Hashable, Sendable, CustomStringConvertible {
    var tenant: String
    var destination: String
    var description: String { "\(tenant)/\(destination)" }
}

/// ingest's durable spool: every accepted batch is written and fsync'd here before the client gets
/// its 202, with one delivery per destination of its tenant. A delivery goes when the router
/// reports that its destination has the batch (or dead-lettered it); the batch goes with its last
/// delivery. Destinations advance independently: one that is down keeps its own backlog, capped
/// (`maxBacklogPerDestination`; beyond it the oldest become dead letters, reason "backlog cap").
///
/// The batches' bytes go to the payload log (`PayloadLog`: append-only segments, fdatasync'd);
/// the rows that say which destinations still need them go to SQLite in WAL mode with
/// `synchronous=FULL` (each commit reaches the disk), after the bytes are durable. Appends from
/// concurrent requests are grouped: one log write and one transaction — two fsyncs — carry all
/// that arrived while the previous group was being written. The files are private to the service
/// user (0600).
final class Spool: Sendable {
    enum Failure: Error, CustomStringConvertible {
        case full(used: Int, limit: Int)
        var description: String {
            switch self {
            case .full(let used, let limit): return "the spool is full (\(used) of \(limit) bytes)"
            }
        }
    }

    /// Why a destination will never get a batch.
    struct DeadLetter: Sendable, Equatable {
        var reason: String
        var attempts: Int
    }

    private enum Operation {
        case append([ValidatedBatch], tenant: String, destinations: [String], Completion)
        case complete(Int64, deadLetter: DeadLetter?)
    }

    typealias Completion = @Sendable (Result<[Int64], any Error>) -> Void

    private struct State {
        var queue: [Operation] = []
        var writing = false
        var usedBytes = 0
        /// Set when a request was refused for lack of room; cleared once usage falls below 90%.
        var refusing = false
        var backlog: [DeliveryTarget: Int] = [:]
    }

    private let db: DatabasePool
    /// Deliveries spooled and not yet sent, so the pump need not read them back.
    private let fresh: NIOLockedValueBox<FreshDeliveries>
    /// The batches' bytes (SQLite keeps where they are).
    private let log: PayloadLog
    private let state = NIOLockedValueBox(State())
    let maxBytes: Int
    let maxBacklogPerDestination: Int
    let path: String
    /// Made once when the spool is created: with a batch's id, it names the batch for good
    /// (the `sluice-batch-id` Kafka header), across restarts and replays.
    let identity: String

    private let logger: Logger
    /// A connection of its own that copies the WAL into the database file once a second. SQLite's
    /// automatic checkpoint ran inside the writer's commit: measured, one commit in a few thousand
    /// then took 250–600 ms (the database file's fsync), and every request behind it waited — the
    /// p99 at 10–50% load was 100–600 ms for that alone. See `checkpointNow` for how the WAL is
    /// kept from growing.
    private let checkpointer: DatabaseQueue
    nonisolated(unsafe) private let checkpointTimer: DispatchSourceTimer  // set once; DispatchSource is thread-safe

    /// After a group of at least `commitDelayOperations`, the writer waits this long before it
    /// takes the next: see `drain`.
    let commitDelay: Duration
    let commitDelayOperations: Int

    init(
        directory: String, maxBytes: Int, maxBacklogPerDestination: Int = 100_000, segmentBytes: Int64 = 64 << 20,
        commitDelay: Duration = .microseconds(300), commitDelayOperations: Int = 8,
        logger: Logger = Logger(label: "sluice.spool")
    ) throws {
        self.logger = logger
        self.commitDelay = commitDelay
        self.commitDelayOperations = commitDelayOperations
        try FileManager.default.createDirectory(
            atPath: directory, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
        path = (directory as NSString).appendingPathComponent("spool.sqlite")
        self.maxBytes = maxBytes
        self.maxBacklogPerDestination = maxBacklogPerDestination
        var configuration = Configuration()
        // Operator commands (dead-letters replay/purge, status) use the same file: wait for them.
        configuration.busyMode = .timeout(10)
        configuration.prepareDatabase { db in
            try db.execute(sql: "PRAGMA synchronous = FULL")
        }
        let oldMask = umask(0o077)
        defer { umask(oldMask) }
        db = try DatabasePool(path: path, configuration: configuration)
        // GRDB sets up WAL mode after prepareDatabase and sets `synchronous = NORMAL` on the writer
        // as it does (no fsync per commit). The spool's promise needs FULL: each commit reaches the
        // disk before the 202.
        try db.writeWithoutTransaction { db in
            try db.execute(sql: "PRAGMA synchronous = FULL")
            try db.execute(sql: "PRAGMA wal_autocheckpoint = 0")
            // A WAL that a burst grew is cut back to this when it is rewound (below it, it is
            // written over in place: cheaper flushes than appending).
            try db.execute(sql: "PRAGMA journal_size_limit = \(32 << 20)")
        }
        var checkpointConfiguration = Configuration()
        checkpointConfiguration.busyMode = .timeout(10)
        checkpointer = try DatabaseQueue(path: path, configuration: checkpointConfiguration)
        checkpointTimer = DispatchSource.makeTimerSource(queue: DispatchQueue(label: "sluice.spool.checkpoint"))
        checkpointTimer.schedule(deadline: .now() + 1, repeating: 1)
        checkpointTimer.setEventHandler { [checkpointer, logger] in
            do {
                try Spool.checkpointNow(checkpointer)
            } catch {
                logger.warning("spool checkpoint failed; will try again", metadata: ["error": "\(error)"])
            }
        }
        checkpointTimer.resume()
        try db.write { db in try Spool.createSchema(db) }
        identity = try db.read { db in try String.fetchOne(db, sql: "SELECT value FROM meta WHERE key = 'spool_id'") ?? "" }
        let used = try db.read { db in try Int.fetchOne(db, sql: "SELECT \(Spool.storedBytes) FROM batches") ?? 0 }
        let references = try db.read { db in
            try Row.fetchAll(db, sql: "SELECT segment, COUNT(*) AS n FROM batches WHERE segment IS NOT NULL GROUP BY segment")
        }
        log = try PayloadLog(
            directory: directory, references: Dictionary(uniqueKeysWithValues: references.map { ($0["segment"], $0["n"]) }),
            segmentBytes: segmentBytes)
        let backlog = try db.read { db in
            try Row.fetchAll(db, sql: "SELECT tenant, destination, COUNT(*) AS n FROM deliveries GROUP BY tenant, destination")
        }
        let lastDeliveryID = try db.read { db in
            try Int64.fetchOne(
                db,
                sql: """
                    SELECT MAX(COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'deliveries'), 0),
                               COALESCE((SELECT MAX(id) FROM deliveries), 0))
                    """) ?? 0
        }
        fresh = NIOLockedValueBox(FreshDeliveries(lastDeliveryID: lastDeliveryID))
        state.withLockedValue { s in
            s.usedBytes = used
            for row in backlog { s.backlog[DeliveryTarget(tenant: row["tenant"], destination: row["destination"])] = row["n"] }
        }
        for file in [path, path + "-wal", path + "-shm"] where FileManager.default.fileExists(atPath: file) {
            chmod(file, 0o600)
        }
    }

    /// The bytes of the batches held, in SQL: inline payloads (replayed dead letters) and those in
    /// the payload log.
    static let storedBytes = "COALESCE(SUM(length(payload) + COALESCE(length, 0)), 0)"

    static func createSchema(_ db: Database) throws {
        try db.execute(
            sql: """
                CREATE TABLE IF NOT EXISTS batches (
                    id INTEGER PRIMARY KEY AUTOINCREMENT,
                    tenant TEXT NOT NULL,
                    key TEXT,
                    payload BLOB NOT NULL,
                    received_at INTEGER NOT NULL
                );
                CREATE TABLE IF NOT EXISTS deliveries (
                    id INTEGER PRIMARY KEY AUTOINCREMENT,
                    batch_id INTEGER NOT NULL REFERENCES batches(id),
                    tenant TEXT NOT NULL,
                    destination TEXT NOT NULL
                );
                CREATE INDEX IF NOT EXISTS deliveries_by_destination ON deliveries (tenant, destination, id);
                CREATE INDEX IF NOT EXISTS deliveries_by_batch ON deliveries (batch_id);
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
        try db.execute(
            sql: "INSERT OR IGNORE INTO meta (key, value) VALUES ('spool_id', ?)", arguments: [UUID().uuidString.lowercased()])
        // Where a batch's bytes are in the payload log; NULL for a batch whose `payload` holds them
        // (replayed dead letters, spools written before the payload log).
        let columns = try Row.fetchAll(db, sql: "PRAGMA table_info(batches)").map { $0["name"] as String }
        for column in ["segment", "segment_offset", "length"] where !columns.contains(column) {
            try db.execute(sql: "ALTER TABLE batches ADD COLUMN \(column) INTEGER")
        }
    }

    var usedBytes: Int { state.withLockedValue { $0.usedBytes } }
    /// Full: at the limit, or refusing since a request did not fit (until usage falls below 90%).
    var isFull: Bool { state.withLockedValue { $0.refusing || $0.usedBytes >= maxBytes } }
    /// Destinations with deliveries waiting, and how many.
    var backlog: [DeliveryTarget: Int] { state.withLockedValue { $0.backlog.filter { $0.value > 0 } } }
    /// Deliveries waiting for one destination.
    func backlog(of target: DeliveryTarget) -> Int { state.withLockedValue { $0.backlog[target] ?? 0 } }

    /// Stores the batches durably, each with a delivery for every one of `destinations`, and
    /// returns the batch ids in order. Throws `Failure.full` when there is no room: nothing is
    /// half-stored and the client is told to retry later (429).
    func append(tenant: String, destinations: [String], batches: [ValidatedBatch]) async throws -> [Int64] {
        try await withCheckedThrowingContinuation { continuation in
            append(tenant: tenant, destinations: destinations, batches: batches) { continuation.resume(with: $0) }
        }
    }

    /// `append`, answered through `completion`: on the spool's writer thread once the group
    /// holding these batches is committed, or at once (no destinations: `[]`; no room:
    /// `Failure.full`).
    func append(tenant: String, destinations: [String], batches: [ValidatedBatch], completion: @escaping Completion) {
        guard !destinations.isEmpty else { return completion(.success([])) }  // nowhere to go: nothing to keep
        let size = batches.reduce(0) { $0 + $1.bytes.readableBytes }
        let maxBytes = self.maxBytes
        let used = state.withLockedValue { s -> Int? in
            guard s.usedBytes + size > maxBytes else { return nil }
            s.refusing = true
            return s.usedBytes
        }
        if let used { return completion(.failure(Failure.full(used: used, limit: maxBytes))) }
        enqueue(.append(batches, tenant: tenant, destinations: destinations, completion))
    }

    /// A destination has the batch of this delivery — or never will (`deadLetter`).
    func complete(delivery id: Int64, deadLetter: DeadLetter? = nil) {
        enqueue(.complete(id, deadLetter: deadLetter))
    }

    /// Up to `limit` deliveries waiting for `target` with an id above `after`, oldest first: from
    /// memory when asked and it holds them all (`FreshDeliveries`; the pump asks), else from SQLite
    /// and the payload log.
    func pending(_ target: DeliveryTarget, after: Int64, limit: Int, fromMemory: Bool = false) throws -> [SpooledDelivery] {
        if fromMemory, let known = pendingInMemory(target, after: after, limit: limit) { return known }
        assert(MultiThreadedEventLoopGroup.currentEventLoop == nil, "a spool read on an event loop")
        return try db.read { db in
            try Row.fetchAll(
                db.cachedStatement(
                    sql: """
                        SELECT d.id, d.batch_id, b.key, b.payload, b.segment, b.segment_offset, b.length
                        FROM deliveries d JOIN batches b ON b.id = d.batch_id
                        WHERE d.tenant = ? AND d.destination = ? AND d.id > ? ORDER BY d.id LIMIT ?
                        """),
                arguments: [target.tenant, target.destination, after, limit]
            ).map { row in
                SpooledDelivery(id: row["id"], batchID: row["batch_id"], target: target, key: row["key"], payload: try payload(row))
            }
        }
    }

    /// `pending` from memory alone, without touching the disk: nil when memory cannot answer (the
    /// lane is below its in-memory floor: after a refusal, a reconnect or an eviction).
    func pendingInMemory(_ target: DeliveryTarget, after: Int64, limit: Int) -> [SpooledDelivery]? {
        fresh.withLockedValue { $0.waiting(target, after: after, limit: limit) }
    }

    /// The deliveries of `target` up to `id` went to the router.
    func sent(_ target: DeliveryTarget, upTo id: Int64) {
        fresh.withLockedValue { $0.sent(target, upTo: id) }
    }

    /// Bytes of batches held in memory for the pump (for tests).
    var freshBytes: Int { fresh.withLockedValue { $0.heldBytes } }

    /// A batch's bytes from a row with `payload`, `segment`, `segment_offset` and `length`.
    private func payload(_ row: Row) throws -> ByteBuffer {
        if let segment: Int64 = row["segment"] {
            return try log.read(PayloadLocation(segment: segment, offset: row["segment_offset"], length: row["length"]))
        }
        let data: Data = row["payload"]
        return ByteBuffer(data: data)
    }

    /// Payload log segments and their sizes, for tests.
    var segments: [Int64: Int64] { log.segments }

    deinit { checkpointTimer.cancel() }

    /// The writer's `PRAGMA wal_autocheckpoint` (0: the checkpointer does it), for tests.
    var autocheckpointPages: Int {
        (try? db.writeWithoutTransaction { db in try Int.fetchOne(db, sql: "PRAGMA wal_autocheckpoint") ?? -1 }) ?? -1
    }

    /// Copies the WAL into the database now; returns the WAL's frames and how many are copied.
    func checkpoint() throws -> (walFrameCount: Int, checkpointedFrameCount: Int) {
        try checkpointer.writeWithoutTransaction { db in try db.checkpoint(.passive) }
    }

    /// One checkpoint: a passive pass copies the WAL into the database without holding commits
    /// back. Under a steady stream of commits that pass never catches up with the last one, so the
    /// WAL was never rewound and grew without bound (106 MB in a minute at max load, each commit
    /// then appending to it). So a second pass (RESTART) copies the few frames committed meanwhile
    /// and waits — at most `restartWaitMilliseconds`, holding new commits back — until no reader
    /// uses the WAL: the next commit then writes the WAL from its start. When readers are busy it
    /// gives up until the next second.
    static func checkpointNow(_ checkpointer: DatabaseQueue) throws {
        let (frames, _) = try checkpointer.writeWithoutTransaction { db in try db.checkpoint(.passive) }
        guard frames > 0 else { return }
        try checkpointer.writeWithoutTransaction { db in
            try db.execute(sql: "PRAGMA busy_timeout = \(restartWaitMilliseconds)")
            defer { try? db.execute(sql: "PRAGMA busy_timeout = 10000") }
            do {
                _ = try db.checkpoint(.restart)
            } catch let error as DatabaseError where error.resultCode == .SQLITE_BUSY {
                return  // readers or a commit in the way: next second
            }
        }
    }

    /// How long a RESTART pass may wait for readers. Every commit waits while it does: with 50 ms
    /// the waits of 35–58 ms (the pump reads all the time) were the p99 at half load (10.8 and
    /// 16.3 ms); with 5 ms the longest pass was 8–12 ms and p99 9.3 and 10.8 ms, and about half of
    /// the passes still rewind the WAL (the others give up, and the next second tries again).
    static let restartWaitMilliseconds = 5

    /// The checkpointer's work, now (for tests).
    func checkpointRewinding() throws { try Spool.checkpointNow(checkpointer) }

    /// The WAL file's size in bytes (for tests).
    var walBytes: Int {
        ((try? FileManager.default.attributesOfItem(atPath: path + "-wal")[.size]) as? Int) ?? 0
    }

    /// The writer's `PRAGMA synchronous` (2 = FULL), for tests.
    var synchronousMode: Int { (try? db.writeWithoutTransaction { db in try Int.fetchOne(db, sql: "PRAGMA synchronous") ?? -1 }) ?? -1 }

    var count: Int { (try? db.read { db in try Int.fetchOne(db, sql: "SELECT COUNT(*) FROM batches") ?? 0 }) ?? 0 }

    private func enqueue(_ operation: Operation) {
        let lead = state.withLockedValue { s -> Bool in
            s.queue.append(operation)
            if s.writing { return false }
            s.writing = true
            return true
        }
        if lead { writerQueue.async { self.drain() } }
    }

    /// Where group commits run: a thread of its own (never one of Swift's cooperative pool, which
    /// has one per core), calling the database synchronously — no hop to GRDB's writer queue and
    /// back per group.
    private let writerQueue = DispatchQueue(label: "sluice.spool.writer")

    /// Group commit: writes everything queued in one transaction, until the queue is empty.
    ///
    /// A group's cost is mostly per commit, not per operation (two flushes, the thread's wake-ups,
    /// SQLite's transaction): at max load, per event with 50 tenants, the writer's threads were
    /// 43% of ingest's CPU, at ≈ 12 operations a group. So while groups come in large — a sign that
    /// requests arrive faster than commits — the writer waits `commitDelay` before it takes the
    /// next one, which grows it. After a small group, or once the queue ran dry, it takes the next
    /// at once: at low load nothing waits. Measured (`Benchmarks/ab`, 6 rounds, per event with 50
    /// tenants at max; docs/BENCHMARKS.md, session 12): groups of 12.7 → 15 operations, ingest's CPU
    /// per request −5% (medians 0.166 → 0.158 ms), p99 lower in every round, requests/s the same
    /// within the noise; with batches and 1 tenant (3 rounds) 4–15% more requests/s, p99 lower.
    private func drain() {
        var previous = 0
        while true {
            if previous >= commitDelayOperations { Spool.pause(commitDelay) }
            let operations = state.withLockedValue { s -> [Operation] in
                let q = s.queue
                s.queue = []
                if q.isEmpty { s.writing = false }
                return q
            }
            if operations.isEmpty { return }
            previous = operations.count
            commits.withLockedValue { $0 += 1 }
            let now = Int64(Date().timeIntervalSince1970 * 1000)
            let backlogBefore = state.withLockedValue { $0.backlog }
            let cap = maxBacklogPerDestination
            let stopwatch = Stopwatch()
            defer {
                stopwatch.record(into: IngestMetrics.shared.spoolCommit)
                IngestMetrics.shared.spoolCommittedOperations.increment(by: Int64(operations.count))
            }
            // Written to the payload log, for release if the rows pointing at them are not committed.
            var stored: [PayloadLocation] = []
            var logTime = Duration.zero
            do {
                let payloads = operations.flatMap { op -> [ByteBuffer] in
                    if case .append(let batches, _, _, _) = op { return batches.map(\.bytes) }
                    return []
                }
                let log = self.log
                var inserted: [SpooledDelivery] = []
                var finished: [(id: Int64, target: DeliveryTarget)] = []
                // Appends must reach the disk before their 202s; a group of completions alone need not:
                // lost to a power loss, its deliveries would only be sent again (at-least-once), and
                // the next durable commit flushes the WAL with it in.
                let durable = !payloads.isEmpty
                let result = try Spool.transaction(db, durable: durable) { db -> (ids: [[Int64]], bytes: Int, backlog: [DeliveryTarget: Int], freed: [PayloadLocation]) in
                    inserted = []
                    finished = []
                    // The bytes first, durably; then the rows that point at them.
                    let logStart = ContinuousClock.now
                    let locations = payloads.isEmpty ? [] : try log.append(payloads)
                    stored = locations
                    logTime = ContinuousClock.now - logStart
                    if !payloads.isEmpty { IngestMetrics.shared.spoolPayloadWrite.record(logTime) }
                    var ids: [[Int64]] = []
                    var bytes = 0
                    var backlog = backlogBefore
                    var nextLocation = locations.makeIterator()
                    var freed: [PayloadLocation] = []
                    for op in operations {
                        switch op {
                        case .append(let batches, let tenant, let destinations, _):
                            var these: [Int64] = []
                            for b in batches {
                                let at = nextLocation.next()!
                                try db.cachedStatement(
                                    sql: """
                                        INSERT INTO batches (tenant, key, payload, received_at, segment, segment_offset, length)
                                        VALUES (?, ?, x'', ?, ?, ?, ?)
                                        """
                                ).execute(arguments: [tenant, b.mpid, now, at.segment, at.offset, at.length])
                                let batchID = db.lastInsertedRowID
                                these.append(batchID)
                                bytes += b.bytes.readableBytes
                                for d in destinations {
                                    try db.cachedStatement(sql: "INSERT INTO deliveries (batch_id, tenant, destination) VALUES (?, ?, ?)")
                                        .execute(arguments: [batchID, tenant, d])
                                    let target = DeliveryTarget(tenant: tenant, destination: d)
                                    inserted.append(
                                        SpooledDelivery(id: db.lastInsertedRowID, batchID: batchID, target: target, key: b.mpid, payload: b.bytes))
                                    backlog[target, default: 0] += 1
                                }
                            }
                            ids.append(these)
                            for d in destinations {
                                let target = DeliveryTarget(tenant: tenant, destination: d)
                                let excess = (backlog[target] ?? 0) - cap
                                guard excess > 0 else { continue }
                                let oldest = try Int64.fetchAll(
                                    db, sql: "SELECT id FROM deliveries WHERE tenant = ? AND destination = ? ORDER BY id LIMIT ?",
                                    arguments: [tenant, d, excess])
                                for delivery in oldest {
                                    let reason = "backlog cap: \(cap) batches were already waiting for this destination"
                                    bytes -= try Spool.finish(
                                        db, delivery: delivery, deadLetter: DeadLetter(reason: reason, attempts: 0), now: now, log: log,
                                        freed: &freed)?.bytes ?? 0
                                    finished.append((delivery, target))
                                    backlog[target, default: 0] -= 1
                                }
                            }
                        case .complete(let delivery, let deadLetter):
                            guard
                                let done = try Spool.finish(
                                    db, delivery: delivery, deadLetter: deadLetter, now: now, log: log, freed: &freed)
                            else { continue }  // already finished (a repeated ack)
                            finished.append((delivery, done.target))
                            bytes -= done.bytes
                            // Replays made by `ingest dead-letters` are not counted in: never below 0.
                            backlog[done.target] = max(0, (backlog[done.target] ?? 0) - 1)
                        }
                    }
                    return (ids, bytes, backlog, freed)
                }
                fresh.withLockedValue { f in
                    for d in inserted { f.inserted(d) }
                    for d in finished { f.finished(d.id, target: d.target) }
                }
                let releaseStart = ContinuousClock.now
                for location in result.freed { log.release(location, durably: durable) }
                if log.hasDrained {
                    // A segment emptied: once the commits that emptied it are on disk, its file can go.
                    do {
                        if !durable { try db.writeWithoutTransaction { db in try Spool.flushWAL(db) } }
                        log.retireDrained()
                    } catch {
                        logger.warning(
                            "spool flush failed; emptied payload segments wait for the next commit", metadata: ["error": "\(error)"])
                    }
                }
                let total = stopwatch.elapsed
                if total > .milliseconds(100) {
                    logger.warning(
                        "slow spool write",
                        metadata: [
                            "spool.write_ms": "\(Spool.milliseconds(total))",
                            "spool.payload_log_ms": "\(Spool.milliseconds(logTime))",
                            "spool.release_ms": "\(Spool.milliseconds(ContinuousClock.now - releaseStart))",
                            "spool.operations": "\(operations.count)",
                        ])
                }
                let maxBytes = self.maxBytes
                state.withLockedValue { s in
                    s.usedBytes += result.bytes
                    s.backlog = result.backlog
                    if s.refusing && s.usedBytes < maxBytes / 10 * 9 { s.refusing = false }
                }
                var next = result.ids.makeIterator()
                for op in operations {
                    if case .append(_, _, _, let completion) = op { completion(.success(next.next()!)) }
                }
            } catch {
                for location in stored { log.release(location) }  // written, but no row points at them
                for op in operations {
                    if case .append(_, _, _, let completion) = op { completion(.failure(error)) }
                }
            }
        }
    }

    /// Transactions the writer has run (for tests).
    let commits = NIOLockedValueBox(0)

    /// Sleeps the writer's thread (it is its own).
    private static func pause(_ d: Duration) {
        let micros = d.components.seconds * 1_000_000 + d.components.attoseconds / 1_000_000_000_000
        if micros > 0 { usleep(UInt32(clamping: micros)) }
    }

    /// One write transaction, committed with `synchronous=FULL` (on disk before this returns)
    /// when `durable`, else with `NORMAL` (in the WAL, flushed by the next durable commit or
    /// checkpoint). The writer's resting setting stays FULL.
    private static func transaction<T>(_ pool: DatabasePool, durable: Bool, _ body: (Database) throws -> T) throws -> T {
        guard !durable else { return try pool.write(body) }
        return try pool.writeWithoutTransaction { db in
            try db.execute(sql: "PRAGMA synchronous = NORMAL")
            var result: T?
            do {
                try db.inTransaction(.immediate) {
                    result = try body(db)
                    return .commit
                }
            } catch {
                try db.execute(sql: "PRAGMA synchronous = FULL")
                throw error
            }
            try db.execute(sql: "PRAGMA synchronous = FULL")
            return result!
        }
    }

    /// A durable commit of nothing of note: flushes the WAL, and with it the commits before it.
    private static func flushWAL(_ db: Database) throws {
        try db.execute(
            sql: "INSERT OR REPLACE INTO meta (key, value) VALUES ('last_flush', ?)",
            arguments: [String(Int64(Date().timeIntervalSince1970 * 1000))])
    }

    static func milliseconds(_ d: Duration) -> Int64 {
        d.components.seconds * 1000 + d.components.attoseconds / 1_000_000_000_000_000
    }

    /// Removes a delivery (keeping a dead letter if given) and its batch once no delivery needs it.
    /// Returns the bytes freed and the delivery's destination, nil when it was already finished; a
    /// batch whose bytes were in the payload log adds its location to `freed` (released once the
    /// transaction has committed).
    private static func finish(
        _ db: Database, delivery: Int64, deadLetter: DeadLetter?, now: Int64, log: PayloadLog, freed: inout [PayloadLocation]
    ) throws -> (bytes: Int, target: DeliveryTarget)? {
        if let deadLetter {
            guard
                let row = try Row.fetchOne(
                    db.cachedStatement(
                        sql: """
                            SELECT d.tenant, d.destination, b.id, b.key, b.received_at, b.segment, b.segment_offset, b.length
                            FROM deliveries d JOIN batches b ON b.id = d.batch_id WHERE d.id = ?
                            """),
                    arguments: [delivery])
            else {
                return nil
            }
            let batchID: Int64 = row["id"]
            let location = (row["segment"] as Int64?).map {
                PayloadLocation(segment: $0, offset: row["segment_offset"], length: row["length"])
            }
            // Dead letters keep their bytes in SQLite: they outlive the payload log's segments.
            let bytes: Data =
                try location.map { Data(try log.read($0).readableBytesView) }
                ?? (Data.fetchOne(db, sql: "SELECT payload FROM batches WHERE id = ?", arguments: [batchID]) ?? Data())
            try db.execute(
                sql: """
                    INSERT INTO dead_letters (batch_id, tenant, destination, key, payload, reason, attempts, received_at, failed_at)
                    VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
                    """,
                arguments: [
                    batchID, row["tenant"], row["destination"], row["key"], bytes, deadLetter.reason, deadLetter.attempts,
                    row["received_at"], now,
                ])
        }
        return try finishDelivered(db, delivery: delivery, freed: &freed)
    }

    /// The delivery's row goes, then its batch's if no other delivery needs it: two statements,
    /// each deleting and returning what the caller needs (it was four: a join, a delete, a count
    /// and a delete). Every request's batch ends here; the spool writer's SQLite work was a
    /// quarter of ingest's CPU at max load (perf, session 9).
    private static func finishDelivered(
        _ db: Database, delivery: Int64, freed: inout [PayloadLocation]
    ) throws -> (bytes: Int, target: DeliveryTarget)? {
        guard
            let gone = try Row.fetchOne(
                db.cachedStatement(sql: "DELETE FROM deliveries WHERE id = ? RETURNING batch_id, tenant, destination"),
                arguments: [delivery])
        else {
            return nil
        }
        let target = DeliveryTarget(tenant: gone["tenant"], destination: gone["destination"])
        let batchID: Int64 = gone["batch_id"]
        guard
            let batch = try Row.fetchOne(
                db.cachedStatement(
                    sql: """
                        DELETE FROM batches WHERE id = ? AND NOT EXISTS (SELECT 1 FROM deliveries WHERE batch_id = ?)
                        RETURNING length(payload) AS inline, segment, segment_offset, length
                        """),
                arguments: [batchID, batchID])
        else {
            return (0, target)
        }
        let location = (batch["segment"] as Int64?).map {
            PayloadLocation(segment: $0, offset: batch["segment_offset"], length: batch["length"])
        }
        if let location { freed.append(location) }
        return ((batch["inline"] as Int? ?? 0) + (location?.length ?? 0), target)
    }
}

