// http-bench hummingbird|nio PORT — serves POST /v2/events on one event loop: reads the whole body
// (up to 4 MiB), requires an Authorization header, answers 202 with a small JSON body. Nothing
// else: the difference between the two is the HTTP layer's own cost.
import Hummingbird
import NIOCore
import NIOHTTP1
import NIOPosix

let arguments = CommandLine.arguments
guard arguments.count == 3, let port = Int(arguments[2]), ["hummingbird", "nio"].contains(arguments[1]) else {
    print("usage: http-bench hummingbird|nio PORT")
    exit(2)
}
let loop = MultiThreadedEventLoopGroup(numberOfThreads: 1)
let maxBody = 4 << 20
let accepted = ByteBuffer(string: #"{"accepted":true}"#)

if arguments[1] == "hummingbird" {
    let router = Router()
    router.post("/v2/events") { request, _ -> Response in
        guard request.headers[.authorization] != nil else { return Response(status: .unauthorized) }
        let body = try await request.body.collect(upTo: maxBody)
        guard body.readableBytes > 0 else { return Response(status: .badRequest) }
        return Response(status: .accepted, headers: [.contentType: "application/json"], body: .init(byteBuffer: accepted))
    }
    let app = Application(
        router: router, server: .http1(configuration: .init(idleTimeout: .seconds(30))),
        configuration: .init(address: .hostname("127.0.0.1", port: port), serverName: "bench"),
        eventLoopGroupProvider: .shared(loop))
    try await app.runService()
} else {
    /// One request at a time per connection (HTTPServerPipelineHandler orders pipelined requests).
    final class EventsHandler: ChannelInboundHandler {
        typealias InboundIn = HTTPServerRequestPart
        typealias OutboundOut = HTTPServerResponsePart
        private var head: HTTPRequestHead?
        private var body = ByteBuffer()
        private var tooLarge = false

        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            switch unwrapInboundIn(data) {
            case .head(let h):
                head = h
                body.clear()
                tooLarge = false
            case .body(var part):
                if body.readableBytes + part.readableBytes > maxBody { tooLarge = true } else { body.writeBuffer(&part) }
            case .end:
                guard let head else { return }
                self.head = nil
                let status: HTTPResponseStatus =
                    head.method != .POST || head.uri != "/v2/events" ? .notFound
                    : head.headers["authorization"].isEmpty ? .unauthorized
                    : tooLarge ? .payloadTooLarge
                    : body.readableBytes == 0 ? .badRequest : .accepted
                var headers = HTTPHeaders([("content-type", "application/json"), ("server", "bench")])
                headers.add(name: "content-length", value: String(status == .accepted ? accepted.readableBytes : 0))
                context.write(wrapOutboundOut(.head(HTTPResponseHead(version: head.version, status: status, headers: headers))), promise: nil)
                if status == .accepted { context.write(wrapOutboundOut(.body(.byteBuffer(accepted))), promise: nil) }
                context.writeAndFlush(wrapOutboundOut(.end(nil)), promise: nil)
            }
        }
    }
    let channel = try await ServerBootstrap(group: loop)
        .serverChannelOption(.backlog, value: 256)
        .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
        .childChannelInitializer { channel in
            channel.eventLoop.makeCompletedFuture {
                try channel.pipeline.syncOperations.configureHTTPServerPipeline(withErrorHandling: true)
                try channel.pipeline.syncOperations.addHandler(EventsHandler())
            }
        }
        .bind(host: "127.0.0.1", port: port).get()
    try await channel.closeFuture.get()
}
