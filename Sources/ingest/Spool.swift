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
/// Two stores, the log first:
/// - The log (`PayloadLog`, records in `SpoolRecord` form) is what makes a batch durable: each
///   record carries the batch's ids, tenant, key, destinations with their delivery ids, and its
///   bytes. Appends from concurrent requests are grouped: one `pwrite` and one `fdatasync` carry
///   all that arrived while the previous group was being written, then the requests are answered.
/// - SQLite (WAL mode, `synchronous=FULL`) is the state applied from the log: which deliveries
///   are still waiting, where their bytes are, the dead letters. The writer applies what the log
///   holds every `applyInterval` in one transaction that also stores the last record's sequence
///   number. A batch whose destinations all had it before then never touches SQLite: at max load
///   that is nearly every batch, and SQLite's part of each request (two statements to insert, two
///   to delete, a commit with its fsync per group) was a quarter of ingest's CPU (perf, session 12).
///
/// After a crash, the records past the stored sequence number are read back from the log at
/// start and applied (`PayloadLog.records`): nothing acknowledged is lost. Completions since the
/// last apply are lost with the process, so those deliveries are sent again (at least once). The
/// files are private to the service user (0600).
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
        /// `full`: every batch, however young; `replays`: look for dead letters put back by
        /// `ingest dead-letters replay`.
        case apply(full: Bool, replays: Bool, @Sendable (Result<Void, any Error>) -> Void)
        /// The applier's thread finished an apply.
        case applied(ApplyWork, Result<ApplyResult, any Error>)
    }

    typealias Completion = @Sendable (Result<[Int64], any Error>) -> Void

    private struct State {
        var queue: [Operation] = []
        var writing = false
        var usedBytes = 0
        /// Set when a request was refused for lack of room; cleared once usage falls below 90%.
        var refusing = false
        var backlog: [DeliveryTarget: Int] = [:]
        /// An apply from the timer is queued and not yet run.
        var applyQueued = false
        var ticks = 0
    }

    /// What the log holds and SQLite has not been told yet. Changed only by the writer (its
    /// thread); read by `pending`.
    private struct Unapplied {
        struct Batch {
            var tenant: String
            var key: String?
            var receivedAt: Int64
            /// When it was written (monotonic: a wall clock stepped back must not keep batches young).
            var written: ContinuousClock.Instant
            var sequence: UInt64
            var payload: PayloadLocation
            /// Deliveries not finished yet.
            var deliveries: [SpoolRecord.Delivery]
        }

        var batches: [Int64: Batch] = [:]
        /// Delivery id → batch id, for the deliveries in `batches`.
        var batchOf: [Int64: Int64] = [:]
        /// Per destination, the ids of its deliveries in `batches`, in order: for `pending`. Ids
        /// no longer in `batchOf` (finished) are skipped, and dropped at the next apply.
        var lanes: [DeliveryTarget: [Int64]] = [:]
        /// Per destination, how many unfinished deliveries SQLite holds (never fewer): a read
        /// for a destination it holds none of skips the query.
        var stored: [DeliveryTarget: Int] = [:]
        /// Completions for SQLite to apply: of deliveries it holds, and dead letters (their
        /// batches go to SQLite first).
        var finishes: [(id: Int64, deadLetter: DeadLetter?)] = []
        /// The ids of `finishes` (kept with it: a read checks its candidates against them).
        var finishing: Set<Int64> = []
        /// Counts the applies that ended: what SQLite holds of the deliveries changes only with
        /// one (see `ReadAhead`).
        var generation: UInt64 = 0
        /// The last record written to the log, and the last one SQLite holds.
        var sequence: UInt64
        var appliedSequence: UInt64
        var nextBatchID: Int64
        var nextDeliveryID: Int64
        /// A dead letter waits: the next apply takes every batch (the dead letter's first).
        var forceFull = false
        /// The batches of the apply running on the applier's thread (nil: none runs); the
        /// requests for applies made meanwhile.
        var applying: [Int64: Batch]?
        /// The deliveries whose completions that apply takes to SQLite.
        var applyingFinishes: Set<Int64> = []
        var deferred: [(full: Bool, replays: Bool, requests: [@Sendable (Result<Void, any Error>) -> Void])] = []
        /// When the applied sequence number was last stored.
        var lastProgress = ContinuousClock.now
    }

    private let db: DatabasePool
    /// Deliveries spooled and not yet sent, so the pump need not read them back.
    private let fresh: NIOLockedValueBox<FreshDeliveries>
    /// The log: the batches, as records.
    private let log: PayloadLog
    private let state = NIOLockedValueBox(State())
    private let unapplied: NIOLockedValueBox<Unapplied>
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
    nonisolated(unsafe) private let applyTimer: DispatchSourceTimer

    /// After a group of at least `commitDelayOperations`, the writer waits this long before it
    /// takes the next: see `drain`.
    let commitDelay: Duration
    let commitDelayOperations: Int
    /// How often the writer applies the log to SQLite (completions of deliveries SQLite holds, dead
    /// letters, replays), and how long a batch may wait in the log alone before it is applied:
    /// nearly every batch is delivered sooner and never touches SQLite.
    let applyInterval: Duration
    let applyAfter: Duration

    init(
        directory: String, maxBytes: Int, maxBacklogPerDestination: Int = 100_000, segmentBytes: Int64 = 64 << 20,
        commitDelay: Duration = .microseconds(IngestSettings().spoolCommitDelayUs), commitDelayOperations: Int = 8, applyInterval: Duration = .milliseconds(100),
        applyAfter: Duration = .seconds(1), freshMaxBytes: Int = 4 << 20, logger: Logger = Logger(label: "sluice.spool")
    ) throws {
        self.logger = logger
        self.applyAfter = applyAfter
        self.commitDelay = commitDelay
        self.commitDelayOperations = commitDelayOperations
        self.applyInterval = applyInterval
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
        // disk before the log's records it applied can go.
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
        // What the log holds past what SQLite was told: a crash's unapplied records.
        let recovered = try Spool.recover(db, directory: directory, logger: logger)
        let used = try db.read { db in try Int.fetchOne(db, sql: "SELECT \(Spool.storedBytes) FROM batches") ?? 0 }
        let references = try db.read { db in
            try Row.fetchAll(db, sql: "SELECT segment, COUNT(*) AS n FROM batches WHERE segment IS NOT NULL GROUP BY segment")
        }
        log = try PayloadLog(
            directory: directory, references: Dictionary(uniqueKeysWithValues: references.map { ($0["segment"], $0["n"]) }),
            applied: recovered.sequence, segmentBytes: segmentBytes)
        let backlog = try db.read { db in
            try Row.fetchAll(db, sql: "SELECT tenant, destination, COUNT(*) AS n FROM deliveries GROUP BY tenant, destination")
        }
        fresh = NIOLockedValueBox(FreshDeliveries(lastDeliveryID: recovered.nextDeliveryID - 1, maxBytes: freshMaxBytes))
        var unappliedState = Unapplied(
            sequence: recovered.sequence, appliedSequence: recovered.sequence, nextBatchID: recovered.nextBatchID,
            nextDeliveryID: recovered.nextDeliveryID)
        state.withLockedValue { s in
            s.usedBytes = used
            for row in backlog { s.backlog[DeliveryTarget(tenant: row["tenant"], destination: row["destination"])] = row["n"] }
            unappliedState.stored = s.backlog
        }
        unapplied = NIOLockedValueBox(unappliedState)
        for file in [path, path + "-wal", path + "-shm"] where FileManager.default.fileExists(atPath: file) {
            chmod(file, 0o600)
        }
        applyTimer = DispatchSource.makeTimerSource(queue: DispatchQueue(label: "sluice.spool.apply"))
        let interval = Double(applyInterval.components.seconds) + Double(applyInterval.components.attoseconds) / 1e18
        applyTimer.schedule(deadline: .now() + interval, repeating: interval)
        applyTimer.setEventHandler { [weak self] in self?.applySoon() }
        applyTimer.resume()
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
    /// holding these batches is durable in the log, or at once (no destinations: `[]`; no room:
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

    /// Applies everything the log holds to SQLite now and waits for it (never on an event loop or
    /// the writer's thread): for shutdown, readers of the database file, and tests.
    func flush() throws {
        assert(MultiThreadedEventLoopGroup.currentEventLoop == nil, "a spool flush on an event loop")
        let done = DispatchSemaphore(value: 0)
        let outcome = NIOLockedValueBox<Result<Void, any Error>>(.success(()))
        enqueue(.apply(full: true, replays: true) { result in
            outcome.withLockedValue { $0 = result }
            done.signal()
        })
        done.wait()
        try outcome.withLockedValue { $0 }.get()
    }

    /// Stops applying on a timer and applies what is left: a clean stop leaves nothing for the
    /// next start to read back from the log.
    func close() throws {
        applyTimer.cancel()
        try flush()
    }

    /// The timer's apply: queued unless one is already waiting. Replays are looked for once a
    /// second.
    private func applySoon() {
        let queue = state.withLockedValue { s -> Bool in
            if s.applyQueued { return false }
            s.applyQueued = true
            s.ticks += 1
            return true
        }
        guard queue else { return }
        let replays = state.withLockedValue { $0.ticks } % 10 == 0
        enqueue(.apply(full: false, replays: replays) { [logger] result in
            if case .failure(let error) = result {
                logger.warning("spool: applying the log to SQLite failed; will try again", metadata: ["error": "\(error)"])
            }
        })
    }

    /// Up to `limit` deliveries waiting for `target` with an id above `after`, oldest first, and
    /// no more of them than fit in `maxBytes` (at least one): from memory when asked and it holds
    /// them all (`FreshDeliveries`; the pump asks), else from SQLite and the log (with what the
    /// log holds and SQLite does not yet). Only the payloads returned are read from the log.
    func pending(
        _ target: DeliveryTarget, after: Int64, limit: Int, maxBytes: Int = .max, fromMemory: Bool = false
    ) throws -> [SpooledDelivery] {
        guard fromMemory else { return try read(target, after: after, through: .max, limit: limit, maxBytes: maxBytes).found }
        if let known = pendingInMemory(target, after: after, limit: limit, maxBytes: maxBytes) { return known }
        // Below the lane's in-memory floor (after a refusal, a reconnect, an eviction): only the
        // deliveries up to the floor are read back, memory holds every one after it. (Reading
        // `limit` of them from the spool read back ~8 deliveries per one evicted: at max load
        // per event with 50 tenants, ingest's `pread`s outnumbered its requests two to one.)
        let floor = fresh.withLockedValue { $0.floor(of: target) }
        let (found, complete) = try read(target, after: after, through: floor, limit: limit, maxBytes: maxBytes)
        // Memory's part only after every delivery up to the floor (a read cut short by the limit
        // or the bytes must not be followed by later ones: the lane's cursor would pass those it
        // left out). A floor raised meanwhile (another eviction) leaves memory's part to the next read.
        guard complete, found.count < limit else { return found }
        let bytes = found.reduce(0) { $0 + $1.payload.readableBytes }
        guard let more = pendingInMemory(target, after: floor, limit: limit - found.count, maxBytes: maxBytes - bytes) else {
            return found
        }
        return found + more.prefix(.max, maxBytes: maxBytes - bytes, atLeastOne: found.isEmpty) { $0.payload.readableBytes }
    }

    /// Deliveries read back by `pending` from SQLite and the log (for tests: the metric is global).
    let readBack = NIOLockedValueBox(0)

    /// `pending` from SQLite and the log, ids up to `through`; `complete`: every unfinished one up
    /// to `through` is in `found`.
    private func read(
        _ target: DeliveryTarget, after: Int64, through: Int64, limit: Int, maxBytes: Int
    ) throws -> (found: [SpooledDelivery], complete: Bool) {
        assert(MultiThreadedEventLoopGroup.currentEventLoop == nil, "a spool read on an event loop")
        // The unapplied first: an apply between the two reads moves them into SQLite, so they are
        // seen once or twice (kept once), never missed.
        let (recent, recentCut, bound, finished, inSQLite, generation) = unapplied.withLockedValue { u in
            var found: [Candidate] = []
            // Only as many as fit in `maxBytes` (those after cannot be chosen): at max load a read
            // has room for a delivery or two, and taking `limit` of them cost more than the read.
            var bytes = 0
            var cut = false
            // Finished, and SQLite not told yet: not to be sent again.
            let finished = (u.applyingFinishes, u.finishing)
            // (An apply that moves some of `found` into SQLite counts them when it takes them out of memory.)
            let inSQLite = (u.stored[target] ?? 0) != 0
            guard let ids = u.lanes[target] else { return (found, cut, u.nextDeliveryID, finished, inSQLite, u.generation) }
            for id in ids[ids.countOfPrefix { $0 <= after }...] {
                if id > through { break }
                guard let batchID = u.batchOf[id], let b = u.batches[batchID] ?? u.applying?[batchID] else { continue }
                if !found.isEmpty && bytes + b.payload.length > maxBytes {
                    cut = true
                    break
                }
                bytes += b.payload.length
                found.append(Candidate(id: id, batchID: batchID, key: b.key, source: .log(b.payload)))
                if found.count == limit { break }
            }
            return (found, cut, u.nextDeliveryID, finished, inSQLite, u.generation)
        }
        // Under load nearly every read is of deliveries still only in the log: the query (a
        // reader transaction behind a queue hop) was ~10% of ingest's CPU at max per event with
        // 50 tenants.
        let rows = !inSQLite ? (found: [], complete: true) : try sqliteRows(
            target, after: after, through: min(through, bound - 1), bound: bound, limit: limit, generation: generation)
        // Ids handed out after the memory was read (a replay taken in meanwhile, in SQLite) may
        // come after ones handed out meanwhile and still only in the log: left to the next read.
        let complete = rows.complete && through < bound && recent.count < limit && !recentCut
        var candidates = rows.found.filter { !finished.0.contains($0.id) && !finished.1.contains($0.id) }
        // Both in id order (ids of replays taken in are above those of batches still only in the
        // log); an apply between the two reads may show one in both.
        if !recent.isEmpty {
            let known = Set(candidates.map(\.id))
            candidates += recent.filter { !known.contains($0.id) }
            candidates.sort { $0.id < $1.id }
        }
        let chosen = candidates.prefix(limit, maxBytes: maxBytes) { $0.source.length }
        let found = try chosen.map { c in
            let payload: ByteBuffer
            switch c.source {
            case .log(let location): payload = try log.read(location)
            case .inline(let data): payload = ByteBuffer(data: data)
            }
            return SpooledDelivery(id: c.id, batchID: c.batchID, target: target, key: c.key, payload: payload)
        }
        readBack.withLockedValue { $0 += found.count }
        IngestMetrics.shared.spoolReadBack.increment(by: Int64(found.count))
        return (found, complete && found.count == candidates.count)
    }

    /// SQLite's unfinished deliveries of `target` with ids in (`after`, `through`], at most
    /// `limit`, in id order; `complete`: no more in that range. `bound`: every id SQLite can hold
    /// is below it (ids handed out later come from the log, or from replays, which an apply tells
    /// the rows kept). Read `readAheadRows` at a time, the rows beyond `limit` kept (`ReadAhead`)
    /// and the next read continues from them: at max load the feeder reads back a delivery or two
    /// per answer from the router (the room one ack made), and a query each — a reader
    /// transaction behind a queue hop — was 9% of ingest's CPU per event with 50 tenants.
    private func sqliteRows(
        _ target: DeliveryTarget, after: Int64, through: Int64, bound: Int64, limit: Int, generation: UInt64
    ) throws -> (found: [Candidate], complete: Bool) {
        let served = readAhead.withLockedValue { all -> (found: [Candidate], complete: Bool)? in
            guard all[target]?.generation == generation else { return nil }
            all[target]!.usedAt = generation
            return all[target]!.take(after: after, through: through, limit: limit)
        }
        if let served { return served }
        let batch = max(limit, Self.readAheadRows)
        let found = try db.read { db in
            var found: [Candidate] = []
            let rows = try Row.fetchCursor(
                db.cachedStatement(
                    sql: """
                        SELECT d.id, d.batch_id, b.key, b.segment, b.segment_offset, b.length, b.payload
                        FROM deliveries d JOIN batches b ON b.id = d.batch_id
                        WHERE d.tenant = ? AND d.destination = ? AND d.id > ? AND d.id < ? ORDER BY d.id LIMIT ?
                        """),
                arguments: [target.tenant, target.destination, after, bound, batch])
            while let row = try rows.next() {
                let source: Candidate.Source
                if let segment: Int64 = row[3] {
                    source = .log(PayloadLocation(segment: segment, offset: row[4], length: row[5]))
                } else {
                    source = .inline(row[6])  // a row of an older spool
                }
                found.append(Candidate(id: row[0], batchID: row[1], key: row[2], source: source))
            }
            return found
        }
        // Fewer than asked for: every one SQLite holds (until an apply adds more, and tells).
        var kept = ReadAhead(
            generation: generation, usedAt: generation, after: after, through: found.count < batch ? .max : found.last!.id,
            found: found)
        let result = kept.take(after: after, through: through, limit: limit)!
        // (Not rows of an older spool, which carry their payloads.)
        if !found.contains(where: \.isInline) {
            readAhead.withLockedValue { all in
                kept.trim(to: Self.readAheadCap(destinations: all.count + (all[target] == nil ? 1 : 0)))
                all[target] = kept
            }
        }
        return result
    }

    /// What an apply changed in SQLite, told to the rows read ahead (on the writer's thread, in
    /// the apply's end, before any read sees its generation): the deliveries it finished leave
    /// them, those it took from the log join them, and a replay (never one they cover: its id is
    /// newer than any when they were read) ends what they cover before it. Dropping them all
    /// instead made every lane query again after each apply (ten a second at max load), 128 rows
    /// for the few it would send before the next.
    private func updateReadAhead(for work: ApplyWork, _ result: ApplyResult, generation: UInt64) {
        // (Only for the destinations that keep rows: this runs on the writer's thread.)
        let keeping = readAhead.withLockedValue { Set($0.keys) }
        guard !keeping.isEmpty else { return }
        var inserted: [DeliveryTarget: [Candidate]] = [:]
        for (batchID, b) in work.batches {
            for d in b.deliveries {
                let target = DeliveryTarget(tenant: b.tenant, destination: d.destination)
                guard keeping.contains(target) else { continue }
                inserted[target, default: []].append(Candidate(id: d.id, batchID: batchID, key: b.key, source: .log(b.payload)))
            }
        }
        var firstReplay: [DeliveryTarget: Int64] = [:]
        for r in work.replays { firstReplay[r.delivery.target] = min(firstReplay[r.delivery.target] ?? r.delivery.id, r.delivery.id) }
        var finished: [DeliveryTarget: Set<Int64>] = [:]
        for d in result.finished { finished[d.target, default: []].insert(d.id) }
        readAhead.withLockedValue { all in
            // (One of an older generation was stale already, and one kept since the look above
            // was not seen here: never to be made current. One no read used for ten applies — a
            // second at most — goes: its lane reads from memory, or is idle.)
            all = all.filter {
                $0.value.generation == generation &- 1 && keeping.contains($0.key) && generation &- $0.value.usedAt <= 10
            }
            let cap = Self.readAheadCap(destinations: all.count)
            for target in all.keys {
                all[target]!.update(
                    removing: finished[target] ?? [], inserting: inserted[target] ?? [], firstReplay: firstReplay[target],
                    cap: cap, generation: generation)
            }
        }
    }

    /// How many rows a read of SQLite takes (`sqliteRows`).
    static let readAheadRows = 128
    /// How many rows a destination keeps when `destinations` keep some: 256, fewer when many do
    /// (all together ≈ 16k rows, ≈ 1 MB), at least 16.
    static func readAheadCap(destinations: Int) -> Int { min(readAheadRows * 2, max(16, 16_384 / max(1, destinations))) }

    /// Per destination, the rows its last read of SQLite took (`sqliteRows`).
    private let readAhead = NIOLockedValueBox<[DeliveryTarget: ReadAhead]>([:])

    /// Every unfinished delivery SQLite holds for one destination with an id in (`after`,
    /// `through`] (`.max`: every one), in id order, as of the apply `generation`: SQLite's
    /// deliveries change only in an apply, and each one's end updates it (`update`). A read made
    /// before an apply ended and kept after it carries the older generation and is not used.
    /// (Those finished since the last apply are left out by the read, as it leaves out its
    /// query's.)
    struct ReadAhead {
        var generation: UInt64
        /// The generation of the last read that took from it.
        var usedAt: UInt64
        var after: Int64
        var through: Int64
        var found: [Candidate]

        mutating func update(
            removing finished: Set<Int64>, inserting inserted: [Candidate], firstReplay: Int64?, cap: Int, generation: UInt64
        ) {
            if !finished.isEmpty { found.removeAll { finished.contains($0.id) } }
            if let first = firstReplay, first <= through {
                through = first - 1
                found.removeAll { $0.id > through }
            }
            var joining = inserted.filter { $0.id > after && $0.id <= through && !finished.contains($0.id) }
            if !joining.isEmpty {
                joining.sort { $0.id < $1.id }
                if found.last.map({ $0.id < joining[0].id }) ?? true {
                    found += joining  // newer than all it holds: the usual case
                } else {
                    found = Self.merged(found, joining)
                }
            }
            trim(to: cap)
            self.generation = generation
        }

        /// Two id-ordered lists as one, a row in both once (a query made after the apply's commit
        /// saw what the apply tells).
        static func merged(_ a: [Candidate], _ b: [Candidate]) -> [Candidate] {
            var out: [Candidate] = []
            out.reserveCapacity(a.count + b.count)
            var i = 0
            var j = 0
            while i < a.count || j < b.count {
                if j == b.count || (i < a.count && a[i].id < b[j].id) {
                    out.append(a[i])
                    i += 1
                } else {
                    if i < a.count && a[i].id == b[j].id { i += 1 }
                    out.append(b[j])
                    j += 1
                }
            }
            return out
        }

        mutating func trim(to cap: Int) {
            guard found.count > cap else { return }
            found.removeLast(found.count - cap)
            through = found.last!.id
        }

        /// Its rows in (`from`, `to`], at most `limit`, when it holds all of them or `limit`; nil
        /// when it cannot tell. The rows up to `from` are dropped (the lane's cursor is past them).
        mutating func take(after from: Int64, through to: Int64, limit: Int) -> (found: [Candidate], complete: Bool)? {
            guard from >= after else { return nil }
            found.removeFirst(found.countOfPrefix { $0.id <= from })
            after = from
            var rows: [Candidate] = []
            for row in found {
                if row.id > to || rows.count == limit { break }
                rows.append(row)
            }
            if rows.count == limit { return (rows, false) }
            return to <= through ? (rows, true) : nil
        }
    }

    /// A delivery `read` found, before its payload is read.
    struct Candidate {
        enum Source {
            case log(PayloadLocation)
            case inline(Data)
            var length: Int {
                switch self {
                case .log(let location): location.length
                case .inline(let data): data.count
                }
            }
        }
        var id: Int64
        var batchID: Int64
        var key: String?
        var source: Source
        var isInline: Bool { if case .inline = source { true } else { false } }
    }

    /// `pending` from memory alone, without touching the disk: nil when memory cannot answer (the
    /// lane is below its in-memory floor: after a refusal, a reconnect or an eviction).
    func pendingInMemory(_ target: DeliveryTarget, after: Int64, limit: Int, maxBytes: Int = .max) -> [SpooledDelivery]? {
        fresh.withLockedValue { $0.waiting(target, after: after, limit: limit, maxBytes: maxBytes) }
    }

    /// The deliveries of `target` up to `id` went to the router.
    func sent(_ target: DeliveryTarget, upTo id: Int64) {
        fresh.withLockedValue { $0.sent(target, upTo: id) }
    }

    /// Bytes of batches held in memory for the pump.
    var freshBytes: Int { fresh.withLockedValue { $0.heldBytes } }

    /// Bytes held in memory for `target` (see `FreshDeliveries.heldBytes(of:)`).
    func freshBytes(of target: DeliveryTarget) -> Int { fresh.withLockedValue { $0.heldBytes(of: target) } }

    /// Bytes held in memory for every destination but `excluded`, and how many of them hold some.
    func freshBytes(excluding excluded: Set<DeliveryTarget>) -> (bytes: Int, destinations: Int) {
        fresh.withLockedValue { $0.heldBytes(excluding: excluded) }
    }

    /// What the feeder's memory may hold (`freshMaxBytes`).
    var freshCapacity: Int { fresh.withLockedValue { $0.maxBytes } }

    /// Payload log segments and their sizes, for tests.
    var segments: [Int64: Int64] { log.segments }

    deinit {
        checkpointTimer.cancel()
        applyTimer.cancel()
    }

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

    /// Batches held (applies the log first: not on an event loop).
    var count: Int {
        (try? flush()).flatMap { try? db.read { db in try Int.fetchOne(db, sql: "SELECT COUNT(*) FROM batches") } } ?? 0
    }

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

    /// The writer: takes everything queued — appends, completions, applies — until the queue is
    /// empty. Appends of one pass are one group: one log write and fdatasync for them all.
    ///
    /// A group's cost is mostly per group, not per append (the flush, the thread's wake-ups): so
    /// while groups come in large — a sign that requests arrive faster than they are written —
    /// the writer waits `commitDelay` before it takes the next one, which grows it. After a small
    /// group, or once the queue ran dry, it takes the next at once: at low load nothing waits.
    /// Measured (`Benchmarks/ab`, docs/BENCHMARKS.md): 300 µs against none (session 12, 6 rounds
    /// per event with 50 tenants at max): groups of 12.7 → 15 operations, ingest's CPU per request
    /// −5%, p99 lower in every round; 1 ms against 300 µs (session 26, 2 rounds, 3 modes at max):
    /// half the commits, ingest's CPU per request −10 to −26% in all 6, p99 at max lower in all 6.
    /// `ingest.spool_commit_delay_us` sets it.
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
            var appends: [Append] = []
            var completions: [(id: Int64, deadLetter: DeadLetter?)] = []
            var applies: [@Sendable (Result<Void, any Error>) -> Void] = []
            var full = false
            var replays = false
            var applied: [(ApplyWork, Result<ApplyResult, any Error>)] = []
            for op in operations {
                switch op {
                case .append(let batches, let tenant, let destinations, let completion):
                    appends.append(Append(batches: batches, tenant: tenant, destinations: destinations, completion: completion))
                case .complete(let id, let deadLetter): completions.append((id, deadLetter))
                case .apply(let all, let lookForReplays, let done):
                    applies.append(done)
                    full = full || all
                    replays = replays || lookForReplays
                case .applied(let work, let result): applied.append((work, result))
                }
            }
            previous = appends.count + completions.count
            let done = completions.isEmpty ? [] : finish(completions)
            if !appends.isEmpty || !done.isEmpty { write(appends, done: done) }
            for (work, result) in applied { finishApply(work, result) }
            if !applies.isEmpty {
                state.withLockedValue { $0.applyQueued = false }
                startApply(full: full, replays: replays, requests: applies)
            }
            IngestMetrics.shared.spoolCommittedOperations.increment(by: Int64(previous))
        }
    }

    private struct Append {
        var batches: [ValidatedBatch]
        var tenant: String
        var destinations: [String]
        var completion: Completion
    }

    /// Writes a group to the log — a record of the deliveries `done` and one per appended batch —
    /// and answers the appends once it is durable. Without appends, the done record is written
    /// without a flush of its own: it survives the process and reaches the disk with the next
    /// group (lost to a power loss, its deliveries would only be sent again).
    private func write(_ appends: [Append], done: [Int64]) {
        let stopwatch = Stopwatch()
        let now = Int64(Date().timeIntervalSince1970 * 1000)
        var (sequence, nextBatchID, nextDeliveryID) = unapplied.withLockedValue { ($0.sequence, $0.nextBatchID, $0.nextDeliveryID) }
        var joined = ByteBuffer()
        joined.reserveCapacity(done.count * 8 + 20 + appends.reduce(0) { $0 + $1.batches.reduce(0) { $0 + $1.bytes.readableBytes + 128 } })
        if !done.isEmpty {
            sequence += 1
            SpoolRecord.writeDone(sequence: sequence, deliveries: done, to: &joined)
        }
        // Per batch: its record's payload offset in `joined`, its record.
        var written: [(offset: Int, record: SpoolRecord, batch: ValidatedBatch)] = []
        var ids: [[Int64]] = []
        for append in appends {
            var these: [Int64] = []
            for b in append.batches {
                sequence += 1
                let deliveries = append.destinations.map { d -> SpoolRecord.Delivery in
                    defer { nextDeliveryID += 1 }
                    return SpoolRecord.Delivery(id: nextDeliveryID, destination: d)
                }
                let record = SpoolRecord(
                    sequence: sequence, batchID: nextBatchID, receivedAt: now, tenant: append.tenant, key: b.mpid, deliveries: deliveries)
                let start = joined.writerIndex
                let payloadStart = record.write(payload: b.bytes, to: &joined)
                written.append((start + payloadStart, record, b))
                these.append(nextBatchID)
                nextBatchID += 1
            }
            ids.append(these)
        }
        let durable = !appends.isEmpty
        if durable { commits.withLockedValue { $0 += 1 } }
        let at: (segment: Int64, offset: Int64)
        do {
            at = try log.append(joined, batches: written.count, lastSequence: sequence, durable: durable)
        } catch {
            // Its records may be on disk, whole: their sequence numbers and ids are never used
            // again (the log goes on in a new segment), so a restart cannot confuse them with later
            // ones. Read back, they are delivered although their requests failed: at least once.
            unapplied.withLockedValue { u in
                u.sequence = sequence
                u.nextBatchID = nextBatchID
                u.nextDeliveryID = nextDeliveryID
            }
            if !durable { logger.warning("spool: finished deliveries could not be logged", metadata: ["error": "\(error)"]) }
            for append in appends { append.completion(.failure(error)) }
            return
        }
        guard durable else {
            unapplied.withLockedValue { $0.sequence = sequence }
            return
        }
        let logTime = stopwatch.elapsed
        IngestMetrics.shared.spoolPayloadWrite.record(logTime)
        var bytes = 0
        var targets: [DeliveryTarget] = []
        let writtenAt = ContinuousClock.now
        unapplied.withLockedValue { u in
            u.sequence = sequence
            u.nextBatchID = nextBatchID
            u.nextDeliveryID = nextDeliveryID
            for w in written {
                let payload = PayloadLocation(segment: at.segment, offset: at.offset + Int64(w.offset), length: w.batch.bytes.readableBytes)
                u.batches[w.record.batchID] = .init(
                    tenant: w.record.tenant, key: w.record.key, receivedAt: w.record.receivedAt, written: writtenAt,
                    sequence: w.record.sequence,
                    payload: payload, deliveries: w.record.deliveries)
                for d in w.record.deliveries {
                    u.batchOf[d.id] = w.record.batchID
                    u.lanes[DeliveryTarget(tenant: w.record.tenant, destination: d.destination), default: []].append(d.id)
                }
            }
        }
        fresh.withLockedValue { f in
            for w in written {
                for d in w.record.deliveries {
                    let target = DeliveryTarget(tenant: w.record.tenant, destination: d.destination)
                    f.inserted(SpooledDelivery(id: d.id, batchID: w.record.batchID, target: target, key: w.record.key, payload: w.batch.bytes))
                    targets.append(target)
                }
                bytes += w.batch.bytes.readableBytes
            }
        }
        state.withLockedValue { s in
            s.usedBytes += bytes
            for target in targets { s.backlog[target, default: 0] += 1 }
        }
        stopwatch.record(into: IngestMetrics.shared.spoolCommit)
        if stopwatch.elapsed > .milliseconds(100) {
            logger.warning(
                "slow spool write",
                metadata: [
                    "spool.write_ms": "\(Spool.milliseconds(stopwatch.elapsed))", "spool.payload_log_ms": "\(Spool.milliseconds(logTime))",
                    "spool.appends": "\(appends.count)",
                ])
        }
        for (append, these) in zip(appends, ids) { append.completion(.success(these)) }
    }

    /// Completions: a delivery SQLite has not been told of is forgotten in memory (with its batch
    /// once it was the last); those SQLite has, and every dead letter, wait for the next apply.
    /// Returns the deliveries to log as done (all but dead letters).
    private func finish(_ completions: [(id: Int64, deadLetter: DeadLetter?)]) -> [Int64] {
        var finished: [(id: Int64, target: DeliveryTarget)] = []
        var emptied: [Int64] = []
        var bytes = 0
        var done: [Int64] = []
        unapplied.withLockedValue { u in
            for c in completions {
                if c.deadLetter == nil { done.append(c.id) }
                guard c.deadLetter == nil, let batchID = u.batchOf[c.id], var batch = u.batches[batchID],
                    let index = batch.deliveries.firstIndex(where: { $0.id == c.id })
                else {
                    // SQLite's (or a repeated ack, which finds nothing there), of a batch being
                    // applied, or a dead letter: its batch goes to SQLite at the next apply, then
                    // the dead letter; an ack repeated meanwhile must not take the delivery out of
                    // the batch before that.
                    u.batchOf[c.id] = nil
                    if c.deadLetter != nil { u.forceFull = true }
                    u.finishes.append(c)
                    u.finishing.insert(c.id)
                    continue
                }
                u.batchOf[c.id] = nil
                finished.append((c.id, DeliveryTarget(tenant: batch.tenant, destination: batch.deliveries.remove(at: index).destination)))
                if batch.deliveries.isEmpty {
                    u.batches[batchID] = nil
                    emptied.append(batch.payload.segment)
                    bytes += batch.payload.length
                } else {
                    u.batches[batchID] = batch
                }
            }
        }
        if !finished.isEmpty {
            fresh.withLockedValue { f in
                for d in finished { f.finished(d.id, target: d.target) }
            }
            updateCounts(freed: bytes, finished: finished.map(\.target), added: [])
            for segment in emptied { log.release(segment) }
        }
        return done
    }

    /// What one apply takes, as the writer saw it when it started the apply.
    private struct ApplyWork: Sendable {
        var batches: [Int64: Unapplied.Batch]
        var finishes: [(id: Int64, deadLetter: DeadLetter?)]
        var sequence: UInt64
        var fromSegment: Int64
        var backlog: [DeliveryTarget: Int]
        /// Dead letters put back, with the ids the writer gave them.
        var replays: [(row: Int64, batchID: Int64, delivery: SpooledDelivery)]
        var nextBatchID: Int64
        var nextDeliveryID: Int64
        var full: Bool
        var requests: [@Sendable (Result<Void, any Error>) -> Void]
    }

    /// What SQLite did with it.
    private struct ApplyResult: Sendable {
        var finished: [(id: Int64, target: DeliveryTarget)] = []
        var freed: [PayloadLocation] = []
        var freedBytes = 0
        var elapsed = Duration.zero
    }

    /// An apply tells SQLite what the log holds that it does not, in one transaction committed to
    /// disk with the sequence number up to which SQLite then holds everything (a restart reads
    /// back only the records after it): the batches that have waited `applyAfter` — or all of
    /// them when `full` (a flush, a dead letter) —, the completions of deliveries SQLite has, dead
    /// letters, the backlog cap, and dead letters put back by `ingest dead-letters replay`.
    /// Batches delivered sooner never touch SQLite. The backlog cap takes the oldest of a
    /// destination from SQLite only: they are older than any still only in the log, which the
    /// cap reaches once they have waited `applyAfter` (a destination that is down must not bring
    /// every other tenant's young batches into SQLite).
    ///
    /// Starts an apply (on the writer's thread): what is to go to SQLite is handed to the
    /// applier's thread, and the writer goes on writing the log meanwhile (an apply of a few
    /// hundred batches is milliseconds of SQLite: appends waited for it when the writer did it
    /// itself). One apply at a time: requests made while one runs wait for it.
    private func startApply(full requested: Bool, replays lookForReplays: Bool, requests: [@Sendable (Result<Void, any Error>) -> Void]) {
        let running = unapplied.withLockedValue { u -> Bool in
            guard u.applying != nil else { return false }
            u.deferred.append((requested, lookForReplays, requests))
            return true
        }
        if running { return }
        let backlog = state.withLockedValue { $0.backlog }
        let over = backlog.contains { $0.value > maxBacklogPerDestination }
        let clock = ContinuousClock.now
        let cutoff = clock - applyAfter
        var replays: [Row] = []
        if lookForReplays {
            do {
                replays = try db.read { db in try Row.fetchAll(db, sql: "SELECT * FROM replays ORDER BY id LIMIT 1000") }
            } catch {
                for request in requests { request(.failure(error)) }
                return
            }
        }
        let work = unapplied.withLockedValue { u -> ApplyWork? in
            let full = requested || u.forceFull
            // One pass, and only the batches taken are copied (most are left for a later apply:
            // copying those too, ten times a second, was 2–3% of ingest's CPU at max).
            var batches: [Int64: Unapplied.Batch] = [:]
            var firstLeft: (sequence: UInt64, segment: Int64)?
            if full {
                batches = u.batches
            } else {
                for (id, batch) in u.batches {
                    if batch.written <= cutoff {
                        batches[id] = batch
                    } else {
                        firstLeft = (
                            min(firstLeft?.sequence ?? .max, batch.sequence), min(firstLeft?.segment ?? .max, batch.payload.segment)
                        )
                    }
                }
            }
            // SQLite will hold every record up to the first batch left out.
            let sequence = max(u.appliedSequence, firstLeft.map { $0.sequence - 1 } ?? u.sequence)
            // Nothing but the sequence number to store: once a second is enough (it lets segments go).
            let progress = sequence > u.appliedSequence && (requested || clock - u.lastProgress >= .seconds(1))
            guard !batches.isEmpty || !u.finishes.isEmpty || over || !replays.isEmpty || progress else { return nil }
            var work = ApplyWork(
                batches: batches, finishes: u.finishes, sequence: sequence,
                // Where the records after `sequence` begin: the first batch left out, or what comes next.
                fromSegment: firstLeft?.segment ?? log.currentSegment, backlog: backlog, replays: [],
                nextBatchID: u.nextBatchID, nextDeliveryID: u.nextDeliveryID, full: full, requests: requests)
            for row in replays {
                let target = DeliveryTarget(tenant: row["tenant"], destination: row["destination"])
                let payload: Data = row["payload"]
                work.replays.append(
                    (row["id"], u.nextBatchID,
                     SpooledDelivery(
                        id: u.nextDeliveryID, batchID: u.nextBatchID, target: target, key: row["key"], payload: ByteBuffer(data: payload))))
                u.nextBatchID += 1
                u.nextDeliveryID += 1
            }
            work.nextBatchID = u.nextBatchID
            work.nextDeliveryID = u.nextDeliveryID
            for id in batches.keys { u.batches[id] = nil }
            u.applying = batches
            u.applyingFinishes = u.finishing
            u.finishes = []
            u.finishing = []
            if full { u.forceFull = false }
            u.lastProgress = clock
            return work
        }
        guard let work else {
            for request in requests { request(.success(())) }
            return
        }
        applierQueue.async {
            let stopwatch = Stopwatch()
            let result = Result { try self.applyToSQLite(work) }
            stopwatch.record(into: IngestMetrics.shared.spoolApply)
            self.enqueue(.applied(work, result.map { var r = $0; r.elapsed = stopwatch.elapsed; return r }))
        }
    }

    /// Where applies run: a thread of its own, so the writer goes on meanwhile.
    private let applierQueue = DispatchQueue(label: "sluice.spool.applier")

    /// The apply's one transaction, on the disk when it returns (on the applier's thread).
    private func applyToSQLite(_ work: ApplyWork) throws -> ApplyResult {
        let now = Int64(Date().timeIntervalSince1970 * 1000)
        return try db.write { db in
            var result = ApplyResult()
            for (id, b) in work.batches {
                try Spool.insert(db, batch: id, tenant: b.tenant, key: b.key, receivedAt: b.receivedAt, payload: b.payload)
                for d in b.deliveries { try Spool.insert(db, delivery: d.id, batch: id, tenant: b.tenant, destination: d.destination) }
            }
            for c in work.finishes {
                guard let done = try Spool.finish(db, delivery: c.id, deadLetter: c.deadLetter, now: now, log: log, freed: &result.freed)
                else {
                    continue  // already finished (a repeated ack)
                }
                result.finished.append((c.id, done.target))
                result.freedBytes += done.bytes
            }
            // The backlog cap: the oldest of a destination over it become dead letters.
            var backlog = work.backlog
            for d in result.finished { backlog[d.target, default: 0] -= 1 }
            for (target, n) in backlog where n > maxBacklogPerDestination {
                let oldest = try Int64.fetchAll(
                    db, sql: "SELECT id FROM deliveries WHERE tenant = ? AND destination = ? ORDER BY id LIMIT ?",
                    arguments: [target.tenant, target.destination, n - maxBacklogPerDestination])
                let reason = "backlog cap: \(maxBacklogPerDestination) batches were already waiting for this destination"
                for delivery in oldest {
                    guard
                        let done = try Spool.finish(
                            db, delivery: delivery, deadLetter: DeadLetter(reason: reason, attempts: 0), now: now, log: log,
                            freed: &result.freed)
                    else { continue }
                    result.finished.append((delivery, done.target))
                    result.freedBytes += done.bytes
                }
            }
            for (row, batchID, d) in work.replays {
                try db.execute(
                    sql: "INSERT INTO batches (id, tenant, key, payload, received_at) VALUES (?, ?, ?, ?, (SELECT received_at FROM replays WHERE id = ?))",
                    arguments: [batchID, d.target.tenant, d.key, Data(d.payload.readableBytesView), row])
                try Spool.insert(db, delivery: d.id, batch: batchID, tenant: d.target.tenant, destination: d.target.destination)
                try db.execute(sql: "DELETE FROM replays WHERE id = ?", arguments: [row])
            }
            try Spool.storeProgress(
                db, sequence: work.sequence, fromSegment: work.fromSegment, nextBatchID: work.nextBatchID,
                nextDeliveryID: work.nextDeliveryID)
            return result
        }
    }

    /// An apply ended (on the writer's thread): what SQLite now holds leaves memory, or, when it
    /// failed, goes back to wait for the next one.
    private func finishApply(_ work: ApplyWork, _ outcome: Result<ApplyResult, any Error>) {
        let deferred = unapplied.withLockedValue { u in
            defer { u.deferred = [] }
            u.applying = nil
            u.applyingFinishes = []
            switch outcome {
            case .success(let result):
                u.generation &+= 1
                updateReadAhead(for: work, result, generation: u.generation)
                for b in work.batches.values {
                    for d in b.deliveries {
                        u.batchOf[d.id] = nil
                        u.stored[DeliveryTarget(tenant: b.tenant, destination: d.destination), default: 0] += 1
                    }
                }
                for r in work.replays { u.stored[r.delivery.target, default: 0] += 1 }
                for d in result.finished { u.stored[d.target, default: 0] -= 1 }
                u.stored = u.stored.filter { $0.value != 0 }
                for (target, ids) in u.lanes {
                    let kept = ids.filter { u.batchOf[$0] != nil }
                    u.lanes[target] = kept.isEmpty ? nil : kept
                }
                u.appliedSequence = max(u.appliedSequence, work.sequence)
            case .failure:
                u.batches.merge(work.batches) { current, _ in current }
                u.finishes = work.finishes + u.finishes
                u.finishing.formUnion(work.finishes.lazy.map(\.id))
                if work.full { u.forceFull = true }
            }
            return u.deferred
        }
        switch outcome {
        case .success(let result):
            fresh.withLockedValue { f in
                for d in result.finished { f.finished(d.id, target: d.target) }
                for r in work.replays { f.inserted(r.delivery) }
            }
            updateCounts(
                freed: result.freedBytes - work.replays.reduce(0) { $0 + $1.delivery.payload.readableBytes },
                finished: result.finished.map(\.target), added: work.replays.map(\.delivery.target))
            for location in result.freed { log.release(location.segment) }
            log.applied(upTo: work.sequence)
            if result.elapsed > .milliseconds(100) {
                logger.warning(
                    "slow spool apply",
                    metadata: ["spool.apply_ms": "\(Spool.milliseconds(result.elapsed))", "spool.batches": "\(work.batches.count)"])
            }
            for request in work.requests { request(.success(())) }
        case .failure(let error):
            for request in work.requests { request(.failure(error)) }
        }
        guard !deferred.isEmpty else { return }
        startApply(
            full: deferred.contains { $0.full }, replays: deferred.contains { $0.replays }, requests: deferred.flatMap(\.requests))
    }

    private func updateCounts(freed bytes: Int, finished: [DeliveryTarget], added: [DeliveryTarget]) {
        let maxBytes = self.maxBytes
        state.withLockedValue { s in
            s.usedBytes -= bytes
            // Deliveries of an older spool's replays were never counted in: never below 0.
            for target in finished { s.backlog[target] = max(0, (s.backlog[target] ?? 0) - 1) }
            for target in added { s.backlog[target, default: 0] += 1 }
            if bytes > 0 && s.refusing && s.usedBytes < maxBytes / 10 * 9 { s.refusing = false }
        }
    }

    /// Log groups written so far (for tests).
    let commits = NIOLockedValueBox(0)

    /// Sleeps the writer's thread (it is its own).
    private static func pause(_ d: Duration) {
        let micros = d.components.seconds * 1_000_000 + d.components.attoseconds / 1_000_000_000_000
        if micros > 0 { usleep(UInt32(clamping: micros)) }
    }

    static func milliseconds(_ d: Duration) -> Int64 {
        d.components.seconds * 1000 + d.components.attoseconds / 1_000_000_000_000_000
    }
}

extension Array {
    /// How many elements lead the array while `isLow` holds, for an array ordered so that it
    /// holds for a prefix only (a binary search).
    func countOfPrefix(while isLow: (Element) -> Bool) -> Int {
        var low = 0
        var high = count
        while low < high {
            let mid = (low + high) / 2
            if isLow(self[mid]) { low = mid + 1 } else { high = mid }
        }
        return low
    }
}
