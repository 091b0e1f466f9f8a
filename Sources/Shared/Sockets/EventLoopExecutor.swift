import NIOCore

/// Runs Swift tasks on one NIO event loop. A process whose frame connections, their reader tasks
/// and the actor they call all live on one loop moves a frame from the socket to the actor and
/// the answer back without waking another thread: each hop is a job queued on the loop it is
/// already running on.
public final class EventLoopTaskExecutor: TaskExecutor, @unchecked Sendable {
    public let loop: EventLoop

    public init(_ loop: EventLoop) { self.loop = loop }

    public func enqueue(_ job: consuming ExecutorJob) {
        let job = UnownedJob(job)
        loop.execute { job.runSynchronously(on: self.asUnownedTaskExecutor()) }
    }
}
