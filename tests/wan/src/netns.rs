//! Named network namespaces and the commands that configure them.
//!
//! Configuration goes through iproute2 and iptables, as an operator would type it, so that a
//! failing step reports the very command line that failed.
#![allow(unsafe_code)]

use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};

use crate::LabError;

/// Runs a configuration command to completion; a non-zero exit becomes an error carrying the
/// command line and its stderr.
pub(crate) fn run<I, S>(program: &str, args: I) -> Result<(), LabError>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut cmd = Command::new(program);
    cmd.args(args).stdin(Stdio::null());
    let line = format!("{cmd:?}");
    let out = cmd.output().map_err(|source| LabError::Spawn {
        command: line.clone(),
        source,
    })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(LabError::Command {
            command: line,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

/// `ip ARGS...`
pub(crate) fn ip(args: &[&str]) -> Result<(), LabError> {
    run("ip", args)
}

/// Runs `program ARGS...` inside namespace `ns`.
pub(crate) fn exec(ns: &str, program: &str, args: &[&str]) -> Result<(), LabError> {
    let mut all = vec!["netns", "exec", ns, program];
    all.extend_from_slice(args);
    ip(&all)
}

/// Creates namespace `ns` with its loopback up (a namespace starts with `lo` down, and local
/// services bound to 127.0.0.1 would otherwise fail in confusing ways).
pub(crate) fn add(ns: &str) -> Result<(), LabError> {
    ip(&["netns", "add", ns])?;
    ip(&["-n", ns, "link", "set", "lo", "up"])
}

/// Sets a sysctl inside `ns`.
pub(crate) fn sysctl(ns: &str, key_value: &str) -> Result<(), LabError> {
    exec(ns, "sysctl", &["-q", "-w", key_value])
}

/// Kills what still runs in `ns` and deletes it. Deleting alone would only drop the name:
/// the namespace (and its addresses and NAT state) lives on as long as a process uses it.
pub(crate) fn remove(ns: &str) {
    if let Ok(out) = Command::new("ip")
        .args(["netns", "pids", ns])
        .stderr(Stdio::null())
        .output()
    {
        let pids: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .map(str::to_owned)
            .collect();
        if !pids.is_empty() {
            let _ = Command::new("kill")
                .arg("-KILL")
                .args(&pids)
                .stderr(Stdio::null())
                .status();
        }
    }
    let _ = Command::new("ip")
        .args(["netns", "del", ns])
        .stderr(Stdio::null())
        .status();
}

/// Moves the calling thread (only it) into namespace `ns`. Sockets it then creates belong to
/// `ns` for good, whichever thread uses them later.
pub(crate) fn enter(ns: &str) -> io::Result<()> {
    let file = File::open(format!("/run/netns/{ns}"))?;
    // SAFETY: setns only reads the fd, which `file` keeps open for the call.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
