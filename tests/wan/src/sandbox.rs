//! Keeps the lab off the machine's own network.
//!
//! A lab creates namespaces, routes, NAT rules and sysctls; one mistake run in the machine's
//! own network namespace could cut it off. So a lab is only ever built inside a private
//! network, mount and PID namespace: a test re-runs itself there, and everything it created
//! (including processes it started) vanishes with that sandbox.

use std::path::Path;
use std::process::Command;

/// Set (to anything) in the sandbox's environment; [`crate::Lab::build`] refuses to run
/// without it.
pub const SANDBOX_ENV: &str = "ALLMENDE_WAN_SANDBOX";

/// Gives the sandbox its own `/run/netns` (where `ip netns` keeps names) and a `/sys` that
/// shows the sandbox's interfaces, then runs the test binary.
const SANDBOX_SCRIPT: &str = "set -e
mount -t tmpfs none /run/netns 2>/dev/null || (mkdir -p /run/netns && mount -t tmpfs none /run/netns)
mount -t sysfs none /sys
ip link set lo up
exec \"$0\" \"$@\"";

/// True inside the sandbox.
pub fn in_sandbox() -> bool {
    std::env::var_os(SANDBOX_ENV).is_some()
}

/// Runs test `test_name` of the current test binary inside a sandbox, unless already in one.
///
/// Returns true inside the sandbox: the caller goes on with the test body. Outside, it runs
/// the binary again in a sandbox (`unshare`, as root) for just this test, panics if that run
/// failed, and returns false: the caller returns at once.
///
/// ```ignore
/// #[test]
/// fn lab_delays_packets() {
///     if !allmende_wan_lab::sandboxed("lab_delays_packets") { return; }
///     // build a Lab ...
/// }
/// ```
///
/// `test_name` is the name the test harness prints: the function name in an integration test
/// file, `module::function` in a library's unit tests. A name with leading module segments
/// the harness does not print (such as `concat!(module_path!(), "::f")` in an integration
/// test) is shortened to the one it does list.
pub fn sandboxed(test_name: &str) -> bool {
    if in_sandbox() {
        return true;
    }
    let exe = std::env::current_exe().expect("the test binary's path");
    let name = resolve(&exe, test_name);
    let status = Command::new("unshare")
        .args([
            "--net",
            "--mount",
            "--pid",
            "--fork",
            "--kill-child",
            "--mount-proc",
        ])
        .args(["--propagation", "private", "sh", "-c", SANDBOX_SCRIPT])
        .arg(&exe)
        .args([
            "--exact",
            &name,
            "--nocapture",
            "--test-threads=1",
            "--include-ignored",
        ])
        .env(SANDBOX_ENV, "1")
        .status()
        .unwrap_or_else(|e| panic!("cannot start the sandbox (`unshare`, needs root): {e}"));
    assert!(
        status.success(),
        "test {name} failed in its sandbox: {status}"
    );
    false
}

/// Finds the test the harness knows by `name` or by a suffix of it: a name matching nothing
/// would make the sandboxed run pass without running anything.
fn resolve(exe: &Path, name: &str) -> String {
    let out = Command::new(exe)
        .args(["--list", "--format", "terse"])
        .output()
        .unwrap_or_else(|e| panic!("cannot list the tests of {}: {e}", exe.display()));
    let listing = String::from_utf8_lossy(&out.stdout);
    let tests: Vec<&str> = listing
        .lines()
        .filter_map(|l| l.strip_suffix(": test"))
        .collect();
    let mut candidate = name;
    loop {
        if tests.contains(&candidate) {
            return candidate.to_owned();
        }
        match candidate.split_once("::") {
            Some((_, rest)) => candidate = rest,
            None => panic!("no test named {name} in this binary (it has: {tests:?})"),
        }
    }
}
