import Logging
import NIOCore
import NIOPosix
import ServiceLifecycle

/// Connects to a Unix socket, says `hello`, serves the connection with `handler`, and reconnects
/// with exponential backoff (100 ms doubling up to 5 s) whenever the connection is lost.
public struct FrameClient<Handler: FrameConnectionHandler>: Service {
    public let path: String
    public let role: PeerRole
    public let instance: String
    public let handler: Handler
    public let maximumFrameLength: Int
    /// When set, the connection's channel and its reader run on this one loop (see
    /// `EventLoopTaskExecutor`).
    public let executor: EventLoopTaskExecutor?
    let logger: Logger

    public init(
        path: String, role: PeerRole, instance: String, handler: Handler,
        maximumFrameLength: Int = defaultMaximumFrameLength, executor: EventLoopTaskExecutor? = nil, logger: Logger
    ) {
        self.path = path
        self.role = role
        self.instance = instance
        self.handler = handler
        self.maximumFrameLength = maximumFrameLength
        self.executor = executor
        self.logger = logger
    }

    public func run() async throws {
        do {
            try await cancelWhenGracefulShutdown { try await self.connectLoop() }
        } catch is CancellationError {
            // Graceful shutdown: not an error.
        }
    }

    func connectLoop() async throws {
        var delay = Duration.milliseconds(100)
        var lastFailure = ""
        let maximumFrameLength = self.maximumFrameLength
        let group: any EventLoopGroup = executor?.loop ?? MultiThreadedEventLoopGroup.singleton
        while !Task.isCancelled {
            do {
                let channel = try await ClientBootstrap(group: group)
                    .connect(unixDomainSocketPath: path) { channel in
                        channel.eventLoop.makeCompletedFuture {
                            try channel.frameAsyncChannel(maximumFrameLength: maximumFrameLength)
                        }
                    }
                delay = .milliseconds(100)
                lastFailure = ""
                logger.info("connected", metadata: ["socket.path": "\(path)"])
                let peer = FramePeer()
                peer.send(.hello(role: role, instance: instance))
                await withTaskExecutorPreference(executor) {
                    await runFrameConnection(channel, peer: peer, handler: handler, logger: logger)
                }
                logger.warning("connection lost, reconnecting", metadata: ["socket.path": "\(path)"])
            } catch {
                let text = "\(error)"
                if text != lastFailure {
                    logger.warning("cannot connect, retrying", metadata: ["socket.path": "\(path)", "error": "\(text)"])
                    lastFailure = text
                }
            }
            try await Task.sleep(for: delay)
            delay = min(delay * 2, .seconds(5))
        }
    }
}
