import Foundation
import KafkaClient
import Logging
import NIOConcurrencyHelpers
import NIOCore
import Outputs
import ServiceLifecycle
import Shared

/// Serves the router's connection for Keen destinations. Each message is one Keen event for one
/// collection (the frame's `topic`). Kafka transport: produced to Keen's Kafka Inbound Cluster
/// (topic = collection) through the shared producer pool, acked on Kafka's confirmation. HTTP
/// transport: batched per destination into Keen's batch endpoint, acked per event from Keen's
/// per-event `success` flags.
final class KeenPublisher: FrameConnectionHandler, Service {
    private let lanes = NIOLockedValueBox<[String: HTTPLane]>([:])
    private let logger: Logger
    private let httpTimeout: Duration
    private let host: OutputHost<KeenDestination>

    init(httpTimeout: Duration = .seconds(30), logger: Logger) {
        self.logger = logger
        self.httpTimeout = httpTimeout
        let lanes = self.lanes
        host = OutputHost(
            process: "keen_out", logger: logger, decode: { try KeenDestination(wireJSON: $0) },
            configuration: { $0.transport == .kafka ? ProducerConfiguration(keen: $0) : nil },
            forgotten: { key in
                // An HTTP lane of a forgotten destination sends what it holds, then ends.
                if let lane = lanes.withLockedValue({ $0.removeValue(forKey: key) }) {
                    Thread.detachNewThread { lane.stop(drainFor: .seconds(30)) }
                }
            })
    }

    func run() async throws {
        try? await gracefulShutdown()
        let lanes = self.lanes.withLockedValue { Array($0.values) }
        await host.flushOnShutdown { for lane in lanes { lane.stop(drainFor: .seconds(10)) } }
        logger.info("keen-out stopped")
    }

    func received(_ frame: Frame, from peer: FramePeer) async throws {
        guard let batch = try host.handle(frame, from: peer) else { return }
        guard let key = batch.destination, batch.payload != nil else {
            throw FrameError.invalidFrame("Keen batch frame without destination or payload")
        }
        guard let destination = host.destination(key) else {
            peer.send(.nack(batch.id, reason: "unknown destination \(key)", retryable: true))
            return
        }
        switch destination.transport {
        case .kafka:
            let producer: KafkaProducer
            do throws(KafkaError) {
                producer = try host.producer(for: ProducerConfiguration(keen: destination), key: key)
            } catch {
                peer.send(.nack(batch.id, reason: error.description, retryable: error.isRetriable))
                return
            }
            // Each message to its collection's topic (a frame without one is refused).
            try await Delivery.produce(batch, from: peer, topic: nil, producer: producer, pool: host.pool)
        case .http:
            let messages = try Delivery.split(batch, from: peer)
            guard messages.allSatisfy({ $0.topic != nil }) else {
                throw FrameError.invalidFrame("Keen batch frame without a collection (topic) for each event")
            }
            let lane = lanes.withLockedValue { lanes in
                if let lane = lanes[key] { return lane }
                let lane = HTTPLane(destination: destination, timeout: httpTimeout, metrics: host.metrics, logger: logger)
                lanes[key] = lane
                return lane
            }
            for m in messages {
                await lane.add(HTTPLane.Item(delivery: m.delivery, collection: m.topic!, event: m.payload))
            }
        }
    }

    func disconnected(_ peer: FramePeer) async {
        host.disconnected(peer)
        for lane in lanes.withLockedValue({ Array($0.values) }) { lane.forget(peer) }
    }
}
