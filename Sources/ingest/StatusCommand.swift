import ArgumentParser
import Foundation
import GRDB
import Shared

/// `ingest status`: what an operator needs at a glance — which processes are connected, and per
/// tenant and destination: delivered (total and per second), waiting (spool and router), dead
/// letters, the last error, and whether the last config reload was rejected. Reads the spool
/// (read-only) and asks the router over its socket.
struct StatusCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "status", abstract: "Show the process group's state per tenant and destination.")

    @OptionGroup var options: CommonOptions

    @Option(help: "Directory of the spool (as given to ingest).")
    var spoolDir: String?

    @Flag(help: "One JSON document instead of the table.")
    var json = false

    func run() async throws {
        let directory =
            spoolDir ?? ProcessInfo.processInfo.environment["SLUICE_SPOOL_DIR"]
            ?? (options.runDir as NSString).appendingPathComponent("spool")
        let spool = try? SpoolSummary(directory: directory)
        var router: JSONValue?
        var routerError: String?
        do {
            let answer = try await FrameRequest.ask(path: options.routerSocketPath, Frame(type: .status, id: 1))
            router = try answer.payload.map { try JSONValue.parse($0) }
        } catch {
            routerError = "\(error)"
        }
        let report = StatusReport(router: router, routerError: routerError, spool: spool)
        if json {
            print(report.json.jsonString)
        } else {
            print(report.text, terminator: "")
        }
        if router == nil { throw ExitCode(3) }
    }
}

/// What the spool holds per tenant and destination.
struct SpoolSummary {
    var pending: [DeliveryTarget: Int] = [:]
    var deadLetters: [DeliveryTarget: Int] = [:]
    var bytes = 0

    init(directory: String) throws {
        let path = (directory as NSString).appendingPathComponent("spool.sqlite")
        guard FileManager.default.fileExists(atPath: path) else { throw ValidationError("no spool at \(path)") }
        var configuration = Configuration()
        configuration.readonly = true
        configuration.busyMode = .timeout(5)
        let db = try DatabaseQueue(path: path, configuration: configuration)
        try db.read { db in
            for row in try Row.fetchAll(db, sql: "SELECT tenant, destination, COUNT(*) AS n FROM deliveries GROUP BY tenant, destination") {
                pending[DeliveryTarget(tenant: row["tenant"], destination: row["destination"])] = row["n"]
            }
            for row in try Row.fetchAll(db, sql: "SELECT tenant, destination, COUNT(*) AS n FROM dead_letters GROUP BY tenant, destination") {
                deadLetters[DeliveryTarget(tenant: row["tenant"], destination: row["destination"])] = row["n"]
            }
            bytes = try Int.fetchOne(db, sql: "SELECT \(Spool.storedBytes) FROM batches") ?? 0
            // Dead letters put back and not yet taken in by ingest (none in spools older than replays).
            let replays = (try? Row.fetchAll(db, sql: "SELECT tenant, destination, COUNT(*) AS n, SUM(length(payload)) AS bytes FROM replays GROUP BY tenant, destination")) ?? []
            for row in replays {
                pending[DeliveryTarget(tenant: row["tenant"], destination: row["destination"]), default: 0] += row["n"] as Int
                bytes += row["bytes"] as Int
            }
        }
    }
}

/// The router's answer and the spool's counts, merged per tenant and destination.
struct StatusReport {
    struct Row {
        var tenant: String
        var destination: String
        var kind = "-"
        var state = "active"
        var delivered = 0
        var perSecond = "0.0"
        var waiting = 0
        var inRouter = 0
        var deadLetters = 0
        var lastError: String?
        var lastErrorAt: String?
    }

    var router: JSONValue?
    var routerError: String?
    var spool: SpoolSummary?

    var rows: [Row] {
        var rows: [DeliveryTarget: Row] = [:]
        for d in router?["destinations"]?.arrayValue ?? [] {
            let target = DeliveryTarget(tenant: d["tenant"]?.stringValue ?? "", destination: d["destination"]?.stringValue ?? "")
            var r = Row(tenant: target.tenant, destination: target.destination)
            r.kind = d["kind"]?.stringValue ?? "-"
            r.state = d["state"]?.stringValue ?? "active"
            r.delivered = d["delivered"]?.intValue ?? 0
            if case .number(let n)? = d["delivered_per_second"] { r.perSecond = n }
            r.inRouter = d["in_router"]?.intValue ?? 0
            r.lastError = d["last_error"]?.stringValue
            r.lastErrorAt = d["last_error_at"]?.stringValue
            rows[target] = r
        }
        for (target, n) in spool?.pending ?? [:] {
            rows[target, default: Row(tenant: target.tenant, destination: target.destination, state: "unknown")].waiting = n
        }
        for (target, n) in spool?.deadLetters ?? [:] {
            rows[target, default: Row(tenant: target.tenant, destination: target.destination, state: "unknown")].deadLetters = n
        }
        return rows.values.sorted { ($0.tenant, $0.destination) < ($1.tenant, $1.destination) }
    }

    var json: JSONValue {
        var members: [JSONValue.Member] = []
        if let router {
            members.append(.init("router", .object([.init("up", .bool(true))])))
            members.append(.init("ingest_connected", router["ingest_connected"] ?? .bool(false)))
            members.append(.init("outputs_ready", router["outputs_ready"] ?? .bool(false)))
            members.append(.init("outputs", router["outputs"] ?? .array([])))
            members.append(.init("config", router["config"] ?? .object([])))
        } else {
            members.append(.init("router", .object([.init("up", .bool(false)), .init("error", .string(routerError ?? ""))])))
        }
        if let spool { members.append(.init("spool_bytes", .number(String(spool.bytes)))) }
        members.append(
            .init(
                "destinations",
                .array(
                    rows.map { r in
                        var m: [JSONValue.Member] = [
                            .init("tenant", .string(r.tenant)), .init("destination", .string(r.destination)),
                            .init("kind", .string(r.kind)), .init("state", .string(r.state)),
                            .init("delivered", .number(String(r.delivered))), .init("delivered_per_second", .number(r.perSecond)),
                            .init("waiting_in_spool", .number(String(r.waiting))), .init("in_router", .number(String(r.inRouter))),
                            .init("dead_letters", .number(String(r.deadLetters))),
                        ]
                        if let e = r.lastError { m.append(.init("last_error", .string(e))) }
                        if let t = r.lastErrorAt { m.append(.init("last_error_at", .string(t))) }
                        return .object(m)
                    })))
        return .object(members)
    }

    var text: String {
        var out = ""
        if let router {
            let outputs = router["outputs"]?.arrayValue ?? []
            let names = outputs.map { "\($0["instance"]?.stringValue ?? "?") (\($0["in_flight"]?.intValue ?? 0) in flight)" }
            out += "router      up\n"
            out += "ingest      \(router["ingest_connected"] == .bool(true) ? "connected" : "NOT CONNECTED")\n"
            out += "outputs     \(names.isEmpty ? "none" : names.joined(separator: ", "))\(router["outputs_ready"] == .bool(true) ? "" : "  (NOT READY: a needed output kind has no instance)")\n"
            let config = router["config"]
            out += "config      generation \(config?["generation"]?.intValue ?? 0), loaded \(config?["loaded_at"]?.stringValue ?? "?")\n"
            if let e = config?["last_error"]?.stringValue {
                out += "            LAST RELOAD REJECTED (\(config?["last_error_at"]?.stringValue ?? "")): \(e)\n"
            }
        } else {
            out += "router      DOWN (\(routerError ?? ""))\n"
        }
        if let spool { out += "spool       \(spool.bytes) bytes\n" } else { out += "spool       not found\n" }
        out += "\n"
        let header = ["TENANT", "DESTINATION", "KIND", "STATE", "DELIVERED", "PER SEC", "WAITING", "IN ROUTER", "DEAD", "LAST ERROR"]
        var table = [header]
        for r in rows {
            let error = r.lastError.map { "\($0) (\(r.lastErrorAt ?? ""))" } ?? "-"
            table.append([
                r.tenant, r.destination, r.kind, r.state, String(r.delivered), r.perSecond, String(r.waiting), String(r.inRouter),
                String(r.deadLetters), error,
            ])
        }
        let widths = (0..<header.count - 1).map { c in table.map { $0[c].count }.max() ?? 0 }
        for line in table {
            var cells: [String] = []
            for (c, cell) in line.enumerated() {
                cells.append(c < widths.count ? cell.padding(toLength: widths[c], withPad: " ", startingAt: 0) : cell)
            }
            out += cells.joined(separator: "  ") + "\n"
        }
        return out
    }
}
