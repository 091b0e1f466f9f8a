import ArgumentParser
import Foundation
import GRDB
import Shared

/// The dead-letter store: batches a destination will never get, with the reason. Kept in the
/// spool database, per tenant and destination.
struct DeadLetterStore {
    struct Entry: Sendable {
        var id: Int64
        var batchID: Int64
        var tenant: String
        var destination: String
        var key: String?
        var payload: Data
        var reason: String
        var attempts: Int
        var receivedAt: Int64
        var failedAt: Int64
    }

    struct Filter {
        var tenant: String?
        var destination: String?
        var id: Int64?

        var sql: (String, StatementArguments) {
            var clauses: [String] = []
            var arguments: StatementArguments = []
            if let tenant {
                clauses.append("tenant = ?")
                arguments += [tenant]
            }
            if let destination {
                clauses.append("destination = ?")
                arguments += [destination]
            }
            if let id {
                clauses.append("id = ?")
                arguments += [id]
            }
            return (clauses.isEmpty ? "1" : clauses.joined(separator: " AND "), arguments)
        }
    }

    let db: DatabaseQueue

    init(spoolDirectory: String) throws {
        let path = (spoolDirectory as NSString).appendingPathComponent("spool.sqlite")
        guard FileManager.default.fileExists(atPath: path) else {
            throw ValidationError("no spool at \(path) (see --spool-dir)")
        }
        var configuration = Configuration()
        configuration.busyMode = .timeout(10)  // ingest writes the same file
        db = try DatabaseQueue(path: path, configuration: configuration)
    }

    func list(_ filter: Filter, limit: Int = 1000) throws -> [Entry] {
        let (condition, arguments) = filter.sql
        return try db.read { db in
            try Row.fetchAll(db, sql: "SELECT * FROM dead_letters WHERE \(condition) ORDER BY id LIMIT \(limit)", arguments: arguments).map {
                Entry(
                    id: $0["id"], batchID: $0["batch_id"], tenant: $0["tenant"], destination: $0["destination"], key: $0["key"],
                    payload: $0["payload"], reason: $0["reason"], attempts: $0["attempts"], receivedAt: $0["received_at"],
                    failedAt: $0["failed_at"])
            }
        }
    }

    /// Puts matching dead letters back in the spool, each for its own destination only (under that
    /// destination's current settings): ingest takes them in within a second (or at its next
    /// start). Returns how many.
    func replay(_ filter: Filter) throws -> Int {
        let (condition, arguments) = filter.sql
        return try db.write { db in
            try db.execute(sql: Spool.replaysSchema)
            let rows = try Row.fetchAll(db, sql: "SELECT * FROM dead_letters WHERE \(condition) ORDER BY id", arguments: arguments)
            for row in rows {
                try db.execute(
                    sql: "INSERT INTO replays (tenant, destination, key, payload, received_at) VALUES (?, ?, ?, ?, ?)",
                    arguments: [row["tenant"], row["destination"], row["key"], row["payload"], row["received_at"]])
                try db.execute(sql: "DELETE FROM dead_letters WHERE id = ?", arguments: [row["id"]])
            }
            return rows.count
        }
    }

    func purge(_ filter: Filter) throws -> Int {
        let (condition, arguments) = filter.sql
        return try db.write { db in
            try db.execute(sql: "DELETE FROM dead_letters WHERE \(condition)", arguments: arguments)
            return db.changesCount
        }
    }
}

/// `ingest dead-letters list|show|replay|purge`.
struct DeadLettersCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "dead-letters",
        abstract: "List, show, replay or purge dead letters (batches a destination will never get).",
        subcommands: [List.self, Show.self, Replay.self, Purge.self])

    struct Selection: ParsableArguments {
        @Option(help: "Directory of the spool (as given to ingest).")
        var spoolDir: String = ProcessInfo.processInfo.environment["SLUICE_SPOOL_DIR"] ?? (RunDirectory.defaultPath + "/spool")
        @Option(help: "Only this tenant.")
        var tenant: String?
        @Option(help: "Only this destination.")
        var destination: String?

        var filter: DeadLetterStore.Filter { .init(tenant: tenant, destination: destination) }
        func store() throws -> DeadLetterStore { try DeadLetterStore(spoolDirectory: spoolDir) }
    }

    static func time(_ ms: Int64) -> String {
        Date(timeIntervalSince1970: Double(ms) / 1000).formatted(.iso8601)
    }

    struct List: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "One line per dead letter.")
        @OptionGroup var selection: Selection
        @Flag(help: "JSON lines instead of a table.") var json = false

        func run() throws {
            let entries = try selection.store().list(selection.filter)
            if !json { print("ID\tFAILED AT\tTENANT\tDESTINATION\tATTEMPTS\tREASON") }
            for e in entries {
                if json {
                    print(
                        JSONValue.object([
                            .init("id", .number(String(e.id))), .init("failed_at", .string(DeadLettersCommand.time(e.failedAt))),
                            .init("tenant", .string(e.tenant)), .init("destination", .string(e.destination)),
                            .init("attempts", .number(String(e.attempts))), .init("reason", .string(e.reason)),
                        ]).jsonString)
                } else {
                    print("\(e.id)\t\(DeadLettersCommand.time(e.failedAt))\t\(e.tenant)\t\(e.destination)\t\(e.attempts)\t\(e.reason)")
                }
            }
        }
    }

    struct Show: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "One dead letter in full, with its batch.")
        @OptionGroup var selection: Selection
        @Argument(help: "The dead letter's id (see list).") var id: Int64

        func run() throws {
            var filter = selection.filter
            filter.id = id
            guard let e = try selection.store().list(filter).first else { throw ValidationError("no dead letter \(id)") }
            print("id: \(e.id)\ntenant: \(e.tenant)\ndestination: \(e.destination)\nreason: \(e.reason)\nattempts: \(e.attempts)")
            print("received at: \(DeadLettersCommand.time(e.receivedAt))\nfailed at: \(DeadLettersCommand.time(e.failedAt))")
            print("mpid: \(e.key ?? "-")\nbatch:\n\(String(decoding: e.payload, as: UTF8.self))")
        }
    }

    struct Replay: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Send dead letters again, each to its own destination under its current settings.")
        @OptionGroup var selection: Selection
        @Option(help: "Only this dead letter.") var id: Int64?

        func run() throws {
            var filter = selection.filter
            filter.id = id
            print("replayed \(try selection.store().replay(filter))")
        }
    }

    struct Purge: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Delete dead letters for good.")
        @OptionGroup var selection: Selection
        @Option(help: "Only this dead letter.") var id: Int64?
        @Flag(help: "Required when no filter is given: purge every dead letter.") var all = false

        func validate() throws {
            if selection.tenant == nil && selection.destination == nil && id == nil && !all {
                throw ValidationError("give --tenant, --destination or --id, or --all to purge everything")
            }
        }

        func run() throws {
            var filter = selection.filter
            filter.id = id
            print("purged \(try selection.store().purge(filter))")
        }
    }
}
