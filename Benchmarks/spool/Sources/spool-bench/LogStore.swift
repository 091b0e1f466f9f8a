import Foundation
import Glibc

/// A minimal append-only segment log: files `<seq>.seg`, records `[len u32][crc32c u32][body]` (little
/// endian; the CRC covers the body). Bodies: append `[1][batch u64][received_at i64][tenant][key][n u8]
/// [destination × n][payload]` (strings: u16 length + UTF-8), completion `[2][count u32][delivery u64 ×
/// count]`; a delivery id is `batch << 8 | destination index`. One pwrite + one fdatasync per group. A
/// segment is created (past `segmentBytes`) and the directory fsync'd before anything in it is acked.
/// Segments are deleted oldest first only, once all their deliveries are complete: a completion record
/// is never in an earlier segment than its append, so it cannot vanish while that append is on disk.
/// Opening scans every segment, checks every CRC, cuts a torn tail off the last one, starts a new one.
final class LogStore: Store {
    private struct Segment { var seq: Int, fd: Int32, size: Int, live: Int }
    private struct Location { var seq: Int, offset: Int, length: Int, waiting: UInt64 }  // waiting: bit per destination
    let directory: String, segmentBytes: Int, dirFD: Int32
    private var segments: [Segment] = []
    private var batches: [Int64: Location] = [:]
    private var queues: [String: (ids: [Int64], head: Int)] = [:]  // deliveries per destination, in order
    private var nextBatch: Int64 = 1
    private var buffer: [UInt8] = []
    private(set) var recoveredTornBytes = 0
    var liveBatches: Int { batches.count }

    init(directory: String, segmentBytes: Int = 64 << 20) throws {
        (self.directory, self.segmentBytes, dirFD) = (directory, segmentBytes, open(directory, O_RDONLY | O_DIRECTORY))
        try check(dirFD, "open \(directory)")
        let seqs = try FileManager.default.contentsOfDirectory(atPath: directory).compactMap { Int($0.dropLast(4)) }.sorted()
        for seq in seqs { try recover(seq: seq, last: seq == seqs.last) }
        try dropCompletedSegments()
        try startSegment(seq: (segments.last?.seq ?? 0) + 1)
    }

    private func path(_ seq: Int) -> String { directory + "/" + String(format: "%016d.seg", seq) }
    private func index(_ seq: Int) -> Int { seq - segments[0].seq }

    private func startSegment(seq: Int) throws {
        let fd = open(path(seq), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0o600)
        try check(fd, "create segment")
        try check(fsync(dirFD), "fsync directory")  // the new name must survive a crash
        segments.append(Segment(seq: seq, fd: fd, size: 0, live: 0))
    }

    private func dropCompletedSegments() throws {
        guard segments.count > 1, segments[0].live == 0 else { return }
        while segments.count > 1, segments[0].live == 0 {
            Glibc.close(segments[0].fd)
            try check(unlink(path(segments.removeFirst().seq)), "unlink")
        }
        try check(fsync(dirFD), "fsync directory")
    }

    private func put<T: FixedWidthInteger>(_ v: T) { withUnsafeBytes(of: v.littleEndian) { buffer.append(contentsOf: $0) } }
    private func put(_ s: String) { put(UInt16(s.utf8.count)); buffer.append(contentsOf: s.utf8) }
    private func record(_ body: () -> Void) {
        let start = buffer.count
        put(UInt64(0))
        body()
        let crc = buffer.withUnsafeBytes { crc32c(UnsafeRawBufferPointer(rebasing: $0[(start + 8)...])) }
        buffer.withUnsafeMutableBytes {
            $0.storeBytes(of: UInt32(buffer.count - start - 8).littleEndian, toByteOffset: start, as: UInt32.self)
            $0.storeBytes(of: crc.littleEndian, toByteOffset: start + 4, as: UInt32.self)
        }
    }

    func commit(payloads: ArraySlice<Data>, destinations: [String], completions: [Int64]) throws -> [Int64] {
        buffer.removeAll(keepingCapacity: true)
        let now = Int64(Date().timeIntervalSince1970 * 1000)
        var appended: [(id: Int64, offset: Int, length: Int)] = []
        for payload in payloads {
            record {
                put(UInt8(1)); put(nextBatch); put(now); put(benchTenant); put(benchKey)
                put(UInt8(destinations.count)); destinations.forEach { put($0) }
                appended.append((nextBatch, buffer.count, payload.count))
                buffer.append(contentsOf: payload)
            }
            nextBatch += 1
        }
        if !completions.isEmpty { record { put(UInt8(2)); put(UInt32(completions.count)); completions.forEach { put($0) } } }
        if let s = segments.last, s.size > 0, s.size + buffer.count > segmentBytes { try startSegment(seq: s.seq + 1) }
        let (fd, base, seq) = (segments[segments.count - 1].fd, segments[segments.count - 1].size, segments[segments.count - 1].seq)
        try buffer.withUnsafeBytes { try writeAll(fd, $0, at: base) }
        try check(fdatasync(fd), "fdatasync")
        segments[segments.count - 1].size += buffer.count
        // Durable: now the in-memory state follows.
        for a in appended { apply(batch: a.id, seq: seq, offset: base + a.offset, length: a.length, destinations: destinations) }
        completions.forEach(complete)
        try dropCompletedSegments()
        return appended.map(\.id)
    }

    private func apply(batch: Int64, seq: Int, offset: Int, length: Int, destinations: [String]) {
        batches[batch] = Location(seq: seq, offset: offset, length: length, waiting: (1 << UInt64(destinations.count)) - 1)
        segments[index(seq)].live += destinations.count
        for (i, d) in destinations.enumerated() { queues[d, default: ([], 0)].ids.append(batch << 8 | Int64(i)) }
    }

    private func waiting(_ delivery: Int64) -> Location? {
        guard let l = batches[delivery >> 8], l.waiting & (1 << UInt64(delivery & 0xFF)) != 0 else { return nil }
        return l
    }

    private func complete(_ delivery: Int64) {
        guard var l = waiting(delivery) else { return }  // a repeated ack
        l.waiting &= ~(1 << UInt64(delivery & 0xFF))
        segments[index(l.seq)].live -= 1
        batches[delivery >> 8] = l.waiting == 0 ? nil : l
    }

    func pending(_ destination: String, after: Int64, limit: Int) throws -> [(id: Int64, payload: Data)] {
        guard var q = queues.removeValue(forKey: destination) else { return [] }
        defer { queues[destination] = q }
        while q.head < q.ids.count && waiting(q.ids[q.head]) == nil { q.head += 1 }
        if q.head > 4096 { q.ids.removeFirst(q.head); q.head = 0 }
        var result: [(id: Int64, payload: Data)] = []
        for id in q.ids[q.head...] where id > after {
            guard result.count < limit else { break }
            guard let l = waiting(id) else { continue }
            var payload = Data(count: l.length)
            let n = payload.withUnsafeMutableBytes { pread(segments[index(l.seq)].fd, $0.baseAddress, l.length, off_t(l.offset)) }
            if n != l.length { throw BenchError("short read of batch \(id >> 8)") }
            result.append((id, payload))
        }
        return result
    }

    private func recover(seq: Int, last: Bool) throws {
        let fd = open(path(seq), O_RDWR | O_CLOEXEC)
        try check(fd, "open segment")
        let size = Int(lseek(fd, 0, SEEK_END))
        let map = size == 0 ? nil : mmap(nil, size, PROT_READ, MAP_PRIVATE, fd, 0)
        if map == MAP_FAILED { throw BenchError("mmap segment \(seq)") }
        defer { if let map { munmap(map, size) } }
        segments.append(Segment(seq: seq, fd: fd, size: 0, live: 0))
        var offset = 0
        let bytes = UnsafeRawBufferPointer(start: map, count: size)
        func u32(_ at: Int) -> UInt32 { UInt32(littleEndian: bytes.loadUnaligned(fromByteOffset: at, as: UInt32.self)) }
        func u64(_ at: Int) -> Int64 { Int64(littleEndian: bytes.loadUnaligned(fromByteOffset: at, as: Int64.self)) }
        while offset + 8 <= bytes.count {
            let (length, body) = (Int(u32(offset)), offset + 8)
            guard length > 0, body + length <= bytes.count,
                  crc32c(UnsafeRawBufferPointer(rebasing: bytes[body..<(body + length)])) == u32(offset + 4) else { break }
            if bytes[body] == 1 {
                var p = body + 17
                func string() -> String {
                    let n = Int(UInt16(littleEndian: bytes.loadUnaligned(fromByteOffset: p, as: UInt16.self)))
                    defer { p += 2 + n }
                    return String(decoding: UnsafeRawBufferPointer(rebasing: bytes[(p + 2)..<(p + 2 + n)]), as: UTF8.self)
                }
                _ = (string(), string())  // tenant, key
                let count = Int(bytes[p])
                p += 1
                let destinations = (0..<count).map { _ in string() }
                apply(batch: u64(body + 1), seq: seq, offset: p, length: body + length - p, destinations: destinations)
                nextBatch = max(nextBatch, u64(body + 1) + 1)
            } else if bytes[body] == 2 {
                for i in 0..<Int(u32(body + 1)) { complete(u64(body + 5 + 8 * i)) }
            } else { throw BenchError("segment \(seq): unknown record at \(offset)") }
            offset = body + length
        }
        segments[segments.count - 1].size = offset
        guard offset < size else { return }
        // Only the last segment can end in a torn write: every group before it was fdatasync'd.
        if !last { throw BenchError("segment \(seq) is corrupt at offset \(offset)") }
        recoveredTornBytes += size - offset
        try check(ftruncate(fd, off_t(offset)), "ftruncate")
        try check(fdatasync(fd), "fdatasync")
    }

    func close() throws {
        segments.forEach { Glibc.close($0.fd) }
        Glibc.close(dirFD)
    }
}
