import NIOCore

/// Default maximum frame body: a bulk request's largest batch plus headroom.
public let defaultMaximumFrameLength = 4 * 1024 * 1024

/// Reads frames from bytes: a length prefix (4 bytes, big-endian) and a JSON body. Oversize and
/// non-JSON input throw `FrameError`. `FrameSplitter` uses it on a connection's reads.
public struct FrameDecoder: Sendable {
    public let maximumFrameLength: Int

    public init(maximumFrameLength: Int = defaultMaximumFrameLength) {
        self.maximumFrameLength = maximumFrameLength
    }

    /// Reads one frame from `buffer` if a whole one is there; its payload is a slice of `buffer`.
    public func next(_ buffer: inout ByteBuffer) throws(FrameError) -> Frame? {
        guard let size = try length(buffer) else { return nil }
        guard buffer.readableBytes >= 4 + size else { return nil }
        buffer.moveReaderIndex(forwardBy: 4)
        let body = buffer.readSlice(length: size)!
        return try Frame.decode(body: body)
    }

    /// The body length the next frame in `buffer` declares, once its prefix is there.
    func length(_ buffer: ByteBuffer) throws(FrameError) -> Int? {
        guard let length = buffer.getInteger(at: buffer.readerIndex, as: UInt32.self) else { return nil }
        let size = Int(length)
        guard size <= maximumFrameLength else { throw .oversize(length: size, limit: maximumFrameLength) }
        return size
    }
}

/// Splits a connection's bytes into frames without copying them: a frame whole in one read is
/// decoded from that read's buffer (its payload a slice of it), and only a frame that a read cut
/// is copied — into a buffer of its own size, completed from the next reads. A bad frame is
/// passed on as an error (`errorCaught`) and what follows it is dropped; a connection that closes
/// in the middle of a frame ends with `FrameError.truncated`.
///
/// NIO's `ByteToMessageHandler` kept one buffer for the stream: with a frame cut at the end of a
/// read, it moved the cut frame to the buffer's start — a copy of the whole buffer while decoded
/// frames still held slices of it — and then appended every later read to it: per event, 5% of
/// kafka-out's CPU went to those copies (perf, session 20).
public final class FrameSplitter: ChannelInboundHandler, RemovableChannelHandler {
    public typealias InboundIn = ByteBuffer
    public typealias InboundOut = Frame

    private let decoder: FrameDecoder
    /// The start of a frame the last read cut, in a buffer sized for the whole frame once its
    /// prefix is known.
    private var partial: ByteBuffer?
    private var failed = false

    public init(maximumFrameLength: Int = defaultMaximumFrameLength) {
        decoder = FrameDecoder(maximumFrameLength: maximumFrameLength)
    }

    public func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard !failed else { return }
        var input = unwrapInboundIn(data)
        do {
            if partial != nil {
                try complete(from: &input, context: context)
                if partial != nil { return }
            }
            while let frame = try decoder.next(&input) {
                context.fireChannelRead(wrapInboundOut(frame))
            }
            if input.readableBytes > 0 {
                var cut = context.channel.allocator.buffer(capacity: try decoder.length(input).map { 4 + $0 } ?? 4)
                cut.writeBuffer(&input)
                partial = cut
            }
        } catch {
            failed = true
            partial = nil
            context.fireErrorCaught(error)
        }
    }

    /// Moves bytes from `input` into the cut frame until it is whole, then passes it on.
    private func complete(from input: inout ByteBuffer, context: ChannelHandlerContext) throws(FrameError) {
        guard var cut = partial else { return }
        partial = nil
        if cut.readableBytes < 4 {
            var prefix = input.readSlice(length: min(4 - cut.readableBytes, input.readableBytes))!
            cut.writeBuffer(&prefix)
            guard cut.readableBytes == 4 else {
                partial = cut
                return
            }
        }
        let size = try decoder.length(cut)!
        cut.reserveCapacity(minimumWritableBytes: 4 + size - cut.readableBytes)
        var rest = input.readSlice(length: min(4 + size - cut.readableBytes, input.readableBytes))!
        cut.writeBuffer(&rest)
        guard let frame = try decoder.next(&cut) else {
            partial = cut
            return
        }
        context.fireChannelRead(wrapInboundOut(frame))
    }

    public func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if case .some(.inputClosed) = event as? ChannelEvent { endOfInput(context: context) }
        context.fireUserInboundEventTriggered(event)
    }

    public func channelInactive(context: ChannelHandlerContext) {
        endOfInput(context: context)
        context.fireChannelInactive()
    }

    private func endOfInput(context: ChannelHandlerContext) {
        guard let cut = partial, !failed else { return }
        partial = nil
        failed = true
        let declared = cut.getInteger(at: cut.readerIndex, as: UInt32.self).map(Int.init) ?? 4
        let missing = cut.readableBytes >= 4 ? declared - (cut.readableBytes - 4) : 4 - cut.readableBytes
        context.fireErrorCaught(FrameError.truncated(missing: missing))
    }
}

/// Writes frames with their length prefix: each frame's fields into a buffer of its own, sized for
/// them, and a large payload as it is, without copying it (the socket's `writev` joins the pieces).
///
/// NIO's `MessageToByteHandler` encoded every frame into one reused buffer, and gave each frame
/// written while an earlier one was still queued on the socket a new buffer as large as the
/// largest frame the connection had carried: measured with heaptrack in per-event mode with 50
/// tenants, 37 MB of the router's 58 MB peak heap were such buffers queued towards kafka-out.
public final class FrameWriter: ChannelOutboundHandler, Sendable {
    public typealias OutboundIn = Frame
    public typealias OutboundOut = ByteBuffer

    /// Payloads up to this size are copied next to the fields: one buffer per frame.
    public static let copiedPayloadBytes = 1024

    private static let closingBrace = ByteBuffer(integer: UInt8(ascii: "}"))

    public init() {}

    public func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        let frame = unwrapOutboundIn(data)
        let inline = (frame.payload?.readableBytes ?? 0) <= FrameWriter.copiedPayloadBytes
        var head = context.channel.allocator.buffer(
            capacity: 256 + (frame.parts?.count ?? 0) * 48 + (inline ? frame.payload?.readableBytes ?? 0 : 0))
        if inline {
            frame.encode(into: &head)
            context.write(wrapOutboundOut(head), promise: promise)
            return
        }
        frame.encodeHead(into: &head)
        context.write(wrapOutboundOut(head), promise: nil)
        context.write(wrapOutboundOut(frame.payload!), promise: nil)
        context.write(wrapOutboundOut(FrameWriter.closingBrace), promise: promise)
    }
}
