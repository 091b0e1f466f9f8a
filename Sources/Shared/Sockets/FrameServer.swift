import Logging
import NIOCore
import NIOPosix
import ServiceLifecycle

#if canImport(Glibc)
import Glibc
#endif

/// Listens on a Unix socket (mode 0600) and serves each connection with `handler`.
/// A bad connection is logged and closed; the listener keeps serving the others.
public struct FrameServer<Handler: FrameConnectionHandler>: Service {
    public let path: String
    public let handler: Handler
    public let maximumFrameLength: Int
    /// When set, every connection's channel and reader task run on this one loop (see
    /// `EventLoopTaskExecutor`); else channels spread over NIO's shared loops and readers run on
    /// Swift's cooperative pool.
    public let executor: EventLoopTaskExecutor?
    let logger: Logger

    public init(
        path: String, handler: Handler, maximumFrameLength: Int = defaultMaximumFrameLength, executor: EventLoopTaskExecutor? = nil,
        logger: Logger
    ) {
        self.path = path
        self.handler = handler
        self.maximumFrameLength = maximumFrameLength
        self.executor = executor
        self.logger = logger
    }

    public func run() async throws {
        let maximumFrameLength = self.maximumFrameLength
        // Created with a restrictive umask so the socket is never reachable by others, even briefly.
        let oldMask = umask(0o177)
        let server: NIOAsyncChannel<NIOAsyncChannel<Frame, Frame>, Never>
        let group: any EventLoopGroup = executor?.loop ?? MultiThreadedEventLoopGroup.singleton
        do {
            server = try await ServerBootstrap(group: group)
                .serverChannelOption(.backlog, value: 256)
                .bind(unixDomainSocketPath: path, cleanupExistingSocketFile: true) { channel in
                    channel.eventLoop.makeCompletedFuture {
                        try channel.frameAsyncChannel(maximumFrameLength: maximumFrameLength)
                    }
                }
            umask(oldMask)
        } catch {
            umask(oldMask)
            throw error
        }
        chmod(path, 0o600)
        logger.info("listening", metadata: ["socket.path": "\(path)"])
        let handler = self.handler
        let logger = self.logger
        let executor = self.executor
        defer { unlink(path) }
        do {
            try await cancelWhenGracefulShutdown {
                try await server.executeThenClose { connections in
                    try await withThrowingDiscardingTaskGroup { group in
                        for try await connection in connections {
                            group.addTask(executorPreference: executor) {
                                await runFrameConnection(connection, peer: FramePeer(), handler: handler, logger: logger)
                            }
                        }
                    }
                }
            }
        } catch is CancellationError {
            // Graceful shutdown: not an error.
        }
    }
}
