import Foundation
import KafkaClient
import NIOConcurrencyHelpers
import NIOCore
import Shared

/// A message an output handed on (to Kafka, or to Keen over HTTP), and who waits for its outcome:
/// the router's frame id on the connection it came from — and, for a frame of several messages,
/// the tally that answers the frame once all of its messages are settled. Shared by kafka-out and
/// keen-out.
public struct Delivery: Sendable {
    public var peer: FramePeer
    public var routerID: UInt64
    public var tally: FrameTally?
    public var index: Int

    public init(peer: FramePeer, routerID: UInt64, tally: FrameTally? = nil, index: Int = 0) {
        self.peer = peer
        self.routerID = routerID
        self.tally = tally
        self.index = index
    }

    /// The answer this message's outcome (nil: delivered) makes: its own ack or nack, or for a
    /// message of a several-message frame the frame's answer once it is the last one settled.
    public func answer(failure: (reason: String, retryable: Bool)?) -> Frame? {
        if let tally { return tally.record(index, failure: failure) }
        guard let failure else { return .ack(routerID) }
        return .nack(routerID, reason: failure.reason, retryable: failure.retryable)
    }

    /// The deliveries of a batch frame's messages (one tally for them when there are several),
    /// each with its payload, topic (the part's, else the frame's) and headers.
    public static func split(_ frame: Frame, from peer: FramePeer) throws(FrameError) -> [Message] {
        let messages = try frame.messages()
        let tally = frame.parts == nil ? nil : FrameTally(peer: peer, routerID: frame.id, count: messages.count)
        let common = frame.headers?.map { ($0.name, $0.value) } ?? []
        return messages.enumerated().map { i, m in
            var headers = common
            if let id = m.part?.eventID { headers.append(("sluice-event-id", id)) }
            return Message(
                delivery: Delivery(peer: peer, routerID: frame.id, tally: tally, index: i), payload: m.payload,
                topic: m.part?.topic ?? frame.topic, key: frame.key, headers: headers)
        }
    }

    /// One message of a batch frame, ready to hand on.
    public struct Message: Sendable {
        public var delivery: Delivery
        public var payload: ByteBuffer
        public var topic: String?
        public var key: String?
        public var headers: [(name: String, value: String)]
    }

    /// Hands each message (of one batch frame) to `producer` (topic: `topic`, or each message's own
    /// when nil). While librdkafka's queue is full it waits — and so stops
    /// reading from the router (backpressure). A message librdkafka refuses at once is answered
    /// as failed; the others are answered when Kafka confirms them.
    public static func produce(
        _ messages: [Message], topic: String?, producer: KafkaProducer, pool: ProducerPool<Delivery>
    ) async throws(FrameError) {
        for m in messages {
            guard let topic = topic ?? m.topic else { throw .invalidFrame("batch frame without a topic") }
            var failure: KafkaError?
            while true {
                failure = m.payload.withUnsafeReadableBytes { value in
                    func send(_ key: UnsafeRawBufferPointer?) -> KafkaError? {
                        do throws(KafkaError) {
                            try pool.produce(producer, topic: topic, key: key, value: value, headers: m.headers, context: m.delivery)
                            return nil
                        } catch { return error }
                    }
                    guard var key = m.key else { return send(nil) }
                    return key.withUTF8 { send(UnsafeRawBufferPointer($0)) }
                }
                guard let f = failure, f.name == "_QUEUE_FULL" else { break }
                do { try await Task.sleep(for: .milliseconds(2)) } catch { break }
            }
            if let failure, let answer = m.delivery.answer(failure: (failure.description, failure.isRetriable)) {
                m.delivery.peer.send(answer)
            }
        }
    }

    /// Answers the router for each outcome: `ack` when delivered, `nack` (retryable or not) else.
    public static func answer(_ outcomes: [ProducerPool<Delivery>.Outcome], metrics: OutputMetrics) {
        var byPeer: [FramePeer: [Frame]] = [:]
        var failed = 0
        for o in outcomes {
            if o.error != nil { failed += 1 }
            if let frame = o.context.answer(failure: o.error.map { ($0.description, $0.isRetriable) }) {
                byPeer[o.context.peer, default: []].append(frame)
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

/// The outcomes of one several-message frame's messages, gathered until all are settled; then
/// the router gets one answer: `ack`, or a `nack` listing the messages that failed.
public final class FrameTally: Sendable {
    public let peer: FramePeer
    public let routerID: UInt64
    private let state: NIOLockedValueBox<(remaining: Int, failed: [FailedPart])>

    public init(peer: FramePeer, routerID: UInt64, count: Int) {
        self.peer = peer
        self.routerID = routerID
        state = NIOLockedValueBox((count, []))
    }

    /// Records message `index`'s outcome (nil: delivered); the frame's answer once all are in.
    public func record(_ index: Int, failure: (reason: String, retryable: Bool)?) -> Frame? {
        let done: [FailedPart]? = state.withLockedValue { s in
            if let failure { s.failed.append(FailedPart(index: index, reason: failure.reason, retryable: failure.retryable)) }
            s.remaining -= 1
            return s.remaining == 0 ? s.failed : nil
        }
        guard let failed = done else { return nil }
        return failed.isEmpty ? .ack(routerID) : .nack(routerID, failed: failed.sorted { $0.index < $1.index })
    }
}
