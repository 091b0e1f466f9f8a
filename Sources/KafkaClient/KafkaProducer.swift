import CRdKafka
import Foundation
import Logging
import NIOCore
import NIOPosix

/// The outcome of one produced message, matched to its send by `id`.
public struct DeliveryReport: Sendable {
    public var id: UInt64
    public var error: KafkaError?
    public var partition: Int32
    public var offset: Int64
}

/// One librdkafka producer. Its event queue (delivery reports, logs, errors) is served on the given
/// event loop, else on a thread of its own — never by a librdkafka thread calling into Swift.
/// Delivery reports are matched to sends by the id carried in the message's opaque pointer.
public final class KafkaProducer: @unchecked Sendable {
    private let handle: OpaquePointer
    private let events: EventQueue
    /// Holds each partition's next messages while it has some in flight (nil: off, see
    /// `ProducerConfiguration.partitionRounds`).
    private let rounds: PartitionRounds?
    private let lock = NSLock()
    private var topics: [String: (handle: OpaquePointer, rounds: PartitionRounds.Topic?)] = [:]
    public let configuration: ProducerConfiguration

    public init(
        configuration: ProducerConfiguration, logger: Logger,
        onStatistics: (@Sendable (ProducerStatistics) -> Void)? = nil,
        onError: (@Sendable (KafkaError) -> Void)? = nil,
        eventLoop: EventLoop? = nil,
        onDelivery: @escaping @Sendable ([DeliveryReport]) -> Void
    ) throws(KafkaError) {
        self.configuration = configuration
        let conf = rd_kafka_conf_new()!
        var errstr = [CChar](repeating: 0, count: 512)
        for (key, value) in configuration.properties {
            if rd_kafka_conf_set(conf, key, value, &errstr, errstr.count) != RD_KAFKA_CONF_OK {
                rd_kafka_conf_destroy(conf)
                let shown = ProducerConfiguration.secretProperties.contains(key) ? "<redacted>" : value
                throw .configuration("librdkafka rejected \(key)=\(shown): \(errorText(errstr))")
            }
        }
        rd_kafka_conf_set_events(conf, RD_KAFKA_EVENT_DR | RD_KAFKA_EVENT_LOG | RD_KAFKA_EVENT_ERROR | RD_KAFKA_EVENT_STATS)
        guard let rk = rd_kafka_new(RD_KAFKA_PRODUCER, conf, &errstr, errstr.count) else {
            // On failure the configuration object is still ours.
            rd_kafka_conf_destroy(conf)
            throw .configuration("cannot create a Kafka producer: \(errorText(errstr))")
        }
        handle = rk
        let queue = rd_kafka_queue_get_main(rk)!
        rd_kafka_set_log_queue(rk, queue)
        var onStatistics = onStatistics
        if configuration.partitionRounds, configuration.statisticsInterval > .zero {
            let rounds = PartitionRounds(
                handle: rk, linger: configuration.linger - configuration.librdkafkaLinger,
                maxHeldMessages: configuration.queueMaxMessages, maxHeldBytes: configuration.queueMaxKilobytes * 1024,
                loop: eventLoop, onFailed: onDelivery)
            let forward = onStatistics
            onStatistics = { stats in
                rounds.update(partitionCounts: stats.partitionCounts)
                forward?(stats)
            }
            self.rounds = rounds
        } else {
            rounds = nil
        }
        events = EventQueue(
            queue: queue, logger: logger, rounds: rounds, onStatistics: onStatistics, onError: onError, onDelivery: onDelivery)
        events.start(on: eventLoop)
    }

    deinit {
        // Destroyed once nothing serves the event queue any more (librdkafka's own threads are
        // joined there, off this thread).
        rounds?.stop()
        let handles = Handles(producer: handle, queue: events.queue, topics: topics.values.map(\.handle))
        events.stop { handles.destroy() }
    }

    private struct Handles: @unchecked Sendable {
        let producer: OpaquePointer
        let queue: OpaquePointer
        let topics: [OpaquePointer]
        func destroy() {
            for rkt in topics { rd_kafka_topic_destroy(rkt) }
            rd_kafka_queue_destroy(queue)
            rd_kafka_destroy(producer)
        }
    }

    /// A fatal error (e.g. the idempotent producer lost its state): this producer can send no more.
    public var fatalError: KafkaError? { events.fatalError }

    /// Messages held for their partition's next round (`ProducerConfiguration.partitionRounds`).
    public var held: Int { rounds?.held ?? 0 }

    /// Messages handed to librdkafka, or held for their partition's round, and not yet reported.
    public var outstanding: Int { Int(rd_kafka_outq_len(handle)) + (rounds?.held ?? 0) }

    /// Hands one message to librdkafka (copied). Throws `_QUEUE_FULL` (retriable) when librdkafka's
    /// queue is full: wait for deliveries and try again.
    public func produce(
        topic: String, key: UnsafeRawBufferPointer?, value: UnsafeRawBufferPointer,
        headers: [(name: String, value: String)] = [], id: UInt64
    ) throws(KafkaError) {
        try produce(topic: self.topic(topic), key: key, value: value, headers: KafkaHeaders(headers), id: id)
    }

    /// Hands one message to librdkafka (copied) — or holds it for its partition's next round —,
    /// with `headers` and, when given, one more header (`extra`: a NUL-terminated name and the
    /// value's bytes): the path every message of a frame takes. Throws `_QUEUE_FULL` (retriable)
    /// when librdkafka's queue (or what is held) is full.
    public func produce(
        topic: KafkaTopic, key: UnsafeRawBufferPointer?, value: UnsafeRawBufferPointer, headers: KafkaHeaders,
        extra: (name: UnsafePointer<CChar>, value: UnsafeRawBufferPointer)? = nil, id: UInt64
    ) throws(KafkaError) {
        precondition(topic.producer == ObjectIdentifier(self), "a topic of another producer")
        if let rounds, let t = topic.rounds {
            try rounds.produce(t, key: key, value: value, headers: headers, extra: extra, id: id)
            return
        }
        if let err = produceMessage(
            handle, topic: topic.handle, partition: RD_KAFKA_PARTITION_UA, key: key, value: value, ownsValue: false,
            headers: headers, extra: extra, opaque: id)
        {
            throw err
        }
    }

    /// The topic `name` of this producer (created on first use, kept while the producer lives).
    public func topic(_ name: String) throws(KafkaError) -> KafkaTopic {
        lock.lock()
        defer { lock.unlock() }
        if let t = topics[name] { return KafkaTopic(handle: t.handle, rounds: t.rounds, producer: ObjectIdentifier(self)) }
        // The topic's opaque is its rounds, for the delivery reports (librdkafka keeps it, unretained).
        let roundsTopic = rounds.map { _ in PartitionRounds.Topic(name: name) }
        // The producer's topic settings (message.timeout.ms, acks) apply: a copy of its defaults.
        let conf = rd_kafka_default_topic_conf_dup(handle)!
        if let roundsTopic { rd_kafka_topic_conf_set_opaque(conf, Unmanaged.passUnretained(roundsTopic).toOpaque()) }
        guard let t = rd_kafka_topic_new(handle, name, conf) else {
            throw KafkaError(rd_kafka_last_error(), message: "cannot use topic '\(name)'")
        }
        // (A topic librdkafka already had keeps its first settings: no rounds for it.)
        let roundsTopicSet = roundsTopic.flatMap { rd_kafka_topic_opaque(t) == Unmanaged.passUnretained($0).toOpaque() ? $0 : nil }
        if let roundsTopic = roundsTopicSet {
            roundsTopic.handle = t
            rounds?.add(roundsTopic)
        }
        topics[name] = (t, roundsTopicSet)
        return KafkaTopic(handle: t, rounds: roundsTopicSet, producer: ObjectIdentifier(self))
    }

    /// Waits (blocking this thread) until everything handed over is delivered or `timeout` passes.
    /// Returns the number of messages still outstanding.
    @discardableResult
    public func flush(timeout: Duration) -> Int {
        rounds?.drain()
        _ = rd_kafka_flush(handle, Int32(ProducerConfiguration.milliseconds(timeout)) ?? 0)
        return outstanding
    }
}

/// Serves a producer's librdkafka event queue (delivery reports, logs, errors, statistics): on an
/// event loop when one is given, else on a thread of its own. On a loop, librdkafka writes a byte
/// to a pipe the loop watches whenever the queue goes from empty to not empty, and the loop drains
/// it: a batch of delivery reports costs one wake-up of the loop, where a thread of its own took
/// two (the thread's, then the loop's to write the answers) — at max load per event that thread
/// woke ≈ 2,400 times a second. It holds no reference to the producer: the producer's deinit stops
/// it, and it destroys the producer's handles once nothing serves them any more.
final class EventQueue: @unchecked Sendable {
    let queue: OpaquePointer
    private let logger: Logger
    private let onDelivery: @Sendable ([DeliveryReport]) -> Void
    private let rounds: PartitionRounds?
    private let onStatistics: (@Sendable (ProducerStatistics) -> Void)?
    private let onError: (@Sendable (KafkaError) -> Void)?
    private let lock = NSLock()
    private var fatal: KafkaError?
    /// Statistics are parsed here, never on the loop (a large JSON document every few seconds).
    private static let statisticsQueue = DispatchQueue(label: "sluice.kafka.statistics")

    // Under `lock`. `loop`: set when served on a loop, with the pipe's ends (`channel`: the read
    // end once registered; `writeFD`: the end librdkafka writes to).
    private var loop: EventLoop?
    private var channel: Channel?
    private var writeFD: Int32 = -1
    /// No more serving: on the loop, set there; for the thread, asked of it (it then runs `onStopped`).
    private var stopped = false
    private var onStopped: (@Sendable () -> Void)?

    /// The reports of one event (reused: only the serving thread or loop touches it), and those
    /// of its messages that came by a partition's round.
    private var reports: [DeliveryReport] = []
    private var roundReports: [(topic: UnsafeMutableRawPointer, partition: Int32)] = []

    /// Events handled per turn of the loop before it runs its other work.
    static let eventsPerTurn = 64

    init(
        queue: OpaquePointer, logger: Logger, rounds: PartitionRounds?, onStatistics: (@Sendable (ProducerStatistics) -> Void)?,
        onError: (@Sendable (KafkaError) -> Void)?, onDelivery: @escaping @Sendable ([DeliveryReport]) -> Void
    ) {
        self.queue = queue
        self.rounds = rounds
        self.onStatistics = onStatistics
        self.onError = onError
        self.logger = logger
        self.onDelivery = onDelivery
    }

    var fatalError: KafkaError? { lock.withLock { fatal } }

    /// Starts serving: on `loop`, else on a thread of its own.
    func start(on loop: EventLoop?) {
        if let loop {
            startOnLoop(loop)
        } else {
            startThread()
        }
    }

    /// Stops serving, then runs `destroy` (off the caller's thread, once nothing polls the queue).
    func stop(then destroy: @escaping @Sendable () -> Void) {
        let servingLoop: EventLoop? = lock.withLock {
            if loop == nil {
                onStopped = destroy
                stopped = true
            }
            return loop
        }
        servingLoop?.execute { self.stopOnLoop(then: destroy) }
    }

    // MARK: On a loop

    private func startOnLoop(_ loop: EventLoop) {
        var ends: [Int32] = [-1, -1]
        guard pipe(&ends) == 0 else {
            logger.warning("cannot make a pipe for librdkafka's events; serving them on a thread", metadata: ["errno": "\(errno)"])
            return startThread()
        }
        let fds = ends
        for fd in fds {
            _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
            _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK)  // librdkafka's write must never block
        }
        lock.withLock {
            self.loop = loop
            writeFD = fds[1]
        }
        let wake: [UInt8] = [1]
        wake.withUnsafeBufferPointer { rd_kafka_queue_io_event_enable(queue, fds[1], $0.baseAddress, 1) }
        NIOPipeBootstrap(group: loop)
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture { try channel.pipeline.syncOperations.addHandler(Wakeups(events: self)) }
            }
            .takingOwnershipOfDescriptor(input: fds[0])
            .whenComplete { result in
                switch result {
                case .success(let channel):
                    let stopped = self.lock.withLock {
                        if !self.stopped { self.channel = channel }
                        return self.stopped
                    }
                    if stopped {
                        channel.close(promise: nil)
                    } else {
                        // Events queued before the pipe was watched wrote nothing (the queue was not empty).
                        self.serve(on: loop)
                    }
                case .failure(let error):
                    Foundation.close(fds[0])
                    // Stopped meanwhile: `stopOnLoop` closed the write end and destroys.
                    let stopped = self.lock.withLock { () -> Bool in
                        guard !self.stopped else { return true }
                        Foundation.close(self.writeFD)
                        self.writeFD = -1
                        self.loop = nil
                        return false
                    }
                    guard !stopped else { return }
                    self.logger.warning(
                        "cannot watch librdkafka's event pipe; serving its events on a thread", metadata: ["error": "\(error)"])
                    rd_kafka_queue_io_event_enable(self.queue, -1, nil, 0)
                    self.startThread()
                }
            }
    }

    /// Drains the queue on the loop, a turn at a time, until it is empty.
    fileprivate func serve(on loop: EventLoop) {
        for _ in 0..<Self.eventsPerTurn {
            guard !lock.withLock({ stopped }), let event = rd_kafka_queue_poll(queue, 0) else { return }
            handle(event)
        }
        loop.execute { self.serve(on: loop) }
    }

    private func stopOnLoop(then destroy: @escaping @Sendable () -> Void) {
        let (channel, writeFD): (Channel?, Int32) = lock.withLock {
            stopped = true
            // The pipe could not be watched: the thread that serves instead runs `destroy`.
            if self.writeFD < 0 { onStopped = destroy }
            defer { self.writeFD = -1 }
            return (self.channel, self.writeFD)
        }
        guard writeFD >= 0 else { return }
        // Not registered yet: the registration closes the channel when it sees `stopped`.
        rd_kafka_queue_io_event_enable(queue, -1, nil, 0)
        channel?.close(promise: nil)
        Foundation.close(writeFD)
        // rd_kafka_destroy waits for librdkafka's threads: not on the loop.
        DispatchQueue.global().async(execute: destroy)
    }

    /// Wakes the queue's loop when librdkafka writes to the pipe.
    private final class Wakeups: ChannelInboundHandler {
        typealias InboundIn = ByteBuffer
        let events: EventQueue
        init(events: EventQueue) { self.events = events }
        func channelRead(context: ChannelHandlerContext, data: NIOAny) {}  // the bytes only wake
        func channelReadComplete(context: ChannelHandlerContext) { events.serve(on: context.eventLoop) }
    }

    // MARK: On a thread of its own

    private func startThread() {
        let thread = Thread { self.runThread() }
        thread.name = "kafka-events"
        thread.start()
    }

    private func runThread() {
        while true {
            let (stopped, destroy) = lock.withLock { (self.stopped, onStopped) }
            if stopped {
                destroy?()
                return
            }
            guard let event = rd_kafka_queue_poll(queue, 100) else { continue }
            handle(event)
        }
    }

    // MARK: Events

    /// Handles one event and destroys it.
    private func handle(_ event: OpaquePointer) {
        defer { rd_kafka_event_destroy(event) }
        switch Int32(rd_kafka_event_type(event)) {
        case RD_KAFKA_EVENT_DR:
            reports.removeAll(keepingCapacity: true)
            roundReports.removeAll(keepingCapacity: true)
            while let message = rd_kafka_event_message_next(event) {
                let m = message.pointee
                // Not rd_kafka_message_errstr: for a producer's message it returns the payload.
                let error: KafkaError? = m.err == RD_KAFKA_RESP_ERR_NO_ERROR ? nil : KafkaError(m.err)
                let opaque = UInt64(UInt(bitPattern: m._private))
                if opaque & PartitionRounds.roundBit != 0, let rkt = m.rkt, let topic = rd_kafka_topic_opaque(rkt) {
                    roundReports.append((topic, m.partition))
                }
                reports.append(
                    DeliveryReport(id: opaque & ~PartitionRounds.roundBit, error: error, partition: m.partition, offset: m.offset))
            }
            if !roundReports.isEmpty { rounds?.settled(roundReports) }
            if !reports.isEmpty { onDelivery(reports) }
        case RD_KAFKA_EVENT_LOG:
            var facility: UnsafePointer<CChar>?
            var text: UnsafePointer<CChar>?
            var level: Int32 = 0
            rd_kafka_event_log(event, &facility, &text, &level)
            let message = text.map { String(cString: $0) } ?? ""
            logger.log(
                level: Self.level(syslog: level), "librdkafka",
                metadata: ["kafka.facility": "\(facility.map { String(cString: $0) } ?? "")", "kafka.log": "\(message)"])
        case RD_KAFKA_EVENT_ERROR:
            let err = rd_kafka_event_error(event)
            let isFatal = rd_kafka_event_error_is_fatal(event) != 0
            let error = KafkaError(err, message: String(cString: rd_kafka_event_error_string(event)), isFatal: isFatal)
            if isFatal { lock.withLock { fatal = error } }
            onError?(error)
            logger.log(
                level: isFatal ? .error : .warning, "kafka client error",
                metadata: ["kafka.error": "\(error.name)", "kafka.message": "\(error.message)", "kafka.fatal": "\(isFatal)"])
        case RD_KAFKA_EVENT_STATS:
            if let onStatistics, let json = rd_kafka_event_stats(event) {
                let data = Data(bytes: json, count: strlen(json))
                Self.statisticsQueue.async {
                    if let stats = ProducerStatistics(json: data) { onStatistics(stats) }
                }
            }
        default:
            break
        }
    }

    static func level(syslog: Int32) -> Logger.Level {
        switch syslog {
        case ...3: return .error
        case 4: return .warning
        case 5: return .notice
        case 6: return .info
        default: return .debug
        }
    }
}

/// A topic of one producer (librdkafka's handle, valid while the producer lives), looked up once
/// for many messages. Use it only with the producer it came from, while holding that producer.
public struct KafkaTopic: @unchecked Sendable {
    let handle: OpaquePointer
    let rounds: PartitionRounds.Topic?
    let producer: ObjectIdentifier
}

/// Hands one message to librdkafka (`rd_kafka_produceva`): to `partition` (`RD_KAFKA_PARTITION_UA`:
/// librdkafka's partitioner chooses), the value copied — or taken over when `ownsValue` (a
/// `malloc`ed block librdkafka frees; still the caller's if refused) —, with `headers` and, when
/// given, one more header (`extra`: a NUL-terminated name and the value's bytes), without
/// allocating. Returns librdkafka's refusal.
func produceMessage(
    _ handle: OpaquePointer, topic: OpaquePointer, partition: Int32, key: UnsafeRawBufferPointer?,
    value: UnsafeRawBufferPointer, ownsValue: Bool, headers: KafkaHeaders,
    extra: (name: UnsafePointer<CChar>, value: UnsafeRawBufferPointer)?, opaque: UInt64
) -> KafkaError? {
    let count = 6 + headers.count + (extra == nil ? 0 : 1)
    let err: OpaquePointer? = withUnsafeTemporaryAllocation(of: rd_kafka_vu_t.self, capacity: count) { vus in
        vus.initialize(repeating: rd_kafka_vu_t())
        vus[0].vtype = RD_KAFKA_VTYPE_RKT
        vus[0].u.rkt = topic
        vus[1].vtype = RD_KAFKA_VTYPE_VALUE
        vus[1].u.mem.ptr = UnsafeMutableRawPointer(mutating: value.baseAddress)
        vus[1].u.mem.size = value.count
        vus[2].vtype = RD_KAFKA_VTYPE_KEY
        vus[2].u.mem.ptr = key.flatMap { UnsafeMutableRawPointer(mutating: $0.baseAddress) }
        vus[2].u.mem.size = key?.count ?? 0
        vus[3].vtype = RD_KAFKA_VTYPE_OPAQUE
        vus[3].u.ptr = UnsafeMutableRawPointer(bitPattern: UInt(opaque))
        vus[4].vtype = RD_KAFKA_VTYPE_MSGFLAGS
        vus[4].u.i = ownsValue ? RD_KAFKA_MSG_F_FREE : RD_KAFKA_MSG_F_COPY
        vus[5].vtype = RD_KAFKA_VTYPE_PARTITION
        vus[5].u.i32 = partition
        var n = 6
        for i in 0..<headers.count {
            vus[n].vtype = RD_KAFKA_VTYPE_HEADER
            vus[n].u.header.name = UnsafePointer(headers.names[i])
            vus[n].u.header.val = UnsafeRawPointer(headers.values[i])
            vus[n].u.header.size = headers.sizes[i]
            n += 1
        }
        if let extra {
            vus[n].vtype = RD_KAFKA_VTYPE_HEADER
            vus[n].u.header.name = extra.name
            // librdkafka reads `size` bytes; a null value pointer would mean a null header.
            vus[n].u.header.val = extra.value.baseAddress ?? UnsafeRawPointer(extra.name)
            vus[n].u.header.size = extra.value.count
        }
        return rd_kafka_produceva(handle, vus.baseAddress, count)
    }
    guard let err else { return nil }
    let code = rd_kafka_error_code(err)
    let message = String(cString: rd_kafka_error_string(err))
    let fatal = rd_kafka_error_is_fatal(err) != 0
    rd_kafka_error_destroy(err)
    return KafkaError(code, message: message, isFatal: fatal)
}

/// Message headers as C strings, made once and used for every message of a frame.
public final class KafkaHeaders: @unchecked Sendable {
    let names: [UnsafeMutablePointer<CChar>]
    let values: [UnsafeMutablePointer<CChar>]
    let sizes: [Int]
    public var count: Int { names.count }

    public init(_ headers: [(name: String, value: String)]) {
        names = headers.map { Self.copy($0.name) }
        values = headers.map { Self.copy($0.value) }
        sizes = headers.map { $0.value.utf8.count }
    }

    /// The string's bytes (all of them, even after a NUL) and a terminating NUL.
    private static func copy(_ text: String) -> UnsafeMutablePointer<CChar> {
        let bytes = Array(text.utf8)
        let out = UnsafeMutablePointer<CChar>.allocate(capacity: bytes.count + 1)
        for (i, b) in bytes.enumerated() { out[i] = CChar(bitPattern: b) }
        out[bytes.count] = 0
        return out
    }

    deinit {
        names.forEach { $0.deallocate() }
        values.forEach { $0.deallocate() }
    }
}
