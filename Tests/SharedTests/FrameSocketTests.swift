import Foundation
import Logging
import NIOCore
import NIOEmbedded
import XCTest

@testable import Shared

#if canImport(Glibc)
import Glibc
#endif

/// Acks every batch; records what it saw.
struct AckingHandler: FrameConnectionHandler {
    func received(_ frame: Frame, from peer: FramePeer) async throws {
        if frame.type == .batch { peer.send(.ack(frame.id)) }
    }
}

/// A blocking Unix-socket client that speaks raw bytes, so tests can send anything at all.
final class RawSocket {
    let fd: Int32

    init(path: String) throws {
        fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &addr.sun_path) { raw in
            for (i, b) in path.utf8.enumerated() { raw[i] = b }
        }
        var tv = timeval(tv_sec: 10, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        let rc = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard rc == 0 else { throw POSIXError(.ECONNREFUSED) }
    }

    deinit { close(fd) }

    func write(_ bytes: [UInt8]) { bytes.withUnsafeBytes { _ = Glibc.write(fd, $0.baseAddress, $0.count) } }
    func write(_ frame: Frame) {
        var b = ByteBuffer()
        frame.encode(into: &b)
        write(Array(b.readableBytesView))
    }

    /// Reads frames until `count` arrived or the peer closed.
    func readFrames(count: Int = .max) -> (frames: [Frame], closed: Bool) {
        var buffer = ByteBuffer()
        var frames: [Frame] = []
        var chunk = [UInt8](repeating: 0, count: 65536)
        while frames.count < count {
            let n = read(fd, &chunk, chunk.count)
            if n <= 0 { return (frames, true) }
            buffer.writeBytes(chunk[0..<n])
            while let f = try? FrameDecoder().next(&buffer) { frames.append(f) }
        }
        return (frames, false)
    }
}

final class FrameSocketTests: XCTestCase {
    var runDir = ""

    override func setUp() {
        runDir = "/tmp/sl-test-\(getpid())-\(Int.random(in: 0..<1_000_000))"
    }

    override func tearDown() {
        try? FileManager.default.removeItem(atPath: runDir)
    }

    func startServer(maxFrame: Int = 4096) async throws -> (Task<Void, Error>, String) {
        try RunDirectory.prepare(runDir)
        let path = runDir + "/s.sock"
        let server = FrameServer(path: path, handler: AckingHandler(), maximumFrameLength: maxFrame, logger: Logger(label: "test"))
        let task = Task { try await server.run() }
        for _ in 0..<200 where !FileManager.default.fileExists(atPath: path) { try await Task.sleep(for: .milliseconds(10)) }
        return (task, path)
    }

    func testRunDirectoryAndSocketArePrivate() async throws {
        let (task, path) = try await startServer()
        defer { task.cancel() }
        var st = stat()
        stat(runDir, &st)
        XCTAssertEqual(st.st_mode & 0o777, 0o700)
        stat(path, &st)
        XCTAssertEqual(st.st_mode & 0o777, 0o600)
    }

    func testBadPeerGetsErrorFrameAndIsDisconnectedWhileOthersAreServed() async throws {
        let (task, path) = try await startServer(maxFrame: 4096)
        defer { task.cancel() }
        let good = try RawSocket(path: path)
        let cases: [(bytes: [UInt8], code: String)] = [
            (Array("\u{0}\u{0}\u{0}\u{5}hello".utf8), "FRAME_NOT_JSON"),
            ([0, 0, 0x10, 0x01], "FRAME_TOO_LARGE"),
            ([0, 0, 0, 4, 0x22, 0xFF, 0xFE, 0x22], "FRAME_NOT_JSON"),
            (Array("\u{0}\u{0}\u{0}\u{2}{}".utf8), "FRAME_INVALID"),
        ]
        for c in cases {
            let bad = try RawSocket(path: path)
            bad.write(c.bytes)
            let (frames, closed) = bad.readFrames()
            XCTAssertEqual(frames.first?.type, .error)
            XCTAssertEqual(frames.first?.code, c.code)
            XCTAssertTrue(closed, "the bad peer is disconnected")
            // The other connection is still served.
            var batch = Frame(type: .batch, id: 99)
            batch.payload = ByteBuffer(string: "{}")
            good.write(batch)
            XCTAssertEqual(good.readFrames(count: 1).frames, [.ack(99)])
        }
        // A peer that goes away mid-frame does not hurt the server either.
        let truncated = try RawSocket(path: path)
        truncated.write([0, 0, 0, 50, 0x7B])
        _ = truncated
        let late = try RawSocket(path: path)
        var batch = Frame(type: .batch, id: 7)
        batch.payload = ByteBuffer(string: "[]")
        late.write(batch)
        XCTAssertEqual(late.readFrames(count: 1).frames, [.ack(7)])
    }

    func testClientReconnectsAndSaysHello() async throws {
        try RunDirectory.prepare(runDir)
        let path = runDir + "/c.sock"
        actor Seen { var hellos: [Frame] = []; func add(_ f: Frame) { hellos.append(f) } }
        let seen = Seen()
        struct Recorder: FrameConnectionHandler {
            let seen: Seen
            func received(_ frame: Frame, from peer: FramePeer) async throws { if frame.type == .hello { await seen.add(frame) } }
        }
        // The client starts first and keeps retrying until the server appears.
        let client = FrameClient(path: path, role: .kafkaOut, instance: "ko-9", handler: AckingHandler(), logger: Logger(label: "c"))
        let clientTask = Task { try await client.run() }
        defer { clientTask.cancel() }
        try await Task.sleep(for: .milliseconds(300))
        let server = FrameServer(path: path, handler: Recorder(seen: seen), logger: Logger(label: "s"))
        var serverTask = Task { try await server.run() }
        for _ in 0..<100 where await seen.hellos.isEmpty { try await Task.sleep(for: .milliseconds(50)) }
        var hellos = await seen.hellos
        XCTAssertEqual(hellos.first?.role, "kafka-out")
        XCTAssertEqual(hellos.first?.instance, "ko-9")
        XCTAssertEqual(hellos.first?.version, frameProtocolVersion)
        // Restart the server: the client comes back.
        serverTask.cancel()
        _ = await serverTask.result
        serverTask = Task { try await server.run() }
        defer { serverTask.cancel() }
        for _ in 0..<200 where await seen.hellos.count < 2 { try await Task.sleep(for: .milliseconds(50)) }
        hellos = await seen.hellos
        XCTAssertEqual(hellos.count, 2)
    }

    /// Counts the flushes that reach the channel (one per `write` to the socket).
    final class FlushCounter: ChannelOutboundHandler, @unchecked Sendable {
        typealias OutboundIn = Frame
        var flushes = 0
        func flush(context: ChannelHandlerContext) {
            flushes += 1
            context.flush()
        }
    }

    /// A read's frames handled as a chain of loop jobs, each sending one frame and queueing the
    /// next (the router's readers and core share the connection's loop): the frames go out in one
    /// write, not one each — and a chain that never ends still gets written.
    func testFramesSentByAChainOfLoopJobsGoOutInOneWrite() throws {
        func run(chain length: Int) throws -> (flushes: Int, frames: [UInt64], firstWrite: Int) {
            let channel = EmbeddedChannel()
            let counter = FlushCounter()
            try channel.pipeline.syncOperations.addHandler(counter)
            let peer = FramePeer()
            peer.attach(channel)
            var firstWrite = 0
            func handle(_ n: Int) {
                peer.send(.ack(UInt64(n)))
                if counter.flushes == 0 { firstWrite = n + 1 }
                // Two hops to the next frame: to the core and back to the reader.
                if n < length { channel.eventLoop.execute { channel.eventLoop.execute { handle(n + 1) } } }
            }
            channel.eventLoop.execute { handle(1) }
            channel.embeddedEventLoop.run()
            var ids: [UInt64] = []
            while let f = try channel.readOutbound(as: Frame.self) { ids.append(f.id) }
            return (counter.flushes, ids, firstWrite)
        }
        let short = try run(chain: 5)
        XCTAssertEqual(short.flushes, 1)
        XCTAssertEqual(short.frames, Array(1...5))
        // The wait is bounded: a longer chain is written after `maxDeferrals` passes, in order.
        let long = try run(chain: 40)
        XCTAssertEqual(long.frames, Array(1...40))
        XCTAssertGreaterThan(long.flushes, 1)
        XCTAssertLessThanOrEqual(long.firstWrite, FramePeer.maxDeferrals / 2 + 2)
        XCTAssertLessThanOrEqual(long.flushes, 40 / (FramePeer.maxDeferrals / 2) + 1)
    }
}
