import NIOCore

/// Default maximum frame body: a bulk request's largest batch plus headroom.
public let defaultMaximumFrameLength = 4 * 1024 * 1024

/// Splits the byte stream into frames. Oversize, truncated and non-JSON input throw `FrameError`.
public struct FrameDecoder: ByteToMessageDecoder, Sendable {
    public typealias InboundOut = Frame

    public let maximumFrameLength: Int

    public init(maximumFrameLength: Int = defaultMaximumFrameLength) {
        self.maximumFrameLength = maximumFrameLength
    }

    public mutating func decode(context: ChannelHandlerContext, buffer: inout ByteBuffer) throws -> DecodingState {
        guard let frame = try next(&buffer) else { return .needMoreData }
        context.fireChannelRead(wrapInboundOut(frame))
        return .continue
    }

    public mutating func decodeLast(context: ChannelHandlerContext, buffer: inout ByteBuffer, seenEOF: Bool) throws
        -> DecodingState
    {
        while let frame = try next(&buffer) {
            context.fireChannelRead(wrapInboundOut(frame))
        }
        if buffer.readableBytes > 0 {
            let declared = buffer.getInteger(at: buffer.readerIndex, as: UInt32.self).map(Int.init) ?? 4
            let missing = buffer.readableBytes >= 4 ? declared - (buffer.readableBytes - 4) : 4 - buffer.readableBytes
            buffer.clear()
            throw FrameError.truncated(missing: missing)
        }
        return .needMoreData
    }

    /// Reads one frame from `buffer` if a whole one is there.
    public func next(_ buffer: inout ByteBuffer) throws(FrameError) -> Frame? {
        guard let length = buffer.getInteger(at: buffer.readerIndex, as: UInt32.self) else { return nil }
        let size = Int(length)
        guard size <= maximumFrameLength else { throw .oversize(length: size, limit: maximumFrameLength) }
        guard buffer.readableBytes >= 4 + size else { return nil }
        buffer.moveReaderIndex(forwardBy: 4)
        let body = buffer.readSlice(length: size)!
        return try Frame.decode(body: body)
    }
}

/// Writes frames with their length prefix.
public struct FrameEncoder: MessageToByteEncoder, Sendable {
    public typealias OutboundIn = Frame
    public init() {}
    public func encode(data: Frame, out: inout ByteBuffer) throws {
        data.encode(into: &out)
    }
}
