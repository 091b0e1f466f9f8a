import Foundation
import GRDB
import Logging
import NIOCore

/// The spool's SQLite side: the schema, reading the log back after a crash, and the statements
/// the applies are made of (`Spool` runs them on its applier's thread).
extension Spool {
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
        try db.execute(sql: replaysSchema)
        try db.execute(
            sql: "INSERT OR IGNORE INTO meta (key, value) VALUES ('spool_id', ?)", arguments: [UUID().uuidString.lowercased()])
        // Where a batch's bytes are in the payload log; NULL for a batch whose `payload` holds them
        // (replayed dead letters, spools written before the payload log).
        let columns = try Row.fetchAll(db, sql: "PRAGMA table_info(batches)").map { $0["name"] as String }
        for column in ["segment", "segment_offset", "length"] where !columns.contains(column) {
            try db.execute(sql: "ALTER TABLE batches ADD COLUMN \(column) INTEGER")
        }
    }

    /// Dead letters `ingest dead-letters replay` put back, for the running ingest (or the next one)
    /// to take in with ids of its own: ids are handed out by ingest's writer alone (in memory,
    /// stored with each apply), so another process cannot take one.
    static let replaysSchema = """
        CREATE TABLE IF NOT EXISTS replays (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            tenant TEXT NOT NULL,
            destination TEXT NOT NULL,
            key TEXT,
            payload BLOB NOT NULL,
            received_at INTEGER NOT NULL
        )
        """

    /// Where ids and sequence numbers go on, after applying what the log holds past SQLite.
    struct Recovered {
        var sequence: UInt64
        var nextBatchID: Int64
        var nextDeliveryID: Int64
    }

    /// Applies the log's records that SQLite does not hold (a crash came before the writer applied
    /// them), and finds where sequence numbers and ids go on: past every one ever handed out.
    static func recover(_ pool: DatabasePool, directory: String, logger: Logger) throws -> Recovered {
        // Read outside the transaction (operator commands wait for it): only the segments from
        // the one the records past the stored sequence number begin in.
        let (applied, from) = try pool.read { db in
            (UInt64(try Spool.meta(db, "applied_sequence")), try Spool.meta(db, "replay_from_segment"))
        }
        let records = try PayloadLog.records(in: directory, from: from).filter { $0.found.sequence > applied }
        let segments = PayloadLog.segmentNumbers(in: directory)
        return try pool.write { db in
            func meta(_ key: String) throws -> Int64 { try Spool.meta(db, key) }
            func highest(_ sql: String) throws -> Int64 { try Int64.fetchOne(db, sql: sql) ?? 0 }
            var sequence = max(applied, UInt64(try meta("applied_sequence")))
            var nextBatchID = max(
                try meta("next_batch_id"), try highest("SELECT seq FROM sqlite_sequence WHERE name = 'batches'") + 1,
                try highest("SELECT MAX(id) FROM batches") + 1, try highest("SELECT MAX(batch_id) FROM dead_letters") + 1)
            var nextDeliveryID = max(
                try meta("next_delivery_id"), try highest("SELECT seq FROM sqlite_sequence WHERE name = 'deliveries'") + 1,
                try highest("SELECT MAX(id) FROM deliveries") + 1)
            var batches = 0
            for (found, segment) in records {
                switch found.entry {
                case .batch(let record):
                    let at = PayloadLocation(segment: segment, offset: Int64(found.payloadOffset), length: found.payloadLength)
                    try insert(db, batch: record.batchID, tenant: record.tenant, key: record.key, receivedAt: record.receivedAt, payload: at)
                    for d in record.deliveries {
                        try insert(db, delivery: d.id, batch: record.batchID, tenant: record.tenant, destination: d.destination)
                        nextDeliveryID = max(nextDeliveryID, d.id + 1)
                    }
                    nextBatchID = max(nextBatchID, record.batchID + 1)
                    batches += 1
                case .done(let deliveries):
                    var freed: [PayloadLocation] = []  // references are counted from the rows left
                    for id in deliveries { _ = try finishDelivered(db, delivery: id, freed: &freed) }
                }
                sequence = found.sequence
            }
            if !records.isEmpty {
                logger.info(
                    "spool: what the last run logged and had not applied was read back from its log",
                    metadata: ["spool.records": "\(records.count)", "spool.batches": "\(batches)", "spool.sequence": "\(sequence)"])
            }
            // The next records go to a new segment.
            try storeProgress(
                db, sequence: sequence, fromSegment: (segments.max() ?? 0) + 1, nextBatchID: nextBatchID, nextDeliveryID: nextDeliveryID)
            return Recovered(sequence: sequence, nextBatchID: max(1, nextBatchID), nextDeliveryID: max(1, nextDeliveryID))
        }
    }

    static func insert(_ db: Database, batch id: Int64, tenant: String, key: String?, receivedAt: Int64, payload at: PayloadLocation) throws {
        try db.cachedStatement(
            sql: """
                INSERT OR IGNORE INTO batches (id, tenant, key, payload, received_at, segment, segment_offset, length)
                VALUES (?, ?, ?, x'', ?, ?, ?, ?)
                """
        ).execute(arguments: [id, tenant, key, receivedAt, at.segment, at.offset, at.length])
    }

    static func insert(_ db: Database, delivery id: Int64, batch: Int64, tenant: String, destination: String) throws {
        try db.cachedStatement(sql: "INSERT OR IGNORE INTO deliveries (id, batch_id, tenant, destination) VALUES (?, ?, ?, ?)")
            .execute(arguments: [id, batch, tenant, destination])
    }

    static func meta(_ db: Database, _ key: String) throws -> Int64 {
        try String.fetchOne(db, sql: "SELECT value FROM meta WHERE key = ?", arguments: [key]).flatMap { Int64($0) } ?? 0
    }

    /// SQLite holds every record up to `sequence`; those after it are in segment `fromSegment` or
    /// later; ids go on from these.
    static func storeProgress(
        _ db: Database, sequence: UInt64, fromSegment: Int64, nextBatchID: Int64, nextDeliveryID: Int64
    ) throws {
        let values = [
            ("applied_sequence", Int64(sequence)), ("replay_from_segment", fromSegment), ("next_batch_id", nextBatchID),
            ("next_delivery_id", nextDeliveryID),
        ]
        for (key, value) in values {
            try db.cachedStatement(sql: "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)").execute(arguments: [key, String(value)])
        }
    }

    /// Removes a delivery (keeping a dead letter if given) and its batch once no delivery needs it.
    /// Returns the bytes freed and the delivery's destination, nil when it was already finished; a
    /// batch whose bytes were in the payload log adds its location to `freed` (released once the
    /// transaction has committed).
    static func finish(
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
    static func finishDelivered(
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
