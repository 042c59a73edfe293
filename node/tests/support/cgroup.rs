//! A memory control group for a node under attack: its limit is the node's budget, and
//! the kernel, not a poll of RSS, catches every spike above it. Needs root, as CI has.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

pub struct MemoryCage {
    dir: PathBuf,
    unified: bool,
}

impl MemoryCage {
    /// A new group limited to `limit` bytes (memory and swap together where the
    /// kernel accounts swap).
    pub fn new(limit: u64) -> MemoryCage {
        static COUNT: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "allmende-test-{}-{}",
            std::process::id(),
            COUNT.fetch_add(1, Ordering::Relaxed)
        );
        let v1 = PathBuf::from("/sys/fs/cgroup/memory");
        let unified = !v1.join("memory.limit_in_bytes").exists();
        // Nested in this process's own group: a limit on it (a container's, or a
        // cap the test run is under) then also holds for the node.
        let root = if unified {
            PathBuf::from("/sys/fs/cgroup").join(own_group(true))
        } else {
            v1.join(own_group(false))
        };
        if unified {
            // Child groups get a memory controller only where the parent delegates it.
            let _ = std::fs::write(root.join("cgroup.subtree_control"), "+memory");
        }
        let dir = root.join(name);
        std::fs::create_dir(&dir).unwrap_or_else(|e| {
            panic!(
                "cannot create memory cgroup {} ({e}): these tests run as root",
                dir.display()
            )
        });
        let cage = MemoryCage { dir, unified };
        if unified {
            cage.write("memory.max", limit);
            cage.write("memory.swap.max", 0);
        } else {
            cage.write("memory.limit_in_bytes", limit);
            if cage.dir.join("memory.memsw.limit_in_bytes").exists() {
                cage.write("memory.memsw.limit_in_bytes", limit);
            }
        }
        cage
    }

    fn write(&self, file: &str, value: u64) {
        let path = self.dir.join(file);
        if let Err(e) = std::fs::write(&path, value.to_string()) {
            if file != "memory.swap.max" {
                panic!("cannot write {}: {e}", path.display());
            }
        }
    }

    fn read(&self, file: &str) -> String {
        std::fs::read_to_string(self.dir.join(file)).unwrap_or_default()
    }

    /// The file a process writes its pid into to join the group.
    pub fn procs(&self) -> PathBuf {
        self.dir.join("cgroup.procs")
    }

    /// Most memory the group has used.
    pub fn peak(&self) -> u64 {
        let file = if self.unified {
            "memory.peak"
        } else {
            "memory.max_usage_in_bytes"
        };
        self.read(file).trim().parse().unwrap_or(0)
    }

    /// How often the kernel killed a process of the group for memory.
    pub fn oom_kills(&self) -> u64 {
        let file = if self.unified {
            "memory.events"
        } else {
            "memory.oom_control"
        };
        self.read(file)
            .lines()
            .find_map(|l| l.strip_prefix("oom_kill "))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0)
    }
}

/// This process's memory group, relative to its hierarchy's root: the unified
/// hierarchy's (`0::PATH`), or the v1 hierarchy that has the memory controller.
fn own_group(unified: bool) -> PathBuf {
    let cgroup = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let path = cgroup.lines().find_map(|line| {
        let mut fields = line.splitn(3, ':');
        let (id, controllers, path) = (fields.next()?, fields.next()?, fields.next()?);
        let ours = match unified {
            true => id == "0" && controllers.is_empty(),
            false => controllers.split(',').any(|c| c == "memory"),
        };
        ours.then(|| path.trim_start_matches('/').to_string())
    });
    PathBuf::from(path.unwrap_or_default())
}

impl Drop for MemoryCage {
    fn drop(&mut self) {
        // The group can be removed once its processes have been reaped.
        for _ in 0..50 {
            if std::fs::remove_dir(&self.dir).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!("could not remove cgroup {}", self.dir.display());
    }
}
