import Foundation
import KafkaClient
import Logging
import NIOConcurrencyHelpers
import NIOCore
import Observability
import Outputs
import ServiceLifecycle
import Shared

/// Serves the router's connection: keeps the destinations it is told about, publishes each batch
/// through a producer shared by every destination of the same cluster and credentials, and answers
/// `ack` only when Kafka confirmed the message (`nack` with the reason otherwise).
final class KafkaPublisher: FrameConnectionHandler, Service {
    private struct State {
        var destinations: [String: KafkaDestination] = [:]
        /// The router connection (for reporting client errors), and when each cluster last reported.
        var router: FramePeer?
        var lastReported: [ProducerConfiguration: ContinuousClock.Instant] = [:]
    }

    private let state = NIOLockedValueBox(State())
    private let devBootstrapFile: String
    /// The dev cluster's bootstrap list, re-read at most once a second (not once per message).
    private let devBootstrap = NIOLockedValueBox<(text: String?, readAt: ContinuousClock.Instant?)>((nil, nil))
    private let messageTimeout: Duration
    private let maxInFlight: Int?
    private let logger: Logger
    private let metrics = OutputMetrics(process: "kafka_out")
    private let pool: ProducerPool<Delivery>

    init(devBootstrapFile: String, messageTimeout: Duration = .seconds(300), maxInFlight: Int? = nil, logger: Logger) {
        self.devBootstrapFile = devBootstrapFile
        self.messageTimeout = messageTimeout
        self.maxInFlight = maxInFlight
        self.logger = logger
        let metrics = self.metrics
        let relay = WeakRelay<KafkaPublisher>()
        pool = ProducerPool(
            logger: logger,
            onOutcomes: { outcomes in Delivery.answer(outcomes, metrics: metrics) },
            onStatistics: { all in metrics.record(all) },
            onError: { error, configuration in relay.target?.clientError(error, configuration: configuration) })
        relay.target = self
    }

    // MARK: Service: flush on shutdown

    func run() async throws {
        try? await gracefulShutdown()
        let pool = self.pool
        // Blocking flushes run off the cooperative pool.
        await withCheckedContinuation { (c: CheckedContinuation<Void, Never>) in
            Thread.detachNewThread {
                pool.flushAll(timeout: .seconds(10))
                c.resume()
            }
        }
        logger.info("kafka-out stopped")
    }

    // MARK: Frames

    func received(_ frame: Frame, from peer: FramePeer) async throws {
        switch frame.type {
        case .destination:
            guard let key = frame.destination else { throw FrameError.invalidFrame("destination frame without key") }
            guard let payload = frame.payload else {
                // The router no longer uses this destination (a reload changed or removed it).
                forget(key)
                return
            }
            let spec = try KafkaDestination(wireJSON: try JSONValue.parse(payload))
            state.withLockedValue {
                $0.destinations[key] = spec
                $0.router = peer
            }
        case .batch:
            try await publish(frame, peer: peer)
        case .error:
            logger.warning("router reported an error", metadata: ["error.code": "\(frame.code ?? "")", "error": "\(frame.message ?? "")"])
        case .hello, .ack, .nack, .outputs, .status:
            throw FrameError.invalidFrame("unexpected \(frame.type.rawValue) frame")
        }
    }

    func disconnected(_ peer: FramePeer) async {
        // The router re-sends what it had not seen confirmed; late reports for this connection are dropped.
        pool.forget { $0.peer == peer }
    }

    private func publish(_ frame: Frame, peer: FramePeer) async throws {
        guard let destinationKey = frame.destination, let payload = frame.payload else {
            throw FrameError.invalidFrame("batch frame without destination or payload")
        }
        guard let destination = state.withLockedValue({ $0.destinations[destinationKey] }) else {
            peer.send(.nack(frame.id, reason: "unknown destination \(destinationKey)", retryable: true))
            return
        }
        do throws(KafkaError) {
            let configuration = try producerConfiguration(for: destination)
            let producer = try pool.producer(
                for: configuration, metadata: ["destination": "\(destinationKey.split(separator: "#").first ?? "")"])
            metrics.producers.set(Double(pool.count))
            try await Delivery.produce(
                frame, payload: payload, topic: destination.topic, producer: producer, pool: pool, peer: peer)
        } catch {
            peer.send(.nack(frame.id, reason: error.description, retryable: error.isRetriable))
        }
    }

    /// Drops a destination the router no longer uses, and closes the producers no remaining
    /// destination needs (after their messages are delivered or reported).
    private func forget(_ key: String) {
        let needed = state.withLockedValue { s in
            s.destinations[key] = nil
            return Set(s.destinations.values.compactMap { try? producerConfiguration(for: $0) })
        }
        let closed = pool.retain(needed)
        metrics.producers.set(Double(pool.count))
        if closed > 0 { logger.info("closing producers no destination uses", metadata: ["producers": "\(closed)"]) }
    }

    /// A client-level error (brokers unreachable, authentication or TLS failed): reported to the
    /// router for each destination on that cluster, at most every 5 s, so `status` shows it even
    /// before any message fails.
    private func clientError(_ error: KafkaError, configuration: ProducerConfiguration) {
        let (router, keys): (FramePeer?, [String]) = state.withLockedValue { s in
            let now = ContinuousClock.now
            if let last = s.lastReported[configuration], now - last < .seconds(5) { return (nil, []) }
            s.lastReported[configuration] = now
            return (s.router, s.destinations.filter { (try? producerConfiguration(for: $0.value)) == configuration }.map(\.key))
        }
        Delivery.report(error, for: keys, to: router)
    }

    private func devBootstrapServers() -> String? {
        let now = ContinuousClock.now
        if let (text, readAt) = devBootstrap.withLockedValue({ v in v.readAt.map { (v.text, $0) } }), now - readAt < .seconds(1) {
            return text
        }
        let text = FileManager.default.contents(atPath: devBootstrapFile)
            .map { String(decoding: $0, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines) }
            .flatMap { $0.isEmpty ? nil : $0 }
        devBootstrap.withLockedValue { $0 = (text, now) }
        return text
    }

    func producerConfiguration(for d: KafkaDestination) throws(KafkaError) -> ProducerConfiguration {
        var bootstrap = d.bootstrapServers
        if d.usesDevCluster {
            guard let text = devBootstrapServers() else {
                throw KafkaError(
                    code: -1, name: "_DEV_CLUSTER_DOWN",
                    message: "the dev cluster is not running (no bootstrap file at \(devBootstrapFile))", isRetriable: true)
            }
            bootstrap = text
        }
        var configuration = ProducerConfiguration(destination: d, bootstrapServers: bootstrap)
        configuration.messageTimeout = messageTimeout
        configuration.maxInFlight = maxInFlight
        return configuration
    }
}
