import FuzzDriver
import NIOCore
import Shared

/// The frame decoder must never crash on any byte stream, and a decoded frame must survive
/// encode → decode unchanged.
func fuzz(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    var buffer = ByteBuffer(bytes: UnsafeBufferPointer(start: data, count: size))
    let decoder = FrameDecoder(maximumFrameLength: 1 << 16)
    while let frame = try? decoder.next(&buffer) {
        var out = ByteBuffer()
        frame.encode(into: &out)
        let again = try? decoder.next(&out)
        precondition(again == frame, "frame changed through encode/decode")
    }
    return 0
}

runFuzzer { data, size in fuzz(data!, size) }
