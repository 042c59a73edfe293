//! A node's persistent identity: an Ed25519 key kept in a file, so the peer id survives
//! restarts, and held by one running node at a time.
//!
//! Bans and reputation hang on peer ids, so a second node must never silently run
//! under an identity that a running node holds: two nodes with one peer id overwrite
//! each other's records, and the swarm never sees both. The key file is guarded by an
//! advisory lock on `<key file>.lock`, which the kernel releases when the holder exits,
//! however it exits (a SIGKILLed node does not block its restart).

use std::fs::{File, TryLockError};
use std::path::{Path, PathBuf};

use libp2p::identity::Keypair;

use super::NetworkError;

/// A node's key, and the lock that keeps other nodes off it while this value lives.
#[derive(Debug)]
pub struct HeldIdentity {
    pub keypair: Keypair,
    _lock: File,
}

/// Loads the key at `path`, or creates one there (with its directory) if absent, and
/// holds it: while the returned value lives, `hold` on the same path fails.
pub fn hold(path: &Path) -> Result<HeldIdentity, NetworkError> {
    let err = |reason: String| NetworkError::Identity {
        path: path.display().to_string(),
        reason,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| err(e.to_string()))?;
    }
    let lock_path = lock_path(path);
    let lock = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| {
            err(format!(
                "cannot open its lock file {}: {e}",
                lock_path.display()
            ))
        })?;
    match lock.try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => {
            let holder = load_or_create(path)
                .map(|k| format!(" (peer id {})", k.public().to_peer_id()))
                .unwrap_or_default();
            return Err(NetworkError::IdentityInUse {
                path: path.display().to_string(),
                holder,
            });
        }
        Err(TryLockError::Error(e)) => {
            return Err(err(format!("cannot lock {}: {e}", lock_path.display())))
        }
    }
    // Creating the key under the lock: two nodes started at once cannot both create one.
    let keypair = load_or_create(path)?;
    Ok(HeldIdentity {
        keypair,
        _lock: lock,
    })
}

fn lock_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".lock");
    PathBuf::from(name)
}

fn load_or_create(path: &Path) -> Result<Keypair, NetworkError> {
    let err = |reason: String| NetworkError::Identity {
        path: path.display().to_string(),
        reason,
    };
    match std::fs::read(path) {
        Ok(bytes) => Keypair::from_protobuf_encoding(&bytes)
            .map_err(|e| err(format!("not a libp2p key ({e})"))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = Keypair::generate_ed25519();
            let bytes = key.to_protobuf_encoding().map_err(|e| err(e.to_string()))?;
            write_private(path, &bytes).map_err(|e| err(e.to_string()))?;
            Ok(key)
        }
        Err(e) => Err(err(e.to_string())),
    }
}

#[cfg(unix)]
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(bytes)
}

#[cfg(not(unix))]
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    std::fs::write(path, bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_peer_id_across_loads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/identity.key");
        let a = hold(&path).unwrap().keypair;
        let b = hold(&path).unwrap().keypair;
        assert_eq!(a.public().to_peer_id(), b.public().to_peer_id());
        std::fs::write(&path, b"garbage").unwrap();
        let err = hold(&path).err().unwrap();
        assert!(err.to_string().contains("not a libp2p key"), "{err}");
    }

    #[test]
    fn one_holder_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("identity.key");
        let held = hold(&path).unwrap();
        let peer = held.keypair.public().to_peer_id();
        let err = hold(&path).err().unwrap().to_string();
        assert!(err.contains("--identity"), "{err}");
        assert!(err.contains(&peer.to_string()), "{err}");
        drop(held);
        let again = hold(&path).unwrap();
        assert_eq!(again.keypair.public().to_peer_id(), peer);
    }
}
