import Foundation
import KafkaClient
import NIOCore
import Shared

/// A message an output handed to Kafka, and who waits for its outcome: the router's frame id on
/// the connection it came from. Shared by kafka-out and keen-out (Keen's Kafka transport).
public struct Delivery: Sendable {
    public var peer: FramePeer
    public var routerID: UInt64
    public var metrics: OutputMetrics?

    /// Hands the frame's payload to `producer` (key: the frame's key, headers: the frame's). While
    /// librdkafka's queue is full it waits — and so stops reading from the router (backpressure).
    public static func produce(
        _ frame: Frame, payload: ByteBuffer, topic: String, producer: KafkaProducer, pool: ProducerPool<Delivery>,
        peer: FramePeer
    ) async throws(KafkaError) {
        let context = Delivery(peer: peer, routerID: frame.id)
        let headers = frame.headers?.map { ($0.name, $0.value) } ?? []
        while true {
            let failure: KafkaError? = payload.withUnsafeReadableBytes { value in
                func send(_ key: UnsafeRawBufferPointer?) -> KafkaError? {
                    do throws(KafkaError) {
                        try pool.produce(producer, topic: topic, key: key, value: value, headers: headers, context: context)
                        return nil
                    } catch { return error }
                }
                guard var key = frame.key else { return send(nil) }
                return key.withUTF8 { send(UnsafeRawBufferPointer($0)) }
            }
            guard let failure else { return }
            guard failure.name == "_QUEUE_FULL" else { throw failure }
            do { try await Task.sleep(for: .milliseconds(2)) } catch { throw failure }
        }
    }

    /// Answers the router for each outcome: `ack` when delivered, `nack` (retryable or not) else.
    public static func answer(_ outcomes: [ProducerPool<Delivery>.Outcome], metrics: OutputMetrics) {
        var byPeer: [FramePeer: [Frame]] = [:]
        var failed = 0
        for o in outcomes {
            if let error = o.error {
                byPeer[o.context.peer, default: []].append(.nack(o.context.routerID, reason: error.description, retryable: error.isRetriable))
                failed += 1
            } else {
                byPeer[o.context.peer, default: []].append(.ack(o.context.routerID))
            }
        }
        for (peer, frames) in byPeer { peer.send(contentsOf: frames) }
        metrics.delivered.increment(by: Int64(outcomes.count - failed))
        if failed > 0 { metrics.failed.increment(by: Int64(failed)) }
    }

    /// A client-level error for some destinations, sent to the router so `status` shows it.
    public static func report(_ error: KafkaError, for keys: [String], to router: FramePeer?) {
        guard let router else { return }
        for key in keys {
            var frame = Frame.error(code: error.name, message: error.message)
            frame.destination = key
            router.send(frame)
        }
    }
}

/// A weak, lock-protected reference: lets callbacks made before an object finished its init
/// reach it later (the producer pool is created in the publisher's init).
public final class WeakRelay<Target: AnyObject>: @unchecked Sendable {
    private let lock = NSLock()
    private weak var _target: Target?
    public init() {}
    public var target: Target? {
        get { lock.withLock { _target } }
        set { lock.withLock { _target = newValue } }
    }
}
