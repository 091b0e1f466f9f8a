import Foundation
import TestSupport
import XCTest

/// The production deployment files are checked offline: the Kubernetes manifests against the
/// Kubernetes schemas (strict), the systemd units with `systemd-analyze verify`.
final class DeploymentTests: XCTestCase {
    var repo: String {
        URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent().path
    }

    func testKubernetesManifestsValidateOffline() throws {
        let r = try runCommand("/bin/bash", [repo + "/Tests/tools/validate_manifests.sh"], timeout: 300)
        XCTAssertEqual(r.status, 0, r.out + r.err)
    }

    func testSystemdUnitsVerify() throws {
        guard which("systemd-analyze") != nil else {
            throw XCTSkip("systemd-analyze is not installed (deploy/sluice test installs Debian's systemd package)")
        }
        let r = try runCommand("/bin/bash", [repo + "/Tests/tools/validate_systemd.sh"], timeout: 300)
        XCTAssertEqual(r.status, 0, r.out + r.err)
    }
}
