import ArgumentParser
import Foundation
import KafkaClient
import Logging
import NIOPosix
import Observability
import ServiceLifecycle
import Shared

@main
struct KafkaOutCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "kafka-out",
        abstract: "Publishes routed batches to tenants' Kafka topics.",
        subcommands: [Run.self, DevCluster.self],
        defaultSubcommand: Run.self)
}

struct Run: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Serve the router: publish batches to Kafka (default).")

    @OptionGroup var options: CommonOptions

    @Option(help: "Instance name announced to the router (default: kafka-out-<pid>).")
    var instance: String?

    @Option(help: "File holding the dev cluster's bootstrap servers (default: <run-dir>/dev-cluster.bootstrap).")
    var devBootstrapFile: String?

    @Option(help: "How long librdkafka may try to deliver a message before reporting it failed (it is then retried, not dropped).")
    var messageTimeoutMs: Int = ProducerTuning.milliseconds(ProducerTuning.defaultMessageTimeout)

    @Option(help: "Produce requests in flight per broker connection (1-5; librdkafka's default 5). Ordering and idempotence hold either way. See README, \"Kafka brokers far away\".")
    var maxInFlight: Int?

    @Option(help: "How long a message waits for others to fill a produce request (ms). See README, \"Kafka brokers far away\".")
    var lingerMs: Int = ProducerTuning.milliseconds(ProducerTuning.defaultLinger)

    @Option(help: "Whose messages go to librdkafka in partition rounds — held while their partition has 5 or more in flight, so that librdkafka does not poll its sockets without pause meanwhile: off, batches (destinations with Send as Batch), all. See README, \"Kafka brokers far away\".")
    var partitionRounds: PartitionRoundsScope = .batches

    /// The producer settings these options choose, for every producer of this process.
    var tuning: ProducerTuning {
        ProducerTuning(
            messageTimeout: .milliseconds(messageTimeoutMs), linger: .milliseconds(lingerMs), maxInFlight: maxInFlight,
            partitionRounds: partitionRounds)
    }

    func validate() throws {
        guard (1...5).contains(maxInFlight ?? 5) else { throw ValidationError("--max-in-flight must be 1-5 (the idempotent producer's limit)") }
        guard (0...900_000).contains(lingerMs) else { throw ValidationError("--linger-ms must be 0-900000") }
        guard messageTimeoutMs > 0 else { throw ValidationError("--message-timeout-ms must be positive") }
    }

    @Option(help: "Serve Prometheus metrics and /healthz on HOST:PORT (e.g. 127.0.0.1:9102). Off when not given.")
    var metricsListen: String?

    func run() async throws {
        let logger = try options.start(process: "kafka-out")
        let devFile = devBootstrapFile ?? DevCluster.defaultBootstrapFile(runDir: options.runDir)
        // One loop reads the router's frames, serves librdkafka's delivery reports and writes the answers.
        let loop = MultiThreadedEventLoopGroup.singleton.next()
        let publisher = KafkaPublisher(devBootstrapFile: devFile, tuning: tuning, eventLoop: loop, logger: logger)
        let client = FrameClient(
            path: options.routerSocketPath, role: .kafkaOut,
            instance: instance ?? "kafka-out-\(ProcessInfo.processInfo.processIdentifier)",
            handler: publisher, executor: EventLoopTaskExecutor(loop), logger: logger)
        var services: [ServiceGroupConfiguration.ServiceConfiguration] = [.init(service: client), .init(service: publisher)]
        if let metricsListen {
            services.append(.init(service: try metricsListener(address: metricsListen, process: "kafka-out", logger: logger)))
        }
        let group = ServiceGroup(
            configuration: .init(
                services: services,
                gracefulShutdownSignals: [.sigterm, .sigint], logger: logger))
        try await group.run()
    }
}

extension PartitionRoundsScope: ExpressibleByArgument {}
