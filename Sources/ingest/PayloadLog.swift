import Foundation
import NIOConcurrencyHelpers
import NIOCore

/// Where a batch's bytes live in the payload log.
struct PayloadLocation: Sendable, Equatable {
    var segment: Int64
    var offset: Int64
    var length: Int
}

/// The spool's log: append-only segment files (`payloads-<n>.log`) of `SpoolRecord`s — each
/// batch with its ids, tenant, destinations and bytes — each group written with one `pwrite` and
/// made durable with one `fdatasync` before its requests are answered. SQLite learns of them
/// later, and only of those still waiting then (`Spool`). Keeping 11 KB payloads as SQLite blobs
/// instead wrote 4.4× the accepted bytes (WAL pages, free-list pages, checkpoint copies) and kept
/// the spool's single writer busy 97% of the time (measured at max load).
///
/// A segment is retired once no batch refers to it, a newer one is being written, and SQLite
/// durably holds everything up to its last record (`applied(upTo:)`: until then, a restart
/// reads its records back). One retired segment is kept as the spare (`payloads-spare.log`) and
/// becomes the next segment, written over from its start; the others are deleted. Writing over blocks a file already has makes the
/// `fdatasync` a flush of data only — appending to a new file also commits the file system's
/// journal (its size and block allocation) every time: on this project's test machine a 40 KB
/// write + `fdatasync` took 0.29 ms instead of 0.47 (p50), at half the CPU, with a worst case of
/// 1.1 ms instead of 9–93 ms. The old bytes after the last record written are never taken for
/// records: a scan stops at the first record that is not intact, and older records carry
/// sequence numbers SQLite already holds. After a restart a new segment is started; segments
/// nothing refers to are retired. Files are 0600 in the spool's 0700 directory.
final class PayloadLog: Sendable {
    enum Failure: Error, CustomStringConvertible {
        case io(String, Int32)
        case missing(PayloadLocation)
        var description: String {
            switch self {
            case .io(let what, let code): return "payload log: \(what): \(String(cString: strerror(code)))"
            case .missing(let at): return "payload log: segment \(at.segment) no longer holds \(at.length) bytes at \(at.offset)"
            }
        }
    }

    /// An open segment file, closed when the last holder lets go: a read back may still be using
    /// it when its segment is retired.
    private final class SegmentFile: Sendable {
        let fd: Int32
        init(_ fd: Int32) { self.fd = fd }
        deinit { close(fd) }
    }

    private struct Segment {
        var file: SegmentFile
        var fd: Int32 { file.fd }
        var size: Int64
        /// Batches stored in it that the spool still holds.
        var references = 0
        /// The sequence number of its last record (0: none, or written before records had them).
        var lastSequence: UInt64 = 0
    }

    private enum Spare { case none, making, ready }

    private struct State {
        var segments: [Int64: Segment] = [:]
        var current: Int64 = 0
        var spare = Spare.none
        /// A write or flush failed: what the current segment holds past its size is unknown, so
        /// the next group starts a new one.
        var failed = false
        /// Records up to this sequence number are durably in SQLite (`applied(upTo:)`).
        var applied: UInt64 = 0

        /// Takes the segments that can go out of the table: nothing refers to them, they are not
        /// being written, and SQLite holds all their records. With their files, so that the caller
        /// lets go of them (and closes those no read holds) outside the lock.
        mutating func retirable() -> [(segment: Int64, file: SegmentFile)] {
            let gone = segments.filter { n, s in n != current && s.references == 0 && s.lastSequence <= applied }
            for n in gone.keys { segments[n] = nil }
            return gone.map { ($0.key, $0.value.file) }
        }
    }

    let directory: String
    let segmentBytes: Int64
    private let state = NIOLockedValueBox(State())

    /// Opens the log. `references`: how many batches of the spool refer to each existing segment;
    /// the others are deleted (read their records first: `records(in:)`). `applied`: the last
    /// sequence number SQLite holds.
    init(directory: String, references: [Int64: Int], applied: UInt64, segmentBytes: Int64 = 64 << 20) throws {
        self.directory = directory
        self.segmentBytes = segmentBytes
        state.withLockedValue { $0.applied = applied }
        var highest: Int64 = 0
        let names = (try? FileManager.default.contentsOfDirectory(atPath: directory)) ?? []
        if names.contains(PayloadLog.spareName) { state.withLockedValue { $0.spare = .ready } }
        for name in names {
            guard let n = PayloadLog.segmentNumber(name) else { continue }
            highest = max(highest, n)
            if references[n, default: 0] == 0 {
                retire(path(n))
            } else {
                let fd = open(path(n), O_RDWR | O_CLOEXEC)
                guard fd >= 0 else { throw Failure.io("open \(name)", errno) }
                state.withLockedValue { $0.segments[n] = Segment(file: SegmentFile(fd), size: Int64(lseek(fd, 0, SEEK_END)), references: references[n]!) }
            }
        }
        for (n, count) in references where count > 0 {
            guard state.withLockedValue({ $0.segments[n] }) != nil else {
                throw Failure.io("segment \(n) holds \(count) spooled batches but its file is missing", ENOENT)
            }
        }
        try startSegment(highest + 1)
    }

    /// The numbers of the segment files in `directory`.
    static func segmentNumbers(in directory: String) -> [Int64] {
        ((try? FileManager.default.contentsOfDirectory(atPath: directory)) ?? []).compactMap(segmentNumber)
    }

    /// The segment being written.
    var currentSegment: Int64 { state.withLockedValue { $0.current } }

    static func segmentNumber(_ name: String) -> Int64? {
        guard name.hasPrefix("payloads-"), name.hasSuffix(".log") else { return nil }
        return Int64(name.dropFirst("payloads-".count).dropLast(".log".count))
    }

    private func path(_ n: Int64) -> String { (directory as NSString).appendingPathComponent("payloads-\(n).log") }

    static let spareName = "payloads-spare.log"
    private var sparePath: String { (directory as NSString).appendingPathComponent(PayloadLog.spareName) }

    private func startSegment(_ n: Int64) throws {
        var fd: Int32 = -1
        if state.withLockedValue({ s in
            guard s.spare == .ready else { return false }
            s.spare = .none
            return true
        }), rename(sparePath, path(n)) == 0 {
            fd = open(path(n), O_RDWR | O_CLOEXEC)
            if fd < 0 { unlink(path(n)) }
        }
        if fd < 0 { fd = open(path(n), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0o600) }
        guard fd >= 0 else { throw Failure.io("create segment \(n)", errno) }
        // The new file's name must survive a power loss before anything in it is acknowledged.
        let dir = open(directory, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        if dir >= 0 {
            fsync(dir)
            close(dir)
        }
        let retire = state.withLockedValue { s -> [(segment: Int64, file: SegmentFile)] in
            s.segments[n] = Segment(file: SegmentFile(fd), size: 0)
            s.current = n
            return s.retirable()
        }
        for old in retire { remove(segment: old.segment) }
    }

    /// Appends one group of whole records, the last numbered `lastSequence`: one write, and when
    /// `durable` one fdatasync (without it they survive the process, not a power loss, until the
    /// next durable append flushes them). Returns the segment and the offset they start at.
    /// `batches` of them (batch records) count as references until `release`d. Only the spool's
    /// writer calls this (one at a time).
    func append(_ joined: ByteBuffer, batches: Int, lastSequence: UInt64, durable: Bool = true) throws -> (segment: Int64, offset: Int64) {
        let total = joined.readableBytes
        if state.withLockedValue({ s in
            s.failed || (s.segments[s.current]!.size > 0 && s.segments[s.current]!.size + Int64(total) > segmentBytes)
        }) {
            try startSegment(state.withLockedValue { $0.current } + 1)
            state.withLockedValue { $0.failed = false }
        }
        let (n, fd, start) = state.withLockedValue { s in (s.current, s.segments[s.current]!.fd, s.segments[s.current]!.size) }
        do {
            try write(joined, to: fd, at: start, segment: n, durable: durable)
        } catch {
            state.withLockedValue { s in
                s.failed = true
                // Its records may be whole on disk: the file stays until SQLite holds past them.
                s.segments[n]!.lastSequence = lastSequence
            }
            throw error
        }
        state.withLockedValue { s in
            s.segments[n]!.size = start + Int64(total)
            s.segments[n]!.references += batches
            s.segments[n]!.lastSequence = lastSequence
        }
        return (n, start)
    }

    private func write(_ joined: ByteBuffer, to fd: Int32, at start: Int64, segment n: Int64, durable: Bool) throws {
        try joined.withUnsafeReadableBytes { raw in
            var done = 0
            while done < raw.count {
                let wrote = pwrite(fd, raw.baseAddress! + done, raw.count - done, off_t(start) + off_t(done))
                if wrote < 0 {
                    if errno == EINTR { continue }
                    throw Failure.io("write to segment \(n)", errno)
                }
                done += wrote
            }
        }
        guard !durable || fdatasync(fd) == 0 else { throw Failure.io("fdatasync segment \(n)", errno) }
    }

    /// The intact records of every segment file in `directory`, in sequence order, with the
    /// segment they are in. Read at start, before `init` deletes what nothing refers to.
    static func records(in directory: String, from first: Int64 = 0) throws -> [(found: SpoolRecord.Found, segment: Int64)] {
        var all: [(found: SpoolRecord.Found, segment: Int64)] = []
        for n in segmentNumbers(in: directory) where n >= first {
            let data = try Data(contentsOf: URL(fileURLWithPath: (directory as NSString).appendingPathComponent("payloads-\(n).log")))
            data.withUnsafeBytes { raw in
                for found in SpoolRecord.scan(raw) { all.append((found, n)) }
            }
        }
        return all.sorted { $0.found.sequence < $1.found.sequence }
    }

    /// The bytes at `location`.
    func read(_ location: PayloadLocation) throws -> ByteBuffer {
        // Not under the lock: the spool's writer takes it for every group (`append`, `release`),
        // and waiting behind a read back put it to sleep (a futex wait and wake-up each time, at
        // max load hundreds a second). Holding the file keeps its descriptor open; a segment
        // retired meanwhile (and its file perhaps written over as the next segment) makes the
        // bytes read worthless, so the segment must still be there, the same file, afterwards.
        guard let file = state.withLockedValue({ $0.segments[location.segment]?.file }) else { throw Failure.missing(location) }
        var buffer = ByteBuffer()
        try buffer.writeWithUnsafeMutableBytes(minimumWritableBytes: location.length) { raw in
            var done = 0
            while done < location.length {
                let got = pread(file.fd, raw.baseAddress! + done, location.length - done, off_t(location.offset) + off_t(done))
                if got < 0 {
                    if errno == EINTR { continue }
                    throw Failure.io("read segment \(location.segment)", errno)
                }
                if got == 0 { throw Failure.missing(location) }
                done += got
            }
            return done
        }
        guard state.withLockedValue({ $0.segments[location.segment]?.file === file }) else { throw Failure.missing(location) }
        return buffer
    }

    /// A batch stored in `segment` left the spool (and SQLite durably says so, or never knew of
    /// it). A segment that is not the current one goes with its last batch, once SQLite holds
    /// all its records: a segment's file must not be reused or deleted while a restart could
    /// still need it.
    func release(_ segment: Int64) {
        let retire = state.withLockedValue { s -> [(segment: Int64, file: SegmentFile)] in
            guard s.segments[segment] != nil else { return [] }
            s.segments[segment]!.references = max(0, s.segments[segment]!.references - 1)
            guard s.segments[segment]!.references == 0 else { return [] }
            return s.retirable()
        }
        for old in retire { remove(segment: old.segment) }
    }

    /// SQLite durably holds the records up to `sequence`: segments that only waited for that go.
    func applied(upTo sequence: UInt64) {
        let retire = state.withLockedValue { s -> [(segment: Int64, file: SegmentFile)] in
            s.applied = max(s.applied, sequence)
            return s.retirable()
        }
        for old in retire { remove(segment: old.segment) }
    }

    /// Retires the file of a segment nothing refers to any more (out of the table: its descriptor
    /// closes with the last read using it), off the writer's path (a rename or a 64 MB unlink is a
    /// file-system journal commit).
    private func remove(segment n: Int64) {
        let file = path(n)
        PayloadLog.cleanup.async { self.retire(file) }
    }

    /// Keeps a retired segment's file as the spare when there is none, else deletes it.
    private func retire(_ file: String) {
        let keep = state.withLockedValue { s -> Bool in
            guard s.spare == .none else { return false }
            s.spare = .making
            return true
        }
        if keep {
            let renamed = rename(file, sparePath) == 0
            state.withLockedValue { $0.spare = renamed ? .ready : .none }
            if renamed { return }
        }
        unlink(file)
    }

    private static let cleanup = DispatchQueue(label: "sluice.spool.segment-cleanup")

    /// Segment files and their sizes, for status and tests.
    var segments: [Int64: Int64] { state.withLockedValue { s in s.segments.mapValues(\.size) } }
}
