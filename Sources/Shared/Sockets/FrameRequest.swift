import NIOCore
import NIOPosix

/// One question on a Unix socket, for operator commands: connects, says `hello` as `admin`,
/// sends `request`, and returns the first answer of the same type and id.
public enum FrameRequest {
    public struct Failure: Error, CustomStringConvertible {
        public var description: String
    }

    public static func ask(
        path: String, _ request: Frame, timeout: Duration = .seconds(5), maximumFrameLength: Int = defaultMaximumFrameLength
    ) async throws -> Frame {
        let channel: NIOAsyncChannel<Frame, Frame>
        do {
            channel = try await ClientBootstrap(group: MultiThreadedEventLoopGroup.singleton)
                .connect(unixDomainSocketPath: path) { channel in
                    channel.eventLoop.makeCompletedFuture { try channel.frameAsyncChannel(maximumFrameLength: maximumFrameLength) }
                }
        } catch {
            throw Failure(description: "cannot connect to \(path): \(error)")
        }
        return try await withThrowingTaskGroup(of: Frame.self) { group in
            group.addTask {
                try await channel.executeThenClose { inbound, outbound in
                    try await outbound.write(contentsOf: [.hello(role: .admin, instance: "admin"), request])
                    for try await frame in inbound {
                        if frame.type == request.type && frame.id == request.id { return frame }
                        if frame.type == .error {
                            throw Failure(description: "\(frame.code ?? "ERROR"): \(frame.message ?? "")")
                        }
                    }
                    throw Failure(description: "the connection closed before an answer came")
                }
            }
            group.addTask {
                try await Task.sleep(for: timeout)
                throw Failure(description: "no answer within \(timeout)")
            }
            let answer = try await group.next()!
            group.cancelAll()
            return answer
        }
    }
}
