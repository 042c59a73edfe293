//! How much memory this process may still use: the system's available memory, or less
//! where a control group caps it (systemd's `MemoryMax`, a container's memory limit).
//!
//! A limit set on any ancestor group applies too, so every group from the process's own
//! up to the hierarchy's root is read. Groups are found through `/proc/self/cgroup` and
//! `/proc/self/mountinfo`, which also covers a nested group without a cgroup namespace
//! (a systemd service), where reading only the hierarchy's root files would not.

use std::path::{Path, PathBuf};

/// Bytes this process can still allocate before the system or its control group runs
/// out; `None` where neither can be read.
pub fn available() -> Option<u64> {
    let system = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| mem_available(&m));
    let groups = match (
        std::fs::read_to_string("/proc/self/cgroup"),
        std::fs::read_to_string("/proc/self/mountinfo"),
    ) {
        (Ok(cgroup), Ok(mountinfo)) => memory_groups(&cgroup, &mountinfo),
        _ => Vec::new(),
    };
    let group = groups.iter().filter_map(|g| g.headroom()).min();
    match (system, group) {
        (Some(s), Some(g)) => Some(s.min(g)),
        (s, g) => s.or(g),
    }
}

/// One memory control group directory and the hierarchy version it belongs to.
#[derive(Debug, PartialEq)]
struct Group {
    dir: PathBuf,
    unified: bool,
}

impl Group {
    /// Limit minus usage, if this group has a limit.
    fn headroom(&self) -> Option<u64> {
        let (limit, usage) = if self.unified {
            ("memory.max", "memory.current")
        } else {
            ("memory.limit_in_bytes", "memory.usage_in_bytes")
        };
        let read = |name| std::fs::read_to_string(self.dir.join(name)).ok();
        let limit = parse_limit(&read(limit)?)?;
        let usage: u64 = read(usage)?.trim().parse().ok()?;
        Some(limit.saturating_sub(usage))
    }
}

/// A limit file's value; `None` for no limit (`max`, or v1's page-rounded `i64::MAX`).
fn parse_limit(text: &str) -> Option<u64> {
    let value: u64 = text.trim().parse().ok()?;
    (value < 1 << 62).then_some(value)
}

fn mem_available(meminfo: &str) -> Option<u64> {
    kib_field(meminfo, "MemAvailable:")
}

/// What this process holds resident now; 0 where it cannot be read.
pub fn resident() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    kib_field(&status, "VmRSS:").unwrap_or(0)
}

/// The bytes of a `key   N kB` line, as /proc writes them.
fn kib_field(text: &str, key: &str) -> Option<u64> {
    let kb: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix(key))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024)
}

/// The process's memory groups, innermost first, with all their ancestors up to the
/// mounted root of each hierarchy.
fn memory_groups(proc_cgroup: &str, mountinfo: &str) -> Vec<Group> {
    let mut groups = Vec::new();
    for line in proc_cgroup.lines() {
        let mut fields = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) =
            (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        let unified = controllers.is_empty();
        if !unified && !controllers.split(',').any(|c| c == "memory") {
            continue;
        }
        let Some((root, mount)) = mount_of(mountinfo, unified) else {
            continue;
        };
        let Ok(relative) = Path::new(path).strip_prefix(&root) else {
            continue;
        };
        let mut dir = mount.join(relative);
        loop {
            groups.push(Group {
                dir: dir.clone(),
                unified,
            });
            if dir == mount || !dir.pop() {
                break;
            }
        }
    }
    groups
}

/// The root and mount point of the memory hierarchy: the cgroup2 mount, or the v1
/// mount with the `memory` option.
fn mount_of(mountinfo: &str, unified: bool) -> Option<(PathBuf, PathBuf)> {
    mountinfo.lines().find_map(|line| {
        let (mount, rest) = line.split_once(" - ")?;
        let mut fields = mount.split(' ');
        let (root, point) = (fields.nth(3)?, fields.next()?);
        let mut rest = rest.split(' ');
        let (fstype, options) = (rest.next()?, rest.nth(1).unwrap_or(""));
        let matches = if unified {
            fstype == "cgroup2"
        } else {
            fstype == "cgroup" && options.split(',').any(|o| o == "memory")
        };
        matches.then(|| (PathBuf::from(root), PathBuf::from(point)))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
34 31 0:31 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw";

    #[test]
    fn finds_the_v1_memory_group_and_its_ancestors() {
        let cgroup = "3:cpuset:/\n4:memory:/service/node\n0::/";
        let dirs: Vec<_> = memory_groups(cgroup, HYBRID)
            .into_iter()
            .filter(|g| !g.unified)
            .map(|g| g.dir)
            .collect();
        assert_eq!(
            dirs,
            [
                "/sys/fs/cgroup/memory/service/node",
                "/sys/fs/cgroup/memory/service",
                "/sys/fs/cgroup/memory",
            ]
            .map(PathBuf::from)
        );
    }

    #[test]
    fn finds_a_unified_group_under_a_container_root() {
        // A container's view: its group is the mount's root.
        let mountinfo = "50 40 0:30 /docker/abc /sys/fs/cgroup ro - cgroup2 cgroup2 rw";
        let groups = memory_groups("0::/docker/abc/inner", mountinfo);
        assert_eq!(
            groups,
            [
                Group {
                    dir: "/sys/fs/cgroup/inner".into(),
                    unified: true
                },
                Group {
                    dir: "/sys/fs/cgroup".into(),
                    unified: true
                },
            ]
        );
    }

    #[test]
    fn reads_limits_and_meminfo() {
        assert_eq!(parse_limit("max\n"), None);
        assert_eq!(parse_limit("9223372036854771712\n"), None);
        assert_eq!(parse_limit("1073741824\n"), Some(1 << 30));
        assert_eq!(
            mem_available("MemTotal: 10 kB\nMemAvailable:    2048 kB\n"),
            Some(2 << 20)
        );
    }

    #[test]
    fn a_limited_group_caps_what_is_available() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("memory.max"), "1000000\n").unwrap();
        std::fs::write(dir.path().join("memory.current"), "400000\n").unwrap();
        let group = Group {
            dir: dir.path().into(),
            unified: true,
        };
        assert_eq!(group.headroom(), Some(600000));
        std::fs::write(dir.path().join("memory.max"), "max\n").unwrap();
        assert_eq!(group.headroom(), None);
    }
}
