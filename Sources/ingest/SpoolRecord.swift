import CZlib
import NIOCore

/// One spooled batch as the spool's log stores it: self-describing, so that the log alone can
/// rebuild what SQLite had not been told yet when a process died (see `Spool`). Deliveries that
/// finished are logged too, as `SpoolDone` records.
///
/// Layout, little-endian:
///
///     magic u32 | crc32 u32 | sequence u64 | body length u32 | body
///     batch ("SLR1"): batch id i64 | received at (ms) i64 | tenant (u16 length + UTF-8)
///           | key (u16 length + UTF-8, 0xFFFF: none) | deliveries u16
///           | per delivery: id i64, destination (u16 length + UTF-8) | payload (the rest)
///     done ("SLD1"): delivery ids, i64 each
///
/// The CRC covers everything after itself. A record is accepted only whole and with its CRC; a
/// torn write (a crash during a group's `pwrite`, before its `fdatasync` returned and anything was
/// acknowledged) fails the check and ends the scan of its segment. Sequence numbers grow by one
/// per record across segments.
struct SpoolRecord: Equatable {
    var sequence: UInt64
    var batchID: Int64
    var receivedAt: Int64
    var tenant: String
    var key: String?
    var deliveries: [Delivery]

    struct Delivery: Equatable {
        var id: Int64
        var destination: String
    }

    static let magic: UInt32 = 0x3152_4C53  // "SLR1" in the file
    static let doneMagic: UInt32 = 0x3144_4C53  // "SLD1"
    private static let noKey = UInt16.max

    /// Appends the record with `payload` to `buffer`; returns where the payload starts, relative
    /// to the record's start.
    @discardableResult
    func write(payload: ByteBuffer, to buffer: inout ByteBuffer) -> Int {
        let start = buffer.writerIndex
        SpoolRecord.writeHeader(SpoolRecord.magic, sequence: sequence, to: &buffer)
        buffer.writeInteger(batchID, endianness: .little)
        buffer.writeInteger(receivedAt, endianness: .little)
        SpoolRecord.writeText(tenant, to: &buffer)
        if let key { SpoolRecord.writeText(key, to: &buffer) } else { buffer.writeInteger(SpoolRecord.noKey, endianness: .little) }
        buffer.writeInteger(UInt16(deliveries.count), endianness: .little)
        for d in deliveries {
            buffer.writeInteger(d.id, endianness: .little)
            SpoolRecord.writeText(d.destination, to: &buffer)
        }
        let payloadStart = buffer.writerIndex - start
        var payload = payload
        buffer.writeBuffer(&payload)
        SpoolRecord.seal(at: start, in: &buffer)
        return payloadStart
    }

    /// Appends a record saying that these deliveries finished.
    static func writeDone(sequence: UInt64, deliveries: [Int64], to buffer: inout ByteBuffer) {
        let start = buffer.writerIndex
        writeHeader(doneMagic, sequence: sequence, to: &buffer)
        for id in deliveries { buffer.writeInteger(id, endianness: .little) }
        seal(at: start, in: &buffer)
    }

    private static func writeHeader(_ magic: UInt32, sequence: UInt64, to buffer: inout ByteBuffer) {
        buffer.writeInteger(magic, endianness: .little)
        buffer.writeInteger(UInt32(0), endianness: .little)  // the CRC: `seal`
        buffer.writeInteger(sequence, endianness: .little)
        buffer.writeInteger(UInt32(0), endianness: .little)  // the body's length: `seal`
    }

    /// Sets the body's length and the CRC of the record that starts at `start` and ends at the
    /// buffer's end.
    private static func seal(at start: Int, in buffer: inout ByteBuffer) {
        buffer.setInteger(UInt32(buffer.writerIndex - start - 20), at: start + 16, endianness: .little)
        let crc = buffer.withUnsafeReadableBytes { raw in
            SpoolRecord.crc(UnsafeRawBufferPointer(rebasing: raw[(start - buffer.readerIndex + 8)...]))
        }
        buffer.setInteger(crc, at: start + 4, endianness: .little)
    }

    private static func writeText(_ text: String, to buffer: inout ByteBuffer) {
        let utf8 = text.utf8
        precondition(utf8.count < Int(noKey), "spool record text too long")
        buffer.writeInteger(UInt16(utf8.count), endianness: .little)
        buffer.writeBytes(utf8)
    }

    static func crc(_ bytes: UnsafeRawBufferPointer) -> UInt32 {
        guard let base = bytes.baseAddress, !bytes.isEmpty else { return 0 }
        return UInt32(truncatingIfNeeded: crc32(0, base.assumingMemoryBound(to: UInt8.self), uInt(bytes.count)))
    }

    /// A record found in a segment: a batch (with where its payload is) or finished deliveries.
    struct Found {
        enum Entry: Equatable {
            case batch(SpoolRecord)
            case done([Int64])
        }
        var entry: Entry
        var sequence: UInt64
        var offset: Int
        var payloadOffset: Int
        var payloadLength: Int
    }

    /// The records at the start of `bytes`, in order, up to the first that is not whole and
    /// intact (a torn tail, or older bytes of a reused file: see `PayloadLog`).
    static func scan(_ bytes: UnsafeRawBufferPointer) -> [Found] {
        var found: [Found] = []
        var at = 0
        while let next = decode(bytes, at: at) {
            found.append(next)
            at = next.payloadOffset + next.payloadLength
        }
        return found
    }

    private static func decode(_ bytes: UnsafeRawBufferPointer, at start: Int) -> Found? {
        var r = Reader(bytes: bytes, at: start)
        guard let kind = r.u32(), kind == magic || kind == doneMagic, let crc = r.u32(), let sequence = r.u64(),
            let length = r.u32().map(Int.init)
        else { return nil }
        let end = r.at + length
        guard end <= bytes.count, crc == SpoolRecord.crc(UnsafeRawBufferPointer(rebasing: bytes[(start + 8)..<end])) else { return nil }
        if kind == doneMagic {
            guard length % 8 == 0 else { return nil }
            var ids: [Int64] = []
            while r.at < end, let id = r.u64() { ids.append(Int64(bitPattern: id)) }
            return Found(entry: .done(ids), sequence: sequence, offset: start, payloadOffset: end, payloadLength: 0)
        }
        guard let batchID = r.u64(), let receivedAt = r.u64(), let tenant = r.text(), let keyLength = r.u16() else { return nil }
        var key: String?
        if keyLength != noKey {
            r.at -= 2
            guard let k = r.text() else { return nil }
            key = k
        }
        guard let count = r.u16() else { return nil }
        var deliveries: [Delivery] = []
        for _ in 0..<count {
            guard let id = r.u64(), let destination = r.text() else { return nil }
            deliveries.append(Delivery(id: Int64(bitPattern: id), destination: destination))
        }
        guard r.at <= end else { return nil }
        let record = SpoolRecord(
            sequence: sequence, batchID: Int64(bitPattern: batchID), receivedAt: Int64(bitPattern: receivedAt), tenant: tenant, key: key,
            deliveries: deliveries)
        return Found(entry: .batch(record), sequence: sequence, offset: start, payloadOffset: r.at, payloadLength: end - r.at)
    }

    private struct Reader {
        let bytes: UnsafeRawBufferPointer
        var at: Int

        mutating func take<T: FixedWidthInteger>(_: T.Type) -> T? {
            let size = MemoryLayout<T>.size
            guard at >= 0, at + size <= bytes.count else { return nil }
            defer { at += size }
            return T(littleEndian: bytes.loadUnaligned(fromByteOffset: at, as: T.self))
        }
        mutating func u16() -> UInt16? { take(UInt16.self) }
        mutating func u32() -> UInt32? { take(UInt32.self) }
        mutating func u64() -> UInt64? { take(UInt64.self) }
        mutating func text() -> String? {
            guard let n = u16().map(Int.init), n != Int(SpoolRecord.noKey), at + n <= bytes.count else { return nil }
            defer { at += n }
            return String(decoding: UnsafeRawBufferPointer(rebasing: bytes[at..<(at + n)]), as: UTF8.self)
        }
    }
}
