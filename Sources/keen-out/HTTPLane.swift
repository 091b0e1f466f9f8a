import Foundation
import Logging
import NIOCore
import Outputs
import Shared

/// One Keen destination's HTTP transport: events queue up while a request is in flight and go
/// together in the next one (Keen's batch endpoint, `{"<collection>":[events…]}`), on a thread of
/// its own with one libcurl handle (connections reused). Each event is answered from Keen's
/// per-event result: `ack`, or `nack` (retryable unless Keen says the event itself is invalid).
final class HTTPLane: @unchecked Sendable {
    struct Item {
        var delivery: Delivery
        var collection: String
        var event: ByteBuffer
    }

    /// Per request at most (Keen takes up to 10 MB).
    static let maxEvents = 500
    static let maxBytes = 5_000_000
    /// Queued at most before `add` waits (backpressure to the router connection).
    static let maxQueued = 10_000

    /// Keen's per-event errors that no retry can fix: the event itself is refused.
    static let permanentErrors: Set<String> = [
        "InvalidCollectionNameError", "InvalidPropertyNameError", "InvalidPropertyValueError", "InvalidEventError",
        "EventTooLargeError",
    ]

    private let condition = NSCondition()
    private var queue: [Item] = []
    private var stopping = false
    private var finished = false
    let destination: KeenDestination
    let timeout: Duration
    let metrics: OutputMetrics
    let logger: Logger

    init(destination: KeenDestination, timeout: Duration, metrics: OutputMetrics, logger: Logger) {
        self.destination = destination
        self.timeout = timeout
        self.metrics = metrics
        self.logger = logger
        let thread = Thread { [self] in run() }
        thread.name = "keen-http"
        thread.start()
    }

    func add(_ item: Item) async {
        while true {
            let taken = condition.withLock { () -> Bool in
                guard queue.count < Self.maxQueued else { return false }
                queue.append(item)
                condition.signal()
                return true
            }
            if taken { return }
            try? await Task.sleep(for: .milliseconds(2))
        }
    }

    /// The router connection is gone: it sends these again on the next one.
    func forget(_ peer: FramePeer) {
        condition.withLock { queue.removeAll { $0.delivery.peer == peer } }
    }

    /// Sends what is queued (for up to `drainFor`), then ends the thread.
    func stop(drainFor: Duration) {
        let deadline = Date().addingTimeInterval(Double(drainFor.components.seconds))
        condition.lock()
        stopping = true
        condition.broadcast()
        while !finished && condition.wait(until: deadline) {}
        condition.unlock()
    }

    private func run() {
        let client = CurlClient(caPEM: destination.sslCAPEM, timeout: timeout)
        while true {
            condition.lock()
            while queue.isEmpty && !stopping { condition.wait() }
            if queue.isEmpty {
                finished = true
                condition.broadcast()
                condition.unlock()
                return
            }
            var bytes = 0
            var count = 0
            for item in queue {
                if count == Self.maxEvents || (count > 0 && bytes + item.event.readableBytes > Self.maxBytes) { break }
                bytes += item.event.readableBytes
                count += 1
            }
            let items = Array(queue.prefix(count))
            queue.removeFirst(count)
            condition.unlock()
            send(items, client: client)
        }
    }

    private func send(_ items: [Item], client: CurlClient) {
        // Events grouped by collection, in arrival order; the body is spliced from their bytes.
        var order: [String] = []
        var groups: [String: [Int]] = [:]
        for (i, item) in items.enumerated() {
            if groups[item.collection] == nil { order.append(item.collection) }
            groups[item.collection, default: []].append(i)
        }
        var body = ByteBuffer()
        body.writeStaticString("{")
        for (g, collection) in order.enumerated() {
            if g > 0 { body.writeStaticString(",") }
            JSON.writeString(collection, into: &body)
            body.writeStaticString(":[")
            for (n, i) in groups[collection]!.enumerated() {
                if n > 0 { body.writeStaticString(",") }
                var event = items[i].event
                body.writeBuffer(&event)
            }
            body.writeStaticString("]")
        }
        body.writeStaticString("}")

        let url = "\(destination.httpBaseURL)/3.0/projects/\(destination.projectID)/events"
        var outcomes = [(retryable: Bool, reason: String)?](repeating: nil, count: items.count)  // nil = delivered
        do {
            let response = try client.post(url, authorization: destination.key.value, body: Data(body.readableBytesView))
            let answer = try? JSONValue.parse(ByteBuffer(data: response.body))
            switch response.status {
            case 200:
                for collection in order {
                    let results = answer?[collection]?.arrayValue ?? []
                    for (n, i) in groups[collection]!.enumerated() {
                        guard n < results.count else {
                            outcomes[i] = (true, "Keen's answer has no result for this event")
                            continue
                        }
                        if results[n]["success"] == .bool(true) { continue }
                        let name = results[n]["error"]?["name"]?.stringValue ?? "UnknownError"
                        if name.contains("Duplicate") { continue }  // already stored: Keen de-duplicated it
                        let description = results[n]["error"]?["description"]?.stringValue ?? ""
                        outcomes[i] = (!Self.permanentErrors.contains(name), "Keen: \(name): \(description)")
                    }
                }
            default:
                let code = answer?["error_code"]?.stringValue ?? "HTTP \(response.status)"
                let message = answer?["message"]?.stringValue ?? String(decoding: response.body.prefix(200), as: UTF8.self)
                // 401/403 can be fixed by a config reload (a new key); 408, 429 and 5xx pass.
                let retryable = [401, 403, 408, 429].contains(response.status) || response.status >= 500
                let reason = "Keen answered \(response.status) \(code): \(message)"
                for i in items.indices { outcomes[i] = (retryable, reason) }
            }
        } catch {
            for i in items.indices { outcomes[i] = (true, "\(error)") }
        }
        var byPeer: [FramePeer: [Frame]] = [:]
        var failed = 0
        for (i, item) in items.enumerated() {
            if outcomes[i] != nil { failed += 1 }
            if let answer = item.delivery.answer(failure: outcomes[i].map { ($0.reason, $0.retryable) }) {
                byPeer[item.delivery.peer, default: []].append(answer)
            }
        }
        if failed > 0 {
            logger.warning(
                "Keen HTTP: events not accepted", metadata: ["events.failed": "\(failed)", "events": "\(items.count)", "keen.project": "\(destination.projectID)"])
        }
        for (peer, frames) in byPeer { peer.send(contentsOf: frames) }
        metrics.delivered.increment(by: Int64(items.count - failed))
        if failed > 0 { metrics.failed.increment(by: Int64(failed)) }
    }
}
