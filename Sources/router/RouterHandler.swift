import Logging
import NIOConcurrencyHelpers
import Shared

/// Dispatches the frames of every connection (ingest and outputs) to the router core.
struct RouterHandler: FrameConnectionHandler {
    let core: RouterCore
    var watcher: ConfigWatcher?
    /// The last config digest seen on a batch from ingest.
    private let ingestConfig = NIOLockedValueBox<String?>(nil)

    init(core: RouterCore, watcher: ConfigWatcher? = nil) {
        self.core = core
        self.watcher = watcher
    }

    func received(_ frame: Frame, from peer: FramePeer) async throws {
        switch frame.type {
        case .hello:
            guard frame.version == frameProtocolVersion else {
                peer.send(.error(code: "VERSION_MISMATCH", message: "this router speaks protocol version \(frameProtocolVersion)"))
                peer.close()
                return
            }
            guard let name = frame.role, let role = PeerRole(rawValue: name) else {
                peer.send(.error(code: "UNKNOWN_ROLE", message: "unknown role '\(frame.role ?? "")'"))
                peer.close()
                return
            }
            peer.identify(role: role, instance: frame.instance ?? "")
            await core.register(peer)
        case .batch:
            guard peer.role == .ingest else { throw ProtocolViolation("only ingest sends batches to the router") }
            if let digest = frame.config, let watcher {
                let changed = ingestConfig.withLockedValue { seen -> Bool in
                    guard seen != digest else { return false }
                    seen = digest
                    return true
                }
                // ingest reloaded a config this router may not have read yet: batches accepted
                // after a reload must be routed by it.
                if changed { await watcher.catchUp(to: digest) }
            }
            await core.accept(frame, from: peer)
        case .ack, .nack:
            guard let role = peer.role, role != .ingest else { throw ProtocolViolation("unexpected \(frame.type.rawValue)") }
            await core.outcome(frame, from: peer)
        case .error:
            if let key = frame.destination, peer.role == .kafkaOut || peer.role == .keenOut {
                // An output's client error for one destination (e.g. brokers unreachable): for status.
                await core.noteError(destinationKey: key, "\(frame.code ?? "ERROR"): \(frame.message ?? "")")
            } else {
                core.logger.warning("peer reported an error", metadata: ["error.code": "\(frame.code ?? "")", "error": "\(frame.message ?? "")"])
            }
        case .status:
            guard peer.role == .admin else { throw ProtocolViolation("only admin peers ask for status") }
            var answer = Frame(type: .status, id: frame.id)
            answer.payload = await core.status(config: await watcher?.status).jsonBytes
            peer.send(answer)
        case .destination, .outputs:
            throw ProtocolViolation("unexpected \(frame.type.rawValue) frame")
        }
    }

    func disconnected(_ peer: FramePeer) async {
        await core.unregister(peer)
    }
}

struct ProtocolViolation: Error, CustomStringConvertible {
    var description: String
    init(_ d: String) { description = d }
}
