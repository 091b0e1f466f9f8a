import Foundation
import GRDB

/// What both stores do for ingest: one durable group (appends, each with a delivery per destination,
/// plus completions), and the router's read of what a destination still has to get.
protocol Store: AnyObject {
    func commit(payloads: ArraySlice<Data>, destinations: [String], completions: [Int64]) throws -> [Int64]
    func pending(_ destination: String, after: Int64, limit: Int) throws -> [(id: Int64, payload: Data)]
    var liveBatches: Int { get }
    func close() throws
}
let (benchTenant, benchKey) = ("acme", "mpid-1234567890")

/// ingest's Spool (Sources/ingest/Spool.swift): same configuration, schema and SQL, one write
/// transaction per group. `cached`: the same SQL through `db.cachedStatement`. `forceFull`: the
/// Spool's `PRAGMA synchronous = FULL` (in `prepareDatabase`) does not hold on the writer connection,
/// the one that commits: DatabasePool's WAL set-up runs after it and sets NORMAL (GRDB 7.10.0,
/// Database.setUpWALMode), so commits are not fsync'd. `forceFull` sets FULL on the writer again.
final class SQLiteStore: Store {
    let pool: DatabasePool
    let cached: Bool
    let writerSynchronous: Int  // PRAGMA synchronous of the writer: 1 NORMAL, 2 FULL
    private(set) var liveBatches = 0

    init(directory: String, cached: Bool, forceFull: Bool) throws {
        self.cached = cached
        var configuration = Configuration()
        configuration.busyMode = .timeout(10)
        configuration.prepareDatabase { db in try db.execute(sql: "PRAGMA synchronous = FULL") }
        pool = try DatabasePool(path: directory + "/spool.sqlite", configuration: configuration)
        if forceFull { try pool.writeWithoutTransaction { db in try db.execute(sql: "PRAGMA synchronous = FULL") } }
        writerSynchronous = try pool.writeWithoutTransaction { db in try Int.fetchOne(db, sql: "PRAGMA synchronous") ?? -1 }
        try pool.write { db in
            try db.execute(sql: """
                CREATE TABLE IF NOT EXISTS batches (id INTEGER PRIMARY KEY AUTOINCREMENT, tenant TEXT NOT NULL, key TEXT,
                    payload BLOB NOT NULL, received_at INTEGER NOT NULL);
                CREATE TABLE IF NOT EXISTS deliveries (id INTEGER PRIMARY KEY AUTOINCREMENT,
                    batch_id INTEGER NOT NULL REFERENCES batches(id), tenant TEXT NOT NULL, destination TEXT NOT NULL);
                CREATE INDEX IF NOT EXISTS deliveries_by_destination ON deliveries (tenant, destination, id);
                CREATE INDEX IF NOT EXISTS deliveries_by_batch ON deliveries (batch_id);
                CREATE TABLE IF NOT EXISTS dead_letters (id INTEGER PRIMARY KEY AUTOINCREMENT, batch_id INTEGER NOT NULL,
                    tenant TEXT NOT NULL, destination TEXT NOT NULL, key TEXT, payload BLOB NOT NULL, reason TEXT NOT NULL,
                    attempts INTEGER NOT NULL, received_at INTEGER NOT NULL, failed_at INTEGER NOT NULL);
                CREATE INDEX IF NOT EXISTS dead_letters_by_destination ON dead_letters (tenant, destination);
                CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
                """)
            try db.execute(sql: "INSERT OR IGNORE INTO meta (key, value) VALUES ('spool_id', ?)", arguments: [UUID().uuidString])
        }
        // What Spool.init reads when it opens.
        _ = try pool.read { db in try String.fetchOne(db, sql: "SELECT value FROM meta WHERE key = 'spool_id'") }
        _ = try pool.read { db in try Int.fetchOne(db, sql: "SELECT COALESCE(SUM(length(payload)), 0) FROM batches") }
        _ = try pool.read { db in try Row.fetchAll(db, sql: "SELECT tenant, destination, COUNT(*) AS n FROM deliveries GROUP BY tenant, destination") }
        liveBatches = try pool.read { db in try Int.fetchOne(db, sql: "SELECT COUNT(*) FROM batches") ?? 0 }
    }

    // As the Spool calls them (`db.execute(sql:)`, `T.fetchOne(db, sql:)`: prepared, authorized and
    // finalized at each call), or through the connection's statement cache.
    private func execute(_ db: Database, _ sql: String, _ arguments: StatementArguments) throws {
        if cached { try db.cachedStatement(sql: sql).execute(arguments: arguments) } else { try db.execute(sql: sql, arguments: arguments) }
    }
    private func one<T: DatabaseValueConvertible>(_ db: Database, _ sql: String, _ arguments: StatementArguments) throws -> T? {
        cached ? try T.fetchOne(db.cachedStatement(sql: sql), arguments: arguments) : try T.fetchOne(db, sql: sql, arguments: arguments)
    }
    private func rows(_ db: Database, _ sql: String, _ arguments: StatementArguments) throws -> [Row] {
        cached ? try Row.fetchAll(db.cachedStatement(sql: sql), arguments: arguments) : try Row.fetchAll(db, sql: sql, arguments: arguments)
    }

    func commit(payloads: ArraySlice<Data>, destinations: [String], completions: [Int64]) throws -> [Int64] {
        let now = Int64(Date().timeIntervalSince1970 * 1000)
        let (ids, freed) = try pool.write { db -> ([Int64], Int) in
            var (ids, freed): ([Int64], Int) = ([], 0)
            for payload in payloads {  // Spool.drain, .append
                try execute(db, "INSERT INTO batches (tenant, key, payload, received_at) VALUES (?, ?, ?, ?)", [benchTenant, benchKey, payload, now])
                let batchID = db.lastInsertedRowID
                ids.append(batchID)
                for d in destinations {
                    try execute(db, "INSERT INTO deliveries (batch_id, tenant, destination) VALUES (?, ?, ?)", [batchID, benchTenant, d])
                }
            }
            for delivery in completions {  // Spool.drain, .complete, then Spool.finish without a dead letter
                guard try rows(db, "SELECT tenant, destination FROM deliveries WHERE id = ?", [delivery]).first != nil,
                      let batchID: Int64 = try one(db, "SELECT batch_id FROM deliveries WHERE id = ?", [delivery]) else { continue }
                try execute(db, "DELETE FROM deliveries WHERE id = ?", [delivery])
                guard try one(db, "SELECT COUNT(*) FROM deliveries WHERE batch_id = ?", [batchID]) ?? 0 == 0 else { continue }
                let _: Int? = try one(db, "SELECT length(payload) FROM batches WHERE id = ?", [batchID])
                try execute(db, "DELETE FROM batches WHERE id = ?", [batchID])
                freed += 1
            }
            return (ids, freed)
        }
        liveBatches += ids.count - freed
        return ids
    }

    func pending(_ destination: String, after: Int64, limit: Int) throws -> [(id: Int64, payload: Data)] {
        try pool.read { db in
            try rows(db, """
                SELECT d.id, d.batch_id, b.key, b.payload FROM deliveries d JOIN batches b ON b.id = d.batch_id
                WHERE d.tenant = ? AND d.destination = ? AND d.id > ? ORDER BY d.id LIMIT ?
                """, [benchTenant, destination, after, limit]).map { row in (row["id"], row["payload"]) }
        }
    }

    func close() throws { try pool.close() }
}
