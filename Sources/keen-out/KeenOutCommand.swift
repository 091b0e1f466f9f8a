import ArgumentParser
import CCurl
import Foundation
import Logging
import NIOCore
import Observability
import ServiceLifecycle
import Shared

@main
struct KeenOutCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "keen-out",
        abstract: "Publishes routed events to Keen (Kafka Inbound Cluster or HTTP API).",
        subcommands: [Run.self, Verify.self],
        defaultSubcommand: Run.self)
}

struct Run: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Serve the router: publish events to Keen (default).")

    @OptionGroup var options: CommonOptions

    @Option(help: "Instance name announced to the router (default: keen-out-<pid>).")
    var instance: String?

    @Option(help: "Serve Prometheus metrics and /healthz on HOST:PORT (e.g. 127.0.0.1:9401). Off when not given.")
    var metricsListen: String?

    @Option(help: "Timeout of one request to Keen's HTTP API, in milliseconds.")
    var httpTimeoutMs: Int = 30_000

    func run() async throws {
        let logger = try options.start(process: "keen-out")
        logger.info("keen-out starting", metadata: ["curl.version": "\(String(cString: curl_version()))"])
        let publisher = KeenPublisher(httpTimeout: .milliseconds(httpTimeoutMs), logger: logger)
        let client = FrameClient(
            path: options.routerSocketPath, role: .keenOut,
            instance: instance ?? "keen-out-\(ProcessInfo.processInfo.processIdentifier)",
            handler: publisher, logger: logger)
        var services: [ServiceGroupConfiguration.ServiceConfiguration] = [.init(service: client), .init(service: publisher)]
        if let metricsListen {
            services.append(.init(service: try metricsListener(address: metricsListen, process: "keen-out", logger: logger)))
        }
        let group = ServiceGroup(
            configuration: .init(services: services, gracefulShutdownSignals: [.sigterm, .sigint], logger: logger))
        try await group.run()
    }
}

/// `keen-out verify`: asks Keen (a count query) whether given events arrived.
struct Verify: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Check with a Keen count query that events arrived (by uniqueness token or Sluice batch id).",
        discussion: """
            Exit status 0 when Keen counts at least the expected number of events, 1 when fewer, 2 when the \
            query failed. The read key comes from --read-key-env (an environment variable), never the command line.
            """)

    @Option(help: "Keen project id.") var project: String
    @Option(help: "Collection to count in.") var collection: String
    @Option(help: "Environment variable holding a read key (or the master key).") var readKeyEnv = "KEEN_READ_KEY"
    @Option(help: "Keen's API base URL.") var baseURL = KeenDestination.defaultHTTPBaseURL
    @Option(help: "PEM file of a CA to trust instead of the system store.") var caFile: String?
    @Option(name: .customLong("token"), help: "A keen.uniqueness_token to look for (repeatable).") var tokens: [String] = []
    @Option(help: "A Sluice batch id (the sluice-batch-id header) whose events to count.") var batchID: String?
    @Option(help: "How many events must be counted (default: the number of tokens, or 1 for a batch id).") var expect: Int?

    func validate() throws {
        if tokens.isEmpty == (batchID == nil) { throw ValidationError("give --token (one or more) or --batch-id") }
    }

    func run() throws {
        guard let key = ProcessInfo.processInfo.environment[readKeyEnv], !key.isEmpty else {
            throw ValidationError("no read key in $\(readKeyEnv)")
        }
        let filter: JSONValue =
            tokens.isEmpty
            ? .object([
                .init("property_name", .string("sluice.batch_id")), .init("operator", .string("eq")),
                .init("property_value", .string(batchID!)),
            ])
            : .object([
                .init("property_name", .string("keen.uniqueness_token")), .init("operator", .string("in")),
                .init("property_value", .array(tokens.map { .string($0) })),
            ])
        // Keen counts by keen.timestamp (the events' own time): the whole range, not "recent".
        let end = KeenDestination.iso8601(milliseconds: Int64(Date().timeIntervalSince1970 * 1000) + 86_400_000)
        let query = JSONValue.object([
            .init("event_collection", .string(collection)),
            .init("timeframe", .object([.init("start", .string("1970-01-01T00:00:00.000Z")), .init("end", .string(end))])),
            .init("filters", .array([filter])),
        ])
        let ca = try caFile.map { try String(contentsOfFile: $0, encoding: .utf8) }
        let client = CurlClient(caPEM: ca)
        let url = "\(baseURL.hasSuffix("/") ? String(baseURL.dropLast()) : baseURL)/3.0/projects/\(project)/queries/count"
        let response: CurlClient.Response
        do {
            response = try client.post(url, authorization: key, body: Data(query.jsonString.utf8))
        } catch {
            print("query failed: \(error)")
            throw ExitCode(2)
        }
        guard response.status == 200, let result = (try? JSONValue.parse(ByteBuffer(data: response.body)))?["result"]?.intValue else {
            print("query failed: HTTP \(response.status): \(String(decoding: response.body.prefix(300), as: UTF8.self))")
            throw ExitCode(2)
        }
        let expected = expect ?? (tokens.isEmpty ? 1 : tokens.count)
        print("counted \(result) event(s) in \(collection); expected at least \(expected)")
        if result < expected { throw ExitCode(1) }
    }
}
