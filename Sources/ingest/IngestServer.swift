import Foundation
import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOExtras
import NIOHTTP1
import NIOPosix
import Observability
import ServiceLifecycle
import Shared

/// ingest's HTTP/1.1 server: SwiftNIO's HTTP codec and one channel handler per connection, on the
/// event loop given (ingest's frame path's loop). Measured (`Benchmarks/http`), a framework's
/// async request/response machinery cost 93–102 µs of CPU per request where these handlers cost
/// 34–40 µs — about 8% of a request's whole path through Sluice.
///
/// Routes: `POST /v2/events`, `POST /v2/bulkevents` (the Events API), `GET /healthz`,
/// `GET /readyz`, `GET /metrics`. Keep-alive and pipelining (answers in order, one request handled
/// at a time per connection); a body larger than `ingest.max_request_bytes` is answered 413 as
/// soon as it is known and the connection closed; a connection that sends nothing for
/// `idleTimeout` is closed. On graceful shutdown it stops accepting, lets requests in progress be
/// answered and closes idle connections.
final class IngestServer<Sink: BatchSink>: Service, Sendable {
    let host: String
    let port: Int
    let api: IngestAPI<Sink>
    let loop: EventLoop
    let idleTimeout: TimeAmount
    let logger: Logger
    private let bound = NIOLockedValueBox<(channel: Channel?, waiters: [CheckedContinuation<Int, any Error>])>((nil, []))

    init(
        config: SluiceConfig, tenants: Tenants? = nil, sink: Sink, loop: EventLoop = MultiThreadedEventLoopGroup.singleton.next(),
        idleTimeout: TimeAmount = .seconds(30), logger: Logger
    ) {
        host = config.ingest.host
        port = config.ingest.port
        api = IngestAPI(tenants: tenants ?? Tenants(config), settings: config.ingest, sink: sink, logger: logger)
        self.loop = loop
        self.idleTimeout = idleTimeout
        self.logger = logger
        IngestMetrics.shared.spoolLimit.set(Double(config.ingest.spoolMaxBytes))
        Metrics.onScrape { IngestMetrics.shared.ready.set(to: sink.isReady ? 1.0 : 0.0) }
    }

    /// Serves until graceful shutdown (or cancellation), then stops accepting and waits for the
    /// connections to finish what they are answering.
    func run() async throws {
        let quiesce = ServerQuiescingHelper(group: loop)
        let channel: Channel
        do {
            channel = try await bind(quiesce)
        } catch {
            fail(error)
            throw error
        }
        let port = channel.localAddress?.port ?? 0
        let waiters = bound.withLockedValue { b in
            b.channel = channel
            defer { b.waiters = [] }
            return b.waiters
        }
        for waiter in waiters { waiter.resume(returning: port) }
        logger.info("listening", metadata: ["http.address": "\(host):\(port)"])
        try? await gracefulShutdown()
        let closed = loop.makePromise(of: Void.self)
        quiesce.initiateShutdown(promise: closed)
        try? await closed.futureResult.get()
    }

    /// The port it listens on, once it does (for a server started on port 0).
    func boundPort() async throws -> Int {
        try await withCheckedThrowingContinuation { continuation in
            let port = bound.withLockedValue { b -> Int? in
                if let channel = b.channel { return channel.localAddress?.port ?? 0 }
                b.waiters.append(continuation)
                return nil
            }
            if let port { continuation.resume(returning: port) }
        }
    }

    private func fail(_ error: any Error) {
        let waiters = bound.withLockedValue { b in
            defer { b.waiters = [] }
            return b.waiters
        }
        for waiter in waiters { waiter.resume(throwing: error) }
    }

    private func bind(_ quiesce: ServerQuiescingHelper) async throws -> Channel {
        let api = self.api
        let idleTimeout = self.idleTimeout
        let logger = self.logger
        return try await ServerBootstrap(group: loop)
            .serverChannelOption(.backlog, value: 256)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .serverChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(quiesce.makeServerChannelHandler(channel: channel))
                }
            }
            .childChannelOption(.socketOption(.tcp_nodelay), value: 1)
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    let pipeline = channel.pipeline.syncOperations
                    try pipeline.configureHTTPServerPipeline(withPipeliningAssistance: true, withErrorHandling: true)
                    try pipeline.addHandler(IdleStateHandler(readTimeout: idleTimeout))
                    try pipeline.addHandler(IngestHTTPHandler(api: api, logger: logger))
                }
            }
            .bind(host: host, port: port).get()
    }
}

/// One connection's requests, one at a time (NIO's pipelining handler holds back the next until
/// this one is answered): the body collected up to the limit, then routed and answered.
final class IngestHTTPHandler<Sink: BatchSink>: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundOut = HTTPServerResponsePart

    private enum Route {
        case events(bulk: Bool)
        case healthz, readyz, metrics
        case notFound
        case methodNotAllowed(allow: String)
    }

    private enum State {
        case idle
        case reading(HTTPRequestHead, Route)
        /// Answered before the request ended (413); the connection closes.
        case refused
        case answering
    }

    private let api: IngestAPI<Sink>
    private let logger: Logger
    private var state = State.idle
    private var body = ByteBuffer()

    init(api: IngestAPI<Sink>, logger: Logger) {
        self.api = api
        self.logger = logger
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .head(let head):
            let route = Self.route(head)
            body = ByteBuffer()
            if case .events = route {
                let limit = api.settings.maxRequestBytes
                if let length = head.headers.first(name: "content-length").flatMap(Int.init) {
                    guard length <= limit else { return refuseTooLarge(head, context: context) }
                    body.reserveCapacity(length)
                }
            }
            state = .reading(head, route)
        case .body(var part):
            guard case .reading(let head, .events) = state else { return }  // other routes take no body
            guard body.readableBytes + part.readableBytes <= api.settings.maxRequestBytes else {
                return refuseTooLarge(head, context: context)
            }
            body.writeBuffer(&part)
        case .end:
            guard case .reading(let head, let route) = state else { return }
            state = .answering
            dispatch(head, route, context: context)
        }
    }

    private static func route(_ head: HTTPRequestHead) -> Route {
        let uri = head.uri
        let path = uri.firstIndex(of: "?").map { uri[..<$0] } ?? uri[...]
        switch path {
        case "/v2/events", "/v2/bulkevents":
            return head.method == .POST ? .events(bulk: path == "/v2/bulkevents") : .methodNotAllowed(allow: "POST")
        case "/healthz", "/readyz", "/metrics":
            guard head.method == .GET || head.method == .HEAD else { return .methodNotAllowed(allow: "GET, HEAD") }
            return path == "/healthz" ? .healthz : path == "/readyz" ? .readyz : .metrics
        default:
            return .notFound
        }
    }

    private func dispatch(_ head: HTTPRequestHead, _ route: Route, context: ChannelHandlerContext) {
        switch route {
        case .events(let bulk):
            let request = body
            body = ByteBuffer()
            let loop = context.eventLoop
            let this = NIOLoopBound((handler: self, context: context), eventLoop: loop)
            api.handle(headers: head.headers, body: request, bulk: bulk) { answer in
                if loop.inEventLoop {
                    this.value.handler.respond(answer, to: head, context: this.value.context)
                } else {
                    loop.execute { this.value.handler.respond(answer, to: head, context: this.value.context) }
                }
            }
        case .healthz:
            respond(.text(.ok, "ok\n"), to: head, context: context)
        case .readyz:
            respond(
                api.sink.isReady
                    ? .text(.ok, "ready\n") : APIError.unavailable("not ready: the router is not connected or the spool is full").answer,
                to: head, context: context)
        case .metrics:
            respond(
                HTTPAnswer(status: .ok, contentType: Metrics.contentType, body: ByteBuffer(bytes: Metrics.text())), to: head,
                context: context)
        case .notFound:
            respond(.notFound, to: head, context: context)
        case .methodNotAllowed(let allow):
            respond(HTTPAnswer(status: .methodNotAllowed), to: head, context: context, extra: [("allow", allow)])
        }
    }

    private func refuseTooLarge(_ head: HTTPRequestHead, context: ChannelHandlerContext) {
        state = .refused
        body = ByteBuffer()
        IngestMetrics.shared.rejected("PAYLOAD_TOO_LARGE").increment()
        let answer = APIError.tooLarge("the request body exceeds \(api.settings.maxRequestBytes) bytes").answer
        respond(answer, to: head, context: context, close: true)
    }

    private func respond(
        _ answer: HTTPAnswer, to request: HTTPRequestHead, context: ChannelHandlerContext, extra: [(String, String)] = [],
        close: Bool = false
    ) {
        let keepAlive = request.isKeepAlive && !close
        var headers = HTTPHeaders()
        headers.reserveCapacity(6 + extra.count)
        headers.add(name: "server", value: "sluice-ingest")
        headers.add(name: "date", value: HTTPDate.now())
        if let type = answer.contentType { headers.add(name: "content-type", value: type) }
        if let seconds = answer.retryAfterSeconds { headers.add(name: "retry-after", value: String(seconds)) }
        for (name, value) in extra { headers.add(name: name, value: value) }
        headers.add(name: "content-length", value: String(answer.body.readableBytes))
        if !keepAlive { headers.add(name: "connection", value: "close") }
        context.write(
            wrapOutboundOut(.head(HTTPResponseHead(version: request.version, status: answer.status, headers: headers))), promise: nil)
        if answer.body.readableBytes > 0 && request.method != .HEAD {
            context.write(wrapOutboundOut(.body(.byteBuffer(answer.body))), promise: nil)
        }
        if keepAlive {
            context.writeAndFlush(wrapOutboundOut(.end(nil)), promise: nil)
            if case .answering = state { state = .idle }
        } else {
            let channel = context.channel
            context.writeAndFlush(wrapOutboundOut(.end(nil))).whenComplete { _ in channel.close(promise: nil) }
        }
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if let idle = event as? IdleStateHandler.IdleStateEvent, idle == .read {
            // Nothing heard for the idle timeout: close, unless a request is being answered.
            if case .answering = state { return }
            context.close(promise: nil)
            return
        }
        context.fireUserInboundEventTriggered(event)
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        logger.debug("HTTP connection error", metadata: ["error": "\(error)"])
        context.close(promise: nil)
    }
}

/// The `Date` header's value (RFC 9110 IMF-fixdate), made once per second.
enum HTTPDate {
    private static let cache = NIOLockedValueBox<(second: time_t, text: String)>((0, ""))

    static func now() -> String {
        let second = time(nil)
        if let text = cache.withLockedValue({ $0.second == second ? $0.text : nil }) { return text }
        var parts = tm()
        var t = second
        gmtime_r(&t, &parts)
        let days = ["Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"]
        let months = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]
        func two(_ n: Int32) -> String { n < 10 ? "0\(n)" : "\(n)" }
        let text =
            "\(days[Int(parts.tm_wday)]), \(two(parts.tm_mday)) \(months[Int(parts.tm_mon)]) \(parts.tm_year + 1900) "
            + "\(two(parts.tm_hour)):\(two(parts.tm_min)):\(two(parts.tm_sec)) GMT"
        cache.withLockedValue { $0 = (second, text) }
        return text
    }
}
